"""``lag bench build``: adapters per hour of the knowledge-adapter build, locally (1 worker, ``--workers 2``)
and on Ray (1 and 2 actors on this machine), the same documents and recipe, and the Ray driver's overhead per
adapter (scheduling and transfer), so the scaling per added machine can be projected."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..data import read_documents
from ..eval.synthetic import packaged_path
from .common import machine, print_table, save_results

#: configuration -> (backend, workers, threads or CPUs per worker); every one uses all the machine's cores
CONFIGS = ("local-1", "local-2", "ray-1", "ray-2")
TARGET_OVERHEAD = 0.05  # Ray's scheduling and transfer per adapter, as a share of the adapter's build time
TARGET_RAY_VS_LOCAL = 0.10  # Ray with 2 actors within this of local --workers 2 (adapters/hour)


def _same(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run(out: str | Path, *, docs: int = 4, configs: tuple[str, ...] = CONFIGS, tiny: bool = False,
        work: str | Path | None = None, steps: int | None = None) -> dict[str, Any]:
    """Build the first ``docs`` documents of the bundled benchmark once per configuration (each from scratch)
    and compare. ``tiny``: a tiny random model and a short recipe (a quick check of the harness, not a
    measurement)."""
    from ..training import KnowledgeRecipe, build_knowledge_adapters

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration {unknown[0]!r}; expected some of {CONFIGS}")
    documents = read_documents(packaged_path("benchmark") / "documents.jsonl")[:docs]
    scratch = Path(work) if work else Path(tempfile.mkdtemp(prefix="lag-bench-build-"))
    scratch.mkdir(parents=True, exist_ok=True)
    cores = torch.get_num_threads()
    recipe = KnowledgeRecipe()
    base: Any = None
    if tiny:
        from ..testing import make_tiny_model_dir

        base = make_tiny_model_dir(scratch / "tiny")
        recipe = KnowledgeRecipe(rank=4, alpha=8.0, steps=20, n_rewrites=0, qa=False, bf16=False)
    if steps is not None:
        recipe = recipe.replace(steps=steps)
    rows: list[dict[str, Any]] = []
    cluster_s = None
    try:
        for name in configs:
            backend, n = name.split("-")
            workers = int(n)
            target = scratch / name
            shutil.rmtree(target, ignore_errors=True)
            kwargs: dict[str, Any] = {"workers": workers}
            if backend == "ray":
                if cluster_s is None:
                    import ray

                    start = time.perf_counter()
                    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                             configure_logging=False)
                    cluster_s = time.perf_counter() - start
                kwargs.update(ray_address="auto", ray_cpus_per_worker=cores / workers)
            start = time.perf_counter()
            report = build_knowledge_adapters(documents, target, base=base, recipe=recipe, progress=False,
                                              **kwargs)
            wall = time.perf_counter() - start
            per = [m["timings"]["total_s"] for m in report.metadata.values()]
            row: dict[str, Any] = {
                "config": name, "adapters": len(report.built), "failed": len(report.failed), "wall_s": wall,
                "adapters_per_hour": 3600.0 * len(report.built) / wall, "per_adapter_s": sum(per) / len(per),
            }
            if report.workers:
                stats = list(report.workers.values())
                built = sum(s["adapters"] for s in stats)
                row["overhead_per_adapter_s"] = sum(s["overhead_s"] for s in stats) / max(built, 1)
                row["overhead_share"] = row["overhead_per_adapter_s"] / row["per_adapter_s"]
                row["worker_start_s"] = max(s["start_s"] for s in stats)
                row["workers"] = report.workers
            rows.append(row)
        by = {r["config"]: r for r in rows}
        if "local-1" in by and "ray-1" in by:  # the same threads per worker: the same bytes
            by["ray-1"]["identical_to_local"] = all(_same(scratch / "local-1" / d, scratch / "ray-1" / d)
                                                    for d in (doc.id for doc in documents))
        if "local-2" in by and "ray-2" in by:
            by["ray-2"]["identical_to_local"] = all(_same(scratch / "local-2" / d, scratch / "ray-2" / d)
                                                    for d in (doc.id for doc in documents))
    finally:
        if cluster_s is not None:
            import ray

            ray.shutdown()
        if not work:
            shutil.rmtree(scratch, ignore_errors=True)
    targets = {}
    ray_rows = [r for r in rows if "overhead_share" in r]
    if ray_rows:
        worst = max(r["overhead_share"] for r in ray_rows)
        targets["ray_overhead"] = {"value": worst, "goal": f"<= {TARGET_OVERHEAD:.0%} of an adapter's time",
                                   "met": worst <= TARGET_OVERHEAD}
    if "local-2" in by and "ray-2" in by:
        ratio = by["ray-2"]["adapters_per_hour"] / by["local-2"]["adapters_per_hour"]
        targets["ray2_vs_local2"] = {"value": ratio, "goal": f">= {1 - TARGET_RAY_VS_LOCAL:.2f}",
                                     "met": ratio >= 1 - TARGET_RAY_VS_LOCAL}
    print_table(rows, ["config", "adapters", "failed", "wall_s", "adapters_per_hour", "per_adapter_s",
                       "overhead_per_adapter_s", "overhead_share", "worker_start_s", "identical_to_local"],
                title=f"Adapter builds ({len(documents)} documents, "
                f"{'tiny model' if tiny else 'SmolLM2-135M'}, {cores} cores; Ray cluster start "
                f"{cluster_s or 0:.1f} s, not in wall_s)")
    for key, t in targets.items():
        print(f"target {key}: {t['value']:.3f} (goal {t['goal']}): {'met' if t['met'] else 'MISSED'}")
    payload = {"benchmark": "build", "machine": machine(), "documents": [d.id for d in documents],
               "recipe": recipe.to_dict(), "tiny": tiny, "cluster_start_s": cluster_s, "rows": rows,
               "targets": targets}
    save_results(out, payload)
    return payload
