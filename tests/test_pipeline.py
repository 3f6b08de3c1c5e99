"""The six pipeline modes on a tiny real model, real PEFT adapters, a real FAISS index and the real offline
MiniLM embedder (LAGLLM itself: tests/test_llm.py; configuration files: tests/test_config.py)."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.schema import QueryBundle

from llama_index_lag import LAGConfig
from llama_index_lag.cli import main as cli_main
from llama_index_lag.errors import LibraryError, VectorIndexError
from llama_index_lag.models import load_embed_model
from llama_index_lag.pipeline import LAGPipelineConfig, NoRetriever, build_query_engine
from llama_index_lag.trace import RoutingSummary

from .conftest import QUESTION


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


# ---- bad input ---------------------------------------------------------------------------------
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
    assert RoutingSummary.model_validate(lag).as_dict() == lag and lag["k"] == 3
    assert lag["schema_version"] == 1 and lag["calls"] == 1 and lag["mode"] == "lag"
    shares = [a["share"] for a in lag["libraries"]["knowledge"]]
    assert shares == sorted(shares, reverse=True)
    assert cli_main(["ask", QUESTION, "--config", str(path), "--mode", "prag", "--k", "2"]) == 0
    text = capsys.readouterr().out
    assert "[prag]" in text and "person-veltrano-oskimar 100%" in text
    assert cli_main(["ask", QUESTION, "--config", str(path), "--mode", "nope"]) == 1
