"""``accelerate launch`` of ``python -m medusa.train`` with two CPU ranks on a tiny random Llama.

Two ranks with ``--batch-tokens B`` must be one process with ``--grad-accum 2``: the same global
batches per optimiser step, dealt over the ranks without overlap, the same learning rate at every
step, the same heads (up to float rounding: DDP's all-reduce adds the two gradients in another
order than accumulation does), one checkpoint written, ``world_size`` 2 in ``metrics.json``; and a
two-rank run stopped half-way and resumed in new processes ends with the heads of an uninterrupted one.

accelerate's own ``--cpu`` launcher runs N processes only through ``mpirun``; ``--multi_gpu``
starts them with torchrun, and ``ACCELERATE_USE_CPU=1`` keeps them on the CPU (gloo).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medusa.core.checkpoint import load_checkpoint

from .conftest import make_hf_model

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
    """A byte-level fast tokenizer (one token per byte, two chat markers) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def tiny_training_setup(root: Path, conversations: int = 24) -> dict[str, Path]:
    """A tiny random Llama with a tokenizer, and counting conversations to train heads on."""
    tokenizer = byte_tokenizer()
    make_hf_model(root / "model", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(root / "model")
    convs = [{"id": f"c{i}", "conversations": [
        {"from": "human", "value": f"Spell on from {chr(97 + i % 26)}."},
        {"from": "gpt", "value": "".join(chr(97 + (i + k) % 26) for k in range(16))}]} for i in range(conversations)]
    (root / "convs.json").write_text(json.dumps(convs))
    return {"model": root / "model", "data": root / "convs.json", "cache": root / "cache"}


def train_flags(setup: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--model", str(setup["model"]), "--data", str(setup["data"]), "--cache-dir", str(setup["cache"]),
            "--out", str(out), "--max-length", "64", "--eval-fraction", "0.2", "--num-heads", "2",
            "--backbone-dtype", "float32", "--fp32", "--lr", "1e-2", *extra]


def launch(flags: list[str], ranks: int = 1, module: str = "medusa.train") -> subprocess.CompletedProcess:
    """``python -m module`` in one process, or under ``accelerate launch`` with ``ranks`` CPU ranks."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", ACCELERATE_USE_CPU="1")
    if ranks == 1:
        cmd = [sys.executable, "-m", module]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000), "-m", module]
    return subprocess.run(cmd + flags, env=env, capture_output=True, text=True, timeout=600)


def traces(stderr: str) -> list[dict]:
    """The ``--trace-steps`` records: one per optimiser step and rank."""
    return [json.loads(m) for m in re.findall(r"trace (\{[^\n]*\})", stderr)]


def heads_state(out: Path) -> dict[str, np.ndarray]:
    return load_checkpoint(out)[1]


def prepared_setup(root: Path) -> dict:
    """The tiny model and data, the hidden-state cache filled once, and a batch size that gives an
    even number of batches (so two ranks pair up exactly like two accumulated micro-batches)."""
    from medusa.train.cli import DataOptions, cache_splits, torch_backbone
    from medusa.train.trainer import TokenData

    paths = tiny_training_setup(root)
    cache_splits(paths["model"], DataOptions(paths["data"], root / "unused", paths["cache"], 64, 0.2),
                 torch_backbone("float32", "cpu"))
    positions = len(TokenData(paths["cache"] / "train", num_heads=2))
    batch = next(b for b in range(24, 48) if -(-positions // b) % 2 == 0)
    return dict(paths, batch=str(batch), positions=positions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return prepared_setup(tmp_path_factory.mktemp("tiny-train"))


@pytest.fixture(scope="module")
def two_ranks(setup, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("two-ranks") / "heads"
    run = launch(train_flags(setup, out, "--batch-tokens", setup["batch"], "--epochs", "2", "--save-every", "4",
                             "--trace-steps"), 2)
    assert run.returncode == 0, run.stderr[-3000:]
    return {"out": out, "traces": traces(run.stderr)}


def test_ranks_train_disjoint_batches_on_the_single_process_schedule(setup, two_ranks, tmp_path):
    single = launch(train_flags(setup, tmp_path / "heads", "--batch-tokens", setup["batch"], "--epochs", "2",
                                "--save-every", "4", "--grad-accum", "2", "--trace-steps"))
    assert single.returncode == 0, single.stderr[-3000:]
    one, two = traces(single.stderr), two_ranks["traces"]
    steps = [t["step"] for t in one]
    assert steps == list(range(len(steps))) and len(steps) > 6
    for step, reference in zip(steps, one):
        ranks = sorted((t for t in two if t["step"] == step), key=lambda t: t["rank"])
        assert [t["rank"] for t in ranks] == [0, 1]
        assert set(ranks[0]["batches"]).isdisjoint(ranks[1]["batches"])  # each rank its own batches
        assert ranks[0]["batches"] + ranks[1]["batches"] == reference["batches"]  # together: the global batch
        assert ranks[0]["lr"] == ranks[1]["lr"] == reference["lr"]  # the single-process schedule, step by step
    assert max(t["step"] for t in two) == steps[-1]  # as many optimiser steps, not twice as many

    metrics = json.loads((two_ranks["out"] / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["train_positions"] == setup["positions"]
    assert metrics["positions_this_run"] == 2 * setup["positions"]  # two epochs, no position twice per epoch
    assert [p.name for p in (two_ranks["out"] / "resume").iterdir()] == [f"step-{len(steps):08d}"]
    assert sorted(f.name for f in (two_ranks["out"] / "resume" / f"step-{len(steps):08d}").glob("random_states_*")) \
        == ["random_states_0.pkl", "random_states_1.pkl"]  # one checkpoint, both ranks' state in it
    theirs, ours = heads_state(two_ranks["out"]), heads_state(tmp_path / "heads")
    for key in ours:
        np.testing.assert_allclose(theirs[key], ours[key], rtol=0, atol=1e-4, err_msg=key)


def test_two_rank_run_resumes_to_the_same_heads(setup, two_ranks, tmp_path):
    flags = train_flags(setup, tmp_path / "heads", "--batch-tokens", setup["batch"], "--epochs", "2",
                        "--save-every", "4", "--trace-steps")
    first = launch(flags + ["--stop-after", "5"], 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert max(t["step"] for t in traces(first.stderr)) == 4
    assert not (tmp_path / "heads" / "metrics.json").exists()  # not finished: no final metrics yet
    second = launch(flags, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    assert min(t["step"] for t in traces(second.stderr)) == 5  # resumed, not restarted
    want = heads_state(two_ranks["out"])
    for key, value in heads_state(tmp_path / "heads").items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
