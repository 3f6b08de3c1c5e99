"""Routing made visible to llama-index: an instrumentation event per routed LLM call, and the routing summary
in the metadata of every query-engine and chat-engine response (not only the engines of this package).

* :class:`LAGRoutingEvent` (a llama-index ``BaseEvent``) is dispatched by ``LAGLLM`` after each routed
  generation, inside the LLM call's span, carrying its :class:`~llama_index_lag.trace.RoutingSummary`: any
  event handler on llama-index's root dispatcher receives it.
* :class:`RoutingSpanHandler` (installed once per process by :func:`instrument`, which ``LAGLLM`` calls)
  collects the summaries of the LLM calls made inside each query / chat engine call and puts their merge into
  the response's ``metadata["lag"]`` (for a streaming response when its stream ends).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from typing import Any

from llama_index.core.base.response.schema import PydanticResponse, Response, StreamingResponse
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import SimpleSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.query_engine import BaseQueryEngine

from .trace import RoutingSummary, collect_into, collect_routing, merge_summaries

dispatcher = get_dispatcher(__name__)
_INSTALL_LOCK = threading.Lock()


class LAGRoutingEvent(BaseEvent):
    """One routed LAGLLM generation: its routing summary (``span_id``: the LLM call's span)."""

    summary: RoutingSummary

    @classmethod
    def class_name(cls) -> str:
        return "LAGRoutingEvent"


def emit_routing(summary: dict[str, Any]) -> None:
    """Dispatch a :class:`LAGRoutingEvent` for one call's summary (in the caller's span)."""
    dispatcher.event(LAGRoutingEvent(summary=RoutingSummary.model_validate(summary)))


class RoutingSpanHandler(BaseSpanHandler[SimpleSpan]):
    """Puts the merged routing summary of the LAGLLM calls made inside a query-engine or chat-engine call
    into its response's ``metadata["lag"]``. Keeps no spans (nothing grows)."""

    _open: dict[str, tuple[Any, list[dict[str, Any]]]] = PrivateAttr(default_factory=dict)
    _guard: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def class_name(cls) -> str:
        return "RoutingSpanHandler"

    def new_span(self, id_: str, bound_args: inspect.BoundArguments, instance: Any | None = None,
                 parent_span_id: str | None = None, tags: dict[str, Any] | None = None,
                 **kwargs: Any) -> SimpleSpan | None:
        if isinstance(instance, (BaseQueryEngine, BaseChatEngine)):
            collector = collect_routing()
            sink = collector.__enter__()  # in the span's own context: its LLM calls report here
            with self._guard:
                self._open[id_] = (collector, sink)
        return None

    def prepare_to_exit_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, result: Any | None = None,
                             **kwargs: Any) -> SimpleSpan | None:
        sink = self._close(id_)
        if sink is not None:
            attach_summary(result, sink)
        return None

    def prepare_to_drop_span(self, id_: str, bound_args: inspect.BoundArguments,
                             instance: Any | None = None, err: BaseException | None = None,
                             **kwargs: Any) -> SimpleSpan | None:
        self._close(id_)
        return None

    def _close(self, id_: str) -> list[dict[str, Any]] | None:
        with self._guard:
            entry = self._open.pop(id_, None)
        if entry is None:
            return None
        collector, sink = entry
        try:
            collector.__exit__(None, None, None)
        except ValueError:  # a span closed from another context (llama-index's future callbacks)
            pass
        return sink


def attach_summary(result: Any, sink: list[dict[str, Any]]) -> None:
    """Set ``result.metadata["lag"]`` from ``sink``. A streaming response: when its stream ends, with the
    LLM calls made while it streams (llama-index's synthesizers call the LLM lazily) collected too."""
    if isinstance(result, StreamingResponse) and result.response_gen is not None:
        inner = result.response_gen

        def gen() -> Iterator[str]:
            with collect_into(sink):
                yield from inner
            _set(result, sink)

        result.response_gen = gen()
    elif isinstance(result, (Response, PydanticResponse, AgentChatResponse)):
        _set(result, sink)


def _set(result: Any, sink: list[dict[str, Any]]) -> None:
    merged = merge_summaries(list(sink))
    if merged is not None:
        result.metadata = {**(result.metadata or {}), "lag": merged}


def instrument() -> RoutingSpanHandler:
    """Install :class:`RoutingSpanHandler` on llama-index's root dispatcher (once per process)."""
    root = get_dispatcher()
    with _INSTALL_LOCK:
        for handler in root.span_handlers:
            if isinstance(handler, RoutingSpanHandler):
                return handler
        handler = RoutingSpanHandler()
        root.add_span_handler(handler)
        return handler


__all__ = ["LAGRoutingEvent", "RoutingSpanHandler", "attach_summary", "emit_routing", "instrument"]
