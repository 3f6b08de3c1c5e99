"""The one routed-generation path (``llama_index_lag.generation``) and ``measure_recall`` on it: a tiny real
llama, random LoRA adapters compiled into a library, references computed independently."""

from __future__ import annotations

import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig
from llama_index_lag.data import QuestionRecord
from llama_index_lag.eval.recall import measure_recall
from llama_index_lag.generation import HFGenerator, chat_prompt, left_pad, new_lengths, routed_generate
from llama_index_lag.models import load_causal_lm
from llama_index_lag.router import attach_lag
from llama_index_lag.testing import make_lora_adapters, make_tiny_model_dir

QUESTIONS = ["What is the capital of Varnia?", "Who built the ship Torvald?", "When was Emden founded?",
             "Which device is a kuvido?", "Name the festival of lights."]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model_dir = make_tiny_model_dir(root / "model", arch="llama")
    model, tok = load_causal_lm(model_dir)
    raw = make_lora_adapters(model, root / "raw", len(QUESTIONS), rank=4, seed=3,
                             target_modules=("gate_proj", "up_proj", "down_proj"))
    dirs = [path.rename(root / "raw" / f"doc{i}") for i, path in enumerate(raw)]
    AdapterLibrary.compile(dirs, kind="knowledge", base_model=model_dir, out=root / "lib", progress=False)
    return {"model": model, "tok": tok, "lib": root / "lib"}


def test_new_lengths_and_left_pad_against_loops():
    new = torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1], [2, 0, 0, 0], [3, 9, 9, 2]])
    expect = []
    for row in new.tolist():
        stop = next((j for j, t in enumerate(row) if t in {2, 9}), None)
        expect.append(len(row) if stop is None else stop + 1)
    assert new_lengths(new, {2, 9}) == expect == [2, 4, 1, 2]
    assert new_lengths(new, set()) == [4, 4, 4, 4]
    ids, mask, focus = left_pad([torch.tensor([4, 5, 6]), torch.tensor([7])], pad_id=0,
                                focus=[None, torch.tensor([True])])
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert focus.tolist() == [[False, False, False], [False, False, True]]
    assert left_pad([torch.tensor([1])], 0, [None])[2] is None


def test_batched_routed_generation_equals_one_prompt_at_a_time(world):
    model, tok = world["model"], world["tok"]
    router = attach_lag(model, [AdapterLibrary.load(world["lib"])], LAGConfig(mode="none"))
    try:
        config = LAGConfig(mode="lag", k=3)
        prompts = [chat_prompt(tok, q) for q in QUESTIONS]
        batched = HFGenerator(model, tok, batch_size=4, router=router, config=config)
        rows, batches = batched.generate(prompts, max_new_tokens=5, trace="tokens")
        assert [b.prompt_lengths for b in batches] == [
            [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts[:4]],
            [len(tok(prompts[4], add_special_tokens=False)["input_ids"])]]
        for prompt, row in zip(prompts, rows):  # reference: plain generate, one unpadded prompt
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            with router.using(config), torch.no_grad():
                ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
            assert row.tolist() == ref[0, ids.shape[1]:ids.shape[1] + row.numel()].tolist()
        one = routed_generate(model, ids, router=router, config=config, trace="summary", max_new_tokens=2)
        assert one.trace is not None and one.routing_seconds is not None and one.routing_seconds > 0
        assert routed_generate(model, ids, router=router, config=config, max_new_tokens=2).trace is None
    finally:
        router.detach()


def test_measure_recall_routing_accuracy_equals_a_separate_forward_pass(world):
    model, tok = world["model"], world["tok"]
    questions = [QuestionRecord(f"q{i}", q, ("x",), f"doc{i}") for i, q in enumerate(QUESTIONS)]
    res = measure_recall(model, tok, questions, world["lib"], modes=["none", "lag", "lag-seq-mass"], k=2,
                         max_new_tokens=3, batch_size=2)
    assert res["none"]["routing_accuracy"] is None
    lib = AdapterLibrary.load(world["lib"])
    router = attach_lag(model, [lib], LAGConfig(mode="none"))
    try:
        names = router.names("knowledge")
        for mode, config in (("lag", LAGConfig(mode="lag", k=2)),
                             ("lag-seq-mass", LAGConfig(mode="lag", k=2, granularity="sequence",
                                                        sequence_score="mass"))):
            hits = total = q_hits = q_total = 0
            for i, q in enumerate(QUESTIONS):  # reference: a prefill per question, its own trace
                prompt = chat_prompt(tok, q)
                enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
                at = prompt.rfind(q)
                lo = len(tok(prompt[:at], add_special_tokens=False)["input_ids"])
                hi = len(tok(prompt[:at + len(q)], add_special_tokens=False)["input_ids"])
                gold = names.index(f"doc{i}")
                with router.using(config), router.trace() as trace, torch.no_grad():
                    model(**enc)
                counts = trace.counts("knowledge")
                hits, total = hits + int(counts[gold]), total + int(counts.sum())
                for module in trace.modules("knowledge"):
                    chosen = trace.tokens("knowledge", module)[lo:hi]
                    q_hits, q_total = q_hits + int((chosen == gold).sum()), q_total + chosen.numel()
            assert res[mode]["routing_accuracy"] == pytest.approx(hits / total)
            assert res[mode]["routing_accuracy_question"] == pytest.approx(q_hits / q_total)
    finally:
        router.detach()
    assert not any("LAG" in type(m).__name__ for m in model.modules())  # measure_recall detached its router
