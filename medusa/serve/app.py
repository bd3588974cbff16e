"""The FastAPI app: routes, the request guard, disconnect handling and OpenAI-shaped errors.

The event loop only parses, routes and relays: tokenisation, generation and detokenisation happen
on the worker's threads (``worker.py``), so a megabyte prompt or a long generation never delays
``/v1/models`` or ``/health``.  Every way a request can end cancels its job: it finishes, it fails,
or its client hangs up (watched while a non-streaming request waits, and by the stream itself).
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from openai.types import Model
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..core.backends import BackendError
from ..core.config import GenerationConfig
from ..core.prompts import Message as ChatTurn
from ..core.prompts import encode_prompt
from ..core.text import TextStream
from .schemas import APIError, ChatRequest, CompletionRequest, Outcome, Sampling, Shape, server_error, sse
from .worker import GenerationError, Job, Worker

log = logging.getLogger("medusa.serve")
T = TypeVar("T")

# Below this a temperature is greedy decoding in all but name, and dividing logits by it overflows
# (float16 logits already at ~1e-3): it is served as temperature 0.
MIN_TEMPERATURE = 1e-3


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    defaults: GenerationConfig  # temperature, top_p, max_new_tokens, acceptance, medusa, stop ids, seed
    max_len: int  # the KV budget: prompt + completion tokens
    template: Optional[str] = None
    log_stats: bool = False
    max_queue: int = 16  # requests waiting behind the one generating; more get 429
    max_body_bytes: int = 1 << 20
    api_key: Optional[str] = None  # None: no authentication (bind to loopback)


# Request bodies are parsed by recursive JSON decoders, which Python's recursion limit guards.  Jittor,
# Gradio and torch._dynamo raise that limit to 10^6 on import, which turns a deeply nested body
# ("[" * 100_000) into a C stack overflow that kills the server; its own limit keeps it a 400.
RECURSION_LIMIT = 2000


def create_app(backend: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``backend`` (loaded by the caller, used only by this app's worker)."""
    sys.setrecursionlimit(min(sys.getrecursionlimit(), RECURSION_LIMIT))
    worker = Worker(backend, config.max_queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.stop()

    app = FastAPI(title="Jedusa OpenAI-compatible server", lifespan=lifespan)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    _install_error_handlers(app)
    server = Server(backend, config, worker)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": config.model_id, "active_requests": worker.active,
                "max_active_requests": worker.capacity}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [server.model_card()]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        turns = [m.as_message() for m in req.messages]
        encode = partial(_encode_chat, backend.tokenizer, turns, config.template)
        return await server.complete(request, req, encode, Shape(True, config.model_id))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        encode = partial(_encode_text, backend.tokenizer, req.text())
        return await server.complete(request, req, encode, Shape(False, config.model_id))

    return app


class Server:
    """One completion from request to response: admit, tokenise, queue, relay, always clean up."""

    def __init__(self, backend: Any, config: ServerConfig, worker: Worker) -> None:
        self.backend, self.config, self.worker = backend, config, worker
        self.started = int(time.time())

    def model_card(self) -> dict[str, Any]:
        card = Model(id=self.config.model_id, object="model", created=self.started, owned_by="jedusa",
                     jedusa=_without_paths(self.backend.describe()))
        return card.model_dump(mode="json", exclude_unset=True)

    async def complete(self, request: Request, req: Sampling, encode: Callable[[], list[int]], shape: Shape) -> Any:
        _check_before_tokenising(req, self.config)
        slot = self.worker.reserve()
        job: Optional[Job] = None
        stream: Optional[JobStream] = None
        try:
            ids = await self.worker.encode(encode)
            cfg = _generation_config(req, ids, self.config)
            job = self.worker.submit(slot, ids, cfg, TextStream(self.backend.tokenizer, req.stops()))
            outcome = Outcome(prompt_tokens=len(ids))
            texts = _texts(job, outcome)
            # The first text carries any prefill or option error while a status code can still be sent.
            first = await _unless_disconnected(request, anext(texts, None))
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                stream = JobStream(self._events(shape, first, texts, outcome, include_usage), job)
                return stream
            text = await _unless_disconnected(request, _join(first, texts))
        except ClientGone:
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        except (APIError, GenerationError) as err:
            return _client_error(err).response()
        finally:
            if stream is None:
                slot.release()
                if job is not None:
                    job.close()
        self._log(outcome)
        return shape.full(text, outcome)

    async def _events(self, shape: Shape, first: Optional[str], texts: AsyncIterator[str], outcome: Outcome,
                      include_usage: bool) -> AsyncIterator[str]:
        if shape.chat:
            yield sse(shape.chunk(None, first=True))
        try:
            if first:
                yield sse(shape.chunk(first))
            async for text in texts:
                yield sse(shape.chunk(text))
        except Exception as err:  # headers are gone: report in-band, as OpenAI does, then end the stream
            if not isinstance(err, GenerationError):  # the worker has logged its own failures
                log.exception("stream failed")
            yield sse(_client_error(err).body())
            yield sse("[DONE]")
            return
        yield sse(shape.chunk(None, outcome.finish_reason, medusa=outcome.medusa()))
        if include_usage:
            yield sse(shape.usage_chunk(outcome))
        yield sse("[DONE]")
        self._log(outcome)

    def _log(self, outcome: Outcome) -> None:
        if self.config.log_stats:
            log.info("%s", outcome.summary())


class JobStream(StreamingResponse):
    """Server-sent events that end their job however the response ends: finished, failed, or the
    client gone (starlette cancels the stream on disconnect, even before its first byte)."""

    def __init__(self, events: AsyncIterator[str], job: Job) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.close()


async def _texts(job: Job, outcome: Outcome) -> AsyncIterator[str]:
    """The non-empty text deltas of ``job``, counted into ``outcome``; raises the worker's error."""
    try:
        while (delta := await job.next()) is not None:
            outcome.add(delta.step, delta.finish_reason)
            if delta.text:
                yield delta.text
    finally:
        job.close()


async def _join(first: Optional[str], texts: AsyncIterator[str]) -> str:
    return (first or "") + "".join([t async for t in texts])


class ClientGone(Exception):
    """The client closed its connection before its response was ready."""


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client hangs up first, cancel ``work`` (its job with it) and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait((task,))
        raise ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    """Returns when the server reports the client gone (the body has been read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- request checks


def _encode_chat(tokenizer: Any, turns: list[ChatTurn], template: Optional[str]) -> list[int]:
    try:
        return encode_prompt(tokenizer, turns, template)
    except TemplateError as err:  # e.g. a template that requires alternating user/assistant turns
        raise APIError(400, f"the chat template refused these messages: {err}", "messages") from None


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text))


def _check_before_tokenising(req: Sampling, config: ServerConfig) -> None:
    """What can be refused without a queue slot: another model, a completion the context cannot hold."""
    if req.model != config.model_id:
        raise APIError(404, f"model {req.model!r} is not served here: use {config.model_id!r}", "model",
                       "model_not_found")
    asked = req.requested_tokens()
    if asked is not None and asked >= config.max_len:  # the prompt takes at least one token
        raise _too_many_tokens(req, asked, config.max_len, f"at most {config.max_len - 1} (fewer with a longer prompt)")


def _too_many_tokens(req: Sampling, asked: int, max_len: int, allowed: str) -> APIError:
    name = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) else "max_tokens"
    return APIError(400, f"{name} is {asked}, but this model's context is {max_len} tokens, prompt included: ask "
                         f"for {allowed} completion tokens or shorten the prompt", name, "context_length_exceeded")


def _generation_config(req: Sampling, ids: list[int], config: ServerConfig) -> GenerationConfig:
    """The request's decoding options over the server's defaults; completions fit the context (400 if not)."""
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if not ids:
        raise APIError(400, "the prompt is empty", param)
    room = config.max_len - len(ids)
    if room < 1:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the context of {config.max_len} tokens needs room for "
                            f"at least one new token: shorten it or restart the server with a larger --max-len",
                       param, "context_length_exceeded")
    asked = req.requested_tokens()
    if asked is not None and asked > room:
        raise _too_many_tokens(req, asked, config.max_len, f"at most {room} (the prompt has {len(ids)} tokens)")
    temperature = req.temperature
    if temperature is not None and temperature < MIN_TEMPERATURE:
        temperature = 0.0
    changes = {"max_new_tokens": asked or min(config.defaults.max_new_tokens, room), "temperature": temperature,
               "top_p": req.top_p, "seed": req.seed}
    return config.defaults.with_(**{k: v for k, v in changes.items() if v is not None})


def _without_paths(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` with every value that names a file on the server cut to its last component."""
    def public(value: Any) -> Any:
        if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
            return Path(value).name
        return value

    return {k: public(v) for k, v in info.items()}


def _client_error(err: Exception) -> APIError:
    cause = err.__cause__ if isinstance(err, GenerationError) else err
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, BackendError):  # an option this backend does not support
        return APIError(400, str(cause))
    return server_error(cause if isinstance(cause, BaseException) else err)


# ----------------------------------------------------------------------------- the guard and errors


class Guard:
    """Checks each HTTP request before anything reads its body: the API key (401, except for
    ``/health``), then the declared size (413 at once, the body unread); a body without a declared
    size (chunked) is counted while it is read and refused with 413 as soon as it passes the limit."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app: ASGIApp, api_key: Optional[str], max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        await self.app(scope, self._counted(receive), send)

    def _refusal(self, scope: Scope) -> Optional[APIError]:
        headers = Headers(scope=scope)
        if self.api_key is not None and scope["path"] not in self.OPEN_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
                return APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY' "
                                     "with the server's --api-key", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_body_bytes} bytes "
                             f"(--max-body-mb)", code="request_too_large")

    def _counted(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                raise self._too_large()  # an HTTPException: FastAPI's body reader passes it through
            return message

        return counted


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        errors = err.errors()
        # A value that fails one of our own checks says more than the type errors of the other union members.
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
        kind, msg = first.get("type"), str(first.get("msg", "")).removeprefix("Value error, ")
        if kind == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}",
                            code=kind).response()
        # Union members add a tag such as 'list[TextPart]' to the location: not a field a client can name.
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]
        param = ".".join(loc) or None
        message = f"Unrecognized request argument supplied: {param}" if kind == "extra_forbidden" else (
            f"{param}: {msg}" if param else msg)
        return APIError(400, message, param, kind).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), headers=err.headers).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(err).__name__, err)
        return server_error(err).response()
