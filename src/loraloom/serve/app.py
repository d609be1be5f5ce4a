"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): ``loraloom serve``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer
has a chat template), ``stream: true`` as server-sent events. The request's ``model`` names an adapter
(``base`` for none); the extension field ``lorahub_weights: {module: weight}`` composes modules of the
server's adapters for that request (LoraHub without a merge). ``POST /v1/adapters`` {"name", "source"} and
``DELETE /v1/adapters/{name}`` add and remove adapters while serving.

Errors carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 404 for an unknown adapter,
400 for malformed JSON or fields, a prompt too long, or weights over modules the server does not have; an
adapter folder that fails to load is a 500 naming the file (the server goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..adapters.base import AdapterError
from ..devices import resolve_device, resolve_dtype
from ..models import load_base
from .cache import BASE, AdapterCache, UnknownAdapter, check_adapter_name, check_cache_options
from .engine import Engine, Request, SamplingParams, Scheduler, check_max_batch
from .multi import LoraWeights

log = logging.getLogger("loraloom.serve")

DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a whole completion is still there


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


# ---- request bodies (unknown fields are ignored, as OpenAI's own server does for new clients) ------------


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None  # sampling values are checked once, by SamplingParams
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    lorahub_weights: dict[str, float] | None = None


class CompletionBody(_Generation):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
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


class AdapterBody(BaseModel):
    name: str = Field(min_length=1)
    source: str = Field(min_length=1)


# ---- the app -----------------------------------------------------------------------------------


class _Service:
    """What the routes share: the engine (the base model), its scheduler and the adapter cache."""

    def __init__(self, engine: Engine, cache: AdapterCache) -> None:
        self.engine, self.cache, self.scheduler = engine, cache, Scheduler(engine)

    async def admit(self, body: _Generation, ids: list[int], default_max_tokens: int | None) -> Request:
        self.scheduler.start()  # idempotent: for hosts that skip the lifespan events
        adapter = await self.adapter_for(body)
        max_tokens = body.max_tokens if body.max_tokens is not None else default_max_tokens
        if max_tokens is None:  # chat: up to the end of the context
            max_tokens = max(1, (self.engine.max_positions or len(ids) + 256) - len(ids))
        try:
            self.engine.check_length(len(ids), max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded" if ids else None) from e
        try:
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            params = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop
            )
        except ValueError as e:
            raise APIError(400, str(e)) from e
        return self.scheduler.submit(Request(ids, adapter, params))

    async def adapter_for(self, body: _Generation) -> LoraWeights | None:
        try:
            if body.lorahub_weights is not None:
                if body.model not in (BASE, "lorahub"):
                    raise APIError(
                        400,
                        f"lorahub_weights composes modules over the base model: set model to 'base', not {body.model!r}",
                        param="model",
                    )
                known = set(self.cache.names())
                unknown = sorted(set(body.lorahub_weights) - known)
                if unknown:
                    raise APIError(
                        400,
                        f"lorahub_weights: module(s) {', '.join(map(repr, unknown))} not in the bank "
                        f"(modules: {', '.join(sorted(known)) or 'none'})",
                        param="lorahub_weights",
                    )
                return await asyncio.to_thread(self.cache.compose, body.lorahub_weights)
            if body.model == BASE:
                return None
            return await asyncio.to_thread(self.cache.get, body.model)
        except UnknownAdapter as e:
            raise APIError(404, f"the model {body.model!r} does not exist: {e}", param="model",
                           code="model_not_found") from e  # fmt: skip
        except AdapterError as e:
            log.warning("adapter failed to load: %s", e)
            if body.lorahub_weights is not None:
                raise APIError(400, f"lorahub_weights: {e}", param="lorahub_weights") from e
            raise APIError(500, f"adapter {body.model!r} failed to load: {e}", type="server_error") from e
        except ValueError as e:
            raise APIError(400, str(e), param="lorahub_weights") from e

    async def respond(self, request: Request, body: _Generation, http: HTTPRequest, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        if body.stream:
            return StreamingResponse(self.events(request, body, rid, now, chat), media_type="text/event-stream")
        done = asyncio.ensure_future(self.scheduler.complete(request))
        try:
            while not (await asyncio.wait({done}, timeout=DISCONNECT_POLL))[0]:
                if await http.is_disconnected():  # the client went away: free its row at the next step
                    done.cancel()
                    return JSONResponse({}, status_code=499)
        finally:
            done.cancel()  # no-op once finished; cancels the request if this handler itself is cancelled
        if request.finish_reason == "error":
            raise APIError(500, request.error or "generation failed", type="server_error")
        usage = _usage(request)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": request.text},
                "finish_reason": request.finish_reason,
                "logprobs": None,
            }
            return {"id": rid, "object": "chat.completion", "created": now, "model": body.model,
                    "choices": [choice], "usage": usage}  # fmt: skip
        choice = {"index": 0, "text": request.text, "finish_reason": request.finish_reason, "logprobs": None}
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model,
                "choices": [choice], "usage": usage}  # fmt: skip

    async def events(self, request: Request, body: _Generation, rid: str, now: int, chat: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": now, "model": body.model, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        try:
            if chat:
                yield chunk("", None, first=True)
            async for text in self.scheduler.stream(request):
                yield chunk(text, None)
            if request.finish_reason == "error":
                error = {"message": request.error, "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
            else:
                yield chunk(None if chat else "", request.finish_reason)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the row
            self.scheduler.cancel(request)


def create_app(engine: Engine, cache: AdapterCache) -> FastAPI:
    """The FastAPI app serving ``engine`` (the base model) with the adapters of ``cache``."""
    service = _Service(engine, cache)
    scheduler = service.scheduler
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await scheduler.stop()

    app = FastAPI(title="loraloom", lifespan=lifespan)
    app.state.scheduler, app.state.cache, app.state.engine = scheduler, cache, engine

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, f"malformed JSON body: {first.get('msg')}").response()
        return APIError(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", param=".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail), type="invalid_request_error").response()

    @app.get("/v1/models")
    async def models() -> dict:
        names = [BASE, *cache.names()]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": created, "owned_by": "loraloom"} for n in names],
        }

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterBody) -> dict:
        try:
            await asyncio.to_thread(cache.add, body.name, body.source)
        except (AdapterError, ValueError) as e:
            raise APIError(400, str(e), param="source") from e
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "loraloom"}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        try:
            cache.remove(name)
        except UnknownAdapter as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from e
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt: give one prompt per request (a string)", param="prompt")
        ids = engine.tokenizer(prompts[0])["input_ids"]
        request = await service.admit(body, ids, default_max_tokens=16)
        return await service.respond(request, body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from e
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        request = await service.admit(body, ids, default_max_tokens=None)
        return await service.respond(request, body, http, chat=True)

    return app


def _usage(request: Request) -> dict[str, int]:
    prompt, completion = len(request.prompt_ids), len(request.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def named_adapters(items: list[str]) -> dict[str, str]:
    """``["name=folder-or-hub-id", ...]`` (``--adapter``) -> {name: source}."""
    named = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--adapter {item}: expected NAME=FOLDER_OR_HUB_ID")
        named[name] = source
    return named


@dataclass
class ServeOptions:
    """What ``loraloom serve`` takes, checked before the model loads."""

    base: str
    """The base causal LM: a local folder or a hub id."""
    adapters: str | None = None
    """A folder of adapter folders; each subfolder name is a ``model`` name. None: only named ones."""
    named: dict[str, str] = field(default_factory=dict)
    """More adapters by name: name -> folder or hub id, loaded on first use like the folder's."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 32
    """Rows decoded together at most; more requests wait for a free row."""
    cache_mib: float = 1024.0
    """Memory for loaded adapters (and composition banks), least recently used dropped first."""
    ray_replicas: int = 0
    """0: one process. N >= 1: N replicas behind one endpoint with Ray Serve."""
    device: str = "auto"
    """Where the base runs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps."""
    dtype: str = "auto"
    """The base's precision: fp32, bf16, fp16, or auto (bf16 on GPUs that support it)."""
    gpus_per_replica: float = 0.0
    """Ray Serve: GPUs each replica asks for (fractional allowed)."""

    def __post_init__(self) -> None:
        # Each component's own check, run here before the model loads.
        check_cache_options(self.adapters, self.cache_mib)
        check_max_batch(self.max_batch)
        resolve_dtype(self.dtype, resolve_device(self.device))
        if not self.gpus_per_replica >= 0:
            raise ValueError(f"--gpus-per-replica must be >= 0, got {self.gpus_per_replica}")
        for name in self.named:
            check_adapter_name(name)
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.ray_replicas < 0:
            raise ValueError(f"--ray-replicas must be >= 0, got {self.ray_replicas}")


def build_app(options: ServeOptions) -> FastAPI:
    """Load the base model and wrap it in the server app (what each Ray replica runs, too)."""
    cache = AdapterCache(options.adapters, limit_mib=options.cache_mib)
    for name, source in options.named.items():
        cache.add(name, source, load=False)
    model, tokenizer = load_base(options.base, "causal", device=options.device, dtype=options.dtype)
    return create_app(Engine(model, tokenizer, max_batch=options.max_batch), cache)


__all__ = ["APIError", "ServeOptions", "named_adapters", "build_app", "create_app"]
