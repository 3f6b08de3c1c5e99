"""Benchmark timing helpers (the figures of BENCHMARKS.md rest on them)."""

from __future__ import annotations

import time

import torch

from llama_index_lag.bench.common import decode_seconds, timeit_interleaved


def test_decode_seconds_times_the_steps_after_the_first_token(llama) -> None:
    ids = torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    per_step = decode_seconds(llama, ids, 6)
    wall = time.perf_counter() - start
    assert 0 < 5 * per_step < wall  # 5 KV-cached steps, without the 40-token prefill and first token
    one_token = decode_seconds(llama, ids[:, :2], 2)  # a single step is measurable too
    assert one_token > 0


def test_timeit_interleaved_uses_the_times_functions_report() -> None:
    reported = iter([3.0, 1.0, 2.0] * 2)
    out = timeit_interleaved({"a": lambda: next(reported), "b": lambda: 5.0}, rounds=2, warmup=0,
                             self_timed=True)
    assert out == {"a": 2.0, "b": 5.0}  # medians of (3, 1) and (5, 5)


def test_timeit_interleaved_times_each_call() -> None:
    calls = {"fast": 0, "slow": 0}

    def run(name: str, seconds: float):
        def call() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return call

    out = timeit_interleaved({"fast": run("fast", 0.001), "slow": run("slow", 0.02)}, rounds=3, inner=2)
    assert calls == {"fast": 7, "slow": 7}  # one warm-up call, then 3 rounds of 2
    assert 0.02 <= out["slow"] < 0.2 and 0.001 <= out["fast"] < out["slow"]
