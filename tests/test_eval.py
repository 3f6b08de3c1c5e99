"""``lag eval``: the evaluation harness and its report, on a tiny model, random adapters named by document id,
the demo documents and a real FAISS index."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMCompletionStartEvent
from scipy.stats import skew as scipy_skew

from llama_index_lag import LAGLLM, AdapterLibrary, LAGConfig
from llama_index_lag.cli import main as cli_main
from llama_index_lag.data import read_documents
from llama_index_lag.errors import ConfigError, DataError, IncompatibleLibraryError
from llama_index_lag.eval.harness import (
    EvalConfig,
    EvalHarness,
    load_results,
    parse_mode,
    parse_sweep,
    parse_task_map,
    routing_accuracy,
    run_eval,
)
from llama_index_lag.eval.report import render_markdown, summarize, write_report
from llama_index_lag.indexing import build_index, load_index
from llama_index_lag.models import load_embed_model
from llama_index_lag.pipeline import LAGPipelineConfig, build_query_engine
from llama_index_lag.testing import make_lora_adapters, make_tiny_model, make_tiny_model_dir

DEMO = Path(__file__).resolve().parents[1] / "llama_index_lag" / "data" / "demo"
TASK_MAP = "qa=style0,fact=style1"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny model folder, knowledge library (an adapter per demo document but the last), task library
    (style0, style1), FAISS index; one LAGLLM, embedder and index shared by the in-process runs."""
    root = tmp_path_factory.mktemp("evalworld")
    model_dir = make_tiny_model_dir(root / "model", max_position_embeddings=2048)
    model = make_tiny_model("llama", max_position_embeddings=2048)
    docs = read_documents(DEMO / "documents.jsonl")
    raw = make_lora_adapters(model, root / "raw", len(docs), rank=4, seed=1)
    dirs = [path.rename(root / "raw" / doc.id) for path, doc in zip(raw, docs)]
    AdapterLibrary.compile(dirs[:-1], kind="knowledge", base_model=model_dir, out=root / "know",
                           progress=False)
    task_dirs = make_lora_adapters(model, root / "traw", 2, rank=2, target_modules=("q_proj", "v_proj"),
                                   seed=2, prefix="style")
    AdapterLibrary.compile(task_dirs, kind="task", base_model=model_dir, out=root / "task", progress=False)
    embed = load_embed_model()
    build_index(docs, root / "index", embed_model=embed, show_progress=False)
    llm = LAGLLM(str(model_dir), libraries=[root / "know", root / "task"], lag_config=LAGConfig(mode="none"))
    return {"root": root, "model": str(model_dir), "know": str(root / "know"), "task": str(root / "task"),
            "index": str(root / "index"), "embed": embed, "llm": llm,
            "loaded_index": load_index(root / "index", embed_model=embed)}


def _config(world, out, **kw) -> EvalConfig:
    base = dict(docs=DEMO / "documents.jsonl", questions=DEMO / "questions.jsonl", knowledge=world["know"],
                task=[world["task"]], model=world["model"], index=world["index"], out=out, k=3,
                max_new_tokens=6, batch_size=4, task_map=TASK_MAP)
    base.update(kw)
    return EvalConfig(**base)


def _run(world, out, on_batch=None, **kw) -> dict:
    return run_eval(_config(world, out, **kw), llm=world["llm"], index=world["loaded_index"],
                    embed_model=world["embed"], progress=False, on_batch=on_batch)


def _comparable(results: dict, drop=()) -> dict:
    """Everything but timings, machine and dates (and ``drop`` answer fields)."""
    answers = []
    for a in results["answers"]:
        a = {k: v for k, v in a.items() if k not in ("seconds", "batch", "retrieval_s", *drop)}
        if a.get("routing"):
            a["routing"] = {k: v for k, v in a["routing"].items() if k != "routing_ms"}
        answers.append(a)
    return {"answers": answers, "fingerprint": results["fingerprint"], "questions": results["questions"],
            "modes": results["modes"], "skipped": results["skipped"]}


# ---- modes and flags -----------------------------------------------------------------------------------
def test_mode_names_and_variants():
    assert parse_mode("lag", 7).routing == {"mode": "lag", "k": 7}
    assert parse_mode("oracle").knowledge == "gold" and parse_mode("prag").knowledge == "retrieved"
    assert parse_mode("rag+lag").prompt == "rag" and parse_mode("prag+lag").prompt == "question"
    seq = parse_mode("lag-seq-mass", 5)
    assert seq.routing == {"mode": "lag", "k": 5, "granularity": "sequence", "sequence_score": "mass"}
    assert parse_mode("spectr-seq-vote").routing["sequence_score"] == "vote"
    assert parse_mode("lag-dyn0.9").routing["dynamic_k"] == 0.9
    assert parse_mode("lag-k5-dyn0.5").routing == {"mode": "lag", "k": 5, "dynamic_k": 0.5}
    assert parse_mode("rag+lag-seq-mass").routing["granularity"] == "sequence"
    for bad, match in [("best", "unknown mode 'best'"), ("arrow-k3", "lag-based"),
                       ("spectr-dyn0.5", "lag-based"), ("lag-dyn1.5", "dynamic_k"),
                       ("lag-seq-sum", "bad suffix"), ("lag-k2-k3", "repeats"), ("none-k2", "unknown mode")]:
        with pytest.raises(ConfigError, match=match):
            parse_mode(bad)
    assert parse_sweep("1,2,5,N") == [1, 2, 5, "N"]
    with pytest.raises(ConfigError, match="sweep"):
        parse_sweep("1,x")
    assert parse_task_map("qa=short_answer, fact=fact_check") == {"qa": "short_answer", "fact": "fact_check"}
    with pytest.raises(ConfigError, match="task=adapter"):
        parse_task_map("qa")
    with pytest.raises(ConfigError, match="unknown mode 'bogus'"):
        EvalConfig(docs="d", questions="q", knowledge="k", out="o", modes="none,bogus")
    with pytest.raises(ConfigError, match="missing"):
        EvalConfig(docs="d", questions="q", knowledge="k", out="o", missing="ignore")


# ---- metrics, normalised score, report (pure functions of results.json) ---------------------------------
def _synthetic_results() -> dict:
    questions = [
        {"id": "q1", "question": "?", "answers": ["Drelmouth", "the town of Drelmouth"], "task": "qa",
         "dataset": "qa", "doc_id": "d1", "gold_adapter": "d1"},
        {"id": "q2", "question": "?", "answers": ["Pimsy"], "task": "qa", "dataset": "qa", "doc_id": "d1",
         "gold_adapter": "d1"},
        {"id": "f1", "question": "?", "answers": ["true"], "task": "fact", "dataset": "fa", "doc_id": "d1",
         "gold_adapter": "d1"},
        {"id": "f2", "question": "?", "answers": ["false"], "task": "fact", "dataset": "fa", "doc_id": "d2",
         "gold_adapter": "d2"},
        {"id": "f3", "question": "?", "answers": ["false"], "task": "fact", "dataset": "fb", "doc_id": "d2",
         "gold_adapter": "d2"},
    ]
    def rec(mode, qid, answer, **kw):
        return {"mode": mode, "qid": qid, "answer": answer, "new_tokens": 4, "seconds": 0.5, **kw}
    acc = lambda share, top, rank: {"gold_share": share, "gold_top": top, "gold_rank": rank}  # noqa: E731
    answers = [
        # oracle: qa EM 1/2, F1 (1 + 2/3)/2, contains 1; fact: fa 2/2, fb 1/1
        rec("oracle", "q1", "The town of Drelmouth."), rec("oracle", "q2", "Pimsy the parrot"),
        rec("oracle", "f1", "True."), rec("oracle", "f2", "That is false"), rec("oracle", "f3", "no"),
        # lag: qa EM 0, F1 (2/3 + 0)/2, contains 1/2; fact: fa 1/2, fb 0/1
        rec("lag", "q1", "born in Drelmouth",
            routing_accuracy={**acc(0.5, True, 1), "wins": {"0": 4, "3": 1}}, mean_candidates=3.0),
        rec("lag", "q2", "a dog", routing_accuracy={**acc(0.1, False, 3), "wins": {"0": 2, "1": 1}},
            mean_candidates=3.0),
        rec("lag", "f1", "yes, true", routing_accuracy=acc(0.3, True, 1), mean_candidates=3.0),
        rec("lag", "f2", "It is true", routing_accuracy=acc(0.2, False, 2), mean_candidates=3.0),
        rec("lag", "f3", "maybe", routing_accuracy=acc(0.4, True, 1), mean_candidates=3.0, error="boom"),
    ]
    return {
        "settings": {"qa_metric": "f1", "questions": "q.jsonl"}, "knowledge_adapters": 4,
        "knowledge_names": ["d0", "d1", "d2", "d3"],
        "modes": [{"name": "lag", "base": "lag", "prompt": "question", "knowledge": "routed",
                   "routing": {"mode": "lag", "k": 3}},
                  {"name": "oracle", "base": "oracle", "prompt": "question", "knowledge": "gold",
                   "routing": {"mode": "fixed", "k": 3}}],
        "tasks": {"fact": {"label": True, "n": 3, "datasets": {"fa": 2, "fb": 1}},
                  "qa": {"label": False, "n": 2, "datasets": {"qa": 2}}},
        "questions": questions, "answers": answers, "skipped": [], "sweep": None,
    }


def test_metrics_and_normalised_score_match_hand_computed_values():
    s = summarize(_synthetic_results())
    oracle, lag = s["modes"]["oracle"], s["modes"]["lag"]
    assert oracle["tasks"]["qa"]["em"] == pytest.approx(0.5)
    # "Pimsy the parrot" -> "pimsy parrot" vs "pimsy": precision 1/2, recall 1 -> F1 2/3
    assert oracle["tasks"]["qa"]["f1"] == pytest.approx((1 + 2 / 3) / 2)
    assert oracle["tasks"]["qa"]["contains"] == pytest.approx(1.0)
    assert oracle["tasks"]["fact"]["accuracy"] == pytest.approx(1.0)
    # "born in Drelmouth" vs "Drelmouth": P 1/3, R 1 -> 0.5
    assert lag["tasks"]["qa"] == pytest.approx({"n": 2, "em": 0.0, "f1": 0.25, "contains": 0.5,
                                                "primary": 0.25})
    assert lag["tasks"]["fact"]["accuracy"] == pytest.approx(1 / 3)
    # Eq. 9: qa: 0.25 / (5/6); fact: datasets fa (2 questions: 0.5 / 1.0) and fb (1 question: 0 / 1)
    assert lag["normalised"]["qa"] == pytest.approx(100 * 0.25 / (5 / 6))
    assert lag["normalised"]["fact"] == pytest.approx(100 * (2 / 3 * 0.5 + 1 / 3 * 0.0))
    assert lag["avg"] == pytest.approx((30.0 + 100 / 3) / 2)
    assert oracle["normalised"] == {"fact": pytest.approx(100.0), "qa": pytest.approx(100.0)}
    hub = lag["routing"].pop("hubness")
    assert lag["routing"] == pytest.approx({"n": 5, "gold_share": 0.3, "gold_top": 0.6, "gold_rank": 1.6})
    # wins of the 4 adapters summed over the questions that recorded them: [6, 1, 0, 1]
    assert hub["hubs"][0] == {"adapter": "d0", "share": 0.75} and hub["never_selected"] == 1
    assert hub["skewness"] == pytest.approx(float(scipy_skew([6, 1, 0, 1])), abs=1e-3)
    assert lag["tokens_per_s"] == pytest.approx(20 / 2.5) and lag["errors"] == 1
    assert lag["mean_candidates"] == pytest.approx(3.0)
    assert s["chance_share"] == pytest.approx(0.25)
    md = render_markdown(_synthetic_results())
    assert "| % of Oracle | fact | qa | AVG | tokens/s |" in md
    assert ("| lag (k=3) | 33.3 | 30.0 | 31.7 | 8.0 |" in md
            and "| oracle | 100.0 | 100.0 | 100.0 | 8.0 |" in md)
    assert "| lag | 5 | 33.3 | 0.0 | 25.0 | 50.0 | 30.0 | 60.0 | 1.0 | d0 75.0 | – | 8.0 | 1 |" in md


def test_normalised_score_without_oracle_or_with_zero_oracle():
    results = _synthetic_results()
    results["answers"] = [a for a in results["answers"] if a["mode"] != "oracle"]
    s = summarize(results)
    assert not s["oracle"] and s["modes"]["lag"]["avg"] is None
    assert "no `oracle` mode" in render_markdown(results)
    results = _synthetic_results()
    for a in results["answers"]:
        if a["mode"] == "oracle" and a["qid"].startswith("q"):
            a["answer"] = "nothing"
    s = summarize(results)  # the Oracle scores 0 on qa: the ratio is undefined, the task is left out of AVG
    assert s["modes"]["lag"]["normalised"]["qa"] is None
    assert s["modes"]["lag"]["avg"] == pytest.approx(100 / 3)


def test_routing_accuracy_of_counts():
    assert routing_accuracy(torch.tensor([5, 3, 0, 2]), 0) == {"gold_share": 0.5, "gold_top": True,
                                                               "gold_rank": 1, "selections": 10,
                                                               "wins": {"0": 5, "1": 3, "3": 2}}
    tie = routing_accuracy(torch.tensor([4, 4, 2]), 1)
    assert tie["gold_top"] is False and tie["gold_rank"] == 1
    assert routing_accuracy(torch.tensor([1, 2, 7]), 0)["gold_rank"] == 3


# ---- prompts and answers equal the pipeline's -----------------------------------------------------------
class _Capture(BaseEventHandler):
    prompts: list = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "CapturePrompts"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMCompletionStartEvent):
            self.prompts.append(event.prompt)


def test_prompts_answers_and_routing_equal_the_pipeline(world, tmp_path):
    """Batched harness vs `build_query_engine(...).query(q)` (unbatched, its own LLM): same prompt sent to the
    LLM, same answer, same routing summary, for rag, lag and prag; the harness's `lag` is the paper's method,
    the pipeline's default LAG routing (two-level) is the harness's `lag-req-sl2-w0.25`."""
    modes = ("rag", "lag", "prag", "lag-req-sl2-w0.25")
    pipeline = {"rag": dict(mode="rag"), "lag": dict(mode="lag", lag_method="paper"),
                "prag": dict(mode="prag"), "lag-req-sl2-w0.25": dict(mode="lag")}
    harness = EvalHarness(_config(world, tmp_path / "out", modes=",".join(modes), limit=4),
                          llm=world["llm"], index=world["loaded_index"], progress=False)
    results = harness.run()
    prompts = {item.id: item.prompt for item in harness.items}
    records = {(a["mode"], a["qid"]): a for a in results["answers"]}
    root = get_dispatcher()
    for mode in modes:
        engine = build_query_engine(LAGPipelineConfig(  # its own LAGLLM
            **pipeline[mode], model=world["model"], index=world["index"], knowledge=world["know"],
            task=[world["task"]], k=3, max_new_tokens=6, similarity_top_k=1), embed_model=world["embed"])
        for q in harness.questions:
            capture = _Capture()
            root.add_event_handler(capture)
            try:
                response = engine.query(q.question)
            finally:
                root.event_handlers.remove(capture)
            assert capture.prompts == [prompts[(mode, q.id)]], (mode, q.id)
            rec = records[(mode, q.id)]
            assert rec["answer"] == str(response), (mode, q.id)
            lag = response.metadata["lag"]
            if mode == "rag":
                assert lag is None and rec["routing"] is None
                assert rec["retrieved"][0]["doc_id"] == response.source_nodes[0].node.metadata["doc_id"]
            else:
                assert rec["routing"]["libraries"] == lag["libraries"], (mode, q.id)
                assert rec["routing"]["selections"] == lag["selections"]
                assert rec["new_tokens"] == lag["new_tokens"]
    question = harness.questions[0].question
    assert question in prompts[("lag", harness.questions[0].id)]
    assert "Context information is below" in prompts[("rag", harness.questions[0].id)]


def test_prompts_of_a_model_without_chat_template_equal_the_pipeline(world, tmp_path):
    plain = world["llm"].model_copy(update={"is_chat_model": False})
    harness = EvalHarness(_config(world, tmp_path / "out", modes="none,rag", limit=1), llm=plain,
                          index=world["loaded_index"], progress=False)
    harness.prepare()
    q = harness.questions[0]
    root = get_dispatcher()
    for mode in ("none", "rag"):
        engine = build_query_engine(LAGPipelineConfig(mode=mode, index=world["index"],
                                                      knowledge=world["know"], max_new_tokens=6,
                                                      similarity_top_k=1),
                                    llm=plain, index=world["loaded_index"])
        capture = _Capture()
        root.add_event_handler(capture)
        try:
            engine.query(q.question)
        finally:
            root.event_handlers.remove(capture)
        prompt = next(it.prompt for it in harness.items if it.id == (mode, q.id))
        assert capture.prompts == [prompt] and "<|im_start|>" not in prompt


def test_rag_context_larger_than_one_window_goes_through_the_pipeline_refine_loop(world, tmp_path):
    small = world["llm"].model_copy(update={"context_window": 900})
    results = run_eval(_config(world, tmp_path / "out", modes="rag,rag+lag", limit=2, similarity_top_k=2),
                       llm=small, index=world["loaded_index"], progress=False)
    assert {a["path"] for a in results["answers"]} == {"pipeline"}
    engine = build_query_engine(LAGPipelineConfig(mode="rag+lag", lag_method="paper", index=world["index"],
                                                  knowledge=world["know"], k=3, max_new_tokens=6,
                                                  similarity_top_k=2),
                                llm=small, index=world["loaded_index"])
    questions = {q["id"]: q["question"] for q in results["questions"]}
    for rec in results["answers"]:
        if rec["mode"] == "rag+lag":
            response = engine.query(questions[rec["qid"]])
            assert rec["answer"] == str(response)
            assert rec["routing"]["calls"] > 1  # several LLM calls: refine
            assert rec["routing"]["libraries"] == response.metadata["lag"]["libraries"]


def test_batched_equals_unbatched_and_routing_accuracy_is_independent_of_the_batch(world, tmp_path):
    modes = "arrow,spectr,lag,oracle,rag+lag,lag-seq-mass,spectr-seq-vote,prag+lag,lag-dyn0.5"
    one = _run(world, tmp_path / "b1", modes=modes, batch_size=1, limit=6, max_new_tokens=4)
    four = _run(world, tmp_path / "b4", modes=modes, batch_size=4, limit=6, max_new_tokens=4)
    # mean_candidates is a per-batch average by design; everything else per question
    assert _comparable(one, drop=("mean_candidates",)) == _comparable(four, drop=("mean_candidates",))
    assert all(a["batch"]["size"] == 1 for a in one["answers"])
    assert any(a["batch"]["size"] == 4 for a in four["answers"])
    by_mode = {}
    for a in four["answers"]:
        by_mode.setdefault(a["mode"], []).append(a)
    assert all(a["routing_accuracy"] is not None for m in ("arrow", "lag", "lag-seq-mass", "spectr-seq-vote")
               for a in by_mode[m])
    assert all(a["routing_accuracy"] is None for m in ("oracle", "prag+lag") for a in by_mode[m])
    oracle = by_mode["oracle"][0]["routing"]
    assert oracle["fixed"]["knowledge"] == [by_mode["oracle"][0]["qid"].split(".")[0]]
    assert oracle["fixed"]["task"] == ["style0" if by_mode["oracle"][0]["qid"].split(".")[1][0] == "q"
                                       else "style1"]
    dyn = [a["mean_candidates"] for a in by_mode["lag-dyn0.5"]]
    assert all(1.0 <= c <= 3.0 for c in dyn)


def test_routing_accuracy_matches_an_independent_trace(world, tmp_path):
    modes = ("arrow", "lag", "lag-seq-mass")
    harness = EvalHarness(_config(world, tmp_path / "out", modes=",".join(modes), limit=8, batch_size=8),
                          llm=world["llm"], progress=False)
    results = harness.run()
    llm, router = world["llm"], world["llm"].router
    names = router.names("knowledge")
    items = {item.id: item for item in harness.items}
    for rec in results["answers"]:
        item = items[(rec["mode"], rec["qid"])]
        enc = llm.encode(item.prompt, 4, getattr(item.prompt, "focus", None))  # the user message is the focus
        ids = enc["input_ids"]
        with (torch.no_grad(), router.using(item.routing), router.focus(enc.get("focus")),
              router.trace() as trace):
            llm.model(ids)  # one sequence, no padding: a plain prefill
        counts = trace.counts("knowledge")
        gold = names.index(item.question.doc_id)
        share = counts[gold].item() / counts.sum().item()
        others = torch.cat([counts[:gold], counts[gold + 1:]])
        acc = rec["routing_accuracy"]
        assert acc["selections"] == counts.sum().item() == ids.shape[1] * len(trace.modules("knowledge"))
        assert acc["gold_share"] == pytest.approx(share, abs=1e-6)
        assert acc["gold_top"] == bool(counts[gold] > others.max())
        assert acc["gold_rank"] == 1 + int((counts > counts[gold]).sum())


# ---- resume, determinism, fingerprint ---------------------------------------------------------------------
def test_resume_after_interruption_equals_an_uninterrupted_run_and_runs_are_deterministic(world, tmp_path):
    kw = dict(modes="none,lag,oracle", limit=6, batch_size=3, max_new_tokens=4)
    full = _run(world, tmp_path / "full", **kw)
    again = _run(world, tmp_path / "again", **kw)
    assert _comparable(full) == _comparable(again)  # two runs, identical results
    assert len(full["answers"]) == 3 * 6 and full["complete"]

    class Stop(Exception):
        pass

    def interrupt(n, records):
        if n == 3:
            raise Stop

    with pytest.raises(Stop):
        _run(world, tmp_path / "resumed", on_batch=interrupt, **kw)
    lines = (tmp_path / "resumed" / "answers.jsonl").read_text().splitlines()
    done = len(lines) - 1  # header
    assert 0 < done < 18 and not (tmp_path / "resumed" / "results.json").exists()
    with open(tmp_path / "resumed" / "answers.jsonl", "a") as fh:
        fh.write('{"type": "answer", "mode": "lag", "qi')  # torn write of a killed process
    written = []
    resumed = _run(world, tmp_path / "resumed", on_batch=lambda n, recs: written.extend(recs), **kw)
    assert len(written) == 18 - done  # only the rest
    assert _comparable(resumed) == _comparable(full)
    assert len((tmp_path / "resumed" / "answers.jsonl").read_text().splitlines()) == 19

    # a changed configuration never mixes with the old answers
    with pytest.raises(ConfigError, match="another configuration.*settings"):
        _run(world, tmp_path / "resumed", **{**kw, "k": 2})
    restarted = _run(world, tmp_path / "resumed", restart=True, **{**kw, "k": 2, "modes": "lag"})
    assert restarted["fingerprint"] != full["fingerprint"]
    assert (tmp_path / "resumed" / f"answers.{full['fingerprint']}.jsonl").is_file()
    # adding a mode to a finished run only answers the new mode
    written.clear()
    _run(world, tmp_path / "full", on_batch=lambda n, recs: written.extend(recs),
         **{**kw, "modes": "none,lag,oracle,spectr"})
    assert {r["mode"] for r in written} == {"spectr"} and len(written) == 6


# ---- bad input -----------------------------------------------------------------------------------------
def test_questions_without_document_or_adapter(world, tmp_path, caplog):
    with pytest.raises(DataError, match="4 question.*ship-tessaline.q1.*no adapter"):
        _run(world, tmp_path / "e", modes="none", missing="error")
    questions = tmp_path / "questions.jsonl"
    lines = (DEMO / "questions.jsonl").read_text().splitlines()[:2]
    lines.append(json.dumps({"id": "orphan.q1", "question": "Who?", "answers": ["x"], "doc_id": "nope"}))
    questions.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="llama_index_lag.eval.harness"):
        results = _run(world, tmp_path / "s", modes="none", questions=questions)
    assert results["skipped"] == [{"id": "orphan.q1", "doc_id": "nope",
                                   "reason": "doc_id not in the documents"}]
    assert "orphan.q1" in caplog.text and len(results["answers"]) == 2
    # PRAG retrieving a document without adapter: the pipeline refuses the query; scored as a wrong answer
    lines.append(json.dumps({"id": "tess.q1", "question": "What was the Tessaline and what did it carry?",
                             "answers": ["x"], "doc_id": "town-drelmouth"}))
    questions.write_text("\n".join(lines) + "\n")
    results = _run(world, tmp_path / "p", modes="prag", questions=questions)
    rec = next(a for a in results["answers"] if a["qid"] == "tess.q1")
    assert rec["answer"] == "" and "ship-tessaline" in rec["error"] and rec["scores"]["f1"] == 0.0
    assert results["summary"]["modes"]["prag"]["errors"] == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "a", "question": "Q?", "answers": [], "doc_id": "town-drelmouth"})
                     + "\n")
    with pytest.raises(DataError, match="answers list is empty") as err:
        _run(world, tmp_path / "x", modes="none", questions=empty)
    assert err.value.line == 1


def test_bad_configurations(world, tmp_path):
    with pytest.raises(ConfigError, match="task-map names adapters not in the task libraries"):
        _run(world, tmp_path / "a", modes="oracle", task_map="qa=nope")
    with pytest.raises(ConfigError, match="task 'fact' of the questions is not in --task-map"):
        _run(world, tmp_path / "a", modes="oracle", task_map="qa=style0")
    with pytest.raises(ConfigError, match="pass --index"):
        run_eval(_config(world, tmp_path / "b", modes="none,rag", index=None), llm=world["llm"],
                 progress=False)


def test_library_of_another_base_model_is_a_clear_error(world, tmp_path, capsys):
    other = make_tiny_model_dir(tmp_path / "other", hidden_size=32, max_position_embeddings=2048)
    with pytest.raises(IncompatibleLibraryError, match="another base model"):
        run_eval(_config(world, tmp_path / "out", model=str(other), modes="none"), progress=False)
    code = cli_main(["eval", "--docs", str(DEMO / "documents.jsonl"), "--questions",
                     str(DEMO / "questions.jsonl"), "--knowledge", world["know"], "--model", str(other),
                     "--modes", "none", "-q", "--out", str(tmp_path / "cli")])
    assert code == 1
    err = capsys.readouterr().err
    assert "lag eval: error:" in err and "another base model" in err and "Traceback" not in err
    assert not (tmp_path / "cli" / "answers.jsonl").exists()


# ---- CLI end to end ----------------------------------------------------------------------------------------
def test_cli_end_to_end_writes_results_report_and_plots(world, tmp_path, capsys):
    out = tmp_path / "results"
    args = ["eval", "--docs", str(DEMO / "documents.jsonl"), "--questions", str(DEMO / "questions.jsonl"),
            "--knowledge", world["know"], "--task", world["task"], "--model", world["model"], "--index",
            world["index"], "--modes", "none,lag,oracle,rag+lag,prag,lag-seq-mass,lag-dyn0.5", "--k", "3",
            "--sweep-k", "1,N", "--task-map", TASK_MAP, "--max-new-tokens", "4", "--batch-size", "8",
            "--limit", "4", "-q", "--out", str(out)]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "## Normalised score (% of Oracle, Eq. 9)" in printed
    for name in ("results.json", "results.md", "answers.jsonl", "k_sweep.png", "dynamic_k.png"):
        assert (out / name).is_file(), name
    assert (out / "k_sweep.png").read_bytes()[:4] == b"\x89PNG"
    results = load_results(out)
    modes = [m["name"] for m in results["modes"]]
    assert modes == ["none", "lag", "oracle", "rag+lag", "prag", "lag-seq-mass", "lag-dyn0.5", "lag-k1",
                     "lag-k4"]
    assert [p["label"] for p in results["sweep"]] == ["1", "N"]
    assert len(results["answers"]) == 9 * 4 and results["complete"]
    md = (out / "results.md").read_text()
    assert "## k sweep" in md and "## Dynamic k" in md and "| lag-k4 |" in md and "tokens/s" in md
    summary = results["summary"]["modes"]
    assert summary["lag"]["routing"]["n"] == 4 and summary["rag+lag"]["retrieval_hit1"] == 1.0
    assert all(not math.isnan(e["tokens_per_s"]) and e["tokens_per_s"] > 0 for e in summary.values())
    # the report is a pure function of results.json
    (out / "results.md").unlink()
    assert cli_main(["eval", "--render-only", "--out", str(out)]) == 0
    assert (out / "results.md").read_text() == md == render_markdown(results)
    assert write_report(results, tmp_path / "again")["markdown"].read_text() == md
    # the same command again resumes: nothing left to do, same answers
    assert cli_main(args) == 0
    assert _comparable(load_results(out)) == _comparable(results)


def test_each_task_is_normalised_by_the_better_oracle():
    results = _synthetic_results()
    results["modes"].append({"name": "oracle-knowledge", "base": "oracle-knowledge", "prompt": "question",
                             "knowledge": "gold", "routing": {"mode": "fixed", "k": 3}})
    # knowledge alone: qa F1 1.0 (better than the oracle's 5/6), fact 1/3 (worse than its 1.0)
    for qid, answer in (("q1", "Drelmouth"), ("q2", "Pimsy"), ("f1", "true"), ("f2", "true"), ("f3", "true")):
        results["answers"].append({"mode": "oracle-knowledge", "qid": qid, "answer": answer, "new_tokens": 1,
                                   "seconds": 0.1})
    s = summarize(results)
    assert s["oracle_by_task"] == {"fact": "oracle", "qa": "oracle-knowledge"}
    assert s["modes"]["lag"]["normalised"]["qa"] == pytest.approx(100 * 0.25 / 1.0)
    assert s["modes"]["lag"]["normalised"]["fact"] == pytest.approx(100 * (2 / 3 * 0.5 + 1 / 3 * 0.0))
    assert s["modes"]["oracle"]["normalised"]["qa"] == pytest.approx(100 * (5 / 6))
    assert "qa: `oracle-knowledge`" in render_markdown(results)


def test_a_label_task_the_oracle_answers_at_chance_is_left_out_of_avg():
    results = _synthetic_results()
    for a in results["answers"]:
        if a["mode"] == "oracle" and a["qid"].startswith("f"):
            a["answer"] = "false"  # the majority label: 2 of 3, chance
    s = summarize(results)
    assert s["uninformative"] == ["fact"]
    lag = s["modes"]["lag"]
    assert lag["normalised"]["fact"] is not None and lag["avg"] == pytest.approx(lag["normalised"]["qa"])
    assert "Left out of AVG: fact" in render_markdown(results)


def test_calibrated_and_pre_pass_free_modes_batched_equal_unbatched(world, tmp_path):
    """The score calibrations (per-adapter statistics of the library, or of each request's own tokens, with
    left-padded batches) and per-module shortlists answer and route each question as they do alone."""
    llm = LAGLLM(world["model"], libraries=[world["know"]], lag_config=LAGConfig(mode="none"))
    modes = "lag-calzscore,lag-calisoftmax,lag-calzscore-refreq,lag-calsubspace-m2,lag-req-sl2-w0.25-mod"

    def run(out, batch):
        return run_eval(_config(world, out, modes=modes, task=[], task_map=None, batch_size=batch, limit=6,
                                max_new_tokens=4), llm=llm, index=world["loaded_index"],
                        embed_model=world["embed"], progress=False)

    one, four = run(tmp_path / "b1", 1), run(tmp_path / "b4", 4)
    assert _comparable(one) == _comparable(four)
    assert any(a["batch"]["size"] == 4 for a in four["answers"])
    accuracy = {a["mode"]: a["routing_accuracy"] for a in four["answers"]}
    assert set(accuracy) == set(modes.split(",")) and all(v is not None for v in accuracy.values())
