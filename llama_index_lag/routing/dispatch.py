"""Low-rank products over (token, adapter) pairs, vectorised.

``project_pairs``: A*_{idx[t,j]} x_t  for every token t and candidate j        -> [T, k, r]
``expand_pairs``:  sum_j w[t,j] B*_{idx[t,j]} v[t,j]                            -> [T, m]

Four strategies with the same result:

* ``gather``  copy the k candidates' matrices per token (T k r n): best when T k is small (decoding).
* ``dense``   one GEMM against all N adapters, then pick (T N r n flops): best when N is small.
* ``union``   copy the U distinct candidates of all tokens once, one GEMM against those (T U r n flops):
  best for short prompts, whose tokens share many candidates.
* ``grouped`` sort the T k pairs by adapter and run one grouped GEMM (``torch.nn.functional.grouped_mm``):
  every pair costs r n, no per-token copies of A*. Best at prefill with many adapters (float32).

``auto`` picks by a cost estimate; all four are checked against each other in the tests.

Dtypes: the library may be stored in half precision. GEMMs over all N adapters run in the library's dtype
(the activations are cast, not the adapters); gathered candidates are cast to float32 (small half-precision
matmuls are slow on CPUs); results come back in the activations' dtype.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

STRATEGIES = ("auto", "gather", "dense", "union", "grouped")
_HAS_GROUPED = hasattr(F, "grouped_mm")
WORKSPACE_MAX = 1 << 21  # elements: gathers up to this size reuse a per-thread buffer (decoding)
_workspace = threading.local()


def gather_rows(src: torch.Tensor, idx: torch.Tensor, slot: str) -> torch.Tensor:
    """src[idx] along dim 0, in float32: src [N, ...], idx [P] -> [P, ...].

    float32 because small half-precision matmuls are several times slower than float32 ones on CPUs. Small
    gathers (every decode step gathers the same sizes) go to a per-thread buffer that is reused: a fresh
    allocation of a few hundred KB is mapped anew by the C allocator and page-faults on every step, which
    costs more than the copy. The result aliases that buffer until the next gather into ``slot`` from this
    thread, so it must be consumed at once; with autograd recording, nothing is shared.
    """
    shape = (idx.numel(), *src.shape[1:])
    size = math.prod(shape)
    if size > WORKSPACE_MAX or torch.is_grad_enabled():
        return src.index_select(0, idx).float()
    rows = torch.index_select(src, 0, idx, out=_buffer(slot, src.dtype, src.device, size).view(shape))
    if src.dtype == torch.float32:
        return rows
    return _buffer(slot, torch.float32, src.device, size).view(shape).copy_(rows)


def _buffer(slot: str, dtype: torch.dtype, device: torch.device, size: int) -> torch.Tensor:
    bufs = getattr(_workspace, "bufs", None)
    if bufs is None:
        bufs = _workspace.bufs = {}
    buf = bufs.get((slot, dtype, device))
    if buf is None or buf.numel() < size:
        buf = bufs[(slot, dtype, device)] = torch.empty(max(size, 1 << 16), dtype=dtype, device=device)
    return buf[:size]


def project_all(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A*_i x for all adapters: x [T, n], A [N, r, n] -> [T, N, r] (one GEMM in A's dtype; result in x's)."""
    N, r, n = A.shape
    return (x.to(A.dtype) @ A.reshape(N * r, n).T).view(x.shape[0], N, r).to(x.dtype)


def _grouped_ok(x: torch.Tensor, A: torch.Tensor) -> bool:
    # grouped_mm wants 16-byte aligned strides; its CPU kernel is fast for float32 only.
    return (_HAS_GROUPED and x.device.type == "cpu" and x.dtype == torch.float32 and A.dtype == torch.float32
            and (A.shape[-1] * 4) % 16 == 0 and (A.shape[1] * A.shape[-1] * 4) % 16 == 0)


def projection_costs(T: int, k: int, N: int, r: int, n: int, grouped_ok: bool,
                     unique: int | None = None, half: bool = False) -> dict[str, float]:
    """Estimated milliseconds per strategy (fitted on a 2-core x86 CPU; see BENCHMARKS.md).

    dense reads all N adapters and computes T N r n MACs; gather copies T k r n elements (slower per element
    from half precision, and much slower once the copy outgrows the caches); union copies the ``unique``
    candidates once, then is dense over those; grouped pays a small cost per adapter and per pair element.
    """
    gathered = T * k * r * n
    costs = {
        "dense": N * r * n * (9e-8 + 9e-9 * T),
        "gather": gathered * ((5e-7 if half else 3.5e-7) if gathered <= (1 << 23) else 1.5e-6),
    }
    if unique is not None:
        costs["union"] = 0.03 + unique * r * n * (1.5e-7 + 1e-8 * T)
    if grouped_ok:
        costs["grouped"] = 1.45e-3 * N + T * k * n * 8.8e-7
    return costs


def choose_strategy(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, unique: int | None) -> str:
    """What ``auto`` runs for x [T, n], A [N, r, n], idx [T, k] with ``unique`` distinct candidates (None:
    not counted, as for one token): the cheapest strategy by :func:`projection_costs`."""
    (T, k), (N, r, n) = idx.shape, A.shape
    costs = projection_costs(T, k, N, r, n, _grouped_ok(x, A), unique, half=A.element_size() < 4)
    return min(costs, key=costs.__getitem__)


def project_pairs(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, strategy: str = "auto") -> torch.Tensor:
    """A*_{idx[t, j]} x_t: x [T, n], A [N, r, n], idx [T, k] -> [T, k, r]."""
    T, k = idx.shape
    N, r, n = A.shape
    used = inverse = None
    if strategy == "union" or (strategy == "auto" and T > 1):
        used, inverse = torch.unique(idx, return_inverse=True)  # [U] adapters, [T, k] their positions in used
    if strategy == "auto":
        strategy = choose_strategy(x, A, idx, None if used is None else used.numel())
    if strategy == "grouped" and not _grouped_ok(x, A):
        strategy = "gather"
    if strategy == "gather":
        sel = gather_rows(A, idx.reshape(-1), "A").view(T, k * r, n)  # [T, k r, n] float32
        return torch.bmm(sel, x.float()[:, :, None]).view(T, k, r).to(x.dtype)
    if strategy in ("dense", "union"):
        if strategy == "union":
            A, idx = gather_rows(A, used, "A"), inverse  # [U, r, n] float32
        full = project_all(x, A)  # [T, N or U, r]
        return full.gather(1, idx[..., None].expand(-1, -1, r))
    if strategy == "grouped":
        flat = idx.reshape(-1)  # [T k]
        order = flat.argsort()  # pairs sorted by adapter
        offs = torch.bincount(flat, minlength=N).cumsum(0).to(torch.int32)  # [N] group ends
        out = F.grouped_mm(x[order // k], A.transpose(1, 2), offs=offs)  # [T k, r]
        result = torch.empty_like(out)
        result[order] = out
        return result.view(T, k, r)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def expand_pairs(
    v: torch.Tensor, B: torch.Tensor, idx: torch.Tensor, w: torch.Tensor | None = None, strategy: str = "auto"
) -> torch.Tensor:
    """sum_j w[t, j] B*_{idx[t, j]} v[t, j]: v [T, k, r], B [N, m, r], idx [T, k], w [T, k] -> [T, m]."""
    T, k, r = v.shape
    N, m, _ = B.shape
    if w is not None:
        v = v * w[..., None].to(v.dtype)
    if strategy == "auto":
        strategy = "dense" if N <= 16 and T * k >= 4 * N else "gather"
    if strategy == "dense":
        scattered = v.new_zeros(T, N, r).scatter_add_(1, idx[..., None].expand(-1, -1, r), v)  # [T, N, r]
        return (scattered.view(T, N * r).to(B.dtype) @ B.permute(0, 2, 1).reshape(N * r, m)).to(v.dtype)
    sel = gather_rows(B, idx.reshape(-1), "B")  # [T k, m, r] float32
    out = torch.bmm(sel, v.reshape(T * k, r, 1).float()).view(T, k, m)  # [T, k, m]
    return (out[:, 0] if k == 1 else out.sum(dim=1)).to(v.dtype)
