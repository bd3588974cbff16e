"""Baseline and Medusa side by side in the browser: ``python app.py`` (Gradio, http://127.0.0.1:7860).

A speed-up is easiest to judge when both decoders answer the same prompt next to each other, each
with its own live tokens/s, and when one can *see* where Medusa gains: every Medusa step that
emitted several tokens (one forward pass, tokens accepted together) is highlighted, alternating
two colours as in EAGLE's demo.

How the comparison stays fair on a shared CPU:

- Each arm has its own backend instance (a backend holds one KV cache, so two generations cannot
  share one), loaded once and reused by every request: about twice the model's memory.
- One generator interleaves the arms step by step (a baseline step, a Medusa step, ...), so both
  stream and neither waits for the other.  Each arm's clock runs only around its own step and
  ``synchronize()``, so neither is charged for the other's compute: tokens/s is tokens over the
  arm's own compute time, prefill included, as ``my_judge.bench_speed`` counts it.  Rendering
  happens outside the clocks, at most ``1 / FRAME_S`` times a second.
- Gradio's queue runs one comparison at a time (concurrency limit 1); other visitors wait in line,
  so the shared backends never see two requests at once.

Chat mode keeps a multi-turn conversation; each arm sees its own previous answers.
"""
from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import gradio as gr

from medusa.core.backends import BACKENDS
from medusa.core.config import GenerationConfig
from medusa.core.engine import Step
from medusa.core.options import RunOptions
from medusa.core.prompts import Message, encode_prompt, stop_token_ids
from medusa.core.trees import named_trees
from medusa.core.text import TextStream

log = logging.getLogger("app")

ARMS = ("baseline", "medusa")
FRAME_S = 0.1  # at most 10 UI updates a second
HEADS_TREE = "heads' tree"
Conversation = dict[str, list[dict[str, str]]]  # arm -> turns {"user", "answer", "html"}

CSS = """
.pane { min-height: 14em; max-height: 36em; overflow-y: auto; padding: .6em; border-radius: 8px;
        border: 1px solid var(--border-color-primary); white-space: pre-wrap; line-height: 1.5; }
.pane .user { font-weight: 600; margin: .4em 0; }
.pane .user::before { content: "You: "; opacity: .6; }
.pane .bot { margin: 0 0 .8em 0; }
.acc0 { background: #ffe08a; color: #111; border-radius: 3px; }
.acc1 { background: #9fd8ff; color: #111; border-radius: 3px; }
"""


def available_backends() -> list[str]:
    """Backends whose package is installed, checked without importing it (a Jittor import is slow)."""
    return [name for name, target in BACKENDS.items() if importlib.util.find_spec(target.split(".")[0]) is not None]


class Models:
    """Backend instances loaded once and shared by all requests: one per arm for the current selection.

    Switching backend or tree loads new instances and drops the old ones, so memory stays at two.
    """

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self._loaded: dict[tuple[str, str, Optional[str]], Any] = {}

    def get(self, backend: str, arm: str, tree: Optional[str]) -> Any:
        key = (backend, arm, tree if arm == "medusa" else None)  # the baseline never uses the tree
        if key not in self._loaded:
            for old in [k for k in self._loaded if k[1] == arm]:
                del self._loaded[old]
            log.info("loading %s backend for the %s arm (tree %s)", backend, arm, key[2] or "of the heads")
            self._loaded[key] = self.opts.with_(tree=key[2], profile=False).load(backend)
        return self._loaded[key]


@dataclass
class Arm:
    """One side of the comparison: its step stream, its own clock, and the text of each step."""

    name: str
    backend: Any
    steps: Iterator[Step]
    text: TextStream
    chunks: list[tuple[str, int]] = field(default_factory=list)  # (text, tokens) of each step
    tokens: int = 0
    seconds: float = 0.0
    done: bool = False
    clock: Callable[[], float] = time.perf_counter  # seconds; tests inject a scripted clock

    def advance(self) -> None:
        """Run one decoding step (the first one includes prefill) on this arm's clock."""
        start = self.clock()
        step = next(self.steps)
        self.backend.synchronize()
        self.seconds += self.clock() - start
        self.tokens += len(step.tokens)
        self.done = step.finish_reason is not None
        self.chunks.append((self.text.push(step.tokens) + (self.text.flush() if self.done else ""), len(step.tokens)))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def accept_length(self) -> float:
        """Tokens per step, the Medusa paper's τ (1 for the baseline)."""
        return self.tokens / max(len(self.chunks), 1)


def start_arm(models: Models, name: str, backend: str, tree: Optional[str], messages: list[Message],
              cfg: GenerationConfig, template: Optional[str], clock: Callable[[], float] = time.perf_counter) -> Arm:
    b = models.get(backend, name, tree)
    ids = encode_prompt(b.tokenizer, messages, template)
    cfg = cfg.with_(medusa=name == "medusa", stop_token_ids=stop_token_ids(b.tokenizer, template))
    return Arm(name, b, iter(b.generate(ids, cfg)), TextStream(b.tokenizer), clock=clock)


# ----------------------------------------------------------------------------- rendering


def render_answer(chunks: Sequence[tuple[str, int]]) -> str:
    """HTML of an answer; each multi-token step gets a background, alternating two colours."""
    parts, colour = [], 0
    for text, n in chunks:
        if n > 1 and text:
            parts.append(f'<span class="acc{colour}" title="{n} tokens in one step">{html.escape(text)}</span>')
            colour ^= 1
        else:
            parts.append(html.escape(text))
    return "".join(parts)


def render_pane(turns: list[dict[str, str]], user: str, answer_html: str) -> str:
    blocks = [f'<div class="user">{html.escape(t["user"])}</div><div class="bot">{t["html"]}</div>' for t in turns]
    if user:
        blocks.append(f'<div class="user">{html.escape(user)}</div><div class="bot">{answer_html}</div>')
    return f'<div class="pane">{"".join(blocks)}</div>'


def stats_line(arm: Arm) -> str:
    state = "done" if arm.done else "generating…"
    return (f"**{arm.tokens_per_s:.1f} tokens/s** · {arm.tokens} tokens · {arm.seconds:.2f} s · "
            f"{arm.accept_length:.2f} tokens/step · {state}")


def summary_table(base: Arm, med: Arm) -> str:
    speedup = med.tokens_per_s / base.tokens_per_s if base.tokens_per_s else 0.0
    rows = [f"| {label} | {a.seconds:.2f} | {a.tokens} | {a.tokens_per_s:.1f} | {a.accept_length:.2f} |"
            for label, a in (("baseline", base), ("Medusa", med))]
    return "\n".join([
        f"### Speed-up: {speedup:.2f}x",
        "| | time (s) | tokens | tokens/s | mean accepted length (tokens/step) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "Each arm is timed on its own compute only (prefill included); highlighted text = tokens accepted "
        "together in one Medusa step.",
    ])


# ----------------------------------------------------------------------------- the comparison


def compare(models: Models, opts: RunOptions, prompt: str, backend: str, max_new_tokens: float,
            temperature: float, tree: str, chat_mode: bool, conversation: Optional[Conversation], *,
            clock: Callable[[], float] = time.perf_counter) -> Iterator[tuple]:
    """Stream both arms interleaved; yields (panes, stats, summary, conversation, prompt box) frames.
    ``clock``: what times each arm's steps (tests pass a scripted one)."""
    if not prompt.strip():
        raise gr.Error("Type a prompt first.")
    history: Conversation = conversation if chat_mode and conversation else {a: [] for a in ARMS}
    cfg = GenerationConfig(max_new_tokens=int(max_new_tokens), temperature=float(temperature), seed=opts.seed)
    tree_name = None if tree == HEADS_TREE else tree  # None: the tree the heads name, else the default
    try:
        arms = [start_arm(models, name, backend, tree_name, _messages(history[name], prompt), cfg, opts.conv_template,
                          clock) for name in ARMS]
        last = 0.0
        while not all(a.done for a in arms):
            for arm in arms:
                if not arm.done:
                    arm.advance()
            if time.perf_counter() - last >= FRAME_S:
                yield _frame(arms, history, prompt, "", gr.skip(), gr.skip())
                last = time.perf_counter()
    except (ValueError, ImportError) as err:  # unavailable backend or option, conversation over the KV budget
        raise gr.Error(str(err)) from err
    new_history = {a.name: history[a.name] + [{"user": prompt, "answer": a.text.text.strip(),
                                               "html": render_answer(a.chunks)}] for a in arms}
    yield _frame(arms, history, prompt, summary_table(*arms), new_history if chat_mode else None,
                 "" if chat_mode else gr.skip())


def _messages(turns: list[dict[str, str]], prompt: str) -> list[Message]:
    messages: list[Message] = []
    for t in turns:
        messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["answer"]}]
    return messages + [{"role": "user", "content": prompt}]


def _frame(arms: list[Arm], history: Conversation, prompt: str, summary: Any, conversation: Any, box: Any) -> tuple:
    panes = tuple(render_pane(history[a.name], prompt, render_answer(a.chunks)) for a in arms)
    return (*panes, *(stats_line(a) for a in arms), summary, conversation, box)


# ----------------------------------------------------------------------------- the page


def build_ui(models: Models, opts: RunOptions, loaded: dict[str, Any]) -> gr.Blocks:
    """``loaded``: ``describe()`` of the Medusa arm as started (what the header shows)."""
    trees = [HEADS_TREE, *named_trees()]
    with gr.Blocks(title="Jedusa: baseline vs Medusa", analytics_enabled=False) as demo:
        gr.Markdown(f"## Jedusa: baseline vs Medusa\nModel `{loaded['model']}` · heads `{loaded['heads']}` "
                    f"({loaded['num_heads']} x {loaded['head_type']}) · both arms stream, interleaved step by step")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt (the model's chat template is applied)", lines=3, scale=4,
                                elem_id="prompt", placeholder="Ask something, then press Compare")
            with gr.Column(scale=1, min_width=180):
                run = gr.Button("Compare", variant="primary", elem_id="compare")
                reset = gr.Button("New conversation", elem_id="reset")
        with gr.Row():
            backend = gr.Dropdown(available_backends(), value=opts.backend, label="Backend")
            tree = gr.Dropdown(trees, value=opts.tree or HEADS_TREE, label="Tree (Medusa arm)", allow_custom_value=True)
            max_new = gr.Slider(1, 1024, value=opts.max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=opts.temperature, step=0.05, label="Temperature (0 = greedy)")
            chat_mode = gr.Checkbox(value=False, label="Chat mode (multi-turn)")
        with gr.Row():
            panes, stats = [], []
            for name, title in zip(ARMS, ("Baseline", "Medusa")):
                with gr.Column():
                    gr.Markdown(f"### {title}")
                    stats.append(gr.Markdown(elem_id=f"{name}-stats"))
                    panes.append(gr.HTML(render_pane([], "", ""), elem_id=f"{name}-pane"))
        summary = gr.Markdown(elem_id="summary")
        conversation = gr.State(None)
        gr.on([run.click, prompt.submit], functools.partial(compare, models, opts),
              inputs=[prompt, backend, max_new, temperature, tree, chat_mode, conversation],
              outputs=[*panes, *stats, summary, conversation, prompt], concurrency_limit=1)
        reset.click(lambda: (render_pane([], "", ""),) * 2 + ("", "", "", None),
                    outputs=[*panes, *stats, summary, conversation])
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Gradio app: baseline vs Medusa side by side, streaming")
    RunOptions.add_args(p, max_new_tokens=128, seed=0)  # sliders start at --max-new-tokens / --temperature
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = RunOptions.from_args(args)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    models = Models(opts)
    try:
        for arm in ARMS:  # load before serving: the first visitor does not wait, bad flags fail here
            loaded = models.get(opts.backend, arm, opts.tree).describe()
    except (ValueError, FileNotFoundError, ImportError) as err:
        log.error("%s", err)
        return 2
    build_ui(models, opts, loaded).queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                                  css=CSS, footer_links=[])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
