"""``lag make-benchmark``: write a synthetic benchmark of fictional entities (or the demo instance)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "make-benchmark",
        help="write a synthetic benchmark (documents, questions, task training sets)",
        description="Generate documents about fictional entities, QA and true/false questions about them, "
        "and the task-adapter training sets, deterministically from --n-docs and --seed. Writes "
        "documents.jsonl, questions.jsonl, tasks/fact_check.jsonl, tasks/short_answer.jsonl and "
        "benchmark.json into --out. With --demo, writes the small hand-checked demo instance instead.",
    )
    p.add_argument("--n-docs", type=int, default=None, metavar="N", help="number of documents (default: 60)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed (default: 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files replaced)")
    p.add_argument("--demo", action="store_true", help="write the 5-document demo instance instead")
    p.add_argument(
        "--questions-per-doc",
        type=int,
        nargs=2,
        default=(3, 5),
        metavar=("MIN", "MAX"),
        help="QA questions per document (default: 3 5)",
    )
    p.add_argument(
        "--fact-checks-per-doc", type=int, default=2, metavar="K", help="true/false claims per document"
    )
    p.add_argument("--slots-per-doc", type=int, default=1, metavar="K",
                   help="slot-filling questions ('<entity> | <relation>') per document")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.synthetic import DEFAULT_N_DOCS, DEFAULT_SEED, make_benchmark, make_demo, write_benchmark

    if args.demo:
        if args.n_docs is not None or args.seed is not None:
            raise ConfigError("--demo writes the fixed demo instance; it takes no --n-docs or --seed")
        bench = make_demo()
    else:
        bench = make_benchmark(
            DEFAULT_N_DOCS if args.n_docs is None else args.n_docs,
            DEFAULT_SEED if args.seed is None else args.seed,
            questions_per_doc=tuple(args.questions_per_doc),
            fact_checks_per_doc=args.fact_checks_per_doc,
            slots_per_doc=args.slots_per_doc,
        )
    paths = write_benchmark(bench, args.out)
    counts = bench.counts()
    questions = ", ".join(f"{n} {task}" for task, n in counts["questions"].items())
    print(f"wrote {bench.name} to {args.out}")
    print(f"  documents: {counts['documents']} ({', '.join(f'{n} {k}' for k, n in counts['kinds'].items())})")
    print(f"  questions: {questions} (fact: {counts['fact_true']} true, {counts['fact_false']} false)")
    for task, n in counts["tasks"].items():
        print(f"  task set {task}: {n} examples")
    print(f"  confuser pairs: {counts['confusers']}")
    for path in paths.values():
        print(f"  {path}")
    return 0
