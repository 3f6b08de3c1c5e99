"""Chat in every pipeline mode: llama-index's ``CondensePlusContextChatEngine`` with LAG routing and PRAG.

Each turn condenses the conversation into a question, retrieves, and answers. ``rag`` / ``rag+lag`` put the
retrieved text in the prompt (routing off / LAG); ``prag`` / ``prag+lag`` apply the top retrieved document's
knowledge adapter to the answer instead of its text (+ LAG for ``prag+lag``); ``none`` / ``lag`` answer from
the conversation alone. A retrieval mode set with ``llm.routing_override(mode=...)`` applies to the turns
inside the block.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_index.core.chat_engine import CondensePlusContextChatEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, TextNode

from .errors import ConfigError
from .modes import RETRIEVAL_MODES
from .pipeline import (
    DocToAdapter,
    EngineParts,
    LAGPipelineConfig,
    NoRetriever,
    _split_kwargs,
    engine_parts,
    mode_routing,
    resolve_config,
)

#: CondensePlusContextChatEngine.from_defaults keyword arguments build_chat_engine passes on
CHAT_KWARGS = ("chat_history", "memory", "system_prompt", "context_prompt", "context_refine_prompt",
               "condense_prompt", "skip_condense", "node_postprocessors", "verbose")
_TURN_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lag_chat_turn_mode", default=None)


def _no_context() -> list[NodeWithScore]:
    """One empty context node: the synthesizer still answers (with no nodes it returns "Empty Response")."""
    return [NodeWithScore(node=TextNode(text=""), score=None)]


class _Synthesizer:
    """The chat engine's synthesizer, answering with this turn's context nodes (none for PRAG)."""

    def __init__(self, inner: Any, nodes: list[NodeWithScore]) -> None:
        self._inner, self._nodes = inner, nodes

    def synthesize(self, query: Any, nodes: Any = None, **kwargs: Any) -> Any:
        return self._inner.synthesize(query, self._nodes, **kwargs)

    async def asynthesize(self, query: Any, nodes: Any = None, **kwargs: Any) -> Any:
        return await self._inner.asynthesize(query, self._nodes, **kwargs)


class LAGChatEngine(CondensePlusContextChatEngine):
    """A ``CondensePlusContextChatEngine`` in a pipeline mode (module docstring); responses carry the
    turn's routing summary in ``metadata["lag"]`` and the assistant message's ``additional_kwargs``."""

    def __init__(self, *args: Any, mode: str, parts: EngineParts, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._parts = parts

    def mode_now(self) -> str:
        """This turn's pipeline mode: a retrieval mode set by ``llm.routing_override``, else the engine's."""
        turn = _TURN_MODE.get()
        if turn is not None:  # decided when the turn began
            return turn
        override = self._parts.llm.override_mode()
        if override in RETRIEVAL_MODES and override != self.mode:
            if isinstance(self._retriever, NoRetriever):
                raise ConfigError(f"mode {override!r} retrieves documents, but this chat engine was built in "
                                  f"mode {self.mode!r} without an index", field="mode")
            return override
        return self.mode

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """A routing block for one turn; PRAG's adapter is added once the turn has retrieved."""
        mode = self.mode_now()
        before = {"mode": "none"} if mode in ("prag", "prag+lag") else (
            mode_routing(mode, [], None, self._parts.lag_routing) if mode in ("rag", "rag+lag") else {})
        token = _TURN_MODE.set(mode)
        try:
            with self._parts.llm.routing_override(**before):
                yield
        finally:
            _TURN_MODE.reset(token)

    def _answer_with(self, synthesizer: Any, nodes: list[NodeWithScore]) -> _Synthesizer:
        mode = self.mode_now()
        if mode in ("prag", "prag+lag"):
            settings = self._parts.llm.current_override()
            settings.update(mode_routing(mode, nodes, self._parts.doc_to_adapter, self._parts.lag_routing))
        return _Synthesizer(synthesizer, nodes if mode in ("rag", "rag+lag") else _no_context())

    def _run_c3(self, message: str, chat_history: Any = None, streaming: bool = False) -> Any:
        synthesizer, source, nodes = super()._run_c3(message, chat_history, streaming=streaming)
        return self._answer_with(synthesizer, nodes), source, nodes

    async def _arun_c3(self, message: str, chat_history: Any = None, streaming: bool = False) -> Any:
        synthesizer, source, nodes = await super()._arun_c3(message, chat_history, streaming=streaming)
        return self._answer_with(synthesizer, nodes), source, nodes

    def _get_nodes(self, message: str) -> list[NodeWithScore]:
        return super()._get_nodes(message) if self.mode_now() in RETRIEVAL_MODES else []

    async def _aget_nodes(self, message: str) -> list[NodeWithScore]:
        return await super()._aget_nodes(message) if self.mode_now() in RETRIEVAL_MODES else []

    def chat(self, message: str, chat_history: Any = None) -> Any:
        with self._turn():
            return super().chat(message, chat_history)

    def stream_chat(self, message: str, chat_history: Any = None) -> Any:
        with self._turn():  # the answer streams in a thread started here, with this context
            return super().stream_chat(message, chat_history)

    async def achat(self, message: str, chat_history: Any = None) -> Any:
        with self._turn():
            return await super().achat(message, chat_history)

    async def astream_chat(self, message: str, chat_history: Any = None) -> Any:
        with self._turn():
            return await super().astream_chat(message, chat_history)


def build_chat_engine(
    config: LAGPipelineConfig | str | Path | None = None,
    *,
    llm: Any = None,
    index: Any = None,
    retriever: BaseRetriever | None = None,
    embed_model: Any = None,
    doc_to_adapter: DocToAdapter = None,
    **kwargs: Any,
) -> LAGChatEngine:
    """A chat engine for ``config.mode`` (every pipeline mode, PRAG included); arguments as
    :func:`~llama_index_lag.pipeline.build_query_engine`, plus ``CondensePlusContextChatEngine``'s own
    (:data:`CHAT_KWARGS`: ``system_prompt``, ``context_prompt``, ``condense_prompt``, ``memory``, ...)."""
    overrides, chat_kw = _split_kwargs(kwargs, CHAT_KWARGS, "build_chat_engine")
    config = resolve_config(config, overrides)
    parts = engine_parts(config, llm=llm, index=index, retriever=retriever, embed_model=embed_model,
                         doc_to_adapter=doc_to_adapter)
    from llama_index.core.memory import Memory

    history = chat_kw.pop("chat_history", None) or []
    memory = chat_kw.pop("memory", None) or Memory.from_defaults(
        chat_history=history, token_limit=parts.llm.metadata.context_window - 256)  # as from_defaults
    return LAGChatEngine(retriever=parts.retriever or NoRetriever(), llm=parts.llm, memory=memory,
                         mode=config.mode, parts=parts, **chat_kw)

__all__ = ["CHAT_KWARGS", "LAGChatEngine", "build_chat_engine"]
