"""LAGLLM's arguments: llama-index ``HuggingFaceLLM``'s constructor (loading a model, tokenizer and their
options; unknown keywords refused), generation options checked against what ``model.generate`` takes, and
routing overrides that name a pipeline mode."""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch

from .config import DEFAULT_PRESET, LAGConfig
from .errors import ConfigError

GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")  # LAGLLM's own generation options


def check_number(value: Any, field: str, minimum: float, maximum: float = math.inf) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value <= maximum:
        bound = f"in [{minimum}, {maximum}]" if maximum != math.inf else f">= {minimum}"
        raise ConfigError(f"{field} must be a number {bound}, got {value!r}", field=field)
    return float(value)


def routing_of_pipeline_mode(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A routing override naming a pipeline mode: ``rag`` -> off, ``rag+lag`` -> the default LAG; ``prag`` /
    ``prag+lag`` need the retrieved document (the pipeline's engines replace them before the LLM runs)."""
    mode = overrides["mode"]
    rest = {k: v for k, v in overrides.items() if k != "mode"}
    if mode == "rag":
        return {**rest, "mode": "none"}
    if mode == "rag+lag":
        return {**LAGConfig.preset(DEFAULT_PRESET).to_dict(), **rest}
    raise ConfigError(f"routing mode {mode!r} applies the retrieved document's adapter: use an engine of "
                      "build_query_engine / build_chat_engine", field="mode")


_HINTS = {
    "device": "use device_map='cuda' / 'cpu' / 'auto'",
    "tokenizer_outputs_to_remove": "LAGLLM passes only input_ids and attention_mask to generate",
    "torch_dtype": "use dtype= or model_kwargs={'dtype': ...}",
}


def check_keywords(kwargs: Mapping[str, Any], known: set[str]) -> None:
    """Unknown constructor keywords are an error naming them (with the closest known name)."""
    unknown = sorted(set(kwargs) - known)
    if not unknown:
        return
    named = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = _HINTS.get(key) or (f"did you mean {close[0]!r}?" if close else None)
        named.append(f"{key!r}" + (f" ({hint})" if hint else ""))
    raise ConfigError(f"LAGLLM got unknown keyword argument(s): {', '.join(named)}", field=unknown[0])


@functools.cache
def _generate_keys() -> frozenset[str]:
    from transformers import GenerationConfig

    names = {k for k in GenerationConfig().to_dict() if not k.startswith("_") and k != "transformers_version"}
    return frozenset(names | {"stopping_criteria", "logits_processor", "prefix_allowed_tokens_fn",
                              "negative_prompt_ids", "negative_prompt_attention_mask"})


def check_generate_keys(kwargs: Mapping[str, Any]) -> None:
    """Generation options that ``model.generate`` does not take are an error naming them."""
    unknown = sorted(set(kwargs) - _generate_keys())
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_generate_keys() | set(GEN_KEYS)), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown generation argument(s) {unknown}{hint}", field=unknown[0])


def load_model_and_tokenizer(model: Any, tokenizer: Any, kw: Mapping[str, Any],
          dtype: str | torch.dtype) -> tuple[Any, Any, str]:
    """(model, tokenizer, model name) from LAGLLM's arguments, as HuggingFaceLLM reads them: a loaded
    ``model`` wins over ``model_name`` (then only a label); ``tokenizer_name`` names the tokenizer's
    folder."""
    from .models import load_causal_lm, load_tokenizer, resolve_model_dir

    tok_name, tok_kwargs = kw.get("tokenizer_name") or None, dict(kw.get("tokenizer_kwargs") or {})
    if isinstance(model, torch.nn.Module):
        if tokenizer is None and tok_name is None:
            raise ConfigError("a loaded model needs its tokenizer: LAGLLM(model, tokenizer, ...) or "
                              "tokenizer_name=", field="tokenizer")
        if tokenizer is None:
            tokenizer = load_tokenizer(tok_name, **tok_kwargs)
        name = kw.get("model_name") or str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        return model, tokenizer, name
    folder = resolve_model_dir(model if model is not None else kw.get("model_name") or None)
    loaded, loaded_tokenizer = load_causal_lm(folder, dtype=dtype, device_map=kw.get("device_map"),
                                              model_kwargs=kw.get("model_kwargs"), tokenizer_path=tok_name,
                                              tokenizer_kwargs=tok_kwargs)
    name = kw.get("model_name") if model is not None and kw.get("model_name") else str(folder)
    return loaded, loaded_tokenizer if tokenizer is None else tokenizer, name
