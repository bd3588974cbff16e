"""The OpenAI-compatible server: protocol and errors on a scripted backend (fast), then the official
``openai`` client against uvicorn serving the embedded SmolLM2 (slow)."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import pytest
from fastapi.testclient import TestClient

from medusa.core.backends import BackendError
from medusa.core.config import GenerationConfig
from medusa.core.engine import Step
from medusa.core.prompts import encode_prompt, stop_token_ids
from medusa.core.text import TextStream
from medusa.serve import ServerConfig, create_app

MODEL = "scripted"


class CharTokenizer:
    """One token per character (id = code point); id 0 is EOS.  Like Hugging Face's fast tokenizers,
    it refuses text that is not valid Unicode (a lone surrogate) with a TypeError."""

    eos_token_id = 0
    chat_template = "role: content lines"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(chr(i) for i in ids if i)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class ScriptedBackend:
    """Answers every prompt with ``reply`` + EOS, two tokens per step; ``fail`` is raised by the next call."""

    name = "scripted"

    def __init__(self, reply: str = "Hello world. Bye.") -> None:
        self.tokenizer, self.reply = CharTokenizer(), reply
        self.fail: Optional[Exception] = None
        self.configs: list[GenerationConfig] = []

    def generate(self, ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
        self.configs.append(cfg)
        if self.fail is not None:
            err, self.fail = self.fail, None
            raise err
        return self._steps(([ord(c) for c in self.reply] + [0])[: cfg.max_new_tokens])

    @staticmethod
    def _steps(out: list[int]) -> Iterator[Step]:
        for i in range(0, len(out), 2):
            chunk = tuple(out[i:i + 2])
            last = i + 2 >= len(out)
            yield Step(chunk, len(chunk) - 1, ("stop" if chunk[-1] == 0 else "length") if last else None)

    def synchronize(self) -> None:
        pass

    def describe(self) -> dict:
        return {"backend": self.name}


@pytest.fixture()
def scripted():
    backend = ScriptedBackend()
    config = ServerConfig(MODEL, GenerationConfig(max_new_tokens=32, stop_token_ids=(0,)), max_len=64)
    with TestClient(create_app(backend, config)) as client:
        yield backend, client


def _chat(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_text_stream_holds_back_possible_stop_strings():
    text = TextStream(CharTokenizer(), stop=["world", "!!"])
    assert text.push([ord(c) for c in "Hello wo"]) == "Hello "  # "wo" may begin "world"
    assert text.push([ord(c) for c in "r"]) == ""
    assert text.push([ord(c) for c in "ld and more"]) == "" and text.stopped
    assert text.text == "Hello "
    other = TextStream(CharTokenizer(), stop=["world"])
    assert other.push([ord(c) for c in "a wor"]) == "a " and other.push([ord(c) for c in "dy"]) == "wordy"
    plain = TextStream(CharTokenizer())
    assert plain.push([72, 105]) == "Hi" and plain.flush() == ""


def test_chat_and_completion_shapes(scripted):
    backend, client = scripted
    body = client.post("/v1/chat/completions", json=_chat(max_tokens=40)).json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world. Bye."}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": len("user: hi\nassistant: "), "completion_tokens": 18, "total_tokens": 38}
    assert body["medusa"] == {"steps": 9, "accepted_tokens": 9, "mean_accepted_length": 2.0}
    done = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5}).json()
    assert done["object"] == "text_completion"
    assert done["choices"][0]["text"] == "Hello" and done["choices"][0]["finish_reason"] == "length"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_request_options_reach_the_engine(scripted):
    backend, client = scripted
    client.post("/v1/chat/completions", json=_chat(temperature=0.7, top_p=0.9, seed=3, max_completion_tokens=7))
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    asked, default = backend.configs
    assert (asked.temperature, asked.top_p, asked.seed, asked.max_new_tokens) == (0.7, 0.9, 3, 7)
    assert (default.temperature, default.top_p, default.max_new_tokens) == (0.0, 1.0, 32)
    assert default.stop_token_ids == (0,)


def test_stop_strings_are_cut_at_the_text_edge(scripted):
    _, client = scripted
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": ["world", "zzz"]}).json()
    assert body["choices"][0]["text"] == "Hello " and body["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True, stop=". B")) as resp:
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["medusa"]["steps"] >= 1


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL}, "messages"),
    (_chat(max_tokens=0), "max_tokens"),
    (_chat(temperature=3), "temperature"),
    (_chat(top_p=0), "top_p"),
    (_chat(n=2), "n"),
    (_chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    (_chat(frequency_penalty=0.5), "frequency_penalty"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": []}, "messages"),
])
def test_invalid_requests_are_400_with_an_openai_error(scripted, body, param):
    _, client = scripted
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_other_errors(scripted):
    backend, client = scripted
    bad_json = client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    too_long = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 64})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    wrong_model = client.post("/v1/chat/completions", json=dict(_chat(), model="gpt-4"))
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    backend.fail = BackendError("backend 'scripted' does not support top_p < 1")
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 400


def test_generation_errors_are_500_and_the_server_keeps_serving(scripted):
    backend, client = scripted
    backend.fail = RuntimeError("device lost reading /srv/models/heads.safetensors")
    resp = client.post("/v1/chat/completions", json=_chat())
    assert resp.status_code == 500
    error = resp.json()["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert "/srv" not in error["message"]  # exception texts stay in the server log: they can name server paths
    assert client.post("/v1/chat/completions", json=_chat()).status_code == 200


# ----------------------------------------------------------------------------- the real model, the real client


@pytest.fixture(scope="module")
def smol_server(smol_backend) -> Iterator[str]:
    import uvicorn

    tok = smol_backend.tokenizer
    config = ServerConfig("smollm2-135m", GenerationConfig(max_new_tokens=16, stop_token_ids=stop_token_ids(tok)),
                          max_len=smol_backend.decoder.max_len)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(smol_backend, config), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(smol_server):
    import openai

    return openai.OpenAI(base_url=smol_server, api_key="unused", max_retries=0)


def _greedy_reference(backend, messages: list[dict], max_tokens: int) -> str:
    ids = encode_prompt(backend.tokenizer, messages)
    cfg = GenerationConfig(max_new_tokens=max_tokens, stop_token_ids=stop_token_ids(backend.tokenizer))
    out = [t for step in backend.generate(ids, cfg) for t in step.tokens]
    return backend.tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_openai_chat_and_streaming(client, smol_backend):
    resp = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=12, temperature=0)
    text = resp.choices[0].message.content
    assert text == _greedy_reference(smol_backend, QUESTION, 12) and "Paris" in text
    assert 0 < resp.usage.completion_tokens <= 12
    medusa = resp.model_extra["medusa"]
    assert medusa["accepted_tokens"] > 0 and medusa["steps"] < resp.usage.completion_tokens  # the heads were used
    stream = client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


@pytest.mark.slow
def test_openai_completions_with_stop(client):
    resp = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=12,
                                     temperature=0, stop=["."])
    assert "Paris" in resp.choices[0].text and "." not in resp.choices[0].text
    assert resp.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=12,
                                         temperature=0, stop=["."], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == resp.choices[0].text


@pytest.mark.slow
def test_openai_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-135m", messages=QUESTION, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m", messages=QUESTION, extra_body={"bogus": 1})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)


@pytest.mark.slow
def test_concurrent_requests_are_queued_not_mixed(client):
    questions = [[{"role": "user", "content": q}] for q in ("Name a color.", "What is 2+2?")]

    def ask(messages: list[dict]) -> str:
        return client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=10,
                                              temperature=0).choices[0].message.content

    alone = [ask(q) for q in questions]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone and all(together)
