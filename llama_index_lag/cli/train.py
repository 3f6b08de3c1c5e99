"""``lag build-adapters`` (one knowledge adapter per document) and ``lag train-task`` (a task adapter)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import stop_on_sigterm
from ._documents import add_document_args, documents_from


def _recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe (defaults: the measured ones; see lag_adapter.json of any adapter)")
    g.add_argument("--recipe", metavar="JSON_FILE",
                   help="recipe fields as a JSON object (flags below override it)")
    g.add_argument("--steps", type=int, help="training steps per adapter")
    g.add_argument("--rank", type=int, help="LoRA rank (alpha follows as 2 x rank unless --alpha)")
    g.add_argument("--alpha", type=float, help="LoRA alpha")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--batch-size", type=int, help="examples per step")
    g.add_argument("--init", choices=["eva", "eva-peft", "eva-contrastive", "default"],
                   help="LoRA initialisation (eva-contrastive: the document's principal directions minus the "
                   "library's; knowledge adapters only)")
    g.add_argument("--eva-contrast", type=float,
                   help="eva-contrastive: weight of the library's mean covariance (default 1)")
    g.add_argument("--targets", help="comma-separated target modules, e.g. gate_proj,up_proj,down_proj")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default=None,
                   help="bfloat16 autocast while training (auto: on CPUs with AMX)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import ConfigError

    fields: dict[str, Any] = {}
    if args.recipe:
        try:
            data = json.loads(Path(args.recipe).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ConfigError(f"cannot read the recipe: {exc}", path=args.recipe) from None
        if not isinstance(data, dict):
            raise ConfigError("the recipe must be a JSON object", path=args.recipe)
        fields.update(data)
    for name in ("steps", "rank", "alpha", "lr", "batch_size", "init", "eva_contrast"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.rank is not None and args.alpha is None and "alpha" not in fields:
        fields["alpha"] = 2.0 * args.rank
    if args.targets:
        fields["target_modules"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if args.bf16 is not None:
        fields["bf16"] = {"auto": None, "on": True, "off": False}[args.bf16]
    return fields


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build-adapters",
        help="train one knowledge adapter (PEFT LoRA) per document, optionally compile them into a library",
        description="For every document: the base model writes a rewrite and question-answer pairs, a LoRA "
        "(EVA init) is trained on the document, the rewrite, sentence facts and the QA pairs, and saved as "
        "ADAPTERS_DIR/<name> (a standard PEFT folder + lag_adapter.json; name: the document id, or a safe "
        "folder name derived from it). Re-running skips finished "
        "adapters; an interrupted run never leaves a half-written one.",
    )
    add_document_args(p)
    p.add_argument("--out", required=True, metavar="ADAPTERS_DIR", help="folder of the adapter folders")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--compile", metavar="LIB_DIR", default=None,
                   help="then compile all the documents' adapters into a knowledge library here")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes (each loads its own model; threads are split; default 1); "
                   "with --ray: Ray workers (default: as many as the cluster's CPUs / GPUs hold)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="rebuild adapters that are already finished")
    ray = p.add_argument_group("Ray (pip install \"llama-index-lag[ray]\")")
    ray.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                     help="build on a Ray cluster: auto = this machine's cluster (ray start), else a local "
                     "one; or HOST:PORT. --out (and --compile) must be paths every node sees")
    ray.add_argument("--ray-cpus-per-worker", type=float, default=1.0,
                     help="CPUs per Ray worker, also its torch threads (default 1)")
    ray.add_argument("--ray-gpus-per-worker", type=float, default=0.0,
                     help="GPUs per Ray worker; > 0 trains on the worker's GPU (default 0)")
    ray.add_argument("--retries", type=int, default=2,
                     help="with --ray: attempts after a worker died or a document failed, before the "
                     "document is reported as failed (default 2)")
    p.add_argument("--no-generate", action="store_true",
                   help="skip model-written rewrites and QA pairs (deterministic augmentations only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace folders at ADAPTERS_DIR/<name> or --compile that "
                        "llama-index-lag did not write")
    _recipe_args(p)
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "sync",
        help="update an index and a knowledge library after documents were added, edited or removed",
        description="Compares the documents with the knowledge library (document ids, text hashes): builds "
        "adapters only for added and changed documents, removes those of removed ones (one atomic library "
        "rewrite), and re-embeds the index (atomic replace). A missing library or index is built. "
        "Re-running after an interruption resumes.",
    )
    add_document_args(p)
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="the index folder to update")
    p.add_argument("--knowledge", required=True, metavar="LIB_DIR", help="the knowledge library to update")
    p.add_argument("--adapters", metavar="ADAPTERS_DIR", default=None,
                   help="the folder of the adapter folders (default: where the library's adapters are)")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--embed-model", metavar="DIR", default=None,
                   help="local sentence-transformers folder (default: offline MiniLM)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes for the adapters")
    p.add_argument("--no-generate", action="store_true",
                   help="skip model-written rewrites and QA pairs (deterministic augmentations only)")
    p.add_argument("--dry-run", action="store_true", help="only report what would change")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _recipe_args(p)
    p.set_defaults(func=_sync)

    p = sub.add_parser(
        "train-task",
        help="train a task adapter (PEFT LoRA) on {prompt, answer} examples",
        description="Trains a LoRA on examples.jsonl lines {\"prompt\", \"answer\"} in the chat template "
        "(loss on the answer) and writes OUT (a standard PEFT folder + lag_adapter.json with kind 'task'). "
        "Compile several with `lag compile --kind task`.",
    )
    p.add_argument("--data", required=True, metavar="EXAMPLES_JSONL",
                   help="training examples ({prompt, answer} per line)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="adapter folder to write (its name = adapter name)")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=float, help="epochs over the examples (when --steps is not given)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT even if llama-index-lag did not write it")
    _recipe_args(p)
    p.set_defaults(func=_train_task)


def _build(args: argparse.Namespace) -> int:
    from ..training import KnowledgeRecipe, build_knowledge_adapters

    fields = _overrides(args)
    if args.no_generate:
        fields.update(n_rewrites=0, qa=False)
    recipe = KnowledgeRecipe.from_dict({**KnowledgeRecipe().to_dict(), **fields})
    with stop_on_sigterm():
        docs = documents_from(args, args.out, args.compile)
        report = build_knowledge_adapters(docs, args.out, base=args.base, recipe=recipe, seed=args.seed,
                                          workers=args.workers, compile_to=args.compile,
                                          progress=not args.quiet, overwrite=args.overwrite, force=args.force,
                                          ray_address=args.ray, ray_cpus_per_worker=args.ray_cpus_per_worker,
                                          ray_gpus_per_worker=args.ray_gpus_per_worker, retries=args.retries)
    times = [m["timings"]["total_s"] for d, m in report.metadata.items() if d in report.built]
    mean = f", {sum(times) / len(times):.1f} s per adapter" if times else ""
    rate = f", {report.adapters_per_hour:.0f} adapters/hour" if report.adapters_per_hour else ""
    print(f"{report.out}: built {len(report.built)}, already finished {len(report.skipped)}, failed "
          f"{len(report.failed)}{mean}{rate} ({report.seconds:.0f} s)")
    for worker, w in report.workers.items():
        per = w["busy_s"] / max(w["adapters"], 1)
        print(f"  worker {worker}: {w['adapters']} adapters, {per:.1f} s each, up after {w['start_s']:.1f} s "
              f"(model {w['load_s']:.1f} s), scheduling and transfer {w['overhead_s']:.2f} s")
    for doc_id, reason in report.failed.items():
        print(f"  failed: {doc_id}: {reason}")
    if report.library is not None:
        print(f"knowledge library: {report.library} ({len(report.metadata)} adapters)")
    return 1 if report.failed else 0


def _sync(args: argparse.Namespace) -> int:
    from ..models import load_embed_model
    from ..training import KnowledgeRecipe
    from ..training.sync import sync_documents

    fields = _overrides(args)
    if args.no_generate:
        fields.update(n_rewrites=0, qa=False)
    recipe = KnowledgeRecipe.from_dict({**KnowledgeRecipe().to_dict(), **fields})
    docs = documents_from(args, args.index, args.knowledge, args.adapters)
    embed = load_embed_model(args.embed_model) if args.embed_model else None
    with stop_on_sigterm():
        report = sync_documents(docs, index_dir=args.index, library_dir=args.knowledge,
                                adapters_dir=args.adapters, base=args.base, recipe=recipe, seed=args.seed,
                                workers=args.workers, embed_model=embed, progress=not args.quiet,
                                dry_run=args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    print(f"{len(report.added)} added, {len(report.changed)} changed, {len(report.removed)} removed, "
          f"{len(report.unchanged)} unchanged ({verb}; {report.seconds:.0f} s)")
    for what in ("added", "changed", "removed"):
        for doc_id in getattr(report, what):
            print(f"  {what}: {doc_id}")
    return 0


def _train_task(args: argparse.Namespace) -> int:
    from ..training import TaskRecipe, train_task_adapter

    fields = _overrides(args)
    if args.epochs is not None:
        fields["epochs"] = args.epochs
        fields.setdefault("steps", 0)
    recipe = TaskRecipe.from_dict({**TaskRecipe().to_dict(), **fields})
    meta = train_task_adapter(args.data, args.out, base=args.base, recipe=recipe, seed=args.seed,
                              force=args.force)
    print(f"{args.out}: task adapter {meta['name']!r} from {meta['examples']} examples, "
          f"{meta['train']['steps']} steps, loss {meta['train']['loss_first']} -> "
          f"{meta['train']['loss_tail_mean']} ({meta['timings']['total_s']:.0f} s)", file=sys.stdout)
    return 0
