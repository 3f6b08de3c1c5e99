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


def add_one(protos: np.ndarray, A: np.ndarray, B: np.ndarray, x: torch.Tensor, k: int,
            out: torch.Tensor) -> int:
    """:func:`lag_one` adding the delta into ``out`` in place (the module's output): one float32 token,
    x [..., n] and out [..., m] contiguous CPU tensors without autograd. Returns the winner."""
    _match_threads()
    return _lag_apply(protos, A, B, x.numpy().reshape(-1), min(k, protos.shape[0]), out.numpy().reshape(-1))


def add_shortlist_one(A: np.ndarray, B: np.ndarray, x: torch.Tensor, centre: torch.Tensor | None,
                      cand: torch.Tensor, prior: torch.Tensor, weight: float, out: torch.Tensor) -> int:
    """Two-level routing's token level for one float32 token, adding the winner's delta into ``out`` in place
    (see :func:`..engine.route_shortlist`): x [..., n], out [..., m] contiguous CPU tensors without autograd,
    centre [n] (None: score x itself), cand [M] shortlisted rows, prior [M] their log mass shares. Returns the
    winner."""
    xv = x.numpy().reshape(-1)
    c = np.zeros_like(xv) if centre is None else centre.detach().float().contiguous().numpy().reshape(-1)
    return _shortlist_apply(A, B, xv, c, cand.numpy().astype(np.int64, copy=False),
                            prior.detach().float().numpy(), float(weight), out.numpy().reshape(-1))


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
