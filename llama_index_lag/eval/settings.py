"""``lag eval``'s settings: :class:`EvalConfig` (the flags), checked mode names, the k sweep and the task
map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..modes import DEFAULT_MODES, ModeSpec, split_modes
from ..modes import parse_mode as parse_mode_name

QA_METRICS = ("f1", "em", "contains")
MISSING_POLICIES = ("skip", "error")


# ---- modes (names and grammar: llama_index_lag.modes) ------------------------------------------------------
def parse_mode(name: str, k: int = 20) -> ModeSpec:
    """A mode name -> :class:`ModeSpec` with its routing checked by ``LAGConfig``; :class:`ConfigError` if
    unknown or invalid."""
    from ..config import LAGConfig

    spec = parse_mode_name(name, k)
    if spec.name == spec.base:  # a base mode (oracle / prag: the fixed adapters are added per question)
        return spec
    try:
        LAGConfig(**spec.routing)
    except ConfigError as exc:
        raise ConfigError(f"mode {spec.name!r}: {exc.message}", field="modes") from None
    return spec


def parse_modes(modes: str | Sequence[str], k: int = 20) -> list[ModeSpec]:
    """Comma-separated (or a list of) mode names -> checked specs, duplicates dropped, order kept."""
    return [parse_mode(n, k) for n in split_modes(modes)]


def parse_sweep(text: str | Sequence[Any] | None) -> list[int | str] | None:
    """``"1,2,5,10,20,N"`` -> ``[1, 2, 5, 10, 20, "N"]`` (``N`` = every knowledge adapter)."""
    if text is None:
        return None
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    out: list[int | str] = []
    for item in items:
        if item in ("", None):
            continue
        if isinstance(item, str) and item.upper() == "N":
            out.append("N")
            continue
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"--sweep-k values must be positive integers or N, got {item!r}",
                              field="sweep_k") from None
        if value <= 0:
            raise ConfigError(f"--sweep-k values must be positive, got {value}", field="sweep_k")
        out.append(value)
    if not out:
        raise ConfigError("--sweep-k lists no k", field="sweep_k")
    return out


NO_TASK_ADAPTER = "none"  # --task-map value: this task has no task adapter


def parse_task_map(text: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """``"qa=short_answer,fact=fact_check"`` -> ``{"qa": "short_answer", "fact": "fact_check"}``
    (``task=none``: no task adapter for that task)."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        return {str(k): str(v) for k, v in text.items()}
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        task, sep, adapter = item.partition("=")
        if not sep or not task.strip() or not adapter.strip():
            raise ConfigError(f"--task-map entries are task=adapter, got {item!r}", field="task_map")
        out[task.strip()] = adapter.strip()
    return out


# ---- configuration ---------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Everything one evaluation run needs (the ``lag eval`` flags)."""

    docs: str | Path
    questions: str | Path
    knowledge: str | Path | None
    out: str | Path
    task: Sequence[str | Path] = ()
    model: str | Path | None = None
    index: str | Path | None = None
    embed_model: str | Path | None = None
    modes: str | Sequence[str] = DEFAULT_MODES
    k: int = 20
    sweep_k: str | Sequence[Any] | None = None
    similarity_top_k: int = 1
    response_mode: str = "compact"
    max_new_tokens: int = 32
    batch_size: int = 8
    task_map: str | Mapping[str, str] | None = None
    missing: str = "skip"
    qa_metric: str = "f1"
    seed: int = 0
    dtype: str = "float32"
    limit: int | None = None
    restart: bool = False

    def __post_init__(self) -> None:
        for name in ("k", "similarity_top_k", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit <= 0):
            raise ConfigError(f"limit must be a positive integer, got {self.limit!r}", field="limit")
        if self.missing not in MISSING_POLICIES:
            raise ConfigError(f"missing must be one of {MISSING_POLICIES}, got {self.missing!r}",
                              field="missing")
        if self.qa_metric not in QA_METRICS:
            raise ConfigError(f"qa_metric must be one of {QA_METRICS}, got {self.qa_metric!r}",
                              field="qa_metric")
        if isinstance(self.task, (str, Path)):
            self.task = [self.task]
        self.task = [str(t) for t in self.task]
        self.mode_specs = parse_modes(self.modes, self.k)
        self.sweep = parse_sweep(self.sweep_k)
        self.task_adapters = parse_task_map(self.task_map)

    def settings(self) -> dict[str, Any]:
        def path(p: Any) -> str | None:
            return None if p is None else str(p)

        return {
            "docs": path(self.docs), "questions": path(self.questions), "knowledge": path(self.knowledge),
            "task": list(self.task), "model": path(self.model), "index": path(self.index),
            "embed_model": path(self.embed_model), "modes": [m.name for m in self.mode_specs], "k": self.k,
            "sweep_k": self.sweep, "similarity_top_k": self.similarity_top_k,
            "response_mode": self.response_mode, "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size, "task_map": self.task_adapters,
            "missing": self.missing, "qa_metric": self.qa_metric, "seed": self.seed, "dtype": self.dtype,
            "limit": self.limit, "decoding": "greedy",
        }
