"""``lag serve``: an OpenAI-compatible server over a pipeline config (continuous batching)."""

from __future__ import annotations

import argparse

from .ask import FIELDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat/completions, completions, SSE)",
        description="Serve the pipeline in --config (the same LAGPipelineConfig as `lag ask`; "
        "flags of the same names override its fields) over HTTP: POST /v1/chat/completions, "
        "POST /v1/completions, GET /v1/models, /health, /metrics. Needs the serve extra: "
        'pip install "llama-index-lag[serve]".',
    )
    p.add_argument("--config", default=None, help="pipeline config file (LAGPipelineConfig fields)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=8, help="rows decoded together")
    p.add_argument(
        "--max-queue",
        dest="max_queue",
        type=int,
        default=256,
        help="requests waiting for a batch slot at most (more: 503)",
    )
    p.add_argument(
        "--api-key-file",
        dest="api_key_file",
        default=None,
        help="file of accepted API keys, one per line: requires Authorization: Bearer KEY",
    )
    p.add_argument(
        "--max-tokens-limit",
        dest="max_tokens_limit",
        type=int,
        default=1024,
        help="largest max_tokens a request may ask for",
    )
    p.add_argument(
        "--max-request-bytes",
        dest="max_request_bytes",
        type=int,
        default=1 << 20,
        help="largest request body",
    )
    p.add_argument(
        "--truncation",
        choices=["error", "left"],
        default="error",
        help="prompts over the context window: 400 (error) or keep their end (left)",
    )
    p.add_argument(
        "--served-model-name",
        dest="model_name",
        default=None,
        help="the model id in /v1/models and responses (default: the model folder's name)",
    )
    p.add_argument("--mode", default=None, help="default pipeline mode of requests without lag.mode")
    p.add_argument("--model", default=None, help="model folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--embed-model", dest="embed_model", default=None, help="embedder folder (default MiniLM)")
    p.add_argument("--index", default=None, help="index folder from `lag index` (retrieval modes)")
    p.add_argument("--knowledge", default=None, help="knowledge library folder")
    p.add_argument("--task", action="append", default=None, help="task library folder (repeatable)")
    p.add_argument("--k", type=int, default=None, help="Arrow candidates per token (LAG)")
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        default=None,
        help="default max_tokens of requests",
    )
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="the model's dtype")
    p.add_argument("-q", "--quiet", action="store_true", help="no access log")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from ..pipeline_config import LAGPipelineConfig
    from ..serve import read_api_keys, require_serve, serve

    require_serve()
    from ..serve.app import ServeSettings

    overrides = {f: getattr(args, f, None) for f in (*FIELDS, "mode")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.task:
        overrides["task"] = args.task
    config = (
        LAGPipelineConfig.load(args.config, **overrides) if args.config else LAGPipelineConfig(**overrides)
    )
    settings = ServeSettings(
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        api_keys=read_api_keys(args.api_key_file) if args.api_key_file else (),
        max_request_bytes=args.max_request_bytes,
        max_tokens_limit=args.max_tokens_limit,
        model_name=args.model_name,
        truncation=args.truncation,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        import logging

        logging.getLogger(__name__).warning(
            "serving on %s without --api-key-file: anyone who can reach it can use it", args.host
        )
    print(
        f"lag serve: http://{args.host}:{args.port}/v1 (mode {config.mode}, max batch {args.max_batch})",
        flush=True,
    )
    serve(
        config,
        host=args.host,
        port=args.port,
        log_level="warning" if args.quiet else "info",
        settings=settings,
    )
    return 0
