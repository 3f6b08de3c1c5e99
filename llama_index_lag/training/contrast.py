"""Contrastive EVA (``KnowledgeRecipe(init="eva-contrastive")``): each knowledge adapter's ``lora_A`` starts
on the directions that set its document apart from the rest of the library, so new adapters are less alike by
construction (routing stays data-free: only the builder, which sees the documents anyway, uses them).

EVA puts ``lora_A`` on the top eigenvectors of the document's input covariance ``C_doc`` at each adapted
module; those include directions every text has (the template, frequent words), which is one way a library
grows "hub" adapters. Contrastive EVA uses the top eigenvectors of ``C_doc - eva_contrast * C_mean`` instead,
with ``C_mean`` the mean over the library's documents of each document's covariance (its texts: title and
chunks), computed once per build by :func:`library_covariance` and cached beside the adapters.

Shapes: T tokens, n in-features, r rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._fs import atomic_write_bytes

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..data import DocumentRecord
    from .recipe import KnowledgeRecipe

logger = logging.getLogger(__name__)
CACHE_PREFIX = ".lag-contrast-"
_LOADED: dict[str, dict[str, Any]] = {}  # path -> covariances, one copy per process


def _targets(model: Any, targets: Sequence[str]) -> dict[str, Any]:
    import torch

    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets}


def document_covariances(model: Any, tokenizer: Any, texts: Sequence[str], targets: Sequence[str],
                         max_length: int, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """{module: [n, n]} the centred covariance of each target module's input over the tokens of ``texts``
    (one no-grad forward per batch; modules reading the same tensor share one matrix)."""
    import torch

    from .train import _collate

    layers = _targets(model, targets)
    current: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: current.__setitem__(name, args[0]))
               for name, m in layers.items()]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    encoded = [ids for ids in encoded if ids]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    leader: dict[str, str] = {}
    sums: dict[str, list[Any]] = {}  # leader -> [sum x x^T (float64), sum x, count]
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = _collate([(ids, ids) for ids in encoded[start:start + batch_size]], pad)
                current.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if not leader:
                    by_id: dict[int, str] = {}
                    for name, x in current.items():
                        leader[name] = by_id.setdefault(id(x), name)
                mask = batch["attention_mask"].bool()
                for name, x in current.items():
                    if leader[name] != name:
                        continue
                    X = x[mask].double()  # [T, n]
                    acc = sums.setdefault(name, [0.0, 0.0, 0])
                    acc[0] = acc[0] + X.T @ X
                    acc[1] = acc[1] + X.sum(dim=0)
                    acc[2] += X.shape[0]
    finally:
        for h in handles:
            h.remove()
    out: dict[str, torch.Tensor] = {}
    for name, (xx, xs, count) in sums.items():
        mean = xs / max(count, 1)
        out[name] = (xx / max(count, 1) - torch.outer(mean, mean)).float()
    return {name: out[leader[name]] for name in layers if leader.get(name) in out}


def _digest(docs: Sequence[DocumentRecord], model: Any, recipe: KnowledgeRecipe) -> str:
    cfg = getattr(model, "config", None)
    what = {"docs": sorted((d.id, hashlib.sha256(d.text.encode()).hexdigest(), d.title) for d in docs),
            "model": [type(model).__name__, str(getattr(cfg, "_name_or_path", "")),
                      sum(p.numel() for p in model.parameters())],
            "targets": list(recipe.target_modules), "max_length": recipe.max_length,
            "chunk_tokens": recipe.chunk_tokens}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def library_covariance(docs: Sequence[DocumentRecord], out: Path, model: Any, tokenizer: Any,
                       recipe: KnowledgeRecipe,
                       chunker: Callable[[DocumentRecord], list[str]]) -> Path:
    """The file holding ``C_mean`` (the mean over ``docs`` of each document's input covariance at every
    target module) for this build, computed once and cached in ``out`` (``.lag-contrast-<digest>``: the
    same documents, model and recipe reuse it when a build resumes). Returns its path."""
    from safetensors.torch import save

    path = out / f"{CACHE_PREFIX}{_digest(docs, model, recipe)}.safetensors"
    if path.is_file():
        return path
    logger.info("contrastive EVA: the mean input covariance of %d documents (one forward each)", len(docs))
    total: dict[str, Any] = {}  # leader module -> sum of the documents' covariances
    shared: dict[str, str] = {}  # module -> the module whose input it shares (its leader)
    for doc in docs:
        texts = [f"{doc.title}\n\n{chunk}" for chunk in chunker(doc)]
        cov = document_covariances(model, tokenizer, texts, recipe.target_modules, recipe.max_length)
        first: dict[int, str] = {}
        for name, c in cov.items():
            lead = shared.setdefault(name, first.setdefault(id(c), name))
            if lead == name:
                total[name] = c if name not in total else total[name] + c
    mean = {name: (c / len(docs)).contiguous() for name, c in total.items()}
    for stale in out.glob(f"{CACHE_PREFIX}*.safetensors"):
        stale.unlink(missing_ok=True)
    atomic_write_bytes(path, save(mean, metadata={"modules": json.dumps(shared)}))
    return path


def load_covariance(path: str | Path) -> dict[str, torch.Tensor]:
    """The covariances a :func:`library_covariance` file holds ({module: [n, n]}), once per process."""
    from safetensors import safe_open

    key = str(path)
    if key not in _LOADED:
        with safe_open(key, framework="pt") as f:
            names = json.loads(f.metadata()["modules"])
            stored = {k: f.get_tensor(k) for k in set(names.values())}
        _LOADED.clear()  # one library's covariances at a time
        _LOADED[key] = {name: stored[leader] for name, leader in names.items()}
    return _LOADED[key]
