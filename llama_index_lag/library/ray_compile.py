"""Compile on a Ray cluster: the chunks of new adapters are read, hashed and aligned as Ray tasks (each worker
reads the adapter files itself: a path every node sees), and this process writes their results into the
library exactly as a local compile does (same chunks, same bytes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import LAGError
from .writer import Aligned, Row, align_chunk

#: chunks aligned ahead of the writer, per CPU of the cluster
AHEAD_PER_CPU = 2


class RayAligner:
    """``submit(start, chunk)`` starts a chunk's alignment on the cluster and returns a function that waits
    for it (an adapter's error is raised as itself, naming the adapter)."""

    def __init__(self, ray: Any, dtype: torch.dtype) -> None:
        self.ray = ray
        self.dtype = dtype
        self.task = ray.remote(num_cpus=1)(align_chunk)
        self.ahead = max(2, int(AHEAD_PER_CPU * ray.cluster_resources().get("CPU", 1)))

    def submit(self, start: int, chunk: list[Row], modules: dict[str, Any]) -> Callable[[], Aligned]:
        slim = [Row({}, header=row.header) for row in chunk]  # only what alignment reads
        ref = self.task.remote(start, slim, modules, self.dtype)

        def result() -> Aligned:
            try:
                return self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, LAGError):
                    raise cause from None
                raise
        return result
