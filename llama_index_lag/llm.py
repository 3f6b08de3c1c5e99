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
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import Thread

from .batching import BatchEngine
from .config import DEFAULT_PRESET, LAGConfig
from .data import check_text
from .errors import ConfigError, DataError, PromptTooLongError
from .generation import eos_ids, routed_generate
from .library import AdapterLibrary
from .llm_args import (
    GEN_KEYS,
    check_generate_keys,
    check_keywords,
    check_number,
    load_model_and_tokenizer,
    routing_of_pipeline_mode,
)
from .modes import RETRIEVAL_MODES
from .observe import emit_routing, instrument
from .pipeline_config import LAGPipelineConfig
from .router import LAGRouter, attach_lag
from .trace import RoutingSummary, collect_routing, record_call, record_routing  # noqa: F401  (collect_routing: re-export)

logger = logging.getLogger(__name__)

_CALL_ROUTING: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lag_llm_routing",
                                                                                       default=None)


class LAGLLM(CustomLLM):
    """A local Hugging Face causal LM whose adapted layers are routed by LAG over adapter libraries.

    The constructor takes llama-index ``HuggingFaceLLM``'s parameters with the same meaning (local folders
    only, never the Hub): ``model_name``, ``tokenizer_name``, ``model``, ``tokenizer``, ``context_window``,
    ``max_new_tokens``, ``generate_kwargs``, ``system_prompt``, ``query_wrapper_prompt``,
    ``messages_to_prompt``, ``completion_to_prompt``, ``is_chat_model``, ``stopping_ids``, ``device_map``,
    ``model_kwargs``, ``tokenizer_kwargs`` (and llama-index's ``callback_manager``, ``output_parser``, ...).
    An unknown keyword is a :class:`ConfigError`.

    Args:
        model: a local model folder, an already-loaded ``PreTrainedModel``, or None (then ``model_name``, else
            the embedded default).
        tokenizer: a loaded tokenizer (required with a loaded model unless ``tokenizer_name`` is given).
        libraries: compiled :class:`AdapterLibrary` objects or folders (task and/or knowledge).
        lag_config: the default routing (``LAGConfig(mode="none")`` when there are no libraries).
        dtype: the model's dtype when loaded from a folder (``model_kwargs["dtype"]`` wins).
        max_new_tokens, temperature (0 = greedy), top_p, stop: generation defaults, overridable per call;
            ``generate_kwargs`` adds any other ``model.generate`` argument (top_k, repetition_penalty, ...).
        routing_summary: attach ``additional_kwargs["lag"]`` to responses (a few bincounts per call).
        truncation: ``"left"`` drops the start of a too-long prompt (keeps the question at its end),
            ``"error"`` raises :class:`PromptTooLongError`.
    """

    model_name: str = Field(default="", description="Model folder (loaded when no model object is given).")
    tokenizer_name: str = Field(default="", description="Tokenizer folder (default: the model's).")
    context_window: int = Field(default=2048, gt=0, description="Max tokens of prompt + generation.")
    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate by default.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 = greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, description="Stop sequences (cut from the output).")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict,
                                            description="Other model.generate arguments, e.g. top_k.")
    stopping_ids: list[int] = Field(default_factory=list, description="Token ids that also end generation.")
    is_chat_model: bool = Field(default=True, description="Render completions with the chat template.")
    device_map: str | dict[str, Any] | None = Field(default=None, description="Where the model is placed.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="from_pretrained arguments.")
    tokenizer_kwargs: dict[str, Any] = Field(default_factory=dict, description="Tokenizer arguments.")
    routing_summary: bool = Field(default=True, description="Attach the routing summary to responses.")
    summary_top: int = Field(default=5, gt=0, description="Adapters per library in the routing summary.")
    truncation: str = Field(default="left", description="'left' or 'error' for prompts too long.")
    routing: dict[str, Any] = Field(default_factory=dict, description="Default routing (LAGConfig fields).")

    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()
    _router: LAGRouter | None = PrivateAttr(default=None)
    _config: LAGConfig = PrivateAttr()
    _custom_messages: bool = PrivateAttr(default=False)  # messages_to_prompt given: no chat template
    _custom_completion: bool = PrivateAttr(default=False)  # completion_to_prompt given
    _engine: Any = PrivateAttr(default=None)  # a BatchEngine (enable_batching): generations run batched

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
        if "chat_model" in kwargs:  # the earlier spelling of is_chat_model
            kwargs.setdefault("is_chat_model", kwargs.pop("chat_model"))
        check_keywords(kwargs, set(type(self).model_fields) - {"routing"})
        if isinstance(kwargs.get("query_wrapper_prompt"), str):
            kwargs["query_wrapper_prompt"] = PromptTemplate(kwargs["query_wrapper_prompt"])
        model, tokenizer, name = load_model_and_tokenizer(model, tokenizer, kwargs, dtype)
        libs = [lib if isinstance(lib, AdapterLibrary) else AdapterLibrary.load(lib) for lib in libraries]
        config = lag_config or (LAGConfig.preset(DEFAULT_PRESET) if libs else LAGConfig(mode="none"))
        if router is None and libs:
            router = attach_lag(model, libs, LAGConfig(mode="none"))  # bare unless a call says otherwise
        custom = {key: kwargs.get(key) is not None for key in ("messages_to_prompt", "completion_to_prompt")}
        kwargs["model_name"] = name
        kwargs["model_kwargs"] = {k: str(v) if isinstance(v, torch.dtype) else v
                                  for k, v in (kwargs.get("model_kwargs") or {}).items()}  # JSON-able
        kwargs.setdefault("context_window", _context_window(model))
        kwargs.setdefault("is_chat_model", bool(getattr(tokenizer, "chat_template", None)))
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
        self._custom_messages, self._custom_completion = (custom["messages_to_prompt"],
                                                          custom["completion_to_prompt"])
        self.generation_kwargs({})  # bad generate_kwargs / stopping_ids fail here, not at the first call
        instrument()  # routing summaries into the metadata of any query / chat engine's responses
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

    def enable_batching(self, max_batch: int = 8, **engine_kw: Any) -> BatchEngine:
        """Run this LLM's generations (and those of views made from it afterwards) in one
        :class:`~llama_index_lag.batching.BatchEngine`: concurrent calls are decoded together, each with its
        own routing. ``engine_kw``: ``max_queue``, ``on_step``, ``on_finish``. Returns the engine."""
        self.disable_batching()
        self._engine = BatchEngine(self._model, self._tokenizer, self._router, max_batch=max_batch,
                                   **engine_kw)
        return self._engine

    def disable_batching(self) -> None:
        """Stop the batch engine (its requests end as cancelled); generations run alone again."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    @property
    def batch_engine(self) -> BatchEngine | None:
        return self._engine

    @contextlib.contextmanager
    def routing_override(self, **changes: Any) -> Iterator[dict[str, Any]]:
        """Per-request routing for the calls made inside the block (this thread / asyncio task and the
        threads it starts with llama-index's ``Thread``): ``LAGConfig`` fields, e.g. ``mode="spectr"``,
        ``k=5``, ``fixed={"knowledge": [...]}``. A pipeline mode with retrieval is accepted too: in any
        engine ``mode="rag"`` turns routing off and ``mode="rag+lag"`` turns the default LAG on; in the
        engines of :func:`~llama_index_lag.pipeline.build_query_engine` / ``build_chat_engine`` the query
        then runs in that pipeline mode (``prag`` / ``prag+lag`` apply the retrieved document's adapter).
        Blocks nest; yields the block's settings (a dict: what is added to it applies to later calls)."""
        current = _CALL_ROUTING.get() or {}
        settings = {**current, **changes}
        token = _CALL_ROUTING.set(settings)
        try:
            yield settings
        finally:
            _CALL_ROUTING.reset(token)

    @staticmethod
    def current_override() -> dict[str, Any]:
        """The settings of the innermost :meth:`routing_override` block (empty outside one)."""
        return _CALL_ROUTING.get() or {}

    @staticmethod
    def override_mode() -> str | None:
        """The ``mode`` set by the innermost :meth:`routing_override` block, if any."""
        return (_CALL_ROUTING.get() or {}).get("mode")

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
                           is_chat_model=self.is_chat_model, model_name=self.model_name)

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def router(self) -> LAGRouter | None:
        return self._router

    def libraries_current(self) -> bool:
        """Whether every attached library is still the revision on disk (see ``AdapterLibrary.reload``)."""
        if self._router is None:
            return True
        return all(lib.is_current() for libs in self._router.libraries.values() for lib in libs)

    @property
    def lag_config(self) -> LAGConfig:
        return self._config

    # ---- prompts (as HuggingFaceLLM renders them) ---------------------------------------------------
    @property
    def chat_model(self) -> bool:
        """The earlier name of ``is_chat_model``."""
        return self.is_chat_model

    def _chat_templated(self) -> bool:
        """Chat prompts come from the tokenizer's chat template (no ``messages_to_prompt`` given)."""
        return not self._custom_messages and bool(getattr(self._tokenizer, "chat_template", None))

    def _completion_templated(self) -> bool:
        return self.is_chat_model and not self._custom_completion and self._chat_templated()

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
        """Messages as one prompt: ``messages_to_prompt`` when given, else the tokenizer's chat template
        (generation prompt appended), else llama-index's generic rendering."""
        if self._chat_templated():
            return self._tokenizer.apply_chat_template(
                [{"role": m.role.value, "content": m.content or ""} for m in messages],
                tokenize=False, add_generation_prompt=True,
            )
        return self.messages_to_prompt(messages)

    def completion_prompt(self, prompt: str) -> str:
        """A plain completion prompt: wrapped in ``query_wrapper_prompt`` (``{query_str}``), then
        ``completion_to_prompt`` when given; else, for a chat model, a user turn after ``system_prompt``
        rendered by :meth:`chat_prompt`; else prefixed by ``system_prompt``."""
        if self.query_wrapper_prompt is not None:
            prompt = self.query_wrapper_prompt.format(query_str=prompt)
        if self._custom_completion:
            return self.completion_to_prompt(prompt)
        if self.is_chat_model:
            messages = [ChatMessage(role="user", content=prompt)]
            if self.system_prompt:
                messages.insert(0, ChatMessage(role="system", content=self.system_prompt))
            return self.chat_prompt(messages)
        return f"{self.system_prompt} {prompt}" if self.system_prompt else prompt

    # ---- generation -----------------------------------------------------------------------------
    def _call_config(self, routing: Any) -> LAGConfig:
        config = self._config
        for overrides in (_CALL_ROUTING.get(), routing):
            if isinstance(overrides, Mapping) and overrides.get("mode") in RETRIEVAL_MODES:
                overrides = routing_of_pipeline_mode(overrides)
            if isinstance(overrides, LAGConfig):
                config = overrides
            elif isinstance(overrides, Mapping) and overrides:
                config = config.replace(**overrides)
            elif overrides:
                raise ConfigError("routing must be a LAGConfig or a mapping of its fields, got "
                                  f"{overrides!r}", field="routing")
        self._check_routing(config)
        return config

    def encode(self, prompt: str, max_new_tokens: int, focus: Sequence[str] | None = None,
               templated: bool | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a formatted prompt, fitted to the context window (see ``truncation``).

        ``focus``: the texts that carry the request (e.g. the user's messages); their tokens are marked in
        ``enc["focus"]`` [1, S] (bool) for sequence-level routing (fast tokenizers only). ``templated``: the
        prompt was rendered by the chat template, which holds its special tokens (default: as completions)."""
        if not isinstance(prompt, str):
            raise DataError(f"the prompt must be a string, got {type(prompt).__name__}", field="prompt")
        check_text(prompt, "prompt")
        want_offsets = bool(focus) and getattr(self._tokenizer, "is_fast", False)
        templated = self._completion_templated() if templated is None else templated
        enc = dict(self._tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated,
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
        """``model.generate`` keyword arguments from this LLM's defaults, ``generate_kwargs`` and per-call
        ``opts`` (checked: a bad value or an argument ``generate`` does not take is a :class:`ConfigError`
        naming it)."""
        opts = {**self.generate_kwargs, **opts}
        temperature = check_number(opts.get("temperature", self.temperature), "temperature", minimum=0.0)
        max_new_tokens = opts.get("max_new_tokens", self.max_new_tokens)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}",
                              field="max_new_tokens")
        top_p = check_number(opts.get("top_p", self.top_p), "top_p", minimum=0.0, maximum=1.0)
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
        if self.stopping_ids:
            kw["eos_token_id"] = sorted(eos_ids(self._model, self._tokenizer) | set(self.stopping_ids))
        extra = {k: v for k, v in opts.items() if k not in GEN_KEYS}
        check_generate_keys(extra)
        return {**kw, **extra}  # e.g. top_k, repetition_penalty, do_sample as given

    def _run(self, prompt: str, formatted: bool, routing: Any, opts: dict[str, Any],
             streamer: Any = None,
             focus: Sequence[str] | None = None) -> tuple[str, dict[str, Any] | None, int]:
        """Generate (in the calling thread); returns (text, routing summary, prompt tokens)."""
        opts = {**self.generate_kwargs, **opts}
        templated = opts.pop("templated", None)
        full = prompt if formatted else self.completion_prompt(prompt)
        focus = focus if formatted else [prompt]
        gen_kw = self.generation_kwargs(opts)
        inputs = self.encode(full, gen_kw["max_new_tokens"], focus,
                             templated if formatted else self._completion_templated())
        focus_mask = inputs.pop("focus", None)
        config = self._call_config(routing)
        traced = self._router is not None and self.routing_summary and config.mode != "none"
        trace = "summary" if traced else None
        if self._engine is not None and self._engine.supports(gen_kw):  # in the running batch
            out = self._engine.generate(inputs["input_ids"], inputs.get("attention_mask"), config=config,
                                        focus=focus_mask, trace=trace, seed=opts.get("seed"),
                                        streamer=streamer, **gen_kw)
        else:
            out = routed_generate(self._model, inputs["input_ids"], inputs.get("attention_mask"),
                                  router=self._router, config=config, focus=focus_mask, trace=trace,
                                  seed=opts.get("seed"), streamer=streamer, **gen_kw)
        new_tokens = out.new[0][:out.lengths[0]]
        raw = self._tokenizer.decode(new_tokens, skip_special_tokens=True)
        text = cut_at_stop(raw, gen_kw)
        finish = out.finish_reason or ("length" if len(raw) == len(text) and new_tokens.numel()
                                       >= gen_kw["max_new_tokens"] else "stop")
        trace, seconds = out.trace, out.seconds
        summary = None
        if trace is not None and out.routing_seconds is not None:
            per_library = trace.summary(top=self.summary_top)
            summary = RoutingSummary(
                mode=config.mode, k=config.k,
                libraries={kind: entry["adapters"] for kind, entry in per_library.items()},
                routing_ms=round(out.routing_seconds * 1e3, 2), generate_ms=round(seconds * 1e3, 2),
                new_tokens=int(new_tokens.numel()),
                selections={kind: entry["selections"] for kind, entry in per_library.items()},
                fixed={kind: list(names) for kind, names in config.fixed.items()} if config.fixed else None,
            ).as_dict()
            emit_routing(summary)
        record_routing(summary)
        n_prompt = int(inputs["input_ids"].shape[1])
        record_call({"prompt_tokens": n_prompt, "completion_tokens": int(new_tokens.numel()),
                     "finish_reason": finish, "lag": summary})
        return text, summary, n_prompt

    @staticmethod
    def _split_kwargs(kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """(routing, generation options): every keyword but ``routing`` is a generation option."""
        routing = kwargs.pop("routing", None)
        focus, templated = kwargs.pop("_focus", None), kwargs.pop("_templated", None)
        opts = dict(kwargs)
        opts["focus"] = focus
        if templated is not None:
            opts["templated"] = templated
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

    def _chat_kwargs(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        """What a chat call hands to its completion call: the user's texts (focus), template or not."""
        return {"_focus": _user_texts(messages), "_templated": self._chat_templated()}

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return completion_response_to_chat_response(self.complete(self.chat_prompt(messages), formatted=True,
                                                                  **self._chat_kwargs(messages), **kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return stream_completion_response_to_chat_response(
            self.stream_complete(self.chat_prompt(messages), formatted=True, **self._chat_kwargs(messages),
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
            await self.acomplete(self.chat_prompt(messages), formatted=True, **self._chat_kwargs(messages),
                                 **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        gen = await self.astream_complete(self.chat_prompt(messages), formatted=True,
                                          **self._chat_kwargs(messages), **kwargs)

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
        if base is not None and not base.libraries_current():
            logger.info("a library of %s changed on disk: loading a fresh LLM (views made before keep the "
                        "revision they have)", config.model or "the default model")
            base = None
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
