"""Routing visible to llama-index: LAGRoutingEvent through the instrumentation dispatcher, the routing summary
in the metadata of plain query engines, chat engines and streams, and its schema."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler

from llama_index_lag import LAGLLM, LAGConfig
from llama_index_lag.indexing import load_index
from llama_index_lag.observe import LAGRoutingEvent
from llama_index_lag.pipeline import build_query_engine
from llama_index_lag.trace import ROUTING_SCHEMA_VERSION, RoutingSummary, merge_summaries

from .conftest import QUESTION


class _Events(BaseEventHandler):
    """Collects the LAGRoutingEvents dispatched while registered."""

    events: list = []

    @classmethod
    def class_name(cls) -> str:
        return "TestRoutingEvents"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LAGRoutingEvent):
            self.events.append(event)


@contextlib.contextmanager
def routing_events():
    handler = _Events(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        yield handler.events
    finally:
        root.event_handlers.remove(handler)


def _expected(events) -> dict:
    """The merged summary of the calls the dispatcher reported (independent of the span handler)."""
    return merge_summaries([e.summary.as_dict() for e in events])


@pytest.fixture(scope="module")
def llm(world) -> LAGLLM:
    return LAGLLM(world["model"], libraries=[world["know"], world["task"]],
                  lag_config=LAGConfig(mode="lag", k=3), max_new_tokens=5)


@pytest.fixture(scope="module")
def index(world):
    return load_index(world["index"], embed_model=world["embed"])


def test_each_routed_call_dispatches_an_event_inside_its_llm_span(llm):
    with routing_events() as events:
        response = llm.complete("Tell me about Drelmouth.")
        llm.complete("Hello", routing={"mode": "none"})  # not routed: no event
    assert len(events) == 1 and events[0].span_id.startswith("LAGLLM.complete-")
    assert events[0].summary == RoutingSummary.model_validate(response.additional_kwargs["lag"])
    assert response.additional_kwargs["lag"]["schema_version"] == ROUTING_SCHEMA_VERSION
    with routing_events() as events:
        streamed = list(llm.stream_complete("Tell me about Drelmouth."))
    assert len(events) == 1 and events[0].span_id.startswith("LAGLLM.stream_complete-")
    assert events[0].summary.as_dict() == streamed[-1].additional_kwargs["lag"]


def test_plain_query_engines_carry_the_summary(llm, index):
    engine = index.as_query_engine(llm=llm, similarity_top_k=1)
    with routing_events() as events:
        response = engine.query(QUESTION)
    assert events and response.metadata["lag"] == _expected(events)
    with routing_events() as events:
        response = asyncio.run(engine.aquery(QUESTION))
    assert events and response.metadata["lag"] == _expected(events)
    streaming = index.as_query_engine(llm=llm, similarity_top_k=1, streaming=True)
    with routing_events() as events:
        response = streaming.query(QUESTION)
        assert "lag" not in (response.metadata or {})  # the LLM has not run yet
        text = "".join(response.response_gen)
    assert text and events and response.metadata["lag"] == _expected(events)


def test_chat_engines_carry_the_summary_on_the_response_and_the_message(llm, index):
    chat = SimpleChatEngine.from_defaults(llm=llm)
    with routing_events() as events:
        response = chat.chat("Where is Drelmouth?")
    assert response.metadata["lag"] == _expected(events)
    assert chat.chat_history[-1].additional_kwargs["lag"] == events[-1].summary.as_dict()
    with routing_events() as events:
        stream = chat.stream_chat("And who lives there?")
        "".join(stream.response_gen)
    assert events and chat.chat_history[-1].additional_kwargs["lag"] == events[-1].summary.as_dict()
    condense = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=1), llm=llm)
    with routing_events() as events:
        response = condense.chat(QUESTION)
    assert events and response.metadata["lag"] == _expected(events)


@pytest.mark.parametrize("mode", ["rag+lag", "prag"])
def test_streaming_pipeline_modes_route_like_non_streaming(world, config, mode):
    engine = build_query_engine(config.model_copy(update={"mode": mode}), embed_model=world["embed"])
    stream_engine = build_query_engine(config.model_copy(update={"mode": mode}), embed_model=world["embed"],
                                       streaming=True)
    whole = engine.query(QUESTION)
    streamed = stream_engine.query(QUESTION)
    text = "".join(streamed.response_gen)
    assert text.strip() == str(whole).strip()  # prag: the document's adapter applied while streaming too
    lag = streamed.metadata["lag"]
    assert lag["libraries"] == whole.metadata["lag"]["libraries"]
    assert lag["mode"] == whole.metadata["lag"]["mode"]
    if mode == "prag":
        assert lag["fixed"] == {"knowledge": ["person-veltrano-oskimar"]}
