"""An OpenAI-compatible HTTP server over any Jedusa backend: ``python -m medusa.serve``.

Our own tools (LLM judges, self-distillation, notebooks with the ``openai`` client) speak the
OpenAI API; serving Medusa behind it lets them use speculative decoding without a line changed.
Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, streamed
(server-sent events) or not.

- **One backend, one worker thread.**  A backend holds one KV cache and is not thread-safe, so it
  is loaded once and owned by a single thread; requests wait in a FIFO queue and never block
  the event loop.  A client that disconnects, or whose ``stop`` string appeared, cancels the rest
  of its generation at the next step.
- **Text at the edge.**  The engine sees token ids and stops on EOS; chat templates,
  detokenisation and ``stop`` strings are handled here (``TextStream``: text is held back while
  it could still be the start of a stop string, and cut before the first one).
- **OpenAI-shaped errors** ``{"error": {"message", "type", "param", "code"}}``: an invalid request
  (FastAPI's 422 included) or a prompt longer than the context is a 400, an unknown model a 404,
  a failure inside generation a 500 — and the server keeps serving.
- **Extension**: every response carries ``"medusa": {"steps", "accepted_tokens",
  "mean_accepted_length"}``; the mean is tokens per decoding step (the paper's τ, 1.0 for the
  baseline), counted as ``my_judge`` counts it.
- **Defaults are the server's**: a request without ``temperature`` / ``top_p`` / ``max_tokens``
  gets ``--temperature`` (0 = greedy, unlike OpenAI's 1) / ``--top-p`` / ``--max-new-tokens``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from .core.backends import BackendError, load_backend
from .core.config import GenerationConfig
from .core.engine import Step
from .core.prompts import encode_prompt, stop_token_ids
from .inference.cli import build_parser as chat_parser

log = logging.getLogger("medusa.serve")


# ----------------------------------------------------------------------------- text at the edge


class TextStream:
    """Incremental detokenisation of a growing id sequence, cut before the first stop string.

    ``push(ids)`` returns the new text that is safe to show: nothing while the text ends in an
    incomplete UTF-8 character (``\\ufffd``), and never a tail that could begin a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one appears
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(max(len(text) - held, self.sent))

    def flush(self) -> str:
        """The held-back tail once generation has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out


# ----------------------------------------------------------------------------- requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    seed: Optional[int] = None
    user: Optional[str] = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: Union[str, list[str], None]) -> Union[str, list[str], None]:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("only one prompt per request is supported")
        return prompt


class APIError(Exception):
    """An error the client sees as ``{"error": {...}}`` with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def _generation_error(err: Exception) -> APIError:
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackendError):  # an option this backend does not support
        return APIError(400, str(err))
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", kind="server_error")


# ----------------------------------------------------------------------------- the worker


_DONE = object()


@dataclass
class Job:
    """One generation: the worker thread pushes Steps (then an exception or _DONE) into ``events``."""

    ids: list[int]
    cfg: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody is listening
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    async def steps(self) -> AsyncIterator[Step]:
        while (item := await self.events.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item


class Worker:
    """Owns the backend: runs queued jobs one at a time on its own thread."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._loop, name="medusa-worker", daemon=True).start()

    def submit(self, ids: list[int], cfg: GenerationConfig) -> Job:
        job = Job(ids, cfg, asyncio.get_running_loop())
        self._jobs.put(job)
        return job

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if not job.cancelled.is_set():
                self._run(job)
            job.put(_DONE)

    def _run(self, job: Job) -> None:
        try:
            for step in self.backend.generate(job.ids, job.cfg):
                job.put(step)
                if job.cancelled.is_set():
                    break
            self.backend.synchronize()
        except Exception as err:  # reported to this request as a 500; the worker serves the next one
            log.exception("generation failed")
            job.put(err)


# ----------------------------------------------------------------------------- responses


@dataclass
class Outcome:
    """Counters of one completion, for ``usage`` and the ``medusa`` extension."""

    prompt_tokens: int
    completion_tokens: int = 0
    steps: int = 0
    accepted: int = 0
    finish_reason: Optional[str] = None
    started: float = field(default_factory=time.perf_counter)

    def add(self, step: Step) -> None:
        self.completion_tokens += len(step.tokens)
        self.steps += 1
        self.accepted += step.accepted

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def medusa(self) -> dict[str, Any]:
        return {"steps": self.steps, "accepted_tokens": self.accepted,
                "mean_accepted_length": round(self.completion_tokens / max(self.steps, 1), 4)}

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started
        return (f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"{self.medusa()['mean_accepted_length']} tokens/step, {elapsed:.2f} s latency (queueing included)")


async def _deltas(job: Job, text: TextStream, outcome: Outcome) -> AsyncIterator[str]:
    """Non-empty text deltas of a job; sets ``outcome.finish_reason`` when it ends."""
    try:
        async for step in job.steps():
            outcome.add(step)
            delta = text.push(step.tokens)
            if text.stopped:
                outcome.finish_reason = "stop"
            elif step.finish_reason:
                outcome.finish_reason = step.finish_reason
                delta += text.flush()
            if delta:
                yield delta
            if outcome.finish_reason:
                return
    finally:
        job.cancel()  # a stop string, or the client went away: the worker drops the rest


class Shape:
    """How one endpoint wraps text: ``chat.completion`` or ``text_completion`` objects."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def full(self, text: str, outcome: Outcome) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None}
        body = self._envelope("chat.completion" if self.chat else "text_completion",
                              dict(choice, finish_reason=outcome.finish_reason))
        return dict(body, usage=outcome.usage(), medusa=outcome.medusa())

    def chunk(self, delta: Optional[str], finish_reason: Optional[str] = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            content = {"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", choice)
        return self._envelope("text_completion", {"index": 0, "text": delta or "", "logprobs": None,
                                                  "finish_reason": finish_reason})

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", {})
        return dict(body, choices=[], usage=outcome.usage(), medusa=outcome.medusa())


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------- the app


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    defaults: GenerationConfig  # temperature, top_p, max_new_tokens, acceptance, medusa, stop ids, seed
    max_len: int
    template: Optional[str] = None
    log_stats: bool = False


def create_app(backend: Any, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving ``backend`` (loaded by the caller, used only by this app's worker)."""
    app = FastAPI(title="Jedusa OpenAI-compatible server")
    worker = Worker(backend)
    started = int(time.time())
    _install_error_handlers(app)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": config.model_id, "object": "model", "created": started, "owned_by": "jedusa",
                "jedusa": backend.describe()}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        ids = encode_prompt(backend.tokenizer, [m.as_message() for m in req.messages], config.template)
        return await _complete(req, ids, req.max_completion_tokens or req.max_tokens, Shape(True, config.model_id))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        return await _complete(req, list(backend.tokenizer.encode(prompt)), req.max_tokens, Shape(False, config.model_id))

    async def _complete(req: _Sampling, ids: list[int], max_tokens: Optional[int], shape: Shape) -> Any:
        _check_request(req, ids, config)
        cfg = _generation_config(req, max_tokens, config.defaults)
        outcome = Outcome(prompt_tokens=len(ids))
        deltas = _deltas(worker.submit(ids, cfg), TextStream(backend.tokenizer, req.stops()), outcome)
        try:  # the first delta carries any prefill or option error, while a status code can still be sent
            first = await anext(deltas, None)
        except Exception as err:
            return _generation_error(err).response()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(shape, first, deltas, outcome, include_usage),
                                     media_type="text/event-stream")
        try:
            text = (first or "") + "".join([d async for d in deltas])
        except Exception as err:
            return _generation_error(err).response()
        _log(outcome)
        return shape.full(text, outcome)

    async def _stream(shape: Shape, first: Optional[str], deltas: Any, outcome: Outcome,
                      include_usage: bool) -> AsyncIterator[str]:
        if shape.chat:
            yield _sse(shape.chunk(None, first=True))
        try:
            if first:
                yield _sse(shape.chunk(first))
            async for delta in deltas:
                yield _sse(shape.chunk(delta))
        except Exception as err:  # headers are gone: report in-band, as OpenAI does
            error = _generation_error(err)
            yield _sse({"error": {"message": error.message, "type": error.kind, "param": None, "code": None}})
            yield "data: [DONE]\n\n"
            return
        finally:
            await deltas.aclose()  # runs _deltas' cleanup now, also when the client has disconnected
        yield _sse(dict(shape.chunk(None, outcome.finish_reason), medusa=outcome.medusa()))
        if include_usage:
            yield _sse(shape.usage_chunk(outcome))
        yield "data: [DONE]\n\n"
        _log(outcome)

    def _log(outcome: Outcome) -> None:
        if config.log_stats:
            log.info("%s", outcome.summary())

    return app


def _check_request(req: _Sampling, ids: list[int], config: ServerConfig) -> None:
    if req.model != config.model_id:
        raise APIError(404, f"model {req.model!r} is not served here: use {config.model_id!r}", "model",
                       "model_not_found")
    param = "messages" if isinstance(req, ChatRequest) else "prompt"
    if not ids:
        raise APIError(400, "the prompt is empty", param)
    if len(ids) + 1 > config.max_len:
        raise APIError(400, f"the prompt has {len(ids)} tokens; the context of {config.max_len} tokens needs room for "
                            f"at least one new token: shorten it or restart the server with a larger --max-len",
                       param, "context_length_exceeded")


def _generation_config(req: _Sampling, max_tokens: Optional[int], defaults: GenerationConfig) -> GenerationConfig:
    changes: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                               "seed": req.seed}
    return defaults.with_(**{k: v for k, v in changes.items() if v is not None})


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        kind, msg = first.get("type"), str(first.get("msg", "")).removeprefix("Value error, ")
        if kind == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', msg)}",
                            code=kind).response()
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = f"Unrecognized request argument supplied: {param}" if kind == "extra_forbidden" else (
            f"{param}: {msg}" if param else msg)
        return APIError(400, message, param, kind).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        log.error("request failed: %s: %s", type(err).__name__, err)
        return APIError(500, f"{type(err).__name__}: {err}", kind="server_error").response()


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The chat CLI's model and decoding flags (decoding flags are request defaults) + server flags."""
    p = argparse.ArgumentParser(description="OpenAI-compatible Medusa server", parents=[chat_parser(None)],
                                add_help=False)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        backend = load_backend(args.backend, model=args.model, heads=args.medusa_heads, tree=args.tree,
                               dtype=args.dtype, device=args.device, max_len=args.max_len)
        defaults = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    top_p=args.top_p, acceptance=args.acceptance,
                                    posterior_threshold=args.posterior_threshold,
                                    posterior_alpha=args.posterior_alpha, medusa=not args.baseline, seed=args.seed,
                                    stop_token_ids=stop_token_ids(backend.tokenizer, args.conv_template))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    config = ServerConfig(args.served_model_name or args.model, defaults, args.max_len, args.conv_template, args.stats)
    log.info("serving %s", json.dumps(backend.describe()))
    uvicorn.run(create_app(backend, config), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
