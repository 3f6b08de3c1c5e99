"""The OpenAI-compatible app of ``lag serve`` (FastAPI): chat completions and completions in every pipeline
mode, streamed as server-sent events, decoded in one running batch (``LAGLLM.enable_batching``).

Each request runs in a worker thread: the direct modes call the LLM, the retrieval modes a query / chat engine
of the pipeline over the server's index (its LLM calls join the same batch). A request's ``lag`` object picks
its mode and routing; the response's ``lag`` object carries the routing summary and the retrieved sources.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batching import cancel_scope
from ..llm import LAGLLM
from ..modes import PIPELINE_MODES, ROUTING_MODES
from ..pipeline_config import LAGPipelineConfig
from .schema import ChatCompletionRequest, CompletionRequest
from .service import APIError, Plan, ServeSettings, Service, api_error

logger = logging.getLogger(__name__)


__all__ = ["ServeSettings", "create_app"]


# ---- the app ----------------------------------------------------------------------------------------------
def create_app(
    config: LAGPipelineConfig | str | Path | None = None,
    *,
    llm: LAGLLM | None = None,
    index: Any = None,
    embed_model: Any = None,
    settings: ServeSettings | None = None,
) -> FastAPI:
    """The FastAPI app serving ``config`` (a :class:`LAGPipelineConfig`, a file, or None for the defaults);
    ``llm`` / ``index`` / ``embed_model``: already loaded ones to use."""
    if not isinstance(config, LAGPipelineConfig):
        config = LAGPipelineConfig.load(config) if config is not None else LAGPipelineConfig()
    settings = settings or ServeSettings()
    service = Service(config, llm, index, embed_model, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="llama-index-lag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        ).response()

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception) -> JSONResponse:
        return api_error(exc).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": service.model_id,
            "running": service.engine.running,
            "queued": service.engine.queued,
        }

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _authorize(request, settings)
        return Response(service.metrics.render(service.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(request, settings)
        router = service.llm.router
        libraries = [
            {"kind": kind, "name": Path(lib.path).name, "adapters": len(lib)}
            for kind, libs in (router.libraries.items() if router else [])
            for lib in libs
        ]
        return {
            "object": "list",
            "data": [
                {
                    "id": service.model_id,
                    "object": "model",
                    "created": service.created,
                    "owned_by": "llama-index-lag",
                    "lag": {
                        "default_mode": config.mode,
                        "modes": list(dict.fromkeys((*PIPELINE_MODES, *ROUTING_MODES))),
                        "libraries": libraries,
                        "index": service.index is not None,
                    },
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _handle(request, service, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _handle(request, service, CompletionRequest, "completion")

    return app


def _authorize(request: Request, settings: ServeSettings) -> None:
    """Bearer key check in constant time over every configured key; one answer for every failure."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    ok = False
    for key in settings.api_keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not ok:
        raise APIError(401, "invalid or missing API key", code="invalid_api_key")


async def _body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body over {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    return data


async def _handle(request: Request, service: Service, schema: type, kind: str) -> Response:
    start = time.perf_counter()
    endpoint = f"/v1/{'chat/completions' if kind == 'chat' else 'completions'}"
    mode = "?"
    try:
        _authorize(request, service.settings)
        req = schema.model_validate(await _body(request, service.settings.max_request_bytes))
        plan = service.plan(req)
        mode = plan.mode
        if req.stream:
            service.metrics.requests.labels(endpoint, mode, "200").inc()
            return EventSourceResponse(_events(service, plan, req, kind, start, endpoint), ping=15)
        result = await _run_watched(service, plan, req, request)
    except Exception as exc:  # noqa: BLE001 - every failure is a JSON error
        error = api_error(exc)
        service.metrics.requests.labels(endpoint, mode, str(error.status)).inc()
        return error.response()
    service.metrics.requests.labels(endpoint, mode, "200").inc()
    service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return JSONResponse(_completion_body(service, kind, result))


def _submit(
    service: Service,
    plan: Plan,
    req: Any,
    cancel: threading.Event,
    on_delta: Callable[[str], None] | None = None,
) -> asyncio.Future:
    """Run the request in a worker thread with the caller's context and ``cancel`` as its cancel event."""

    def work() -> dict[str, Any]:
        with cancel_scope(cancel):
            return service.execute(plan, req, on_delta)

    ctx = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(service.executor, ctx.run, work)


async def _run_watched(service: Service, plan: Plan, req: Any, request: Request) -> dict[str, Any]:
    """The request's result; a client that goes away cancels its generation (its batch slot is freed)."""
    cancel = threading.Event()
    future = _submit(service, plan, req, cancel)
    while True:
        done, _ = await asyncio.wait({future}, timeout=0.25)
        if done:
            return future.result()
        if await request.is_disconnected():
            cancel.set()


def _ids(kind: str) -> tuple[str, str]:
    return (
        (f"chatcmpl-{uuid.uuid4().hex}", "chat.completion")
        if kind == "chat"
        else (f"cmpl-{uuid.uuid4().hex}", "text_completion")
    )


def _completion_body(service: Service, kind: str, result: dict[str, Any]) -> dict[str, Any]:
    rid, obj = _ids(kind)
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result["text"]},
            "finish_reason": result["finish_reason"],
            "logprobs": None,
        }
    else:
        choice = {
            "index": 0,
            "text": result["text"],
            "finish_reason": result["finish_reason"],
            "logprobs": None,
        }
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": service.model_id,
        "choices": [choice],
        "usage": result["usage"],
        "lag": result["lag"],
    }


async def _events(
    service: Service, plan: Plan, req: Any, kind: str, start: float, endpoint: str
) -> AsyncIterator[dict[str, str]]:
    """Server-sent events: OpenAI chunks, then ``[DONE]``. Closing the stream (a client that disconnects)
    cancels the generation."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()

    def push(item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, item)

    future = _submit(service, plan, req, cancel, on_delta=lambda d: push(("delta", d)))
    future.add_done_callback(lambda f: push(("done", f)))
    rid, _ = _ids(kind)
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    created = int(time.time())

    def chunk(delta: str | None = None, finish: str | None = None, role: bool = False, **extra: Any) -> dict:
        if kind == "chat":
            body: dict[str, Any] = (
                {"role": "assistant", "content": ""}
                if role
                else ({"content": delta} if delta is not None else {})
            )
            choice = {"index": 0, "delta": body, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return {
            "data": json.dumps(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": service.model_id,
                    "choices": [choice],
                    **extra,
                }
            )
        }

    try:
        if kind == "chat":
            yield chunk(role=True)
        while True:
            what, value = await queue.get()
            if what == "delta":
                yield chunk(value)
                continue
            try:
                result = value.result()
            except Exception as exc:  # noqa: BLE001 - reported in the stream (headers are sent)
                error = api_error(exc)
                yield {
                    "data": json.dumps(
                        {
                            "error": {
                                "message": error.message,
                                "type": error.type,
                                "param": error.param,
                                "code": error.code,
                            }
                        }
                    )
                }
                break
            extra = {"lag": result["lag"]}
            if req.stream_options is not None and req.stream_options.include_usage:
                extra["usage"] = result["usage"]
            yield chunk(finish=result["finish_reason"], **extra)
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
            break
        yield {"data": "[DONE]"}
    finally:
        cancel.set()  # a no-op after the end; frees the batch slot of a client that went away
