"""``lag eval``: evaluate every mode on a documents + questions set; results.json, results.md, plots."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..modes import BASE_MODES, DEFAULT_MODES, RETRIEVAL_BASES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help=f"evaluate modes ({'/'.join(BASE_MODES)}, variants) on questions",
        description="Answer every question in every mode with the LlamaIndex pipeline's own prompts "
        "(greedy, batched), score (EM / F1 / contains, true-false accuracy, the LAG paper's normalised "
        "score), measure routing accuracy, and write RESULTS_DIR/results.json, results.md and plots. "
        "Resumable: re-running the same command continues where it stopped.",
    )
    p.add_argument("--docs", help="documents.jsonl ({id, title, text} per line)")
    p.add_argument("--questions", help="questions.jsonl ({id, question, answers, doc_id, task} per line)")
    p.add_argument("--knowledge", metavar="LIB_DIR",
                   help="knowledge adapter library (one adapter per document)")
    p.add_argument("--task", metavar="LIB_DIR", action="append", default=[],
                   help="task adapter library (repeatable)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--index", metavar="INDEX_DIR", default=None,
                   help="FAISS index from `lag index` (needed by rag, rag+lag, prag, prag+lag)")
    p.add_argument("--embed-model", metavar="DIR", default=None,
                   help="embedder folder (default: offline MiniLM)")
    p.add_argument("--modes", default=None,
                   help=f"comma-separated modes (default: {','.join(DEFAULT_MODES)}, retrieval modes only "
                   "with --index); variants add -k<int>, -seq-mass / -seq-vote, -dyn<margin>, -req, -sl<M>, "
                   "-w<weight>, -cal<calibration> (-refreq, -m<dims>, -b<beta>), e.g. lag-k5, lag-seq-mass, "
                   "lag-req-sl2-w0.25 (the pipeline's two-level LAG; plain lag is the paper's), "
                   "lag-calzscore")
    p.add_argument("--k", type=int, default=20, help="Arrow candidates per token for lag modes (default 20)")
    p.add_argument("--sweep-k", default=None, metavar="LIST",
                   help="k sweep of the lag mode, e.g. 1,2,5,10,20,N (N = all knowledge adapters): "
                   "table + PNG")
    p.add_argument("--similarity-top-k", type=int, default=1,
                   help="documents retrieved for rag/prag (default 1)")
    p.add_argument("--task-map", default=None, metavar="MAP",
                   help="question task -> task adapter for the oracle, e.g. qa=short_answer,fact=fact_check "
                   "(default: adapters named like the task)")
    p.add_argument("--missing", choices=["skip", "error"], default="skip",
                   help="questions whose document is unknown or has no adapter: skip with a warning "
                   "(default) or refuse")
    p.add_argument("--qa-metric", choices=["f1", "em", "contains"], default="f1",
                   help="metric of short-answer tasks in the normalised score (default f1)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per answer")
    p.add_argument("--batch-size", type=int, default=8, help="questions generated together (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the model's dtype")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N usable questions")
    p.add_argument("--restart", action="store_true",
                   help="if RESULTS_DIR holds answers of another configuration, archive them and start over")
    p.add_argument("--render-only", action="store_true",
                   help="re-render results.md and plots from RESULTS_DIR/results.json, run nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="RESULTS_DIR", help="results folder")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..eval.harness import EvalConfig, load_results, run_eval
    from ..eval.report import write_report

    if args.render_only:
        written = write_report(load_results(args.out), args.out)
        print("\n".join(str(p) for p in written.values()))
        return 0
    missing = [flag for flag, value in (("--docs", args.docs), ("--questions", args.questions),
                                         ("--knowledge", args.knowledge)) if not value]
    if missing:
        raise ConfigError(f"lag eval needs {', '.join(missing)}", field=missing[0].lstrip("-"))
    modes: Any = args.modes
    if modes is None:
        modes = [m for m in DEFAULT_MODES if args.index or m not in RETRIEVAL_BASES]
    config = EvalConfig(
        docs=args.docs, questions=args.questions, knowledge=args.knowledge, task=args.task, model=args.model,
        index=args.index, embed_model=args.embed_model, modes=modes, k=args.k, sweep_k=args.sweep_k,
        similarity_top_k=args.similarity_top_k, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, task_map=args.task_map, missing=args.missing, qa_metric=args.qa_metric,
        seed=args.seed, dtype=args.dtype, limit=args.limit, restart=args.restart, out=args.out,
    )
    results = run_eval(config, progress=not args.quiet)
    from pathlib import Path

    from ..eval.report import REPORT_FILE

    print((Path(args.out) / REPORT_FILE).read_text(encoding="utf-8"))
    if not results.get("complete", True):
        print("lag eval: warning: some answers are missing from the results", file=sys.stderr)
    return 0
