"""What goes over the wire: request models, OpenAI-shaped errors and response objects.

Requests are our own pydantic models with ``extra="forbid"`` (a field we do not implement is
rejected, not silently ignored); every string in them must be valid Unicode, so a lone surrogate
(``"\\ud800"``, legal in JSON, not encodable as UTF-8) is a 400 here rather than a crash in the
tokenizer.  Responses are built from ``openai.types`` (the objects the official client parses) and
dumped with ``exclude_unset`` so that only the fields we fill appear, plus our ``medusa`` extension.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

from fastapi.responses import JSONResponse
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from ..core.engine import Step

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed and numpy's default_rng both take [0, 2**63)


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone surrogate ({text[err.start]!a} at character {err.start}): "
                         f"send valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart]]
    name: Optional[Text] = None

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class Sampling(_Strict):
    """The fields both endpoints share."""

    model: Text
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[Text, list[Text]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    user: Optional[Text] = None

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

    def requested_tokens(self) -> Optional[int]:
        return self.max_tokens


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def requested_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(Sampling):
    prompt: Union[Text, list[Text]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("only one prompt per request is supported")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ----------------------------------------------------------------------------- errors


def _printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot carry (a client's lone surrogate echoed back) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(HTTPException):
    """An error the client sees as ``{"error": {...}}`` with this HTTP status.

    A starlette ``HTTPException``, so FastAPI passes it through unchanged even when it is raised
    while the request body is being read (the body-size guard does that)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(status, _printable(message), headers)
        self.status, self.message, self.kind = status, _printable(message), kind
        self.param = _printable(param) if param is not None else None
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def server_error(err: BaseException) -> APIError:
    """A failure inside the server: the class name only, since messages can carry server paths."""
    return APIError(500, f"the server failed ({type(err).__name__}); its log has the details", kind="server_error")


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

    def add(self, step: Step, finish_reason: Optional[str]) -> None:
        self.completion_tokens += len(step.tokens)
        self.steps += 1
        self.accepted += step.accepted
        self.finish_reason = finish_reason

    def usage(self) -> CompletionUsage:
        return CompletionUsage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                               total_tokens=self.prompt_tokens + self.completion_tokens)

    def medusa(self) -> dict[str, Any]:
        """Tokens per decoding step is the paper's τ (1.0 for the baseline), counted as ``my_judge`` does."""
        return {"steps": self.steps, "accepted_tokens": self.accepted,
                "mean_accepted_length": round(self.completion_tokens / max(self.steps, 1), 4)}

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started
        return (f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens, "
                f"{self.medusa()['mean_accepted_length']} tokens/step, {elapsed:.2f} s latency (queueing included)")


def _dump(obj: BaseModel) -> dict[str, Any]:
    return obj.model_dump(mode="json", exclude_unset=True)


class Shape:
    """How one endpoint wraps text: ``chat.completion`` or ``text_completion`` objects."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "created": self.created, "model": self.model}

    def full(self, text: str, outcome: Outcome) -> dict[str, Any]:
        extra = {"usage": outcome.usage(), "medusa": outcome.medusa()}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
            return _dump(ChatCompletion(**self._head(), object="chat.completion", choices=[choice], **extra))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return _dump(Completion(**self._head(), object="text_completion", choices=[choice], **extra))

    def chunk(self, delta: Optional[str], finish_reason: Optional[str] = None, first: bool = False,
              **extra: Any) -> dict[str, Any]:
        if self.chat:
            content = {"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
            return _dump(ChatCompletionChunk(**self._head(), object="chat.completion.chunk", choices=[choice],
                                             **extra))
        # Not a ``Completion``: its type requires a finish_reason, which a streamed chunk lacks until the end.
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
        return dict(self._head(), object="text_completion", choices=[choice], **extra)

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        kind = ChatCompletionChunk if self.chat else Completion
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _dump(kind(**self._head(), object=obj, choices=[], usage=outcome.usage(), medusa=outcome.medusa()))


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as JSON (``[DONE]`` is sent as the bare string)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
