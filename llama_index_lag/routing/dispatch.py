"""Low-rank products over (token, adapter) pairs, vectorised.

``project_pairs``: A*_{idx[t,j]} x_t  for every token t and candidate j        -> [T, k, r]
``expand_pairs``:  sum_j w[t,j] B*_{idx[t,j]} v[t,j]                            -> [T, m]

Five strategies with the same result:

* ``gather``  copy the k candidates' matrices per token (T k r n): best when T k is small (decoding).
* ``dense``   one GEMM against all N adapters, then pick (T N r n flops): best when N is small.
* ``union``   copy the U distinct candidates of all tokens once, one GEMM against those (T U r n flops):
  best for short prompts, whose tokens share many candidates.
* ``grouped`` sort the T k pairs by adapter and run one grouped GEMM (``torch.nn.functional.grouped_mm``):
  every pair costs r n, no per-token copies of A*. Its CPU kernel runs one small GEMM per adapter.
* ``bucketed`` sort the pairs by adapter, batch the adapters that have the same number of pairs, and run one
  BMM per batch: copies each pair's token (n) and each used adapter once (r n), never an adapter per pair,
  and runs a few dozen BMMs instead of one GEMM per adapter. Best at prefill with many adapters, any dtype.

``auto`` picks by a cost estimate; all five are checked against each other in the tests.

Dtypes: the library may be stored in half precision. GEMMs over all N adapters run in the library's dtype
(the activations are cast, not the adapters); gathered candidates are cast to float32 (small half-precision
matmuls are slow on CPUs); results come back in the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STRATEGIES = ("auto", "gather", "dense", "union", "grouped", "bucketed")
_HAS_GROUPED = hasattr(F, "grouped_mm")
BUCKET_PAIRS = 256  # bucketed: pairs per BMM (keeps each batch's copies within the caches)


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along dim 0, in float32 (small half-precision matmuls are several times slower than float32
    ones on CPUs): src [N, ...], idx [P] -> [P, ...]."""
    return src.index_select(0, idx).float()


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
    candidates once, then is dense over those; grouped pays a small cost per adapter and per pair element;
    bucketed copies each pair's token and each used adapter once and pays a fixed cost per BMM.
    """
    gathered = T * k * r * n
    costs = {
        "dense": N * r * n * (9e-8 + 9e-9 * T),
        "gather": gathered * ((5e-7 if half else 3.5e-7) if gathered <= (1 << 23) else 1.5e-6),
    }
    if unique is not None:
        costs["union"] = 0.03 + unique * r * n * (1.5e-7 + 1e-8 * T)
    if grouped_ok:
        costs["grouped"] = 1.45e-3 * N + T * k * n * 1.8e-6
    batches = T * k / BUCKET_PAIRS + min(T, 10)  # BMMs: batches of pairs plus distinct pair counts
    used = min(N, T * k) if unique is None else unique
    costs["bucketed"] = 0.05 + 0.05 * batches + T * k * n * 9e-7 + used * r * n * 3e-7
    return costs


def choose_strategy(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor, unique: int | None) -> str:
    """What ``auto`` runs for x [T, n], A [N, r, n], idx [T, k] with ``unique`` distinct candidates (None:
    not counted, as for one token): the cheapest strategy by :func:`projection_costs`."""
    (T, k), (N, r, n) = idx.shape, A.shape
    costs = projection_costs(T, k, N, r, n, _grouped_ok(x, A), unique, half=A.element_size() < 4)
    return min(costs, key=costs.__getitem__)


def project_pairs(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor,
                  strategy: str = "auto") -> torch.Tensor:
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
        sel = gather_rows(A, idx.reshape(-1)).view(T, k * r, n)  # [T, k r, n] float32
        return torch.bmm(sel, x.float()[:, :, None]).view(T, k, r).to(x.dtype)
    if strategy in ("dense", "union"):
        if strategy == "union":
            A, idx = gather_rows(A, used), inverse  # [U, r, n] float32
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
    if strategy == "bucketed":
        return _bucketed(x, A, idx)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def _bucketed(x: torch.Tensor, A: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """project_pairs by adapter buckets: x [T, n], A [N, r, n], idx [T, k] -> [T, k, r].

    The loop runs over the distinct pair counts per adapter and over batches of ~BUCKET_PAIRS pairs (a few
    dozen BMMs for a 256-token prompt), never over tokens or single adapters.
    """
    T, k = idx.shape
    N, r, n = A.shape
    flat = idx.reshape(-1)  # [P] adapter of each (token, candidate) pair
    order = flat.argsort(stable=True)  # [P] pairs sorted by adapter
    counts = torch.bincount(flat, minlength=N)  # [N] pairs per adapter
    starts = counts.cumsum(0) - counts  # [N] each adapter's first position in ``order``
    xf = x.float()
    out = xf.new_empty(T * k, r)
    for c in counts.unique().tolist():
        if c == 0:
            continue
        adapters = (counts == c).nonzero()[:, 0]  # [G] adapters with c pairs each
        step = max(1, BUCKET_PAIRS // c)
        for s in range(0, adapters.numel(), step):
            ads = adapters[s:s + step]  # [g]
            pairs = order[starts[ads, None] + torch.arange(c, device=idx.device)]  # [g, c]
            xs = xf.index_select(0, (pairs // k).reshape(-1)).view(-1, c, n)  # [g, c, n] their tokens
            As = A.index_select(0, ads).float()  # [g, r, n]
            out[pairs.reshape(-1)] = torch.bmm(xs, As.transpose(1, 2)).reshape(-1, r)  # [g c, r]
    return out.view(T, k, r).to(x.dtype)


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
    sel = gather_rows(B, idx.reshape(-1))  # [T k, m, r] float32
    out = torch.bmm(sel, v.reshape(T * k, r, 1).float()).view(T, k, m)  # [T, k, m]
    return (out[:, 0] if k == 1 else out.sum(dim=1)).to(v.dtype)
