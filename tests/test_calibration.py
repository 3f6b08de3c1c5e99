"""Request-centred scoring and two-level (shortlist) routing against a slow, independent reference: dense PEFT
deltas, loops over tokens and adapters; batching, KV-cached decoding and the limits of the two-level
scheme."""

from __future__ import annotations

import math

import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
from llama_index_lag.errors import ConfigError

from .test_router import _svd, dense_deltas

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 11, 300, 2, 77]])
RANK = 4


@pytest.fixture
def lib(tmp_path, tiny_model, knowledge_dirs):
    return AdapterLibrary.compile(knowledge_dirs, kind="knowledge", base_model=tiny_model,
                                  out=tmp_path / "lib", progress=False)


@pytest.fixture
def deltas(tiny_model, knowledge_dirs):
    return dense_deltas(tiny_model, knowledge_dirs)


def _inputs(model, modules, ids):
    """Each module's input [T, n] in a bare forward."""
    seen = {}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: seen.__setitem__(m, args[0][0].double())) for m in modules]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _choose(xt, a_star, cfg, allowed=None, prior=None):
    """Reference choice for one centred token xt [n] among adapters (loops)."""
    N = a_star.shape[0]
    arrow = torch.stack([(a_star[i, 0] @ xt).abs() for i in range(N)])
    norms = torch.stack([(a_star[i] @ xt).norm() for i in range(N)])
    if allowed is not None:  # two-level: log share + weight * log ||A x||
        scores = {i: prior[i] + cfg.shortlist_weight * math.log(max(float(norms[i]), 1e-30)) for i in allowed}
        return max(scores, key=lambda i: (scores[i], -allowed.index(i)))
    if cfg.mode == "arrow":
        return int(arrow.argmax())
    cands = torch.argsort(arrow, descending=True)[: min(cfg.k, N)] if cfg.mode == "lag" else torch.arange(N)
    return int(cands[norms[cands].argmax()])


def _masses(model, deltas, cfg, ids):
    """Two-level reference, the sequence level: per adapter, sum over modules and tokens of its
    ||A* x~|| normalised over the token's candidates (x~: request-centred, in an adapter-free forward)."""
    xs = _inputs(model, list(deltas), ids)
    N = next(iter(deltas.values())).shape[0]
    mass = torch.zeros(N, dtype=torch.float64)
    for module, d in deltas.items():
        a_star, _ = _svd(d, RANK)
        x = xs[module]
        x = x - x.mean(0) if cfg.calibration == "request" else x
        for xt in x:
            arrow = torch.stack([(a_star[i, 0] @ xt).abs() for i in range(N)])
            cands = torch.argsort(arrow, descending=True)[: min(cfg.k, N)] if cfg.mode == "lag" else range(N)
            norms = {int(i): float((a_star[int(i)] @ xt).norm()) for i in cands}
            total = sum(norms.values())
            for i, v in norms.items():
                mass[i] += v / total
    return mass


def _reference(model, deltas, cfg, ids):
    """Logits of the bare model with hooks applying the reference choices; and the chosen adapters."""
    shortlist = prior = None
    if cfg.shortlist and cfg.sequence_scope == "model":
        mass = _masses(model, deltas, cfg, ids)
        order = torch.argsort(mass, descending=True, stable=True)[: min(cfg.shortlist, len(mass))]
        shortlist = [int(i) for i in order]
        prior = {i: math.log(float(mass[i] / mass.sum())) for i in shortlist}
    chosen, hooks = {}, []
    for module, d in deltas.items():
        a_star, _ = _svd(d, RANK)

        def hook(mod, inputs, output, d=d, a_star=a_star, module=module, shortlist=shortlist, prior=prior):
            x = inputs[0][0].double()
            xc = x - x.mean(0) if cfg.calibration == "request" else x
            if cfg.shortlist and cfg.sequence_scope == "module":  # this module's own masses, this forward
                N = a_star.shape[0]
                mass = torch.zeros(N, dtype=torch.float64)
                for xt in xc:
                    arrow = torch.stack([(a_star[i, 0] @ xt).abs() for i in range(N)])
                    cands = torch.argsort(arrow, descending=True)[: min(cfg.k, N)]
                    norms = {int(i): float((a_star[int(i)] @ xt).norm()) for i in cands}
                    for i, v in norms.items():
                        mass[i] += v / sum(norms.values())
                order = torch.argsort(mass, descending=True, stable=True)[: min(cfg.shortlist, N)]
                shortlist = [int(i) for i in order]
                prior = {i: math.log(float(mass[i] / mass.sum())) for i in shortlist}
            picks = [_choose(xt, a_star, cfg, shortlist, prior) for xt in xc]
            chosen[module] = picks
            delta = torch.stack([d[j] @ x[t] for t, j in enumerate(picks)])
            return output + delta[None].to(output.dtype)

        hooks.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits, chosen
    finally:
        for h in hooks:
            h.remove()


CONFIGS = [
    LAGConfig(mode="lag", k=3, calibration="request"),
    LAGConfig(mode="spectr", calibration="request"),
    LAGConfig(mode="arrow", calibration="request"),
    LAGConfig(mode="lag", k=3, calibration="request", shortlist=2),
    LAGConfig(mode="lag", k=4, calibration="request", shortlist=3, shortlist_weight=0.5),
    LAGConfig(mode="spectr", shortlist=2),
    LAGConfig(mode="lag", k=3, calibration="request", shortlist=2, shortlist_weight=0.5,
              sequence_scope="module"),
]


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: f"{c.mode}-{c.calibration}-M{c.shortlist}-w{c.shortlist_weight}-"
                                       f"{c.sequence_scope}")
def test_matches_the_slow_reference(tiny_model, lib, deltas, cfg):
    expected, chosen = _reference(tiny_model, deltas, cfg, IDS)
    router = attach_lag(tiny_model, lib, cfg)
    with torch.no_grad(), router.trace() as trace:
        got = tiny_model(IDS).logits
    router.detach()
    for module, picks in chosen.items():
        assert trace.tokens("knowledge", module).tolist() == picks, module
    assert torch.allclose(got.double(), expected.double(), atol=1e-4)


def test_shortlist_of_one_is_the_sequence_winner_and_weight_zero_follows_the_prior(tiny_model, lib):
    def winners(cfg):
        router = attach_lag(tiny_model, lib, cfg)
        with torch.no_grad(), router.trace() as trace:
            tiny_model(IDS)
        router.detach()
        return {m: trace.tokens("knowledge", m).tolist() for m in trace.modules("knowledge")}

    seq = winners(LAGConfig(mode="lag", k=3, calibration="request", granularity="sequence"))
    one = winners(LAGConfig(mode="lag", k=3, calibration="request", shortlist=1))
    zero = winners(LAGConfig(mode="lag", k=3, calibration="request", shortlist=3, shortlist_weight=0.0))
    assert seq == one == zero and len({w for ws in seq.values() for w in ws}) == 1
    clamped = winners(LAGConfig(mode="lag", k=3, calibration="request", shortlist=1000))  # M > N: all of them
    full = winners(LAGConfig(mode="lag", k=3, calibration="request", shortlist=len(lib)))
    assert clamped == full


@pytest.mark.parametrize("cfg", [LAGConfig(mode="lag", k=3, calibration="request"),
                                 LAGConfig(mode="lag", k=3, calibration="request", shortlist=2)])
def test_batched_generation_equals_each_prompt_alone(tiny_model, lib, cfg):
    prompts = [torch.tensor([[5, 17, 42, 99, 7, 250]]), torch.tensor([[31, 64, 11]])]
    router = attach_lag(tiny_model, lib, cfg)
    alone = []
    with torch.no_grad():
        for p in prompts:
            alone.append(tiny_model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6,
                                             do_sample=False, pad_token_id=0)[0, p.shape[1]:])
        width = max(p.shape[1] for p in prompts)
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - p.shape[1]:], mask[i, width - p.shape[1]:] = p[0], 1
        batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)
    router.detach()
    for i in range(2):
        assert batched[i, width:].tolist() == alone[i].tolist()


def test_decoding_keeps_the_prompts_shortlist(tiny_model, lib):
    """A KV-cached step routes the new token among the shortlist chosen on the prompt."""
    cfg = LAGConfig(mode="lag", k=3, calibration="request", shortlist=2)
    router = attach_lag(tiny_model, lib, cfg)
    with torch.no_grad(), router.trace() as trace:
        out = tiny_model(IDS, use_cache=True)
        step = tiny_model(torch.tensor([[123]]), past_key_values=out.past_key_values, use_cache=True)
    router.detach()
    assert torch.isfinite(step.logits).all()
    shortlisted = {w for m in trace.modules("knowledge")
                   for w in trace.tokens("knowledge", m)[: IDS.shape[1]].tolist()}
    decoded = {int(trace.tokens("knowledge", m)[-1]) for m in trace.modules("knowledge")}
    assert len(shortlisted) <= 2 and decoded <= shortlisted


def test_bad_two_level_settings():
    with pytest.raises(ConfigError, match="shortlist"):
        LAGConfig(shortlist=0)
    with pytest.raises(ConfigError, match="granularity"):
        LAGConfig(shortlist=2, granularity="sequence")
    with pytest.raises(ConfigError, match="shortlist_weight"):
        LAGConfig(shortlist=2, shortlist_weight=-1)
    with pytest.raises(ConfigError, match="calibration"):
        LAGConfig(calibration="csls-typo")
    with pytest.raises(ConfigError, match="arrow_top_k"):
        LAGConfig(mode="arrow", arrow_top_k=3, calibration="request")


# ---- score calibrations (LAGConfig.calibration: centre, zscore, csls, subspace, isoftmax, sinkhorn) ----
def _library_stats(a_star, how):
    """Reference (loops): per adapter i, (scale, shift) of its Arrow and SpectR scores from every other
    adapter's right singular vectors (all of them: 6 x 4 rows, under the library's limit)."""
    N = a_star.shape[0]
    out = []
    for stage in ("arrow", "spectr"):
        scale, shift = torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
        for i in range(N):
            ref = [a_star[j, q] for j in range(N) if j != i for q in range(a_star.shape[1])]
            vals = torch.stack([(a_star[i, 0] @ v).abs() if stage == "arrow" else (a_star[i] @ v).norm()
                                for v in ref])
            mean, std = vals.mean(), vals.std()  # unbiased
            top = vals.sort(descending=True).values[:10].mean()
            scale[i], shift[i] = {"centre": (1.0, -mean), "zscore": (1 / std, -mean / std),
                                  "csls": (2.0, -top)}[how]
        out.append((scale, shift))
    return out


def _request_stats(a_star, x, how, beta):
    """Reference (loops over adapters): per-adapter (scale, shift) over the request's tokens x [S, n]."""
    N = a_star.shape[0]
    out = []
    for stage in ("arrow", "spectr"):
        def score(i, xt, stage=stage):
            return ((a_star[i, 0] @ xt).abs() if stage == "arrow" else (a_star[i] @ xt).norm()) / xt.norm()

        s = torch.stack([torch.stack([score(i, xt) for i in range(N)]) for xt in x])  # [S, N]
        if how == "isoftmax":
            out.append((torch.full((N,), beta, dtype=torch.float64), -torch.logsumexp(beta * s, dim=0)))
            continue
        if how == "sinkhorn":
            logits, col = beta * s, torch.zeros(N, dtype=torch.float64)
            for _ in range(3):
                row = torch.logsumexp(logits + col, dim=1)  # [S]
                col = -torch.logsumexp(logits - row[:, None], dim=0)  # [N]
            out.append((torch.full((N,), beta, dtype=torch.float64), col))
            continue
        mean, std = s.mean(0), s.std(0)
        top = s.sort(dim=0, descending=True).values[:10].mean(0)
        out.append({"centre": (torch.ones(N, dtype=torch.float64), -mean),
                    "zscore": (1 / std, -mean / std), "csls": (torch.full((N,), 2.0, dtype=torch.float64),
                                                               -top)}[how])
    return out


def _calibrated_choice(xt, a_star, protos, cfg, stats):
    (sa, ba), (ss, bs) = stats
    N = a_star.shape[0]
    norm = xt.norm()
    arrow = torch.stack([(protos[i] @ xt).abs() / norm for i in range(N)]) * sa + ba
    spectr = torch.stack([(a_star[i] @ xt).norm() / norm for i in range(N)]) * ss + bs
    if cfg.mode == "spectr":
        return int(spectr.argmax())
    if cfg.mode == "arrow":
        return int(arrow.argmax())
    cands = torch.argsort(arrow, descending=True)[: min(cfg.k, N)]
    return int(cands[spectr[cands].argmax()])


def _calibrated_reference(model, deltas, cfg, ids):
    chosen, hooks = {}, []
    for module, d in deltas.items():
        a_star, _ = _svd(d, RANK)
        N, n = a_star.shape[0], a_star.shape[2]
        protos = a_star[:, 0]
        shared = None
        if cfg.calibration == "subspace":
            P = sum(a_star[i].T @ a_star[i] for i in range(N)) / N
            U = torch.linalg.eigh(P).eigenvectors.flip(1)[:, : cfg.subspace_dims].T  # [m, n]
            shared = torch.eye(n, dtype=torch.float64) - U.T @ U
            protos = torch.stack([shared @ p / (shared @ p).norm() for p in protos])

        def hook(mod, inputs, output, d=d, a_star=a_star, protos=protos, shared=shared, module=module, N=N):
            x = inputs[0][0].double()
            one = torch.ones(N, dtype=torch.float64)
            if cfg.calibration == "subspace":
                stats = [(one, 0 * one)] * 2
            elif cfg.calibration in ("isoftmax", "sinkhorn") or cfg.calibration_reference == "request":
                stats = _request_stats(a_star, x, cfg.calibration, cfg.calibration_beta)
            else:
                stats = _library_stats(a_star, cfg.calibration)
            xs = x if shared is None else x @ shared
            picks = [_calibrated_choice(xt, a_star, protos, cfg, stats) for xt in xs]
            chosen[module] = picks
            delta = torch.stack([d[j] @ x[t] for t, j in enumerate(picks)])
            return output + delta[None].to(output.dtype)

        hooks.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids).logits, chosen
    finally:
        for h in hooks:
            h.remove()


SCORE_CONFIGS = [
    LAGConfig(mode="lag", k=3, calibration="zscore"),
    LAGConfig(mode="lag", k=3, calibration="csls"),
    LAGConfig(mode="spectr", calibration="centre"),
    LAGConfig(mode="arrow", calibration="zscore"),
    LAGConfig(mode="lag", k=3, calibration="zscore", calibration_reference="request"),
    LAGConfig(mode="spectr", calibration="csls", calibration_reference="request"),
    LAGConfig(mode="lag", k=3, calibration="subspace", subspace_dims=2),
    LAGConfig(mode="arrow", calibration="subspace", subspace_dims=1),
    LAGConfig(mode="lag", k=3, calibration="isoftmax", calibration_beta=10.0),
    LAGConfig(mode="spectr", calibration="sinkhorn", calibration_beta=10.0),
]


@pytest.mark.parametrize("cfg", SCORE_CONFIGS,
                         ids=lambda c: f"{c.mode}-{c.calibration}-{c.calibration_reference}")
def test_score_calibrations_match_the_slow_reference(tiny_model, lib, deltas, cfg):
    expected, chosen = _calibrated_reference(tiny_model, deltas, cfg, IDS)
    router = attach_lag(tiny_model, lib, cfg)
    with torch.no_grad(), router.trace() as trace:
        got = tiny_model(IDS).logits
    router.detach()
    for module, picks in chosen.items():
        assert trace.tokens("knowledge", module).tolist() == picks, module
    assert torch.allclose(got.double(), expected.double(), atol=1e-4)
    # and the choices differ from the uncalibrated routing somewhere (else the test would prove nothing)
    router = attach_lag(tiny_model, lib, cfg.replace(calibration="none", calibration_reference="library"))
    with torch.no_grad(), router.trace() as plain:
        tiny_model(IDS)
    router.detach()
    assert any(plain.tokens("knowledge", m).tolist() != p for m, p in chosen.items())


def test_library_stores_its_statistics_and_updates_keep_them_consistent(tmp_path, tiny_model, knowledge_dirs):
    import json

    from llama_index_lag.library.stats import reference_stats, shared_subspace

    full = AdapterLibrary.compile(knowledge_dirs, kind="knowledge", base_model=tiny_model, out=tmp_path / "a",
                                  progress=False)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["format_version"] == 3
    module = full.modules[0]
    t = full.tensors(module)
    stored = full.routing_stats(module)
    fresh = reference_stats(t.A, t.proto)
    for key in ("arrow_mean", "arrow_std", "arrow_csls", "spectr_mean", "spectr_std", "spectr_csls"):
        assert torch.allclose(getattr(stored, key), getattr(fresh, key))
    # the shared subspace against an exact eigendecomposition of the mean projector
    A = t.A.double()
    P = torch.einsum("irn,irm->nm", A, A) / A.shape[0]
    values, vectors = torch.linalg.eigh(P)
    U, lam = shared_subspace(t.A, dims=3)  # subspace iteration: close to exact, not exact
    assert torch.allclose(lam.double(), values.flip(0)[:3], rtol=1e-3)
    cosines = torch.linalg.svdvals(U.double() @ vectors.flip(1)[:, :3])  # of the principal angles
    assert float(cosines.min()) > 0.99
    # add / remove rewrite them: equal to a fresh compile of the same adapters
    part = AdapterLibrary.compile(knowledge_dirs[:4], kind="knowledge", base_model=tiny_model,
                                  out=tmp_path / "b", progress=False)
    before = part.routing_stats(module).spectr_mean.clone()
    part.add(knowledge_dirs[4:], progress=False)
    after = part.routing_stats(module)
    assert not torch.allclose(before, after.spectr_mean[:4])  # the reference set grew
    assert torch.allclose(after.spectr_mean, stored.spectr_mean) and torch.allclose(after.arrow_csls,
                                                                                    stored.arrow_csls)
    part.remove([part.names[-1]])
    assert part.routing_stats(module).spectr_mean.shape == (5,)
    assert AdapterLibrary.load(tmp_path / "b").verify()["routing_stats"] is True


def test_old_libraries_load_and_compute_their_statistics(tmp_path, tiny_model, lib, caplog):
    import json
    import logging
    import shutil

    old = tmp_path / "old"
    shutil.copytree(lib.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["routing_stats"]
    manifest["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    (old / "routing_stats.safetensors").unlink()
    legacy = AdapterLibrary.load(old)
    assert not legacy.has_routing_stats() and legacy.verify()["routing_stats"] is None
    cfg = LAGConfig(mode="lag", k=3, calibration="zscore")
    runs = []
    for library in (lib, legacy):
        router = attach_lag(tiny_model, library, cfg)
        with torch.no_grad(), caplog.at_level(logging.WARNING):
            runs.append(tiny_model(IDS).logits)
        router.detach()
    assert torch.equal(runs[0], runs[1])
    assert "compiled before libraries stored them" in caplog.text


def test_corrupt_statistics_are_caught(tmp_path, lib):
    import shutil

    from llama_index_lag.errors import LibraryFormatError

    copy = tmp_path / "copy"
    shutil.copytree(lib.path, copy)
    path = copy / "routing_stats.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(LibraryFormatError, match="routing statistics"):
        AdapterLibrary.load(copy).verify()


def test_request_calibrations_keep_the_prompts_statistics_when_decoding_and_batching(tiny_model, lib):
    cfg = LAGConfig(mode="lag", k=3, calibration="isoftmax", calibration_beta=10.0)
    prompts = [torch.tensor([[5, 17, 42, 99, 7, 250]]), torch.tensor([[31, 64, 11]])]
    router = attach_lag(tiny_model, lib, cfg)
    alone = []
    with torch.no_grad():
        for p in prompts:
            alone.append(tiny_model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=6,
                                             do_sample=False, pad_token_id=0)[0, p.shape[1]:])
        width = max(p.shape[1] for p in prompts)
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - p.shape[1]:], mask[i, width - p.shape[1]:] = p[0], 1
        batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)
        # a decode step is scored against its prompt's statistics, not against itself alone
        out = tiny_model(IDS, use_cache=True)
        with router.trace() as trace:
            tiny_model(torch.tensor([[123]]), past_key_values=out.past_key_values, use_cache=True)
    router.detach()
    for i in range(2):
        assert batched[i, width:].tolist() == alone[i].tolist()
    assert trace.tokens("knowledge", trace.modules("knowledge")[0]).numel() == 1


def test_bad_calibration_settings(tiny_model, tmp_path):
    from llama_index_lag.testing import make_lora_adapters

    with pytest.raises(ConfigError, match="calibration_reference"):
        LAGConfig(calibration="isoftmax", calibration_reference="request")
    with pytest.raises(ConfigError, match="calibration_beta"):
        LAGConfig(calibration="isoftmax", calibration_beta=0)
    with pytest.raises(ConfigError, match="subspace_dims"):
        LAGConfig(calibration="subspace", subspace_dims=0)
    with pytest.raises(ConfigError, match="shortlist"):
        LAGConfig(calibration="zscore", shortlist=2)
    with pytest.raises(ConfigError, match="dynamic_k"):
        LAGConfig(calibration="csls", dynamic_k=0.5)
    two = make_lora_adapters(tiny_model, tmp_path / "two", 2, rank=2, target_modules=("gate_proj",), seed=3)
    small = AdapterLibrary.compile(two, kind="knowledge", base_model=tiny_model, out=tmp_path / "small",
                                   progress=False)
    with pytest.raises(ConfigError, match="at least 3 adapters.*knowledge adapters are 2"):
        attach_lag(tiny_model, small, LAGConfig(calibration="zscore"))
    router = attach_lag(tiny_model, small, LAGConfig())
    with pytest.raises(ConfigError, match="at least 3"), router.using(calibration="sinkhorn"):
        pass
    with pytest.raises(ConfigError, match="subspace_dims must be at most 8"):
        router.set(calibration="subspace", subspace_dims=9)
    router.set(calibration="zscore", fixed={"knowledge": [small.names[0]]})  # fixed: nothing is calibrated
    router.detach()
