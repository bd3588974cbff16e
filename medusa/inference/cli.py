"""Chat with a model through Medusa (or the plain baseline) from a terminal or a pipe.

One implementation for every backend: ``python -m medusa.inference.cli`` runs ``torch`` (or
``--backend``), and the Jittor packages' CLIs call ``main(backend=...)``.  Commands: ``!!exit``,
``!!reset``, ``!!regen`` (redo the last answer), ``!!save FILE`` / ``!!load FILE`` (the conversation
as a JSON list of ``{"role", "content"}`` messages).  EOF ends the session with status 0, so
scripted use through stdin works.

Nothing typed loses the conversation: a command that cannot be carried out, a message that does
not fit the context and an error from the engine each print one bracketed line, and the session
goes on with the conversation as it was.  ``!!save`` replaces its file atomically and refuses to
replace a file that is not a saved conversation.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TextIO

from jinja2 import TemplateError

from ..core.config import GenerationConfig
from ..core.io import atomic_write_text
from ..core.options import RunOptions
from ..core.prompts import Message, encode_prompt, stop_token_ids
from ..core.text import TextStream

COMMANDS = ("!!exit", "!!reset", "!!regen", "!!save FILE", "!!load FILE")
ROLES = ("system", "user", "assistant")
MESSAGE_SHAPE = '{"role": "system"|"user"|"assistant", "content": TEXT}'


class ChatError(ValueError):
    """A command or message that cannot be carried out; shown as one line, the session goes on."""


def build_parser(backend: Optional[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Medusa chat")
    RunOptions.add_args(p, backend=backend is None, max_new_tokens=512)
    p.add_argument("--stats", action="store_true", help="print tokens/s and mean accept length per answer")
    return p


def read_conversation(path: Path) -> list[Message]:
    """The messages of a file written by ``!!save``; ``ChatError`` says why a file is not one."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ChatError(f"{path} is not a text file") from None
    except json.JSONDecodeError as err:
        raise ChatError(f"{path} is not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, list):
        raise ChatError(f"{path} is not a list of messages")
    for i, m in enumerate(data, 1):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ChatError(f"{path}: message {i} is not {MESSAGE_SHAPE}")
    return [{"role": m["role"], "content": m["content"]} for m in data]


class Chat:
    """A conversation plus the commands that edit it; the backend sees only token ids.

    ``max_len``: the KV budget; a turn whose prompt plus ``cfg.max_new_tokens`` exceeds it is
    refused before generation.  ``self.messages`` changes only when a command or turn succeeds.
    """

    def __init__(self, backend: Any, cfg: GenerationConfig, template: Optional[str], out: TextIO,
                 stats: bool = False, max_len: Optional[int] = None, profile: bool = False) -> None:
        self.backend, self.cfg, self.template, self.out = backend, cfg, template, out
        self.stats, self.max_len, self.profile = stats, max_len, profile
        self.messages: list[Message] = []
        self.commands: dict[str, Callable[[str], None]] = {
            "!!reset": self._reset, "!!regen": self._regen, "!!save": self._save, "!!load": self._load}

    def run(self, lines: TextIO, prompt: bool = False) -> int:
        """Read lines until EOF or ``!!exit``; ``prompt`` shows ``USER:`` before each read."""
        while True:
            if prompt:
                self.out.write("USER: ")
                self.out.flush()
            line = lines.readline()
            if not line or not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """Process one input line; False ends the session."""
        text = line.strip()
        if not text.startswith("!!"):
            if text:
                self._turn(self.messages + [{"role": "user", "content": line.rstrip("\r\n")}])
            return True
        cmd, _, arg = text.partition(" ")
        if cmd == "!!exit":
            return False
        try:
            if cmd not in self.commands:
                raise ChatError(f"unknown command {cmd}: the commands are {', '.join(COMMANDS)}")
            self.commands[cmd](arg.strip())
        except ChatError as err:
            self._say(f"[{err}]")
        return True

    def _reset(self, _: str) -> None:
        self.messages = []
        self._say("[conversation reset]")

    def _regen(self, _: str) -> None:
        last_is_answer = bool(self.messages) and self.messages[-1]["role"] == "assistant"
        history = self.messages[:-1] if last_is_answer else self.messages
        if not history:
            raise ChatError("nothing to regenerate")
        self._turn(history)

    def _save(self, arg: str) -> None:
        path = _path(arg, "!!save")
        try:
            if path.is_dir():
                raise ChatError(f"not saved: {path} is a directory; give a file name")
            if path.exists():
                _check_replaceable(path)
            atomic_write_text(path, json.dumps(self.messages, indent=1, ensure_ascii=False) + "\n")
        except OSError as err:
            raise ChatError(f"not saved: cannot write {path} ({err.strerror or err}); "
                            "choose a file in an existing, writable directory") from None
        self._say(f"[saved {len(self.messages)} messages to {path}]")

    def _load(self, arg: str) -> None:
        path = _path(arg, "!!load")
        try:
            messages = read_conversation(path)
        except OSError as err:
            raise ChatError(f"not loaded: cannot read {path} ({err.strerror or err}); "
                            "the conversation is unchanged") from None
        except ChatError as err:
            raise ChatError(f"not loaded: {err}; !!load reads a file written by !!save, "
                            "the conversation is unchanged") from None
        self.messages = messages
        self._say(f"[loaded {len(messages)} messages from {path}]")

    def _turn(self, history: list[Message]) -> None:
        """Answer ``history``; it becomes the conversation (with the answer) only if generation succeeds."""
        try:
            answer = self._generate(history)
        except (ValueError, TemplateError) as err:  # context, options, a template refusing the roles: this turn only
            self._say(f"[no answer: {err}; the conversation is unchanged]")
            return
        self.messages = history + [{"role": "assistant", "content": answer}]

    def _generate(self, history: list[Message]) -> str:
        """Stream the answer to ``history`` to ``out``; the answer text."""
        tok = self.backend.tokenizer
        ids = encode_prompt(tok, history, self.template)
        self._check_fits(len(ids))
        stream, new, steps, start = TextStream(tok), 0, 0, time.perf_counter()
        self.out.write("ASSISTANT: ")
        try:
            for step in self.backend.generate(ids, self.cfg):
                new, steps = new + len(step.tokens), steps + 1
                self.out.write(stream.push(step.tokens))
                self.out.flush()
            self.backend.synchronize()
        except ValueError:
            self.out.write("\n")  # end the partial answer's line before the error line
            raise
        self.out.write(stream.flush() + "\n")
        self._report(new, steps, time.perf_counter() - start)
        return stream.text.strip()

    def _check_fits(self, prompt_tokens: int) -> None:
        need = prompt_tokens + self.cfg.max_new_tokens
        if self.max_len is not None and need > self.max_len:
            raise ChatError(f"the prompt is {prompt_tokens} tokens, and with --max-new-tokens "
                            f"{self.cfg.max_new_tokens} needs {need} > --max-len {self.max_len}: send a shorter "
                            "message, !!reset, or restart with a larger --max-len")

    def _report(self, new: int, steps: int, elapsed: float) -> None:
        if self.stats:
            self._say(f"[{new} tokens, {new / max(elapsed, 1e-9):.1f} tok/s, {new / max(steps, 1):.2f} tokens/step]")
        split = self.backend.describe().get("ms_per_step") if self.profile else None
        if split:
            self._say("[ms per Medusa step: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()) + "]")

    def _say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _path(arg: str, cmd: str) -> Path:
    if not arg:
        raise ChatError(f"{cmd} needs a file name: {cmd} FILE")
    return Path(arg).expanduser()


def _check_replaceable(path: Path) -> None:
    """Only a saved conversation may be replaced by ``!!save``: anything else is the user's data."""
    try:
        read_conversation(path)
    except ChatError:
        raise ChatError(f"not saved: {path} exists and is not a saved conversation; "
                        "choose another file name (or remove that file yourself)") from None


def main(argv: Optional[Sequence[str]] = None, backend: Optional[str] = None) -> int:
    args = build_parser(backend).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    opts = RunOptions.from_args(args, **({"backend": backend} if backend else {}))
    try:
        engine = opts.load()
        cfg = opts.generation(stop_token_ids(engine.tokenizer, opts.conv_template))
    except (ValueError, FileNotFoundError) as err:
        logging.getLogger("cli").error("%s", err)
        return 2
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # a stray non-UTF-8 byte must not end the session
    chat = Chat(engine, cfg, opts.conv_template, sys.stdout, stats=args.stats, max_len=opts.max_len,
                profile=opts.profile)
    return chat.run(sys.stdin, prompt=sys.stdin.isatty())


if __name__ == "__main__":
    sys.exit(main())
