"""Routing visible to llama-index: LAGRoutingEvent through the instrumentation dispatcher, the routing summary
in the metadata of plain query engines, chat engines and streams, and its schema."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionStartEvent

from llama_index_lag import LAGLLM, LAGConfig
from llama_index_lag.indexing import load_index
from llama_index_lag.ingest import stable_document_id
from llama_index_lag.observe import LAGRoutingEvent
from llama_index_lag.pipeline import build_query_engine
from llama_index_lag.trace import ROUTING_SCHEMA_VERSION, RoutingSummary, merge_summaries

from .conftest import QUESTION


class _Events(BaseEventHandler):
    """Collects the LAGRoutingEvents (or the completion prompts) dispatched while registered."""

    events: list = []
    prompts: bool = False

    @classmethod
    def class_name(cls) -> str:
        return "TestRoutingEvents"

    def handle(self, event, **kwargs) -> None:
        if self.prompts and isinstance(event, LLMCompletionStartEvent):
            self.events.append(event.prompt)
        elif not self.prompts and isinstance(event, LAGRoutingEvent):
            self.events.append(event)


@contextlib.contextmanager
def routing_events(prompts: bool = False):
    handler = _Events(events=[], prompts=prompts)
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


# ---- per-query pipeline modes and chat in every mode -----------------------------------------------------
def test_routing_override_switches_the_pipeline_mode_per_query(world, config):
    from llama_index_lag.pipeline import build_query_engine

    engine = build_query_engine(config.model_copy(update={"mode": "rag"}), embed_model=world["embed"])
    alone = {m: build_query_engine(config.model_copy(update={"mode": m}), embed_model=world["embed"])
             for m in ("rag+lag", "prag", "prag+lag")}
    llm = engine.llm
    for mode, reference in alone.items():
        with llm.routing_override(mode=mode):
            switched = engine.query(QUESTION)
        expected = reference.query(QUESTION)
        assert switched.metadata["mode"] == mode and str(switched) == str(expected), mode
        assert switched.metadata["lag"]["libraries"] == expected.metadata["lag"]["libraries"]
    plain = engine.query(QUESTION)  # the block ended: the engine's own mode again
    assert plain.metadata["mode"] == "rag" and plain.metadata["lag"] is None
    lag_only = build_query_engine(config.model_copy(update={"mode": "lag"}), embed_model=world["embed"])
    with lag_only.llm.routing_override(mode="rag"), pytest.raises(Exception, match="without an index"):
        lag_only.query(QUESTION)


@pytest.mark.parametrize("mode", ["none", "rag", "rag+lag", "prag", "prag+lag"])
def test_chat_engine_in_every_pipeline_mode(world, config, mode):
    from llama_index_lag.chat import build_chat_engine

    chat = build_chat_engine(config.model_copy(update={"mode": mode}), embed_model=world["embed"],
                             similarity_top_k=1, skip_condense=True)
    with routing_events() as events, routing_events(prompts=True) as prompts:
        first = chat.chat(QUESTION)
        streamed = chat.stream_chat("And what else?")
        text = "".join(streamed.response_gen)
    assert first.response and text is not None
    assert ("glassblower" in prompts[0]) == (mode in ("rag", "rag+lag"))  # the document's text: rag only
    routed = [e.summary for e in events]
    if mode in ("prag", "prag+lag"):  # each turn: its own retrieved document's adapter
        second = stable_document_id(streamed.source_nodes[0].node)
        assert [s.fixed for s in routed] == [{"knowledge": ["person-veltrano-oskimar"]},
                                             {"knowledge": [second]}]
        assert first.source_nodes and first.metadata["lag"]["fixed"] == routed[0].fixed
    elif mode in ("rag+lag",):
        assert len(routed) == 2 and all(s.fixed is None for s in routed)
    else:
        assert routed == [] and first.metadata is None or "lag" not in (first.metadata or {})
    assert chat.chat_history[-1].content == text.strip() or chat.chat_history[-1].content == text


def test_routing_override_switches_a_chat_turn_to_prag(world, config):
    from llama_index_lag.chat import build_chat_engine

    chat = build_chat_engine(config.model_copy(update={"mode": "rag"}), embed_model=world["embed"],
                             similarity_top_k=1, skip_condense=True)
    with routing_events() as events, routing_events(prompts=True) as prompts:
        with chat._parts.llm.routing_override(mode="prag"):
            pinned = chat.chat(QUESTION)
        plain = chat.chat(QUESTION)  # after the block: the engine's own rag again
    assert [e.summary.fixed for e in events] == [{"knowledge": ["person-veltrano-oskimar"]}]
    assert pinned.metadata["lag"]["fixed"] == {"knowledge": ["person-veltrano-oskimar"]}
    assert "glassblower" not in prompts[0] and "glassblower" in prompts[1]
    assert plain.source_nodes and (plain.metadata or {}).get("lag") is None
