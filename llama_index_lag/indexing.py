"""A persisted FAISS vector index over documents (llama-index-vector-stores-faiss).

Layout of an index folder (the whole LlamaIndex ``StorageContext`` plus a manifest)::

    default__vector_store.json   binary FAISS IndexFlatIP (normalised embeddings: scores are cosines)
    docstore.json                node text + metadata (FAISS stores vectors only)
    index_store.json             FAISS row -> node id
    graph_store.json, ...        other (empty) stores written by StorageContext.persist
    lag_index.json               manifest: format version, embedder fingerprint, chunking, doc ids, checksums

Documents are split by a sentence splitter that counts tokens with the embedder's own tokenizer; every node
keeps ``metadata["doc_id"]`` (= ``ref_doc_id``) and has the id ``"<doc_id>#<chunk>"``. The embedder must be
passed explicitly or defaults to the offline MiniLM; LlamaIndex ``Settings`` are never read or written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fs import atomic_dir, atomic_write_json, check_output, sha256_file
from .data import (
    DocumentRecord,
    adapter_name,
    check_text,
    doc_to_llama_document,
    id_key,
    validate_document_id,
)
from .errors import ConfigError, DataError, LAGError, VectorIndexError
from .ingest import load_documents
from .models import load_embed_model

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core import VectorStoreIndex
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.schema import BaseNode, TextNode

logger = logging.getLogger(__name__)

INDEX_FORMAT = "llama-index-lag/faiss-index"
INDEX_FORMAT_VERSION = 1
MANIFEST_FILE = "lag_index.json"
MAX_DOCUMENT_CHARS = 4 * 32768  # the builder's max_document_tokens (32768) at ~4 characters per token
VECTOR_STORE_FILE = "default__vector_store.json"
DOCSTORE_FILE = "docstore.json"
INDEX_STORE_FILE = "index_store.json"
CHECKED_FILES = (VECTOR_STORE_FILE, DOCSTORE_FILE, INDEX_STORE_FILE)

DEFAULT_CHUNK_SIZE = 512
DEFAULT_CHUNK_OVERLAP = 32
PROBE_TEXT = "llama-index-lag embedder probe: a quick brown fox jumps over the lazy dog near the river bank."
PROBE_MIN_COSINE = 0.999
_NORM_TOLERANCE = 1e-3
_SPECIAL_TOKENS = 2  # [CLS] ... [SEP] added by BERT-like embedders


@dataclass(frozen=True)
class RetrievedDoc:
    """One retrieval hit: the document id, the raw FAISS score (cosine), the chunk text and node id."""

    doc_id: str
    score: float
    text: str
    node_id: str
    title: str = ""


@dataclass(frozen=True)
class EmbedderInfo:
    """What identifies an embedder: dimension, name and the embedding of a fixed probe sentence."""

    dim: int
    name: str
    cls: str
    max_seq_length: int | None
    probe: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": self.cls,
            "dim": self.dim,
            "max_seq_length": self.max_seq_length,
            "normalized": True,
            "probe_text": PROBE_TEXT,
            "probe_embedding": [round(x, 6) for x in self.probe],
        }


# ---- embedder ----------------------------------------------------------------------------------------------


def _sentence_transformer(embed_model: BaseEmbedding) -> Any | None:
    model = getattr(embed_model, "_model", None)
    return model if model is not None and hasattr(model, "tokenizer") else None


def _embedder_name(embed_model: BaseEmbedding) -> str:
    name = str(getattr(embed_model, "model_name", "") or type(embed_model).__name__)
    path = Path(name)
    return "/".join(path.parts[-2:]) if path.is_absolute() else name


def embedder_info(embed_model: BaseEmbedding) -> EmbedderInfo:
    """Embed the probe sentence once: dimension + fingerprint. Refuses non-normalised embedders."""
    try:
        probe = [float(x) for x in embed_model.get_text_embedding(PROBE_TEXT)]
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"embedder failed on a probe sentence: {exc}", field="embed_model") from exc
    norm = math.sqrt(sum(x * x for x in probe))
    if not probe or abs(norm - 1.0) > _NORM_TOLERANCE:
        raise ConfigError(
            f"embedder must return L2-normalised vectors (probe norm {norm:.4f}); "
            "use HuggingFaceEmbedding(..., normalize=True)",
            field="embed_model",
        )
    st = _sentence_transformer(embed_model)
    max_len = getattr(st, "max_seq_length", None) if st is not None else None
    return EmbedderInfo(
        dim=len(probe),
        name=_embedder_name(embed_model),
        cls=type(embed_model).__name__,
        max_seq_length=int(max_len) if max_len else None,
        probe=tuple(probe),
    )


def _token_counter(embed_model: BaseEmbedding) -> Callable[[str], list[int]] | None:
    """Count tokens with the embedder's own tokenizer (no padding/truncation), if it exposes one."""
    st = _sentence_transformer(embed_model)
    backend = getattr(getattr(st, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend.to_str())
    tok.no_padding()
    tok.no_truncation()
    return lambda text: tok.encode(text, add_special_tokens=False).ids


# ---- chunking ----------------------------------------------------------------------------------------------


def _node_id(i: int, doc: Any) -> str:
    return f"{doc.doc_id}#{i}"


class _TitleTooLongError(ValueError):
    """The visible metadata (title) leaves no room for text in a chunk."""


def _make_splitter(chunk_size: int, chunk_overlap: int, tokenizer: Callable[[str], list[int]] | None) -> Any:
    from llama_index.core.node_parser import SentenceSplitter

    class _Splitter(SentenceSplitter):
        """SentenceSplitter whose metadata budget check raises instead of printing."""

        def split_text_metadata_aware(self, text: str, metadata_str: str) -> list[str]:
            budget = self.chunk_size - len(self._tokenizer(metadata_str))
            if budget <= self.chunk_overlap:
                raise _TitleTooLongError(
                    f"visible metadata (title) leaves {budget} of {self.chunk_size} tokens per chunk, "
                    f"not more than chunk_overlap={self.chunk_overlap}"
                )
            return self._split_text(text, chunk_size=budget)

    return _Splitter(
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=tokenizer, id_func=_node_id
    )


def effective_chunk_size(chunk_size: int | None, info: EmbedderInfo) -> int:
    """Tokens per chunk (title included): ``chunk_size`` capped at what the embedder reads untruncated."""
    cap = info.max_seq_length - _SPECIAL_TOKENS if info.max_seq_length else None
    if chunk_size is None:
        return min(DEFAULT_CHUNK_SIZE, cap) if cap else DEFAULT_CHUNK_SIZE
    if cap is not None and chunk_size > cap:
        logger.warning(
            "chunk_size %d exceeds what embedder %s reads (%d tokens); using %d",
            chunk_size,
            info.name,
            cap,
            cap,
        )
        return cap
    return chunk_size


def _check_chunking(chunk_size: int | None, chunk_overlap: int) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ConfigError(f"chunk_size must be a positive integer, got {chunk_size!r}", field="chunk_size")
    if not isinstance(chunk_overlap, int) or chunk_overlap < 0:
        raise ConfigError(f"chunk_overlap must be >= 0, got {chunk_overlap!r}", field="chunk_overlap")
    if chunk_size is not None and chunk_overlap >= chunk_size:
        raise ConfigError(
            f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})",
            field="chunk_overlap",
        )


def chunk_documents(
    documents: Sequence[DocumentRecord],
    *,
    chunk_size: int,
    chunk_overlap: int,
    tokenizer: Callable[[str], list[int]] | None = None,
) -> list[TextNode]:
    """Split documents into nodes (ids ``"<doc_id>#<i>"``, ``metadata["doc_id"]`` kept on every node)."""
    _check_chunking(chunk_size, chunk_overlap)
    splitter = _make_splitter(chunk_size, min(chunk_overlap, chunk_size - 1), tokenizer)
    nodes: list[TextNode] = []
    for rec in documents:
        try:
            doc_nodes = splitter.get_nodes_from_documents([doc_to_llama_document(rec)])
        except ValueError as exc:
            field = "title" if isinstance(exc, _TitleTooLongError) else "text"
            raise DataError(f"document {rec.id!r} cannot be chunked: {exc}", field=field) from exc
        for node in doc_nodes:
            if node.metadata.get("doc_id") != rec.id:  # pragma: no cover - guards LlamaIndex behaviour
                raise DataError(f"chunk of {rec.id!r} lost its doc_id metadata", field="doc_id")
        nodes.extend(doc_nodes)
    return nodes


# ---- build -------------------------------------------------------------------------------------------------


def _check_documents(documents: Any, max_chars: int) -> list[DocumentRecord]:
    records = load_documents(documents)
    if not records:
        raise DataError("no documents to index")
    seen: dict[str, str] = {}
    for rec in records:
        validate_document_id(rec.id)
        if not rec.text.strip():
            raise DataError(f"document {rec.id!r} has empty text", field="text")
        for name in ("text", "title"):
            try:
                check_text(getattr(rec, name), name)
            except DataError as exc:
                raise DataError(f"document {rec.id!r}: {exc.message}", field=name) from None
        if len(rec.text) > max_chars:
            raise DataError(f"document {rec.id!r} has {len(rec.text)} characters, more than the limit of "
                            f"{max_chars} (max_document_chars)", field="text")
        key = id_key(adapter_name(rec.id))  # as the library's adapter names
        if key in seen:
            raise DataError(f"duplicate document id {rec.id!r} (also {seen[key]!r})", field="id")
        seen[key] = rec.id
    return records


def _manifest(
    records: Sequence[DocumentRecord],
    nodes: Sequence[BaseNode],
    info: EmbedderInfo,
    chunking: dict[str, Any],
    folder: Path,
) -> dict[str, Any]:
    import faiss
    from llama_index.core import __version__ as li_version

    return {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llama_index_core": li_version,
        "faiss": faiss.__version__,
        "metric": "inner_product",
        "embedder": info.to_json(),
        "chunking": chunking,
        "num_documents": len(records),
        "num_nodes": len(nodes),
        "doc_ids": [r.id for r in records],
        "doc_sha256": {r.id: document_digest(r) for r in records},  # what `lag sync` compares
        "files": {name: {"sha256": sha256_file(folder / name)} for name in CHECKED_FILES},
    }


def document_digest(rec: DocumentRecord) -> str:
    """SHA-256 of what the index embeds of a document (title and text)."""
    return hashlib.sha256(json.dumps([rec.title, rec.text]).encode("utf-8")).hexdigest()


def build_index(
    documents: Iterable[DocumentRecord | BaseNode] | str | Path,
    out_dir: str | Path,
    *,
    embed_model: BaseEmbedding | None = None,
    chunk_size: int | None = None,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    show_progress: bool = True,
    force: bool = False,
    inputs: Iterable[str | Path] = (),
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> VectorStoreIndex:
    """Embed, index (FAISS ``IndexFlatIP``) and persist ``documents`` to ``out_dir``, atomically.

    ``documents``: :class:`DocumentRecord` s, llama-index ``Document`` s / nodes (ids by
    :func:`~llama_index_lag.ingest.stable_document_id`, the library's policy), a ``documents.jsonl`` path or
    a folder path (read with ``SimpleDirectoryReader``).

    ``chunk_size`` counts embedder tokens including the title line; ``None`` means 512 capped at what the
    embedder reads (254 for MiniLM); larger values are capped with a warning. An existing index at ``out_dir``
    is replaced only once the new one is completely written; anything else there (a non-empty folder that is
    not a lag index, a file) is refused with :class:`UnsafeOutputError` unless ``force``, and so is an
    ``out_dir`` holding one of ``inputs`` (the documents file). Documents longer than
    ``max_document_chars`` are refused with a :class:`DataError` naming them (embedding is linear in the
    text; the default is the adapter builder's ``max_document_tokens`` at ~4 characters per token).
    """
    _check_chunking(chunk_size, chunk_overlap)
    if not isinstance(max_document_chars, int) or max_document_chars <= 0:
        raise ConfigError(f"max_document_chars must be a positive integer, got {max_document_chars!r}",
                          field="max_document_chars")
    if isinstance(documents, (str, Path)):
        inputs = [*inputs, documents]
    records = _check_documents(documents, max_document_chars)
    out = check_output(out_dir, ours=lambda p: (p / MANIFEST_FILE).is_file(), what="lag index", inputs=inputs,
                       force=force)
    embed_model = embed_model if embed_model is not None else load_embed_model()
    info = embedder_info(embed_model)
    size = effective_chunk_size(chunk_size, info)
    tokenizer = _token_counter(embed_model)
    nodes = chunk_documents(records, chunk_size=size, chunk_overlap=chunk_overlap, tokenizer=tokenizer)
    chunking = {
        "splitter": "SentenceSplitter",
        "tokenizer": "embedder" if tokenizer is not None else "llama-index default",
        "chunk_size": size,
        "chunk_size_requested": chunk_size,
        "chunk_overlap": min(chunk_overlap, size - 1),
    }

    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.vector_stores.faiss import FaissVectorStore

    with atomic_dir(out) as tmp:
        vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(info.dim))
        storage = StorageContext.from_defaults(vector_store=vector_store)
        index = VectorStoreIndex(
            nodes, storage_context=storage, embed_model=embed_model, show_progress=show_progress
        )
        if vector_store.client.ntotal != len(nodes):  # pragma: no cover - guards LlamaIndex behaviour
            raise VectorIndexError(f"FAISS holds {vector_store.client.ntotal} vectors for {len(nodes)} nodes")
        storage.persist(persist_dir=str(tmp))
        atomic_write_json(tmp / MANIFEST_FILE, _manifest(records, nodes, info, chunking, tmp))
    logger.info("indexed %d documents as %d nodes (dim %d) in %s", len(records), len(nodes), info.dim, out)
    return index


# ---- load --------------------------------------------------------------------------------------------------


def read_index_manifest(index_dir: str | Path) -> dict[str, Any]:
    """Read and check ``lag_index.json`` of an index folder (no model is loaded)."""
    folder = Path(index_dir)
    if not folder.is_dir():
        raise VectorIndexError("index folder not found", path=folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise VectorIndexError(
            f"not a lag index: {MANIFEST_FILE} is missing (build it with `lag index`)", path=path
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise VectorIndexError(f"corrupt index manifest: {exc}", path=path) from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise VectorIndexError("not a lag index manifest", path=path)
    if manifest.get("format_version") != INDEX_FORMAT_VERSION:
        raise VectorIndexError(
            f"unsupported index format version {manifest.get('format_version')!r} "
            f"(this version reads {INDEX_FORMAT_VERSION}); rebuild the index",
            path=path,
        )
    try:
        int(manifest["embedder"]["dim"]), int(manifest["num_nodes"]), list(manifest["doc_ids"])
    except (KeyError, TypeError, ValueError) as exc:
        raise VectorIndexError(f"incomplete index manifest ({exc})", path=path) from None
    return manifest


def _verify_files(folder: Path, manifest: dict[str, Any]) -> None:
    for name in CHECKED_FILES:
        path = folder / name
        if not path.is_file():
            raise VectorIndexError("index file is missing", path=path)
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        if expected and sha256_file(path) != expected:
            raise VectorIndexError("index file is corrupt or was modified (checksum mismatch)", path=path)


def _load_faiss(folder: Path, manifest: dict[str, Any]) -> Any:
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    path = folder / VECTOR_STORE_FILE
    try:
        store = FaissVectorStore.from_persist_dir(str(folder))
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with C++ text
        raise VectorIndexError(f"cannot read FAISS index: {str(exc).splitlines()[0]}", path=path) from None
    client = store.client
    if client.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise VectorIndexError("FAISS index is not an inner-product index", path=path)
    dim, nodes = int(manifest["embedder"]["dim"]), int(manifest["num_nodes"])
    if client.d != dim or client.ntotal != nodes:
        raise VectorIndexError(
            f"FAISS index has {client.ntotal} vectors of dimension {client.d}; "
            f"{MANIFEST_FILE} says {nodes} of dimension {dim}",
            path=path,
        )
    return store


def _load_store(cls: Any, path: Path) -> Any:
    try:
        return cls.from_persist_path(str(path))
    except Exception as exc:  # noqa: BLE001 - JSON / schema errors of LlamaIndex stores
        raise VectorIndexError(f"cannot read {path.name}: {type(exc).__name__}: {exc}", path=path) from None


def check_embedder(
    embed_model: BaseEmbedding, manifest: dict[str, Any], index_dir: Path, *, strict: bool = True
) -> None:
    """Dimension mismatch always raises; a different probe embedding raises if ``strict`` else warns."""
    recorded = manifest["embedder"]
    info = embedder_info(embed_model)
    if info.dim != int(recorded["dim"]):
        raise VectorIndexError(
            f"embedder {info.name!r} gives {info.dim}-d embeddings but the index was built with "
            f"{recorded.get('name')!r} at {recorded['dim']}-d",
            path=index_dir,
        )
    probe = recorded.get("probe_embedding")
    if not probe or len(probe) != info.dim:
        return
    cosine = sum(a * b for a, b in zip(info.probe, probe, strict=True)) / max(
        math.sqrt(sum(b * b for b in probe)), 1e-12
    )
    if cosine < PROBE_MIN_COSINE:
        msg = (
            f"embedder {info.name!r} differs from the one that built the index ({recorded.get('name')!r}): "
            f"probe cosine {cosine:.4f} < {PROBE_MIN_COSINE}"
        )
        if strict:
            raise VectorIndexError(msg + "; pass strict=False to use it anyway", path=index_dir)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def load_index(
    index_dir: str | Path, *, embed_model: BaseEmbedding | None = None, strict: bool = True
) -> VectorStoreIndex:
    """Load an index written by :func:`build_index`, checking files, checksums and the embedder."""
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.core.storage.index_store import SimpleIndexStore

    folder = Path(index_dir)
    manifest = read_index_manifest(folder)
    _verify_files(folder, manifest)
    vector_store = _load_faiss(folder, manifest)
    docstore = _load_store(SimpleDocumentStore, folder / DOCSTORE_FILE)
    index_store = _load_store(SimpleIndexStore, folder / INDEX_STORE_FILE)
    embed_model = embed_model if embed_model is not None else load_embed_model()
    check_embedder(embed_model, manifest, folder, strict=strict)
    storage = StorageContext.from_defaults(
        docstore=docstore, index_store=index_store, vector_store=vector_store
    )
    try:
        index = load_index_from_storage(storage, embed_model=embed_model)
    except LAGError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VectorIndexError(f"cannot load index: {exc}", path=folder / INDEX_STORE_FILE) from None
    n_struct = len(index.index_struct.nodes_dict)
    if n_struct != int(manifest["num_nodes"]) or len(docstore.docs) != n_struct:
        raise VectorIndexError(
            f"inconsistent index: {n_struct} nodes in {INDEX_STORE_FILE}, {len(docstore.docs)} in "
            f"{DOCSTORE_FILE}, {manifest['num_nodes']} in {MANIFEST_FILE}",
            path=folder,
        )
    return index


# ---- retrieve ----------------------------------------------------------------------------------------------


def _hit_to_doc(hit: Any) -> RetrievedDoc:
    node = hit.node
    doc_id = node.metadata.get("doc_id") or node.ref_doc_id
    return RetrievedDoc(
        doc_id=str(doc_id),
        score=float(hit.score),
        text=node.get_content(),
        node_id=node.node_id,
        title=str(node.metadata.get("title", "")),
    )


def _dedupe(docs: Iterable[RetrievedDoc]) -> list[RetrievedDoc]:
    best: dict[str, RetrievedDoc] = {}
    for doc in docs:
        if doc.doc_id not in best or doc.score > best[doc.doc_id].score:
            best[doc.doc_id] = doc
    return sorted(best.values(), key=lambda d: d.score, reverse=True)


def retrieve_documents(
    index: VectorStoreIndex, query: str, top_k: int = 3, *, dedupe: bool = False
) -> list[RetrievedDoc]:
    """The ``top_k`` best chunks for ``query``, best first; scores are raw inner products (= cosine).

    With ``dedupe=True`` each document appears once (its best chunk), up to ``top_k`` documents.
    """
    from llama_index.core.schema import QueryBundle

    if not isinstance(query, str) or not query.strip():
        raise ConfigError("query is empty", field="query")
    if not isinstance(top_k, int) or top_k < 1:
        raise ConfigError(f"top_k must be a positive integer, got {top_k!r}", field="top_k")
    total = len(index.index_struct.nodes_dict)
    bundle = QueryBundle(query_str=query)  # the retriever caches the query embedding on it
    fetch = min(top_k * 4 if dedupe else top_k, total)
    while True:
        hits = index.as_retriever(similarity_top_k=max(fetch, 1)).retrieve(bundle)
        docs = [_hit_to_doc(h) for h in hits]
        if not dedupe:
            return docs[:top_k]
        unique = _dedupe(docs)
        if len(unique) >= top_k or fetch >= total:
            return unique[:top_k]
        fetch = min(fetch * 4, total)


__all__ = [
    "RetrievedDoc",
    "EmbedderInfo",
    "build_index",
    "load_index",
    "read_index_manifest",
    "retrieve_documents",
    "chunk_documents",
    "embedder_info",
    "effective_chunk_size",
    "check_embedder",
    "MANIFEST_FILE",
    "INDEX_FORMAT_VERSION",
]
