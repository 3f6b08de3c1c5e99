"""Low-rank products over (token, adapter) pairs, vectorised.

``project_pairs``: A*_{idx[t,j]} x_t  for every token t and candidate j        -> [T, k, r]
``expand_pairs``:  sum_j w[t,j] B*_{idx[t,j]} v[t,j]                            -> [T, m]

Three strategies with the same result:

* ``gather``  copy the k candidates' matrices per token (T k r n): best when T k is small (decoding).
* ``dense``   one GEMM against all N adapters, then pick (T N r n flops): best when N is small.
* ``grouped`` sort the T k pairs by adapter and run one grouped GEMM (``torch.nn.functional.grouped_mm``):
  every pair costs r n, no per-token copies of A*. Best at prefill with many adapters (float32).

``auto`` picks by a cost estimate; all three are checked against each other in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("auto", "gather", "dense", "grouped")
_HAS_GROUPED = hasattr(F, "grouped_mm")


def project_all(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """A*_i x for all adapters: x [T, n], A [N, r, n] -> [T, N, r] (one GEMM)."""
    N, r, n = A.shape
    return (x @ A.reshape(N * r, n).T).view(x.shape[0], N, r)


def _grouped_ok(x: torch.Tensor, A: torch.Tensor) -> bool:
    # grouped_mm wants 16-byte aligned strides; its CPU kernel is fast for float32 only.
    return (_HAS_GROUPED and x.dtype == torch.float32 and A.dtype == torch.float32
            and (A.shape[-1] * 4) % 16 == 0 and (A.shape[1] * A.shape[-1] * 4) % 16 == 0)


def projection_costs(T: int, k: int, N: int, r: int, n: int, grouped_ok: bool) -> dict[str, float]:
    """Estimated milliseconds per strategy (fitted on a 2-core x86 CPU, float32; see BENCHMARKS.md).

    dense reads all N adapters and computes T N r n MACs; gather copies T k r n elements (slower per
    element once it spills out of cache); grouped copies T k n input rows and pays a small cost per adapter.
    """
    gathered = T * k * r * n
    costs = {
        "dense": N * r * n * (0.1 + 0.011 * T) * 1e-6,
        "gather": gathered * (0.5e-6 if gathered < (1 << 22) else 2e-6),
    }
    if grouped_ok:
        costs["grouped"] = 1.4e-3 * N + T * k * n * 1.5e-6
    return costs


def choose_projection(T: int, k: int, N: int, r: int, n: int, x: torch.Tensor, A: torch.Tensor) -> str:
    """Cheapest strategy for T tokens x k candidates among N adapters (rank r, in-features n)."""
    costs = projection_costs(T, k, N, r, n, _grouped_ok(x, A))
    return min(costs, key=costs.__getitem__)


def project_pairs(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, strategy: str = "auto") -> torch.Tensor:
    """A*_{idx[t, j]} x_t: x [T, n], A [N, r, n], idx [T, k] -> [T, k, r]."""
    T, k = idx.shape
    N, r, n = A.shape
    if strategy == "auto":
        strategy = choose_projection(T, k, N, r, n, x, A)
    if strategy == "grouped" and not _grouped_ok(x, A):
        strategy = "gather"
    if strategy == "gather":
        return torch.einsum("tkrn,tn->tkr", A[idx], x)
    if strategy == "dense":
        full = project_all(x, A)  # [T, N, r]
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
        return scattered.view(T, N * r) @ B.permute(0, 2, 1).reshape(N * r, m)
    if k == 1:
        return torch.bmm(B[idx[:, 0]], v[:, 0, :, None]).squeeze(-1)  # [T, m]
    return torch.einsum("tkmr,tkr->tm", B[idx], v)
