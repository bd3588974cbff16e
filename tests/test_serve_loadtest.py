"""The load test drives a live server (scripted backend) and stops by itself; it refuses other hosts."""
from __future__ import annotations

import json

import httpx
import pytest

from medusa.serve import loadtest

from .test_serve import ScriptedBackend
from .test_serve_robust import live_server


@pytest.mark.parametrize("url", ["http://192.0.2.1:8000", "http://10.1.2.3", "ftp://127.0.0.1/"])
def test_only_loopback_servers_are_loaded(url, capsys):
    assert loadtest.main(["--url", url, "--clients", "1", "--requests", "1"]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_short_run_reports_every_request(capsys):
    with live_server(ScriptedBackend(), max_len=128, max_queue=1) as url:
        assert loadtest.main(["--url", url, "--clients", "1", "4", "--requests", "20", "--duration", "30",
                              "--max-tokens", "8"]) == 0
        assert httpx.get(f"{url}/health").json()["active_requests"] == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| clients |") and len(out) == 2 + 2 + 1  # header, rule, two levels, JSON
    one, four = json.loads(out[-1])["levels"]
    assert (one["clients"], one["requests"], four["requests"]) == (1, 20, 20)
    assert one["other_outcomes"] == {"abandoned": 2, "expected 400": 2}  # nothing failed when alone
    assert one["ok"] == 16 and one["latency_ms"]["p50"] <= one["latency_ms"]["p99"] and one["ttft_ms"]["p50"]
    assert set(four["other_outcomes"]) <= {"abandoned", "expected 400", "429"}  # queue of 1: some 429s, no 5xx
    assert four["ok"] + sum(four["other_outcomes"].values()) == 20


def test_percentiles():
    assert loadtest.percentile([], 50) is None
    assert loadtest.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert loadtest.percentile([0.0, 10.0], 95) == pytest.approx(9.5)
