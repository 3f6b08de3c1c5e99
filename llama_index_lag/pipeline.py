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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_index.core.base.response.schema import RESPONSE_TYPE, StreamingResponse
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle

from .errors import ConfigError, LibraryError
from .llm import shared_llm
from .pipeline_config import MODES, RETRIEVAL_MODES, LAGPipelineConfig, Mode
from .trace import collect_into, collect_routing, merge_summaries  # merge_summaries: re-exported (moved)

__all__ = ["MODES", "RETRIEVAL_MODES", "LAGPipelineConfig", "LAGQueryEngine", "Mode", "NoRetriever",
           "build_query_engine", "merge_summaries", "shared_embed_model", "shared_index", "shared_llm"]

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
    from .indexing import load_index

    key = (str(Path(index_dir).resolve()), id(embed_model))
    with _LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = load_index(index_dir, embed_model=embed_model)
        return _INDEXES[key]


# ---- query engine ------------------------------------------------------------------------------------
class NoRetriever(BaseRetriever):
    """Retrieves nothing, without embedding the query: for the modes that do not retrieve."""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return []


class LAGQueryEngine(RetrieverQueryEngine):
    """A ``RetrieverQueryEngine`` that knows its pipeline mode: PRAG's per-query adapter and the routing
    summary in ``response.metadata["lag"]``."""

    def __init__(self, *args: Any, mode: str, llm: Any = None, doc_to_adapter: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._llm = llm
        self._doc_to_adapter = doc_to_adapter or {}

    @property
    def llm(self) -> Any:
        """The LAGLLM view this engine generates with (shared model, this mode's routing)."""
        return self._llm

    def prag_adapter(self, nodes: list[NodeWithScore]) -> str:
        """The knowledge adapter PRAG applies for these retrieved nodes (the top document's)."""
        if not nodes:
            raise LibraryError("PRAG retrieved no document, so there is no knowledge adapter to apply")
        doc_id = nodes[0].node.metadata.get("doc_id") or nodes[0].node.ref_doc_id
        adapter = self._doc_to_adapter.get(doc_id)
        if adapter is None:
            raise LibraryError(f"retrieved document {doc_id!r} has no adapter in the knowledge library "
                               "(build it with `lag build-adapters`)", adapter=doc_id, field="knowledge")
        return adapter

    @contextlib.contextmanager
    def _routing(self, nodes: list[NodeWithScore]) -> Iterator[None]:
        if self.mode in ("prag", "prag+lag"):
            adapter = self.prag_adapter(nodes)
            mode = "fixed" if self.mode == "prag" else "lag"
            with self._llm.routing_override(mode=mode, fixed={"knowledge": [adapter]}):
                yield
        else:
            yield

    def _synth_nodes(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        return [] if self.mode in ("prag", "prag+lag") else nodes

    def _finish(self, response: RESPONSE_TYPE, nodes: list[NodeWithScore],
                sink: list[dict[str, Any]]) -> RESPONSE_TYPE:
        response.source_nodes = nodes
        response.metadata = dict(response.metadata or {})
        if isinstance(response, StreamingResponse) and response.response_gen is not None:
            inner = response.response_gen

            def gen() -> Iterator[str]:  # the synthesizer calls the LLM lazily, while this runs
                with collect_into(sink), self._routing(nodes):
                    yield from inner
                response.metadata["lag"] = merge_summaries(sink)

            response.response_gen = gen()
        else:
            response.metadata["lag"] = merge_summaries(sink)
        response.metadata["mode"] = self.mode
        return response

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes = self.retrieve(query_bundle)
        with collect_routing() as sink, self._routing(nodes):
            response = self._response_synthesizer.synthesize(query=query_bundle,
                                                             nodes=self._synth_nodes(nodes))
        return self._finish(response, nodes, sink)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes = await self.aretrieve(query_bundle)
        with collect_routing() as sink, self._routing(nodes):
            response = await self._response_synthesizer.asynthesize(query=query_bundle,
                                                                    nodes=self._synth_nodes(nodes))
        return self._finish(response, nodes, sink)


def build_query_engine(
    config: LAGPipelineConfig | str | Path,
    *,
    llm: Any = None,
    index: Any = None,
    embed_model: Any = None,
    streaming: bool = False,
    **overrides: Any,
) -> LAGQueryEngine:
    """A LlamaIndex query engine for ``config.mode`` (a config object or file; ``overrides`` replace fields).

    ``llm`` (a LAGLLM), ``index`` (a VectorStoreIndex) and ``embed_model`` are reused when given; otherwise
    they are loaded once per process and shared by every engine built here.
    """
    if not isinstance(config, LAGPipelineConfig):
        config = LAGPipelineConfig.load(config, **overrides)
    elif overrides:
        config = config.model_copy(update=overrides)
        config = LAGPipelineConfig(**config.model_dump())
    config.check()
    if llm is None:
        llm = shared_llm(config)
    else:
        llm = llm.with_routing(config.lag_config()).model_copy(
            update={"max_new_tokens": config.max_new_tokens})
    doc_to_adapter = None
    if config.mode in ("prag", "prag+lag"):
        know = [lib for lib in (llm.router.libraries.get("knowledge", []) if llm.router else [])]
        if not know:
            raise ConfigError(f"mode {config.mode!r} needs a knowledge library attached to the LLM",
                              field="knowledge")
        doc_to_adapter = {d: a for lib in know for d, a in lib.doc_ids().items()}
    if config.mode in RETRIEVAL_MODES:
        if index is None:
            embed = embed_model if embed_model is not None else shared_embed_model(config.embed_model)
            index = shared_index(config.index, embed)
        retriever = index.as_retriever(similarity_top_k=config.similarity_top_k)
    else:
        retriever = NoRetriever()
    response_mode = config.response_mode if config.mode in ("rag", "rag+lag") else "generation"
    # count prompt tokens with the model's own tokenizer when packing retrieved text into the window
    helper = PromptHelper.from_llm_metadata(llm.metadata, tokenizer=lambda text: llm.tokenizer.encode(text))
    synthesizer = get_response_synthesizer(llm=llm, response_mode=response_mode, streaming=streaming,
                                           prompt_helper=helper)
    return LAGQueryEngine(retriever=retriever, response_synthesizer=synthesizer, mode=config.mode, llm=llm,
                          doc_to_adapter=doc_to_adapter)
