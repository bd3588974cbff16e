"""Load test: ``python -m medusa.serve.loadtest --clients 1 4 16 64`` against a server on this machine.

N concurrent clients each send requests one after another from a fixed mix: chat completions,
streamed and not, text completions, streams the client abandons after the first token, and
malformed requests (a lone surrogate, broken JSON, an unknown field, ``max_tokens`` past the
context) that must come back 400.  A 429 is honoured: that client waits ``Retry-After`` seconds.
Each level stops by itself after ``--requests`` requests or ``--duration`` seconds (requests in
flight then get at most ``--timeout`` more seconds).

Printed per level: requests/s (every answered request), completion tokens/s, p50/p95/p99 latency of
successful completions, time to first token of successful streams, and outcomes other than success
by kind; the last line is the whole run as JSON.  Only loopback addresses are accepted: this is a
tool to measure one's own server, not to load someone else's.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence
from urllib.parse import urlsplit

import httpx

MIX = ("chat", "stream", "chat", "stream", "completion", "abandon", "stream", "malformed", "chat", "stream")
QUESTIONS = ("What is the capital of France?", "Name three colours.", "Give me a tip for sleeping well.",
             "What is 12 times 12?", "Write a haiku about the sea.")


@dataclass(frozen=True)
class Result:
    kind: str  # the request's place in MIX
    outcome: str  # "ok", "expected 400", "abandoned", or what went wrong ("429", "500", "timeout", ...)
    latency: float
    ttft: Optional[float] = None  # streams: seconds to the first text
    tokens: int = 0
    retry_after: float = 0.0


def loopback_only(url: str) -> None:
    """Raise ValueError unless every address ``url``'s host resolves to is a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except socket.gaierror as err:
        raise ValueError(f"cannot resolve {parts.hostname!r}: {err}") from None
    addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}
    if not all(a.is_loopback for a in addresses):
        raise ValueError(f"refusing {parts.hostname!r} ({', '.join(map(str, sorted(addresses, key=str)))}): "
                         f"the load test only targets a server on this machine (127.0.0.1, ::1, localhost)")


class Client:
    """One simulated user: requests one at a time until the level's budget or deadline is spent."""

    def __init__(self, http: httpx.AsyncClient, model: str, max_tokens: int) -> None:
        self.http, self.model, self.max_tokens = http, model, max_tokens

    async def send(self, kind: str, i: int) -> Result:
        start = time.perf_counter()
        try:
            if kind == "malformed":
                return await self._malformed(i, start)
            if kind in ("stream", "abandon"):
                return await self._stream(i, start, abandon=kind == "abandon")
            return await self._plain(kind, i, start)
        except httpx.TimeoutException:
            return Result(kind, "timeout", time.perf_counter() - start)
        except httpx.HTTPError as err:
            return Result(kind, f"connection: {type(err).__name__}", time.perf_counter() - start)

    def _body(self, i: int, chat: bool = True, **extra: Any) -> dict[str, Any]:
        question = QUESTIONS[i % len(QUESTIONS)]
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": 0, **extra}
        return dict(body, messages=[{"role": "user", "content": question}]) if chat else dict(body, prompt=question)

    async def _plain(self, kind: str, i: int, start: float) -> Result:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        resp = await self.http.post(path, json=self._body(i, chat=kind == "chat"))
        latency = time.perf_counter() - start
        if resp.status_code != 200:
            return _refused(kind, resp, latency)
        return Result(kind, "ok", latency, tokens=resp.json()["usage"]["completion_tokens"])

    async def _stream(self, i: int, start: float, abandon: bool) -> Result:
        kind = "abandon" if abandon else "stream"
        body = self._body(i, stream=True, stream_options={"include_usage": True})
        ttft, tokens = None, 0
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return _refused(kind, resp, time.perf_counter() - start)
            async for line in resp.aiter_lines():
                event = line[6:] if line.startswith("data: ") else None
                if event is None or event == "[DONE]":
                    continue
                chunk = json.loads(event)
                if "error" in chunk:
                    return Result(kind, "error event", time.perf_counter() - start, ttft)
                if ttft is None and any(c["delta"].get("content") for c in chunk["choices"]):
                    ttft = time.perf_counter() - start
                    if abandon:  # leaving the block closes the connection mid-stream
                        return Result(kind, "abandoned", ttft, ttft)
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
        return Result(kind, "ok", time.perf_counter() - start, ttft, tokens)

    async def _malformed(self, i: int, start: float) -> Result:
        bad = [json.dumps(dict(self._body(i), messages=[{"role": "user", "content": "\ud800"}])),
               '{"model": ' + json.dumps(self.model) + ', "messages": [',
               json.dumps(self._body(i, frequency_penalty_typo=1)),
               json.dumps(self._body(i, max_tokens=10**9))][(i // len(MIX)) % 4]
        resp = await self.http.post("/v1/chat/completions", content=bad, headers={"Content-Type": "application/json"})
        latency = time.perf_counter() - start
        return Result("malformed", "expected 400" if resp.status_code == 400 else f"malformed got {resp.status_code}",
                      latency)


def _refused(kind: str, resp: httpx.Response, latency: float) -> Result:
    retry = resp.headers.get("Retry-After", "0")
    return Result(kind, str(resp.status_code), latency, retry_after=float(retry) if retry.isdigit() else 0.0)


async def run_level(url: str, model: str, clients: int, requests: int, duration: float, max_tokens: int,
                    timeout: float, api_key: Optional[str]) -> dict[str, Any]:
    """``clients`` concurrent clients until ``requests`` are sent or ``duration`` seconds have passed."""
    results: list[Result] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + duration
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as http:
        async def user() -> None:
            nonlocal issued
            client = Client(http, model, max_tokens)
            while issued < requests and time.perf_counter() < deadline:
                i, issued = issued, issued + 1
                result = await client.send(MIX[i % len(MIX)], i)
                results.append(result)
                if result.retry_after:  # a 429: wait as told, but not past the deadline
                    await asyncio.sleep(min(result.retry_after, max(0.0, deadline - time.perf_counter())))

        await asyncio.wait_for(asyncio.gather(*(user() for _ in range(clients))), duration + timeout + 5)
    return summarise(clients, results, time.perf_counter() - start)


def percentile(values: Sequence[float], q: float) -> Optional[float]:
    """The q-th percentile (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarise(clients: int, results: list[Result], elapsed: float) -> dict[str, Any]:
    ok = [r for r in results if r.outcome == "ok"]
    ttfts = [r.ttft for r in ok if r.ttft is not None]

    def ms(values: Sequence[float], q: float) -> Optional[float]:
        p = percentile(values, q)
        return None if p is None else round(p * 1000, 1)

    outcomes = Counter(r.outcome for r in results if r.outcome != "ok")
    return {"clients": clients, "requests": len(results), "ok": len(ok), "seconds": round(elapsed, 2),
            "requests_per_s": round(len(results) / elapsed, 2),
            "tokens_per_s": round(sum(r.tokens for r in ok) / elapsed, 1),
            "latency_ms": {f"p{q}": ms([r.latency for r in ok], q) for q in (50, 95, 99)},
            "ttft_ms": {f"p{q}": ms(ttfts, q) for q in (50, 95, 99)},
            "other_outcomes": dict(sorted(outcomes.items()))}


def table(levels: list[dict[str, Any]]) -> str:
    head = "| clients | requests | ok | req/s | tok/s | p50 ms | p95 ms | p99 ms | TTFT p50 ms | TTFT p95 ms | other outcomes |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for lv in levels:
        lat, ttft = lv["latency_ms"], lv["ttft_ms"]
        other = ", ".join(f"{k}: {v}" for k, v in lv["other_outcomes"].items()) or "-"
        cells = [lv["clients"], lv["requests"], lv["ok"], lv["requests_per_s"], lv["tokens_per_s"], lat["p50"],
                 lat["p95"], lat["p99"], ttft["p50"], ttft["p95"], other]
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m medusa.serve.loadtest", description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback addresses only)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64], help="concurrency levels, run in turn")
    p.add_argument("--requests", type=int, default=200, help="requests per level at most")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per level at most")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    return p


async def _served_model(url: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, timeout=10, headers=headers) as http:
        resp = await http.get("/v1/models")
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = args.model or await _served_model(args.url, args.api_key)
    levels = []
    for n in args.clients:
        levels.append(await run_level(args.url, model, n, args.requests, args.duration, args.max_tokens,
                                      args.timeout, args.api_key))
        print(f"{n} clients: {levels[-1]['requests']} requests in {levels[-1]['seconds']} s", file=sys.stderr)
    return levels


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.duration <= 0 or args.max_tokens < 1:
        parser.error("--clients, --requests, --duration and --max-tokens must be positive")
    try:
        loopback_only(args.url)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        levels = asyncio.run(_run(args))
    except httpx.HTTPError as err:
        print(f"error: no server answering at {args.url}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(table(levels))
    print(json.dumps({"url": args.url, "max_tokens": args.max_tokens, "mix": list(MIX), "levels": levels}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
