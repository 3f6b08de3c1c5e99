"""The fused one-token decode kernels against a float64 loop over the library's own values, and against the
PyTorch ops they replace."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
from llama_index_lag.errors import ConfigError
from llama_index_lag.library.align import spectral_align
from llama_index_lag.routing import kernels
from llama_index_lag.routing.engine import PoolTensors, route_tokens

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _library(dtype: torch.dtype, N: int = 40, r: int = 5, n: int = 96, m: int = 72,
             seed: int = 0) -> PoolTensors:
    """Aligned random adapters with mixed ranks (zero-padded to r) and a decaying spectrum."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, r, n, generator=g)
    B = torch.randn(N, m, r, generator=g) * torch.logspace(0, -1, r)
    ranks = torch.randint(1, r + 1, (N,), generator=g)
    keep = torch.arange(r) < ranks[:, None]  # [N, r]
    A, B = A * keep[:, :, None], B * keep[:, None, :]
    a_star, b_star, _ = spectral_align(A, B, torch.full((N,), 2.0), ranks)
    return PoolTensors(a_star[:, 0].contiguous().to(dtype), a_star.contiguous().to(dtype),
                       b_star.contiguous().to(dtype))


def _loop(x: torch.Tensor, t: PoolTensors, mode: str, k: int) -> tuple[int, torch.Tensor]:
    """The routing of one token x [n] in float64, adapter by adapter: (winner, delta [m])."""
    P, A, B, xd = t.protos.double(), t.A.double(), t.B.double(), x.double()
    N = P.shape[0]
    arrow = [abs(float(P[i] @ xd)) for i in range(N)]
    cands = sorted(range(N), key=lambda i: -arrow[i])[: min(k, N)] if mode != "spectr" else list(range(N))
    if mode == "arrow":
        cands = cands[:1]
    w = max(cands, key=lambda i: float((A[i] @ xd).norm()))
    return w, B[w] @ (A[w] @ xd)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records which fused kernel ran, so a test cannot pass on the PyTorch fallback."""
    calls: list[str] = []
    for name in ("lag_one", "rerank_one", "add_rows", "add_shortlist_rows"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_decode_matches_float64_loop(dtype: torch.dtype, spy: list[str]) -> None:
    t = _library(dtype)
    g = torch.Generator().manual_seed(1)
    for trial in range(30):
        x = torch.randn(1, 96, generator=g) * (10.0 ** (trial % 3 - 1))
        for mode, k in (("lag", 1), ("lag", 5), ("lag", 20), ("lag", 100), ("arrow", 1), ("spectr", 1)):
            with torch.no_grad():
                out = route_tokens(x, t, mode, k=k)
            w, delta = _loop(x[0], t, mode, k)
            assert int(out.chosen[0]) == w, (dtype, mode, k, trial)
            assert out.delta.shape == (1, 72) and out.delta.dtype == torch.float32
            scale = float(delta.abs().max())
            assert torch.allclose(out.delta[0].double(), delta,
                                  atol=1e-5 * scale, rtol=1e-5), (dtype, mode, k)
    assert spy.count("lag_one") == 30 * 5 and spy.count("rerank_one") == 30  # spectr reranks all N


def test_fused_and_torch_paths_agree() -> None:
    t = _library(torch.float32, N=300, n=64, m=48)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for mode, k in (("lag", 20), ("arrow", 1), ("spectr", 1)):
            for i in range(x.shape[0]):
                fused = route_tokens(x[i:i + 1], t, mode, k=k)
                ops = route_tokens(x[i:i + 1], t, mode, k=k, kernel="torch")
                assert torch.equal(fused.chosen, ops.chosen), (mode, i)
                assert torch.allclose(fused.delta, ops.delta, atol=1e-4, rtol=1e-5), (mode, i)


def test_rerank_of_given_candidates_matches_loop() -> None:
    """The approximate-Arrow decode path: SpectR among an index's candidates, then apply."""
    t = _library(torch.float16)
    _, A, B = t.bits
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        x = torch.randn(1, 96, generator=g)
        cand = torch.randperm(40, generator=g)[:7]
        delta, winner = kernels.rerank_one(A, B, x, cand)
        norms = torch.stack([(t.A[c].double() @ x[0].double()).norm() for c in cand])
        w = int(cand[norms.argmax()])
        assert int(winner[0]) == w
        expected = t.B[w].double() @ (t.A[w].double() @ x[0].double())
        assert torch.allclose(delta[0].double(), expected, atol=1e-4)


def test_bfloat16_tokens_and_unsupported_tensors() -> None:
    t = _library(torch.bfloat16)
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        out = route_tokens(x, t, "lag", k=5)
    assert out.delta.dtype == torch.bfloat16 and int(out.chosen[0]) == _loop(x[0].float(), t, "lag", 5)[0]
    assert kernels.as_bits(torch.zeros(3, 4).T) is None  # not contiguous
    assert kernels.as_bits(torch.zeros(3, dtype=torch.float64)) is None
    strided = PoolTensors(t.protos, t.A.transpose(1, 2).contiguous().transpose(1, 2), t.B)  # a strided A*
    assert strided.bits is None
    with torch.no_grad():  # falls back to the PyTorch ops, same routing
        assert torch.equal(route_tokens(x, strided, "lag", k=5).chosen, out.chosen)


def test_generation_with_fused_kernels_equals_pytorch_ops(tiny_model, knowledge_dirs, spy) -> None:
    lib = AdapterLibrary.compile(knowledge_dirs, kind="knowledge", base_model=tiny_model,
                                 out=knowledge_dirs[0].parent / "lib")
    router = attach_lag(tiny_model, lib, LAGConfig(mode="lag", k=2))
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(6))
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        fused = tiny_model.generate(ids, **kw)
        # every decode step, every adapted module, added into the module's output in place
        assert spy == ["add_rows"] * 9 * len(lib.modules)
        router.set(decode_kernel="torch")
        ops = tiny_model.generate(ids, **kw)
    assert len(spy) == 9 * len(lib.modules) and torch.equal(fused, ops)
    with pytest.raises(ConfigError, match="decode_kernel"):
        LAGConfig(decode_kernel="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["lag", "arrow"])
def test_in_place_decoding_equals_the_general_path(tiny_model, knowledge_dirs, spy, mode) -> None:
    """The decode fast path adds the delta into the module's output; the general path (taken under a
    trace) returns it and adds it. Same logits bit for bit, and the fast path only where it applies (not
    for two tokens, nor with autograd on)."""
    lib = AdapterLibrary.compile(knowledge_dirs, kind="knowledge", base_model=tiny_model,
                                 out=knowledge_dirs[0].parent / "lib")
    router = attach_lag(tiny_model, lib, LAGConfig(mode=mode, k=3))
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        past = tiny_model(ids[:, :5], use_cache=True).past_key_values
        step = [tiny_model(ids[:, 5:], past_key_values=copy.deepcopy(past)).logits for _ in range(2)]
        assert spy == ["add_rows"] * 2 * len(lib.modules)
        spy.clear()
        with router.using(libraries=("knowledge",)):  # the same routing, through the general path
            general = tiny_model(ids[:, 5:], past_key_values=copy.deepcopy(past)).logits
        assert spy == ["lag_one"] * len(lib.modules)
        spy.clear()
        with router.trace() as trace:  # a trace keeps the fast path and records its winners
            traced = tiny_model(ids[:, 5:], past_key_values=copy.deepcopy(past)).logits
        assert spy == ["add_rows"] * len(lib.modules)
        with router.using(mode="none"):
            bare = tiny_model(ids[:, 5:], past_key_values=copy.deepcopy(past)).logits
    assert torch.equal(step[0], general) and torch.equal(step[1], general) and torch.equal(traced, general)
    assert not torch.equal(bare, general)
    assert all(len(trace.tokens("knowledge", m)) == 1 for m in lib.modules)
    spy.clear()
    with torch.no_grad():
        tiny_model(ids[:, 4:], past_key_values=tiny_model(ids[:, :4], use_cache=True).past_key_values)
    tiny_model(ids[:, 5:], past_key_values=copy.deepcopy(past))  # autograd on
    assert "add_rows" not in spy


@pytest.mark.parametrize("cfg", [LAGConfig.preset("two-level"),
                                 LAGConfig(mode="lag", k=3, shortlist=3, shortlist_weight=1.0),
                                 LAGConfig(mode="spectr", shortlist=2, shortlist_weight=0.0)],
                         ids=["default", "uncentred-M3-w1", "w0"])
def test_two_level_in_place_decoding_equals_the_general_path(tiny_model, knowledge_dirs, spy, cfg) -> None:
    """Two-level decode steps run in the fused kernel (the token among its prompt's shortlist, centred on the
    prompt's mean) and generate what the PyTorch ops generate; a traced step takes the general path and gives
    the same logits (to float32 rounding: the general path's products are PyTorch's)."""
    lib = AdapterLibrary.compile(knowledge_dirs, kind="knowledge", base_model=tiny_model,
                                 out=knowledge_dirs[0].parent / "lib")
    router = attach_lag(tiny_model, lib, cfg)
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(6))
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        fused = tiny_model.generate(ids, **kw)
        assert spy == ["add_shortlist_rows"] * 8 * len(lib.modules)  # the prompt's tokens, then 7 steps
        spy.clear()
        router.set(decode_kernel="torch")
        ops = tiny_model.generate(ids, **kw)
        assert spy == [] and torch.equal(fused, ops)
        router.set(decode_kernel="auto")
        out = tiny_model(ids, use_cache=True)
        spy.clear()
        step = tiny_model(fused[:, 9:10], past_key_values=copy.deepcopy(out.past_key_values)).logits
        assert len(spy) == len(lib.modules)
        with router.using(decode_kernel="torch"):  # the general path: PyTorch's products
            general = tiny_model(fused[:, 9:10], past_key_values=copy.deepcopy(out.past_key_values)).logits
        with router.trace() as trace:  # traced: still the fused kernel, winners recorded
            traced = tiny_model(fused[:, 9:10], past_key_values=copy.deepcopy(out.past_key_values)).logits
        with router.using(mode="none"):
            bare = tiny_model(fused[:, 9:10], past_key_values=copy.deepcopy(out.past_key_values)).logits
    assert len(spy) == 2 * len(lib.modules) and torch.equal(step, traced)
    assert all(len(trace.tokens("knowledge", m)) == 1 for m in lib.modules)
    assert torch.allclose(step, general, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bare, general, atol=1e-3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_routes_with_pytorch_ops(spy: list[str]) -> None:
    """GNU OpenMP does not survive fork: numba aborts such a child at its first parallel kernel (and torch's
    own parallel ops hang in it unless it runs single-threaded, as DataLoader workers do). A child forked
    after the parent used the kernels takes the PyTorch path, with the same routing."""
    t = _library(torch.float32, N=200, n=64, m=48)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        parent = route_tokens(x, t, "lag", k=20)
    assert spy == ["lag_one"]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the winner and whether the kernels were used, then exit at once
        try:
            torch.set_num_threads(1)
            with torch.no_grad():
                child = route_tokens(x, t, "lag", k=20)
            os.write(write, f"{int(child.chosen[0])} {len(spy)}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 100).decode().split()
    os.close(read)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert report == [str(int(parent.chosen[0])), "1"]  # same winner, no kernel call in the child


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_equal_one_row_at_a_time(dtype: torch.dtype) -> None:
    """A decode batch's R tokens in one call (rows split across threads for the shortlist kernel) give each
    row what it gets alone, bit for bit: winners and the deltas added into the outputs."""
    t = _library(dtype)
    protos, A, B = t.bits
    g = torch.Generator().manual_seed(4)
    R, n, m, N = 5, A.shape[2], B.shape[1], A.shape[0]
    x = torch.randn(R, n, generator=g)
    base = torch.randn(R, m, generator=g)
    cand = torch.randint(0, N, (R, 3), generator=g)
    prior = torch.log_softmax(torch.randn(R, 3, generator=g), dim=-1)
    centre = torch.randn(R, n, generator=g) * 0.1
    together = base.clone()
    winners = kernels.add_rows(protos, A, B, x, 7, together)
    together_s = base.clone()
    winners_s = kernels.add_shortlist_rows(A, B, x, centre, cand, prior, 0.5, together_s)
    for r in range(R):
        alone = base[r:r + 1].clone()
        w = kernels.add_rows(protos, A, B, x[r:r + 1], 7, alone)
        assert w[0] == winners[r] and torch.equal(alone[0], together[r])
        alone_s = base[r:r + 1].clone()
        ws = kernels.add_shortlist_rows(A, B, x[r:r + 1], centre[r:r + 1], cand[r:r + 1], prior[r:r + 1], 0.5,
                                        alone_s)
        assert ws[0] == winners_s[r] and torch.equal(alone_s[0], together_s[r])
        assert ws[0] in cand[r].tolist()
        # and the one-token kernel's choice (lag_one)
        delta, one = kernels.lag_one(protos, A, B, x[r:r + 1], 7)
        assert int(one[0]) == winners[r] and torch.allclose(base[r] + delta[0], together[r])
    assert len(set(winners.tolist())) > 1  # the rows do route differently


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Rows [T, m] equal up to ``tol`` of each row's norm."""
    return bool(((a - b).norm(dim=-1) <= tol * b.norm(dim=-1)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prompt_kernels_equal_the_pytorch_ops(dtype: torch.dtype, spy: list[str]) -> None:
    """A prompt's tokens through the fused per-token kernels (after one GEMM for the Arrow scores): the same
    winners as the PyTorch ops (lag, the two-level shortlist, the pre-pass's score masses), deltas equal
    to float32 rounding."""
    from llama_index_lag.routing.engine import route_shortlist, sequence_scores

    t = _library(dtype, N=60)
    tol = 1e-6 if dtype == torch.float32 else 1e-3  # PyTorch rounds x to float16 for half-precision GEMMs
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 17, 96, generator=g)  # [B, S, n]
    flat = x.reshape(-1, 96)
    with torch.no_grad():
        for k in (1, 4, 20):
            fused = route_tokens(flat, t, "lag", k=k)
            ops = route_tokens(flat, t, "lag", k=k, kernel="torch")
            assert torch.equal(fused.chosen, ops.chosen)
            assert _close(fused.delta, ops.delta, tol)
        mask = torch.ones(2, 17, dtype=torch.bool)
        mask[1, :3] = False  # left padding
        masses = sequence_scores(x, mask, t, "lag", "mass", k=5)
        expected = sequence_scores(x, mask, t, "lag", "mass", k=5, kernel="torch")
        assert torch.allclose(masses, expected, atol=10 * tol)
        cand = masses.topk(3, dim=-1).indices.repeat_interleave(17, dim=0)  # [T, 3]
        prior = torch.log_softmax(torch.randn(cand.shape, generator=g), dim=-1)
        centre = flat.mean(0, keepdim=True).expand_as(flat).contiguous()
        fused = route_shortlist(flat, t, cand, prior, 0.7, centre=centre)
        ops = route_shortlist(flat, t, cand, prior, 0.7, centre=centre, kernel="torch")
        assert torch.equal(fused.chosen, ops.chosen)
        assert _close(fused.delta, ops.delta, tol)
    assert spy.count("add_shortlist_rows") == 1 and len(set(fused.chosen.tolist())) > 1
