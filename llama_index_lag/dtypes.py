"""The one parser of dtype arguments (model loading and library storage), free of import side effects."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def parse_torch_dtype(dtype: str | torch.dtype, *, allowed: Collection[str] | None = None
                      ) -> torch.dtype | str:
    """The one parser of dtype arguments (raises :class:`ConfigError`, field ``dtype``).

    ``allowed=None`` (loading a model): any ``torch.dtype``, or a name, case-insensitive, ``torch.``
    prefix and aliases accepted (``fp16``, ``half``, ``bf16``, ...); ``"auto"`` is returned as the string
    ``"auto"`` (transformers picks the checkpoint's dtype). ``allowed=names`` (e.g. a library's storage
    dtypes): exactly one of these torch dtype names, or the torch dtype it names.
    """
    import torch

    if allowed is not None:
        if isinstance(dtype, torch.dtype) and any(dtype == getattr(torch, name) for name in allowed):
            return dtype
        if isinstance(dtype, str) and dtype in allowed:
            return getattr(torch, dtype)
        raise ConfigError(f"dtype must be one of {sorted(allowed)}, got {dtype!r}", field="dtype")
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key == "auto":
        return "auto"
    if key not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto", field="dtype")
    return getattr(torch, _DTYPES[key])


__all__ = ["parse_torch_dtype"]
