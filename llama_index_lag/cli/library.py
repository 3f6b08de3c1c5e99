"""``lag compile`` and ``lag inspect``: build and look at adapter libraries."""

from __future__ import annotations

import argparse
import json
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile PEFT LoRA adapter folders into a LAG adapter library",
        description="Validate PEFT LoRA folders against a base model, align them spectrally and write a "
        "packed, memory-mapped library. Re-running an interrupted compile resumes it.",
    )
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter folders")
    p.add_argument("--kind", required=True, choices=["knowledge", "task"], help="library kind")
    p.add_argument("--base", metavar="MODEL_DIR", default=None,
                   help="base model folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, metavar="LIB_DIR", help="library folder to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of the library")
    p.add_argument("--add", action="store_true", help="add the adapters to the existing library at --out")
    p.add_argument("--arrow-index", default="auto", choices=["auto", "hnsw", "ivf", "none"],
                   help="approximate Arrow index (FAISS) stored with the library: auto = an HNSW index from "
                   "4096 adapters up (with --add: keep the library's); hnsw / ivf = build that type; "
                   "none = no index")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept adapter_model.bin (pickle) files; only for adapters you trust")
    p.add_argument("--force", action="store_true",
                   help="replace --out even if it is not a library (never when it holds an input adapter)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                   help="align the adapters as tasks on a Ray cluster (auto: this machine's cluster, else a "
                   "local one; or HOST:PORT); the adapter folders must be paths every node sees. Needs "
                   "pip install \"llama-index-lag[ray]\"")
    p.set_defaults(func=_compile)

    p = sub.add_parser("inspect", help="show a library's adapters, modules, ranks, size and dtype")
    p.add_argument("library", metavar="LIB_DIR", help="a compiled adapter library")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--health", action="store_true",
                   help="routing health: shared input subspace, and with --prompts the hubness of routing")
    p.add_argument("--prompts", metavar="FILE", help="unlabelled prompts (.txt lines or .jsonl 'question's)")
    p.add_argument("--model", metavar="MODEL_DIR",
                   help="base model for --prompts (default: embedded SmolLM2)")
    p.add_argument("--routing", metavar="JSON", default=None,
                   help="LAGConfig fields for the routed prompts, e.g. '{\"mode\": \"lag\", \"k\": 20}'")
    p.add_argument("--plot", metavar="PNG", default=None, help="write the win-count plot here")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("verify", help="check every byte of a library against its stored checksums",
                       description="Reads the packed tensors and the approximate Arrow index of LIB_DIR and "
                       "checks them against the checksums stored when it was written; exit code 1 names the "
                       "first damaged adapter, module or file.")
    p.add_argument("library", metavar="LIB_DIR", help="a compiled adapter library")
    p.set_defaults(func=_verify)

    p = sub.add_parser("remove", help="remove adapters from a library (atomic rewrite)")
    p.add_argument("library", metavar="LIB_DIR", help="a compiled adapter library")
    p.add_argument("names", nargs="+", metavar="ADAPTER", help="adapter names to remove")
    p.set_defaults(func=_remove)


def _compile(args: argparse.Namespace) -> int:
    from ..library import AdapterLibrary

    start = time.perf_counter()
    if args.add:
        if args.ray:
            print("lag compile: --ray compiles a new library; --add aligns only the new adapters, locally",
                  file=sys.stderr)
            return 2
        lib = AdapterLibrary.load(args.out)
        if lib.kind != args.kind:
            print(f"lag compile: --kind {args.kind} but {args.out} is a {lib.kind} library", file=sys.stderr)
            return 2
        lib.add(args.adapters, allow_pickle=args.allow_pickle)
        if args.arrow_index in ("hnsw", "ivf") and lib.arrow_index_type() != args.arrow_index:
            lib.build_arrow_index(kind=args.arrow_index)
    else:
        from ..models import resolve_model_dir

        wanted = {"auto": None, "none": False}.get(args.arrow_index, args.arrow_index)
        lib = AdapterLibrary.compile(args.adapters, kind=args.kind, base_model=resolve_model_dir(args.base),
                                     out=args.out, dtype=args.dtype, allow_pickle=args.allow_pickle,
                                     arrow_index=wanted, force=args.force, ray_address=args.ray)
    seconds = time.perf_counter() - start
    print(f"{lib.path}: {len(lib)} {lib.kind} adapters, {len(lib.modules)} modules, r_max {lib.r_max}, "
          f"{lib.manifest['dtype']} ({len(args.adapters) / max(seconds, 1e-9):.1f} adapters/s)")
    return 0


def _health(args: argparse.Namespace) -> int:
    from ..config import LAGConfig
    from ..errors import ConfigError
    from ..health import read_prompts
    from ..library import AdapterLibrary

    lib = AdapterLibrary.load(args.library)
    prompts = read_prompts(args.prompts) if args.prompts else None
    config = None
    if args.routing:
        try:
            config = LAGConfig.from_dict(json.loads(args.routing))
        except (ValueError, RecursionError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"--routing is not a JSON object: {exc}", field="routing") from None
    report = lib.health(args.model, prompts, config=config)
    if args.plot:
        report.plot(args.plot)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    d = report.to_dict()
    sp = d["spectrum"]
    print(f"library   {d['path']} ({d['adapters']} adapters)")
    print(f"spectrum  P's top eigenvalue / isotropic r/n: median {sp['top_ratio']['median']}, max "
          f"{sp['top_ratio']['max']}; top-{sp['m']} share of the mean rank: median "
          f"{sp['shared_mass']['median']}")
    print("overlap   " + ", ".join(f"{a['adapter']} {a['overlap']}" for a in sp["most_overlapping"])
          + f" (mean {sp['overlap_mean']})")
    r = d["routing"]
    if r:
        print(f"routing   {r['prompts']} prompts, {r['selections']} selections: skewness {r['skewness']}, "
              f"top 1 % ({r['top1pct_adapters']}) take {100 * r['top1pct_share']:.1f} % (even "
              f"{100 * r['even_share']:.1f} %), {r['never_selected']} never selected, "
              f"wins~overlap r = {r['wins_overlap_r']}")
        print("hubs      " + ", ".join(f"{h['adapter']} {100 * h['share']:.1f} %" for h in r["hubs"]))
    for flag in d["flags"]:
        print(f"FLAG      {flag}")
    if not d["flags"]:
        print("OK        no hub or shared-subspace flag")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ..library import AdapterLibrary

    if args.health:
        return _health(args)
    info = AdapterLibrary.load(args.library).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"library   {info['path']}")
    print(f"kind      {info['kind']}")
    print(f"adapters  {info['adapters']}  (ranks {info['ranks']['min']}..{info['ranks']['max']}, "
          f"r_max {info['ranks']['r_max']})")
    print(f"dtype     {info['dtype']}")
    print(f"size      {info['size_bytes'] / 2**20:.1f} MiB")
    print(f"arrow     {info['arrow_index'] or 'exact scan (no approximate index)'}")
    base = info["base_model"]
    print(f"base      {base.get('architecture')} hidden {base.get('hidden_size')} "
          f"layers {base.get('num_hidden_layers')}")
    print(f"modules   {info['modules']}")
    for pattern, count in info["module_patterns"].items():
        print(f"  {count:4d} x {pattern}")
    names = info["names"]
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    print(f"names     {shown}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ..library import AdapterLibrary

    start = time.perf_counter()
    report = AdapterLibrary.load(args.library).verify()
    what = (f"{report['blocks']} checksummed blocks" if report["checksums"]
            else "no checksums stored (format 1: recompile to add them); values checked")
    index = report["arrow_index"]
    print(f"{report['path']}: OK, {report['adapters']} adapters, {report['bytes'] / 2**20:.1f} MiB, {what}"
          + (f"; Arrow index ({index['type']}, {index['files']} files) matches" if index else "")
          + f" ({time.perf_counter() - start:.1f} s)")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ..library import AdapterLibrary

    lib = AdapterLibrary.load(args.library).remove(args.names)
    print(f"{lib.path}: {len(lib)} adapters left")
    return 0
