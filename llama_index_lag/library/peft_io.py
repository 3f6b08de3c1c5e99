"""Read standard PEFT LoRA adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Only what LAG can route is accepted: plain LoRA on Linear(-like) modules. Everything else is refused with
an :class:`~llama_index_lag.errors.IncompatibleAdapterError` naming the adapter and the config field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import regex
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterFormatError, IncompatibleAdapterError, UnsafeAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# adapter_config.json fields naming LoRA variants whose forward is not `W x + s B A x`.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (weight-decomposed LoRA) adds a magnitude vector",
    "use_qalora": "QA-LoRA pools the input",
    "lora_bias": "a bias on lora_B adds a constant term",
    "use_bdlora": "block-diagonal LoRA",
}
_UNSUPPORTED_NON_EMPTY = {
    "modules_to_save": "fully trained modules cannot be routed per token",
    "trainable_token_indices": "trainable token embeddings cannot be routed per token",
    "target_parameters": "LoRA on raw nn.Parameters is not a Linear adapter",
    "layer_replication": "layer replication changes the model's depth",
    "alora_invocation_tokens": "activated LoRA only applies after invocation tokens",
    "kasa_config": "KaSA is a LoRA variant with its own forward",
    "velora_config": "VeLoRA is a LoRA variant with its own forward",
    "monteclora_config": "MonteCLoRA is a LoRA variant with its own forward",
}
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: ``delta(x) = scaling * B @ A @ x``."""

    module: str  # path in the causal LM, e.g. "model.layers.0.mlp.gate_proj"
    A: torch.Tensor  # [r, n]
    B: torch.Tensor  # [m, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class AdapterHeader:
    """What a PEFT adapter folder declares, read without loading its weights."""

    name: str
    path: Path
    config: dict[str, Any]
    weights_file: Path
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]  # module -> (A shape, B shape)
    scalings: dict[str, float]  # module -> s (alpha/r or alpha/sqrt(r), per alpha_pattern)

    @property
    def modules(self) -> list[str]:
        return list(self.shapes)

    @property
    def rank(self) -> int:
        return max(a[0] for a, _ in self.shapes.values())


def _why(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def _read_config(path: Path, name: str) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not path.is_dir():
        raise AdapterFormatError("adapter folder does not exist", adapter=name, path=path)
    if not cfg_path.is_file():
        raise AdapterFormatError(f"not a PEFT adapter folder: {CONFIG_FILE} is missing", adapter=name,
                                 path=path)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {_why(exc)}", adapter=name,
                                 path=cfg_path) from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object", adapter=name, path=cfg_path)
    return config


def check_config(config: dict[str, Any], name: str, cfg_path: Path) -> None:
    """Refuse adapter types and LoRA variants that LAG cannot route."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise IncompatibleAdapterError(
            f"only LoRA adapters can be routed, got peft_type={config.get('peft_type')!r}",
            adapter=name, field="peft_type", path=cfg_path,
        )
    for flag, why in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise IncompatibleAdapterError(
                f"unsupported LoRA variant: {flag}=true ({why})", adapter=name, field=flag, path=cfg_path
            )
    for key, why in _UNSUPPORTED_NON_EMPTY.items():
        if config.get(key):
            raise IncompatibleAdapterError(
                f"unsupported: {key} is set ({why})", adapter=name, field=key, path=cfg_path
            )
    if config.get("bias", "none") != "none":
        raise IncompatibleAdapterError(
            f"unsupported: bias={config.get('bias')!r} trains base-model biases, which cannot be routed",
            adapter=name, field="bias", path=cfg_path,
        )
    if not _positive(config.get("r"), integer=True):
        raise AdapterFormatError(f"r must be a positive integer, got {config.get('r')!r}", adapter=name,
                                 field="r", path=cfg_path)
    if not _positive(config.get("lora_alpha")):
        raise AdapterFormatError("lora_alpha must be a positive finite number, got "
                                 f"{config.get('lora_alpha')!r}",
                                 adapter=name, field="lora_alpha", path=cfg_path)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(key)
        if patterns in (None, {}):
            continue
        if not isinstance(patterns, dict):
            raise AdapterFormatError(f"{key} must map module-name patterns to numbers, got {patterns!r}",
                                     adapter=name, field=key, path=cfg_path)
        for pattern, value in patterns.items():
            if not _positive(value, integer=integer):
                kind = "positive integer" if integer else "positive finite number"
                raise AdapterFormatError(f"{key}[{pattern!r}] must be a {kind}, got {value!r}", adapter=name,
                                         field=key, path=cfg_path)
            try:
                regex.compile(pattern)
            except (regex.error, TypeError) as exc:
                raise AdapterFormatError(f"{key} key {pattern!r} is not a regular expression: {exc}",
                                         adapter=name, field=key, path=cfg_path) from None


def _positive(value: Any, integer: bool = False) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    if not (math.isfinite(value) and value > 0):
        return False
    return not integer or float(value).is_integer()


PATTERN_TIMEOUT = 0.25  # seconds one rank/alpha pattern may take to match one module name


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, *, field: str, adapter: str,
                   path: Path | None = None) -> Any:
    """PEFT's rank/alpha pattern lookup: a key matches a module path that ends with it. A pattern that
    backtracks catastrophically is refused after :data:`PATTERN_TIMEOUT` instead of hanging the compile."""
    for key, value in (patterns or {}).items():
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT):
                return value
        except TimeoutError:
            raise AdapterFormatError(f"{field} key {key!r} takes too long to match module names (a regular "
                                     "expression with catastrophic backtracking?)", adapter=adapter,
                                     field=field, module=module, path=path) from None
    return default


def lora_scaling(config: dict[str, Any], module: str, rank: int, *, adapter: str = "?") -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), alpha taken from ``alpha_pattern`` when it matches."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"],
                                 field="alpha_pattern", adapter=adapter))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def read_header(path: str | Path, name: str | None = None, *, allow_pickle: bool = False) -> AdapterHeader:
    """Read and check an adapter's config and tensor shapes (no weights loaded)."""
    path = Path(path)
    name = name or path.name
    config = _read_config(path, name)
    check_config(config, name, path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        if (path / PICKLE_FILE).is_file():
            if not allow_pickle:
                raise UnsafeAdapterError(
                    f"only {PICKLE_FILE} (pickle) found; refusing to unpickle untrusted weights. Convert it "
                    f"to safetensors, or pass allow_pickle=True if you trust its source",
                    adapter=name, path=path / PICKLE_FILE,
                )
            weights = path / PICKLE_FILE
        else:
            raise AdapterFormatError(f"{WEIGHTS_FILE} is missing", adapter=name, path=path)
    shapes = _tensor_shapes(weights, name)
    for key in shapes:  # variants first: their extra tensors would otherwise read as "unexpected"
        if "lora_magnitude_vector" in key:
            raise IncompatibleAdapterError("DoRA magnitude vectors found (DoRA is not supported)",
                                           adapter=name, field=key, path=weights)
        if "lora_embedding_" in key:
            raise IncompatibleAdapterError("LoRA on an embedding layer cannot be routed",
                                           adapter=name, field=key, path=weights)
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    keys: dict[tuple[str, str], str] = {}
    for key, shape in shapes.items():
        match = _KEY.match(key)
        if not match:
            raise IncompatibleAdapterError(
                "unexpected tensor (only lora_A/lora_B weights of Linear modules can be routed)",
                adapter=name, field=key, path=weights,
            )
        slot = (match["module"], match["which"])
        if slot in keys:  # e.g. `...lora_A.weight` and `...lora_A.other.weight`: which one is the adapter?
            raise IncompatibleAdapterError(
                f"two lora_{slot[1]} tensors for one module: {keys[slot]!r} and {key!r} (several adapters in "
                "one file?); keep one", adapter=name, module=slot[0], field=key, path=weights)
        keys[slot] = key
        modules.setdefault(match["module"], {})[match["which"]] = tuple(shape)
    if not modules:
        raise AdapterFormatError("the adapter holds no LoRA weights", adapter=name, path=weights)
    out: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    scalings: dict[str, float] = {}
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterFormatError(f"lora_{missing} is missing", adapter=name, module=module,
                                     field=f"lora_{missing}", path=weights)
        a, b = pair["A"], pair["B"]
        if len(a) != 2 or len(b) != 2:
            raise IncompatibleAdapterError(
                f"lora_A {list(a)} / lora_B {list(b)} are not 2-D: convolution targets cannot be routed",
                adapter=name, module=module, field="lora_A", path=weights,
            )
        if a[0] != b[1] or a[0] == 0:
            raise AdapterFormatError(f"rank mismatch: lora_A {list(a)} vs lora_B {list(b)}",
                                     adapter=name, module=module, field="lora_B", path=weights)
        declared = int(_pattern_value(config.get("rank_pattern"), module, config["r"], field="rank_pattern",
                                      adapter=name, path=path / CONFIG_FILE))
        if a[0] != declared:
            raise AdapterFormatError(f"adapter_config.json declares rank {declared} for this module, lora_A "
                                     f"has rank {a[0]}", adapter=name, module=module, field="r",
                                     path=path / CONFIG_FILE)
        out[module] = ((a[0], a[1]), (b[0], b[1]))
        scalings[module] = lora_scaling(config, module, a[0], adapter=name)
    return AdapterHeader(name=name, path=path, config=config, weights_file=weights, shapes=out,
                         scalings=scalings)


def _tensor_shapes(weights: Path, name: str) -> dict[str, list[int]]:
    if weights.suffix == ".bin":
        return {k: list(v.shape) for k, v in _load_pickle(weights, name).items()}
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"corrupt or truncated safetensors file: {exc}", adapter=name,
                                 path=weights) from None


def _load_pickle(weights: Path, name: str) -> dict[str, torch.Tensor]:
    try:  # even when the caller opted in, only plain tensors are unpickled
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a format error
        raise AdapterFormatError(f"cannot read {weights.name}: {exc}", adapter=name, path=weights) from None
    if not isinstance(state, dict):
        raise AdapterFormatError(f"{weights.name} does not hold a state dict", adapter=name, path=weights)
    return state


_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def factor_arrays(header: AdapterHeader, data: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module, (lora_A [r, n], lora_B [m, r]) as zero-copy numpy views of the weights file's bytes.

    What the library compiler stacks, without a copy per tensor: ``safetensors.torch.load`` makes a torch
    tensor per stored tensor (:func:`load_weights`) and ``safetensors.numpy.load`` copies each one into its
    own bytes first (a slower compile). Float32 /
    float16 / float64 factors are views; bfloat16 ones, which numpy lacks, are converted to float32. The
    file is checked against ``header`` (read and validated by safetensors earlier): one that changed since,
    or whose offsets do not add up, is refused."""
    if header.weights_file.suffix == ".bin":
        return {m: (w.A.numpy(), w.B.numpy()) for m, w in load_weights(header, check_finite=False).items()}

    def corrupt(why: str) -> AdapterFormatError:
        return AdapterFormatError(f"corrupt or truncated safetensors file: {why}", adapter=header.name,
                                  path=header.weights_file)

    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise corrupt("bad header length")
    try:
        entries = json.loads(data[8:8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise corrupt(f"header is not JSON ({_why(exc)})") from None
    base = 8 + size
    found: dict[str, dict[str, np.ndarray]] = {}
    for key, info in entries.items():
        match = _KEY.match(key)
        if not match:
            continue
        try:
            shape, (begin, end) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"{key}: no valid shape / data_offsets") from None
        count = math.prod(shape)
        if info["dtype"] == "BF16":
            itemsize, dtype = 2, np.dtype(np.uint16)
        elif info["dtype"] in _NP_DTYPES:
            dtype = np.dtype(_NP_DTYPES[info["dtype"]])
            itemsize = dtype.itemsize
        else:
            raise AdapterFormatError(f"unsupported dtype {info['dtype']}", adapter=header.name, field=key,
                                     path=header.weights_file)
        if not 0 <= begin <= end == begin + count * itemsize <= len(data) - base:
            raise corrupt(f"{key}: data offsets out of range")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        if info["dtype"] == "BF16":  # bfloat16 is the upper half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        found.setdefault(match["module"], {})[match["which"]] = array
    out = {}
    for module, (a_shape, b_shape) in header.shapes.items():
        pair = found.get(module, {})
        shapes = (pair["A"].shape, pair["B"].shape) if len(pair) == 2 else None
        if shapes != (a_shape, b_shape):
            raise corrupt(f"{module}: the file changed since its header was read")
        out[module] = (pair["A"], pair["B"])
    return out


def load_weights(header: AdapterHeader, check_finite: bool = True,
                 data: bytes | None = None) -> dict[str, LoraModuleWeights]:
    """Load an adapter's LoRA factors (float32), checking they are finite (unless the caller checks them,
    as the library compiler does, batched over many adapters). ``data``: the weights file's bytes, if the
    caller has read them already."""
    weights = header.weights_file
    try:
        if weights.suffix == ".bin":
            tensors = _load_pickle(weights, header.name)
        else:
            tensors = safetensors.torch.load(data if data is not None else weights.read_bytes())  # no pickle
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"corrupt or truncated safetensors file: {exc}", adapter=header.name,
                                 path=weights) from None
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            found.setdefault(match["module"], {})[match["which"]] = tensor
    out = {}
    for module in header.shapes:
        pair = found[module]
        for which in ("A", "B") if check_finite else ():
            if not torch.isfinite(pair[which]).all():
                raise AdapterFormatError("weights contain NaN or Inf", adapter=header.name, module=module,
                                         field=f"lora_{which}", path=weights)
        out[module] = LoraModuleWeights(module, pair["A"].float(), pair["B"].float(), header.scalings[module])
    return out
