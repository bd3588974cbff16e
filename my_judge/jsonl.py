"""Append-only JSONL result files, so that a crash loses at most the line being written.

Answers, judgments and scores are written one whole line at a time (write, flush, fsync) and a
rerun resumes by reading what is there.  A last line without its newline is what a crash
mid-write leaves behind: readers drop it with a warning and ``append_jsonl`` cuts it off before
writing; a bad line anywhere else is an error that names ``file:line``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

_lock = threading.Lock()  # judge workers append from several threads


def iter_jsonl(path: Path, appended: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line; a missing file is empty.  ``appended=False`` is for
    input files nobody appends to, where a broken last line is an error like any other."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if appended and n == len(lines):  # no newline after it: a write cut short by a crash
                log.warning("%s:%d: ignoring a truncated last line (interrupted write)", path, n)
                return
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path)]


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one object as one line and fsync it; a truncated last line is removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, ensure_ascii=False) + "\n"
    with _lock:
        _repair_tail(path)
        with path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Make the file end with a newline: end a complete last object, cut off a partial one."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    data = path.read_bytes()
    start = data.rfind(b"\n") + 1
    try:
        json.loads(data[start:])
    except ValueError:
        log.warning("%s: removing a truncated last line (interrupted write)", path)
        with path.open("r+b") as f:
            f.truncate(start)
        return
    with path.open("ab") as f:
        f.write(b"\n")
