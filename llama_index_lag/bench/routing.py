"""``lag bench routing``: the cost of routing, per mode, against the bare model and PEFT's Arrow.

Part 1 (modules): one SmolLM2-135M-shaped MLP block (gate/up: 576->1536, down: 1536->576), rank-6 adapters,
N in {10, 100, 1000}; modes none / arrow / spectr / lag(k=5, 20) and PEFT ``create_arrow_model`` on the same
adapters, for prefill (256 tokens) and decode (1 token per step). Reported as overhead over the bare block.

Part 2 (whole model, N=100): SmolLM2-135M with 100 rank-6 MLP adapters on all 30 layers: compile speed,
library load + attach time vs building PEFT's Arrow model, 256-token prefill and KV-cached decode speed.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import LAGConfig
from ..library import AdapterLibrary
from ..modes import parse_mode
from ..router import LAGRouter, attach_lag
from .common import (
    SMOLLM2_SHAPES,
    decode_seconds,
    machine,
    mlp_modules,
    print_table,
    save_results,
    timeit,
    timeit_interleaved,
    write_random_peft_lora,
)

# table label -> evaluated mode (llama_index_lag.modes); "two-level": the pipeline's default LAG routing;
# "two-level-mod": the same with per-module shortlists taken in the prompt's own forward (no pre-pass)
MODES: dict[str, dict[str, Any]] = {
    label: dict(parse_mode(name, k=20).routing)
    for label, name in (("arrow", "arrow"), ("spectr", "spectr"), ("lag(k=5)", "lag-k5"),
                        ("lag(k=20)", "lag"), ("two-level", "lag-req-sl2-w0.25"),
                        ("two-level-mod", "lag-req-sl2-w0.25-mod"))
}


def _smollm2_like(layers: int, vocab: int | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    shapes = dict(SMOLLM2_SHAPES, num_hidden_layers=layers)
    if vocab:
        shapes["vocab_size"] = vocab
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**shapes, tie_word_embeddings=True)).eval()


def _peft_arrow(model: torch.nn.Module, dirs: list[Path]) -> torch.nn.Module:
    from peft import ArrowConfig, create_arrow_model

    return create_arrow_model(copy.deepcopy(model), [str(d) for d in dirs],
                              ArrowConfig(top_k=1, router_temperature=1.0, rng_seed=0)).eval()


@torch.no_grad()
def bench_modules(ns: list[int], work: Path, *, tokens: int = 256, rank: int = 6, peft: bool = True,
                  peft_max_n: int = 1000, repeat: int = 5) -> list[dict[str, Any]]:
    """Overhead of each mode on one MLP block, for each library size N."""
    rows = []
    model = _smollm2_like(1, vocab=256)
    shapes = mlp_modules(model)
    gen = torch.Generator().manual_seed(0)
    x_pre = torch.randn(1, tokens, SMOLLM2_SHAPES["hidden_size"], generator=gen)
    x_dec = torch.randn(1, 1, SMOLLM2_SHAPES["hidden_size"], generator=gen)
    for N in ns:
        folder = work / f"modules-{N}"
        dirs = [write_random_peft_lora(folder / f"a{i:05d}", shapes, rank=rank, alpha=2 * rank, generator=gen)
                for i in range(N)]
        lib = AdapterLibrary.compile(dirs, kind="task", base_model=model, out=folder / "lib", progress=False)
        bare_mlp = copy.deepcopy(model.model.layers[0].mlp)  # the same weights, never wrapped
        router = attach_lag(model, lib, LAGConfig(mode="lag"))
        mlp = model.model.layers[0].mlp

        primed: dict[str, Any] = {}

        def run(name: str, x: torch.Tensor, calls: int, *, bare_mlp: torch.nn.Module = bare_mlp,
                mlp: torch.nn.Module = mlp, router: LAGRouter = router,
                primed: dict[str, Any] = primed) -> Callable[[], None]:
            def call() -> None:
                block = bare_mlp if name == "bare" else mlp
                if name != "bare":
                    router.set(LAGConfig(**MODES[name]))
                    # a prompt starts a fresh request (centre, shortlist); decoded tokens reuse the prompt's
                    if x.shape[1] > 1:
                        router.begin_request()
                    else:
                        if name not in primed:
                            primed[name] = router.begin_request()
                            block(x_pre)
                        router.resume_request(primed[name])
                for _ in range(calls):
                    block(x)
            return call

        # Every mode is timed round-robin with the bare block and the other modes, so the slow phases of a
        # shared machine hit all of them alike (their ratios are the result).
        names = ["bare", *MODES]
        pre = timeit_interleaved({k: run(k, x_pre, 1) for k in names}, rounds=repeat)
        dec = timeit_interleaved({k: run(k, x_dec, 20) for k in names}, rounds=3 * repeat)
        dec = {k: v / 20 for k, v in dec.items()}
        bare = {"prefill": pre.pop("bare"), "decode": dec.pop("bare")}
        times: dict[str, dict[str, float]] = {name: {"prefill": pre[name], "decode": dec[name]}
                                              for name in MODES}
        router.detach()
        if peft and N <= peft_max_n:
            start = time.perf_counter()
            peft_model = _peft_arrow(model, dirs)
            build = time.perf_counter() - start
            pmlp = peft_model.base_model.model.model.layers[0].mlp
            times["peft-arrow"] = {"prefill": timeit(lambda pmlp=pmlp: pmlp(x_pre),
                                                     repeat=max(2, repeat // 2)),
                                   "decode": timeit(lambda pmlp=pmlp: pmlp(x_dec),
                                                    repeat=repeat, min_time=0.3),
                                   "build_s": build}
            del peft_model
        for name, t in times.items():
            rows.append({
                "N": N, "mode": name,
                "prefill_ms": 1e3 * t["prefill"], "prefill_overhead": t["prefill"] / bare["prefill"] - 1,
                "decode_ms": 1e3 * t["decode"], "decode_overhead": t["decode"] / bare["decode"] - 1,
                "bare_prefill_ms": 1e3 * bare["prefill"], "bare_decode_ms": 1e3 * bare["decode"],
            })
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def _load_model(real: bool) -> tuple[torch.nn.Module, str]:
    if real:
        try:
            from ..models import load_causal_lm, resolve_model_dir

            model, _ = load_causal_lm(resolve_model_dir(None))
            return model.eval(), "SmolLM2-135M-Instruct"
        except Exception as exc:  # noqa: BLE001 - fall back to the same shapes with random weights
            print(f"(embedded model unavailable: {exc}; using a random SmolLM2-shaped model)")
    return _smollm2_like(SMOLLM2_SHAPES["num_hidden_layers"]), "random SmolLM2-135M-shaped"


@torch.no_grad()
def bench_model(work: Path, *, n: int = 100, rank: int = 6, tokens: int = 256, decode_tokens: int = 16,
                peft: bool = True, real: bool = True) -> dict[str, Any]:
    """Whole-model figures with n MLP adapters on every layer."""
    model, model_name = _load_model(real)
    torch.set_grad_enabled(False)
    shapes = mlp_modules(model)
    gen = torch.Generator().manual_seed(1)
    folder = work / f"model-{n}"
    dirs = [write_random_peft_lora(folder / f"a{i:04d}", shapes, rank=rank, alpha=2 * rank, generator=gen)
            for i in range(n)]
    out: dict[str, Any] = {"model": model_name, "n_adapters": n, "rank": rank, "tokens": tokens}
    start = time.perf_counter()
    AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=folder / "lib", progress=False)
    out["compile_s"] = time.perf_counter() - start
    out["compile_adapters_per_s"] = n / out["compile_s"]
    start = time.perf_counter()
    router = attach_lag(model, AdapterLibrary.load(folder / "lib"), LAGConfig(mode="lag", k=20))
    out["load_attach_s"] = time.perf_counter() - start
    ids = torch.randint(0, 1000, (1, tokens), generator=gen)

    def prefill() -> None:
        model(ids, use_cache=False)

    def decode() -> float:  # seconds per KV-cached step after a 32-token prompt (the prompt not timed)
        return decode_seconds(model, ids[:, :32], decode_tokens)

    def in_mode(cfg: dict[str, Any], fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            router.set(LAGConfig(**cfg))
            return fn()
        return call

    # The modes are timed round-robin (as in bench_modules), so a slow phase of the machine hits all alike.
    modes = {"none": dict(mode="none"), **MODES}
    prefill_s = timeit_interleaved({name: in_mode(cfg, prefill) for name, cfg in modes.items()}, rounds=3)
    decode_s = timeit_interleaved({name: in_mode(cfg, decode) for name, cfg in modes.items()}, rounds=3,
                                  self_timed=True)
    router.detach()
    if peft:
        start = time.perf_counter()
        peft_model = _peft_arrow(model, dirs)
        out["peft_build_s"] = time.perf_counter() - start
        prefill_s["peft-arrow"] = timeit(lambda: peft_model(ids, use_cache=False), repeat=2, warmup=0)
        decode_s["peft-arrow"] = decode_seconds(peft_model, ids[:, :32], decode_tokens)
        out["load_speedup_vs_peft"] = out["peft_build_s"] / out["load_attach_s"]
        out["prefill_speedup_vs_peft"] = prefill_s["peft-arrow"] / prefill_s["lag(k=20)"]
    out["prefill_s"] = prefill_s
    out["prefill_x_bare"] = {k: v / prefill_s["none"] for k, v in prefill_s.items()}
    out["decode_tokens_per_s"] = {k: 1 / v for k, v in decode_s.items()}
    shutil.rmtree(folder, ignore_errors=True)
    return out


def run(out: str | Path = "bench-routing.json", *, ns: tuple[int, ...] = (10, 100, 1000), peft: bool = True,
        whole_model: bool = True, real: bool = True, work: str | Path | None = None,
        threads: int | None = None) -> dict[str, Any]:
    """Run both parts, print tables, write JSON; returns the payload."""
    if threads:
        torch.set_num_threads(threads)
    tmp = Path(work) if work else Path(tempfile.mkdtemp(prefix="lag-bench-"))
    payload: dict[str, Any] = {"benchmark": "routing", "machine": machine()}
    try:
        rows = bench_modules(list(ns), tmp, peft=peft)
        payload["modules"] = rows
        print_table(rows, ["N", "mode", "prefill_ms", "prefill_overhead", "decode_ms", "decode_overhead"],
                    title="One SmolLM2-135M MLP block (576/1536), rank 6: overhead = time / bare - 1")
        payload["targets"] = _module_targets(rows)
        if whole_model:
            model = bench_model(tmp, peft=peft, real=real)
            payload["model"] = model
            table = [{"mode": k, "prefill_s": v, "prefill_x_bare": model["prefill_x_bare"][k],
                      "decode_tok_s": model["decode_tokens_per_s"][k]} for k, v in model["prefill_s"].items()]
            print_table(table, ["mode", "prefill_s", "prefill_x_bare", "decode_tok_s"],
                        title=f"{model['model']}, {model['n_adapters']} rank-6 MLP adapters, "
                        f"{model['tokens']}-token prefill")
            print({k: model[k] for k in model if k.endswith(("_s", "_per_s", "speedup_vs_peft"))
                   and not isinstance(model[k], dict)})
            payload["targets"].update(_model_targets(model))
        print_table([{"target": k, **v} for k, v in payload["targets"].items()],
                    ["target", "measured", "goal", "met"], title="Targets")
    finally:
        if not work:
            shutil.rmtree(tmp, ignore_errors=True)
    save_results(out, payload)
    return payload


def _row(rows: list[dict[str, Any]], N: int, mode: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["N"] == N and r["mode"] == mode), None)


def _module_targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    lag, arrow, spectr = _row(rows, 1000, "lag(k=20)"), _row(rows, 1000, "arrow"), _row(rows, 1000, "spectr")
    if lag and arrow and spectr:
        ratio = lag["decode_overhead"] / max(arrow["decode_overhead"], 1e-9)
        targets["decode: lag(k=20) overhead / arrow's (N=1000)"] = {"measured": ratio, "goal": "<= 1.3",
                                                                    "met": ratio <= 1.3}
        ratio = spectr["decode_overhead"] / max(lag["decode_overhead"], 1e-9)
        targets["decode: spectr overhead / lag(k=20)'s (N=1000)"] = {"measured": ratio, "goal": ">= 3",
                                                                     "met": ratio >= 3}
        ratio = lag["prefill_ms"] / spectr["prefill_ms"]
        targets["prefill: lag(k=20) time / spectr's (N=1000)"] = {"measured": ratio, "goal": "<= 1",
                                                                  "met": ratio <= 1}
    two = _row(rows, 1000, "two-level")
    if two and lag:  # the pipeline's default against the paper's lag
        ratio = two["decode_overhead"] / max(lag["decode_overhead"], 1e-9)
        targets["decode: two-level overhead / lag(k=20)'s (N=1000)"] = {"measured": ratio, "goal": "<= 1.2",
                                                                    "met": ratio <= 1.2}
    return targets


def _model_targets(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    targets = {"compile adapters/s": {"measured": model["compile_adapters_per_s"], "goal": ">= 50",
                                      "met": model["compile_adapters_per_s"] >= 50}}
    if "prefill_speedup_vs_peft" in model:
        v = model["prefill_speedup_vs_peft"]
        targets["whole-model prefill speed-up vs PEFT Arrow (N=100)"] = {"measured": v, "goal": ">= 10",
                                                                         "met": v >= 10}
        v = model["load_speedup_vs_peft"]
        targets["library load+attach speed-up vs PEFT Arrow build"] = {"measured": v, "goal": ">= 20",
                                                                       "met": v >= 20}
    return targets
