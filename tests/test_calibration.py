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
    if cfg.shortlist:
        mass = _masses(model, deltas, cfg, ids)
        order = torch.argsort(mass, descending=True, stable=True)[: min(cfg.shortlist, len(mass))]
        shortlist = [int(i) for i in order]
        prior = {i: math.log(float(mass[i] / mass.sum())) for i in shortlist}
    chosen, hooks = {}, []
    for module, d in deltas.items():
        a_star, _ = _svd(d, RANK)

        def hook(mod, inputs, output, d=d, a_star=a_star, module=module):
            x = inputs[0][0].double()
            xc = x - x.mean(0) if cfg.calibration == "request" else x
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
]


@pytest.mark.parametrize("cfg", CONFIGS,
                         ids=lambda c: f"{c.mode}-{c.calibration}-M{c.shortlist}-w{c.shortlist_weight}")
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
