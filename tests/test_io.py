"""medusa.core.io: atomic writes and the one crash-safe JSONL reader/appender."""
import json
import os
import stat
import threading

import pytest

from medusa.core import io
from medusa.core.io import JsonlAppender, JsonlError, append_jsonl, atomic_write_text, iter_jsonl, read_jsonl


def test_valid_last_line_without_newline_is_kept(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"id": 1}\n{"id": 2}')  # complete, only its newline missing
    assert read_jsonl(f) == [{"id": 1}, {"id": 2}]
    append_jsonl(f, {"id": 3})
    assert f.read_text() == '{"id": 1}\n{"id": 2}\n{"id": 3}\n'


def test_one_line_file_without_newline_keeps_its_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"id": 1}')
    append_jsonl(f, {"id": 2})
    assert read_jsonl(f) == [{"id": 1}, {"id": 2}]


def test_partial_last_line_is_cut_by_truncation_only(tmp_path, monkeypatch):
    f = tmp_path / "a.jsonl"
    f.write_text('{"id": 1}\n{"id": 2}\n{"id": 3, "te')  # a write cut short by a crash
    assert [n for n, _ in iter_jsonl(f)] == [1, 2]
    inode = f.stat().st_ino

    def no_rewrites(*args, **kwargs):
        raise AssertionError("the repair must not rewrite or replace the file")

    monkeypatch.setattr(io, "atomic_write", no_rewrites)
    monkeypatch.setattr(os, "replace", no_rewrites)
    append_jsonl(f, {"id": 4})
    assert f.stat().st_ino == inode
    assert f.read_text() == '{"id": 1}\n{"id": 2}\n{"id": 4}\n'


def test_partial_last_line_is_an_error_in_an_input_file(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"id": 1}\n{"id": 2')
    with pytest.raises(JsonlError, match=r"q\.jsonl:2: not valid JSON"):
        read_jsonl(f, appended=False)


@pytest.mark.parametrize("text,where", [
    ('{"id": 1}\nnot json\n{"id": 3}\n', r"a\.jsonl:2: not valid JSON"),
    ('{"id": 1}\n[1, 2]\n', r"a\.jsonl:2: expected a JSON object, got list"),
    ('{"id": 1}\n{"id": 2\n{"id": 3}\n', r"a\.jsonl:2: not valid JSON"),  # broken, but not the last line
], ids=["not-json", "not-an-object", "cut-in-the-middle"])
def test_bad_middle_line_is_refused_with_file_and_line(tmp_path, text, where):
    f = tmp_path / "a.jsonl"
    f.write_text(text)
    with pytest.raises(JsonlError, match=where):
        read_jsonl(f)
    with pytest.raises(JsonlError, match=where):
        append_jsonl(f, {"id": 9})
    assert f.read_text() == text


SHAREGPT = [{"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]


@pytest.mark.parametrize("content", [
    json.dumps(SHAREGPT, indent=1).encode(),  # a ShareGPT .json array, pretty-printed
    json.dumps(SHAREGPT).encode(),            # ... or on one line without newline
    json.dumps(SHAREGPT)[:-5].encode(),       # ... cut short: not an object's partial line either
    bytes(range(256)) * 4,                    # binary
    b"\x89PNG\r\n\x1a\n" + bytes(64),
], ids=["sharegpt-array", "one-line-array", "cut-array", "binary", "png"])
def test_file_that_is_not_jsonl_is_refused_and_untouched(tmp_path, content):
    f = tmp_path / "data.json"
    f.write_bytes(content)
    with pytest.raises(JsonlError, match=r"data\.json:\d+: .*refusing"):
        append_jsonl(f, {"id": 1})
    with pytest.raises(JsonlError):
        read_jsonl(f)
    assert f.read_bytes() == content


def test_appends_from_threads_stay_whole_lines(tmp_path):
    f = tmp_path / "j.jsonl"
    with JsonlAppender(f) as out:
        threads = [threading.Thread(target=lambda i=i: [out.append({"t": i, "k": k, "pad": "x" * 500})
                                                        for k in range(50)]) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    rows = read_jsonl(f)
    assert sorted((r["t"], r["k"]) for r in rows) == [(i, k) for i in range(4) for k in range(50)]


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    f = tmp_path / "metrics.json"
    f.write_text("old")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(f, "new")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    f = tmp_path / "heads.bin"
    f.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ne")
        raise OSError(5, "I/O error")

    with pytest.raises(OSError, match="I/O error"):
        io.atomic_write(f, half_then_fail)
    assert f.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["heads.bin"]


def test_atomic_write_into_read_only_dir_fails_and_keeps_old_file(tmp_path, monkeypatch):
    """A read-only directory (simulated: root, as in CI, ignores directory permissions)."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "config.json").write_text("{}")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", read_only)
    with pytest.raises(PermissionError):
        atomic_write_text(d / "config.json", '{"new": 1}')
    assert (d / "config.json").read_text() == "{}" and [p.name for p in d.iterdir()] == ["config.json"]


def test_atomic_write_mode_is_0644_or_the_old_files(tmp_path):
    new = atomic_write_text(tmp_path / "new.json", "{}")
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # not mkstemp's 0600
    old = tmp_path / "old.sh"
    old.write_text("#!/bin/sh\n")
    old.chmod(0o750)
    atomic_write_text(old, "#!/bin/sh\necho\n")
    assert stat.S_IMODE(old.stat().st_mode) == 0o750
