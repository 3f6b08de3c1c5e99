"""``lag bench routing`` / ``scale`` / ``dispatch`` / ``reliability`` / ``serve`` / ``build``: benchmarks that
print a table and write JSON."""

from __future__ import annotations

import argparse


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v.replace("k", "000")) for v in text.split(",") if v)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (tables + JSON; results belong in BENCHMARKS.md)")
    bench = p.add_subparsers(dest="bench", metavar="BENCH", required=True, help="the benchmark to run")

    r = bench.add_parser("routing", help="routing overhead per mode vs the bare model and PEFT Arrow")
    r.add_argument("--out", default="bench-routing.json", help="JSON results file")
    r.add_argument("--n", type=_ints, default=(10, 100, 1000), help="library sizes, e.g. 10,100,1000")
    r.add_argument("--no-peft", action="store_true", help="skip PEFT create_arrow_model comparisons")
    r.add_argument("--no-model", action="store_true", help="skip the whole-model part (SmolLM2-135M, N=100)")
    r.add_argument("--random-model", action="store_true",
                   help="whole-model part on a random SmolLM2-shaped model instead of the embedded one")
    r.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    r.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed)")
    r.set_defaults(func=_routing)

    s = bench.add_parser("scale", help="100k-adapter libraries: approximate Arrow, mmap, memory, load time")
    s.add_argument("--out", default="bench-scale.json", help="JSON results file")
    s.add_argument("--n", type=_ints, default=(1000, 10000, 100000), help="library sizes, e.g. 1k,10k,100k")
    s.add_argument("--layers", type=int, default=None,
                   help="adapted layers (default: all 30, fewer for large N when disk demands; stated)")
    s.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                   help="storage dtype of the random libraries")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--work", default=None, help="folder for the generated libraries (kept for reuse)")
    s.add_argument("--index", default="hnsw", choices=["hnsw", "ivf"],
                   help="approximate Arrow index of the libraries from 4096 adapters up (default hnsw)")
    s.add_argument("--effort", type=_ints, default=(), metavar="LIST",
                   help="also measure the approximate Arrow stage at these search breadths (HNSW efSearch / "
                   "IVF nprobe), e.g. 128,256,512")
    s.set_defaults(func=_scale)

    d = bench.add_parser("dispatch", help="candidate-product strategies vs the auto cost model's choice")
    d.add_argument("--out", default="bench-dispatch.json", help="JSON results file")
    d.add_argument("--tokens", type=_ints, default=(1, 8, 32, 128, 256), help="token counts, e.g. 1,32,256")
    d.add_argument("--n", type=_ints, default=(100, 1000), help="library sizes")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    d.set_defaults(func=_dispatch)

    f = bench.add_parser("reliability",
                         help="fault-injection trials: kills, concurrent writers, full disk, ...")
    f.add_argument("--out", default="bench-reliability.json", help="JSON results file")
    f.add_argument("--trials", type=int, default=10, help="trials per scenario (default 10)")
    f.add_argument("--seconds", type=float, default=20.0, help="duration of the readers-during-writes run")
    f.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed)")
    f.add_argument("--seed", type=int, default=0, help="random seed")
    f.set_defaults(func=_reliability)

    v = bench.add_parser("serve", help="load on lag serve (1-16 clients, mixed modes) vs in-process LAGLLM")
    v.add_argument("--out", default="bench-serve.json", help="JSON results file")
    v.add_argument("--n", type=int, default=1000, help="adapters in the knowledge library (default 1000)")
    v.add_argument("--clients", type=_ints, default=(1, 4, 8, 16), help="concurrency levels, e.g. 1,4,8,16")
    v.add_argument("--max-tokens", dest="max_tokens", type=int, default=32, help="max_tokens per request")
    v.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="the server's --max-batch")
    v.add_argument("--work", default=None, help="folder for the library and index (default: the user cache)")
    v.add_argument("--no-baseline", dest="no_baseline", action="store_true",
                   help="skip the in-process LAGLLM baseline")
    v.set_defaults(func=_serve)

    b = bench.add_parser("build",
                         help="adapters/hour of adapter builds: local 1 / 2 workers, Ray 1 / 2 actors")
    b.add_argument("--out", default="bench-build.json", help="JSON results file")
    b.add_argument("--docs", type=int, default=4,
                   help="documents of the bundled benchmark to build (default 4)")
    b.add_argument("--configs", default="local-1,local-2,ray-1,ray-2",
                   help="comma-separated configurations (default: all four)")
    b.add_argument("--steps", type=int, default=None,
                   help="training steps per adapter (default: the recipe's)")
    b.add_argument("--tiny", action="store_true",
                   help="a tiny random model and short recipe: checks the harness, measures nothing")
    b.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed)")
    b.set_defaults(func=_build)


def _routing(args: argparse.Namespace) -> int:
    from ..bench.routing import run

    run(args.out, ns=args.n, peft=not args.no_peft, whole_model=not args.no_model, real=not args.random_model,
        work=args.work, threads=args.threads)
    return 0


def _scale(args: argparse.Namespace) -> int:
    from ..bench.scale import run

    run(args.out, ns=args.n, layers=args.layers, dtype=args.dtype, work=args.work, threads=args.threads,
        efforts=tuple(args.effort), index=args.index)
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    import torch

    from ..bench.dispatch import run

    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.out, tokens=args.tokens, ns=args.n)
    return 0


def _reliability(args: argparse.Namespace) -> int:
    from ..bench.reliability import run

    payload = run(args.out, trials=args.trials, seconds=args.seconds, work=args.work, seed=args.seed)
    return 0 if all(r["survived"] == r["trials"] for r in payload["rows"]) else 1


def _serve(args: argparse.Namespace) -> int:
    from ..bench.serve import run

    payload = run(args.out, n=args.n, clients=args.clients, max_tokens=args.max_tokens,
                  max_batch=args.max_batch, work=args.work, baseline=not args.no_baseline)
    return 0 if all(t["met"] for t in payload["targets"].values()) else 1


def _build(args: argparse.Namespace) -> int:
    from ..bench.build import run

    payload = run(args.out, docs=args.docs, configs=tuple(c for c in args.configs.split(",") if c),
                  tiny=args.tiny, work=args.work, steps=args.steps)
    return 0 if all(t["met"] for t in payload["targets"].values()) else 1
