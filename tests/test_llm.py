"""LAGLLM on a tiny real model with real PEFT adapters: streaming, per-call routing, async, context limits,
chat focus, and use inside llama-index's standard engines."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from llama_index.core import Settings
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.llms import ChatMessage

from llama_index_lag import LAGLLM, LAGConfig
from llama_index_lag.errors import ConfigError, LibraryError, ModelError
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


# ---- HuggingFaceLLM's constructor ------------------------------------------------------------------
PROMPT = "Tell me about Drelmouth."


def test_model_name_loads_that_folder_and_unknown_keywords_fail(world, tmp_path):
    llm = LAGLLM(model_name=world["model"], max_new_tokens=4)
    assert llm.model_name == str(Path(world["model"]).resolve())
    assert sum(p.numel() for p in llm.model.parameters()) < 1e6  # the tiny model, not the default SmolLM2
    labelled = LAGLLM(world["model"], model_name="my-label", max_new_tokens=4)  # with a model: a label
    assert labelled.model_name == "my-label"
    with pytest.raises(ModelError, match="model folder not found"):
        LAGLLM(model_name=str(tmp_path / "out" / "tiny"))
    with pytest.raises(ConfigError, match="'device' .*device_map"):
        LAGLLM(world["model"], device="cuda")
    with pytest.raises(ConfigError, match="'max_new_token' .*did you mean 'max_new_tokens'"):
        LAGLLM(world["model"], max_new_token=5)
    with pytest.raises(ConfigError, match="similarity_topk"):
        LAGLLM(world["model"], similarity_topk=5)
    with pytest.raises(ConfigError, match="'top_kk'.*did you mean 'top_k'"):
        LAGLLM(world["model"], generate_kwargs={"top_kk": 3})


def test_tokenizer_name_and_tokenizer_kwargs(world, tmp_path):
    tok_dir = tmp_path / "tok"
    shutil.copytree(world["model"], tok_dir)
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m.role }}\nCUSTOM {{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    llm = LAGLLM(world["model"], tokenizer_name=str(tok_dir), tokenizer_kwargs={"model_max_length": 77})
    assert "CUSTOM hello" in llm.completion_prompt("hello") and llm.tokenizer.model_max_length == 77
    plain = LAGLLM(world["model"])
    assert "CUSTOM" not in plain.completion_prompt("hello")
    loaded = LAGLLM(model=plain.model, tokenizer_name=str(tok_dir))  # a loaded model, its tokenizer by name
    assert "CUSTOM hello" in loaded.completion_prompt("hello")


def test_prompt_parameters_take_effect(world):
    from llama_index.core.prompts import PromptTemplate

    base = LAGLLM(world["model"], max_new_tokens=4)
    assert base.metadata.is_chat_model and base.completion_prompt("hi").startswith("<|im_start|>user")
    system = LAGLLM(world["model"], system_prompt="You are terse.")
    assert "<|im_start|>system\nYou are terse.<|im_end|>" in system.completion_prompt("hi")
    for wrapper in ("[Q] {query_str} [/Q]", PromptTemplate("[Q] {query_str} [/Q]")):
        wrapped = LAGLLM(world["model"], query_wrapper_prompt=wrapper)
        assert "user\n[Q] hi [/Q]<|im_end|>" in wrapped.completion_prompt("hi")
    plain = LAGLLM(world["model"], is_chat_model=False, system_prompt="S:")
    assert not plain.metadata.is_chat_model and plain.completion_prompt("hi") == "S: hi"
    custom = LAGLLM(world["model"], completion_to_prompt=lambda p: f"<<{p}>>",
                    messages_to_prompt=lambda ms: " | ".join(m.content for m in ms) + " ->")
    assert custom.completion_prompt("hi") == "<<hi>>"
    messages = [ChatMessage(role="system", content="a"), ChatMessage(role="user", content="b")]
    assert custom.chat_prompt(messages) == "a | b ->"
    chat = custom.chat(messages, max_new_tokens=1)
    assert chat.message.additional_kwargs["prompt_tokens"] == len(custom.tokenizer("a | b ->")["input_ids"])
    response = custom.complete("hi", max_new_tokens=1)
    assert response.additional_kwargs["prompt_tokens"] == len(custom.tokenizer("<<hi>>")["input_ids"])


def _reference(llm: LAGLLM, prompt: str, n: int, **generate: object) -> str:
    enc = llm.encode(llm.completion_prompt(prompt), n)
    with torch.no_grad():
        out = llm.model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=n,
                                 do_sample=False, pad_token_id=llm.tokenizer.pad_token_id, **generate)
    return llm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generate_kwargs_and_stopping_ids_take_effect(world):
    llm = LAGLLM(world["model"], max_new_tokens=10)
    greedy = llm.complete(PROMPT).text
    penalised = _reference(llm, PROMPT, 10, repetition_penalty=5.0)
    assert greedy == _reference(llm, PROMPT, 10) and penalised != greedy  # the setting matters here
    by_default = LAGLLM(world["model"], max_new_tokens=10, generate_kwargs={"repetition_penalty": 5.0})
    assert by_default.complete(PROMPT).text == penalised
    assert llm.complete(PROMPT, repetition_penalty=5.0).text == penalised  # per call
    assert llm.complete(PROMPT).text == greedy  # did not stick
    with pytest.raises(ConfigError, match="'top_kk'.*did you mean 'top_k'"):
        llm.complete(PROMPT, top_kk=3)
    enc = llm.encode(llm.completion_prompt(PROMPT), 10)
    with torch.no_grad():
        first = llm.model.generate(**enc, max_new_tokens=10, do_sample=False,
                                   pad_token_id=llm.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:]
    third = int(first[2])  # generation stops right after the first occurrence of a stopping id
    stop_at = int((first == third).nonzero()[0]) + 1
    stopped = LAGLLM(world["model"], max_new_tokens=10, stopping_ids=[third]).complete(PROMPT)
    assert stopped.text == llm.tokenizer.decode(first[:stop_at], skip_special_tokens=True)
    assert stop_at < 10 and stopped.text != greedy


def test_device_map_and_model_kwargs_take_effect(world):
    import json as _json

    on_cpu = LAGLLM(world["model"], device_map="cpu")
    assert next(on_cpu.model.parameters()).device.type == "cpu"
    auto = LAGLLM(world["model"], device_map="auto")  # accelerate places it (on this machine: the CPU)
    assert auto.complete(PROMPT, max_new_tokens=3).text == on_cpu.complete(PROMPT, max_new_tokens=3).text
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            LAGLLM(world["model"], device_map="cuda")
    kw = LAGLLM(world["model"], model_kwargs={"dtype": torch.bfloat16, "attn_implementation": "eager"})
    assert next(kw.model.parameters()).dtype == torch.bfloat16
    assert kw.model.config._attn_implementation == "eager"
    _json.dumps(kw.to_dict())  # still serialisable
