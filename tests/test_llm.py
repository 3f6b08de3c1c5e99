"""LAGLLM on a tiny real model with real PEFT adapters: streaming, per-call routing, async, context limits,
chat focus, and use inside llama-index's standard engines."""

from __future__ import annotations

import asyncio
import json

import pytest
from llama_index.core import Settings
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.llms import ChatMessage

from llama_index_lag import LAGLLM, LAGConfig
from llama_index_lag.errors import LibraryError
from llama_index_lag.llm import PromptTooLongError

from .conftest import QUESTION


@pytest.fixture(scope="session")
def llm(world) -> LAGLLM:
    return LAGLLM(world["model"], libraries=[world["know"], world["task"]],
                  lag_config=LAGConfig(mode="lag", k=3), max_new_tokens=8)


def test_streaming_equals_complete_and_carries_the_summary(llm):
    full = llm.complete("Tell me about Drelmouth.")
    chunks = list(llm.stream_complete("Tell me about Drelmouth."))
    assert "".join(c.delta or "" for c in chunks) == chunks[-1].text == full.text
    assert chunks[-1].additional_kwargs["lag"]["libraries"] == full.additional_kwargs["lag"]["libraries"]
    chat = llm.chat([ChatMessage(role="user", content="Tell me about Drelmouth.")])
    assert chat.message.content == full.text
    streamed = list(llm.stream_chat([ChatMessage(role="user", content="Tell me about Drelmouth.")]))
    assert streamed[-1].message.content == full.text


def test_per_call_routing_and_generation_kwargs(llm):
    base = llm.complete("Hello there")
    spectr = llm.complete("Hello there", routing={"mode": "spectr"})
    assert spectr.additional_kwargs["lag"]["mode"] == "spectr"
    off = llm.complete("Hello there", routing={"mode": "none"})
    assert off.additional_kwargs["lag"] is None
    assert llm.complete("Hello there").text == base.text  # per-call settings did not stick
    short = llm.complete("Hello there", max_new_tokens=2)
    assert short.additional_kwargs["lag"]["new_tokens"] <= 2
    first = base.text.strip()[:2]
    if first:
        stopped = llm.complete("Hello there", stop=[first])
        assert first not in stopped.text
    with pytest.raises(LibraryError, match="nope"):
        llm.complete("Hello", routing={"mode": "fixed", "fixed": {"knowledge": ["nope"]}})


def test_async_does_not_block_the_event_loop(llm):
    async def main():
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.005)

        task = asyncio.create_task(ticker())
        results = await asyncio.gather(llm.acomplete("one two", max_new_tokens=24),
                                       llm.acomplete("three four", max_new_tokens=24,
                                                     routing={"mode": "spectr"}))
        stop = True
        await task
        gen = await llm.astream_complete("one two", max_new_tokens=24)
        streamed = [c async for c in gen]
        return ticks, results, streamed

    ticks, results, streamed = asyncio.run(main())
    assert ticks >= 3
    assert results[0].text == llm.complete("one two", max_new_tokens=24).text
    assert results[1].additional_kwargs["lag"]["mode"] == "spectr"
    assert streamed[-1].text == results[0].text


def test_prompt_longer_than_context(world):
    llm = LAGLLM(world["model"], max_new_tokens=4, context_window=64, truncation="error")
    with pytest.raises(PromptTooLongError, match="context window 64"):
        llm.complete("word " * 200)
    left = llm.model_copy(update={"truncation": "left"})
    assert left.complete("word " * 200).additional_kwargs["prompt_tokens"] == 60


def test_works_in_standard_llama_index_engines(world, llm):
    assert LAGLLM.class_name() == "LAGLLM"
    json.dumps(llm.to_dict())  # serialisable: torch objects are private
    chat = SimpleChatEngine.from_defaults(llm=llm)
    assert chat.chat("Hi!").response is not None
    from llama_index_lag.indexing import load_index

    index = load_index(world["index"], embed_model=world["embed"])
    engine = CondensePlusContextChatEngine.from_defaults(index.as_retriever(similarity_top_k=1), llm=llm)
    assert engine.chat(QUESTION).response is not None
    answer = index.as_query_engine(llm=llm, similarity_top_k=1).query(QUESTION)
    assert str(answer) and answer.source_nodes[0].node.metadata["doc_id"] == "person-veltrano-oskimar"
    old = Settings._llm
    try:
        Settings.llm = llm  # picked up by engines built without llm=
        via_settings = index.as_query_engine(similarity_top_k=1).query(QUESTION)
        assert str(via_settings) == str(answer)
    finally:
        Settings._llm = old


def test_chat_marks_the_user_message_as_focus(llm):
    from llama_index_lag.llm import _user_texts

    messages = [ChatMessage(role="system", content="You are terse."),
                ChatMessage(role="user", content="Where is Drelmouth?")]
    prompt = llm.chat_prompt(messages)
    enc = llm.encode(prompt, 8, _user_texts(messages))
    ids = enc["input_ids"][0][enc["focus"][0]]
    assert llm.tokenizer.decode(ids).strip() == "Where is Drelmouth?"
    assert enc["focus"][0].sum() < enc["input_ids"].shape[1]  # template and system tokens are not focus
