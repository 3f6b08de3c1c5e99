"""Fused one-token kernels for KV-cached decoding (numba), the CPU analogue of multi-LoRA serving kernels.

A decode step routes one token through every adapted module (~90 in SmolLM2's MLPs). In PyTorch each module
costs a dozen small ops (scan, topk, gather, products, norms, argmax, apply), each with its own dispatch
overhead, plus a half-precision GEMV for the scan (the costs: BENCHMARKS.md). Here one call per module does
it all:

    scores_i = a*_i . x                       over all N prototypes (rows split across cores)   [N]
    cand     = top-k of |scores|                                                                  [k]
    winner   = argmax_{c in cand} ||A*_c x||   (SpectR among the Arrow candidates)
    out      = B*_winner (A*_winner x)                                                            [m]

``spectr`` is the same with cand = all N, ``arrow`` (top-1) with k = 1, and approximate Arrow passes the
index's candidates.

The same routing as the PyTorch ops, computed from the library's values with float32 sums (PyTorch's scan of
a float16 library rounds x to float16 first, so near-ties may differ). Library tensors are passed as their
raw bits, so float16 / bfloat16 are read without conversion copies: float16 as uint16, bfloat16 as
int16 (a dtype tag only), float32 as is. :func:`available` is False when numba is not installed; callers
then use the PyTorch ops.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

try:  # optional at import time: the PyTorch path covers every case
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

_BITS = {torch.float16: np.uint16, torch.bfloat16: np.int16, torch.float32: np.float32}
_threads = threading.local()  # .torch: the torch thread count numba was last matched to, in this thread
_pool_pid: int | None = None  # the process that started numba's thread pool


def available() -> bool:
    """Whether the fused kernels can run here: numba is installed, and this is not a child forked after the
    parent started numba's OpenMP thread pool (GNU OpenMP does not survive fork: numba would abort the
    child), where the PyTorch ops take over."""
    return numba is not None and _pool_pid in (None, os.getpid())


def as_bits(t: torch.Tensor) -> np.ndarray | None:
    """A zero-copy numpy view of a contiguous CPU tensor for the kernels (None: unsupported)."""
    if t.device.type != "cpu" or t.dtype not in _BITS or not t.is_contiguous():
        return None
    return t.view(torch.int16).numpy().view(_BITS[t.dtype]) if t.dtype != torch.float32 else t.numpy()


if numba is not None:

    @intrinsic
    def _half(typingctx: Any, bits: Any) -> Any:
        """float16 bits (uint16) -> float32, exactly (one vcvtph2ps per vector when vectorised)."""
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def _bfloat(typingctx: Any, bits: Any) -> Any:
        """bfloat16 bits (int16) -> float32, exactly (the upper half of a float32)."""
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return types.float32(types.int16), codegen

    def _f32(v):  # type: ignore[no-untyped-def]  # typed by the overload below (numba wants bare signatures)
        raise NotImplementedError

    @overload(_f32, inline="always")
    def _f32_impl(v):  # type: ignore[no-untyped-def]
        if v == types.uint16:
            return lambda v: _half(v)
        if v == types.int16:
            return lambda v: _bfloat(v)
        if v == types.float32:
            return lambda v: v
        return None

    @njit(fastmath=True, cache=True, parallel=True)
    def _scan(protos: Any, x: Any, scores: Any) -> None:
        """scores[i] = |protos[i] . x| over rows split across threads. protos [N, n], x [n] f32,
        scores [N]."""
        for i in prange(protos.shape[0]):
            s = np.float32(0.0)
            for j in range(protos.shape[1]):
                s += _f32(protos[i, j]) * x[j]
            scores[i] = abs(s)

    @njit(fastmath=True, cache=True)
    def _topk(scores: Any, k: int) -> Any:
        """Rows of the k largest scores (unordered): one pass keeping the current k best.
        scores [N] -> [k]."""
        best = scores[:k].copy()  # [k]
        rows = np.arange(k)  # [k]
        low = np.argmin(best)
        for i in range(k, scores.shape[0]):
            if scores[i] > best[low]:
                best[low], rows[low] = scores[i], i
                low = np.argmin(best)
        return rows

    @njit(fastmath=True, cache=True)
    def _project(A: Any, a: int, x: Any, proj: Any) -> None:
        """proj = A*_a x. A [N, r, n], x [n] f32, proj [r] f32."""
        for q in range(A.shape[1]):
            s = np.float32(0.0)
            for j in range(A.shape[2]):
                s += _f32(A[a, q, j]) * x[j]
            proj[q] = s

    @njit(fastmath=True, cache=True, parallel=True)
    def _spectr_norms(A: Any, x: Any, cand: Any) -> Any:
        """||A*_c x||^2 for c in cand, candidates split across threads (their rows are read from memory
        in parallel). A [N, r, n], x [n] f32, cand [k] -> [k] f32."""
        norms = np.empty(cand.shape[0], np.float32)  # [k]
        for c in prange(cand.shape[0]):
            proj = np.empty(A.shape[1], np.float32)  # [r]
            _project(A, cand[c], x, proj)
            norms[c] = np.sum(proj * proj)
        return norms

    @njit(fastmath=True, cache=True)
    def _rerank_apply(A: Any, B: Any, x: Any, cand: Any, out: Any) -> int:
        """SpectR among cand, then out += B*_w (A*_w x). A [N, r, n], B [N, m, r], x [n] f32, cand [k],
        out [m] f32 -> w (an adapter row; of equal norms the first in cand wins)."""
        winner = cand[np.argmax(_spectr_norms(A, x, cand))] if cand.shape[0] > 1 else cand[0]
        proj = np.empty(A.shape[1], np.float32)  # [r]
        _project(A, winner, x, proj)  # again, from cache
        _add_delta(B, winner, proj, out)
        return winner

    @njit(cache=True)  # strict float32 (no fastmath): out[i] + delta_i rounds once, as PyTorch's add does
    def _add_delta(B: Any, w: int, proj: Any, out: Any) -> None:
        """out += B*_w proj. B [N, m, r], proj [r] f32, out [m] f32."""
        for i in range(B.shape[1]):
            s = np.float32(0.0)
            for q in range(B.shape[2]):
                s += _f32(B[w, i, q]) * proj[q]
            out[i] += s

    @njit(fastmath=True, cache=True)
    def _lag_apply(protos: Any, A: Any, B: Any, x: Any, k: int, out: Any) -> int:
        """Exact Arrow top-k over all N, SpectR among them, apply the winner (k=1: Arrow top-1)."""
        scores = np.empty(protos.shape[0], np.float32)  # [N]
        _scan(protos, x, scores)
        return _rerank_apply(A, B, x, _topk(scores, k), out)


    @njit(fastmath=True, cache=True)
    def _shortlist_apply(A: Any, B: Any, x: Any, centre: Any, cand: Any, prior: Any, weight: float,
                         out: Any) -> int:
        """Two-level routing of one token among its sequence's shortlist: w = argmax_c prior_c + weight *
        log ||A*_c (x - centre)||, then out += B*_w (A*_w x). A [N, r, n], B [N, m, r], x [n] f32, centre [n]
        f32 (zeros: uncentred), cand [M], prior [M] log mass shares, out [m] f32 -> w."""
        best = 0
        if weight != 0.0 and cand.shape[0] > 1:
            xs = x - centre  # [n]
            proj = np.empty(A.shape[1], np.float32)  # [r]
            top = -np.inf
            for c in range(cand.shape[0]):  # M is a handful: serial
                _project(A, cand[c], xs, proj)
                sq = np.float64(np.sum(proj * proj))
                # log clamp_min(norm, 1e-30)
                score = np.float64(prior[c]) + weight * 0.5 * np.log(max(sq, 1e-60))
                if score > top:
                    top, best = score, c
        elif cand.shape[0] > 1:
            best = np.argmax(prior)
        winner = cand[best]
        proj = np.empty(A.shape[1], np.float32)  # [r]
        _project(A, winner, x, proj)
        _add_delta(B, winner, proj, out)
        return winner

    @njit(fastmath=True, cache=True)
    def _rerank_serial(A: Any, B: Any, x: Any, cand: Any, out: Any) -> int:
        """:func:`_rerank_apply` on one thread (inside a loop that is split across threads)."""
        proj = np.empty(A.shape[1], np.float32)  # [r]
        winner, top = cand[0], np.float32(-1.0)
        if cand.shape[0] > 1:
            for c in range(cand.shape[0]):
                _project(A, cand[c], x, proj)
                sq = np.sum(proj * proj)
                if sq > top:
                    top, winner = sq, cand[c]
        _project(A, winner, x, proj)
        _add_delta(B, winner, proj, out)
        return winner

    @njit(fastmath=True, cache=True, parallel=True)
    def _lag_scored_tokens(A: Any, B: Any, X: Any, scores: Any, k: int, out: Any, winners: Any) -> None:
        """Per token of a prompt, given its Arrow scores: top-k, SpectR among them, out += the winner's delta;
        tokens split across threads. X [T, n] f32, scores [T, N] f32 (|a*_i . x|), out [T, m] f32,
        winners [T]."""
        for t in prange(X.shape[0]):
            winners[t] = _rerank_serial(A, B, X[t], _topk(scores[t], k), out[t])

    @njit(fastmath=True, cache=True, parallel=True)
    def _mass_tokens(A: Any, X: Any, scores: Any, k: int, cand: Any, mass: Any) -> None:
        """Per token: its Arrow top-k candidates and their SpectR norms normalised to sum 1 (the token's score
        mass, see ``engine.sequence_scores``); tokens split across threads. X [T, n], scores [T, N],
        cand [T, k] (out), mass [T, k] f32 (out)."""
        for t in prange(X.shape[0]):
            rows = _topk(scores[t], k)
            proj = np.empty(A.shape[1], np.float32)  # [r]
            total = np.float32(0.0)
            for c in range(k):
                _project(A, rows[c], X[t], proj)
                norm = np.sqrt(np.sum(proj * proj))
                cand[t, c], mass[t, c] = rows[c], norm
                total += norm
            total = max(total, np.float32(1e-12))
            for c in range(k):
                mass[t, c] /= total

    @njit(fastmath=True, cache=True)
    def _lag_rows(protos: Any, A: Any, B: Any, X: Any, k: int, out: Any, winners: Any) -> None:
        """:func:`_lag_apply` for R tokens (rows of a decode batch), one after another (each scan is
        split across the cores). X [R, n] f32, out [R, m] f32, winners [R]."""
        for row in range(X.shape[0]):
            winners[row] = _lag_apply(protos, A, B, X[row], k, out[row])

    @njit(fastmath=True, cache=True, parallel=True)
    def _shortlist_rows(A: Any, B: Any, X: Any, C: Any, cand: Any, prior: Any, weight: float, out: Any,
                        winners: Any) -> None:
        """:func:`_shortlist_apply` for R tokens, rows split across threads. X [R, n], C [R, n], cand [R, M],
        prior [R, M], out [R, m], winners [R]."""
        for row in prange(X.shape[0]):
            winners[row] = _shortlist_apply(A, B, X[row], C[row], cand[row], prior[row], weight, out[row])


def lag_one(protos: np.ndarray, A: np.ndarray, B: np.ndarray, x: torch.Tensor,
            k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One token x [1, n], exact Arrow top-k -> SpectR -> apply: (delta [1, m] float32, winner [1])."""
    out = np.zeros((1, B.shape[1]), np.float32)
    _match_threads()
    winner = _lag_apply(protos, A, B, _vector(x), min(k, protos.shape[0]), out[0])
    return torch.from_numpy(out), torch.from_numpy(np.array([winner]))


def rerank_one(A: np.ndarray, B: np.ndarray, x: torch.Tensor,
               cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token x [1, n], given candidates cand [k] (e.g. from an approximate index): SpectR -> apply."""
    out = np.zeros((1, B.shape[1]), np.float32)
    _match_threads()
    winner = _rerank_apply(A, B, _vector(x), cand.numpy(), out[0])
    return torch.from_numpy(out), torch.from_numpy(np.array([winner]))


def add_rows(protos: np.ndarray, A: np.ndarray, B: np.ndarray, x: torch.Tensor, k: int,
             out: torch.Tensor) -> np.ndarray:
    """:func:`lag_one` for R tokens (the rows of a decode batch, one token each), adding each row's delta into
    ``out`` in place (the module's output): x [R, n], out [R, m] contiguous float32 CPU tensors without
    autograd. Returns the winners [R]; each row's as alone."""
    winners = np.empty(x.shape[0], np.int64)
    _match_threads()
    _lag_rows(protos, A, B, x.numpy(), min(k, protos.shape[0]), out.numpy(), winners)
    return winners


def add_shortlist_rows(A: np.ndarray, B: np.ndarray, x: torch.Tensor, centre: torch.Tensor | None,
                       cand: torch.Tensor, prior: torch.Tensor, weight: float,
                       out: torch.Tensor) -> np.ndarray:
    """Two-level routing's token level for R tokens (the rows of a decode batch, one token each; see
    :func:`..engine.route_shortlist`), each winner's delta added into ``out`` in place: x [R, n], out [R, m]
    contiguous float32 CPU tensors without autograd, centre [R, n] (None: score x itself), cand [R, M] each
    row's shortlisted adapters, prior [R, M] their log mass shares. Returns the winners [R]; each row's as
    alone."""
    xv = x.numpy()
    c = np.zeros_like(xv) if centre is None else centre.detach().float().contiguous().numpy()
    winners = np.empty(xv.shape[0], np.int64)
    _match_threads()
    _shortlist_rows(A, B, xv, c, cand.numpy().astype(np.int64, copy=False),
                    prior.detach().float().contiguous().numpy(), float(weight), out.numpy(), winners)
    return winners


def lag_scored_tokens(A: np.ndarray, B: np.ndarray, x: torch.Tensor, scores: torch.Tensor,
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt's T tokens x [T, n] (float32), given their Arrow scores [T, N] (float32): per token top-k ->
    SpectR -> apply. Returns (delta [T, m] float32, winners [T])."""
    out = np.zeros((x.shape[0], B.shape[1]), np.float32)
    winners = np.empty(x.shape[0], np.int64)
    _match_threads()
    _lag_scored_tokens(A, B, x.numpy(), scores.numpy(), min(k, scores.shape[1]), out, winners)
    return torch.from_numpy(out), torch.from_numpy(winners)


def mass_tokens(A: np.ndarray, x: torch.Tensor, scores: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's Arrow top-k candidates [T, k] and their SpectR norms normalised over them [T, k]: x [T, n]
    and scores [T, N] float32."""
    k = min(k, scores.shape[1])
    cand = np.empty((x.shape[0], k), np.int64)
    mass = np.empty((x.shape[0], k), np.float32)
    _match_threads()
    _mass_tokens(A, x.numpy(), scores.numpy(), k, cand, mass)
    return torch.from_numpy(cand), torch.from_numpy(mass)


def _vector(x: torch.Tensor) -> np.ndarray:
    """x [1, n] -> float32 [n] (a view when x is float32)."""
    return (x if x.dtype == torch.float32 else x.float()).numpy()[0]


def _match_threads() -> None:
    """Run on as many threads as torch does (``torch.set_num_threads``); numba's default is every core."""
    global _pool_pid
    _pool_pid = _pool_pid or os.getpid()
    want = torch.get_num_threads()
    if getattr(_threads, "torch", None) != want:
        numba.set_num_threads(min(want, numba.config.NUMBA_NUM_THREADS))
        _threads.torch = want
