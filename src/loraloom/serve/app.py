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
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
from .multi import LoraWeights, UnservableAdapter

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
    # strict: "3" is not a number, and a field this server does not implement is a 400 naming it, never dropped
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = None  # sampling values are checked once, by SamplingParams
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    user: str | None = None  # an end-user id for the log; no effect on the output
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
    replace: bool = False


# ---- the app -----------------------------------------------------------------------------------


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Access:
    """Who may do what: the API key every route asks for, and where adapters may be added from."""

    api_key: str | None = None
    """Bearer token every request must carry (``Authorization: Bearer KEY``); None: no authentication."""
    manage: bool = False
    """Adapter management (POST/DELETE /v1/adapters) on; off by default."""
    roots: tuple[str, ...] = ()
    """Folders a POSTed adapter may come from (the adapters folder and each --allow-path)."""
    hub: bool = False
    """A POSTed source that is not a folder here may be a hub id to download."""
    max_body_bytes: int = 8 * 2**20
    """Requests with a larger body are refused (413) before they are read."""

    def authorised(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_manage(self) -> None:
        if not self.manage:
            raise APIError(403, "adapter management is off (start the server with --allow-adapter-management)")

    def source(self, source: str) -> str:
        """The folder (resolved) or hub id a POSTed adapter may load from; APIError 403 otherwise."""
        path = Path(source).expanduser()
        if path.exists():
            real = path.resolve()  # symlinks followed: a link inside a root to a folder outside is outside
            if any(real.is_relative_to(Path(root).resolve()) for root in self.roots):
                return str(real)
            raise APIError(
                403, "source: not inside the server's adapter folders (--adapters, --allow-path)", param="source"
            )
        if self.hub and not source.startswith((".", "/", "~")) and source.count("/") <= 1:
            return source
        raise APIError(
            403, "source: no such adapter folder here, and hub downloads are off (--allow-hub)", param="source"
        )


class Guard:
    """Every request, before its body is read: the API key, then the declared body size.

    Plain ASGI, not an HTTP middleware class: those hide a client's disconnect from the routes. A body sent
    without a content-length (chunked) is not measured here.
    """

    def __init__(self, app: Any, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope.get("headers") or [])
            size = headers.get(b"content-length", b"").decode("latin-1")
            refusal = None
            if not self.access.authorised(headers.get(b"authorization", b"").decode("latin-1") or None):
                refusal = APIError(
                    401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key"
                )
            elif size and (not size.isdigit() or int(size) > self.access.max_body_bytes):
                refusal = APIError(413, f"request body over {self.access.max_body_bytes} bytes")
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Service:
    """What the routes share: the engine (the base model), its scheduler and the adapter cache."""

    def __init__(self, engine: Engine, cache: AdapterCache) -> None:
        self.engine, self.cache, self.scheduler = engine, cache, Scheduler(engine)
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.scheduler.start()
        yield
        await self.scheduler.stop()

    def card(self, name: str) -> dict:
        """A model's entry in /v1/models: an adapter's parent is the base model (vLLM's field)."""
        parent = None if name == BASE else BASE
        return {"id": name, "object": "model", "created": self.created, "owned_by": "loraloom", "parent": parent}

    def fits(self, adapter: LoraWeights) -> LoraWeights:
        """``adapter``, checked against the base's layer shapes before it joins a batch (AdapterError if not):
        an adapter made for another base fails its own request, never the running batch."""
        self.engine.multi.check(adapter)
        return adapter

    async def admit(self, body: _Generation, ids: list[int], default_max_tokens: int | None) -> Request:
        self.scheduler.start()  # idempotent: for hosts that skip the lifespan events
        adapter = await self.adapter_for(body)
        given = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = given if given is not None else default_max_tokens
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
                return self.fits(await asyncio.to_thread(self.cache.compose, body.lorahub_weights))
            if body.model == BASE:
                return None
            return self.fits(await asyncio.to_thread(self.cache.get, body.model))
        except UnknownAdapter as e:
            raise APIError(404, f"the model {body.model!r} does not exist: {e}", param="model",
                           code="model_not_found") from e  # fmt: skip
        except UnservableAdapter as e:  # a valid adapter with a field rows cannot carry: the message names it
            raise APIError(400, str(e), param="model", code="adapter_not_servable") from e
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error as an OpenAI error body (APIError), whatever raised it."""

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


def create_app(engine: Engine, cache: AdapterCache, access: Access | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (the base model) with the adapters of ``cache``, as ``access`` allows
    (default: no key, no adapter management)."""
    access = access or Access()
    service = _Service(engine, cache)
    scheduler = service.scheduler
    app = FastAPI(title="loraloom", lifespan=service.lifespan)
    app.add_middleware(Guard, access=access)
    app.state.scheduler, app.state.cache, app.state.engine = scheduler, cache, engine
    add_error_handlers(app)
    card = service.card

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(n) for n in [BASE, *cache.names()]]}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict:
        if name != BASE and name not in cache.names():
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return card(name)

    @app.post("/v1/adapters")
    async def add_adapter(body: AdapterBody) -> dict:
        access.check_manage()
        if not ADAPTER_NAME.fullmatch(body.name) or body.name == BASE:
            raise APIError(400, "name: 1-64 letters, digits, '.', '_' or '-', not 'base'", param="name")
        if body.name in cache.names() and not body.replace:
            raise APIError(409, f"an adapter named {body.name!r} exists: send replace: true", param="name")
        source = access.source(body.source)
        try:
            await asyncio.to_thread(cache.add, body.name, source)
        except (AdapterError, ValueError) as e:  # the details (paths, config values) go to the log, not the client
            log.warning("adapter %r failed to load: %s", body.name, e)
            raise APIError(
                400, f"adapter {body.name!r} failed to load: not a valid adapter folder", param="source"
            ) from e
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "loraloom"}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        access.check_manage()
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
        ids = (await asyncio.to_thread(engine.tokenizer, prompts[0]))["input_ids"]  # off the event loop
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
        ids = (await asyncio.to_thread(tokenizer, text, add_special_tokens=False))["input_ids"]
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
    api_key: str | None = None
    """Every request must carry ``Authorization: Bearer API_KEY`` (``--api-key``, or LORALOOM_API_KEY)."""
    allow_adapter_management: bool = False
    """POST / DELETE /v1/adapters: off unless asked for."""
    allow_path: tuple[str, ...] = ()
    """Folders besides ``adapters`` that POSTed adapters may be loaded from."""
    allow_hub: bool = False
    """A POSTed source may be a hub id to download."""
    max_body_mib: float = 8.0
    """Larger request bodies are refused (413)."""

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
        self.allow_path = tuple(self.allow_path)
        for folder in self.allow_path:
            if not Path(folder).is_dir():
                raise ValueError(f"--allow-path {folder}: not a directory")
        if not self.max_body_mib > 0:
            raise ValueError(f"--max-body-mib must be positive, got {self.max_body_mib}")
        if self.ray_replicas < 0:
            raise ValueError(f"--ray-replicas must be >= 0, got {self.ray_replicas}")


def build_app(options: ServeOptions) -> FastAPI:
    """Load the base model and wrap it in the server app (what each Ray replica runs, too)."""
    cache = AdapterCache(options.adapters, limit_mib=options.cache_mib)
    for name, source in options.named.items():
        cache.add(name, source, load=False)
    model, tokenizer = load_base(options.base, "causal", device=options.device, dtype=options.dtype)
    roots = tuple(str(r) for r in ([options.adapters] if options.adapters else []) + list(options.allow_path))
    access = Access(
        api_key=options.api_key or None,
        manage=options.allow_adapter_management,
        roots=roots,
        hub=options.allow_hub,
        max_body_bytes=int(options.max_body_mib * 2**20),
    )
    return create_app(Engine(model, tokenizer, max_batch=options.max_batch), cache, access)


__all__ = ["APIError", "Access", "ServeOptions", "named_adapters", "build_app", "create_app"]
