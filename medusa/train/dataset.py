"""Tokenised training examples: chat-templated ids with labels on assistant tokens only.

Labels are found through the tokenizer's character offsets: a token is labelled when it overlaps
an assistant message's content (a token may start at the space before it), and so is the token
right after it (the end-of-turn marker), so heads also learn to predict the stop.  Everything else is IGNORE_INDEX.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..core.prompts import Message, format_conversation

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    ids: list[int]
    labels: list[int]  # ids where trained, IGNORE_INDEX elsewhere


def tokenize_conversation(tokenizer: Any, messages: Sequence[Message], max_length: int,
                          template: Optional[str] = None) -> Example:
    text = format_conversation(tokenizer, messages, template)
    enc = tokenizer(text, add_special_tokens=template is not None, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans = _assistant_spans(text, messages)
    labels = [IGNORE_INDEX] * len(ids)
    inside = [any(start < b and end > a for a, b in spans) for start, end in offsets]
    for i, answer in enumerate(inside):
        if answer:  # overlapping the content: " Hello" starts at the space before it (Vicuna's template)
            labels[i] = ids[i]
            if i + 1 < len(ids) and not inside[i + 1]:
                labels[i + 1] = ids[i + 1]  # the end-of-turn token after the content
    return Example(ids[:max_length], labels[:max_length])


def _assistant_spans(text: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    for m in messages:
        at = text.find(m["content"], cursor)
        if at < 0:
            continue  # the template rewrote this message (e.g. stripped it); it gets no labels
        cursor = at + len(m["content"])
        if m["role"] == "assistant":
            spans.append((at, cursor))
    return spans
