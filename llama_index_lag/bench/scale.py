"""``lag bench scale``: LAG with 1k / 10k / 100k adapters — approximate Arrow, memory-mapped adapters.

Libraries are synthesised by the benchmark (``AdapterLibrary.from_aligned``): rank-6 adapters of
SmolLM2-135M shape on the MLP modules of the first ``layers`` layers (all 30 while disk allows; fewer for
large N — the table states how many). Like trained (EVA-initialised) LoRAs, each adapter's input directions
lie in the dominant subspace of the model's own activations at that module (top-64 directions of real hidden
states, plus noise), so the synthetic prototypes are structured the way real ones are.

Measured per N: library size, load + attach time, resident memory (anonymous vs file-backed), routing cost of
one module (decode: 1 token, prefill: 256 tokens; exact and approximate Arrow), recall@k of the approximate
stage and agreement of the final LAG choice with exact (on real activations), end-to-end 256-token prefill and
KV-cached decode tokens/s vs the bare model.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import LAGConfig
from ..library import AdapterLibrary
from ..router import attach_lag
from ..routing.engine import route_tokens
from .common import SMOLLM2_SHAPES, decode_seconds, machine, print_table, save_results, timeit
from .routing import _load_model

RANK = 6
K = 20
BYTES_PER_LAYER = {"float16": 2, "bfloat16": 2, "float32": 4}


def _text() -> str:
    from ..data import packaged_path, read_documents

    docs = read_documents(packaged_path("benchmark") / "documents.jsonl")
    return " ".join(d.text for d in docs[:12])


def default_layers(n: int) -> int:
    """Adapted layers per library size, so every library fits in a few GB to ~16 GB of disk (float16)."""
    return 30 if n <= 1000 else 6 if n <= 10_000 else 2


def library_bytes(n: int, layers: int, dtype: str) -> int:
    h, i = SMOLLM2_SHAPES["hidden_size"], SMOLLM2_SHAPES["intermediate_size"]
    per_layer = RANK * (2 * h + i) + RANK * (2 * i + h) + (2 * h + i)  # A*, B*, prototypes
    return n * layers * per_layer * BYTES_PER_LAYER[dtype]


@torch.no_grad()
def activations(model: torch.nn.Module, tokenizer: Any, modules: list[str],
                tokens: int = 512) -> dict[str, torch.Tensor]:
    """Inputs [S, n] of each module on real text (the bare model)."""
    ids = tokenizer(_text(), return_tensors="pt")["input_ids"][:, :tokens] if tokenizer is not None else \
        torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, name=m: seen.__setitem__(
            name, args[0].reshape(-1, args[0].shape[-1]).float().clone()))
        for m in modules]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def make_generator(acts: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], seed: int = 0,
                   d: int = 64, noise: float = 0.3, decay: float = 0.5, scale: float = 0.05) -> Any:
    """Aligned factors whose input directions live in each module's top-d activation subspace."""
    bases = {}
    for m, x in acts.items():
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        bases[m] = (vh[:d].T.contiguous(), (s[:d] / s[0]))  # [n, d], [d]
    order = {m: i for i, m in enumerate(sorted(shapes))}
    spectrum = scale * decay ** torch.arange(RANK, dtype=torch.float32)

    def generate(module: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + order[module] * 10_007 + int(rows[0]))
        m, n = shapes[module]
        U, s = bases[module]
        K_ = rows.numel()
        coeff = torch.randn(K_, U.shape[1], RANK, generator=g) * s[None, :, None]  # [K, d, r]
        dirs = U @ coeff + noise / np.sqrt(n) * torch.randn(K_, n, RANK, generator=g)  # [K, n, r]
        a_star = torch.linalg.qr(dirs)[0].transpose(1, 2)  # [K, r, n] orthonormal rows
        b_star = torch.linalg.qr(torch.randn(K_, m, RANK, generator=g))[0] * spectrum  # [K, m, r]
        return a_star, b_star

    return generate


def build_library(work: Path, n: int, layers: int, dtype: str, model: torch.nn.Module,
                  acts: dict[str, torch.Tensor], seed: int = 0, index: str = "hnsw") -> AdapterLibrary:
    """Synthesise (or reuse) the library for (n, layers, dtype); from 4096 adapters up it carries an
    approximate Arrow index of type ``index`` (rebuilt when a reused library has another type)."""
    out = work / f"lib-{n}-L{layers}-{dtype}"
    marker = out / "bench.json"
    if marker.is_file():
        lib = AdapterLibrary.load(out)
        if n >= 4096 and lib.arrow_index_type() != index:
            lib.build_arrow_index(kind=index)
        return lib
    modules = [m for m in acts if int(m.split(".")[2]) < layers]
    shapes = {m: (model.get_submodule(m).out_features, model.get_submodule(m).in_features) for m in modules}
    gen = make_generator({m: acts[m] for m in modules}, shapes, seed)
    names = [f"a{i:06d}" for i in range(n)]
    lib = AdapterLibrary.from_aligned(names, gen, kind="knowledge", base_model=model, modules=modules,
                                      rank=RANK, out=out, dtype=dtype, source="synthetic (lag bench scale)",
                                      arrow_index=index if n >= 4096 else False, chunk_size=2048)
    marker.write_text(json.dumps({"n": n, "layers": layers, "dtype": dtype, "seed": seed}))
    return lib


def _rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # MiB
    return out


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.no_grad()
def measure(lib_path: Path, model: torch.nn.Module, acts: dict[str, torch.Tensor], ids: torch.Tensor,
            decode_tokens: int, efforts: tuple[int, ...] = ()) -> dict[str, Any]:
    """One library: load, routing cost per module, approximate-stage quality (also for each of ``efforts``),
    end-to-end prefill / decode vs the bare model, resident memory."""
    rss0 = _rss()
    start = time.perf_counter()
    lib = AdapterLibrary.load(lib_path)
    load_s = time.perf_counter() - start
    router = attach_lag(model, lib, LAGConfig(mode="lag", k=K))
    attach_s = time.perf_counter() - start
    rss1 = _rss()
    indexed = router.pools["knowledge"].indexed
    row: dict[str, Any] = {"N": len(lib), "layers": len({m.split(".")[2] for m in lib.modules}),
                           "modules": len(lib.modules), "dtype": lib.manifest["dtype"],
                           "disk_gib": _disk(lib_path) / 2**30, "load_s": load_s, "load_attach_s": attach_s,
                           "arrow": "faiss" if indexed else "exact", "index": lib.arrow_index_type()}
    # routing cost of one module (the first down_proj: n=1536) and approximate-stage quality
    module = next(m for m in lib.modules if m.endswith("down_proj"))
    t = router.pools["knowledge"].tensors(module)
    x = acts[module].to(t.A.dtype)
    for label, xs in (("decode", x[:1]), ("prefill", x[:256])):
        row[f"{label}_module_ms_exact"] = 1e3 * timeit(lambda xs=xs: route_tokens(xs, t, "lag", k=K),
                                                       repeat=3, min_time=0.2)
        if indexed:
            row[f"{label}_module_ms_faiss"] = 1e3 * timeit(
                lambda xs=xs: route_tokens(xs, t, "lag", k=K, approximate=True), repeat=3, min_time=0.2)
    if indexed:
        default = _approx_quality(router, acts, t.index.effort)
        row.update(effort=default["effort"], recall_at_k=default["recall_at_k"],
                   choice_agreement=default["choice_agreement"])
        row["effort_sweep"] = [_approx_quality(router, acts, effort) for effort in efforts]
    # end to end, against the bare model timed in the same rounds
    router, e2e = _end_to_end(model, lib, router, ids, decode_tokens)
    row.update(e2e)
    rss2 = _rss()
    row.update({"rss_attach_mib": rss1["VmRSS"] - rss0["VmRSS"],
                "anon_after_run_mib": rss2["RssAnon"] - rss0["RssAnon"],
                "file_after_run_mib": rss2["RssFile"] - rss0["RssFile"]})
    row["resident_over_disk"] = ((row["anon_after_run_mib"] + row["file_after_run_mib"])
                                 / (row["disk_gib"] * 1024))
    router.detach()
    lib.close()
    return row


def _end_to_end(model: torch.nn.Module, lib: AdapterLibrary, router: Any, ids: torch.Tensor,
                decode_tokens: int, rounds: int = 5) -> tuple[Any, dict[str, float]]:
    """Prefill (256 tokens) and greedy decoding (KV-cached steps after a 32-token prompt, the prompt not
    timed) of the routed model and of the bare one (detached), in alternating rounds so that a slow phase of
    the shared machine hits both alike; ratios are medians of the per-round ratios. Returns the (re-attached)
    router and the figures."""
    config = router.config

    def prefill() -> None:
        model(ids, use_cache=False)

    def decode() -> float:  # seconds per decoded token, after a warm-up generation
        decode_seconds(model, ids[:, :32], 2)
        return decode_seconds(model, ids[:, :32], decode_tokens)

    times: dict[str, list[float]] = {"pre_bare": [], "dec_bare": [], "pre": [], "dec": []}
    for _ in range(rounds):
        router.detach()
        times["pre_bare"].append(timeit(prefill, repeat=1))
        times["dec_bare"].append(decode())
        router = attach_lag(model, lib, config)
        times["pre"].append(timeit(prefill, repeat=1))
        times["dec"].append(decode())
    med = {k: statistics.median(v) for k, v in times.items()}
    return router, {
        "prefill_s": med["pre"], "bare_prefill_s": med["pre_bare"],
        "prefill_x_bare": statistics.median(a / b for a, b in zip(times["pre"], times["pre_bare"])),
        "decode_tok_s": 1 / med["dec"], "bare_decode_tok_s": 1 / med["dec_bare"],
        "decode_x_bare": statistics.median(b / a for a, b in zip(times["dec"], times["dec_bare"])),
    }


def _approx_quality(router: Any, acts: dict[str, torch.Tensor], effort: int) -> dict[str, float]:
    """Recall@k of the approximate Arrow stage, agreement of the final LAG choice with exact routing, and the
    decode cost of one module, at search breadth ``effort`` (HNSW efSearch / IVF nprobe)."""
    pool = router.pools["knowledge"]
    recalls, agree = [], []
    for m in pool.modules:
        tm = pool.tensors(m)
        xm = acts[m][:256].to(tm.A.dtype)
        _, exact = tm.arrow(xm, K)
        _, approx = tm.arrow(xm, K, approximate=True, effort=effort)
        recalls.append(np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(exact, approx)]))
        w_exact = route_tokens(xm, tm, "lag", k=K).chosen
        w_approx = route_tokens(xm, tm, "lag", k=K, approximate=True, effort=effort).chosen
        agree.append(float((w_exact == w_approx).float().mean()))
    module = next(m for m in pool.modules if m.endswith("down_proj"))
    t = pool.tensors(module)
    x1 = acts[module][:1].to(t.A.dtype)
    ms = 1e3 * timeit(lambda: route_tokens(x1, t, "lag", k=K, approximate=True, effort=effort), repeat=3,
                      min_time=0.2)
    return {"effort": effort, "recall_at_k": float(np.mean(recalls)),
            "choice_agreement": float(np.mean(agree)), "decode_module_ms_faiss": ms}


def run(out: str | Path = "bench-scale.json", *, ns: tuple[int, ...] = (1000, 10_000, 100_000),
        layers: int | None = None, dtype: str = "float16", work: str | Path | None = None,
        threads: int | None = None, decode_tokens: int = 32, keep: bool = True,
        efforts: tuple[int, ...] = (), index: str = "hnsw") -> dict[str, Any]:
    """Build (or reuse) a synthetic library per N in ``ns`` and measure it; ``index``: the approximate Arrow
    index type of libraries from 4096 adapters up; ``efforts`` adds a recall / speed sweep of its search
    breadth (HNSW efSearch / IVF nprobe)."""
    if threads:
        torch.set_num_threads(threads)
    work = Path(work) if work else Path.cwd() / "lag-bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    model, model_name = _load_model(True)
    tokenizer = None
    if model_name.startswith("SmolLM2"):
        from ..models import load_causal_lm, resolve_model_dir

        _, tokenizer = load_causal_lm(resolve_model_dir(None))
    mlp = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
           and n.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")]
    acts = activations(model, tokenizer, mlp)
    ids = torch.randint(0, 1000, (1, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        bare = {"prefill_s": timeit(lambda: model(ids, use_cache=False), repeat=2)}
        bare["decode_tok_s"] = 1 / statistics.median(decode_seconds(model, ids[:, :32], decode_tokens)
                                                     for _ in range(3))
    payload: dict[str, Any] = {"benchmark": "scale", "machine": machine(), "model": model_name, "rank": RANK,
                               "k": K, "bare": bare, "rows": []}
    free = shutil.disk_usage(work).free
    for n in ns:
        n_layers = layers or default_layers(n)
        need = library_bytes(n, n_layers, dtype)
        if need > 0.8 * free:
            print(f"skipping N={n}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
            continue
        start = time.perf_counter()
        build_library(work, n, n_layers, dtype, model, acts, index=index)
        build_s = time.perf_counter() - start
        row = measure(work / f"lib-{n}-L{n_layers}-{dtype}", model, acts, ids, decode_tokens, efforts)
        row["build_s"] = build_s
        payload["rows"].append(row)
        print(json.dumps(row), flush=True)
        if not keep:
            shutil.rmtree(work / f"lib-{n}-L{n_layers}-{dtype}", ignore_errors=True)
        free = shutil.disk_usage(work).free
    print_table(payload["rows"],
                ["N", "layers", "index", "arrow", "disk_gib", "load_attach_s", "anon_after_run_mib",
                 "file_after_run_mib", "decode_module_ms_exact", "decode_module_ms_faiss",
                 "recall_at_k", "choice_agreement", "prefill_x_bare", "decode_tok_s", "decode_x_bare"],
                title=f"{model_name}: rank-{RANK} MLP adapters, k={K}, {dtype}; bare decode "
                f"{bare['decode_tok_s']:.1f} tok/s, prefill(256) {bare['prefill_s']:.2f} s")
    sweep = [{"N": r["N"], "index": r["index"], **q} for r in payload["rows"]
             for q in r.get("effort_sweep", [])]
    if sweep:
        print_table(sweep,
                    ["N", "index", "effort", "recall_at_k", "choice_agreement", "decode_module_ms_faiss"],
                    title="Approximate Arrow: search breadth (HNSW efSearch / IVF nprobe) vs quality and "
                    "decode cost per module")
    payload["targets"] = _targets(payload["rows"])
    print_table([{"target": k, **v} for k, v in payload["targets"].items()],
                ["target", "measured", "goal", "met"], title="Targets")
    save_results(out, payload)
    return payload


def _targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_n = {r["N"]: r for r in rows}
    targets: dict[str, dict[str, Any]] = {}
    if 1000 in by_n:
        v = by_n[1000]["decode_x_bare"]
        targets["decode tok/s N=1k (exact) / bare"] = {"measured": v, "goal": ">= 0.6", "met": v >= 0.6}
    if 100_000 in by_n:
        r = by_n[100_000]
        targets["decode tok/s N=100k (approx) / bare"] = {"measured": r["decode_x_bare"], "goal": ">= 0.3",
                                                          "met": r["decode_x_bare"] >= 0.3}
        for key, goal in (("recall_at_k", 0.95), ("choice_agreement", 0.95)):
            if key in r:
                targets[f"{key} N=100k"] = {"measured": r[key], "goal": f">= {goal}", "met": r[key] >= goal}
        resident = r["anon_after_run_mib"] + r["file_after_run_mib"]
        targets["resident MiB N=100k vs disk MiB"] = {
            "measured": f"{resident:.0f} / {r['disk_gib'] * 1024:.0f}", "goal": "well under",
            "met": resident < 0.5 * r["disk_gib"] * 1024}
    if 10_000 in by_n:
        v = by_n[10_000]["load_attach_s"]
        targets["load + attach N=10k (s)"] = {"measured": v, "goal": "< 2", "met": v < 2}
    return targets
