"""The Gradio comparison app: interleaving, per-arm clocks and highlighting on scripted backends
(fast), then a real browser (Debian's chromium through Playwright) driving ``app.py`` on the
embedded model (slow).

Set ``JEDUSA_UPDATE_SCREENSHOT=1`` to also rewrite ``assets/app_screenshot.png`` (the README's
screenshot) from the browser test; ``JEDUSA_ARTIFACTS=DIR`` keeps the test's own screenshot there.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import app
from medusa.core.options import RunOptions

from .test_serve import ScriptedBackend

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Give me three tips for staying healthy."


class ScriptedClock:
    """A clock that moves only when a backend says its step took time: timings are exact, not slept."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedBackend(ScriptedBackend):
    """A scripted backend whose every step takes ``delay`` seconds of ``clock``; remembers its prompts."""

    def __init__(self, clock: ScriptedClock, delay: float) -> None:
        super().__init__()
        self.clock, self.delay, self.prompts = clock, delay, []

    def generate(self, ids, cfg):
        self.prompts.append(self.tokenizer.decode(ids))
        for step in super().generate(ids, cfg):
            self.clock.now += self.delay
            yield step


class StubModels:
    def __init__(self) -> None:
        self.clock = ScriptedClock()
        self.arms = {"baseline": TimedBackend(self.clock, 0.03), "medusa": TimedBackend(self.clock, 0.01)}

    def get(self, backend: str, arm: str, tree):
        return self.arms[arm]


OPTS = RunOptions(seed=0)


def _run(models, prompt: str, chat: bool, conversation=None) -> list[tuple]:
    return list(app.compare(models, OPTS, prompt, "torch", 64, 0.0, app.HEADS_TREE, chat, conversation,
                            clock=models.clock))


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_each_arm_is_timed_on_its_own_compute():
    frames = _run(StubModels(), "hi", chat=False)
    pane_b, pane_m, stats_b, stats_m, summary, conversation, _ = frames[-1]
    assert _text(pane_b) == _text(pane_m) == "hiHello world. Bye."
    seconds = {arm: float(re.search(r"· ([\d.]+) s ·", s).group(1)) for arm, s in (("b", stats_b), ("m", stats_m))}
    assert seconds == {"b": 0.27, "m": 0.09}  # 9 steps x 30 ms, not charged for the Medusa arm's 9 x 10 ms
    assert "Speed-up: 3.00x" in summary and "tokens/s" in stats_m
    assert conversation is None  # single-turn mode keeps no history


def test_chat_mode_gives_each_arm_its_own_history():
    models = StubModels()
    *_, conversation, box = _run(models, "first", chat=True)[-1]
    assert box == "" and [t["user"] for t in conversation["medusa"]] == ["first"]
    pane_b, pane_m, *_, conversation, _ = _run(models, "second", chat=True, conversation=conversation)[-1]
    assert _text(pane_m) == "firstHello world. Bye.secondHello world. Bye." and len(conversation["baseline"]) == 2
    assert models.arms["medusa"].prompts[-1] == (
        "user: first\nassistant: Hello world. Bye.\nuser: second\nassistant: ")


def test_empty_prompt_is_refused():
    import gradio as gr

    with pytest.raises(gr.Error):
        _run(StubModels(), "  ", chat=False)


def test_multi_token_steps_alternate_colours():
    out = app.render_answer([("a", 1), ("bc", 2), ("<d>", 3), ("e", 1), ("fg", 2)])
    assert re.findall(r'class="(acc\d)"', out) == ["acc0", "acc1", "acc0"]
    assert "&lt;d&gt;" in out and out.startswith("a<span")


# ----------------------------------------------------------------------------- the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture()
def app_url(tmp_path):
    port, log = _free_port(), tmp_path / "app.log"
    max_new = "96" if os.environ.get("JEDUSA_UPDATE_SCREENSHOT") else "48"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), "--max-new-tokens", max_new],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_for_http(url, proc, log, timeout=300)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_browser_comparison(app_url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("JEDUSA_ARTIFACTS") or tmp_path / "artifacts")
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        page.locator("#prompt textarea").fill(PROMPT)
        page.locator("#compare").click()
        page.locator("#medusa-stats").get_by_text("generating").wait_for(timeout=120_000)  # it streams
        page.locator("#summary").get_by_text("Speed-up").wait_for(timeout=300_000)
        for arm in app.ARMS:
            answer = page.locator(f"#{arm}-pane .bot").inner_text()
            assert len(answer.split()) >= 5, f"{arm} pane: {answer!r}"
            assert re.search(r"\d+\.\d tokens/s", page.locator(f"#{arm}-stats").inner_text())
        assert page.locator("#medusa-pane .acc0").count() > 0  # multi-token steps are highlighted
        page.screenshot(path=str(artifacts / "app_comparison.png"), full_page=True)
        if os.environ.get("JEDUSA_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(REPO / "assets" / "app_screenshot.png"), full_page=True)
        browser.close()
