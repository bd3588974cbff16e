"""Writes that cannot destroy: atomic file replacement and the one crash-safe JSONL reader/appender.

Atomic writes go to a temporary file in the target's directory, are fsync'd, then ``os.replace``
the target, so a crash or a failing write leaves either the old file or the new one, never half
of one.  The new file keeps the old one's mode (0644 when there was none, not mkstemp's 0600).

JSONL files (answers, judgments, distilled conversations) grow by appending whole lines, each
batch fsync'd, so a ``kill -9`` can only leave a *partial last line*: the tail after the last
newline, which is not valid JSON and starts like one of our objects (``{``).  The rules:

- a last line without newline that is valid JSON is complete: kept, and the next append first
  ends it with its newline;
- a partial last line is skipped by readers (with a warning) and cut off, in place with
  ``truncate``, by the next append; nothing else in the file is rewritten;
- any other bad line (not JSON, not an object, not UTF-8), anywhere, makes the file refused with
  ``JsonlError`` naming ``file:line``: it is not ours (a ShareGPT ``.json`` array, a binary file),
  so it is never skipped silently and never appended to.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

log = logging.getLogger(__name__)

DEFAULT_MODE = 0o644
_append_lock = threading.Lock()  # the judge appends from several threads


class JsonlError(ValueError):
    """A file that is not JSONL of objects (beyond a partial last line left by a crash)."""


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's content, read in 4 MB blocks (weights and data files can be GBs)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# --- atomic writes -------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temporary file next to ``path``, fsync it, then replace ``path``.

    ``write`` may be any writer that takes a path (``safetensors.save_file``, ``torch.save``).  On
    any failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    mode = _mode_for(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def _mode_for(path: Path) -> int:
    """The existing file's permission bits, else 0644 (reading the umask would race with threads)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return DEFAULT_MODE


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Persist the rename itself; some filesystems cannot fsync a directory, which is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        log.debug("%s: directory fsync not supported", path)
    finally:
        os.close(fd)


# --- JSONL ---------------------------------------------------------------------------------------

def iter_jsonl(path: str | os.PathLike[str], appended: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line of ``path``; a missing file is empty.

    ``appended=False`` is for input files nobody appends to, where a partial last line is an error
    like any other bad line."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            complete = raw.endswith(b"\n")
            row = _parse_line(path, n, raw, last_unterminated=appended and not complete)
            if row is _PARTIAL:
                log.warning("%s:%d: ignoring a partial last line (an interrupted write)", path, n)
            elif row is not None:
                yield n, row


def read_jsonl(path: str | os.PathLike[str], appended: bool = True) -> list[dict[str, Any]]:
    return [row for _, row in iter_jsonl(path, appended)]


def append_jsonl(path: str | os.PathLike[str], rows: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
    """Append one object (or several, as one write) to ``path``, after checking the whole file.

    For many appends to one file, open a ``JsonlAppender`` once instead of calling this each time."""
    with JsonlAppender(path) as out:
        out.append(rows)


class JsonlAppender:
    """Appends whole lines to a JSONL file, one fsync per ``append`` call; safe across threads.

    Opening checks the existing file (``JsonlError`` if it is not JSONL of objects, the file left
    untouched), cuts a partial last line off and ends a complete unterminated one with its newline.
    Each ``append`` is a single ``write`` of whole lines, so a crash leaves at most a partial tail."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: Optional[int] = None

    def __enter__(self) -> "JsonlAppender":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _append_lock:
            good_end, ends_with_newline = _check(self.path)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, DEFAULT_MODE)
            _repair_tail(self.path, self._fd, good_end, ends_with_newline)
        return self

    def append(self, rows: dict[str, Any] | Iterable[dict[str, Any]]) -> None:
        rows = [rows] if isinstance(rows, dict) else list(rows)
        if self._fd is None:
            raise RuntimeError("JsonlAppender.append outside its with block")
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with _append_lock:
            _write_all(self._fd, data)
            os.fsync(self._fd)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_PARTIAL = object()  # marker: the last line is a write cut short


def _parse_line(path: Path, n: int, raw: bytes, last_unterminated: bool) -> Any:
    """The object on one line, None for a blank line, _PARTIAL for a partial last line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonlError(f"{path}:{n}: not UTF-8 text; not a JSONL file, refusing to read or append to it") from None
    if not text.strip():
        return None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        if last_unterminated and text.lstrip().startswith("{"):
            return _PARTIAL
        raise JsonlError(f"{path}:{n}: not valid JSON ({err.msg}); not a JSONL file of objects, refusing to "
                         "read or append to it") from None
    if not isinstance(row, dict):
        raise JsonlError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}; not a JSONL file of "
                         "objects, refusing to read or append to it")
    return row


def _check(path: Path) -> tuple[int, bool]:
    """Validate every line of ``path``: (byte offset where its good part ends, ends with newline)."""
    if not path.exists():
        return 0, True
    offset, newline = 0, True
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            newline = raw.endswith(b"\n")
            if _parse_line(path, n, raw, last_unterminated=not newline) is _PARTIAL:
                return offset, True
            offset += len(raw)
    return offset, newline


def _repair_tail(path: Path, fd: int, good_end: int, ends_with_newline: bool) -> None:
    """Cut a partial last line (truncate: the rest of the file is not rewritten); end a complete one."""
    size = os.fstat(fd).st_size
    if good_end < size:
        log.warning("%s: removing a partial last line of %d bytes (an interrupted write)", path, size - good_end)
        os.truncate(path, good_end)
        os.fsync(fd)
    elif not ends_with_newline:
        _write_all(fd, b"\n")
        os.fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
