"""``lag demo``: the main job on the embedded default model and the bundled example documents."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="end to end on the embedded model + bundled documents: none / RAG / LAG / RAG+LAG side by side",
        description="Prepare SmolLM2-135M-Instruct, build one knowledge adapter per bundled fictional "
        "document, index them, answer questions under none / RAG / LAG / RAG+LAG, and write a routing "
        "heat-map. Everything is cached (default: <user cache>/demo), so later runs only answer.",
    )
    p.add_argument("--out", default=None, help="work folder (default: <user cache>/demo)")
    p.add_argument("--questions", type=int, default=4, help="questions to answer (default 4)")
    p.add_argument("--k", type=int, default=3,
                   help="Arrow candidates per token (default 3 of the 5 adapters)")
    p.add_argument("--workers", type=int, default=1, help="processes building adapters")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per answer")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, n_questions=args.questions, k=args.k, workers=args.workers,
             max_new_tokens=args.max_new_tokens)
    return 0
