"""Chat with a model through Medusa (or the plain baseline) from a terminal or a pipe.

One implementation for every backend: ``python -m medusa.inference.cli`` runs ``torch``, and the
Jittor packages' CLIs call ``main(backend=...)``.  Commands: ``!!exit``, ``!!reset``, ``!!regen``
(redo the last answer), ``!!save FILE`` / ``!!load FILE`` (conversation as JSON).  EOF ends the
session with status 0, so scripted use through stdin works.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from ..core.backends import BACKENDS, load_backend
from ..core.config import GenerationConfig
from ..core.models import DEFAULT_MODEL
from ..core.prompts import Message, encode_prompt, stop_token_ids


def build_parser(backend: Optional[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Medusa chat")
    if backend is None:
        p.add_argument("--backend", choices=list(BACKENDS), default="torch")
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name or local Hugging Face directory")
    p.add_argument("--medusa-heads", default=None,
                   help="Medusa checkpoint dir (default: the heads shipped for the model; 'fresh' = untrained)")
    p.add_argument("--tree", default=None, help="named tree or JSON file of paths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--acceptance", choices=["typical", "nucleus"], default="typical",
                   help="Medusa acceptance when temperature > 0")
    p.add_argument("--posterior-threshold", type=float, default=0.09)
    p.add_argument("--posterior-alpha", type=float, default=0.3)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-len", type=int, default=2048, help="KV cache budget in tokens")
    p.add_argument("--baseline", action="store_true", help="plain decoding, no Medusa")
    p.add_argument("--conv-template", default=None, help="FastChat template (default: the model's chat template)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stats", action="store_true", help="print tokens/s and mean accept length per answer")
    return p


class Chat:
    """A conversation plus the commands that edit it; the backend sees only token ids."""

    def __init__(self, backend: Any, cfg: GenerationConfig, template: Optional[str], out: TextIO, stats: bool) -> None:
        self.backend, self.cfg, self.template, self.out, self.stats = backend, cfg, template, out, stats
        self.messages: list[Message] = []

    def handle(self, line: str) -> bool:
        """Process one input line; False ends the session."""
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "!!exit":
            return False
        if cmd == "!!reset":
            self.messages = []
            self._say("[conversation reset]")
        elif cmd == "!!regen":
            self._regen()
        elif cmd == "!!save":
            Path(arg).write_text(json.dumps(self.messages, indent=1))
            self._say(f"[saved {len(self.messages)} messages to {arg}]")
        elif cmd == "!!load":
            self._load(arg)
        elif line.strip():
            self.messages.append({"role": "user", "content": line.rstrip("\n")})
            self._answer()
        return True

    def _regen(self) -> None:
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
        if not self.messages:
            self._say("[nothing to regenerate]")
            return
        self._answer()

    def _load(self, path: str) -> None:
        try:
            messages = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            self._say(f"[cannot load {path}: {err}]")
            return
        self.messages = [m for m in messages if m.get("role") in ("system", "user", "assistant")]
        self._say(f"[loaded {len(self.messages)} messages from {path}]")

    def _answer(self) -> None:
        tok = self.backend.tokenizer
        ids = encode_prompt(tok, self.messages, self.template)
        new: list[int] = []
        shown, steps, start = "", 0, time.perf_counter()
        self.out.write("ASSISTANT: ")
        for step in self.backend.generate(ids, self.cfg):
            new += step.tokens
            steps += 1
            text = tok.decode(new, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.out.write(text[len(shown):])
                self.out.flush()
                shown = text
        self.backend.synchronize()
        elapsed = time.perf_counter() - start
        self.out.write(tok.decode(new, skip_special_tokens=True)[len(shown):] + "\n")
        if self.stats:
            self._say(f"[{len(new)} tokens, {len(new) / elapsed:.1f} tok/s, {len(new) / max(steps, 1):.2f} tokens/step]")
        self.messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True).strip()})

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def main(argv: Optional[Sequence[str]] = None, backend: Optional[str] = None) -> int:
    args = build_parser(backend).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        engine = load_backend(backend or args.backend, model=args.model, heads=args.medusa_heads, tree=args.tree,
                              dtype=args.dtype, device=args.device, max_len=args.max_len)
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                               acceptance=args.acceptance, posterior_threshold=args.posterior_threshold,
                               posterior_alpha=args.posterior_alpha, medusa=not args.baseline, seed=args.seed,
                               stop_token_ids=stop_token_ids(engine.tokenizer, args.conv_template))
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger("cli").error("%s", err)
        return 2
    chat = Chat(engine, cfg, args.conv_template, sys.stdout, args.stats)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("USER: ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not chat.handle(line):
            return 0


if __name__ == "__main__":
    sys.exit(main())
