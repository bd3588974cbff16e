"""Text at the edge: incremental detokenisation shared by the chat CLI, the server and the app.

The engine yields token ids only (``core.engine``); whoever shows text to a person or a client must
turn a growing id sequence into text without ever showing half a UTF-8 character or a stop string
that is still being typed.  One implementation, so the CLI, the server and the app agree.
"""
from __future__ import annotations

from typing import Any, Sequence


class TextStream:
    """Incremental detokenisation of a growing id sequence, cut before the first stop string.

    ``push(ids)`` returns the new text that is safe to show: nothing while the text ends in an
    incomplete UTF-8 character (``\\ufffd``), and never a tail that could begin a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one appears
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            return ""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(max(len(text) - held, self.sent))

    def flush(self) -> str:
        """The held-back tail once generation has ended."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out, self.sent = self.text[self.sent:end], max(end, self.sent)
        return out
