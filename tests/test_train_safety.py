"""Training that cannot destroy: faults injected into head training and the hidden-state cache.

- ``kill -9`` mid-training, rerun: the same final heads as an uninterrupted run (bit for bit: the
  resume state holds heads, AdamW moments and scheduler exactly, and the data order is seeded).
- A failing save (disk full) leaves the previous resume state as it was; a rerun finishes alike.
- ``kill -9`` in the middle of writing a cache shard: the partial file is never loaded as a shard.
- ``--eval-only`` (PyTorch and Jittor trainers) writes ``eval_metrics.json`` and nothing else.
- The Jittor trainer refuses what it does not do (``--grad-accum`` > 1, several processes) and
  resumes exactly.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medusa.core.checkpoint import load_checkpoint
from medusa.core.config import MedusaConfig
from medusa.heads import MedusaHeads
from medusa.train.dataset import Example
from medusa.train.hidden_cache import build_cache, shard_files
from medusa.train.trainer import RESUME_DIR, TokenData, TrainConfig, TrainError, latest_resume_state, train

from .test_train import synthetic_cache
from .test_train_distributed import heads_state, launch, prepared_setup, train_flags


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return prepared_setup(tmp_path_factory.mktemp("tiny-train"))


def files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_training_killed_mid_run_resumes_to_the_heads_of_an_uninterrupted_run(setup, tmp_path):
    from medusa.train.cli import main

    def flags(out):
        return train_flags(setup, out, "--batch-tokens", setup["batch"], "--epochs", "30", "--save-every", "10")

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "medusa.train", *flags(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while latest_resume_state(killed) is None:  # kill -9 once a first state is saved, mid-run
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9 and not (killed / "metrics.json").exists()
    stopped_at = int(latest_resume_state(killed).name.split("-")[1])
    main(flags(killed))  # resumes
    assert int(latest_resume_state(killed).name.split("-")[1]) > stopped_at
    main(flags(tmp_path / "whole"))
    want = heads_state(tmp_path / "whole")
    for key, value in heads_state(killed).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)


def fresh_heads() -> tuple[MedusaHeads, nn.Linear]:
    torch.manual_seed(0)
    return MedusaHeads(MedusaConfig(1, 1, shared_lm_head=False), 32, 64), nn.Linear(32, 64, bias=False)


def test_a_failing_save_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch):
    data = TokenData(synthetic_cache(tmp_path / "cache", n=1500), num_heads=1)
    cfg = TrainConfig(num_heads=1, shared_lm_head=False, epochs=2, batch_tokens=128, lr=1e-2, bf16=False, save_every=4)
    out = tmp_path / "out"
    train(*fresh_heads(), data, None, replace(cfg, stop_after=4), out, "tiny")
    saved = files(out / RESUME_DIR)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", disk_full)  # accelerate writes the optimiser state with torch.save
        with pytest.raises(TrainError, match="No space left on device.*previous checkpoint"):
            train(*fresh_heads(), data, None, cfg, out, "tiny")  # resumes at 4, fails saving step 8
    assert files(out / RESUME_DIR) == saved  # the step-4 state untouched, no temporary left behind
    load_checkpoint(out)  # the published heads load too
    train(*fresh_heads(), data, None, cfg, out, "tiny")
    train(*fresh_heads(), data, None, cfg, tmp_path / "whole", "tiny")
    want = heads_state(tmp_path / "whole")
    for key, value in heads_state(out).items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)


DIE_WRITING_SECOND_SHARD = """
import io, os, signal, sys
from pathlib import Path
import numpy as np
from medusa.train.dataset import Example
from medusa.train.hidden_cache import build_cache

real_savez, calls = np.savez, []

def savez_then_die(file, **arrays):  # the second shard: half of its bytes reach the disk, then kill -9
    calls.append(file)
    if len(calls) == 1:
        return real_savez(file, **arrays)
    buffer = io.BytesIO()
    real_savez(buffer, **arrays)
    half = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if hasattr(file, "write"):
        file.write(half)
        file.flush()
    else:  # given a name, np.savez writes to it with ".npz" appended when missing
        Path(str(file) if str(file).endswith(".npz") else f"{file}.npz").write_bytes(half)
    os.kill(os.getpid(), signal.SIGKILL)

np.savez = savez_then_die
examples = [Example(ids=[i, i + 1, i + 2], labels=[i, i + 1, i + 2]) for i in range(6)]
build_cache(lambda ids: np.array(ids, np.float32)[:, None].repeat(4, 1), 4, examples, Path(sys.argv[1]), shard_size=2)
"""


def test_a_shard_cut_short_by_kill_is_never_loaded(tmp_path):
    died = subprocess.run([sys.executable, "-c", DIE_WRITING_SECOND_SHARD, str(tmp_path / "cache")])
    assert died.returncode == -9
    examples = [Example(ids=[i, i + 1, i + 2], labels=[i, i + 1, i + 2]) for i in range(6)]
    fn = lambda ids: np.array(ids, np.float32)[:, None].repeat(4, 1)  # noqa: E731 - hidden = token id
    assert [f.name for f in shard_files(tmp_path / "cache")] == ["shard-00000.npz"]
    build_cache(fn, 4, examples, tmp_path / "cache", shard_size=2)  # the rerun completes the cache
    build_cache(fn, 4, examples, tmp_path / "clean", shard_size=2)
    names = [sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("cache", "clean")]
    assert names[0] == names[1]  # no leftover of the killed write
    got, want = (TokenData(tmp_path / d, num_heads=1) for d in ("cache", "clean"))
    for (h1, t1), (h2, t2) in zip(got.batches(4, seed=None), want.batches(4, seed=None), strict=True):
        np.testing.assert_array_equal(h1, h2)
        np.testing.assert_array_equal(t1, t2)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """Heads trained by ``python -m medusa.train`` (in-process), with their training metrics."""
    from medusa.train.cli import main

    out = tmp_path_factory.mktemp("trained") / "heads"
    main(train_flags(setup, out, "--batch-tokens", setup["batch"], "--epochs", "2", "--save-every", "100"))
    return out


def test_eval_only_writes_eval_metrics_and_touches_nothing_else(setup, trained):
    from medusa.train.cli import main

    before = files(trained)
    metrics = main(train_flags(setup, trained, "--eval-only", "--num-heads", "4"))  # the heads say they have 2
    after = files(trained)
    assert json.loads(after.pop("eval_metrics.json")) == metrics and len(metrics["top1"]) == 2
    assert after == before  # heads, config.json, metrics.json, resume state: byte for byte
    assert "train_tokens_per_second" in json.loads(after["metrics.json"])


def test_jittor_eval_only_writes_eval_metrics_and_touches_nothing_else(setup, trained):
    from .conftest import import_jittor_or_skip

    import_jittor_or_skip()
    from medusa_jittor.train import main

    before = files(trained)
    before.pop("eval_metrics.json", None)
    metrics = main(train_flags(setup, trained, "--eval-only"))
    after = files(trained)
    assert json.loads(after.pop("eval_metrics.json")) == metrics
    assert after == before
    torch_metrics = json.loads((trained / "metrics.json").read_text())  # the same heads, measured by PyTorch
    assert metrics["top1"] == pytest.approx(torch_metrics["top1"], abs=0.02)


def test_jittor_trainer_rejects_gradient_accumulation(setup, tmp_path):
    from .conftest import import_jittor_or_skip

    import_jittor_or_skip()
    from medusa_jittor.train import main

    with pytest.raises(TrainError, match="--grad-accum 2"):
        main(train_flags(setup, tmp_path / "heads", "--grad-accum", "2"))
    assert not (tmp_path / "heads").exists()


def test_jittor_trainer_refuses_several_processes(setup, tmp_path):
    from .conftest import import_jittor_or_skip

    import_jittor_or_skip()
    run = launch(train_flags(setup, tmp_path / "heads", "--epochs", "1"), ranks=2, module="medusa_jittor.train")
    # our error, exit 2 (torchrun may stop the other rank before it reports its own exit code)
    assert run.returncode != 0 and run.stderr.count("exitcode  : 2") >= 1
    assert "Jittor head training runs in one process only" in run.stderr
    assert 'medusa_jittor/train.py", line' not in run.stderr  # one log line, no traceback of ours
    assert not (tmp_path / "heads").exists()


def test_jittor_training_stopped_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    from .conftest import import_jittor_or_skip

    jt = import_jittor_or_skip()
    from medusa_jittor.heads import MedusaHeads as JittorHeads
    from medusa_jittor.train import train as jittor_train

    data = TokenData(synthetic_cache(tmp_path / "cache", n=1500), num_heads=1)
    lm = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    cfg = TrainConfig(num_heads=1, shared_lm_head=False, epochs=2, batch_tokens=128, lr=1e-2, bf16=False, save_every=4)

    def run(out, stop_after=0):
        jt.set_global_seed(0)
        heads = JittorHeads(MedusaConfig(1, 1, shared_lm_head=False), 32, 64)
        heads.init_lm_heads(lm)
        return jittor_train(heads, lm, data, None, replace(cfg, stop_after=stop_after), out, "tiny")

    assert run(tmp_path / "stopped", stop_after=5) == {"step": 5, "total_steps": 24}
    run(tmp_path / "stopped")
    run(tmp_path / "whole")
    want = heads_state(tmp_path / "whole")
    for key, value in heads_state(tmp_path / "stopped").items():
        np.testing.assert_allclose(value, want[key], rtol=0, atol=1e-6, err_msg=key)
