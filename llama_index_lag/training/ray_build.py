"""Build knowledge adapters on a Ray cluster: documents are Ray actor tasks on a pool of workers that each
load the base model once (``build_knowledge_adapters(..., ray_address=...)``, ``lag build-adapters --ray``).

Every worker writes into the same adapters folder (a path all of them see: a shared filesystem on a real
cluster), each adapter atomically as a local build does, with the same per-document seed, so an adapter
built on Ray is the one a local build makes with the same threads per worker on the same hardware. Failures:

* a worker process that dies mid-adapter (killed, out of memory) is restarted by Ray (``max_restarts``; its
  constructor reloads the model) and its document submitted again once it is up, ``retries`` times; the
  half-written adapter was only a hidden temporary folder, removed by the next attempt;
* a document whose build raises is tried again on any worker, ``retries`` more times (input errors such as
  a too-long document are not retried), then reported with its reason; the other documents finish.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._ray import ray_cluster
from ..data import DocumentRecord, adapter_name
from ..errors import ConfigError, DataError
from .recipe import KnowledgeRecipe

logger = logging.getLogger(__name__)
DEFAULT_RETRIES = 2
RESTART_POLL_S = 0.5  # how often the driver asks whether a restarting worker is up


@dataclass(frozen=True)
class RayOptions:
    """Where and how a build runs on Ray."""

    address: str | None = "auto"  # "auto": the cluster of this machine, else a local one; or HOST:PORT
    workers: int | None = None  # actors (None: as many as the cluster's CPUs / GPUs allow)
    cpus_per_worker: float = 1.0  # also the worker's torch threads (at least 1)
    gpus_per_worker: float = 0.0  # > 0: the worker trains on its GPU
    retries: int = DEFAULT_RETRIES  # per document: after a worker died, and after an error

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise ConfigError(f"ray workers must be a positive integer, got {self.workers!r}",
                              field="workers")
        if not self.cpus_per_worker > 0 or self.gpus_per_worker < 0:
            raise ConfigError("ray_cpus_per_worker must be > 0 and ray_gpus_per_worker >= 0",
                              field="ray_cpus_per_worker")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ConfigError(f"retries must be an integer >= 0, got {self.retries!r}", field="retries")

    def pool_size(self, resources: dict[str, float], jobs: int) -> int:
        """Workers to start: as asked, else what the cluster holds; never more than there are jobs."""
        if self.workers is not None:
            return max(1, min(self.workers, jobs))
        fit = int(resources.get("CPU", 1) // self.cpus_per_worker)
        if self.gpus_per_worker:
            fit = min(fit, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, min(fit, jobs))


class AdapterWorker:
    """A Ray actor: one base model, loaded once, builds adapters one after another."""

    def __init__(self, build: Callable[..., dict[str, Any]], base: str | None, threads: int,
                 gpu: bool) -> None:
        import torch

        from ..models import load_causal_lm

        torch.set_num_threads(threads)
        device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        self.model, self.tokenizer = load_causal_lm(base, device=device)
        import peft  # noqa: F401  (imported once here, not inside the first build)

        self.load_s = time.perf_counter() - start
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._build = build  # builder.build_knowledge_adapter

    def ready(self) -> tuple[str, float]:
        """(worker name, seconds its model took to load): called once, before any build."""
        return self.name, self.load_s

    def build(self, doc: DocumentRecord, out_dir: str, recipe: KnowledgeRecipe, seed: int,
              contrast: str | None) -> dict[str, Any]:
        start = time.perf_counter()
        meta = self._build(doc, self.model, self.tokenizer, out_dir, recipe=recipe, seed=seed,
                           contrast=contrast)
        return {"meta": meta, "worker": self.name, "seconds": time.perf_counter() - start}


@dataclass
class _Job:
    doc: DocumentRecord
    attempts: int = 0
    submitted: float = 0.0


def build_on_ray(build: Callable[..., dict[str, Any]], todo: Sequence[DocumentRecord], out: Path, *,
                 base: str | Path | None, recipe: KnowledgeRecipe, seed: int, options: RayOptions,
                 contrast: Path | None,
                 finished: Callable[[str, dict[str, Any]], None], failed: Callable[[str, str], None],
                 ) -> dict[str, dict[str, Any]]:
    """Build ``todo``'s adapters into ``out`` on Ray with ``build`` (``builder.build_knowledge_adapter``; see
    the module docstring); ``finished(doc_id, meta)`` / ``failed(doc_id, reason)`` are called in this
    process as results come. Returns per-worker
    ``{"adapters", "busy_s", "start_s", "load_s", "overhead_s"}`` (``start_s``: from asking for the worker to
    its model being loaded, ``load_s`` of which loading the model; ``overhead_s``: submit-to-result time not
    spent building: scheduling and transfer). Workers take documents as soon as each is up."""
    with ray_cluster(options.address) as ray:
        remote = ray.remote(max_restarts=-1)(AdapterWorker)
        size = options.pool_size(ray.cluster_resources(), len(todo))
        threads = max(1, int(options.cpus_per_worker))
        actors = [remote.options(num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker)
                  .remote(build, None if base is None else str(base), threads, options.gpus_per_worker > 0)
                  for _ in range(size)]
        logger.info("building %d adapters on %d Ray workers", len(todo), size)
        stats: dict[str, dict[str, Any]] = {}
        queue = collections.deque(_Job(doc) for doc in todo)
        idle: list[Any] = []
        asked = time.perf_counter()
        running: dict[Any, tuple[Any, _Job | None]] = {a.ready.remote(): (a, None) for a in actors}
        try:
            while queue or any(job is not None for _, job in running.values()):
                while queue and idle:
                    job, actor = queue.popleft(), idle.pop()
                    job.attempts += 1
                    job.submitted = time.perf_counter()
                    ref = actor.build.remote(
                        job.doc, str(out / adapter_name(job.doc.id)), recipe, seed,
                        None if contrast is None else str(contrast))
                    running[ref] = (actor, job)
                (ref,), _ = ray.wait(list(running), num_returns=1)
                actor, job = running.pop(ref)
                if job is None:  # a worker is up (again, after a restart)
                    try:
                        name, load_s = ray.get(ref)
                    except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                        time.sleep(RESTART_POLL_S)
                        running[actor.ready.remote()] = (actor, None)
                        continue
                    except ray.exceptions.RayActorError as exc:  # it cannot start: the others go on
                        if not idle and not running:
                            raise ConfigError(f"no Ray worker could start: {_first_line(exc)}") from None
                        continue
                    idle.append(actor)
                    stats.setdefault(name, {"adapters": 0, "busy_s": 0.0, "load_s": load_s,
                                            "overhead_s": 0.0, "start_s": time.perf_counter() - asked})
                    continue
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:  # the worker died: Ray restarts it
                    _retry_or_fail(job, queue, options.retries, f"worker died: {_first_line(exc)}", failed)
                    running[actor.ready.remote()] = (actor, None)  # back in the pool once it is up
                    continue
                except ray.exceptions.RayTaskError as exc:
                    idle.append(actor)
                    cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                    final = isinstance(cause, (DataError, ConfigError))  # the same input fails the same way
                    _retry_or_fail(job, queue, 0 if final else options.retries,
                                   f"{type(cause).__name__}: {_first_line(cause)}", failed)
                    continue
                idle.append(actor)
                elapsed = time.perf_counter() - job.submitted
                entry = stats.setdefault(result["worker"], {"adapters": 0, "busy_s": 0.0, "start_s": 0.0,
                                                            "load_s": 0.0, "overhead_s": 0.0})
                entry["adapters"] += 1
                entry["busy_s"] += result["seconds"]
                entry["overhead_s"] += max(0.0, elapsed - result["seconds"])
                finished(job.doc.id, result["meta"])
        finally:
            for actor in actors:  # in-flight adapters stay hidden temp folders (removed by the next run)
                ray.kill(actor, no_restart=True)
        return stats


def _retry_or_fail(job: _Job, queue: collections.deque, retries: int, reason: str,
                   failed: Callable[[str, str], None]) -> None:
    if job.attempts <= retries:
        logger.warning("adapter of %r failed (attempt %d of %d): %s; retrying", job.doc.id, job.attempts,
                       retries + 1, reason)
        queue.append(job)
    else:
        failed(job.doc.id, f"{reason} (after {job.attempts} attempt{'s' if job.attempts > 1 else ''})")


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
