"""Shared benchmark helpers: timing, machine description, random PEFT adapters, table + JSON output."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .._env import machine  # noqa: F401  (re-exported for the benchmarks)
from .._fs import atomic_write_json
from ..testing import write_lora_adapter

# SmolLM2-135M-Instruct's shapes (LlamaForCausalLM): what the benchmarks default to.
SMOLLM2_SHAPES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152)


def timeit(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 200:
            break
    return statistics.median(times)


def timeit_interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int = 15, inner: int = 1,
                       warmup: int = 1, self_timed: bool = False) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed round-robin: every round times ``inner`` calls of
    each function in turn, so a slow phase of a shared machine hits all of them alike (ratios between them
    are what the benchmarks report). ``self_timed``: each call returns its own seconds (e.g.
    :func:`decode_seconds`), used instead of the wall time of the call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start, own = time.perf_counter(), 0.0
            for _ in range(inner):
                value = fn()
                own += value if self_timed else 0.0
            times[name].append((own if self_timed else time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}


class _StepClock(StoppingCriteria):
    """Time stamps of every generation step; never stops the generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_seconds(model: Any, ids: torch.Tensor, tokens: int) -> float:
    """Seconds per decoded token of greedy ``model.generate``: the time from the first generated token to the
    last, over ``tokens - 1`` KV-cached steps (the prompt's prefill, timed separately, is not included)."""
    clock = _StepClock()
    model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   stopping_criteria=StoppingCriteriaList([clock]))
    return (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)


def write_random_peft_lora(
    path: Path, modules: dict[str, tuple[int, int]], *, rank: int = 6, alpha: float = 12.0,
    generator: torch.Generator, decay: float = 0.5, scale: float = 0.05,
) -> Path:
    """Write a standard PEFT LoRA folder with random factors of decaying spectrum (like trained LoRAs).

    ``modules``: module path -> (out_features, in_features). No model needed: written directly by
    :func:`llama_index_lag.testing.write_lora_adapter`, drawing float32 factors from ``generator``.
    """
    return write_lora_adapter(path, modules, rank=rank, lora_alpha=alpha, generator=generator, decay=decay,
                              scale=scale, precision=torch.float32, dtype=torch.float32)


def mlp_modules(model: torch.nn.Module, layers: Sequence[int] | None = None) -> dict[str, tuple[int, int]]:
    """MLP gate/up/down module paths -> (out, in) of a Llama-style model."""
    out = {}
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Linear)
                and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")):
            layer = int(name.split(".")[2])
            if layers is None or layer in layers:
                out[name] = (module.out_features, module.in_features)
    return out


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Render rows as a Markdown table (printed and returned)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_results(out: str | Path, payload: dict[str, Any]) -> Path:
    out = Path(out)
    atomic_write_json(out, payload)
    return out
