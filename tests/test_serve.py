"""lag serve: a real uvicorn server on loopback over the tiny world (tiny model, compiled libraries, FAISS
index), called with the real openai client (sync, async, streaming) and llama-index's OpenAILike. Answers are
checked against the in-process pipeline (LAGLLM / query and chat engines through model.generate, no batch)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from llama_index.core.llms import ChatMessage

from llama_index_lag import AdapterLibrary, LAGConfig
from llama_index_lag.chat import build_chat_engine
from llama_index_lag.errors import MissingDependencyError
from llama_index_lag.ingest import stable_document_id
from llama_index_lag.llm import shared_llm
from llama_index_lag.pipeline import build_query_engine
from llama_index_lag.serve import background_server, create_app
from llama_index_lag.serve.app import ServeSettings

from .conftest import QUESTION

N = 8  # max_tokens of the requests
USER = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(config, world):
    app = create_app(
        config, embed_model=world["embed"], settings=ServeSettings(max_batch=4, max_tokens_limit=512)
    )
    with background_server(app) as url:
        yield url, app.state.service


def _client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, **kw)


def _chat(url: str, lag: dict | None = None, messages=USER, **kw):
    kw.setdefault("max_tokens", N)
    return _client(url).chat.completions.create(
        model="m", messages=messages, extra_body={"lag": lag} if lag else None, **kw
    )


def _reference_llm(config, mode: str):
    """The in-process LLM of ``mode`` (direct modes), not batched."""
    if mode in ("arrow", "spectr"):
        return shared_llm(config.model_copy(update={"mode": "lag"})).with_routing(
            LAGConfig.preset("paper", k=config.k).replace(mode=mode)
        )
    return shared_llm(config.model_copy(update={"mode": mode}))


@pytest.mark.parametrize("mode", ["none", "lag", "spectr"])
def test_direct_modes_answer_as_the_in_process_llm(server, config, mode):
    url, _ = server
    got = _chat(url, {"mode": mode})
    ref = _reference_llm(config, mode).chat([ChatMessage(role="user", content=QUESTION)], max_new_tokens=N)
    assert got.choices[0].message.content == ref.message.content
    lag = got.model_extra["lag"]
    assert lag["mode"] == mode and lag["sources"] == []
    ref_lag = ref.message.additional_kwargs.get("lag")
    if mode == "none":
        assert lag["routing"] is None and ref_lag is None
    else:
        assert lag["routing"]["libraries"] == ref_lag["libraries"]
        assert lag["routing"]["mode"] == ref_lag["mode"]
    assert got.usage.prompt_tokens == ref.message.additional_kwargs["prompt_tokens"]
    assert got.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("mode", ["rag+lag", "prag"])
def test_retrieval_modes_answer_as_the_in_process_engines(server, config, world, mode):
    url, _ = server
    got = _chat(url, {"mode": mode})
    ref = build_chat_engine(config, mode=mode, max_new_tokens=N, embed_model=world["embed"]).chat(QUESTION)
    assert got.choices[0].message.content == str(ref.response).strip()
    assert [s["id"] for s in got.model_extra["lag"]["sources"]] == [
        stable_document_id(n.node) for n in ref.source_nodes
    ]
    done = _client(url).completions.create(
        model="m", prompt=QUESTION, max_tokens=N, extra_body={"lag": {"mode": mode}}
    )
    qref = build_query_engine(config, mode=mode, max_new_tokens=N, embed_model=world["embed"]).query(QUESTION)
    assert done.choices[0].text == str(qref).strip()
    routing = done.model_extra["lag"]["routing"]
    if mode == "prag":  # the top source's adapter, pinned
        top = done.model_extra["lag"]["sources"][0]["id"]
        assert routing["fixed"] == {"knowledge": [top]}
        assert routing["libraries"]["knowledge"][0]["adapter"] == top


def _batched_steps(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    count = float(re.search(r"^lag_batch_size_count (\S+)", text, re.M).group(1))
    ones = float(re.search(r'^lag_batch_size_bucket\{le="1.0"\} (\S+)', text, re.M).group(1))
    return count - ones


def test_concurrent_requests_are_batched_and_equal_their_solo_answers(server, world):
    url, _ = server
    know = AdapterLibrary.load(world["know"]).names
    requests = [
        {"mode": "none"},
        {"mode": "lag"},
        {"mode": "rag+lag"},
        {"mode": "spectr"},
        {"mode": "fixed", "fixed": {"knowledge": {know[0]: 1.0}}},
        {"mode": "lag", "k": 2},
        {"mode": "rag"},
        {"mode": "lag", "lag_method": "paper", "granularity": "sequence"},
    ]
    questions = [
        QUESTION,
        "What did the glassblower make?",
        QUESTION,
        "Where is Drelmouth?",
        "Who built the loom?",
        QUESTION,
        "When was he born?",
        "What is a ship?",
    ]
    solo = [
        _chat(url, lag, [{"role": "user", "content": q}]).choices[0].message.content
        for lag, q in zip(requests, questions)
    ]
    before = _batched_steps(url)

    async def one(client, lag, q):
        r = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": q}], max_tokens=N, extra_body={"lag": lag}
        )
        return r.choices[0].message.content

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, lag, q) for lag, q in zip(requests, questions)))

    together = asyncio.run(all_at_once())
    assert together == solo
    assert _batched_steps(url) > before  # some steps decoded several rows in one forward


def test_streaming_equals_the_whole_answer(server):
    url, _ = server
    for lag in ({"mode": "lag"}, {"mode": "rag+lag"}):
        whole = _chat(url, lag).choices[0].message.content
        chunks = list(_chat(url, lag, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == whole
        last = chunks[-1]
        assert last.choices[0].finish_reason in ("stop", "length")
        assert last.model_extra["lag"]["mode"] == lag["mode"] and last.usage.completion_tokens > 0
    text = (
        _client(url)
        .completions.create(
            model="m", prompt="The town of", max_tokens=N, extra_body={"lag": {"mode": "lag"}}
        )
        .choices[0]
        .text
    )
    parts = _client(url).completions.create(
        model="m", prompt="The town of", max_tokens=N, stream=True, extra_body={"lag": {"mode": "lag"}}
    )
    assert "".join(p.choices[0].text for p in parts) == text


def test_llama_index_openai_like_talks_to_the_server(server, config):
    from llama_index.llms.openai_like import OpenAILike

    url, service = server
    llm = OpenAILike(
        model=service.model_id,
        api_base=f"{url}/v1",
        api_key="none",
        is_chat_model=True,
        max_tokens=N,
        temperature=0.0,
        additional_kwargs={"extra_body": {"lag": {"mode": "lag"}}},
    )
    got = llm.chat([ChatMessage(role="user", content=QUESTION)]).message.content
    ref = _reference_llm(config, "lag").chat([ChatMessage(role="user", content=QUESTION)], max_new_tokens=N)
    assert got == ref.message.content


def test_stop_sequences(server, config):
    url, _ = server
    free = _chat(url, {"mode": "lag"}, max_tokens=N).choices[0].message.content
    stop = next((free[i : i + 2] for i in range(1, len(free) - 2) if free[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("the tiny model's answer has no usable stop sequence")
    got = _chat(url, {"mode": "lag"}, stop=[stop])
    ref = _reference_llm(config, "lag").chat(
        [ChatMessage(role="user", content=QUESTION)], max_new_tokens=N, stop=[stop]
    )
    assert got.choices[0].message.content == ref.message.content == free[: free.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def _post(url: str, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json", **kw.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, **kw)


def test_bad_requests_are_4xx_json_naming_the_problem(server):
    url, _ = server
    hi = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, None, "invalid_json"),
        ({"messages": hi, "lag": {"mode": "bogus"}}, 400, "lag.mode", None),
        (
            {"messages": hi, "lag": {"mode": "fixed", "fixed": {"knowledge": {"no-such-doc": 1.0}}}},
            400,
            "lag.fixed",
            None,
        ),
        ({"messages": hi, "lag": {"kk": 3}}, 400, "lag.kk", None),
        (
            {"messages": [{"role": "user", "content": "word " * 5000}], "lag": {"mode": "none"}},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({"messages": hi, "max_tokens": 100000}, 400, "max_tokens", None),
        ({"messages": hi, "n": 2}, 400, "n", None),
        ({"messages": hi, "presence_penalty": 1.0}, 400, "presence_penalty", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": hi, "temperature": "hot"}, 400, "temperature", None),
    ]
    for body, status, param, code in cases:
        r = _post(url, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert "Traceback" not in r.text and err["message"]
        if param:
            assert err["param"] == param, (body, err)
        if code:
            assert err["code"] == code, (body, err)
    assert "no-such-doc" in _post(url, cases[2][0]).json()["error"]["message"]
    big = _post(url, b'{"messages": [], "x": "' + b"a" * (2 << 20) + b'"}')
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.BadRequestError) as info:
        _chat(url, {"mode": "bogus"})
    assert info.value.status_code == 400


def test_models_health_and_metrics(server):
    url, service = server
    models = _client(url).models.list().data
    assert [m.id for m in models] == [service.model_id]
    kinds = {lib["kind"]: lib["adapters"] for lib in models[0].model_extra["lag"]["libraries"]}
    assert kinds == {"knowledge": 4, "task": 2}
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    _chat(url, {"mode": "lag"})
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "lag_requests_total",
        "lag_generated_tokens_total",
        "lag_batch_size_bucket",
        "lag_prefill_batch_size_bucket",
        "lag_queue_depth",
        "lag_request_latency_seconds_bucket",
        "lag_time_to_first_token_seconds_bucket",
        "lag_routing_seconds_total",
    ):
        assert name in text, name
    assert float(re.search(r"^lag_routing_seconds_total (\S+)", text, re.M).group(1)) > 0


def test_api_key_is_required_when_configured(config, world, tmp_path):
    app = create_app(config, embed_model=world["embed"], settings=ServeSettings(api_keys=("s3cret", "other")))
    with background_server(app) as url:
        answers = []
        for key in (None, "wrong", "s3cret-but-longer"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            r = _post(url, {"messages": USER, "max_tokens": 2, "lag": {"mode": "none"}}, headers=headers)
            answers.append((r.status_code, r.json()))
        assert all(a == answers[0] for a in answers) and answers[0][0] == 401  # one answer for every failure
        with pytest.raises(openai.AuthenticationError):
            _client(url).models.list()
        ok = openai.OpenAI(base_url=f"{url}/v1", api_key="other", max_retries=0)
        assert (
            ok.chat.completions.create(
                model="m", messages=USER, max_tokens=2, extra_body={"lag": {"mode": "none"}}
            )
            .choices[0]
            .message.content
        )
        assert httpx.get(f"{url}/health").status_code == 200


def test_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, service = server
    body = {"messages": USER, "max_tokens": 400, "stream": True, "lag": {"mode": "none"}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        data = []
        for line in r.iter_lines():
            if line.startswith("data:"):
                data.append(line)
            if len(data) >= 3:
                break
    assert len(data) == 3
    deadline = time.time() + 20
    while (service.engine.running or service.engine.queued) and time.time() < deadline:
        time.sleep(0.05)
    assert service.engine.running == 0 and service.engine.queued == 0
    text = httpx.get(f"{url}/metrics").text
    assert float(re.search(r'^lag_generations_total\{reason="cancelled"\} (\S+)', text, re.M).group(1)) >= 1


def test_missing_serve_extra_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    with pytest.raises(MissingDependencyError, match=r'pip install "llama-index-lag\[serve\]"'):
        create_app()


def test_lag_serve_command(config, tmp_path):
    path = config.save(tmp_path / "pipeline.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_index_lag",
            "serve",
            "--config",
            str(path),
            "--port",
            str(port),
            "--max-batch",
            "2",
            "-q",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                if proc.poll() is not None:
                    pytest.fail(proc.stderr.read().decode())
                time.sleep(0.5)
        got = _chat(url, {"mode": "lag"}).choices[0].message.content
        ref = _reference_llm(config, "lag").chat(
            [ChatMessage(role="user", content=QUESTION)], max_new_tokens=N
        )
        assert got == ref.message.content
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
