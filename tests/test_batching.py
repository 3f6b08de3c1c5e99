"""Continuous batching (llama_index_lag.batching) on tiny real models with real compiled libraries: rows with
different routings decoded together give the tokens and routing counts they give alone (routed_generate, an
independent path through model.generate), rows join and leave mid-run, cancellation frees the slot."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llama_index_lag import LAGConfig
from llama_index_lag.batching import BatchEngine, SamplingParams
from llama_index_lag.errors import QueueFullError
from llama_index_lag.generation import eos_ids, routed_generate
from llama_index_lag.router import attach_lag
from llama_index_lag.testing import make_tiny_tokenizer

PROMPTS = [
    "the quick brown fox jumps",
    "a b c d e f g h i j k l",
    "hello world",
    "one two three four five six seven",
    "zebra",
    "the cat sat on the mat and looked around",
    "river mountain",
    "glass was blown in the old town",
]


def _configs(know) -> list[LAGConfig]:
    return [
        LAGConfig(mode="none"),
        LAGConfig.preset("two-level", k=3),
        LAGConfig(mode="lag", k=3),
        LAGConfig(mode="fixed", fixed={"knowledge": {know.names[1]: 1.0}}),
        LAGConfig(mode="spectr"),
        LAGConfig.preset("two-level", k=3),
        LAGConfig(mode="lag", k=3, granularity="sequence"),
        LAGConfig(mode="lag", k=2, libraries=["task"]),
    ]


@pytest.fixture
def routed(tiny_model, two_libs):
    know, task = two_libs
    router = attach_lag(tiny_model, [know, task], LAGConfig(mode="none"))
    return tiny_model, make_tiny_tokenizer(), router, know


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def _alone(model, tok, router, prompt, config, n):
    ids = _ids(tok, prompt)[None]
    out = routed_generate(
        model,
        ids,
        torch.ones_like(ids),
        router=router,
        config=config,
        trace="summary",
        eos=eos_ids(model, tok),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
    )
    return out.new[0][: out.lengths[0]].tolist(), out.trace.summary(top=None)


def test_rows_with_different_routings_equal_their_solo_runs(routed):
    model, tok, router, know = routed
    configs = _configs(know)
    lengths = [12, 5, 9, 12, 3, 7, 12, 6]  # rows leave at different steps, others join the running batch
    alone = [_alone(model, tok, router, p, c, n) for p, c, n in zip(PROMPTS, configs, lengths)]
    sizes: list[int] = []
    engine = BatchEngine(model, tok, router, max_batch=4, on_step=lambda b, q: sizes.append(b))
    results: list = [None] * len(PROMPTS)

    def run(i: int) -> None:
        time.sleep(0.003 * i)
        params = SamplingParams(max_new_tokens=lengths[i], eos=frozenset(eos_ids(model, tok)))
        results[i] = engine.submit(
            _ids(tok, PROMPTS[i]), config=configs[i], params=params, trace=True
        ).result(60)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert max(sizes) == 4 and len(set(sizes)) > 1  # batched, and the batch changed size
    for (tokens, summary), done, config in zip(alone, results, configs):
        assert done.tokens == tokens, config
        got = done.trace.summary(top=None) if config.mode != "none" else {}
        assert got == (summary if config.mode != "none" else {}), config
        assert done.finish_reason == "length" and done.prompt_tokens > 0


def test_focus_mask_routes_as_alone(routed):
    model, tok, router, _ = routed
    config = LAGConfig.preset("two-level", k=3)
    ids = _ids(tok, PROMPTS[5])
    focus = torch.zeros(ids.numel(), dtype=torch.bool)
    focus[-3:] = True
    ref = routed_generate(
        model,
        ids[None],
        torch.ones_like(ids)[None],
        router=router,
        config=config,
        focus=focus[None],
        eos=eos_ids(model, tok),
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=0,
    )
    engine = BatchEngine(model, tok, router)
    try:
        others = [
            engine.submit(_ids(tok, p), config=config, params=SamplingParams(max_new_tokens=8))
            for p in PROMPTS[:3]
        ]
        got = engine.generate(ids[None], focus=focus[None], config=config, max_new_tokens=8, do_sample=False)
        [t.result(60) for t in others]
    finally:
        engine.close()
    assert got.new[0].tolist() == ref.new[0][: ref.lengths[0]].tolist()


def test_cancel_frees_the_slot_and_stop_strings_end_rows(routed):
    model, tok, router, _ = routed
    engine = BatchEngine(model, tok, router, max_batch=2, max_queue=1)
    try:
        long = engine.submit(_ids(tok, PROMPTS[0]), params=SamplingParams(max_new_tokens=400))
        first = next(long.tokens())
        assert isinstance(first, int)
        long.cancel()
        done = long.result(30)
        assert done.finish_reason == "cancelled" and len(done.tokens) < 400
        deadline = time.time() + 5
        while engine.running and time.time() < deadline:
            time.sleep(0.01)
        assert engine.running == 0
        # a stop string taken from the free-running output ends the row there
        free = engine.submit(_ids(tok, PROMPTS[1]), params=SamplingParams(max_new_tokens=20)).result(30)
        text = tok.decode(free.tokens, skip_special_tokens=True)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        if stop.strip():
            cut = engine.submit(_ids(tok, PROMPTS[1]), params=SamplingParams(max_new_tokens=20, stop=(stop,)))
            got = cut.result(30)
            assert got.finish_reason == "stop" and len(got.tokens) < len(free.tokens)
            assert stop in tok.decode(got.tokens, skip_special_tokens=True)
    finally:
        engine.close()


def test_seeded_sampling_repeats_and_queue_limit(routed):
    model, tok, router, _ = routed
    engine = BatchEngine(model, tok, router, max_batch=1, max_queue=1)
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=20, seed=7)
        a = engine.submit(_ids(tok, PROMPTS[2]), params=params).result(30).tokens
        b = engine.submit(_ids(tok, PROMPTS[2]), params=params).result(30).tokens
        c = (
            engine.submit(
                _ids(tok, PROMPTS[2]), params=SamplingParams(max_new_tokens=10, temperature=1.0, seed=8)
            )
            .result(30)
            .tokens
        )
        assert a == b and a != c
        running = engine.submit(_ids(tok, PROMPTS[0]), params=SamplingParams(max_new_tokens=300))
        next(running.tokens())
        engine.submit(
            _ids(tok, PROMPTS[1]), params=SamplingParams(max_new_tokens=5)
        )  # waits: fills the queue
        with pytest.raises(QueueFullError):
            engine.submit(_ids(tok, PROMPTS[1]), params=SamplingParams(max_new_tokens=5))
        running.cancel()
    finally:
        engine.close()


def test_prompts_prefilled_together_equal_their_solo_runs(routed):
    """Requests waiting together are prefilled in one left-padded forward per routing; each row (with or
    without a focus) gives the tokens and routing counts it gives alone."""
    model, tok, router, know = routed
    two_level = LAGConfig.preset("two-level", k=3)
    configs = [two_level, LAGConfig(mode="none"), two_level, LAGConfig(mode="lag", k=3), two_level,
               LAGConfig(mode="none"), LAGConfig(mode="lag", k=3), two_level]
    focus = [None] * len(PROMPTS)
    focus[4] = torch.arange(_ids(tok, PROMPTS[4]).numel()) >= 0  # the whole prompt
    focus[7] = torch.arange(_ids(tok, PROMPTS[7]).numel()) >= 3  # all but its first three tokens
    alone = []
    for prompt, config, f in zip(PROMPTS, configs, focus):
        ids = _ids(tok, prompt)[None]
        out = routed_generate(
            model, ids, torch.ones_like(ids), router=router, config=config,
            focus=None if f is None else f[None], trace="summary", eos=set(), max_new_tokens=6,
            do_sample=False, pad_token_id=0,
        )
        alone.append((out.new[0].tolist(), out.trace.summary(top=None) if config.mode != "none" else {}))
    groups: list[int] = []
    engine = BatchEngine(model, tok, router, max_batch=8, on_prefill=groups.append)
    try:
        with engine._wake:  # hold the loop back: every request waits, then all are admitted in one round
            tickets = [
                engine.submit(_ids(tok, p), config=c, focus=f, trace=True,
                              params=SamplingParams(max_new_tokens=6))
                for p, c, f in zip(PROMPTS, configs, focus)
            ]
        results = [t.result(60) for t in tickets]
    finally:
        engine.close()
    assert sorted(groups) == [2, 2, 4]  # one forward per routing: none, lag, two-level
    for (tokens, summary), done, config in zip(alone, results, configs):
        assert done.tokens == tokens, config
        assert (done.trace.summary(top=None) if config.mode != "none" else {}) == summary, config


def test_a_prompt_that_breaks_its_group_fails_alone(routed):
    """A token id outside the vocabulary fails the group's forward; the group is retried row by row, so only
    that request fails and the others give their solo tokens."""
    model, tok, router, _ = routed
    config = LAGConfig.preset("two-level", k=3)
    prompts = [_ids(tok, p) for p in PROMPTS[:3]]
    bad = prompts[1].clone()
    bad[0] = model.config.vocab_size + 5
    alone = []
    for ids in (prompts[0], prompts[2]):
        out = routed_generate(model, ids[None], torch.ones_like(ids)[None], router=router, config=config,
                              eos=set(), max_new_tokens=5, do_sample=False, pad_token_id=0)
        alone.append(out.new[0].tolist())
    groups: list[int] = []
    engine = BatchEngine(model, tok, router, on_prefill=groups.append)
    try:
        with engine._wake:
            tickets = [engine.submit(ids, config=config, params=SamplingParams(max_new_tokens=5))
                       for ids in (prompts[0], bad, prompts[2])]
        with pytest.raises(IndexError):
            tickets[1].result(60)
        assert [tickets[0].result(60).tokens, tickets[2].result(60).tokens] == alone
    finally:
        engine.close()
    assert groups == [1, 1]  # the group of three failed; its good rows started one by one
