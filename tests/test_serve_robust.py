"""The server against unfriendly clients (issue 13): a live uvicorn on a free loopback port, a real
HTTP client, and scripted backends whose steps the test releases one at a time, so that "within one
decoding step" is checked by counting steps, not by timing them."""
from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import httpx
import pytest

from medusa.core.config import GenerationConfig
from medusa.core.engine import Step
from medusa.serve import ServerConfig, create_app

from .test_serve import MODEL, CharTokenizer, ScriptedBackend

JSON = {"Content-Type": "application/json"}


@contextmanager
def live_server(backend, max_len: int = 64, **options) -> Iterator[str]:
    """``backend`` served by uvicorn on a free loopback port, in a thread; yields the base URL."""
    import uvicorn

    config = ServerConfig(MODEL, GenerationConfig(max_new_tokens=32, stop_token_ids=(0,)), max_len=max_len, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(backend, config), log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server has started")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        if hasattr(backend, "open"):
            backend.open()  # never leave the worker blocked on a test's gate
        server.should_exit = True
        thread.join(timeout=10)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.01)


class SteppedBackend(ScriptedBackend):
    """Emits "a", one token per step, up to max_new_tokens; while gated, each step waits for a permit."""

    def __init__(self) -> None:
        super().__init__()
        self.permits = threading.Semaphore(0)
        self.gated = True
        self.steps = self.calls = self.closed = 0

    def allow(self, n: int) -> None:
        self.permits.release(n)

    def open(self) -> None:
        self.gated = False
        self.permits.release(100)

    def generate(self, ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
        self.configs.append(cfg)
        self.calls += 1
        return self._endless(cfg.max_new_tokens)

    def _endless(self, n: int) -> Iterator[Step]:
        try:
            for i in range(n):
                if self.gated and not self.permits.acquire(timeout=30):
                    raise TimeoutError("the test never released this step")
                self.steps += 1
                yield Step((ord("a"),), 0, "length" if i == n - 1 else None)
        finally:
            self.closed += 1


def active_requests(url: str) -> Optional[int]:
    resp = httpx.get(f"{url}/health")
    return resp.json()["active_requests"] if resp.status_code == 200 else None


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket, so the test can hang up without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def _read_json(sock: socket.socket) -> dict:
    """The JSON body of the response to a ``_raw_post``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return json.loads(body)


def _assert_openai_error(resp: httpx.Response, status: int, code: Optional[str] = None) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# ----------------------------------------------------------------------------- abusive clients


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_the_worker_within_one_step(stream):
    backend = SteppedBackend()
    with live_server(backend, max_len=10**9 + 64) as url:
        sock = _raw_post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9, "stream": stream})
        backend.allow(2)
        wait_until(lambda: backend.steps == 2, "two steps of the long request ran")
        sock.close()
        wait_until(lambda: active_requests(url) == 0, "the server noticed the client has gone")
        backend.allow(1)  # the step the worker was in when the client left
        wait_until(lambda: backend.closed == 1, "the long generation was stopped")
        assert backend.steps == 3  # not one step more
        backend.open()
        after = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=30)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == "aaaa"
        assert backend.calls == 2


def test_a_request_whose_client_left_while_queued_never_runs():
    backend = SteppedBackend()
    with live_server(backend) as url:
        running = _raw_post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2})
        wait_until(lambda: backend.calls == 1, "the first request is generating")
        queued = _raw_post(url, "/v1/completions", {"model": MODEL, "prompt": "y", "max_tokens": 2})
        wait_until(lambda: active_requests(url) == 2, "the second request waits in the queue")
        queued.close()
        wait_until(lambda: active_requests(url) == 1, "the server noticed the queued client has gone")
        backend.open()
        assert _read_json(running)["choices"][0]["text"] == "aa"
        running.close()
        after = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "z", "max_tokens": 1}, timeout=30)
        assert after.status_code == 200
    assert [c.max_new_tokens for c in backend.configs] == [2, 1]  # the abandoned request was skipped


def test_a_full_queue_answers_429_with_retry_after():
    backend = SteppedBackend()
    results: list[httpx.Response] = []

    def ask() -> None:
        results.append(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                                  timeout=60))

    with live_server(backend, max_queue=2) as url:
        clients = [threading.Thread(target=ask) for _ in range(6)]
        for c in clients:
            c.start()
        wait_until(lambda: len(results) == 3, "three requests were turned away")  # one running + two waiting
        for resp in results:
            _assert_openai_error(resp, 429, "queue_full")
            assert int(resp.headers["Retry-After"]) >= 1
        backend.open()
        for c in clients:
            c.join(timeout=60)
    assert sorted(r.status_code for r in results) == [200, 200, 200, 429, 429, 429]
    assert [r.json()["choices"][0]["text"] for r in results if r.status_code == 200] == ["aa"] * 3


def test_a_huge_body_is_413_and_other_endpoints_keep_answering():
    body = json.dumps({"model": MODEL, "prompt": "x" * 20_000_000}).encode()
    with live_server(ScriptedBackend(), max_body_bytes=1 << 20) as url:
        declared = httpx.post(f"{url}/v1/completions", content=body, headers=JSON, timeout=60)
        error = _assert_openai_error(declared, 413, "request_too_large")
        assert "--max-body-mb" in error["message"]
        answered: list[int] = []

        def chunked() -> Iterator[bytes]:  # no Content-Length: the server has to count
            size = 1 << 18
            for i in range(0, len(body), size):
                if i == size:  # the body is in flight: the server answers others meanwhile
                    answered.append(httpx.get(f"{url}/v1/models", timeout=10).status_code)
                yield body[i:i + size]

        _assert_openai_error(httpx.post(f"{url}/v1/completions", content=chunked(), headers=JSON, timeout=60), 413)
        assert answered == [200]
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200


class GatedTokenizer(CharTokenizer):
    """Blocks in ``encode`` or ``decode`` (``which``) until the test opens ``gate``."""

    def __init__(self, which: str) -> None:
        self.which, self.gate, self.entered = which, threading.Event(), threading.Event()

    def _wait(self, which: str) -> None:
        if self.which == which:
            self.entered.set()
            assert self.gate.wait(timeout=30), "the test never opened the tokenizer gate"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._wait("encode")
        return super().encode(text, add_special_tokens)

    def decode(self, ids: list[int], **kwargs) -> str:
        self._wait("decode")
        return super().decode(ids, **kwargs)


@pytest.mark.parametrize("which", ["encode", "decode"])
def test_tokenising_runs_off_the_event_loop(which):
    backend = ScriptedBackend()
    backend.tokenizer = tokenizer = GatedTokenizer(which)
    with live_server(backend) as url:
        done: list[httpx.Response] = []
        request = threading.Thread(target=lambda: done.append(
            httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=60)))
        request.start()
        assert tokenizer.entered.wait(timeout=20)
        try:  # the tokenizer is busy with that request; the event loop is not
            assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200
            assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        finally:
            tokenizer.gate.set()
            request.join(timeout=30)
    assert done[0].status_code == 200


# ----------------------------------------------------------------------------- bad input


def test_max_tokens_past_the_context_is_400():
    backend = ScriptedBackend("b" * 100)
    with live_server(backend, max_len=64) as url:
        def ask(**fields) -> httpx.Response:
            return httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", **fields})

        error = _assert_openai_error(ask(max_tokens=10**9), 400, "context_length_exceeded")
        assert error["param"] == "max_tokens" and "at most 63" in error["message"]
        _assert_openai_error(ask(max_tokens=64), 400, "context_length_exceeded")
        assert ask(max_tokens=63).status_code == 200  # prompt (1) + completion (63) = the context
        longer = _assert_openai_error(ask(prompt="x" * 10, max_tokens=60), 400, "context_length_exceeded")
        assert "at most 54" in longer["message"]
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**9})
        assert _assert_openai_error(chat, 400, "context_length_exceeded")["param"] == "max_completion_tokens"
        assert ask().status_code == 200 and backend.configs[-1].max_new_tokens == 32  # the server's default


SURROGATE = "\ud800"
MALFORMED = {  # each of these was a 500 (the tokenizer's TypeError) or a 200 that a real backend fails on
    "lone surrogate in a message": json.dumps({"model": MODEL, "messages": [{"role": "user", "content": SURROGATE}]}),
    "lone surrogate in a text part": json.dumps({"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a" + SURROGATE}]}]}),
    "lone surrogate in a prompt": json.dumps({"model": MODEL, "prompt": "a\udfff"}),
    "lone surrogate in a stop string": json.dumps({"model": MODEL, "prompt": "a", "stop": [SURROGATE]}),
    "a negative seed": json.dumps({"model": MODEL, "prompt": "a", "seed": -1}),  # numpy's default_rng refuses it
    "a seed past 64 bits": json.dumps({"model": MODEL, "prompt": "a", "seed": 2**64}),  # torch's manual_seed too
}
STILL_MALFORMED = {  # already 400s before the rewrite of the error handler, kept so
    "lone surrogate as a field name": json.dumps({"model": MODEL, "prompt": "a", SURROGATE: 1}),
    "invalid UTF-8": b'{"model": "scripted", "prompt": "\xff\xfe"}',
    "NaN temperature": '{"model": "scripted", "prompt": "a", "temperature": NaN}',
    "a list body": "[]",
    "a null body": "null",
    "an empty body": "",
    "deeply nested JSON": "[" * 100_000,
    "a 5000-digit max_tokens": '{"model": "scripted", "prompt": "a", "max_tokens": ' + "9" * 5000 + "}",
    "a null message": json.dumps({"model": MODEL, "messages": [None]}),
    "two prompts": json.dumps({"model": MODEL, "prompt": ["a", "b"]}),
}


def _post_malformed(body) -> dict:
    path = "/v1/chat/completions" if "messages" in str(body) else "/v1/completions"
    with live_server(ScriptedBackend()) as url:
        error = _assert_openai_error(httpx.post(f"{url}{path}", content=body, headers=JSON), 400)
        assert httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 200
    return error


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_is_400_never_500(name):
    error = _post_malformed(MALFORMED[name])
    if "surrogate" in name:  # the message says which field and what is wrong with it
        assert "lone surrogate" in error["message"] and error["param"] in error["message"]


@pytest.mark.parametrize("name", list(STILL_MALFORMED))
def test_other_malformed_input_stays_400(name):
    _post_malformed(STILL_MALFORMED[name])


def test_deeply_nested_json_is_400_even_after_a_library_raised_the_recursion_limit():
    """Jittor, Gradio and torch._dynamo set Python's recursion limit to 10^6 on import; with it, a
    deeply nested body overflowed the C stack and killed the whole server (a segfault)."""
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1_000_000)
    try:
        _post_malformed("[" * 100_000)
    finally:
        sys.setrecursionlimit(limit)


def test_a_vanishing_temperature_is_greedy():
    backend = ScriptedBackend()
    with live_server(backend) as url:
        resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "a", "temperature": 1e-300})
    assert resp.status_code == 200 and backend.configs[-1].temperature == 0.0  # 1e-300 would overflow the logits


# ----------------------------------------------------------------------------- what the server tells


def test_api_key_is_required_when_set():
    import openai

    with live_server(ScriptedBackend(), api_key="sekret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            _assert_openai_error(httpx.get(f"{url}/v1/models", headers=headers), 401, "invalid_api_key")
            _assert_openai_error(httpx.post(f"{url}/v1/completions", headers=headers,
                                            json={"model": MODEL, "prompt": "a"}), 401, "invalid_api_key")
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert client.completions.create(model=MODEL, prompt="a", max_tokens=5).choices[0].text == "Hello"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0).models.list()


def test_models_and_errors_name_no_server_path(tmp_path):
    backend = ScriptedBackend()
    heads = tmp_path / "my-heads"
    backend.describe = lambda: {"backend": "scripted", "model": "smollm2-135m", "heads": str(heads),
                                "tree": str(tmp_path / "tree-torch.json"), "tree_nodes": 42}
    with live_server(backend) as url:
        resp = httpx.get(f"{url}/v1/models")
    assert resp.status_code == 200 and str(tmp_path) not in resp.text
    card = resp.json()["data"][0]
    assert card["id"] == MODEL and card["jedusa"]["heads"] == "my-heads" and card["jedusa"]["tree_nodes"] == 42


class FailingBackend(ScriptedBackend):
    """Fails after ``after`` steps of its first generation, as a device or disk error would."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.failed = after, False

    def generate(self, ids, cfg):
        steps = super().generate(ids, cfg)
        if self.failed:
            return steps
        self.failed = True
        return self._fail(steps)

    def _fail(self, steps: Iterator[Step]) -> Iterator[Step]:
        for i, step in enumerate(steps):
            if i == self.after:
                raise OSError("read error in /srv/models/heads/medusa_lm_head.safetensors")
            yield step


def test_an_error_mid_stream_is_an_error_event_then_done():
    with live_server(FailingBackend(after=2)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}) as resp:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hell"
        error = chunks[-1]["error"]
        assert error["type"] == "server_error" and "OSError" in error["message"] and "/srv" not in error["message"]
        again = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}]})
        assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "Hello world. Bye."


def test_health():
    backend = SteppedBackend()
    with live_server(backend, max_queue=3) as url:
        assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": MODEL, "active_requests": 0,
                                                       "max_active_requests": 4}
        pending = threading.Thread(target=lambda: httpx.post(
            f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30))
        pending.start()
        wait_until(lambda: active_requests(url) == 1, "the request is counted")
        backend.open()
        pending.join(timeout=30)
        assert active_requests(url) == 0
