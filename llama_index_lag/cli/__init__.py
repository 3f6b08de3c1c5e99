"""The ``lag`` command line. Each module in this package registers its sub-commands.

A sub-command module defines ``register(subparsers)``; it adds its parser(s) and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code). Heavy imports happen inside ``func``
so ``lag --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import signal
import sys
from collections.abc import Iterator
from typing import Any

from ..errors import LAGError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lag",
        description="LoRA-Augmented Generation for LlamaIndex: compile adapter libraries, route per token, "
        "answer questions, evaluate and benchmark.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help="the sub-command")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "__main__":  # `python -m llama_index_lag.cli` runs it; it registers nothing
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the block as Ctrl-C does (KeyboardInterrupt), so workers are stopped and what
    finished is reported, instead of the process vanishing."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        from ..models import quiet_model_loading

        quiet_model_loading()  # transformers' "Loading weights" bars only with -v
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `lag ... | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except LAGError as exc:
        print(f"lag {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lag {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the environment (permissions, a full disk outside our writers), not a bug
        print(f"lag {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
