"""Routing trace: which adapter each token chose at each module, and per-adapter shares; the routing
summaries of the LLM calls a request made (:class:`RoutingSummary`, :func:`collect_routing`)."""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(module: str) -> int | None:
    """Layer index of a module name like ``model.layers.12.mlp.up_proj`` (None if it has none)."""
    match = _LAYER.search(f".{module}.")
    return int(match.group(1)) if match else None


class RoutingTrace:
    """Records per library (kind) and module the adapter chosen for each (non-padding) token.

    Cheap: one ``bincount`` per module call; per-token choices are kept only if ``keep_tokens``.
    """

    def __init__(self, names: dict[str, list[str]], keep_tokens: bool = True) -> None:
        self.names = names  # kind -> adapter names of the routed pool
        self.keep_tokens = keep_tokens
        self._counts: dict[tuple[str, str], torch.Tensor] = {}
        self._candidates: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # kind -> [sum, tokens]
        self._tokens: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Lock()

    def record(self, kind: str, module: str, chosen: torch.Tensor, mask: torch.Tensor | None = None,
               candidates: torch.Tensor | None = None) -> None:
        """chosen [T] adapter indices; mask [T] bool (False for padding tokens, not counted); candidates [T]
        reranked per token (dynamic k)."""
        chosen = chosen.reshape(-1).cpu()
        mask = mask.cpu() if mask is not None else None
        candidates = candidates.cpu() if candidates is not None else None
        kept = chosen[mask.reshape(-1)] if mask is not None else chosen
        counts = torch.bincount(kept, minlength=len(self.names[kind]))
        with self._lock:
            if candidates is not None:
                cands = candidates.reshape(-1)
                cands = cands[mask.reshape(-1)] if mask is not None else cands
                self._candidates[kind][0] += float(cands.sum())
                self._candidates[kind][1] += cands.numel()
            key = (kind, module)
            self._counts[key] = self._counts[key] + counts if key in self._counts else counts
            if self.keep_tokens:
                self._tokens[key].append(kept.to(torch.int32))

    def add_counts(self, kind: str, module: str, counts: torch.Tensor) -> None:
        """Add [N] selection counts at one module (e.g. this request's row of a :class:`RowTrace`)."""
        with self._lock:
            key = (kind, module)
            self._counts[key] = self._counts[key] + counts if key in self._counts else counts.clone()

    # ---- queries --------------------------------------------------------------------------------
    @property
    def kinds(self) -> list[str]:
        return sorted({kind for kind, _ in self._counts})

    def modules(self, kind: str) -> list[str]:
        return [m for k, m in self._counts if k == kind]

    def tokens(self, kind: str, module: str) -> torch.Tensor:
        """All recorded choices at one module, in call order (prompt tokens, then generated ones)."""
        parts = self._tokens.get((kind, module), [])
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)

    def counts(self, kind: str) -> torch.Tensor:
        """[N] number of (token x module) selections of each adapter."""
        total = torch.zeros(len(self.names[kind]), dtype=torch.long)
        for (k, _), c in self._counts.items():
            if k == kind:
                total += c
        return total

    def layer_counts(self, kind: str) -> tuple[list[int], torch.Tensor]:
        """(layers, [L, N] selection counts per layer) — modules of one layer are summed."""
        per: dict[int, torch.Tensor] = {}
        for (k, module), c in self._counts.items():
            if k == kind:
                layer = layer_of(module)
                layer = -1 if layer is None else layer
                per[layer] = per[layer] + c if layer in per else c.clone()
        layers = sorted(per)
        if not layers:
            return [], torch.zeros(0, len(self.names[kind]), dtype=torch.long)
        return layers, torch.stack([per[layer] for layer in layers])

    def mean_candidates(self, kind: str) -> float | None:
        """Average number of candidates reranked per token and module (dynamic k), if recorded."""
        total, n = self._candidates.get(kind, (0.0, 0.0))
        return total / n if n else None

    def shares(self, kind: str) -> dict[str, float]:
        """Adapter -> share of selections, descending, zero shares omitted."""
        counts = self.counts(kind).double()
        total = counts.sum().item()
        if total == 0:
            return {}
        order = torch.argsort(counts, descending=True, stable=True)
        return {self.names[kind][i]: counts[i].item() / total for i in order.tolist() if counts[i] > 0}

    def summary(self, top: int | None = 5, per_layer: bool = False) -> dict[str, Any]:
        """``{kind: {"selections": int, "adapters": [{"adapter", "share"}, ...], "per_layer": {...}}}``."""
        out: dict[str, Any] = {}
        for kind in self.kinds:
            shares = list(self.shares(kind).items())[:top]
            entry: dict[str, Any] = {
                "selections": int(self.counts(kind).sum()),
                "adapters": [{"adapter": a, "share": round(s, 4)} for a, s in shares],
            }
            if per_layer:
                layers, counts = self.layer_counts(kind)
                entry["per_layer"] = {}
                for layer, row in zip(layers, counts):
                    total = max(int(row.sum()), 1)
                    best = torch.argsort(row, descending=True, stable=True)[: top or len(row)]
                    entry["per_layer"][layer] = [
                        {"adapter": self.names[kind][i], "share": round(row[i].item() / total, 4)}
                        for i in best.tolist() if row[i] > 0
                    ]
            out[kind] = entry
        return out

    def clear(self) -> None:
        with self._lock:
            self._counts.clear()
            self._tokens.clear()
            self._candidates.clear()


class RowTrace:
    """Per-row selection counts of batch rows routed together (``LAGRouter.rows``): each module call keeps its
    choices (cheap on a decode step's hot path); :meth:`flush` counts them (one ``bincount`` per module) and
    adds each row's counts to that request's :class:`RoutingTrace`."""

    def __init__(self, names: dict[str, list[str]], rows: int) -> None:
        self.names = names
        self.rows = rows
        self._chosen: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)  # [G, S] each, -1: pad

    def record(self, kind: str, module: str, chosen: torch.Tensor, mask: torch.Tensor | None = None,
               candidates: torch.Tensor | None = None) -> None:
        """chosen [G * S] (row-major: S tokens per row), mask [G, S] bool or None; candidates unused."""
        chosen = chosen.reshape(self.rows, -1).cpu()  # [G, S]
        if mask is not None:
            chosen = chosen.masked_fill(~mask.reshape(self.rows, -1).cpu(), -1)
        self._chosen[(kind, module)].append(chosen)

    def flush(self, traces: list[RoutingTrace | None]) -> None:
        """Add row i's counts to ``traces[i]`` (None: not recorded) and start afresh."""
        for (kind, module), parts in self._chosen.items():
            n = len(self.names[kind])
            chosen = torch.cat(parts, dim=1)  # [G, S total]
            flat = (torch.arange(self.rows)[:, None] * n + chosen)[chosen >= 0]  # row-major (row, adapter)
            counts = torch.bincount(flat, minlength=self.rows * n).view(self.rows, n)  # [G, N]
            for row, trace in enumerate(traces):
                if trace is not None:
                    trace.add_counts(kind, module, counts[row])
        self._chosen.clear()


# ---- the routing summary of LLM calls: one schema ----------------------------------------------------
ROUTING_SCHEMA_VERSION = 1


class AdapterShare(BaseModel):
    """One adapter and its share of its library's (token x module) selections."""

    adapter: str
    share: float


class RoutingSummary(BaseModel):
    """The routing summary (schema version 1) of one LAGLLM call (``additional_kwargs["lag"]``) or of all the
    calls of one query or chat turn (``response.metadata["lag"]``, ``lag ask --json``), as a plain dict in
    responses (``RoutingSummary.model_validate(d)`` checks one).

    ``libraries``: per library kind, the adapters that won most selections, largest share first (top
    ``LAGLLM.summary_top`` per call); ``selections``: per kind, the (token x module) selections counted;
    ``fixed``: the adapters a fixed / PRAG call was pinned to; ``calls``: LLM calls merged."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = ROUTING_SCHEMA_VERSION
    mode: str
    k: int
    libraries: dict[str, list[AdapterShare]]
    routing_ms: float
    generate_ms: float | None = None
    new_tokens: int | None = None
    selections: dict[str, int] = Field(default_factory=dict)
    fixed: dict[str, list[str]] | None = None
    calls: int = 1

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One routing summary for a query that made several LLM calls (shares weighted by selections; the last
    call's mode, k and pins)."""
    if not summaries:
        return None
    if len(summaries) == 1:
        return summaries[0]
    libraries: dict[str, dict[str, float]] = {}
    totals: dict[str, int] = {}
    for s in summaries:
        for kind, adapters in s["libraries"].items():
            n = s.get("selections", {}).get(kind, 1)
            totals[kind] = totals.get(kind, 0) + n
            for a in adapters:
                libraries.setdefault(kind, {})
                libraries[kind][a["adapter"]] = libraries[kind].get(a["adapter"], 0.0) + a["share"] * n
    merged = dict(summaries[-1])
    merged["libraries"] = {
        kind: [{"adapter": a, "share": round(v / max(totals[kind], 1), 4)}
               for a, v in sorted(shares.items(), key=lambda kv: -kv[1])]
        for kind, shares in libraries.items()
    }
    merged["selections"] = totals
    merged["routing_ms"] = round(sum(s.get("routing_ms", 0.0) for s in summaries), 2)
    merged["generate_ms"] = round(sum(s.get("generate_ms", 0.0) for s in summaries), 2)
    merged["new_tokens"] = sum(int(s.get("new_tokens", 0)) for s in summaries)
    merged["calls"] = sum(int(s.get("calls", 1)) for s in summaries)
    return merged


# ---- collecting the summaries of a request's calls --------------------------------------------------------
_COLLECT: contextvars.ContextVar[tuple[list[dict[str, Any]], ...]] = contextvars.ContextVar("lag_collect",
                                                                                            default=())


@contextlib.contextmanager
def collect_routing() -> Iterator[list[dict[str, Any]]]:
    """Collect the routing summaries of the LAGLLM calls made inside the block (this request only; blocks
    nest: an outer block also sees the calls of an inner one). Threads started with a copy of the context
    (llama-index's ``Thread``, ``asyncio.to_thread``) report into the same list, even after the block."""
    with collect_into([]) as sink:
        yield sink


@contextlib.contextmanager
def collect_into(sink: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """:func:`collect_routing` into an existing list (e.g. again while a lazy response stream runs)."""
    token = _COLLECT.set((*_COLLECT.get(), sink))
    try:
        yield sink
    finally:
        _COLLECT.reset(token)


def record_routing(summary: dict[str, Any] | None) -> None:
    """Called by LAGLLM after each generation."""
    if summary is not None:
        for sink in _COLLECT.get():
            sink.append(summary)


# ---- what each LLM call of a request did (tokens, finish reason, routing): lag serve's usage ------------
_CALLS: contextvars.ContextVar[tuple[list[dict[str, Any]], ...]] = contextvars.ContextVar("lag_calls",
                                                                                          default=())


@contextlib.contextmanager
def collect_calls() -> Iterator[list[dict[str, Any]]]:
    """Collect one record per LAGLLM call made inside the block (``prompt_tokens``, ``completion_tokens``,
    ``finish_reason``, ``lag``: its routing summary or None); nests and crosses threads as
    :func:`collect_routing`."""
    sink: list[dict[str, Any]] = []
    token = _CALLS.set((*_CALLS.get(), sink))
    try:
        yield sink
    finally:
        _CALLS.reset(token)


def record_call(record: dict[str, Any]) -> None:
    """Called by LAGLLM after each generation."""
    for sink in _CALLS.get():
        sink.append(record)
