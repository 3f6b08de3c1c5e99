"""Documents from llama-index: ``Document`` s and nodes (from ``SimpleDirectoryReader``, a loader, your own
code) as :class:`~llama_index_lag.data.DocumentRecord` s with stable ids, under the one id policy the index
and the library share (:mod:`llama_index_lag.ids`: any document id; its adapter is ``adapter_name(id)``).

* :func:`stable_document_id` — the id of a ``Document`` or of a retrieved chunk of it:
  ``metadata["doc_id"]`` when set, else its own id, except llama-index's random default UUID (new on every
  load) when the file it came from is known (``metadata["file_path"]``): then that path.
* :func:`document_records` — ``Document`` s / nodes / records -> records (text without metadata; ``title``
  from ``metadata["title"]``, else the file name's stem).
* :func:`read_directory` — a folder through ``SimpleDirectoryReader`` (recursive), ids = paths relative to
  the folder (so the same file has the same id on every load and machine).
* :func:`load_documents` — any of these, or a ``documents.jsonl`` path, or a folder path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .data import DocumentRecord, read_documents
from .errors import DataError, MissingDependencyError

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RESERVED = ("doc_id", "title")


def stable_document_id(node: Any) -> str:
    """The document id of a llama-index ``Document`` or node under the one id policy (module docstring)."""
    from llama_index.core.schema import Document

    meta = getattr(node, "metadata", None) or {}
    if isinstance(meta.get("doc_id"), str) and meta["doc_id"]:
        return meta["doc_id"]
    own = node.id_ if isinstance(node, Document) else (node.ref_doc_id or node.id_)
    path = meta.get("file_path")
    if _UUID.fullmatch(str(own)) and isinstance(path, str) and path:
        return path
    return str(own)


def _record(node: Any) -> DocumentRecord:
    from llama_index.core.schema import BaseNode, MetadataMode

    if isinstance(node, DocumentRecord):
        return node
    if not isinstance(node, BaseNode):
        raise DataError(f"expected a DocumentRecord or a llama-index Document / node, got "
                        f"{type(node).__name__}", field="documents")
    meta = dict(node.metadata or {})
    title = meta.get("title")
    if not isinstance(title, str):
        name = meta.get("file_name")
        title = Path(name).stem if isinstance(name, str) else ""
    extra = {k: v for k, v in meta.items()
             if k not in _RESERVED and isinstance(v, (str, int, float, bool)) and v is not None}
    return DocumentRecord(id=stable_document_id(node), text=node.get_content(metadata_mode=MetadataMode.NONE),
                          title=title, metadata=extra)


def document_records(documents: Iterable[Any]) -> list[DocumentRecord]:
    """Records for ``DocumentRecord`` s, llama-index ``Document`` s or nodes (mixed is fine); ids by
    :func:`stable_document_id`. A file read as several documents without ``filename_as_id=True`` gives
    duplicate ids: a :class:`DataError` says so."""
    records = [_record(d) for d in documents]
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec.id in seen:
            raise DataError(f"duplicate document id {rec.id!r}: documents {seen[rec.id]} and {i} (a file "
                            "read as several documents? load it with filename_as_id=True)", field="id")
        seen[rec.id] = i
    return records


def read_directory(input_dir: str | Path, *, required_exts: Sequence[str] | None = None,
                   recursive: bool = True) -> list[DocumentRecord]:
    """The documents of a folder, read by llama-index's ``SimpleDirectoryReader`` (``recursive``, only files
    ending in ``required_exts`` when given, e.g. ``[".md", ".txt"]``); each id is the file's path relative
    to ``input_dir`` (``/``-separated; ``_part_N`` appended for files read as several documents)."""
    try:
        from llama_index.core import SimpleDirectoryReader
    except ImportError as exc:  # pragma: no cover - llama-index-core is a dependency
        raise MissingDependencyError("pip install llama-index-core") from exc
    root = Path(input_dir).expanduser()
    if not root.is_dir():
        raise DataError("not a folder", path=root, field="input_dir")
    exts = [e if e.startswith(".") else f".{e}" for e in required_exts] if required_exts else None
    try:
        docs = SimpleDirectoryReader(str(root), recursive=recursive, required_exts=exts,
                                     filename_as_id=True).load_data()
    except ValueError as exc:  # "No files found in ..."
        raise DataError(f"no documents to read: {exc}", path=root, field="input_dir") from None
    for doc in docs:
        path = doc.metadata.get("file_path", "")
        suffix = doc.id_[len(path):] if path and doc.id_.startswith(path) else ""
        rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
        doc.metadata["doc_id"] = rel + suffix  # the stable id, kept by whatever indexes these documents
    return document_records(docs)


def load_documents(source: Any) -> list[DocumentRecord]:
    """Records from a ``documents.jsonl`` path, a folder path (:func:`read_directory`) or a sequence of
    records / llama-index documents / nodes."""
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        return read_directory(path) if path.is_dir() else read_documents(path)
    return document_records(source)


__all__ = ["document_records", "load_documents", "read_directory", "stable_document_id"]
