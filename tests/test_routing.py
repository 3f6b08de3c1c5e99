"""Routing math (pure tensor functions) against direct loop / SVD references."""

from __future__ import annotations

import pytest
import torch

from llama_index_lag.library.align import spectral_align
from llama_index_lag.routing.dispatch import expand_pairs, project_pairs
from llama_index_lag.routing.engine import PoolTensors, route_tokens, sequence_scores
from llama_index_lag.routing.scores import arrow_select, lag_select, spectr_select


def _aligned(N: int = 7, r: int = 4, n: int = 32, m: int = 24, seed: int = 0) -> PoolTensors:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, r, n, generator=g)
    B = torch.randn(N, m, r, generator=g)
    a_star, b_star, _ = spectral_align(A, B, torch.full((N,), 2.0))
    return PoolTensors(a_star[:, 0].float().contiguous(), a_star.float().contiguous(),
                       b_star.float().contiguous())


def test_spectral_align_matches_dense_svd() -> None:
    g = torch.Generator().manual_seed(0)
    N, r, n, m = 5, 6, 40, 30
    A, B = torch.randn(N, r, n, generator=g), torch.randn(N, m, r, generator=g)
    ranks = torch.tensor([6, 6, 3, 1, 4])
    A[2, 3:], B[2, :, 3:] = 0, 0
    A[3, 1:], B[3, :, 1:] = 0, 0
    A[4, 4:], B[4, :, 4:] = 0, 0
    scaling = torch.tensor([2.0, 0.5, 1.0, 3.0, 1 / 2**0.5])
    a_star, b_star, s = spectral_align(A, B, scaling, ranks)
    for i in range(N):
        dense = scaling[i].double() * B[i].double() @ A[i].double()  # [m, n]
        assert torch.allclose(b_star[i] @ a_star[i], dense, atol=1e-10)
        _, sv, vh = torch.linalg.svd(dense)
        assert torch.allclose(s[i, : ranks[i]], sv[: ranks[i]], atol=1e-10)
        assert abs(float(a_star[i, 0] @ vh[0])) == pytest.approx(1.0, abs=1e-10)  # prototype, sign aside
        rr = int(ranks[i])
        assert torch.allclose(a_star[i, :rr] @ a_star[i, :rr].T, torch.eye(rr, dtype=torch.float64),
                              atol=1e-10)
        assert a_star[i, rr:].abs().max() == 0 if rr < r else True


def test_spectral_align_with_tiny_and_near_equal_singular_values() -> None:
    """A spectrum spanning 1e-7 with a near-tie at its small end, and an exactly rank-deficient delta: the
    factors still reproduce the delta, A* rows stay orthonormal, S and the prototype match a dense SVD."""
    g = torch.Generator().manual_seed(3)
    N, r, n, m = 4, 6, 50, 40
    A = torch.linalg.qr(torch.randn(N, n, r, generator=g, dtype=torch.float64)).Q.transpose(1, 2)  # [N, r, n]
    spectrum = torch.tensor([1.0, 0.3, 1e-3, 1e-5, 1.000001e-7, 1e-7], dtype=torch.float64)
    B = torch.linalg.qr(torch.randn(N, m, r, generator=g, dtype=torch.float64)).Q * spectrum
    B[3, :, 2:] = 0  # rank 2
    a_star, b_star, s = spectral_align(A, B, torch.full((N,), 1.5))
    for i in range(N):
        dense = 1.5 * B[i] @ A[i]
        assert torch.allclose(b_star[i] @ a_star[i], dense, atol=1e-14)
        assert torch.allclose(a_star[i] @ a_star[i].T, torch.eye(r, dtype=torch.float64), atol=1e-12)
        _, sv, vh = torch.linalg.svd(dense)
        assert torch.allclose(s[i], sv[:r], atol=1e-14)
        assert abs(float(a_star[i, 0] @ vh[0])) == pytest.approx(1.0, abs=1e-12)
        pivot = a_star[i].abs().argmax(dim=-1, keepdim=True)  # canonical signs: the largest entry positive
        assert bool((a_star[i].gather(-1, pivot) > 0).all())


def test_spectral_align_in_float32_matches_float64() -> None:
    g = torch.Generator().manual_seed(1)
    N, r, n, m = 6, 6, 96, 80
    A = torch.randn(N, r, n, generator=g) * 0.05
    B = torch.randn(N, m, r, generator=g) * torch.logspace(0, -3, r)  # decaying spectrum, cond ~1e3
    scaling = torch.full((N,), 2.0)
    a64, b64, s64 = spectral_align(A, B, scaling)
    a32, b32, s32 = spectral_align(A, B, scaling, dtype=torch.float32)
    assert a32.dtype == b32.dtype == torch.float32
    dense = scaling[:, None, None].double() * B.double() @ A.double()
    err = (b32.double() @ a32.double() - dense).abs().amax(dim=(1, 2)) / dense.abs().amax(dim=(1, 2))
    assert float(err.max()) < 1e-5
    assert torch.allclose(s32.double(), s64, rtol=1e-5)
    assert torch.allclose(a32[:, 0].double(), a64[:, 0], atol=1e-5)  # prototypes, same canonical sign


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,k", [(1, 3), (5, 2), (40, 4)])
def test_dispatch_strategies_agree_with_loop(T: int, k: int, dtype: torch.dtype, grad: bool) -> None:
    g = torch.Generator().manual_seed(T)
    N, r, n, m = 9, 4, 32, 24
    A, B = torch.randn(N, r, n, generator=g).to(dtype), torch.randn(N, m, r, generator=g).to(dtype)
    x = torch.randn(T, n, generator=g).to(dtype)
    idx = torch.randint(0, N, (T, k), generator=g)
    w = torch.rand(T, k, generator=g).to(dtype)
    ref_p = torch.stack([torch.stack([A[idx[t, j]].float() @ x[t].float() for j in range(k)])
                         for t in range(T)])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.3, rtol=0.05)
    v = ref_p.to(dtype)
    ref_e = torch.stack([sum(w[t, j].float() * (B[idx[t, j]].float() @ v[t, j].float()) for j in range(k))
                         for t in range(T)])
    with torch.set_grad_enabled(grad):
        results = {s: project_pairs(x, A, idx, s)
                   for s in ("gather", "dense", "union", "grouped", "bucketed", "auto")}
        expanded = {s: expand_pairs(v, B, idx, w, s) for s in ("gather", "dense", "auto")}
    for strategy, out in results.items():
        assert out.dtype == dtype and torch.allclose(out.float(), ref_p, **tol), strategy
    for strategy, out in expanded.items():
        assert out.dtype == dtype and torch.allclose(out.float(), ref_e, **tol), strategy


def test_bucketed_batches_match_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Uneven pair counts per adapter (one adapter in every token's candidates) and many BMM batches
    (BUCKET_PAIRS tiny): every pair still gets its own adapter's product."""
    from llama_index_lag.routing import dispatch

    monkeypatch.setattr(dispatch, "BUCKET_PAIRS", 3)
    g = torch.Generator().manual_seed(11)
    N, r, n, T, k = 7, 3, 16, 30, 4
    A, x = torch.randn(N, r, n, generator=g), torch.randn(T, n, generator=g)
    idx = torch.randint(1, N, (T, k), generator=g)
    idx[:, 0] = 0  # adapter 0: T pairs, split over several batches
    ref = torch.stack([torch.stack([A[idx[t, j]] @ x[t] for j in range(k)]) for t in range(T)])
    assert torch.allclose(project_pairs(x, A, idx, "bucketed"), ref, atol=1e-5)


def test_arrow_spectr_lag_select_against_loops() -> None:
    t = _aligned()
    x = torch.randn(11, 32, generator=torch.Generator().manual_seed(3))
    N = t.n_adapters
    for i in range(x.shape[0]):
        arrow = torch.tensor([abs(float(t.protos[a] @ x[i])) for a in range(N)])
        norms = torch.tensor([float((t.A[a] @ x[i]).norm()) for a in range(N)])
        idx, w = arrow_select(x, t.protos, top_k=3, temperature=0.5)
        assert idx[i].tolist() == torch.argsort(arrow, descending=True)[:3].tolist()
        assert torch.allclose(w[i], torch.softmax(arrow[idx[i]] / 0.5, 0), atol=1e-6)
        s_idx, s_proj = spectr_select(x, t.A)
        assert int(s_idx[i, 0]) == int(norms.argmax())
        assert torch.allclose(s_proj[i, 0], t.A[int(norms.argmax())] @ x[i], atol=1e-5)
        for k in (1, 3, N):
            winner, proj, _ = lag_select(x, t.protos, t.A, k)
            cands = torch.argsort(arrow, descending=True)[:k]
            expected = int(cands[norms[cands].argmax()])
            assert int(winner[i]) == expected
            assert torch.allclose(proj[i], t.A[expected] @ x[i], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_token_decode_path_against_loop(dtype: torch.dtype) -> None:
    """route_tokens on one token (the decode fast path: Python-int indices, library views) equals a loop
    over dense deltas, and the batched path on the same tokens."""
    t32 = _aligned(N=12)
    t = PoolTensors(t32.protos.to(dtype), t32.A.to(dtype), t32.B.to(dtype))
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4))
    P, A, B = t.protos.float(), t.A.float(), t.B.float()
    loose = dict(atol=1e-4) if dtype == torch.float32 else dict(atol=0.2, rtol=1e-2)  # dense GEMMs in float16
    for mode, k in (("lag", 5), ("lag", 1), ("arrow", 1)):
        batched = route_tokens(x, t, mode, k=k)
        for i in range(x.shape[0]):
            with torch.no_grad():  # the fast path is for inference
                one = route_tokens(x[i:i + 1], t, mode, k=k)
            arrow = torch.tensor([abs(float(P[a] @ x[i])) for a in range(12)])
            cands = torch.argsort(arrow, descending=True)[:k]
            norms = torch.tensor([float((A[a] @ x[i]).norm()) for a in cands])
            w = int(cands[norms.argmax()])
            assert int(one.chosen[0]) == int(batched.chosen[i]) == w, (mode, k, i)
            expected = B[w] @ (A[w] @ x[i])  # the winner's dense delta
            assert torch.allclose(one.delta[0], expected, atol=1e-4, rtol=1e-5), (mode, k, i)
            assert torch.allclose(one.delta[0], batched.delta[i], **loose), (mode, k, i)


def test_lag_limits_are_arrow_and_spectr() -> None:
    t = _aligned(N=8)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    d_lag1, c_lag1, _ = route_tokens(x, t, "lag", k=1)
    d_arrow, c_arrow, _ = route_tokens(x, t, "arrow")
    assert torch.equal(c_lag1, c_arrow) and torch.allclose(d_lag1, d_arrow, atol=1e-6)
    d_lagn, c_lagn, _ = route_tokens(x, t, "lag", k=100)  # clamped to N
    d_spectr, c_spectr, _ = route_tokens(x, t, "spectr")
    assert torch.equal(c_lagn, c_spectr) and torch.allclose(d_lagn, d_spectr, atol=1e-5)


def test_invalid_adapters_never_chosen() -> None:
    t = _aligned(N=5)
    valid = torch.tensor([False, True, False, True, True])
    masked = PoolTensors(t.protos, t.A, t.B, valid)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(6))
    for mode in ("arrow", "spectr", "lag"):
        chosen = route_tokens(x, masked, mode, k=2).chosen
        assert valid[chosen].all(), mode


def test_spectr_merge_is_mean_of_factors() -> None:
    t = _aligned(N=6)
    x = torch.randn(9, 32, generator=torch.Generator().manual_seed(8))
    delta = route_tokens(x, t, "spectr", spectr_top_k=3).delta
    for i in range(x.shape[0]):
        norms = torch.stack([(t.A[a] @ x[i]).norm() for a in range(6)])
        top = torch.argsort(norms, descending=True)[:3]
        expected = t.B[top].mean(0) @ (t.A[top].mean(0) @ x[i])
        assert torch.allclose(delta[i], expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["arrow", "spectr", "lag"])
@pytest.mark.parametrize("how", ["mass", "vote"])
def test_sequence_scores_against_loop(mode: str, how: str) -> None:
    t = _aligned(N=6)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 32, generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    totals = sequence_scores(x, mask, t, mode, how, k=3)
    expected = torch.zeros(2, 6)
    for b in range(2):
        for s in range(7):
            if not mask[b, s]:
                continue
            xt = x[b, s]
            arrow = torch.stack([(t.protos[a] @ xt).abs() for a in range(6)])
            norms = torch.stack([(t.A[a] @ xt).norm() for a in range(6)])
            if how == "vote":
                chosen = route_tokens(xt[None], t, mode, k=3).chosen
                expected[b, int(chosen)] += 1
                continue
            if mode == "spectr":
                expected[b] += norms / norms.sum()
            elif mode == "arrow":
                expected[b] += arrow / arrow.sum()
            else:
                cands = torch.argsort(arrow, descending=True)[:3]
                expected[b, cands] += norms[cands] / norms[cands].sum()
    assert torch.allclose(totals, expected, atol=1e-5)


def test_dynamic_k_margin_against_loop() -> None:
    t = _aligned(N=8)
    x = torch.randn(30, 32, generator=torch.Generator().manual_seed(11))
    winner, _, kept = lag_select(x, t.protos, t.A, k=5, margin=0.8)
    for i in range(x.shape[0]):
        arrow = torch.stack([(t.protos[a] @ x[i]).abs() for a in range(8)])
        norms = torch.stack([(t.A[a] @ x[i]).norm() for a in range(8)])
        top = torch.argsort(arrow, descending=True)[:5]
        cands = top[arrow[top] >= 0.8 * arrow[top[0]]]
        assert int(kept[i]) == len(cands)
        assert int(winner[i]) == int(cands[norms[cands].argmax()])
    assert 1 <= float(kept.float().mean()) < 5
    full, _, none = lag_select(x, t.protos, t.A, k=5)
    assert none is None and torch.equal(lag_select(x, t.protos, t.A, k=5, margin=1e-9)[0], full)


def test_auto_dispatch_choices_follow_the_shape_of_the_work():
    from llama_index_lag.routing.dispatch import projection_costs

    def pick(T: int, N: int, unique: int | None, grouped: bool = True, half: bool = False) -> str:
        costs = projection_costs(T, 20, N, 6, 1536, grouped, unique, half)
        return min(costs, key=costs.__getitem__)

    assert pick(1, 1000, None) == "gather"  # decoding: copy the 20 candidates, never scan all N
    # long prompt over a large library: no per-token copies of A*, no GEMM per adapter
    assert pick(256, 1000, 1000) == "bucketed"
    assert pick(256, 1000, 1000, grouped=False, half=True) == "bucketed"
    assert pick(256, 100, 50) == "union"  # long prompt over few distinct adapters: one GEMM over those
    assert pick(32, 1000, 300, grouped=False, half=True) == "union"  # short prompt sharing candidates
    assert pick(64, 20, 20) in ("dense", "union")  # tiny library: one GEMM over all of it
