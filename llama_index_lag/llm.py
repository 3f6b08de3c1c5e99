"""``LAGLLM``: a llama-index ``CustomLLM`` that generates with LAG-routed adapter libraries.

The torch model, tokenizer, libraries and router live in private attributes (llama-index serialises the public
fields on every call). Routing settings are per instance (``llm.with_routing(mode=...)`` makes a view that
shares the model) and per call (``llm.complete(..., routing={...})`` or ``with llm.routing_override(...):``),
carried in context variables so concurrent threads / asyncio tasks never see each other's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from llama_index.core.base.llms.generic_utils import (
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, ValidationError
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.types import Thread

from .config import DEFAULT_PRESET, LAGConfig
from .data import check_text
from .errors import ConfigError, DataError, PromptTooLongError
from .generation import routed_generate
from .library import AdapterLibrary
from .pipeline_config import LAGPipelineConfig
from .router import LAGRouter, attach_lag
from .trace import collect_routing, record_routing  # noqa: F401  (collect_routing: re-exported)

logger = logging.getLogger(__name__)

_CALL_ROUTING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lag_llm_routing",
                                                                                       default=None)
_GEN_KEYS = ("max_new_tokens", "temperature", "top_p", "stop", "seed")


def _number(value: Any, field: str, minimum: float, maximum: float = math.inf) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not minimum <= value <= maximum:
        bound = f"in [{minimum}, {maximum}]" if maximum != math.inf else f">= {minimum}"
        raise ConfigError(f"{field} must be a number {bound}, got {value!r}", field=field)
    return float(value)


class LAGLLM(CustomLLM):
    """A local Hugging Face causal LM whose adapted layers are routed by LAG over adapter libraries.

    Args:
        model: a local model folder, an already-loaded ``PreTrainedModel``, or None for the embedded default.
        tokenizer: required with a loaded model (else loaded from the folder).
        libraries: compiled :class:`AdapterLibrary` objects or folders (task and/or knowledge).
        lag_config: the default routing (``LAGConfig(mode="none")`` when there are no libraries).
        max_new_tokens, temperature (0 = greedy), top_p, stop: generation defaults, overridable per call.
        routing_summary: attach ``additional_kwargs["lag"]`` to responses (a few bincounts per call).
        truncation: ``"left"`` drops the start of a too-long prompt (keeps the question at its end),
            ``"error"`` raises :class:`PromptTooLongError`.
    """

    model_name: str = Field(default="", description="Model folder or name.")
    context_window: int = Field(default=2048, gt=0, description="Max tokens of prompt + generation.")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate by default.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Stop sequences (cut from the output).")
    routing_summary: bool = Field(default=True, description="Attach the routing summary to responses.")
    summary_top: int = Field(default=5, gt=0, description="Adapters per library in the routing summary.")
    truncation: str = Field(default="left", description="'left' or 'error' for prompts too long.")
    routing: dict[str, Any] = Field(default_factory=dict, description="Default routing (LAGConfig fields).")
    chat_model: bool = Field(default=True, description="Use the tokenizer's chat template.")

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()
    _router: LAGRouter | None = PrivateAttr(default=None)
    _config: LAGConfig = PrivateAttr()

    def __init__(
        self,
        model: str | Path | torch.nn.Module | None = None,
        tokenizer: Any = None,
        libraries: Sequence[AdapterLibrary | str | Path] = (),
        lag_config: LAGConfig | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        router: LAGRouter | None = None,
        **kwargs: Any,
    ) -> None:
        from .models import load_causal_lm, resolve_model_dir

        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ConfigError("a loaded model needs its tokenizer: LAGLLM(model, tokenizer, ...)",
                                  field="tokenizer")
            name = str(getattr(model.config, "name_or_path", "") or type(model).__name__)
        else:
            folder = resolve_model_dir(model)
            model, tokenizer = load_causal_lm(folder, dtype=dtype)
            name = str(folder)
        libs = [lib if isinstance(lib, AdapterLibrary) else AdapterLibrary.load(lib) for lib in libraries]
        config = lag_config or (LAGConfig.preset(DEFAULT_PRESET) if libs else LAGConfig(mode="none"))
        if router is None and libs:
            router = attach_lag(model, libs, LAGConfig(mode="none"))  # bare unless a call says otherwise
        has_template = bool(getattr(tokenizer, "chat_template", None))
        kwargs.setdefault("model_name", name)
        kwargs.setdefault("context_window", _context_window(model))
        kwargs.setdefault("chat_model", has_template)
        try:
            super().__init__(routing=config.to_dict(), **kwargs)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ())) or None
            raise ConfigError(f"invalid LAGLLM setting: {err.get('msg', exc)} (got {err.get('input')!r})",
                              field=field) from None
        if self.truncation not in ("left", "error"):
            raise ConfigError("truncation must be 'left' or 'error'", field="truncation")
        self._model, self._tokenizer, self._router, self._config = model, tokenizer, router, config
        self._check_routing(config)

    # ---- construction helpers -------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> LAGLLM:
        """Build from a :class:`~llama_index_lag.pipeline_config.LAGPipelineConfig` (or a path to one)."""
        if not isinstance(config, LAGPipelineConfig):
            config = LAGPipelineConfig.load(config)
        return shared_llm(config, **kwargs)

    def with_routing(self, config: LAGConfig | None = None, **changes: Any) -> LAGLLM:
        """A view of this LLM (same model, tokenizer and router: no reload) with other default routing."""
        new_config = (config or self._config).replace(**changes) if changes else (config or self._config)
        self._check_routing(new_config)
        view = self.model_copy(update={"routing": new_config.to_dict()})
        view._model, view._tokenizer, view._router, view._config = (self._model, self._tokenizer,
                                                                    self._router, new_config)
        return view

    @contextlib.contextmanager
    def routing_override(self, **changes: Any) -> Iterator[None]:
        """Per-request routing for calls made inside the block (this thread / asyncio task only)."""
        current = _CALL_ROUTING.get() or {}
        token = _CALL_ROUTING.set({**current, **changes})
        try:
            yield
        finally:
            _CALL_ROUTING.reset(token)

    def _check_routing(self, config: LAGConfig) -> None:
        if config.mode != "none" and self._router is None:
            raise ConfigError(f"routing mode {config.mode!r} needs at least one adapter library",
                              field="mode")
        if self._router is not None:
            self._router.check_config(config)  # unknown adapter names fail here, not mid-generation

    # ---- properties -----------------------------------------------------------------------------
    @classmethod
    def class_name(cls) -> str:
        return "LAGLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           is_chat_model=self.chat_model, model_name=self.model_name)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def router(self) -> LAGRouter | None:
        return self._router

    @property
    def lag_config(self) -> LAGConfig:
        return self._config

    # ---- prompts --------------------------------------------------------------------------------
    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Messages rendered with the tokenizer's chat template (generation prompt appended)."""
        if self.chat_model:
            return self._tokenizer.apply_chat_template(
                [{"role": m.role.value, "content": m.content or ""} for m in messages],
                tokenize=False, add_generation_prompt=True,
            )
        return self.messages_to_prompt(messages)

    def completion_prompt(self, prompt: str) -> str:
        """A plain completion prompt as a user turn (after ``system_prompt``) of the chat template."""
        messages = [ChatMessage(role="user", content=prompt)]
        if self.system_prompt:
            messages.insert(0, ChatMessage(role="system", content=self.system_prompt))
        return self.chat_prompt(messages) if self.chat_model else self.completion_to_prompt(prompt)

    # ---- generation -----------------------------------------------------------------------------
    def _call_config(self, routing: Any) -> LAGConfig:
        config = self._config
        for overrides in (_CALL_ROUTING.get(), routing):
            if isinstance(overrides, LAGConfig):
                config = overrides
            elif isinstance(overrides, Mapping) and overrides:
                config = config.replace(**overrides)
            elif overrides:
                raise ConfigError("routing must be a LAGConfig or a mapping of its fields, got "
                                  f"{overrides!r}", field="routing")
        self._check_routing(config)
        return config

    def encode(self, prompt: str, max_new_tokens: int,
               focus: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a formatted prompt, fitted to the context window (see ``truncation``).

        ``focus``: the texts that carry the request (e.g. the user's messages); their tokens are marked in
        ``enc["focus"]`` [1, S] (bool) for sequence-level routing (fast tokenizers only)."""
        if not isinstance(prompt, str):
            raise DataError(f"the prompt must be a string, got {type(prompt).__name__}", field="prompt")
        check_text(prompt, "prompt")
        want_offsets = bool(focus) and getattr(self._tokenizer, "is_fast", False)
        enc = dict(self._tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.chat_model,
                                   return_offsets_mapping=want_offsets))
        if want_offsets:
            enc["focus"] = _span_mask(prompt, enc.pop("offset_mapping")[0], focus)[None]
        ids = enc["input_ids"]
        budget = self.context_window - max_new_tokens
        if ids.shape[1] > budget:
            if self.truncation == "error" or budget <= 0:
                raise PromptTooLongError(
                    f"prompt has {ids.shape[1]} tokens; the context window {self.context_window} leaves "
                    f"{budget} after max_new_tokens={max_new_tokens}", field="prompt")
            logger.warning("prompt of %d tokens truncated from the left to %d", ids.shape[1], budget)
            enc = {k: v[:, -budget:] for k, v in enc.items()}
        return dict(enc)

    def generation_kwargs(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """``model.generate`` keyword arguments from this LLM's defaults and per-call ``opts`` (checked:
        a bad value is a :class:`ConfigError` naming it)."""
        temperature = _number(opts.get("temperature", self.temperature), "temperature", minimum=0.0)
        max_new_tokens = opts.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}",
                              field="max_new_tokens")
        top_p = _number(opts.get("top_p", self.top_p), "top_p", minimum=0.0, maximum=1.0)
        if top_p == 0:
            raise ConfigError("top_p must be in (0, 1], got 0", field="top_p")
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": self._tokenizer.pad_token_id}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stop = list(opts.get("stop") or self.stop)
        if stop:
            kw.update(stop_strings=stop, tokenizer=self._tokenizer)
        return kw

    def _run(self, prompt: str, formatted: bool, routing: Any, opts: dict[str, Any],
             streamer: Any = None,
             focus: Sequence[str] | None = None) -> tuple[str, dict[str, Any] | None, int]:
        """Generate (in the calling thread); returns (text, routing summary, prompt tokens)."""
        full = prompt if formatted else self.completion_prompt(prompt)
        focus = focus if formatted else [prompt]
        gen_kw = self.generation_kwargs(opts)
        inputs = self.encode(full, gen_kw["max_new_tokens"], focus)
        focus_mask = inputs.pop("focus", None)
        config = self._call_config(routing)
        traced = self._router is not None and self.routing_summary and config.mode != "none"
        out = routed_generate(self._model, inputs["input_ids"], inputs.get("attention_mask"),
                              router=self._router, config=config, focus=focus_mask,
                              trace="summary" if traced else None, seed=opts.get("seed"), streamer=streamer,
                              **gen_kw)
        new_tokens = out.new[0]
        text = cut_at_stop(self._tokenizer.decode(new_tokens, skip_special_tokens=True), gen_kw)
        trace, seconds = out.trace, out.seconds
        summary = None
        if trace is not None and out.routing_seconds is not None:
            per_library = trace.summary(top=self.summary_top)
            summary = {
                "mode": config.mode,
                "k": config.k,
                "libraries": {kind: entry["adapters"] for kind, entry in per_library.items()},
                "routing_ms": round(out.routing_seconds * 1e3, 2),
                "generate_ms": round(seconds * 1e3, 2),
                "new_tokens": int(new_tokens.numel()),
            }
            summary["selections"] = {kind: entry["selections"] for kind, entry in per_library.items()}
            if config.fixed:
                summary["fixed"] = {kind: list(names) for kind, names in config.fixed.items()}
        record_routing(summary)
        return text, summary, int(inputs["input_ids"].shape[1])

    @staticmethod
    def _split_kwargs(kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        routing = kwargs.pop("routing", None)
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _GEN_KEYS}
        opts["focus"] = kwargs.pop("_focus", None)
        return routing, opts

    def _response(self, text: str, summary: dict[str, Any] | None, n_prompt: int) -> CompletionResponse:
        extra: dict[str, Any] = {"prompt_tokens": n_prompt}
        if self.routing_summary:
            extra["lag"] = summary
        return CompletionResponse(text=text, additional_kwargs=extra)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Generate a completion. Per call: max_new_tokens, temperature, top_p, stop, seed, and
        ``routing=`` (a LAGConfig or a dict of its fields, e.g. ``{"mode": "spectr"}``)."""
        routing, opts = self._split_kwargs(kwargs)
        focus = opts.pop("focus")
        return self._response(*self._run(prompt, formatted, routing, opts, focus=focus))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Stream tokens as they are generated (generation runs in a thread with this call's context)."""
        from transformers import TextIteratorStreamer

        routing, opts = self._split_kwargs(kwargs)
        focus = opts.pop("focus")
        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["value"] = self._run(prompt, formatted, routing, opts, streamer, focus)
            except BaseException as exc:  # surfaced in the consumer
                result["error"] = exc
                streamer.end()

        # llama-index's Thread runs its target in a copy of this context: routing overrides + spans
        thread = Thread(target=work, name="lag-generate", daemon=True)
        thread.start()
        stop = list(opts.get("stop") or self.stop)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in streamer:
                new = cut_at_stop(text + piece, {"stop_strings": stop} if stop else {})
                delta, text = new[len(text):], new
                if delta:
                    yield CompletionResponse(text=text, delta=delta)
            thread.join()
            if "error" in result:
                raise result["error"]
            final, summary, n_prompt = result["value"]
            yield self._response(final, summary, n_prompt).model_copy(update={"delta": final[len(text):]})

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(self.complete(self.chat_prompt(messages), formatted=True,
                                                                  _focus=_user_texts(messages), **kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return stream_completion_response_to_chat_response(
            self.stream_complete(self.chat_prompt(messages), formatted=True, _focus=_user_texts(messages),
                                 **kwargs))

    # ---- async: generation runs in a worker thread, the event loop stays free --------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        routing, opts = self._split_kwargs(kwargs)
        focus = opts.pop("focus")
        return self._response(*await asyncio.to_thread(self._run, prompt, formatted, routing, opts, None,
                                                       focus))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        sync_gen = await asyncio.to_thread(self.stream_complete, prompt, formatted, **kwargs)
        return _aiter_thread(sync_gen)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(
            await self.acomplete(self.chat_prompt(messages), formatted=True, _focus=_user_texts(messages),
                                 **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        gen = await self.astream_complete(self.chat_prompt(messages), formatted=True,
                                          _focus=_user_texts(messages), **kwargs)

        async def chat_gen() -> AsyncGenerator[ChatResponse, None]:
            async for response in gen:
                yield ChatResponse(message=ChatMessage(role="assistant", content=response.text,
                                                       additional_kwargs=response.additional_kwargs),
                                   delta=response.delta, raw=response.raw)

        return chat_gen()


async def _aiter_thread(sync_gen: Iterator[Any]) -> AsyncGenerator[Any, None]:
    """Iterate a blocking generator from async code without blocking the event loop."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, sync_gen, done)
        if item is done:
            return
        yield item


# ---- process-wide sharing: one model per (model, dtype, libraries), whatever the routing ----------------
_SHARED_LOCK = threading.Lock()
_SHARED: dict[tuple, LAGLLM] = {}


def shared_llm(config: LAGPipelineConfig, **kwargs: Any) -> LAGLLM:
    """The process's LAGLLM for (model, dtype, libraries), viewed with this config's routing."""
    libs = tuple([config.knowledge] if config.knowledge else []) + tuple(config.task)
    key = (config.model, config.dtype, libs)
    with _SHARED_LOCK:
        base = _SHARED.get(key)
        if base is None:
            base = LAGLLM(config.model, libraries=list(libs), lag_config=LAGConfig(mode="none"),
                          dtype=config.dtype)
            _SHARED[key] = base
    view = base.with_routing(config.lag_config())
    return view.model_copy(update={"max_new_tokens": config.max_new_tokens,
                                   "temperature": config.temperature, **kwargs})


def _user_texts(messages: Sequence[ChatMessage]) -> list[str]:
    return [m.content for m in messages if m.role.value == "user" and m.content]


def _span_mask(prompt: str, offsets: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """[S] bool: tokens whose characters lie inside the last occurrence of any of ``texts`` in ``prompt``."""
    mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for text in texts:
        start = prompt.rfind(text)
        if start < 0 or not text:
            continue
        end = start + len(text)
        mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    return mask


def cut_at_stop(text: str, gen_kw: Mapping[str, Any]) -> str:
    """Cut ``text`` at the first stop sequence."""
    cut = len(text)
    for stop in gen_kw.get("stop_strings") or ():
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def _context_window(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048
