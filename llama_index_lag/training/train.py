"""LoRA training of one adapter on a list of :class:`~llama_index_lag.training.augment.Example` s.

Initialisation (``recipe.init``):

* ``eva`` (default): PEFT's EVA (``init_lora_weights="eva"``): the rows of every ``lora_A`` are the top
  principal directions of that module's input activations on the adapter's own texts, ``lora_B`` is zero.
  The activations are collected in one forward pass and decomposed exactly (``torch.svd_lowrank`` on the
  centred token matrix, as PEFT's incremental PCA converges to); the result goes through
  ``peft.initialize_lora_eva_weights(model, eva_state_dict=...)``. Every layer keeps rank ``recipe.rank``.
* ``eva-peft``: PEFT's own data path, ``initialize_lora_eva_weights(model, dataloader)`` (incremental PCA
  until convergence, ranks redistributed across layers when ``eva_rho > 1``). Slower on a CPU; same idea.
* ``default``: PEFT's default init (Kaiming-uniform A, zero B).

The base model is left exactly as it was (LoRA layers are removed after saving, never merged).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError
from .augment import Example
from .recipe import _Recipe

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: ``on_step(step, n_steps, loss)``; raise from it to abort training (nothing is saved then).
StepCallback = Callable[[int, int, float], None]


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether this x86 CPU has AMX bf16 tiles (bf16 autocast then beats float32: BENCHMARKS.md)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_bf16" in line.split()
    except OSError:
        pass
    return False


def use_bf16(recipe: _Recipe, device: Any) -> bool:
    if recipe.bf16 is not None:
        return bool(recipe.bf16)
    kind = getattr(device, "type", str(device))
    return kind == "cuda" or (kind == "cpu" and cpu_has_amx())


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------- tokenising
def tokenize_examples(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase,
                      max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; prompt tokens get label -100; truncated to ``max_length`` from the
    right (examples with no loss token left are dropped)."""
    out = []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        c = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        if any(label != -100 for label in labels[1:]):
            out.append((ids, labels))
    return out


#: batches are padded to a multiple of this many tokens: few distinct shapes keep oneDNN's compiled bf16
#: kernels cached (every new shape costs a JIT compile)
PAD_MULTIPLE = 32


def _collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int,
             multiple: int = 1) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(ids) for ids, _ in batch)
    width = -(-width // multiple) * multiple
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Example indices per step: epochs of a seeded permutation, cut into batches (wrapping across epochs)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            perm = list(range(n))
            rng.shuffle(perm)
            order.extend(perm)
        yield order[:batch_size]
        order = order[batch_size:]


# ---------------------------------------------------------------------------------------------- loss
def causal_lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over label tokens; the output head runs only on those positions."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    labels = batch["labels"][:, 1:].flatten()
    if decoder is None or head is None or decoder is base:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels, ignore_index=-100)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # the head only on label positions, their count padded to a multiple of PAD_MULTIPLE (stable shapes)
    rows = (labels != -100).nonzero().squeeze(1)
    n_pad = -(-max(rows.numel(), 1) // PAD_MULTIPLE) * PAD_MULTIPLE - rows.numel()
    target = torch.cat([labels[rows], labels.new_full((n_pad,), -100)])
    rows = torch.cat([rows, rows.new_zeros(n_pad)])
    logits = head(hidden[:, :-1].flatten(0, 1)[rows])
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * (logits / softcap).tanh()
    return F.cross_entropy(logits.float(), target, ignore_index=-100)


@contextlib.contextmanager
def _autocast(enabled: bool, device: Any) -> Iterator[None]:
    import torch

    if not enabled:
        yield
        return
    with torch.autocast(getattr(device, "type", "cpu"), dtype=torch.bfloat16):
        yield


# ---------------------------------------------------------------------------------------------- EVA
def _lora_layers(peft_model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name.replace("base_model.model.", ""): m for name, m in peft_model.named_modules()
            if isinstance(m, LoraLayer)}


def exact_eva_state_dict(peft_model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                         rank: int, *, max_length: int, seed: int, batch_size: int = 8,
                         contrast: dict[str, torch.Tensor] | None = None,
                         contrast_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """{module: [rank, in_features]}: the top ``rank`` principal directions (centred SVD) of each LoRA
    module's input activations over the tokens of ``texts`` (one no-grad forward pass, adapters disabled).
    ``contrast`` ({module: [n, n]}): the top eigenvectors of their covariance minus ``contrast_weight`` x
    this matrix instead (contrastive EVA)."""
    import torch

    layers = _lora_layers(peft_model)
    current: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def fn(module: Any, args: tuple) -> None:
            current[name] = args[0]
        return fn

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(hook(name)))
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts if t.strip()]
    encoded = [ids for ids in encoded if ids]
    if not encoded:
        raise ConfigError("EVA needs at least one non-empty text", field="init")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    leader: dict[str, str] = {}  # modules reading the same tensor (gate/up, q/k/v) share one decomposition
    acts: dict[str, list[torch.Tensor]] = {}
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            for start in range(0, len(encoded), batch_size):
                batch = _collate([(ids, ids) for ids in encoded[start:start + batch_size]], pad)
                mask = batch["attention_mask"].bool()
                current.clear()
                peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if not leader:
                    by_id: dict[int, str] = {}
                    for name, x in current.items():
                        leader[name] = by_id.setdefault(id(x), name)
                for name, x in current.items():
                    if leader.get(name) == name:
                        acts.setdefault(name, []).append(x[mask].detach().float())
                current.clear()
    finally:
        for h in handles:
            h.remove()
    missing = [name for name in layers if leader.get(name) not in acts]
    if missing:
        raise ConfigError(f"EVA saw no input for module {missing[0]!r}", field="init")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        comps: dict[str, torch.Tensor] = {}
        for name in dict.fromkeys(leader[n] for n in layers):
            X = torch.cat(acts.pop(name)).double()
            X = X - X.mean(dim=0, keepdim=True)
            if contrast is not None:
                comps[name] = contrastive_components(X, contrast[name], contrast_weight, rank)
                continue
            q = min(rank + 8, *X.shape)
            _, _, V = torch.svd_lowrank(X, q=q, niter=6)
            c = V[:, :rank].T
            if c.shape[0] < rank:  # fewer tokens than the rank: complete with orthonormal random rows
                rand = torch.randn(X.shape[1], rank, dtype=torch.float64)
                rand = rand - c.T @ (c @ rand)
                c = torch.cat([c, torch.linalg.qr(rand)[0].T[: rank - c.shape[0]]])
            comps[name] = c.float().contiguous()
    finally:
        torch.random.set_rng_state(state)
    return {f"base_model.model.{name}": comps[leader[name]].clone() for name in layers}


def contrastive_components(X: torch.Tensor, mean_cov: torch.Tensor, weight: float, rank: int) -> torch.Tensor:
    """Contrastive EVA (training/contrast.py): [rank, n] the top eigenvectors of ``cov(X) - weight *
    mean_cov`` for centred tokens X [T, n]."""
    import torch

    C = X.T @ X / max(X.shape[0], 1) - weight * mean_cov.to(X.dtype)  # [n, n]
    _, vectors = torch.linalg.eigh(C.float())  # ascending
    return vectors.flip(1)[:, :rank].T.contiguous()


def _eva_peft(peft_model: Any, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
              max_length: int) -> None:
    from peft import initialize_lora_eva_weights

    enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts if t.strip()]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [_collate([(ids, ids) for ids in enc[i:i + 4]], pad) for i in range(0, len(enc), 4)]
    loader = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in batches]
    initialize_lora_eva_weights(peft_model, loader, show_progress_bar=False)


# ---------------------------------------------------------------------------------------------- training
def lora_config(recipe: _Recipe) -> Any:
    from peft import EvaConfig, LoraConfig

    kwargs: dict[str, Any] = {}
    if recipe.init in ("eva", "eva-peft", "eva-contrastive"):
        kwargs["init_lora_weights"] = "eva"
        kwargs["eva_config"] = EvaConfig(rho=recipe.eva_rho, tau=recipe.eva_tau, use_label_mask=False)
    return LoraConfig(r=recipe.rank, lora_alpha=float(recipe.alpha),
                      target_modules=list(recipe.target_modules),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kwargs)


def _peft_wrap(model: Any, recipe: _Recipe, **kwargs: Any) -> Any:
    """``get_peft_model``, without transformers' deprecation notice for an attribute PEFT reads."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(recipe), **kwargs)


def _check_targets(model: Any, targets: Sequence[str]) -> None:
    import torch

    found = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ConfigError(f"target module {missing[0]!r} is not a Linear layer of this model "
                          f"(Linear layers: {sorted(found)})", field="target_modules")


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    recipe: _Recipe,
    out_dir: str | Path,
    *,
    eva_texts: Sequence[str] | None = None,
    seed: int = 0,
    steps: int | None = None,
    on_step: StepCallback | None = None,
    contrast: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train one LoRA on ``examples`` and save it as a PEFT folder in ``out_dir``; return stats.

    ``model`` is wrapped for the duration and restored afterwards (also on errors). Deterministic for a
    given ``seed`` and torch thread count. ``eva_texts`` default to the examples' full texts. ``contrast``:
    the library's mean input covariance per module, for ``init="eva-contrastive"`` (training/contrast.py).
    """
    if recipe.init == "eva-contrastive" and contrast is None:
        raise ConfigError("init 'eva-contrastive' needs the library's mean covariance (contrast=...); "
                          "build_knowledge_adapters computes it", field="init")
    if hasattr(model, "peft_config"):
        raise ModelError("the base model already carries PEFT adapters; pass the bare model")
    _check_targets(model, recipe.target_modules)
    data = tokenize_examples(examples, tokenizer, recipe.max_length)
    if not data:
        raise ConfigError("no training example has a loss token (all empty or truncated away)",
                          field="examples")
    n_steps = int(steps if steps is not None else recipe.steps)
    timings: dict[str, float] = {}
    seed_everything(seed)
    was_training = model.training
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    device = next(model.parameters()).device
    bf16 = use_bf16(recipe, device)
    peft_model: PeftModel | None = None
    try:
        t0 = time.perf_counter()
        eva_source = list(eva_texts) if eva_texts else [e.prompt + e.completion for e in examples]
        eva = recipe.init in ("eva", "eva-peft", "eva-contrastive")
        peft_model = _peft_wrap(model, recipe, low_cpu_mem_usage=True) if eva else _peft_wrap(model, recipe)
        _init_lora_weights(peft_model, tokenizer, recipe, eva_source, seed, contrast)
        timings["init_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        losses, n_tokens = _optimise(peft_model, tokenizer, data, recipe, n_steps, seed=seed, bf16=bf16,
                                     device=device, on_step=on_step)
        timings["train_s"] = time.perf_counter() - t0
        peft_model.eval()
        t0 = time.perf_counter()
        _check_finite(peft_model)
        _short_targets(peft_model, model, recipe.target_modules)
        peft_model.save_pretrained(str(out_dir), safe_serialization=True)
        timings["save_s"] = time.perf_counter() - t0
        return _train_stats(n_steps, len(data), n_tokens, bf16, losses, timings)
    finally:
        _restore(model, peft_model, grad_flags, was_training)


def _init_lora_weights(peft_model: Any, tokenizer: PreTrainedTokenizerBase, recipe: _Recipe,
                       eva_source: Sequence[str], seed: int, contrast: dict[str, Any] | None = None) -> None:
    """Initialise the freshly wrapped LoRA factors as ``recipe.init`` says (see the module docstring);
    ``default`` keeps PEFT's own initialisation."""
    if recipe.init in ("eva", "eva-contrastive"):
        from peft import initialize_lora_eva_weights

        weight = float(getattr(recipe, "eva_contrast", 1.0))
        sd = exact_eva_state_dict(peft_model, tokenizer, eva_source, recipe.rank,
                                  max_length=recipe.max_length, seed=seed,
                                  contrast=contrast if recipe.init == "eva-contrastive" else None,
                                  contrast_weight=weight)
        initialize_lora_eva_weights(peft_model, eva_state_dict=sd, show_progress_bar=False)
    elif recipe.init == "eva-peft":
        _eva_peft(peft_model, tokenizer, eva_source, recipe.max_length)


def _optimizer(params: list[Any], recipe: _Recipe, n_steps: int) -> tuple[Any, Any]:
    """AdamW and its schedule: linear warm-up over ``recipe.warmup_steps``, then linear decay to 10 %."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = min(recipe.warmup_steps, max(n_steps - 1, 0))

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10 %
        if step < warmup:
            return (step + 1) / (warmup + 1)
        rest = max(n_steps - warmup, 1)
        return 1.0 - 0.9 * (step - warmup) / rest

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _optimise(peft_model: Any, tokenizer: PreTrainedTokenizerBase, data: list[Any], recipe: _Recipe,
              n_steps: int, *, seed: int, bf16: bool, device: Any,
              on_step: StepCallback | None) -> tuple[list[float], int]:
    """Run ``n_steps`` optimiser steps on the LoRA parameters; return (loss per step, tokens seen).

    Raises :class:`ConfigError` when the loss diverges; ``on_step`` is called after every step."""
    import torch

    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(params, recipe, n_steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    losses: list[float] = []
    peft_model.train()
    n_tokens = 0
    for step, idx in enumerate(_batches(len(data), recipe.batch_size, n_steps, seed)):
        batch = {k: v.to(device) for k, v in _collate([data[i] for i in idx], pad, PAD_MULTIPLE).items()}
        n_tokens += int(batch["attention_mask"].sum())
        with _autocast(bf16, device):
            loss = causal_lm_loss(peft_model, batch)
        if not torch.isfinite(loss):
            raise ConfigError(f"training diverged at step {step} (loss {loss.item()}); lower the "
                              "learning rate", field="lr")
        loss.backward()
        if recipe.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        if on_step is not None:
            on_step(step, n_steps, losses[-1])
    return losses, n_tokens


def _train_stats(n_steps: int, n_examples: int, n_tokens: int, bf16: bool, losses: list[float],
                 timings: dict[str, float]) -> dict[str, Any]:
    """What :func:`train_lora` returns: steps, examples, tokens seen, first / last / tail-mean loss,
    timings."""
    tail = losses[-max(1, min(8, len(losses))):]
    return {
        "steps": n_steps,
        "examples": n_examples,
        "tokens_seen": n_tokens,
        "bf16": bf16,
        "loss_first": round(losses[0], 5) if losses else None,
        "loss_last": round(losses[-1], 5) if losses else None,
        "loss_tail_mean": round(sum(tail) / len(tail), 5) if losses else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _restore(model: Any, peft_model: Any, grad_flags: dict[str, bool], was_training: bool) -> None:
    """Remove the LoRA layers (never merged) and put back the model's requires_grad flags and mode."""
    if peft_model is not None:
        restored = peft_model.unload()
        if restored is not model:  # pragma: no cover - peft returns the same object
            logger.warning("PEFT unload returned a new model object")
    for name, p in model.named_parameters():
        p.requires_grad_(grad_flags.get(name, False))
    model.train(was_training)


def _short_targets(peft_model: Any, model: Any, targets: Sequence[str]) -> None:
    """EVA rewrites ``target_modules`` into full module names; put the recipe's short names back when they
    still select exactly the adapted layers (they do unless ``eva_rho`` > 1 dropped some)."""
    config = peft_model.peft_config[peft_model.active_adapter]
    layers = set(_lora_layers(peft_model))
    wanted = set(targets)
    selected = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in wanted}
    if layers == selected:
        config.target_modules = wanted


def _check_finite(peft_model: Any) -> None:
    import torch

    from ..errors import AdapterFormatError

    for name, p in peft_model.named_parameters():
        if "lora_" in name and not torch.isfinite(p).all():
            raise AdapterFormatError("trained adapter has non-finite weights; lower the learning rate",
                                     module=name)


__all__ = [
    "causal_lm_loss",
    "cpu_has_amx",
    "exact_eva_state_dict",
    "lora_config",
    "seed_everything",
    "tokenize_examples",
    "train_lora",
]
