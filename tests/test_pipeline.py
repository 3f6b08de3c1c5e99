"""LAGLLM and the six pipeline modes on a tiny real model, real PEFT adapters, a real FAISS index and the
real offline MiniLM embedder."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.chat_engine import CondensePlusContextChatEngine, SimpleChatEngine
from llama_index.core.llms import ChatMessage

from llama_index_lag import LAGLLM, AdapterLibrary, LAGConfig
from llama_index_lag.cli import main as cli_main
from llama_index_lag.data import read_documents
from llama_index_lag.errors import ConfigError, LibraryError, VectorIndexError
from llama_index_lag.indexing import build_index
from llama_index_lag.llm import PromptTooLongError
from llama_index_lag.models import load_embed_model
from llama_index_lag.pipeline import LAGPipelineConfig, NoRetriever, build_query_engine
from llama_index_lag.testing import make_lora_adapters, make_tiny_model, make_tiny_model_dir

DEMO = Path(__file__).resolve().parents[1] / "llama_index_lag" / "data" / "demo" / "documents.jsonl"
QUESTION = "In which town was Veltrano Oskimar born?"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Model folder, knowledge library (one adapter per demo document), task library, FAISS index."""
    root = tmp_path_factory.mktemp("world")
    model_dir = make_tiny_model_dir(root / "model", max_position_embeddings=2048)
    model = make_tiny_model("llama", max_position_embeddings=2048)
    docs = read_documents(DEMO)
    raw = make_lora_adapters(model, root / "raw", len(docs), rank=4, seed=1)
    dirs = []
    for path, doc in zip(raw, docs):
        dirs.append(path.rename(root / "raw" / doc.id))
    AdapterLibrary.compile(dirs[:-1], kind="knowledge", base_model=model_dir, out=root / "know",
                           progress=False)  # the last document has no adapter
    task_dirs = make_lora_adapters(model, root / "traw", 2, rank=2, target_modules=("q_proj", "v_proj"),
                                   seed=2, prefix="style")
    AdapterLibrary.compile(task_dirs, kind="task", base_model=model_dir, out=root / "task", progress=False)
    embed = load_embed_model()
    build_index(docs, root / "index", embed_model=embed, show_progress=False)
    return {"root": root, "model": str(model_dir), "know": str(root / "know"), "task": str(root / "task"),
            "index": str(root / "index"), "embed": embed, "docs": docs}


@pytest.fixture(scope="session")
def config(world) -> LAGPipelineConfig:
    return LAGPipelineConfig(model=world["model"], index=world["index"], knowledge=world["know"],
                             task=[world["task"]], max_new_tokens=6, k=3)


def _engine(config, mode, world, **kw):
    return build_query_engine(config.model_copy(update={"mode": mode, **kw}), embed_model=world["embed"])


def _count_embeddings(embed) -> LlamaDebugHandler:
    handler = LlamaDebugHandler()
    embed.callback_manager = CallbackManager([handler])
    return handler


# ---- modes -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,retrieves,routes", [
    ("none", False, None), ("rag", True, None), ("lag", False, "lag"), ("rag+lag", True, "lag"),
    ("prag", True, "fixed"), ("prag+lag", True, "lag"),
])
def test_each_mode_retrieves_and_routes_as_specified(world, config, mode, retrieves, routes):
    handler = _count_embeddings(world["embed"])
    engine = _engine(config, mode, world)
    response = engine.query(QUESTION)
    assert str(response).strip()  # the LLM was called: no "Empty Response"
    assert str(response) != "Empty Response"
    embeds = handler.get_event_pairs(CBEventType.EMBEDDING)
    if retrieves:
        assert response.source_nodes[0].node.metadata["doc_id"] == "person-veltrano-oskimar"
        assert len(embeds) == 1
    else:
        assert response.source_nodes == [] and embeds == [] and isinstance(engine.retriever, NoRetriever)
    lag = response.metadata["lag"]
    if routes is None:
        assert lag is None
    else:
        assert lag["mode"] == routes and lag["routing_ms"] > 0
        if mode in ("prag", "prag+lag"):  # the retrieved document's own adapter, every token
            assert lag["libraries"]["knowledge"] == [{"adapter": "person-veltrano-oskimar", "share": 1.0}]
        else:
            assert sum(a["share"] for a in lag["libraries"]["knowledge"]) == pytest.approx(1.0, abs=0.01)
            assert len(lag["libraries"]["knowledge"]) > 1  # per-token routing spreads over adapters
        if mode != "prag":
            assert "task" in lag["libraries"]
        else:
            assert "task" not in lag["libraries"]  # prag applies only the knowledge adapter


def test_modes_share_one_model_and_none_is_the_bare_model(world, config):
    engines = {m: _engine(config, m, world) for m in ("none", "lag", "rag")}
    llms = [e.llm for e in engines.values()]
    assert len({id(llm.model) for llm in llms}) == 1 and len({id(llm.router) for llm in llms}) == 1
    model, tok = llms[0].model, llms[0].tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    router = llms[0].router
    with torch.no_grad():
        bare = model.generate(ids, max_new_tokens=6, do_sample=False)  # router default: off
        focus = llms[0].encode(prompt, 6, [QUESTION])["focus"]  # the request's own tokens (LAGLLM marks them)
        with router.focus(focus), router.using(LAGConfig.preset("two-level", k=3)):  # the pipeline's default
            routed = model.generate(ids, max_new_tokens=6, do_sample=False)
        with router.using(mode="lag", k=3):  # the paper's
            paper = model.generate(ids, max_new_tokens=6, do_sample=False)
    decode = lambda out: tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()  # noqa: E731
    assert str(engines["none"].query(QUESTION)).strip() == decode(bare)
    assert str(engines["lag"].query(QUESTION)).strip() == decode(routed)
    assert str(_engine(config, "lag", world, lag_method="paper").query(QUESTION)).strip() == decode(paper)
    assert decode(bare) != decode(routed) and decode(paper) != decode(routed)


def test_persisted_index_reloads_with_the_same_retrieval(world, config):
    from llama_index_lag.indexing import load_index

    fresh = load_index(world["index"], embed_model=load_embed_model())
    a = _engine(config, "rag", world).retrieve(QueryBundle(QUESTION))
    b = fresh.as_retriever(similarity_top_k=2).retrieve(QUESTION)
    assert [(n.node.node_id, round(n.score, 5)) for n in a] == [(n.node.node_id, round(n.score, 5))
                                                                for n in b]


def test_concurrent_requests_in_different_modes_do_not_mix(world, config):
    modes = ("none", "lag", "prag", "rag+lag")
    engines = {m: _engine(config, m, world) for m in modes}
    alone = {m: engines[m].query(QUESTION) for m in modes}
    got: dict[str, list] = {m: [] for m in modes}
    barrier = threading.Barrier(len(modes))

    def work(mode):
        barrier.wait()
        for _ in range(2):
            got[mode].append(engines[mode].query(QUESTION))

    threads = [threading.Thread(target=work, args=(m,)) for m in modes]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for mode in modes:
        for response in got[mode]:
            assert str(response) == str(alone[mode]), mode
            expected, actual = alone[mode].metadata["lag"], response.metadata["lag"]
            assert (expected is None) == (actual is None)
            if expected:
                assert actual["libraries"] == expected["libraries"]


# ---- LAGLLM ----------------------------------------------------------------------------------------
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


# ---- config and bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_config_round_trip_and_relative_paths(tmp_path, suffix):
    cfg = LAGPipelineConfig(mode="prag+lag", k=5, task=["/abs/t1"], knowledge="/abs/know", max_new_tokens=9)
    path = cfg.save(tmp_path / f"pipeline{suffix}")
    assert LAGPipelineConfig.load(path) == cfg
    (tmp_path / f"rel{suffix}").write_text({".json": '{"index": "idx", "mode": "rag"}',
                                            ".yaml": "index: idx\nmode: rag\n",
                                            ".toml": 'index = "idx"\nmode = "rag"\n'}[suffix])
    rel = LAGPipelineConfig.load(tmp_path / f"rel{suffix}", k=7)
    assert rel.index == str((tmp_path / "idx").resolve()) and rel.k == 7


def test_bad_configs(world, config):
    with pytest.raises(ConfigError, match="unknown mode 'best'"):
        LAGPipelineConfig(mode="best")
    with pytest.raises(ConfigError, match="k"):
        LAGPipelineConfig(k=0)
    with pytest.raises(ConfigError, match="needs|set index"):
        build_query_engine(LAGPipelineConfig(mode="rag", model=world["model"]))
    with pytest.raises(ConfigError, match="set knowledge"):
        build_query_engine(LAGPipelineConfig(mode="lag", model=world["model"]))
    with pytest.raises(ConfigError, match="granularity"):
        LAGPipelineConfig(routing={"granularity": "paragraph"})


def test_bad_index_folders(world, config, tmp_path):
    with pytest.raises(VectorIndexError):
        _engine(config, "rag", world, index=str(tmp_path / "missing"))
    broken = shutil.copytree(world["index"], tmp_path / "broken")
    (broken / "docstore.json").write_text("{garbage")
    with pytest.raises(VectorIndexError):
        _engine(config, "rag", world, index=str(broken))


def test_embedding_dimension_mismatch(world, config, tmp_path):
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from llama_index_lag.models import default_embed_model_dir

    hf = tmp_path / "hf"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
              ).save_pretrained(hf)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_embed_model_dir() / name, hf / name)
    st = tmp_path / "st"
    SentenceTransformer(modules=[models.Transformer(str(hf)), models.Pooling(32, "mean"), models.Normalize()]
                        ).save(str(st))
    with pytest.raises(VectorIndexError, match="384") as err:
        build_query_engine(config.model_copy(update={"mode": "rag", "embed_model": str(st)}))
    assert "32" in str(err.value)


def test_prag_document_without_adapter(world, config):
    engine = _engine(config, "prag", world)
    with pytest.raises(LibraryError, match="ship-tessaline.*no adapter"):
        engine.query("What was the Tessaline and what did it carry?")


def test_cli_ask_json_and_compare(world, tmp_path, capsys):
    cfg = LAGPipelineConfig(model=world["model"], index=world["index"], knowledge=world["know"],
                            max_new_tokens=4, k=3)
    path = cfg.save(tmp_path / "pipeline.toml")
    assert cli_main(["ask", QUESTION, "--config", str(path), "--compare", "none,rag,lag,rag+lag",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["mode"] for o in out] == ["none", "rag", "lag", "rag+lag"]
    assert out[0]["lag"] is None and out[0]["sources"] == []
    assert out[1]["sources"][0]["id"] == "person-veltrano-oskimar" and out[1]["lag"] is None
    assert set(out[1]["sources"][0]) == {"id", "score", "text"}
    lag = out[2]["lag"]
    assert set(lag) == {"mode", "k", "libraries", "routing_ms"} and lag["k"] == 3
    shares = [a["share"] for a in lag["libraries"]["knowledge"]]
    assert shares == sorted(shares, reverse=True)
    assert cli_main(["ask", QUESTION, "--config", str(path), "--mode", "prag", "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert "[prag]" in text and "person-veltrano-oskimar 100%" in text
    assert cli_main(["ask", QUESTION, "--config", str(path), "--mode", "nope"]) == 1


from llama_index.core.schema import QueryBundle  # noqa: E402


def test_chat_marks_the_user_message_as_focus(llm):
    from llama_index_lag.llm import _user_texts

    messages = [ChatMessage(role="system", content="You are terse."),
                ChatMessage(role="user", content="Where is Drelmouth?")]
    prompt = llm.chat_prompt(messages)
    enc = llm.encode(prompt, 8, _user_texts(messages))
    ids = enc["input_ids"][0][enc["focus"][0]]
    assert llm.tokenizer.decode(ids).strip() == "Where is Drelmouth?"
    assert enc["focus"][0].sum() < enc["input_ids"].shape[1]  # template and system tokens are not focus
