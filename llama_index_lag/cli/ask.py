"""``lag ask``: answer a question with a pipeline config, in one mode or several side by side."""

from __future__ import annotations

import argparse
import json
import shutil
import textwrap
from typing import Any

from ..errors import LAGError
from ..modes import LAG_METHODS, PIPELINE_MODES

FIELDS = ("model", "embed_model", "index", "knowledge", "k", "similarity_top_k", "response_mode",
          "max_new_tokens", "temperature", "dtype", "lag_method")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help=f"answer a question (modes {' / '.join(PIPELINE_MODES)})",
                       description="Answer QUESTION with the pipeline in --config (JSON/YAML/TOML); flags of "
                       "the same names override the config's fields.")
    p.add_argument("question", help="the question to answer")
    p.add_argument("--config", default=None, help="pipeline config file (LAGPipelineConfig fields)")
    p.add_argument("--mode", default=None, help=" | ".join(PIPELINE_MODES))
    p.add_argument("--compare", default=None, metavar="MODES",
                   help="comma-separated modes answered side by side, e.g. none,rag,lag,rag+lag")
    p.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--embed-model", dest="embed_model", default=None, help="embedder folder (default MiniLM)")
    p.add_argument("--index", default=None, help="index folder from `lag index`")
    p.add_argument("--knowledge", default=None, help="knowledge library folder")
    p.add_argument("--task", action="append", default=None, help="task library folder (repeatable)")
    p.add_argument("--k", type=int, default=None, help="Arrow candidates per token (LAG)")
    p.add_argument("--lag-method", dest="lag_method", default=None, choices=LAG_METHODS,
                   help="LAG routing: two-level (default) or the paper's per-token Arrow -> SpectR")
    p.add_argument("--similarity-top-k", dest="similarity_top_k", type=int, default=None,
                   help="documents retrieved in rag modes")
    p.add_argument("--response-mode", dest="response_mode", default=None,
                   help="llama-index response mode of rag modes (compact, refine, ...)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None,
                   help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (0: greedy)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="the model's dtype")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per mode")
    p.set_defaults(func=_ask)


def answer(engine_config: Any, question: str) -> dict[str, Any]:
    """Run one mode; the ``--json`` object: mode, answer, sources, lag (a
    :class:`~llama_index_lag.trace.RoutingSummary` as a dict, or null)."""
    from ..ingest import stable_document_id
    from ..pipeline import build_query_engine
    from ..trace import RoutingSummary

    response = build_query_engine(engine_config).query(question)
    sources = [{"id": stable_document_id(n.node), "score": float(n.score or 0.0),
                "text": n.node.get_content()} for n in response.source_nodes]
    lag = (response.metadata or {}).get("lag")
    if lag is not None:
        lag = RoutingSummary.model_validate(lag).as_dict()
    return {"mode": engine_config.mode, "answer": str(response).strip(), "sources": sources, "lag": lag}


def _ask(args: argparse.Namespace) -> int:
    from ..pipeline import LAGPipelineConfig

    overrides = {f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None}
    if args.task:
        overrides["task"] = args.task
    base = LAGPipelineConfig.load(args.config, **overrides) if args.config else LAGPipelineConfig(**overrides)
    modes = [m.strip() for m in args.compare.split(",")] if args.compare else [args.mode or base.mode]
    for mode in modes:
        if mode not in PIPELINE_MODES:
            from ..errors import ConfigError

            raise ConfigError(f"unknown mode {mode!r}; expected one of {', '.join(PIPELINE_MODES)}",
                              field="mode")
    results = []
    for mode in modes:
        try:
            results.append(answer(LAGPipelineConfig(**{**base.model_dump(), "mode": mode}), args.question))
        except LAGError as exc:
            if len(modes) == 1:
                raise
            results.append({"mode": mode, "answer": None, "sources": [], "lag": None, "error": str(exc)})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(render(args.question, results))
    return 1 if any("error" in r for r in results) else 0  # --compare: every mode answered or reported


def _routing_line(lag: dict[str, Any] | None) -> str:
    if not lag:
        return "adapters off"
    parts = []
    for kind, adapters in lag["libraries"].items():
        top = ", ".join(f"{a['adapter']} {a['share']:.0%}" for a in adapters[:3])
        parts.append(f"{kind}: {top}")
    return f"{lag['mode']} k={lag['k']}: " + "; ".join(parts) + f" ({lag['routing_ms']:.0f} ms routing)"


def render(question: str, results: list[dict[str, Any]]) -> str:
    """Human-readable answers, one block per mode."""
    width = min(shutil.get_terminal_size((100, 20)).columns, 120)
    lines = [f"Q: {question}", ""]
    for r in results:
        lines.append(f"[{r['mode']}]")
        if "error" in r:
            lines += [f"  error:   {r['error']}", ""]
            continue
        lines += textwrap.wrap(r["answer"] or "(empty)", width=width, initial_indent="  answer:  ",
                               subsequent_indent=" " * 11)
        if r["sources"]:
            lines.append("  sources: " + ", ".join(f"{s['id']} ({s['score']:.2f})" for s in r["sources"]))
        lines.append("  routing: " + _routing_line(r["lag"]))
        lines.append("")
    return "\n".join(lines).rstrip()
