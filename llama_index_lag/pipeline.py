"""One config, six modes: ``none | rag | lag | rag+lag | prag | prag+lag`` as standard LlamaIndex query
engines.

=========  ==========================================  =========================================
mode       retrieval (FAISS)                           adapters
=========  ==========================================  =========================================
none       no (no embedding, no search)                off
rag        top-k documents in the prompt               off
lag        no                                          LAG over every attached library
rag+lag    top-k documents in the prompt               LAG over every attached library
prag       top document -> its knowledge adapter,      that adapter (fixed); no text in prompt
           no text in the prompt
prag+lag   as prag                                     that adapter + LAG over task adapters
=========  ==========================================  =========================================

Switching mode is a config change only: :func:`build_query_engine` reuses one loaded model (with its
libraries attached once), one embedder and one index per process.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_index.core.base.response.schema import RESPONSE_TYPE, StreamingResponse
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import BaseNode, NodeWithScore, QueryBundle

from .errors import ConfigError, LibraryError
from .ingest import stable_document_id
from .llm import shared_llm
from .pipeline_config import MODES, RETRIEVAL_MODES, LAGPipelineConfig, Mode
from .trace import collect_into, collect_routing, merge_summaries  # merge_summaries: re-exported (moved)

logger = logging.getLogger(__name__)

__all__ = ["MODES", "RETRIEVAL_MODES", "Coverage", "LAGPipelineConfig", "LAGQueryEngine", "Mode",
           "NoRetriever", "build_query_engine", "check_coverage", "index_document_ids", "merge_summaries",
           "shared_embed_model", "shared_index", "shared_llm"]

# ---- process-wide sharing: one model (llm.shared_llm) / embedder / index per process, whatever the mode ---
_LOCK = threading.Lock()
_EMBEDDERS: dict[str | None, Any] = {}
_INDEXES: dict[tuple, Any] = {}


def shared_embed_model(path: str | None) -> Any:
    from .models import load_embed_model

    with _LOCK:
        if path not in _EMBEDDERS:
            _EMBEDDERS[path] = load_embed_model(path)
        return _EMBEDDERS[path]


def shared_index(index_dir: str, embed_model: Any) -> Any:
    """The process's loaded index of ``index_dir``, reloaded when the index on disk was rebuilt since (its
    manifest changed, e.g. by ``lag sync``); engines built before keep the index they have."""
    from .indexing import MANIFEST_FILE, load_index

    key = (str(Path(index_dir).resolve()), id(embed_model))
    try:
        stamp = hashlib.sha256((Path(index_dir) / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError:
        stamp = None  # load_index names the problem
    with _LOCK:
        cached = _INDEXES.get(key)
        if cached is None or cached[0] != stamp:
            if cached is not None:
                logger.info("index %s changed on disk: reloading it", index_dir)
            _INDEXES[key] = (stamp, load_index(index_dir, embed_model=embed_model))
        return _INDEXES[key][1]


# ---- query engine ------------------------------------------------------------------------------------
#: PRAG's document -> adapter mapping: a callable ``node -> adapter name``, or a metadata key holding it
DocToAdapter = Callable[[BaseNode], "str | None"] | str | None


class NoRetriever(BaseRetriever):
    """Retrieves nothing, without embedding the query: for the modes that do not retrieve."""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return []


def prag_adapter(nodes: list[NodeWithScore], doc_to_adapter: dict[str, str] | DocToAdapter) -> str:
    """The knowledge adapter PRAG applies for these retrieved nodes (the top document's)."""
    if not nodes:
        raise LibraryError("PRAG retrieved no document, so there is no knowledge adapter to apply")
    node = nodes[0].node
    doc_id = stable_document_id(node)  # the library's id policy (ingest)
    if callable(doc_to_adapter):
        adapter = doc_to_adapter(node)
    elif isinstance(doc_to_adapter, str):
        adapter = (node.metadata or {}).get(doc_to_adapter)
    else:
        adapter = (doc_to_adapter or {}).get(doc_id)
    if adapter is None:
        raise LibraryError(f"retrieved document {doc_id!r} has no adapter in the knowledge library "
                           "(build it with `lag build-adapters`)", adapter=doc_id, field="knowledge")
    return adapter


def mode_routing(mode: str, nodes: list[NodeWithScore], doc_to_adapter: Any,
                 lag_routing: dict[str, Any]) -> dict[str, Any]:
    """The routing (LAGConfig fields) of pipeline ``mode`` for one query with these retrieved nodes;
    ``lag_routing``: the engine's LAG settings. Empty for ``none`` / ``lag`` (the LLM's own routing)."""
    if mode in ("prag", "prag+lag"):
        fixed = {"knowledge": [prag_adapter(nodes, doc_to_adapter)]}
        return {"mode": "fixed", "fixed": fixed} if mode == "prag" else {**lag_routing, "fixed": fixed}
    if mode == "rag":
        return {"mode": "none"}
    if mode == "rag+lag":
        return dict(lag_routing)
    return {}


class LAGQueryEngine(RetrieverQueryEngine):
    """A ``RetrieverQueryEngine`` that knows its pipeline mode: PRAG's per-query adapter and the routing
    summary in ``response.metadata["lag"]``. Under ``llm.routing_override(mode=...)`` with a retrieval mode
    (``rag``, ``rag+lag``, ``prag``, ``prag+lag``) a query runs in that mode (the engine needs an index)."""

    def __init__(self, *args: Any, mode: str, llm: Any = None,
                 doc_to_adapter: dict[str, str] | DocToAdapter = None,
                 lag_routing: dict[str, Any] | None = None,
                 synthesizer_factory: Callable[[str], Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._llm = llm
        self._doc_to_adapter = doc_to_adapter if doc_to_adapter is not None else {}
        self._lag_routing = lag_routing or {}
        self._synthesizer_factory = synthesizer_factory
        self._synthesizers: dict[str, Any] = {}

    @property
    def llm(self) -> Any:
        """The LAGLLM view this engine generates with (shared model, this mode's routing)."""
        return self._llm

    def prag_adapter(self, nodes: list[NodeWithScore]) -> str:
        """The knowledge adapter PRAG applies for these retrieved nodes (the top document's)."""
        return prag_adapter(nodes, self._doc_to_adapter)

    def mode_now(self) -> str:
        """This query's pipeline mode: a retrieval mode set by ``llm.routing_override(mode=...)``, else the
        engine's."""
        override = self._llm.override_mode() if self._llm is not None else None
        if override in RETRIEVAL_MODES and override != self.mode:
            if isinstance(self._retriever, NoRetriever):
                raise ConfigError(f"mode {override!r} retrieves documents, but this engine was built in mode "
                                  f"{self.mode!r} without an index", field="mode")
            return override
        return self.mode

    def _synthesizer(self, mode: str) -> Any:
        same_kind = (mode in ("rag", "rag+lag")) == (self.mode in ("rag", "rag+lag"))
        if same_kind or self._synthesizer_factory is None:
            return self._response_synthesizer
        if mode not in self._synthesizers:
            self._synthesizers[mode] = self._synthesizer_factory(mode)
        return self._synthesizers[mode]

    @contextlib.contextmanager
    def _routing(self, nodes: list[NodeWithScore], mode: str) -> Iterator[None]:
        routing = mode_routing(mode, nodes, self._doc_to_adapter, self._lag_routing)
        if routing and (mode != self.mode or mode in ("prag", "prag+lag")):
            with self._llm.routing_override(**routing):
                yield
        else:
            yield

    @staticmethod
    def _synth_nodes(nodes: list[NodeWithScore], mode: str) -> list[NodeWithScore]:
        return [] if mode in ("prag", "prag+lag") else nodes

    def _finish(self, response: RESPONSE_TYPE, nodes: list[NodeWithScore], sink: list[dict[str, Any]],
                mode: str) -> RESPONSE_TYPE:
        response.source_nodes = nodes
        response.metadata = dict(response.metadata or {})
        if isinstance(response, StreamingResponse) and response.response_gen is not None:
            inner = response.response_gen

            def gen() -> Iterator[str]:  # the synthesizer calls the LLM lazily, while this runs
                with collect_into(sink), self._routing(nodes, mode):
                    yield from inner
                response.metadata["lag"] = merge_summaries(sink)

            response.response_gen = gen()
        else:
            response.metadata["lag"] = merge_summaries(sink)
        response.metadata["mode"] = mode
        return response

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        mode = self.mode_now()
        nodes = self.retrieve(query_bundle) if mode in RETRIEVAL_MODES else []
        with collect_routing() as sink, self._routing(nodes, mode):
            response = self._synthesizer(mode).synthesize(query=query_bundle,
                                                          nodes=self._synth_nodes(nodes, mode))
        return self._finish(response, nodes, sink, mode)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        mode = self.mode_now()
        nodes = await self.aretrieve(query_bundle) if mode in RETRIEVAL_MODES else []
        with collect_routing() as sink, self._routing(nodes, mode):
            response = await self._synthesizer(mode).asynthesize(query=query_bundle,
                                                                 nodes=self._synth_nodes(nodes, mode))
        return self._finish(response, nodes, sink, mode)


# ---- index <-> library coverage -------------------------------------------------------------------------
@dataclass(frozen=True)
class Coverage:
    """Which indexed documents have a knowledge adapter (under the one id policy)."""

    documents: int
    adapters: int
    documents_without_adapters: list[str]
    adapters_without_documents: list[str]

    @property
    def complete(self) -> bool:
        return not self.documents_without_adapters and not self.adapters_without_documents


def index_document_ids(index: Any) -> list[str] | None:
    """The document ids of an index folder (its manifest) or of an index object (its docstore's nodes; None
    when the vector store keeps no docstore)."""
    if isinstance(index, (str, Path)):
        from .indexing import read_index_manifest

        return list(read_index_manifest(index)["doc_ids"])
    nodes = list(getattr(getattr(index, "docstore", None), "docs", {}).values())
    return sorted({stable_document_id(n) for n in nodes}) if nodes else None


def check_coverage(index: Any, libraries: Any) -> Coverage:
    """Documents of ``index`` (folder or object) without an adapter in the knowledge ``libraries`` (library
    objects or folders), and adapters whose document is not in the index."""
    from .library import AdapterLibrary

    libs = [lib if isinstance(lib, AdapterLibrary) else AdapterLibrary.load(lib)
            for lib in (libraries if isinstance(libraries, (list, tuple)) else [libraries])]
    docs = index_document_ids(index)
    if docs is None:
        raise ConfigError("the index keeps no docstore, so its documents cannot be listed", field="index")
    known = {d: a for lib in libs for d, a in lib.doc_ids().items()}
    return Coverage(documents=len(docs), adapters=len(known),
                    documents_without_adapters=[d for d in docs if d not in known],
                    adapters_without_documents=sorted(a for d, a in known.items() if d not in set(docs)))


_CHECKED: set[tuple[int, tuple[str, ...]]] = set()  # (index, libraries) already checked: warn once


def _warn_uncovered(index: Any, libraries: Any) -> None:
    key = (id(index), tuple(str(lib.path) for lib in libraries))
    if key in _CHECKED:
        return
    _CHECKED.add(key)
    try:
        cov = check_coverage(index, libraries)
    except ConfigError:
        return
    if cov.documents_without_adapters:
        missing = cov.documents_without_adapters
        logger.warning("%d of %d indexed documents have no knowledge adapter (e.g. %r): PRAG fails when it "
                       "retrieves one; `lag check --index ... --knowledge ...` lists them", len(missing),
                       cov.documents, missing[0])


#: as_query_engine / RetrieverQueryEngine.from_args keyword arguments build_query_engine passes on
ENGINE_KWARGS = ("node_postprocessors", "text_qa_template", "refine_template", "summary_template",
                 "simple_template", "filters", "use_async", "verbose", "output_cls", "callback_manager")


def _split_kwargs(kwargs: dict[str, Any], engine_keys: tuple[str, ...],
                  what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides, engine keyword arguments); anything else is a ConfigError naming it."""
    fields = set(LAGPipelineConfig.model_fields)
    unknown = sorted(set(kwargs) - fields - set(engine_keys))
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(fields | set(engine_keys)), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{what} got unknown keyword argument(s) {unknown}{hint}", field=unknown[0])
    return ({k: v for k, v in kwargs.items() if k in fields},
            {k: v for k, v in kwargs.items() if k in engine_keys})


def resolve_config(config: LAGPipelineConfig | str | Path | None,
                   overrides: dict[str, Any]) -> LAGPipelineConfig:
    """A config object from an object, a file or None (the defaults), with ``overrides`` applied."""
    if config is None:
        return LAGPipelineConfig(**overrides)
    if not isinstance(config, LAGPipelineConfig):
        return LAGPipelineConfig.load(config, **overrides)
    if overrides:
        return LAGPipelineConfig(**config.model_copy(update=overrides).model_dump())
    return config


@dataclass
class EngineParts:
    """What every pipeline engine is built from: the LLM view, the retriever (None: the mode does not
    retrieve and no index was given), PRAG's mapping, and the LAG settings of the ``+lag`` modes."""

    config: LAGPipelineConfig
    llm: Any
    retriever: BaseRetriever | None
    doc_to_adapter: Any
    lag_routing: dict[str, Any]


def engine_parts(config: LAGPipelineConfig, *, llm: Any, index: Any, retriever: BaseRetriever | None,
                 embed_model: Any, doc_to_adapter: DocToAdapter, filters: Any = None) -> EngineParts:
    """Load or reuse the LLM, index / retriever and PRAG mapping of ``config`` (see build_query_engine)."""
    config.check(has_index=index is not None or retriever is not None, has_llm=llm is not None)
    if llm is None:
        llm = shared_llm(config)
    else:
        llm = llm.with_routing(config.lag_config()).model_copy(
            update={"max_new_tokens": config.max_new_tokens})
    know = list(llm.router.libraries.get("knowledge", [])) if llm.router else []
    if config.mode in ("prag", "prag+lag") and not know:
        raise ConfigError(f"mode {config.mode!r} needs a knowledge library attached to the LLM",
                          field="knowledge")
    mapping = doc_to_adapter if doc_to_adapter is not None else {
        d: a for lib in know for d, a in lib.doc_ids().items()}
    if retriever is None and (index is not None or config.mode in RETRIEVAL_MODES):
        if index is None:
            embed = embed_model if embed_model is not None else shared_embed_model(config.embed_model)
            index = shared_index(config.index, embed)
        retriever = index.as_retriever(similarity_top_k=config.similarity_top_k,
                                       **({"filters": filters} if filters is not None else {}))
        if config.mode in ("prag", "prag+lag") and doc_to_adapter is None:
            _warn_uncovered(index, know)
    elif filters is not None:
        raise ConfigError("filters apply to an index's retriever; set them on the retriever you pass",
                          field="filters")
    lag_routing = config.model_copy(update={"mode": "lag"}).lag_config().to_dict()
    return EngineParts(config, llm, retriever, mapping, lag_routing)


def build_query_engine(
    config: LAGPipelineConfig | str | Path | None = None,
    *,
    llm: Any = None,
    index: Any = None,
    retriever: BaseRetriever | None = None,
    embed_model: Any = None,
    streaming: bool = False,
    doc_to_adapter: DocToAdapter = None,
    **kwargs: Any,
) -> LAGQueryEngine:
    """A LlamaIndex query engine for ``config.mode`` (a config object, a file, or None for the defaults).

    ``llm`` (a LAGLLM), ``index`` (any ``VectorStoreIndex``: FAISS, the simple store, yours) or ``retriever``
    (any ``BaseRetriever``) and ``embed_model`` are used when given (then ``config.index`` is not needed);
    otherwise they are loaded once per process and shared by every engine built here. ``kwargs``:
    :class:`LAGPipelineConfig` fields (``mode``, ``k``, ``similarity_top_k``, ``response_mode``, ...) replace
    the config's, and ``as_query_engine``'s own arguments (:data:`ENGINE_KWARGS`: ``node_postprocessors``,
    ``text_qa_template``, ``refine_template``, ``filters``, ...) are passed on; any other is a
    :class:`ConfigError`. ``doc_to_adapter`` (PRAG): a callable ``node -> adapter name``, or a metadata key
    holding it; by default the retrieved document's id (:func:`~llama_index_lag.ingest.stable_document_id`)
    looked up in the knowledge library.
    """
    overrides, engine_kw = _split_kwargs(kwargs, ENGINE_KWARGS, "build_query_engine")
    config = resolve_config(config, overrides)
    parts = engine_parts(config, llm=llm, index=index, retriever=retriever, embed_model=embed_model,
                         doc_to_adapter=doc_to_adapter, filters=engine_kw.pop("filters", None))
    llm = parts.llm
    # count prompt tokens with the model's own tokenizer when packing retrieved text into the window
    helper = PromptHelper.from_llm_metadata(llm.metadata, tokenizer=lambda text: llm.tokenizer.encode(text))
    synth_kw = {k: engine_kw.pop(k) for k in list(engine_kw)
                if k in ("text_qa_template", "refine_template", "summary_template", "simple_template",
                         "use_async", "verbose", "output_cls", "callback_manager")}

    def synthesizer_for(mode: str) -> Any:
        response_mode = config.response_mode if mode in ("rag", "rag+lag") else "generation"
        return get_response_synthesizer(llm=llm, response_mode=response_mode, streaming=streaming,
                                        prompt_helper=helper, **synth_kw)

    return LAGQueryEngine(retriever=parts.retriever or NoRetriever(),
                          response_synthesizer=synthesizer_for(config.mode), mode=config.mode, llm=llm,
                          doc_to_adapter=parts.doc_to_adapter, lag_routing=parts.lag_routing,
                          synthesizer_factory=synthesizer_for, **engine_kw)
