"""One config, six modes: ``none | rag | lag | rag+lag | prag | prag+lag`` as standard LlamaIndex query engines.

=========  ==========================================  =========================================
mode       retrieval (FAISS)                           adapters
=========  ==========================================  =========================================
none       no (no embedding, no search)                off
rag        top-k documents in the prompt               off
lag        no                                          LAG over every attached library
rag+lag    top-k documents in the prompt               LAG over every attached library
prag       top document -> its knowledge adapter,      that adapter (fixed); no text in prompt
           no text in the prompt
prag+lag   as prag                                     that adapter + LAG over task adapters
=========  ==========================================  =========================================

Switching mode is a config change only: :func:`build_query_engine` reuses one loaded model (with its
libraries attached once), one embedder and one index per process.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from llama_index.core.base.response.schema import RESPONSE_TYPE, StreamingResponse
from llama_index.core.bridge.pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from llama_index.core.indices.prompt_helper import PromptHelper
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.response_synthesizers import get_response_synthesizer
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle

from ._fs import atomic_write_text
from .config import LAGConfig
from .errors import ConfigError, LibraryError
from .llm import collect_routing

MODES = ("none", "rag", "lag", "rag+lag", "prag", "prag+lag")
Mode = Literal["none", "rag", "lag", "rag+lag", "prag", "prag+lag"]
RETRIEVAL_MODES = ("rag", "rag+lag", "prag", "prag+lag")
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
    lag_method: Literal["two-level", "paper"] = Field(
        default="two-level", description="LAG routing of the lag modes: 'two-level' (request-centred scores, a "
        "shortlist per sequence, then per token) or 'paper' (the LAG paper's per-token Arrow -> SpectR)")
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
            return LAGConfig.from_dict({"mode": "none", "k": self.k, **extra})  # fixed adapter added per query
        return LAGConfig.preset(self.lag_method, k=self.k, **extra)

    def check(self) -> None:
        """Fail early with a clear message when the mode lacks what it needs."""
        if self.mode in RETRIEVAL_MODES and not self.index:
            raise ConfigError(f"mode {self.mode!r} retrieves documents: set index (a folder from `lag index`)",
                              field="index")
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


# ---- process-wide sharing: one model / embedder / index per process, whatever the mode -----------------
_LOCK = threading.Lock()
_LLMS: dict[tuple, Any] = {}
_EMBEDDERS: dict[str | None, Any] = {}
_INDEXES: dict[tuple, Any] = {}


def shared_llm(config: LAGPipelineConfig, **kwargs: Any) -> Any:
    """The process's LAGLLM for (model, dtype, libraries), viewed with this config's routing."""
    from .llm import LAGLLM

    libs = tuple([config.knowledge] if config.knowledge else []) + tuple(config.task)
    key = (config.model, config.dtype, libs)
    with _LOCK:
        base = _LLMS.get(key)
        if base is None:
            base = LAGLLM(config.model, libraries=list(libs), lag_config=LAGConfig(mode="none"),
                          dtype=config.dtype)
            _LLMS[key] = base
    view = base.with_routing(config.lag_config())
    return view.model_copy(update={"max_new_tokens": config.max_new_tokens,
                                   "temperature": config.temperature, **kwargs})


def shared_embed_model(path: str | None) -> Any:
    from .models import load_embed_model

    with _LOCK:
        if path not in _EMBEDDERS:
            _EMBEDDERS[path] = load_embed_model(path)
        return _EMBEDDERS[path]


def shared_index(index_dir: str, embed_model: Any) -> Any:
    from .indexing import load_index

    key = (str(Path(index_dir).resolve()), id(embed_model))
    with _LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = load_index(index_dir, embed_model=embed_model)
        return _INDEXES[key]


# ---- query engine ------------------------------------------------------------------------------------
class NoRetriever(BaseRetriever):
    """Retrieves nothing, without embedding the query: for the modes that do not retrieve."""

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return []


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One routing summary for a query that made several LLM calls (shares weighted by selections)."""
    if not summaries:
        return None
    if len(summaries) == 1:
        return summaries[0]
    libraries: dict[str, dict[str, float]] = {}
    totals: dict[str, int] = {}
    for s in summaries:
        for kind, adapters in s["libraries"].items():
            n = s.get("selections", {}).get(kind, 1)
            totals[kind] = totals.get(kind, 0) + n
            for a in adapters:
                libraries.setdefault(kind, {})
                libraries[kind][a["adapter"]] = libraries[kind].get(a["adapter"], 0.0) + a["share"] * n
    merged = dict(summaries[-1])
    merged["libraries"] = {
        kind: [{"adapter": a, "share": round(v / max(totals[kind], 1), 4)}
               for a, v in sorted(shares.items(), key=lambda kv: -kv[1])]
        for kind, shares in libraries.items()
    }
    merged["routing_ms"] = round(sum(s.get("routing_ms", 0.0) for s in summaries), 2)
    merged["calls"] = len(summaries)
    return merged


class LAGQueryEngine(RetrieverQueryEngine):
    """A ``RetrieverQueryEngine`` that knows its pipeline mode: PRAG's per-query adapter and the routing
    summary in ``response.metadata["lag"]``."""

    def __init__(self, *args: Any, mode: str, llm: Any = None, doc_to_adapter: dict[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self._llm = llm
        self._doc_to_adapter = doc_to_adapter or {}

    @property
    def llm(self) -> Any:
        """The LAGLLM view this engine generates with (shared model, this mode's routing)."""
        return self._llm

    def prag_adapter(self, nodes: list[NodeWithScore]) -> str:
        """The knowledge adapter PRAG applies for these retrieved nodes (the top document's)."""
        if not nodes:
            raise LibraryError("PRAG retrieved no document, so there is no knowledge adapter to apply")
        doc_id = nodes[0].node.metadata.get("doc_id") or nodes[0].node.ref_doc_id
        adapter = self._doc_to_adapter.get(doc_id)
        if adapter is None:
            raise LibraryError(f"retrieved document {doc_id!r} has no adapter in the knowledge library "
                               "(build it with `lag build-adapters`)", adapter=doc_id, field="knowledge")
        return adapter

    @contextlib.contextmanager
    def _routing(self, nodes: list[NodeWithScore]) -> Iterator[None]:
        if self.mode in ("prag", "prag+lag"):
            adapter = self.prag_adapter(nodes)
            mode = "fixed" if self.mode == "prag" else "lag"
            with self._llm.routing_override(mode=mode, fixed={"knowledge": [adapter]}):
                yield
        else:
            yield

    def _synth_nodes(self, nodes: list[NodeWithScore]) -> list[NodeWithScore]:
        return [] if self.mode in ("prag", "prag+lag") else nodes

    def _finish(self, response: RESPONSE_TYPE, nodes: list[NodeWithScore], sink: list[dict[str, Any]]) -> RESPONSE_TYPE:
        response.source_nodes = nodes
        response.metadata = dict(response.metadata or {})
        if isinstance(response, StreamingResponse) and response.response_gen is not None:
            inner = response.response_gen

            def gen() -> Iterator[str]:
                yield from inner
                response.metadata["lag"] = merge_summaries(sink)

            response.response_gen = gen()
        else:
            response.metadata["lag"] = merge_summaries(sink)
        response.metadata["mode"] = self.mode
        return response

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes = self.retrieve(query_bundle)
        with collect_routing() as sink, self._routing(nodes):
            response = self._response_synthesizer.synthesize(query=query_bundle, nodes=self._synth_nodes(nodes))
        return self._finish(response, nodes, sink)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes = await self.aretrieve(query_bundle)
        with collect_routing() as sink, self._routing(nodes):
            response = await self._response_synthesizer.asynthesize(query=query_bundle,
                                                                    nodes=self._synth_nodes(nodes))
        return self._finish(response, nodes, sink)


def build_query_engine(
    config: LAGPipelineConfig | str | Path,
    *,
    llm: Any = None,
    index: Any = None,
    embed_model: Any = None,
    streaming: bool = False,
    **overrides: Any,
) -> LAGQueryEngine:
    """A LlamaIndex query engine for ``config.mode`` (a config object or file; ``overrides`` replace fields).

    ``llm`` (a LAGLLM), ``index`` (a VectorStoreIndex) and ``embed_model`` are reused when given; otherwise
    they are loaded once per process and shared by every engine built here.
    """
    if not isinstance(config, LAGPipelineConfig):
        config = LAGPipelineConfig.load(config, **overrides)
    elif overrides:
        config = config.model_copy(update=overrides)
        config = LAGPipelineConfig(**config.model_dump())
    config.check()
    if llm is None:
        llm = shared_llm(config)
    else:
        llm = llm.with_routing(config.lag_config()).model_copy(update={"max_new_tokens": config.max_new_tokens})
    doc_to_adapter = None
    if config.mode in ("prag", "prag+lag"):
        know = [lib for lib in (llm.router.libraries.get("knowledge", []) if llm.router else [])]
        if not know:
            raise ConfigError(f"mode {config.mode!r} needs a knowledge library attached to the LLM",
                              field="knowledge")
        doc_to_adapter = {d: a for lib in know for d, a in lib.doc_ids().items()}
    if config.mode in RETRIEVAL_MODES:
        if index is None:
            embed = embed_model if embed_model is not None else shared_embed_model(config.embed_model)
            index = shared_index(config.index, embed)
        retriever = index.as_retriever(similarity_top_k=config.similarity_top_k)
    else:
        retriever = NoRetriever()
    response_mode = config.response_mode if config.mode in ("rag", "rag+lag") else "generation"
    # count prompt tokens with the model's own tokenizer when packing retrieved text into the window
    helper = PromptHelper.from_llm_metadata(llm.metadata, tokenizer=lambda text: llm.tokenizer.encode(text))
    synthesizer = get_response_synthesizer(llm=llm, response_mode=response_mode, streaming=streaming,
                                           prompt_helper=helper)
    return LAGQueryEngine(retriever=retriever, response_synthesizer=synthesizer, mode=config.mode, llm=llm,
                          doc_to_adapter=doc_to_adapter)
