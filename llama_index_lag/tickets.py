"""What a request to the batch engine carries and gets back: its sampling (:class:`SamplingParams`), its
handle (:class:`Ticket`: tokens as they come, result, cancellation), its result (:class:`Finished`), and the
cancel scope of the threads that start it (:func:`cancel_scope`)."""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .trace import RoutingTrace

# model.generate options the engine implements (others: generate alone, e.g. beams, repetition_penalty)
SUPPORTED_GENERATE = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "stop_strings",
        "tokenizer",
        "pad_token_id",
        "eos_token_id",
    }
)
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("lag_cancel", default=None)
_END = object()


@contextlib.contextmanager
def cancel_scope(event: threading.Event | None = None) -> Iterator[threading.Event]:
    """An event (``event`` or a new one) that, once set, cancels the batched generations started inside the
    block (this thread / task and the threads it starts with a copy of its context): their rows leave the
    batch at the next step."""
    event = event or threading.Event()
    token = _CANCEL.set(event)
    try:
        yield event
    finally:
        _CANCEL.reset(token)


def current_cancel() -> threading.Event | None:
    """The event of the innermost :func:`cancel_scope` around the caller (None: none)."""
    return _CANCEL.get()


@dataclass(frozen=True)
class SamplingParams:
    """How one row picks its tokens (temperature 0: greedy)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos: frozenset[int] = frozenset()

    @classmethod
    def from_generate_kwargs(
        cls, gen_kw: Mapping[str, Any], eos: set[int], seed: int | None = None
    ) -> SamplingParams | None:
        """The sampling of ``model.generate(**gen_kw)``; None when it uses an option the engine lacks."""
        if set(gen_kw) - SUPPORTED_GENERATE:
            return None
        ids = gen_kw.get("eos_token_id")
        if ids is not None:
            eos = {int(i) for i in (ids if isinstance(ids, (list, tuple, set)) else [ids])}
        sample = bool(gen_kw.get("do_sample"))
        return cls(
            max_new_tokens=int(gen_kw.get("max_new_tokens", 64)),
            temperature=float(gen_kw.get("temperature") or 1.0) if sample else 0.0,
            top_p=float(gen_kw.get("top_p") or 1.0) if sample else 1.0,
            top_k=gen_kw.get("top_k") if sample else None,
            seed=seed,
            stop=tuple(gen_kw.get("stop_strings") or ()),
            eos=frozenset(eos),
        )


@dataclass
class Finished:
    """What one request produced."""

    tokens: list[int]  # generated ids (the eos that ended it included)
    finish_reason: str  # "stop" (eos or a stop string), "length" (max_new_tokens / context), "cancelled"
    prompt_tokens: int
    seconds: float  # from submission to the last token
    first_token_seconds: float | None  # from submission to the first token
    trace: RoutingTrace | None  # the routing of the prompt and of every generated token
    routing_seconds: float  # time in routing (a batched step's time shared equally by its rows)


class Ticket:
    """Handle of one submitted request: its tokens as they come, its result, cancellation."""

    def __init__(self, request_id: int, cancel: threading.Event | None = None) -> None:
        self.id = request_id
        self._tokens: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel = cancel or threading.Event()
        self._result: Finished | None = None
        self._error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating; the row leaves the batch at the next step (result: ``"cancelled"``)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def tokens(self) -> Iterator[int]:
        """The generated token ids, as they are generated (blocks)."""
        while True:
            item = self._tokens.get()
            if item is _END:
                return
            yield item

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end of the request; raises what failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _end(self, result: Finished | None = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._tokens.put(_END)
        self._done.set()


__all__ = ["SUPPORTED_GENERATE", "Finished", "SamplingParams", "Ticket", "cancel_scope", "current_cancel"]
