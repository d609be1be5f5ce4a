"""The server's request bodies (pydantic, strict) and its error: OpenAI's fields, and those it refuses by name.

Every body forbids unknown fields. Fields OpenAI defines that this server does not implement are declared
anyway, so that their "do nothing" values (``null``, ``tools: []``, ``response_format: {"type": "text"}``, ...)
pass and anything else is a 400 naming the field, never dropped silently (``refuse_unsupported``).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import MAX_LOGPROBS

MAX_N = 128  # choices per prompt at most (OpenAI's limit)
MAX_ROWS = 256  # prompts x n in one request at most: every row is a row of the batch


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# field -> (values that ask for nothing, why another value is refused)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "tools": ((None, []), "tool calling is not supported"),
    "tool_choice": ((None, "none"), "tool calling is not supported"),
    "parallel_tool_calls": ((None,), "tool calling is not supported"),
    "functions": ((None, []), "function calling is not supported"),
    "function_call": ((None, "none"), "function calling is not supported"),
    "response_format": ((None, {"type": "text"}), "only plain text output ({'type': 'text'}) is supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "this server does not control reasoning effort"),
    "store": ((None, False), "completions are not stored"),
    "metadata": ((None, {}), "metadata is kept only for stored completions, and none are stored"),
    "service_tier": ((None, "auto", "default"), "there is one service tier"),
    "suffix": ((None, ""), "insertion (a suffix after the completion) is not supported"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Generation(BaseModel):
    # strict: "3" is not a number, and a field this server does not implement is a 400 naming it, never dropped
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None  # sampling values are checked once, by SamplingParams
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    user: str | None = None  # an end-user id for the log; no effect on the output
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string, as JSON keys are) -> bias
    lorahub_weights: dict[str, float] | None = None
    # Refused unless they ask for nothing (UNSUPPORTED):
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def refuse_unsupported(self) -> None:
        """APIError 400 naming the first field that asks for something this server does not do."""
        for name, (nothing, why) in UNSUPPORTED.items():
            if name in type(self).model_fields and getattr(self, name) not in nothing:
                raise APIError(400, f"{name}: {why}", param=name)
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options: only with stream: true", param="stream_options")

    def wanted_logprobs(self) -> tuple[int | None, int | None]:
        """(alternatives per generated token, per prompt token): None where no logprobs are asked for."""
        return None, None

    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id (APIError 400 for a key that is not an integer)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise APIError(400, f"logit_bias: keys are token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        return bias


class CompletionBody(_Generation):
    # A string, strings, a list of token ids, or lists of token ids (one choice per prompt x n).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None  # only = n: choosing the best of more rows is not supported
    suffix: Any = None

    def wanted_logprobs(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of = n is supported (no server-side ranking)", param="best_of")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None  # a participant's name: templates that know it use it
    refusal: str | None = None  # an earlier assistant turn sent back as it came: nothing to act on
    # An earlier turn's fields, accepted empty (a client sends back what it got); anything else is a 400 by name.
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    def text(self) -> str:
        for name in ("tool_calls", "tool_call_id", "function_call", "audio", "annotations"):
            if getattr(self, name) not in (None, []):
                raise APIError(400, f"messages: {name}: tool calls and audio are not supported", param="messages")
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "messages: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None

    def wanted_logprobs(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: only with logprobs: true", param="top_logprobs")


class AdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1)
    source: str = Field(min_length=1)
    replace: bool = False


class LoadLoraBody(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: bool = False  # vLLM's "replace an adapter of the same name"


class UnloadLoraBody(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1)


__all__ = [
    "MAX_N", "MAX_ROWS", "UNSUPPORTED", "APIError", "AdapterBody", "ChatBody", "ChatMessage", "CompletionBody",
    "LoadLoraBody", "StreamOptions", "UnloadLoraBody",
]  # fmt: skip
