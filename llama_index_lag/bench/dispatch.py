"""``lag bench dispatch``: the candidate-product strategies (``routing.dispatch``) against each other and
against the choice of ``dispatch="auto"``'s cost model.

For T tokens x k = 20 candidates among N rank-6 adapters of in-features n (float32 and float16 libraries),
tokens drawing their candidates from half of the library (prompt tokens share candidates), each strategy is
timed; the table shows the fastest one, the cost model's pick and how much slower the pick is.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..routing.dispatch import _grouped_ok, choose_strategy, project_pairs
from .common import machine, print_table, save_results

RANK, K = 6, 20


def _ms(fn: Callable[[], Any], min_time: float = 0.3) -> float:
    fn()
    runs, start = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - start < min_time:
        fn()
        runs += 1
    return 1e3 * (time.perf_counter() - start) / runs


@torch.no_grad()
def run(out: str | Path = "bench-dispatch.json", *, tokens: tuple[int, ...] = (1, 8, 32, 128, 256),
        ns: tuple[int, ...] = (100, 1000), dims: tuple[int, ...] = (576, 1536),
        dtypes: tuple[str, ...] = ("float32", "float16"), seed: int = 0) -> dict[str, Any]:
    """Time every strategy per (dtype, N, n, T); print the table, write JSON, return the payload."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for dtype, N, n, T in itertools.product(dtypes, ns, dims, tokens):
        A = torch.randn(N, RANK, n, generator=g).to(getattr(torch, dtype))
        x = torch.randn(T, n, generator=g)
        pool = torch.randperm(N, generator=g)[: max(K, N // 2)]
        idx = pool[torch.stack([torch.randperm(len(pool), generator=g)[:K] for _ in range(T)])]  # [T, k]
        times = {s: _ms(functools.partial(project_pairs, x, A, idx, s))
                 for s in ("gather", "dense", "union", "grouped", "bucketed")
                 if s != "grouped" or _grouped_ok(x, A)}
        pick = choose_strategy(x, A, idx, idx.unique().numel() if T > 1 else None)  # what auto runs
        best = min(times, key=times.get)
        rows.append({"dtype": dtype, "N": N, "n": n, "T": T, "distinct": idx.unique().numel(),
                     **{f"{s}_ms": v for s, v in times.items()}, "best": best, "auto": pick,
                     "auto_x_best": times[pick] / times[best]})
    print_table(rows, ["dtype", "N", "n", "T", "distinct", "gather_ms", "dense_ms", "union_ms", "grouped_ms",
                       "bucketed_ms", "best", "auto", "auto_x_best"],
                title=f"Candidate products A*_(idx) x: k={K}, rank {RANK}; auto = the cost model's pick")
    worst = max(r["auto_x_best"] for r in rows)
    print(f"auto picks the fastest strategy in {sum(r['best'] == r['auto'] for r in rows)} of {len(rows)} "
          f"cases; at worst {worst:.2f}x the fastest")
    payload = {"benchmark": "dispatch", "machine": machine(), "k": K, "rank": RANK, "rows": rows}
    save_results(out, payload)
    return payload
