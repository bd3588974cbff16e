"""Self-distillation never damages a file: not its input, not an earlier output, not after kill -9."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medusa.core.io import read_jsonl
from medusa.train.distill import main

from .conftest import make_hf_model

REPO = Path(__file__).resolve().parents[1]


def sharegpt_item(i, text=None):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": text or f"question number {i}?"},
                                             {"from": "gpt", "value": f"answer {i}"}]}


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory, smol_dir):
    """A tiny random Llama that speaks SmolLM2's tokenizer and chat template (vocab sizes match)."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat")
    tok = AutoTokenizer.from_pretrained(smol_dir)
    make_hf_model(path, vocab_size=len(tok), tokenizer_from=smol_dir)
    shutil.copy(smol_dir / "chat_template.jinja", path / "chat_template.jinja")
    return path


def run_cli(model, data, out, *extra):
    return main(["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "2",
                 "--max-new-tokens", "4", "--dtype", "float32", "--device", "cpu", *extra])


@pytest.mark.parametrize("link", [None, "symlink", "hardlink"])
def test_out_that_is_the_input_is_refused(tmp_path, tiny_chat_dir, link):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(sharegpt_item(i)) + "\n" for i in range(3)))
    before = data.read_bytes()
    out = data
    if link:
        out = tmp_path / "out.jsonl"
        os.symlink(data, out) if link == "symlink" else os.link(data, out)
    assert run_cli(tiny_chat_dir, data, out) == 2
    assert data.read_bytes() == before


@pytest.mark.parametrize("other", [
    json.dumps([sharegpt_item(1), sharegpt_item(2)], indent=1),             # a ShareGPT .json array
    "".join(json.dumps(sharegpt_item(i)) + "\n" for i in (1, 2)),          # a ShareGPT JSONL
    json.dumps(sharegpt_item(1)),                                          # ... of one line, no newline
    json.dumps({"id": "m", "messages": [{"role": "user", "content": "hi"}]}) + "\n",  # role/content data
], ids=["sharegpt-array", "sharegpt-jsonl", "sharegpt-one-line", "messages-jsonl"])
def test_out_that_is_another_input_is_refused_untouched(tmp_path, tiny_chat_dir, other):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text(json.dumps(sharegpt_item(0)) + "\n")
    out = tmp_path / "other.json"  # e.g. the user's own ShareGPT file given as --out (or DATA) by mistake
    out.write_text(other)
    before = out.read_bytes()
    assert run_cli(tiny_chat_dir, data, out) == 2
    assert out.read_bytes() == before


def test_one_line_output_without_newline_keeps_its_line(tmp_path, tiny_chat_dir):
    data = tmp_path / "sharegpt.jsonl"
    data.write_text("".join(json.dumps(sharegpt_item(i)) + "\n" for i in range(3)))
    out = tmp_path / "distill.jsonl"
    kept = {"id": "c0", "messages": [{"role": "user", "content": "question number 0?"},
                                     {"role": "assistant", "content": "an earlier run's reply"}], "new_tokens": 5}
    out.write_text(json.dumps(kept))  # complete record, only its newline missing
    assert run_cli(tiny_chat_dir, data, out) == 0
    rows = read_jsonl(out)
    assert rows[0] == kept and sorted(r["id"] for r in rows) == ["c0", "c1", "c2"]
    assert out.read_text().endswith("\n")


def _distill_process(model, data, out, device="auto"):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medusa.train.distill", "--model", str(model), "--data", str(data),
           "--out", str(out), "--batch-size", "2", "--max-new-tokens", "64", "--dtype", "float32", "--device", device]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_after_first_record(proc, out):
    while proc.poll() is None and not (out.exists() and b"\n" in out.read_bytes()):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # a no-op once the child is reaped: never a recycled pid
    proc.wait()


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, tiny_chat_dir):
    items = [sharegpt_item(i, "word " * (1 + (7 * i) % 13) + f"{i}?") for i in range(30)]
    items.insert(10, sharegpt_item(4, "the same id again, as in the real ShareGPT dump"))
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(items, indent=1))

    whole = tmp_path / "whole.jsonl"
    proc = _distill_process(tiny_chat_dir, data, whole)
    assert proc.wait() == 0, proc.stderr.read().decode()

    resumed = tmp_path / "resumed.jsonl"
    proc = _distill_process(tiny_chat_dir, data, resumed)
    _kill_after_first_record(proc, resumed)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(read_jsonl(resumed)) < len(read_jsonl(whole)), "the kill came too late to interrupt the run"
    proc = _distill_process(tiny_chat_dir, data, resumed)
    assert proc.wait() == 0, proc.stderr.read().decode()

    ids = [r["id"] for r in read_jsonl(resumed)]
    assert len(ids) == len(set(ids)) == 30  # nothing lost, nothing duplicated (c4 once)
    assert {r["id"]: r for r in read_jsonl(resumed)} == {r["id"]: r for r in read_jsonl(whole)}


def test_bfloat16_on_any_cpu(tmp_path, tiny_chat_dir):
    """CPUs without native bf16 cannot pack bf16 weights for oneDNN: the linears stay unpacked."""
    data = tmp_path / "sharegpt.jsonl"
    data.write_text(json.dumps(sharegpt_item(0)) + "\n")
    out = tmp_path / "distill.jsonl"
    assert run_cli(tiny_chat_dir, data, out, "--dtype", "bfloat16") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["c0"]
