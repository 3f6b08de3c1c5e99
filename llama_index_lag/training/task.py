"""Task adapters: one LoRA trained on ``{"prompt", "answer"}`` examples (chat template, loss on the answer),
written atomically as a PEFT folder + ``lag_adapter.json`` with ``"kind": "task"``."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_dir, atomic_write_json, check_output
from ..data import TaskExample, read_task_examples, validate_id
from ..errors import ConfigError, DataError
from .augment import chat_example
from .builder import (
    META_FILE,
    META_FORMAT,
    META_VERSION,
    _base_info,
    _disk_errors,
    _versions,
    read_adapter_meta,
)
from .recipe import TaskRecipe
from .train import StepCallback, train_lora

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def task_examples(examples: Sequence[TaskExample], tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    from .augment import Example

    return [Example(*chat_example(tokenizer, ex.prompt, ex.answer), "task") for ex in examples]


def train_task_adapter(
    data: Sequence[TaskExample] | str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    recipe: TaskRecipe | None = None,
    seed: int = 0,
    name: str | None = None,
    on_step: StepCallback | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Train a task adapter on ``{"prompt", "answer"}`` examples (chat template, loss on the answer) and write
    it atomically to ``out`` (a PEFT folder + ``lag_adapter.json`` with ``"kind": "task"``). ``out`` may be
    missing, empty or an adapter this package wrote (``force=True``: anything but the data file's folder)."""
    from .train import seed_everything

    recipe = recipe or TaskRecipe()
    source = str(data) if isinstance(data, (str, Path)) else None
    records = read_task_examples(data) if isinstance(data, (str, Path)) else list(data)
    if not records:
        raise DataError("no task examples")
    out = check_output(out, ours=lambda p: read_adapter_meta(p) is not None, what="adapter",
                       inputs=[data] if source is not None else (), force=force)
    name = validate_id(name or out.name, field="name")
    if (model is None) != (tokenizer is None):
        raise ConfigError("pass both model and tokenizer, or neither", field="model")
    if model is None:
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(base)
    assert tokenizer is not None
    start = time.perf_counter()
    seed_everything(seed)
    examples = task_examples(records, tokenizer)
    texts = [f"{r.prompt}\n{r.answer}" for r in records]
    n_steps = recipe.n_steps(len(records))
    with _disk_errors(name, out), atomic_dir(out) as tmp:
        stats = train_lora(model, tokenizer, examples, recipe, tmp, eva_texts=texts, seed=seed, steps=n_steps,
                           on_step=on_step)
        digest = hashlib.sha256("\n".join(f"{r.prompt}\t{r.answer}" for r in records).encode()).hexdigest()
        meta = {
            "format": META_FORMAT,
            "format_version": META_VERSION,
            "kind": "task",
            "name": name,
            "source": source,
            "data_sha256": digest,
            "examples": len(records),
            "seed": seed,
            "recipe": recipe.to_dict(),
            "base_model": _base_info(model),
            "train": {k: v for k, v in stats.items() if k != "timings"},
            "timings": {"eva_init_s": stats["timings"].get("init_s"),
                        "train_s": stats["timings"].get("train_s"), "save_s": stats["timings"].get("save_s"),
                        "total_s": round(time.perf_counter() - start, 3)},
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(tmp / META_FILE, meta)
    return meta


__all__ = ["task_examples", "train_task_adapter"]
