"""Tiny real models for tests: a trained byte-level BPE tokenizer, random Llama / Qwen2 / Mistral LMs and
random PEFT LoRA adapters with a decaying spectrum.

Everything is built in-process in milliseconds, deterministically and offline, so users can test code that
takes a model folder without downloading anything::

    from llama_index_lag.testing import make_tiny_model_dir
    folder = make_tiny_model_dir(tmp_path / "tiny", arch="qwen2")
    model, tokenizer = llama_index_lag.models.load_causal_lm(folder)
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._fs import atomic_dir, atomic_write_json
from .errors import ConfigError, ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TINY_VOCAB_TARGET = 512
TINY_MARKER = "lag_tiny_model.json"
ARCHS = ("llama", "qwen2", "mistral")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. What is the capital of France? The capital of France is Paris.
A library of adapters answers questions about documents. Each adapter was trained on one document.
The router picks the adapters whose directions best match the hidden state of every token.
Question: Who wrote the report? Answer: The report was written by the team in the north office.
Context information is below. Given the context and not prior knowledge, answer the query.
She said that the river runs through the old town, and the bridge was built in the year 1850.
They were there when it happened; we will see what they can do with it in the morning.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Names: Alice, Bob, Carol, Dave, Eve, Mallory.
The system is a helpful assistant. The user asks, and the assistant answers briefly and correctly.
In the beginning there was a small model with a tiny vocabulary, and it learned to speak a little.
"""


def _corpus() -> list[str]:
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    return lines * 4


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """Train the byte-level BPE once per process (deterministic) and return it serialised."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(path: str | Path | None = None) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer (~500 tokens, any text encodes) with ChatML special tokens + template.

    ``<|endoftext|>`` (id 0) is the pad token, ``<|im_start|>`` (1) bos, ``<|im_end|>`` (2) eos. Saved into
    ``path`` when given.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    if path is not None:
        tokenizer.save_pretrained(str(path))
    return tokenizer


def _config_class(arch: str) -> Any:
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
    if arch not in classes:
        raise ConfigError(f"unknown tiny model architecture {arch!r}; use one of {list(ARCHS)}", field="arch")
    return getattr(transformers, classes[arch])


def make_tiny_config(
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    **extra: Any,
) -> Any:
    """The transformers config of a tiny ``arch`` model; token ids match :func:`make_tiny_tokenizer`."""
    tokenizer = make_tiny_tokenizer()
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch in ("qwen2", "mistral"):
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    return _config_class(arch)(**kwargs)


def make_tiny_model(
    arch: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 96,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 512,
    dtype: torch.dtype | None = None,
    **extra: Any,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (``torch.manual_seed(seed)``), in eval mode, untied embeddings.

    ``vocab_size`` defaults to the tiny tokenizer's size, ``dtype`` to float32; ``extra`` config fields go to
    the config class.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = make_tiny_config(
        arch,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        **extra,
    )
    with _seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(config, name))
    return model.eval()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block, restoring the previous RNG state afterwards."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _recipe(arch: str, seed: int, config_kw: dict[str, Any]) -> dict[str, Any]:
    import transformers

    recipe = {"arch": arch, "seed": seed, "tokenizer": _tiny_tokenizer_hash()}
    recipe.update({k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v)
                   for k, v in sorted(config_kw.items())})
    recipe["transformers_version"] = transformers.__version__
    return recipe


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_hash() -> str:
    import hashlib

    return hashlib.sha256(_tiny_tokenizer_json().encode("utf-8")).hexdigest()[:16]


def make_tiny_model_dir(path: str | Path, arch: str = "llama", seed: int = 0, **kw: Any) -> Path:
    """Save a tiny model + tokenizer + generation config into ``path`` (loadable by ``load_causal_lm``).

    Idempotent: a folder already holding the same recipe is returned untouched; a folder with another
    tiny-model recipe is replaced atomically. A non-empty folder that is not a tiny model is refused.
    """
    path = Path(path)
    recipe = _recipe(arch, seed, kw)
    if _read_marker(path) == recipe:
        return path
    if path.exists() and not path.is_dir():
        raise ModelError("tiny model path exists and is not a folder", path=path)
    if path.is_dir() and any(path.iterdir()) and _read_marker(path) is None:
        raise ModelError("refusing to overwrite a non-empty folder that is not a tiny model", path=path)
    model = make_tiny_model(arch, seed=seed, **kw)
    if model.config.vocab_size < len(make_tiny_tokenizer()):
        raise ConfigError(
            f"vocab_size {model.config.vocab_size} is smaller than the tiny tokenizer "
            f"({len(make_tiny_tokenizer())})", field="vocab_size",
        )
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        make_tiny_tokenizer(tmp)
        atomic_write_json(tmp / TINY_MARKER, recipe)
    return path


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / TINY_MARKER).read_text("utf-8"))
    except (OSError, ValueError):
        return None


MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


def make_lora_adapters(
    model: PreTrainedModel,
    out_dir: str | Path,
    n: int,
    *,
    rank: int = 4,
    target_modules: Sequence[str] = MLP_MODULES,
    seed: int = 0,
    prefix: str = "doc",
    lora_alpha: float | None = None,
    decay: float = 0.3,
    scale: float = 0.5,
) -> list[Path]:
    """Write ``n`` random PEFT LoRA adapters for ``model`` into ``out_dir/{prefix}{i}``; return their folders.

    Standard PEFT folders (see :func:`write_lora_adapter`) for the Linear layers of ``model`` that PEFT's
    ``target_modules`` select. Each adapted module gets ``B @ A`` with orthonormal factors and a decaying
    spectrum ``scale * decay**j`` (j = 0..rank-1), so iterative SVD methods converge on them. ``lora_alpha``
    defaults to ``rank`` (scaling 1). Deterministic in ``seed``; ``model`` is not modified.
    """
    import torch

    if n < 1 or rank < 1:
        raise ConfigError("make_lora_adapters needs n >= 1 and rank >= 1", field="n" if n < 1 else "rank")
    modules, conv1d = _target_shapes(model, target_modules)
    generator = torch.Generator().manual_seed(seed)
    # as PEFT stores them: float64 weights stay float64, anything else is saved as float32
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    alpha = float(lora_alpha if lora_alpha is not None else rank)
    out_dir = Path(out_dir)
    return [write_lora_adapter(out_dir / f"{prefix}{i}", modules, rank=rank, lora_alpha=alpha,
                               generator=generator, decay=decay, scale=scale, dtype=dtype,
                               target_modules=sorted(set(target_modules)), fan_in_fan_out=conv1d,
                               base_model_name_or_path=getattr(model, "name_or_path", None) or None)
            for i in range(n)]


def _target_shapes(model: PreTrainedModel, target_modules: Sequence[str]
                   ) -> tuple[dict[str, tuple[int, int]], bool]:
    """Module path -> (out_features, in_features) of the Linear layers (and transformers' Conv1D, weight
    [in, out]) that ``target_modules`` select as PEFT matches a list (the full path, or its last
    components), in model order; and whether any is a Conv1D (PEFT then sets ``fan_in_fan_out``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    targets = list(target_modules)
    modules: dict[str, tuple[int, int]] = {}
    conv1d = False
    for name, module in model.named_modules():
        if not any(name == t or name.endswith(f".{t}") for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            modules[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            modules[name] = (int(module.weight.shape[1]), int(module.weight.shape[0]))
            conv1d = True
    if not modules:
        raise ConfigError(f"target modules {sorted(set(targets))} not found in the model (no Linear layer "
                          "of that name)", field="target_modules")
    return modules, conv1d


def write_lora_adapter(
    path: str | Path,
    modules: Mapping[str, tuple[int, int]],
    *,
    rank: int,
    lora_alpha: float,
    generator: torch.Generator,
    decay: float,
    scale: float,
    precision: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    target_modules: Sequence[str] | None = None,
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write one standard PEFT LoRA folder (``adapter_model.safetensors`` + ``adapter_config.json``) with
    random factors of decaying spectrum, like trained LoRAs; no model needed. Returns ``path``.

    ``modules``: module path -> (out_features, in_features). Per module in order, ``A`` [rank, in] has
    orthonormal rows and ``B`` [out, rank] orthonormal columns times ``scale * decay**j``; both are drawn
    from ``generator`` (``torch.randn``, in ``precision``, default float64) and saved in ``dtype`` (default
    float32). ``target_modules`` (config) default to the modules' last path components; ``fan_in_fan_out``:
    the base layers store their weights [in, out] (transformers' Conv1D).
    """
    import torch
    from safetensors.torch import save_file

    precision = precision or torch.float64
    dtype = dtype or torch.float32
    for m, n in modules.values():
        if rank > min(n, m):
            raise ConfigError(f"rank {rank} exceeds the module size {m}x{n}", field="rank")
    spectrum = scale * decay ** torch.arange(rank, dtype=precision)
    tensors = {}
    for name, (m, n) in modules.items():
        q_in, _ = torch.linalg.qr(torch.randn(n, rank, generator=generator, dtype=precision))
        q_out, _ = torch.linalg.qr(torch.randn(m, rank, generator=generator, dtype=precision))
        tensors[f"base_model.model.{name}.lora_A.weight"] = q_in.T.to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (q_out * spectrum).to(dtype).contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    targets = (list(target_modules) if target_modules is not None
               else sorted({name.rsplit(".", 1)[-1] for name in modules}))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": lora_alpha, "target_modules": targets,
              "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": fan_in_fan_out, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
              "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path


__all__ = [
    "ARCHS",
    "CHATML_TEMPLATE",
    "make_tiny_config",
    "make_tiny_model",
    "make_tiny_model_dir",
    "make_tiny_tokenizer",
    "make_lora_adapters",
    "MLP_MODULES",
    "write_lora_adapter",
]
