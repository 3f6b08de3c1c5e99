"""What a library needs to know about its base model: adaptable modules, their shapes, a fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import IncompatibleAdapterError, ModelError
from .peft_io import AdapterHeader

_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def linear_shape(module: nn.Module) -> tuple[int, int, str] | None:
    """(out_features, in_features, kind) of a Linear-like module, else None.

    kind is "linear" for nn.Linear and "conv1d" for transformers' Conv1D (GPT-2 style, weight [in, out]).
    """
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, "linear"
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return int(module.weight.shape[1]), int(module.weight.shape[0]), "conv1d"
    return None


@dataclass(frozen=True)
class BaseModelSpec:
    """Architecture, sizes and every module of a causal LM (Linear-like ones with their shapes)."""

    architecture: str
    model_type: str
    sizes: dict[str, int]
    linear: dict[str, tuple[int, int, str]]  # module -> (out_features, in_features, kind)
    other: dict[str, str] = field(default_factory=dict)  # non-Linear module -> type name

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> BaseModelSpec:
        config = getattr(model, "config", None)
        linear, other = {}, {}
        for name, module in model.named_modules():
            if not name or name.endswith(".base_layer"):
                continue
            shape = linear_shape(getattr(module, "base_layer", module))  # see through LAG / PEFT wrappers
            if shape is not None:
                linear[name] = shape
            else:
                other[name] = type(module).__name__
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        sizes = {k: int(getattr(text, k)) for k in _CONFIG_KEYS if getattr(text, k, None) is not None}
        return cls(type(model).__name__, str(getattr(config, "model_type", "")), sizes, linear, other)

    @classmethod
    def from_config(cls, config: Any) -> BaseModelSpec:
        """Instantiate the model on the meta device (no memory, no weights) and read its modules."""
        from transformers import AutoModelForCausalLM

        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ModelError(f"config is not a causal LM config: {exc}") from None
        return cls.from_model(model)

    @classmethod
    def from_path(cls, path: str | Path) -> BaseModelSpec:
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelError("not a model folder (config.json is missing)", path=path)
        return cls.from_config(AutoConfig.from_pretrained(path, local_files_only=True))

    @classmethod
    def resolve(cls, base: Any) -> BaseModelSpec:
        """Accept a model, a transformers config, a model folder path, or a spec."""
        if isinstance(base, BaseModelSpec):
            return base
        if isinstance(base, nn.Module):
            return cls.from_model(base)
        if isinstance(base, (str, Path)):
            return cls.from_path(base)
        if hasattr(base, "model_type") and hasattr(base, "to_dict"):
            return cls.from_config(base)
        raise ModelError(f"base_model must be a model, a config or a model folder, got {type(base).__name__}")

    # ---- fingerprint ----------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity: architecture, sizes and a digest of all Linear module names and shapes."""
        listing = json.dumps(sorted((k, list(v)) for k, v in self.linear.items()))
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            **self.sizes,
            "linear_modules": len(self.linear),
            "linear_digest": hashlib.sha256(listing.encode()).hexdigest()[:16],
        }

    # ---- validation -----------------------------------------------------------------------------
    def check_adapter(self, header: AdapterHeader) -> None:
        """Raise IncompatibleAdapterError unless every adapted module exists, is Linear-like and fits."""
        fan_in_fan_out = bool(header.config.get("fan_in_fan_out"))
        for module, ((_r, n), (m, _)) in header.shapes.items():
            where = dict(adapter=header.name, module=module, path=header.weights_file)
            if module not in self.linear:
                if module in self.other:
                    raise IncompatibleAdapterError(
                        f"targets a {self.other[module]}, not an nn.Linear: LAG routes Linear modules only",
                        field="target_modules", **where,
                    )
                raise IncompatibleAdapterError(
                    f"module does not exist in the base model ({self.architecture})",
                    field="target_modules", **where,
                )
            out_f, in_f, kind = self.linear[module]
            if kind == "conv1d" and not fan_in_fan_out:
                raise IncompatibleAdapterError(
                    "targets a Conv1D (weight stored [in, out]) but fan_in_fan_out is false",
                    field="fan_in_fan_out", **where,
                )
            if n != in_f:
                raise IncompatibleAdapterError(
                    f"lora_A has in_features {n}, the base module has {in_f}", field="lora_A", **where
                )
            if m != out_f:
                raise IncompatibleAdapterError(
                    f"lora_B has out_features {m}, the base module has {out_f}", field="lora_B", **where
                )


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
