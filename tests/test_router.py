"""Model-level routing against an independent slow reference (dense PEFT deltas, loop over tokens), PEFT's
own Arrow and LoRA implementations, and KV-cached generation."""

from __future__ import annotations

import copy
import threading
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, PeftModel, create_arrow_model

from llama_index_lag import LAGConfig, attach_lag
from llama_index_lag.errors import ConfigError, IncompatibleLibraryError, LibraryError
from llama_index_lag.testing import make_lora_adapters, make_tiny_model

from .conftest import MLP, compile_library


# ---- the independent reference ------------------------------------------------------------------
def dense_deltas(model: torch.nn.Module, dirs: list[Path]) -> dict[str, torch.Tensor]:
    """module -> [N, m, n] dense s*B*A per adapter, computed by PEFT itself (get_delta_weight)."""
    out: dict[str, list[torch.Tensor]] = {}
    for d in dirs:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(d))
        for name, module in peft_model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                key = name.removeprefix("base_model.model.")
                out.setdefault(key, []).append(module.get_delta_weight("default").detach().double())
    return {k: torch.stack(v) for k, v in out.items()}


def _svd(deltas: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A* [N, r, n], B* [N, m, r] from a dense SVD, with the library's sign convention."""
    U, S, Vh = torch.linalg.svd(deltas, full_matrices=False)
    a, b = Vh[:, :rank], U[:, :, :rank] * S[:, None, :rank]
    sign = torch.sign(a.gather(-1, a.abs().argmax(-1, keepdim=True))).squeeze(-1)
    return a * sign[..., None], b * sign[:, None, :]


def reference_delta(x: torch.Tensor, deltas: torch.Tensor, rank: int, cfg: LAGConfig,
                    fixed: list[int] | None):
    """Loop over tokens: the routed delta for x [T, n] given dense deltas [N, m, n]."""
    a_star, b_star = _svd(deltas, rank)
    N = deltas.shape[0]
    out = torch.zeros(x.shape[0], deltas.shape[1], dtype=torch.float64)
    for t, xt in enumerate(x.double()):
        if fixed is not None:
            out[t] = sum(deltas[j] @ xt for j in fixed)
            continue
        arrow = torch.stack([(a_star[i, 0] @ xt).abs() for i in range(N)])
        norms = torch.stack([(a_star[i] @ xt).norm() for i in range(N)])
        order = torch.argsort(arrow, descending=True)
        if cfg.mode == "arrow":
            top = order[: cfg.arrow_top_k]
            w = torch.softmax(arrow[top] / cfg.temperature, 0)
            out[t] = sum(w[j] * (deltas[top[j]] @ xt) for j in range(len(top)))
        elif cfg.mode == "spectr" and cfg.spectr_top_k > 1:
            top = torch.argsort(norms, descending=True)[: cfg.spectr_top_k]
            out[t] = b_star[top].mean(0) @ (a_star[top].mean(0) @ xt)
        else:
            cands = order[: min(cfg.k, N)] if cfg.mode == "lag" else torch.arange(N)
            j = cands[norms[cands].argmax()]
            out[t] = deltas[j] @ xt
    return out


def reference_logits(model, libs: dict[str, tuple[list[Path], int]], cfg: LAGConfig, ids, **kw):
    """Logits of the bare model with forward hooks adding the reference deltas of every library."""
    hooks = []
    for kind, (dirs, rank) in libs.items():
        for module, deltas in dense_deltas(model, dirs).items():
            fixed = None
            if cfg.fixed and kind in cfg.fixed:
                fixed = [int(Path(d).name.removeprefix(kind if kind == "task" else "doc"))
                         for d in cfg.fixed[kind]]

            def hook(mod, inputs, output, deltas=deltas, fixed=fixed, rank=rank):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                d = reference_delta(x, deltas, rank, cfg, fixed)
                return output + d.view(*output.shape[:-1], -1).to(output.dtype)

            hooks.append(model.get_submodule(module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(ids, **kw).logits
    finally:
        for h in hooks:
            h.remove()


IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 11, 300, 2, 77]])


# ---- tests ---------------------------------------------------------------------------------------
def test_none_is_bit_identical_and_detach_restores(tiny_model, two_libs):
    with torch.no_grad():
        bare = tiny_model(IDS).logits
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    originals = {n: m for n, m in tiny_model.named_modules()}
    router = attach_lag(tiny_model, list(two_libs), LAGConfig(mode="none"))
    assert len(router.modules) == 2 * 5  # gate, up, down, q, v per layer
    with torch.no_grad():
        assert torch.equal(tiny_model(IDS).logits, bare)
    router.detach()
    assert {n: m for n, m in tiny_model.named_modules()} == originals
    after = tiny_model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(tiny_model(IDS).logits, bare)


@pytest.mark.parametrize("cfg", [
    LAGConfig(mode="lag", k=3),
    LAGConfig(mode="lag", k=1),
    LAGConfig(mode="arrow"),
    LAGConfig(mode="arrow", arrow_top_k=3, temperature=0.7),
    LAGConfig(mode="spectr"),
    LAGConfig(mode="spectr", spectr_top_k=2),
    LAGConfig(mode="fixed", fixed={"knowledge": ["doc4"], "task": ["task1"]}),
    LAGConfig(mode="lag", k=2, fixed={"knowledge": ["doc2"]}),  # PRAG+LAG
], ids=lambda c: f"{c.mode}-k{c.k}-a{c.arrow_top_k}-s{c.spectr_top_k}-{bool(c.fixed)}")
def test_every_mode_matches_slow_reference(tiny_model, two_libs, knowledge_dirs, task_dirs, cfg):
    expected = reference_logits(tiny_model, {"knowledge": (knowledge_dirs, 4), "task": (task_dirs, 2)}, cfg,
                                IDS)
    router = attach_lag(tiny_model, list(two_libs), cfg)
    with torch.no_grad():
        got = tiny_model(IDS).logits
    router.detach()
    with torch.no_grad():
        bare = tiny_model(IDS).logits
    assert (got - bare).abs().max() > 1e-3  # adapters did something
    assert torch.allclose(got, expected, atol=2e-4), (got - expected).abs().max()


def test_lag_limits_equal_arrow_and_spectr_logits(tiny_model, two_libs):
    router = attach_lag(tiny_model, list(two_libs))
    with torch.no_grad():
        logits = {}
        for name, cfg in {"lag1": dict(mode="lag", k=1), "arrow": dict(mode="arrow"),
                          "lagN": dict(mode="lag", k=10_000), "spectr": dict(mode="spectr")}.items():
            with router.using(**cfg):
                logits[name] = tiny_model(IDS).logits
    assert torch.allclose(logits["lag1"], logits["arrow"], atol=1e-5)
    assert torch.allclose(logits["lagN"], logits["spectr"], atol=1e-5)
    assert not torch.allclose(logits["arrow"], logits["spectr"], atol=1e-3)


@pytest.mark.parametrize("top_k", [1, 3])
def test_arrow_matches_peft_create_arrow_model(llama, tmp_path, top_k):
    dirs = make_lora_adapters(llama, tmp_path / "ad", 5, rank=4, target_modules=MLP, seed=7, decay=0.3)
    peft_model = create_arrow_model(copy.deepcopy(llama), [str(d) for d in dirs],
                                    ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=0))
    with torch.no_grad():
        expected = peft_model(IDS).logits
    lib = compile_library(dirs, "task", llama, tmp_path / "lib")
    router = attach_lag(llama, lib, LAGConfig(mode="arrow", arrow_top_k=top_k, temperature=1.0))
    with torch.no_grad():
        got = llama(IDS).logits
        with router.using(mode="none"):
            bare = llama(IDS).logits
    assert (expected - bare).abs().max() > 1e-3
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_fixed_matches_peft_lora(tiny_model, knowledge_dirs, tmp_path):
    lib = compile_library(knowledge_dirs, "knowledge", tiny_model, tmp_path / "lib")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_model), str(knowledge_dirs[3]))
    with torch.no_grad():
        expected = peft_model(IDS).logits
    attach_lag(tiny_model, lib, LAGConfig(mode="fixed", fixed={"knowledge": ["doc3"]}))
    with torch.no_grad():
        assert torch.allclose(tiny_model(IDS).logits, expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["lag", "arrow", "spectr"])
def test_kv_cached_generation_equals_full_recompute(tiny_model, two_libs, mode):
    attach_lag(tiny_model, list(two_libs), LAGConfig(mode=mode, k=2))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = tiny_model.generate(IDS, use_cache=True, **kw)
        full = tiny_model.generate(IDS, use_cache=False, **kw)
    assert torch.equal(cached, full)


def test_batch_with_left_padding_matches_single_sequences(tiny_model, two_libs):
    router = attach_lag(tiny_model, list(two_libs), LAGConfig(mode="lag", k=3))
    a, b = IDS[0], IDS[0, 4:]
    ids = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    mask = torch.stack([torch.ones(len(a)), torch.cat([torch.zeros(4), torch.ones(len(b))])]).long()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad(), router.trace() as trace:
        batch = tiny_model(ids, attention_mask=mask, position_ids=pos).logits
    with torch.no_grad():
        single_a = tiny_model(a[None]).logits[0]
        single_b = tiny_model(b[None]).logits[0]
    assert torch.allclose(batch[0], single_a, atol=1e-4)
    assert torch.allclose(batch[1, 4:], single_b, atol=1e-4)
    # padding tokens are not counted: (12 + 8 real tokens) x (2 layers x 3 knowledge modules)
    assert trace.summary()["knowledge"]["selections"] == 20 * 6


def test_generate_batch_with_padding_matches_single(tiny_model, two_libs):
    attach_lag(tiny_model, list(two_libs), LAGConfig(mode="lag", k=3))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    a, b = IDS[0], IDS[0, 5:]
    ids = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])
    mask = (ids != 0).long()
    mask[0] = 1
    with torch.no_grad():
        batch = tiny_model.generate(ids, attention_mask=mask, **kw)
        single_b = tiny_model.generate(b[None], **kw)
    assert torch.equal(batch[1, 5:], single_b[0])


def test_bfloat16_model_and_library(tmp_path, knowledge_dirs, tiny_model):
    lib32 = compile_library(knowledge_dirs, "knowledge", tiny_model, tmp_path / "l32")
    lib16 = compile_library(knowledge_dirs, "knowledge", tiny_model, tmp_path / "l16", dtype="bfloat16")
    model16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    r32 = attach_lag(tiny_model, lib32, LAGConfig(mode="lag", k=3))
    r16 = attach_lag(model16, lib16, LAGConfig(mode="lag", k=3))
    with torch.no_grad(), r32.trace() as t32, r16.trace() as t16:
        out32 = tiny_model(IDS).logits
        out16 = model16(IDS).logits.float()
        gen = model16.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out16.dtype == torch.float32 and gen.shape[1] == IDS.shape[1] + 4
    agree = sum((t32.tokens("knowledge", m) == t16.tokens("knowledge", m)[: len(t32.tokens("knowledge", m))])
                .float().mean() for m in t32.modules("knowledge")) / len(t32.modules("knowledge"))
    assert agree > 0.7  # routing mostly unchanged by bfloat16 rounding
    assert torch.allclose(out16, out32, atol=0.15)


def test_mistral_architecture(tmp_path):
    model = make_tiny_model("mistral", seed=3)
    dirs = make_lora_adapters(model, tmp_path / "ad", 4, rank=3, target_modules=MLP, seed=4)
    lib = compile_library(dirs, "knowledge", model, tmp_path / "lib")
    cfg = LAGConfig(mode="lag", k=2)
    expected = reference_logits(model, {"knowledge": (dirs, 3)}, cfg, IDS)
    attach_lag(model, lib, cfg)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, expected, atol=2e-4)


def test_set_and_using_are_isolated_per_thread(tiny_model, two_libs):
    router = attach_lag(tiny_model, list(two_libs), LAGConfig(mode="lag", k=3))
    alone = {}
    with torch.no_grad():
        for mode in ("none", "arrow", "spectr", "lag"):
            with router.using(mode=mode):
                alone[mode] = tiny_model(IDS).logits
    results: dict[str, list[torch.Tensor]] = {m: [] for m in alone}
    barrier = threading.Barrier(4)

    def work(mode: str) -> None:
        with router.using(mode=mode), torch.no_grad():
            barrier.wait()
            for _ in range(5):
                results[mode].append(tiny_model(IDS).logits)

    threads = [threading.Thread(target=work, args=(m,)) for m in alone]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for mode, outs in results.items():
        assert all(torch.equal(o, alone[mode]) for o in outs), mode
    router.set(mode="spectr")
    with torch.no_grad():
        assert torch.equal(tiny_model(IDS).logits, alone["spectr"])


def test_sequence_granularity_applies_prompt_winner(tiny_model, two_libs):
    know, _ = two_libs
    router = attach_lag(tiny_model, know, LAGConfig(mode="lag", k=3, granularity="sequence"))
    with torch.no_grad(), router.trace() as t:
        out = tiny_model.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for module in t.modules("knowledge"):
        chosen = t.tokens("knowledge", module)
        assert chosen.numel() == IDS.shape[1] + 4 and (chosen == chosen[0]).all()
    # the same as fixing each module's winner
    assert out.shape[1] == IDS.shape[1] + 5


def test_bad_configs_and_attachments(tiny_model, two_libs, tmp_path, knowledge_dirs):
    know, task = two_libs
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        LAGConfig(k=0)
    with pytest.raises(ConfigError, match="unknown mode"):
        LAGConfig(mode="best")
    with pytest.raises(LibraryError, match="doc99"):
        attach_lag(tiny_model, know, LAGConfig(mode="fixed", fixed={"knowledge": ["doc99"]}))
    other = make_tiny_model("llama", seed=0, intermediate_size=128)
    with pytest.raises(IncompatibleLibraryError, match="another base model"):
        attach_lag(other, know)
    half = compile_library(knowledge_dirs, "task", tiny_model, tmp_path / "half", dtype="float16", names=[
        f"t{i}" for i in range(len(knowledge_dirs))])
    with pytest.raises(IncompatibleLibraryError, match="share one dtype"):
        attach_lag(tiny_model, [know, half])
    router = attach_lag(tiny_model, know)
    with pytest.raises(IncompatibleLibraryError, match="already routed"):
        attach_lag(tiny_model, task)
    router.detach()
    with pytest.raises(IncompatibleLibraryError, match="two knowledge libraries"):
        attach_lag(tiny_model, [know, know])


def test_focus_restricts_sequence_aggregation_to_content_tokens(tiny_model, two_libs):
    from llama_index_lag.routing.engine import sequence_scores

    know, _ = two_libs
    router = attach_lag(tiny_model, know,
                        LAGConfig(mode="spectr", granularity="sequence", sequence_scope="module"))
    focus = torch.zeros_like(IDS, dtype=torch.bool)
    focus[0, 7:11] = True  # the "content" tokens
    inputs: dict[str, torch.Tensor] = {}
    hooks = [tiny_model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: inputs.__setitem__(m, args[0].detach().clone())) for m in router.modules]
    winners = {}
    for mask in (focus, None):
        with torch.no_grad(), router.focus(mask), router.trace() as t:
            tiny_model(IDS)
        winners[mask is None] = {m: t.tokens("knowledge", m) for m in t.modules("knowledge")}
        for module, chosen in winners[mask is None].items():
            scope = focus if mask is not None else torch.ones_like(focus)
            pool = router.pools["knowledge"].tensors(module)
            expected = sequence_scores(inputs[module], scope, pool, "spectr", "mass").argmax(-1)
            assert (chosen == expected[0]).all(), module
    for h in hooks:
        h.remove()


def test_model_scope_sequence_routing_sums_every_module(tiny_model, two_libs):
    """One adapter per library for the whole request: argmax of the scores summed over every module of an
    adapter-free forward of the prompt (focus tokens only)."""
    from llama_index_lag.routing.engine import sequence_scores

    know, _ = two_libs
    router = attach_lag(tiny_model, know, LAGConfig(mode="lag", k=3, granularity="sequence",
                                                    sequence_scope="model"))
    focus = torch.zeros_like(IDS, dtype=torch.bool)
    focus[0, 3:10] = True
    inputs: dict[str, torch.Tensor] = {}
    with torch.no_grad(), router.using(mode="none"):  # the reference: bare activations of every module
        hooks = [tiny_model.get_submodule(m).register_forward_pre_hook(
            lambda mod, args, m=m: inputs.__setitem__(m, args[0].detach().clone())) for m in router.modules]
        tiny_model(IDS)
        for h in hooks:
            h.remove()
    totals = sum(sequence_scores(inputs[m], focus, router.pools["knowledge"].tensors(m), "lag", "mass", k=3)
                 for m in router.modules)
    with torch.no_grad(), router.focus(focus), router.trace() as t:
        out = tiny_model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    chosen = torch.cat([t.tokens("knowledge", m) for m in t.modules("knowledge")])
    assert (chosen == int(totals.argmax())).all()
    assert t.summary()["knowledge"]["selections"] == (IDS.shape[1] + 3) * 6  # the pre-pass is not traced
    fixed = attach_lag  # same output as fixing that adapter
    router.detach()
    r2 = fixed(tiny_model, know,
               LAGConfig(mode="fixed", fixed={"knowledge": [know.names[int(totals.argmax())]]}))
    with torch.no_grad():
        assert torch.equal(tiny_model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0), out)
    r2.detach()
