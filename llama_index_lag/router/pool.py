"""All attached libraries of one kind, routed as one set of adapters (:class:`Pool`), and the settings of
their approximate Arrow search."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import LAGConfig
from ..errors import IncompatibleLibraryError
from ..library.stats import reference_stats
from ..library.store import AdapterLibrary
from ..routing.engine import PoolTensors, RouteSpec

logger = logging.getLogger(__name__)
APPROXIMATE = {"exact": False, "faiss": True, "auto": None}  # arrow_backend -> RouteSpec.approximate


def effort(cfg: LAGConfig, t: PoolTensors) -> int | None:
    """The configured search breadth for ``t``'s approximate index (HNSW efSearch / IVF nprobe)."""
    if t.index is None:
        return None
    return cfg.ef_search if t.index.kind == "hnsw" else cfg.nprobe


def route_spec(cfg: LAGConfig, t: PoolTensors) -> RouteSpec:
    """The per-token routing settings of ``cfg`` for the library tensors ``t`` (read here, once)."""
    return RouteSpec(cfg.mode, k=cfg.k, arrow_top_k=cfg.arrow_top_k, temperature=cfg.temperature,
                     spectr_top_k=cfg.spectr_top_k, strategy=cfg.dispatch, margin=cfg.dynamic_k,
                     approximate=APPROXIMATE[cfg.arrow_backend], effort=effort(cfg, t),
                     kernel=cfg.decode_kernel)


class Pool:
    """All attached libraries of one kind, routed as one set of adapters."""

    def __init__(self, kind: str, libraries: list[AdapterLibrary], backend: str = "auto") -> None:
        self.kind = kind
        self.libraries = libraries
        self.indexed = False  # approximate Arrow index in use (single-library pools with a current index)
        if len(libraries) == 1 and backend != "exact":
            lib = libraries[0]
            if lib.has_arrow_index():
                self.indexed = True
            elif backend == "faiss":
                lib.arrow_indexes()  # raises LibraryFormatError: missing or stale index
            elif lib.arrow_meta_exists():
                logger.warning("%s: approximate Arrow index is stale; using exact Arrow (rebuild it with "
                               "AdapterLibrary.build_arrow_index())", lib.path)
        elif backend == "faiss":
            raise IncompatibleLibraryError("arrow_backend='faiss' needs exactly one library per kind "
                                           f"({kind} has {len(libraries)})", path=libraries[0].path)
        self.names = [name for lib in libraries for name in lib.names]
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            holders = [lib for lib in libraries if dup in lib.names]
            where = (f"appears in two {kind} libraries ({holders[0].path} and {holders[1].path})"
                     if len(holders) > 1 else f"appears twice in the {kind} library {holders[0].path}")
            raise IncompatibleLibraryError(f"adapter name {dup!r} {where}", adapter=dup, path=holders[0].path)
        self.modules = list(dict.fromkeys(m for lib in libraries for m in lib.modules))

    def tensors(self, module: str, device: torch.device | None = None) -> PoolTensors:
        """A*/B* stay memory-mapped (one library); prototypes are copied into RAM. For a module on an
        accelerator (``device``), everything is copied to it (the FAISS index stays on the CPU)."""
        parts = []
        for lib in self.libraries:
            if module in lib.modules:
                t = lib.tensors(module)
                present = lib.present(module)
                parts.append((t.proto, t.A, t.B, torch.ones(len(lib), dtype=torch.bool) if present is None
                              else present))
            else:  # a library of this kind that does not adapt the module: zero rows, never valid
                m, n = next(lb.module_shape(module) for lb in self.libraries if module in lb.modules)
                N, r = len(lib), lib.r_max
                parts.append((torch.zeros(N, n), torch.zeros(N, r, n), torch.zeros(N, m, r),
                              torch.zeros(N, dtype=torch.bool)))
        index = None
        stats = self._stats_source(module) if len(parts) == 1 else None
        if len(parts) == 1:
            proto, A, B, valid = parts[0]
            if self.indexed:  # the index serves Arrow: prototypes stay memory-mapped, not resident
                index = self.libraries[0].arrow_search(module)
            else:
                proto = proto.clone()
        else:
            r = max(p[1].shape[1] for p in parts)
            dtype = parts[0][1].dtype
            proto = torch.cat([p[0].to(dtype) for p in parts])
            A = torch.cat([nn.functional.pad(p[1].to(dtype), (0, 0, 0, r - p[1].shape[1])) for p in parts])
            B = torch.cat([nn.functional.pad(p[2].to(dtype), (0, r - p[2].shape[2])) for p in parts])
            valid = torch.cat([p[3] for p in parts])
        valid = None if bool(valid.all()) else valid
        if device is not None and device.type != "cpu":
            proto, A, B = proto.to(device), A.to(device), B.to(device)
            valid = valid.to(device) if valid is not None else None
        if stats is None:  # several libraries (statistics are relative to one reference set), or an old one
            stats = functools.partial(self._computed_stats, module, A, proto, valid)
        return PoolTensors(proto, A, B, valid, index, stats)

    def _stats_source(self, module: str) -> Callable[[], Any] | None:
        lib = self.libraries[0]
        return functools.partial(lib.routing_stats, module) if lib.has_routing_stats() else None

    def _computed_stats(self, module: str, A: torch.Tensor, proto: torch.Tensor,
                        valid: torch.Tensor | None) -> Any:
        if module == self.modules[0]:
            why = (f"{len(self.libraries)} {self.kind} libraries attached together"
                   if len(self.libraries) > 1 else
                   f"{self.libraries[0].path} was compiled before libraries stored them (recompile it to "
                   "store them)")
            logger.warning("computing the routing statistics of the %s adapters for their calibration: %s",
                           self.kind, why)
        return reference_stats(A.cpu(), proto.cpu(), None if valid is None else valid.cpu())
