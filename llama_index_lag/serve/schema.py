"""The OpenAI request bodies ``lag serve`` takes (chat completions, completions) and its per-request LAG
settings, checked field by field; what is not supported is refused by name, never ignored silently."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import LAGConfig
from ..errors import ConfigError
from ..modes import PIPELINE_MODES, ROUTING_MODES

PIPELINE_KEYS = (
    "similarity_top_k",
    "response_mode",
    "lag_method",
)  # LAGPipelineConfig fields a request may set
# OpenAI options the server does not implement: refused unless left at their default
UNSUPPORTED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": None,
    "logprobs": None,
    "top_logprobs": None,
    "best_of": None,
    "echo": False,
    "suffix": None,
    "tools": None,
    "tool_choice": None,
    "functions": None,
    "response_format": None,
}


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts of a list content joined; other parts refused)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ConfigError(
                    f"message content part of type {part.get('type')!r} is not supported (text only)",
                    field="messages.content",
                )
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, ...) are accepted

    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    lag: dict[str, Any] | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops

    def check_supported(self) -> None:
        for key, default in UNSUPPORTED.items():
            if (self.model_extra or {}).get(key, default) not in (default, None):
                raise ConfigError(f"{key} is not supported by lag serve", field=key)

    def new_tokens(self, default: int, limit: int) -> int:
        n = self.max_completion_tokens or self.max_tokens or default
        if n > limit:
            raise ConfigError(f"max_tokens={n} exceeds this server's limit ({limit})", field="max_tokens")
        return n


class ChatCompletionRequest(_Request):
    messages: list[ChatMessageIn] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("one prompt per request")
            value = value[0]
        return value


def split_lag(
    options: dict[str, Any] | None, default_mode: str
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A request's ``lag`` object -> (pipeline mode, pipeline fields, LAGConfig fields), checked.

    ``mode``: a pipeline mode (none, rag, lag, rag+lag, prag, prag+lag) or a routing mode (arrow, spectr,
    fixed: routed without retrieval); the other keys are LAGConfig fields (``k``, ``fixed``, ``granularity``,
    ...) or the pipeline's ``similarity_top_k`` / ``response_mode`` / ``lag_method``."""
    options = dict(options or {})
    mode = options.pop("mode", None) or default_mode
    routing: dict[str, Any] = {}
    if mode not in PIPELINE_MODES:
        if mode not in ROUTING_MODES:
            raise ConfigError(
                f"unknown mode {mode!r}; expected one of "
                f"{', '.join(dict.fromkeys((*PIPELINE_MODES, *ROUTING_MODES)))}",
                field="lag.mode",
            )
        routing["mode"], mode = mode, "lag"
        options.setdefault("lag_method", "paper")  # the method as named: per token, no shortlist
    pipeline = {k: options.pop(k) for k in PIPELINE_KEYS if k in options}
    routing.update(options)
    if "fixed" in routing and "mode" not in routing and mode in ("none", "lag"):
        routing["mode"] = "fixed"
        mode = "lag"
    try:
        LAGConfig.from_dict({**LAGConfig().to_dict(), **routing})  # names and values
    except ConfigError as exc:
        exc.field = f"lag.{exc.field}" if exc.field else "lag"
        raise
    return mode, pipeline, routing
