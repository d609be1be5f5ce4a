"""The OpenAI-compatible HTTP server (FastAPI + uvicorn): ``loraloom serve``.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (when the tokenizer
has a chat template), ``stream: true`` as server-sent events, with OpenAI's sampling fields (``n``, ``seed``,
``stop``, penalties, ``logit_bias``, ``logprobs``, ``echo``, token-id and list prompts, ``stream_options``).
The request's ``model`` names an adapter (``base`` for none); the extension field ``lorahub_weights:
{module: weight}`` composes modules of the server's adapters for that request (LoraHub without a merge).
``POST /v1/adapters`` {"name", "source"} and ``DELETE /v1/adapters/{name}`` (and vLLM's
``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``) add and remove adapters while serving.
``GET /metrics`` gives the server's state in Prometheus' text format; ``GET /health`` answers without a key.

Errors carry OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 404 for an unknown adapter,
400 for malformed JSON or fields, a field this server does not implement, a prompt too long, or weights over
modules the server does not have; an adapter folder that fails to load is a 500 naming the file (the server
goes on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import re
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..adapters.base import AdapterError
from ..models import load_base
from .cache import BASE, AdapterCache, UnknownAdapter
from .engine import Engine, Request, SamplingParams
from .metrics import ServerMetrics
from .multi import LoraWeights, UnservableAdapter
from .options import ServeOptions, named_adapters
from .protocol import (
    MAX_ROWS,
    AdapterBody,
    APIError,
    ChatBody,
    CompletionBody,
    LoadLoraBody,
    UnloadLoraBody,
    _Generation,
)
from .responses import Choice, Job, Renderer
from .scheduler import Scheduler
from .seq2seq import make_engine, served_task

log = logging.getLogger("loraloom.serve")

INLINE_TOKENIZE_CHARS = 4096  # prompts shorter than this (all of a request's) are tokenized on the event loop:
# a thread hop costs more than tokenizing them; longer ones go to a thread so the loop keeps streaming.
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a whole completion is still there
# Routes open without the API key: liveness probes, as vLLM's /health. /metrics is not among them: vLLM leaves
# it open, but its own security guide counts the routes its key does not cover as a weakness (a scraper sends
# the key with Prometheus' `authorization` setting).
OPEN_PATHS = frozenset({"/health"})


# ---- who may do what ---------------------------------------------------------------------------


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Access:
    """Who may do what: the API key every route asks for, and where adapters may be added from."""

    api_key: str | None = None
    """Bearer token every request must carry (``Authorization: Bearer KEY``); None: no authentication."""
    manage: bool = False
    """Adapter management (POST/DELETE /v1/adapters, vLLM's load/unload_lora_adapter) on; off by default."""
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
    """Every request, before its body is read: the API key (but on OPEN_PATHS), then the declared body size;
    and every response's status counted for /metrics.

    Plain ASGI, not an HTTP middleware class: those hide a client's disconnect from the routes. A body sent
    without a content-length (chunked) is not measured here.
    """

    def __init__(self, app: Any, access: Access, statuses: Counter[str]) -> None:
        self.app, self.access, self.statuses = app, access, statuses

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.statuses[str(message["status"])] += 1
            await send(message)

        headers = dict(scope.get("headers") or [])
        size = headers.get(b"content-length", b"").decode("latin-1")
        key = headers.get(b"authorization", b"").decode("latin-1") or None
        refusal = None
        if scope.get("path") not in OPEN_PATHS and not self.access.authorised(key):
            refusal = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        elif size and (not size.isdigit() or int(size) > self.access.max_body_bytes):
            refusal = APIError(413, f"request body over {self.access.max_body_bytes} bytes")
        if refusal is not None:
            await refusal.response()(scope, receive, counted)
            return
        await self.app(scope, receive, counted)


async def tokenize(tokenizer: Any, texts: list[str], **options: Any) -> list[list[int]]:
    """Token ids of ``texts``: short ones right here, long ones in a thread (the event loop keeps streaming)."""

    def run() -> list[list[int]]:
        return [tokenizer(t, **options)["input_ids"] for t in texts]

    if sum(len(t) for t in texts) < INLINE_TOKENIZE_CHARS:
        return run()
    return await asyncio.to_thread(run)


class _Service:
    """What the routes share: the engine (the base model), its scheduler, the adapter cache and the access."""

    def __init__(self, engine: Engine, cache: AdapterCache, access: Access) -> None:
        self.engine, self.cache, self.access, self.scheduler = engine, cache, access, Scheduler(engine)
        self.render = Renderer(engine.tokenizer)
        self.statuses: Counter[str] = Counter()  # HTTP responses by status code (the Guard counts them)
        self.metrics = ServerMetrics(self.scheduler, cache, self.statuses)
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
        """``adapter``, checked against the base's layer shapes (AdapterError if not) and --max-lora-rank (400)
        before it joins a batch: an adapter made for another base fails its own request, never the batch."""
        try:
            self.engine.check_adapter(adapter)
        except AdapterError:  # another base's shapes: a 500 naming the adapter, as a file that fails to load
            raise
        except ValueError as e:  # over --max-lora-rank
            raise APIError(400, str(e), param="model") from e
        return adapter

    # ---- admission -----------------------------------------------------------------------------

    async def completion_prompts(self, body: CompletionBody) -> tuple[list[list[int]], list[str]]:
        """(token ids, text) of each prompt: a string, strings, token ids, or lists of token ids."""
        prompts: list = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        if isinstance(prompts[0], int):  # one prompt of token ids
            prompts = [prompts]
        tokenizer = self.engine.tokenizer
        if isinstance(prompts[0], str):
            ids = await tokenize(tokenizer, prompts)
            return ids, prompts
        return prompts, [tokenizer.decode(p, skip_special_tokens=False) for p in prompts] if body.echo else []

    def sampling(self, body: _Generation, ids: list[int], default_max_tokens: int | None) -> SamplingParams:
        """One prompt's SamplingParams from the body, every value checked (APIError 400 naming it)."""
        given = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        max_tokens = given if given is not None else default_max_tokens
        if max_tokens is None:  # chat: up to the end of the context
            max_tokens = max(1, (self.engine.max_positions or len(ids) + 256) - len(ids))
        try:
            self.engine.check_tokens(ids)
            self.engine.check_length(len(ids), max_tokens)
        except ValueError as e:
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded" if ids else None) from e
        bias = body.logit_bias_ids()
        logprobs, prompt_logprobs = body.wanted_logprobs()
        try:
            self.engine.check_tokens(list(bias), "logit_bias")
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            return SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=bias,
                logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            )  # fmt: skip
        except ValueError as e:
            raise APIError(400, str(e)) from e

    async def admit(
        self, body: _Generation, prompts: list[list[int]], echoes: list[str], default_max_tokens: int | None
    ) -> Job:
        """Every row of the request (prompts x n) checked, then queued together; choice i*n+j is prompt i's j-th.

        With a seed, row j of a prompt samples with seed + j: distinct rows, the same on every call."""
        self.scheduler.start()  # idempotent: for hosts that skip the lifespan events
        body.refuse_unsupported()
        if self.engine.seq2seq and getattr(body, "echo", False):
            raise APIError(400, "echo: this is a seq2seq model; the prompt is the encoder's input, not output text",
                           param="echo")  # fmt: skip
        if len(prompts) * body.n > MAX_ROWS:
            raise APIError(400, f"prompts x n is {len(prompts) * body.n}, over {MAX_ROWS} rows a request", param="n")
        params = [self.sampling(body, ids, default_max_tokens) for ids in prompts]
        adapter = await self.adapter_for(body)
        queue: asyncio.Queue = asyncio.Queue()  # one for the request's rows: its handler follows them together
        choices = []
        for i, (ids, base) in enumerate(zip(prompts, params, strict=True)):
            for j in range(body.n):
                row = dataclasses.replace(base, seed=(base.seed + j) % 2**63) if j and base.seed is not None else base
                request = self.scheduler.submit(Request(list(ids), adapter, row), queue)
                choices.append(Choice(i * body.n + j, request, echo=echoes[i] if echoes else ""))
        return Job(choices, prompt_tokens=sum(len(ids) for ids in prompts), logprobs=params[0].logprobs is not None)

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

    # ---- answers -------------------------------------------------------------------------------

    async def respond(self, job: Job, body: _Generation, http: HTTPRequest, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        if body.stream:
            return StreamingResponse(self.events(job, body, rid, now, chat), media_type="text/event-stream")
        done = asyncio.ensure_future(self.scheduler.complete_all(job.requests))
        try:
            while not (await asyncio.wait({done}, timeout=DISCONNECT_POLL))[0]:
                if await http.is_disconnected():  # the client went away: free its rows at the next step
                    done.cancel()
                    return JSONResponse({}, status_code=499)
        finally:
            done.cancel()  # no-op once finished; cancels the rows if this handler itself is cancelled
        error = job.error()
        if error is not None:
            raise APIError(500, error, type="server_error")
        if chat:
            choices = [self.render.chat_choice(c, job.logprobs) for c in job.choices]
        else:
            choices = [self.render.completion_choice(c, job.logprobs) for c in job.choices]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
                "model": body.model, "choices": choices, "usage": job.usage()}  # fmt: skip

    async def events(self, job: Job, body: _Generation, rid: str, now: int, chat: bool):
        """The server-sent events of a streamed request: each choice's pieces as its row makes them."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        with_usage = body.stream_options is not None and body.stream_options.include_usage

        # Every chunk has the same head: encoded once, each chunk then encodes only its choices (and usage).
        head = json.dumps({"id": rid, "object": obj, "created": now, "model": body.model})[:-1]
        usage_null = ', "usage": null' if with_usage else ""  # OpenAI: usage null but in the last chunk

        def event(choices: list[dict], usage: dict | None = None) -> bytes:
            tail = f', "usage": {json.dumps(usage)}' if usage is not None else usage_null
            return f'data: {head}, "choices": {json.dumps(choices)}{tail}}}\n\n'.encode()

        try:
            if chat:
                for choice in job.choices:
                    yield event([self.render.role_piece(choice)])
            async for request in self.scheduler.follow(job.requests):
                if request.finish_reason == "error":  # the stream ends with the error; its other rows are freed
                    error = {"message": request.error, "type": "server_error", "param": None, "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n".encode()
                    return
                for piece in self.pieces(job.choice_of(request), chat, job.logprobs):
                    yield event([piece])
            if with_usage:
                yield event([], usage=job.usage())
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (or the stream ended): free the rows
            for request in job.requests:
                self.scheduler.cancel(request)

    def pieces(self, choice: Choice, chat: bool, logprobs: bool) -> list[dict]:
        """A choice's echo (the first time: its row has been prefilled), its new text (if any), then its finish
        once it has finished."""
        out = []
        if choice.echo and not choice.echoed:
            choice.echoed = True
            out.append(self.render.echo_piece(choice, logprobs))
        piece = self.render.next_piece(choice, chat, logprobs)
        if piece is not None:
            out.append(piece)
        if choice.request.finished and not choice.done:
            choice.done = True
            out.append(self.render.last_piece(choice, chat))
        return out

    # ---- adapter management ----------------------------------------------------------------------

    async def add_adapter(self, name: str, source: str, replace: bool) -> None:
        """Load ``source`` as ``name`` (POST /v1/adapters, vLLM's load_lora_adapter), every check first."""
        self.access.check_manage()
        if not ADAPTER_NAME.fullmatch(name) or name == BASE:
            raise APIError(400, "name: 1-64 letters, digits, '.', '_' or '-', not 'base'", param="name")
        exists = name in self.cache.names()
        if exists and not replace:
            raise APIError(409, f"an adapter named {name!r} exists: send replace: true", param="name")
        source = self.access.source(source)
        previous = self.cache.source(name) if exists else None
        try:
            await asyncio.to_thread(self.cache.add, name, source)
        except (AdapterError, ValueError) as e:  # the details (paths, config values) go to the log, not the client
            log.warning("adapter %r failed to load: %s", name, e)
            raise APIError(400, f"adapter {name!r} failed to load: not a valid adapter folder", param="source") from e
        try:  # the base's shapes and --max-lora-rank: refused now rather than at its first request
            self.engine.check_adapter(await asyncio.to_thread(self.cache.get, name))
        except (AdapterError, ValueError) as e:
            if previous is not None:
                self.cache.add(name, previous, load=False)
            else:
                self.cache.remove(name)
            raise APIError(400, str(e), param="source") from e

    def remove_adapter(self, name: str) -> None:
        self.access.check_manage()
        try:
            self.cache.remove(name)
        except UnknownAdapter as e:
            raise APIError(404, str(e), param="model", code="model_not_found") from e


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
    service = _Service(engine, cache, access or Access())
    app = FastAPI(title="loraloom", lifespan=service.lifespan)
    app.add_middleware(Guard, access=service.access, statuses=service.statuses)
    app.state.scheduler, app.state.cache, app.state.engine = service.scheduler, cache, engine
    add_error_handlers(app)
    add_admin_routes(app, service)
    add_generation_routes(app, service)
    return app


def add_admin_routes(app: FastAPI, service: _Service) -> None:
    """Health, metrics, the model list and adapter management (ours and vLLM's names)."""
    cache, card = service.cache, service.card

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

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
        await service.add_adapter(body.name, body.source, body.replace)
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "loraloom"}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str) -> dict:
        service.remove_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraBody) -> PlainTextResponse:
        await service.add_adapter(body.lora_name, body.lora_path, body.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraBody) -> PlainTextResponse:
        service.remove_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def add_generation_routes(app: FastAPI, service: _Service) -> None:
    engine = service.engine

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompts, texts = await service.completion_prompts(body)
        job = await service.admit(body, prompts, texts if body.echo else [], default_max_tokens=16)
        return await service.respond(job, body, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HTTPRequest):
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {})
                    for m in body.messages]  # fmt: skip
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from e
        ids = (await tokenize(tokenizer, [text], add_special_tokens=False))[0]
        job = await service.admit(body, [ids], [], default_max_tokens=None)
        return await service.respond(job, body, http, chat=True)


def build_app(options: ServeOptions) -> FastAPI:
    """Load the base model and wrap it in the server app (what each Ray replica runs, too)."""
    cache = AdapterCache(options.adapters, limit_mib=options.cache_mib)
    for name, source in options.named.items():
        cache.add(name, source, load=False)
    model, tokenizer = load_base(
        options.base, served_task(options.base), device=options.device, dtype=options.dtype, quantize=options.quantize
    )
    roots = tuple(str(r) for r in ([options.adapters] if options.adapters else []) + list(options.allow_path))
    access = Access(
        api_key=options.api_key or None,
        manage=options.allow_adapter_management,
        roots=roots,
        hub=options.allow_hub,
        max_body_bytes=int(options.max_body_mib * 2**20),
    )
    engine = make_engine(model, tokenizer, max_batch=options.max_batch, max_loras=options.max_loras,
                         max_lora_rank=options.max_lora_rank)  # fmt: skip
    return create_app(engine, cache, access)


__all__ = ["APIError", "Access", "ServeOptions", "named_adapters", "build_app", "create_app"]
