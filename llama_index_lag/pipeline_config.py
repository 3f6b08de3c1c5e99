"""The pipeline's configuration: one :class:`LAGPipelineConfig` (mode, libraries, index, model, routing),
loaded from and saved to JSON / YAML / TOML. Below the LLM and the pipeline, which both build from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from llama_index.core.bridge.pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._fs import atomic_write_text
from .config import LAGConfig
from .errors import ConfigError
from .modes import PIPELINE_MODES, RETRIEVAL_MODES

MODES = PIPELINE_MODES
Mode = Literal["none", "rag", "lag", "rag+lag", "prag", "prag+lag"]  # = modes.PIPELINE_MODES (a test checks)
LAGMethod = Literal["two-level", "paper"]  # = modes.LAG_METHODS
PATH_FIELDS = ("model", "embed_model", "index", "knowledge")


class LAGPipelineConfig(BaseModel):
    """Everything a LAG pipeline needs; load/save as JSON, YAML or TOML (by file suffix).

    Relative paths in a config file are resolved against the file's folder.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Mode = Field(default="rag+lag", description="none | rag | lag | rag+lag | prag | prag+lag")
    k: int = Field(default=20, gt=0, description="Arrow candidates kept per token before SpectR reranking")
    similarity_top_k: int = Field(default=2, gt=0, description="documents retrieved for RAG / PRAG")
    response_mode: str = Field(default="compact", description="LlamaIndex response mode for RAG modes")
    model: str | None = Field(default=None, description="model folder (default: embedded SmolLM2-135M)")
    embed_model: str | None = Field(default=None, description="embedder folder (default: offline MiniLM)")
    index: str | None = Field(default=None, description="persisted FAISS index folder (lag index)")
    knowledge: str | None = Field(default=None, description="knowledge adapter library folder")
    task: list[str] = Field(default_factory=list, description="task adapter library folders")
    max_new_tokens: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0.0)
    dtype: str = Field(default="float32", description="model dtype: float32 | bfloat16")
    lag_method: LAGMethod = Field(
        default="two-level", description="LAG routing of the lag modes: 'two-level' (request-centred scores, "
        "a shortlist per sequence, then per token) or 'paper' (the LAG paper's per-token Arrow -> SpectR)")
    routing: dict[str, Any] = Field(default_factory=dict,
                                    description="extra LAGConfig fields, e.g. {'granularity': 'sequence'}")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc) from None

    @field_validator("task", mode="before")
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("routing")
    @classmethod
    def _routing_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        LAGConfig.from_dict({k: v for k, v in value.items() if k not in ("mode", "k")})  # names and values
        return value

    # ---- derived ----------------------------------------------------------------------------------
    def lag_config(self) -> LAGConfig:
        """Default routing of this mode (PRAG's adapter is chosen per query on top of it)."""
        extra = {k: v for k, v in self.routing.items() if k not in ("mode", "k")}
        if self.mode in ("none", "rag"):
            return LAGConfig.from_dict({"mode": "none", "k": self.k, **extra})
        if self.mode == "prag":
            # fixed adapter added per query
            return LAGConfig.from_dict({"mode": "none", "k": self.k, **extra})
        return LAGConfig.preset(self.lag_method, k=self.k, **extra)

    def check(self, has_index: bool = False, has_llm: bool = False) -> None:
        """Fail early with a clear message when the mode lacks what it needs (``has_index``: an index or
        retriever object is given instead of ``index``; ``has_llm``: an LLM with its own libraries)."""
        if self.mode in RETRIEVAL_MODES and not self.index and not has_index:
            raise ConfigError(f"mode {self.mode!r} retrieves documents: set index "
                              "(a folder from `lag index`)", field="index")
        if has_llm:
            return
        if self.mode in ("lag", "rag+lag") and not (self.knowledge or self.task):
            raise ConfigError(f"mode {self.mode!r} routes adapters: set knowledge and/or task libraries",
                              field="knowledge")
        if self.mode in ("prag", "prag+lag") and not self.knowledge:
            raise ConfigError(f"mode {self.mode!r} applies the retrieved document's knowledge adapter: "
                              "set knowledge", field="knowledge")

    # ---- files ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> LAGPipelineConfig:
        """Read JSON / YAML / TOML; ``overrides`` (non-None) replace file values."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("pipeline config file not found", path=path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            elif path.suffix == ".toml":
                try:
                    import tomllib
                except ModuleNotFoundError:  # Python 3.10
                    import tomli as tomllib
                data = tomllib.loads(text)
            else:
                raise ConfigError("config must be .json, .yaml/.yml or .toml", path=path)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser error is a bad file
            raise ConfigError(f"cannot parse config: {exc}", path=path) from None
        if not isinstance(data, dict):
            raise ConfigError("config file must hold a mapping of fields", path=path)
        data = _resolve_paths(data, path.parent)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = self.model_dump(exclude_none=True)
        if path.suffix == ".json":
            text = json.dumps(data, indent=2) + "\n"
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(data, sort_keys=False)
        elif path.suffix == ".toml":
            import tomli_w

            text = tomli_w.dumps(data)
        else:
            raise ConfigError("config must be .json, .yaml/.yml or .toml", path=path)
        atomic_write_text(path, text)
        return path


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or None
    msg = err.get("msg", str(exc))
    if field == "mode":
        msg = f"unknown mode {err.get('input')!r}; expected one of {', '.join(MODES)}"
    return ConfigError(f"invalid pipeline config: {msg}", field=field)


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = dict(data)
    for key in PATH_FIELDS:
        if isinstance(out.get(key), str) and not Path(out[key]).expanduser().is_absolute():
            out[key] = str((base / out[key]).resolve())
    if isinstance(out.get("task"), (list, str)):
        tasks = [out["task"]] if isinstance(out["task"], str) else out["task"]
        out["task"] = [t if Path(t).expanduser().is_absolute() else str((base / t).resolve()) for t in tasks]
    return out
