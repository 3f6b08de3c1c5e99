"""What ``lag serve`` runs per request: the loaded pipeline (:class:`Service`: LLM with its batch engine,
index, metrics, worker threads), a request's plan (mode, routing, generation settings) and its execution in a
direct or retrieval mode; the OpenAI-style errors clients get (:func:`api_error`)."""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from llama_index.core.llms import ChatMessage
from pydantic import ValidationError

from ..chat import build_chat_engine
from ..errors import LAGError, PromptTooLongError, QueueFullError
from ..ingest import stable_document_id
from ..llm import LAGLLM, shared_llm
from ..modes import RETRIEVAL_MODES
from ..pipeline import build_query_engine, shared_embed_model, shared_index
from ..pipeline_config import LAGPipelineConfig
from ..trace import collect_calls, merge_summaries
from .metrics import Metrics
from .schema import ChatCompletionRequest, CompletionRequest, split_lag

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and security (the pipeline itself is a :class:`LAGPipelineConfig`)."""

    max_batch: int = 8  # rows decoded together
    max_queue: int = 256  # requests waiting for a batch slot (more: 503)
    api_keys: tuple[str, ...] = ()  # Bearer keys; empty: no authentication
    max_request_bytes: int = 1 << 20  # request bodies above: 413
    max_tokens_limit: int = 1024  # max_tokens above: 400
    model_name: str | None = None  # the model id served (default: the model folder's name)
    truncation: str = "error"  # prompts over the context window: 400 ("left": keep the end)
    workers: int = 64  # threads running requests (they wait on the batch)


class APIError(Exception):
    """An OpenAI-style error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(
            {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}},
            status_code=self.status,
            headers=headers,
        )


def api_error(exc: BaseException) -> APIError:
    """What a client is told about ``exc``: a typed library error is a 4xx naming the field / adapter;
    anything else a 500 without details (they go to the server's log)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), "server_busy", code="queue_full")
    if isinstance(exc, PromptTooLongError):
        return APIError(400, _public(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, LAGError):
        return APIError(
            400,
            _public(exc),
            param=exc.field or ("lag.fixed" if exc.adapter else None),
            code=type(exc).__name__,
        )
    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or None
        return APIError(400, f"{where}: {err.get('msg')}" if where else str(err.get("msg")), param=where)
    logger.error("request failed", exc_info=exc)
    return APIError(500, "internal server error", "server_error")


def _public(exc: LAGError) -> str:
    """The error's message with the server's file paths reduced to their last component."""
    text = str(exc)
    if exc.path:
        text = text.replace(exc.path, Path(exc.path).name)
    return text


@dataclass
class Plan:
    """How one request runs."""

    mode: str  # pipeline mode
    config: LAGPipelineConfig  # the server's config in that mode, with the request's pipeline fields
    llm: LAGLLM  # a view with the request's generation settings (and routing, direct modes)
    routing: dict[str, Any] = field(default_factory=dict)  # LAGConfig fields of the request
    requested: str = ""  # the mode the request named (a routing mode runs as pipeline mode "lag")

    @property
    def retrieves(self) -> bool:
        return self.mode in RETRIEVAL_MODES


class Service:
    """The loaded pipeline behind the app: LLM with its batch engine, index, metrics, worker threads."""

    def __init__(
        self,
        config: LAGPipelineConfig,
        llm: LAGLLM | None,
        index: Any,
        embed_model: Any,
        settings: ServeSettings,
    ) -> None:
        self.config, self.settings = config, settings
        base = llm if llm is not None else shared_llm(config)
        self.llm = base.model_copy(update={"truncation": settings.truncation})
        self.metrics = Metrics()
        self.engine = self.llm.enable_batching(
            settings.max_batch,
            max_queue=settings.max_queue,
            on_step=self.metrics.on_step,
            on_prefill=self.metrics.on_prefill,
            on_finish=self.metrics.on_finish,
        )
        if index is None and config.index:
            index = shared_index(config.index, embed_model or shared_embed_model(config.embed_model))
        self.index = index
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="lag-request")
        self.model_id = settings.model_name or Path(str(self.llm.model_name)).name or "lag"
        self.created = int(time.time())

    def close(self) -> None:
        self.llm.disable_batching()
        self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- one request ------------------------------------------------------------------------------
    def plan(self, req: ChatCompletionRequest | CompletionRequest) -> Plan:
        req.check_supported()
        mode, pipeline, routing = split_lag(req.lag, self.config.mode)
        n = req.new_tokens(self.config.max_new_tokens, self.settings.max_tokens_limit)
        config = LAGPipelineConfig(
            **{**self.config.model_dump(), **pipeline, "mode": mode, "max_new_tokens": n}
        )
        if mode in RETRIEVAL_MODES and self.index is None:
            raise APIError(
                400,
                f"mode {mode!r} retrieves documents: this server has no index (set index in its config)",
                param="lag.mode",
            )
        config.check(has_index=self.index is not None, has_llm=True)
        view = self.llm.model_copy(
            update={
                "max_new_tokens": n,
                "temperature": req.temperature,
                "top_p": req.top_p,
                "stop": list(req.stop or []),
                "generate_kwargs": {"seed": req.seed} if req.seed is not None else {},
            }
        )
        try:
            routed = config.lag_config().replace(**routing) if routing else config.lag_config()
            checked = view.with_routing(routed)  # unknown adapter / library kind: 400 now, not mid-generation
        except LAGError as exc:
            exc.field = f"lag.{exc.field}" if exc.field and not exc.field.startswith("lag") else exc.field
            raise
        self._check_length(req, view, n)
        return Plan(
            mode,
            config,
            view if mode in RETRIEVAL_MODES else checked,
            routing,
            requested=(req.lag or {}).get("mode") or mode,
        )

    def _check_length(self, req: Any, llm: LAGLLM, new_tokens: int) -> None:
        """A prompt (or chat) over the context window: 400 before anything runs (truncation "error")."""
        if self.settings.truncation != "error":
            return
        if isinstance(req, ChatCompletionRequest):
            text = llm.chat_prompt(_messages(req))
        else:
            text = req.prompt
        n = len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n + new_tokens > llm.context_window:
            raise PromptTooLongError(
                f"prompt has {n} tokens; with max_tokens={new_tokens} it exceeds the "
                f"context window of {llm.context_window}",
                field="messages",
            )

    def execute(
        self,
        plan: Plan,
        payload: ChatCompletionRequest | CompletionRequest,
        on_delta: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Run the request (in a worker thread); ``on_delta``: stream the text as it comes."""
        sources: list[Any] = []
        with collect_calls() as calls:
            if plan.retrieves:
                override = (
                    plan.llm.routing_override(**plan.routing) if plan.routing else contextlib.nullcontext()
                )
                with override:
                    try:
                        text, sources = self._retrieve(plan, payload, on_delta)
                    except ValueError as exc:  # llama-index's prompt helper: the question leaves no room
                        if "context size" not in str(exc):
                            raise
                        raise PromptTooLongError(
                            f"the prompt leaves no room for retrieved text: {exc}", field="messages"
                        ) from None
            elif isinstance(payload, ChatCompletionRequest):
                text = self._direct_chat(plan.llm, _messages(payload), on_delta)
            else:
                text = self._direct_completion(plan.llm, payload.prompt, on_delta)
        routing = merge_summaries([c["lag"] for c in calls if c.get("lag")])
        usage = {
            "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
            "completion_tokens": sum(c["completion_tokens"] for c in calls),
        }
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        finish = calls[-1]["finish_reason"] if calls else "stop"
        lag = {
            "mode": plan.requested or plan.mode,
            "routing": routing,
            "sources": [
                {
                    "id": stable_document_id(n.node),
                    "score": float(n.score or 0.0),
                    "text": n.node.get_content(),
                }
                for n in sources
            ],
        }
        return {
            "text": text,
            "finish_reason": "length" if finish == "length" else "stop",
            "usage": usage,
            "lag": lag,
            "cancelled": finish == "cancelled",
        }

    @staticmethod
    def _direct_chat(llm: LAGLLM, messages: list[ChatMessage], on_delta: Callable[[str], None] | None) -> str:
        if on_delta is None:
            return llm.chat(messages).message.content or ""
        text = ""
        for response in llm.stream_chat(messages):
            if response.delta:
                on_delta(response.delta)
            text = response.message.content or ""
        return text

    @staticmethod
    def _direct_completion(llm: LAGLLM, prompt: str, on_delta: Callable[[str], None] | None) -> str:
        # a raw continuation (no chat template), as OpenAI's completions endpoint
        if on_delta is None:
            return llm.complete(prompt, formatted=True, _templated=False).text
        text = ""
        for response in llm.stream_complete(prompt, formatted=True, _templated=False):
            if response.delta:
                on_delta(response.delta)
            text = response.text
        return text

    def _retrieve(self, plan: Plan, payload: Any, on_delta: Callable[[str], None] | None) -> tuple[str, list]:
        stream = on_delta is not None
        if isinstance(payload, ChatCompletionRequest):
            messages = _messages(payload)
            if messages[-1].role != "user":
                raise APIError(
                    400, "the last message must be the user's question in a retrieval mode", param="messages"
                )
            system = "\n".join(m.content or "" for m in messages if m.role == "system")
            history = [m for m in messages[:-1] if m.role != "system"]
            engine = build_chat_engine(
                plan.config,
                llm=plan.llm,
                index=self.index,
                chat_history=history,
                **({"system_prompt": system} if system else {}),
            )
            if not stream:
                response = engine.chat(messages[-1].content or "")
                return str(response.response).strip(), list(response.source_nodes)
            response = engine.stream_chat(messages[-1].content or "")
            gen = _chat_deltas(response)
        else:
            engine = build_query_engine(plan.config, llm=plan.llm, index=self.index, streaming=stream)
            response = engine.query(payload.prompt)
            if not stream:
                return str(response).strip(), list(response.source_nodes)
            gen = response.response_gen
        text = ""
        for delta in gen:
            text += delta
            on_delta(delta)
        return text.strip(), list(response.source_nodes)


def _chat_deltas(response: Any, poll: float = 0.02) -> Iterator[str]:
    """The text deltas of a streaming chat response (``StreamingAgentChatResponse``), waited for: its own
    ``response_gen`` polls the queue its memory-writing thread fills in a busy loop, which on a server takes
    the GIL and a core from the batch engine for as long as the answer streams."""
    while True:
        try:
            delta = response.queue.get(timeout=poll)
        except queue.Empty:
            if response.exception is not None:
                raise response.exception from None
            if response.is_done and response.queue.empty():
                return
            continue
        if response.exception is not None:
            raise response.exception
        yield delta


def _messages(req: ChatCompletionRequest) -> list[ChatMessage]:
    return [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
        for m in req.messages
    ]
