"""Local parallel builds: worker processes that each load the base model once and die with their parent,
and the lock that lets one build at a time write an adapters folder (see ``builder.py``)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._fs import file_lock
from ..data import DocumentRecord, adapter_name
from ..errors import BuildError, LAGError
from .recipe import KnowledgeRecipe

_WORKER: dict[str, Any] = {}
BUILD_LOCK = ".lag-build.lock"  # held by the building process
WORKERS_LOCK = ".lag-build-workers.lock"  # held (shared) by each of its worker processes


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """One build per adapters folder. A worker of an earlier build that is still alive (its parent was
    killed) holds the workers' lock: the new build is refused instead of racing it."""
    with file_lock(out / BUILD_LOCK, what="adapters folder (another `lag build-adapters` runs)",
                   wait=False), \
            file_lock(out / WORKERS_LOCK, what="adapters folder (a worker of an earlier build still runs)",
                      wait=False):
        pass  # no worker of an earlier build holds it: ours will take it shared
    with file_lock(out / BUILD_LOCK, what="adapters folder (another `lag build-adapters` runs)", wait=False):
        yield


def _die_with_parent(parent: int) -> None:
    """Make this worker process end when its parent does (SIGKILL included): PR_SET_PDEATHSIG on Linux,
    and everywhere a watchdog thread that exits once the parent is gone."""
    import ctypes
    import signal
    import threading

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="lag-parent-watch", daemon=True).start()


def _worker_init(base: str | None, threads: int, parent: int, out: str, progress_bars: bool = True) -> None:
    import signal

    import torch

    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    lock = open(Path(out) / WORKERS_LOCK, "a+b")  # held until this process ends
    fcntl.flock(lock, fcntl.LOCK_SH)
    _WORKER["lock"] = lock
    torch.set_num_threads(threads)
    from ..models import load_causal_lm, quiet_model_loading

    if not progress_bars:  # as the parent (`lag ... ` without -v): no "Loading weights" bars
        quiet_model_loading()
    _WORKER["model"], _WORKER["tokenizer"] = load_causal_lm(base)


def _worker_build(build: Callable[..., dict[str, Any]], doc: DocumentRecord, out_dir: str,
                  recipe: KnowledgeRecipe, seed: int, contrast: str | None = None) -> dict[str, Any]:
    return build(doc, _WORKER["model"], _WORKER["tokenizer"], out_dir, recipe=recipe, seed=seed,
                 contrast=contrast)


def build_parallel(build: Callable[..., dict[str, Any]], todo: list[DocumentRecord], out: Path,
                   base: str | Path | None, recipe: KnowledgeRecipe,
                    seed: int, workers: int, total_threads: int,
                    finished: Callable[[str, dict[str, Any]], None], contrast: Path | None = None) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    workers = min(workers, len(todo))
    threads = max(1, total_threads // workers)
    from transformers.utils import logging as hf_logging

    from ..models import resolve_model_dir

    base_str = str(resolve_model_dir(base))
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init,
                               initargs=(base_str, threads, os.getpid(), str(out),
                                         hf_logging.is_progress_bar_enabled()))
    clean = False
    try:
        pending = {pool.submit(_worker_build, build, doc, str(out / adapter_name(doc.id)), recipe, seed,
                               None if contrast is None else str(contrast)): doc.id for doc in todo}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                doc_id = pending.pop(fut)
                try:
                    meta = fut.result()
                except LAGError:
                    raise
                except Exception as exc:  # BrokenProcessPool, pickling problems, worker crash
                    raise BuildError(f"worker failed: {exc!r}; finished adapters are kept, re-run to resume",
                                     adapter=doc_id) from exc
                finished(doc_id, meta)
        clean = True
    finally:
        if clean:
            pool.shutdown(wait=True)
        else:
            for proc in list(getattr(pool, "_processes", {}).values()):  # stop the workers we started
                with contextlib.suppress(Exception):
                    proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
