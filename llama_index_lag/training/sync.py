"""Documents change: bring an index and a knowledge library up to date with a folder or ``documents.jsonl``.

:func:`sync_documents` compares the documents with the library (its manifest's document ids, each adapter's
``lag_adapter.json`` text hash and title): added and changed documents get (re)built adapters, removed ones
leave the library; the library is rewritten once (``AdapterLibrary.update``: one atomic rewrite) and the index
is re-embedded from the new documents (atomic replace; embedding costs little next to adapter training).
Interrupted, it resumes: finished adapters of the current text are reused. CLI: ``lag sync``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DocumentRecord, adapter_name
from ..errors import ConfigError
from ..ingest import load_documents
from .builder import BuildReport, build_knowledge_adapters, read_adapter_meta
from .recipe import KnowledgeRecipe


@dataclass
class SyncReport:
    """What :func:`sync_documents` found and did (document ids)."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    build: BuildReport | None = None
    seconds: float = 0.0

    @property
    def up_to_date(self) -> bool:
        return not (self.added or self.changed or self.removed)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _adapters_dir(library: Any, given: str | Path | None) -> Path:
    """The folder of the library's adapter folders: given, else the one folder all its sources share."""
    if given is not None:
        return Path(given)
    parents = {Path(e["source"]).parent for e in library.adapters if e.get("source")}
    if len(parents) != 1:
        raise ConfigError("cannot tell where the library's adapter folders are; pass adapters_dir / "
                          "--adapters", field="adapters_dir")
    return parents.pop()


def plan_sync(docs: list[DocumentRecord], library: Any, adapters_dir: Path) -> SyncReport:
    """Classify ``docs`` against ``library`` (None: every document is new)."""
    report = SyncReport()
    known = library.doc_ids() if library is not None else {}
    for doc in docs:
        if doc.id not in known:
            report.added.append(doc.id)
            continue
        meta = read_adapter_meta(adapters_dir / known[doc.id])
        same = meta is not None and meta.get("document_sha256") == _sha(doc.text) and \
            meta.get("title", "") == doc.title
        (report.unchanged if same else report.changed).append(doc.id)
    ids = {d.id for d in docs}
    report.removed = [d for d in known if d not in ids]
    return report


def sync_documents(
    documents: Any,
    *,
    index_dir: str | Path,
    library_dir: str | Path,
    adapters_dir: str | Path | None = None,
    base: str | Path | None = None,
    recipe: KnowledgeRecipe | None = None,
    seed: int = 0,
    workers: int = 1,
    embed_model: Any = None,
    progress: bool = True,
    dry_run: bool = False,
    **build_kwargs: Any,
) -> SyncReport:
    """Update ``library_dir`` and ``index_dir`` to ``documents`` (records, llama-index documents, a JSONL or
    a folder), rebuilding only the adapters of added and changed documents (see the module docstring).
    A missing library or index is built. ``dry_run``: only report what would change."""
    from ..indexing import DEFAULT_CHUNK_OVERLAP, build_index, document_digest, read_index_manifest
    from ..library import AdapterLibrary
    from ..library.integrity import MANIFEST
    from ..models import resolve_model_dir

    start = time.perf_counter()
    docs = load_documents(documents)
    library_dir = Path(library_dir)
    library = AdapterLibrary.load(library_dir) if (library_dir / MANIFEST).is_file() else None
    if library is not None and library.kind != "knowledge":
        raise ConfigError(f"{library_dir} is a {library.kind} library, not a knowledge library",
                          field="library_dir")
    if library is None and adapters_dir is None:
        adapters_dir = library_dir.with_name(f"{library_dir.name}-adapters")
    folder = _adapters_dir(library, adapters_dir) if library is not None else Path(adapters_dir)
    report = plan_sync(docs, library, folder)
    index_dir = Path(index_dir)
    index_current = (index_dir / "lag_index.json").is_file() and \
        read_index_manifest(index_dir).get("doc_sha256") == {d.id: document_digest(d) for d in docs}
    if dry_run or (report.up_to_date and index_current):
        report.seconds = time.perf_counter() - start
        return report
    todo = [d for d in docs if d.id in set(report.added) | set(report.changed)]
    if todo:
        report.build = build_knowledge_adapters(todo, folder, base=base, recipe=recipe, seed=seed,
                                                workers=workers, progress=progress, **build_kwargs)
    dirs = [folder / adapter_name(d.id) for d in todo]
    if library is None:
        AdapterLibrary.compile(dirs, kind="knowledge", base_model=resolve_model_dir(base), out=library_dir,
                               progress=progress)
    elif todo or report.removed:
        known = library.doc_ids()
        drop = [known[d] for d in report.removed + report.changed]
        library.update(dirs, remove=drop, progress=progress)
    chunking = read_index_manifest(index_dir)["chunking"] if (index_dir / "lag_index.json").is_file() else {}
    build_index(docs, index_dir, embed_model=embed_model, chunk_size=chunking.get("chunk_size_requested"),
                chunk_overlap=chunking.get("chunk_overlap", DEFAULT_CHUNK_OVERLAP), show_progress=progress)
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["SyncReport", "plan_sync", "sync_documents"]
