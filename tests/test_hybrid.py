"""The hybrid backend: Jittor heads mirror the PyTorch heads (on every device), checkpoints cross both
ways, Jittor training learns (greedy output of all three backends: ``test_jittor_all``)."""
import numpy as np
import pytest
import torch

from medusa.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.heads import MedusaHeads as TorchHeads
from medusa.heads import heads_from_state as torch_heads_from_state

from .conftest import import_jittor_or_skip

jt = import_jittor_or_skip()
import medusa_jittor.heads as jt_heads  # noqa: E402


def random_torch_heads(config, h=32, v=50):
    torch.manual_seed(0)
    heads = TorchHeads(config, h, v)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.2)
    return heads


@pytest.mark.parametrize("shared", [False, True])
def test_jittor_heads_match_torch_heads(shared, jt_device):
    config = MedusaConfig(3, 2, shared_lm_head=shared)
    th = random_torch_heads(config)
    jh = jt_heads.heads_from_state(config, th.numpy_state(), 32, 50)
    lm = torch.nn.Linear(32, 50, bias=False)
    jlm = jt.nn.Linear(32, 50, bias=False)
    jlm.weight.assign(jt.array(lm.weight.detach().numpy()))
    th, lm, x = th.to(jt_device), lm.to(jt_device), torch.randn(7, 32)
    with torch.no_grad():
        want = th(x.to(jt_device), lm).cpu().numpy()
    got = jh(jt.array(x.numpy()), jlm).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5
    x, x0 = x.to(jt_device), jt.array(x[0].numpy())
    assert (jh.topk(x0, jlm).numpy() == th.topk(x[0], lm).cpu().numpy()).all()
    partial = th.topk(x[0], lm, depth=2, k=3).cpu()  # only what a tree uses: 2 heads, 3 ranks, zero-padded
    assert partial.shape == (2, 10) and (partial[:, 3:] == 0).all()
    assert (partial[:, :3] == th.topk(x[0], lm)[:2, :3].cpu()).all()
    assert (jh.topk(x0, jlm, 2, 3).numpy() == partial.numpy()).all()


def test_checkpoint_round_trip_torch_jittor_torch_is_bit_exact(tmp_path):
    config = MedusaConfig(2, 1, shared_lm_head=False)
    th = random_torch_heads(config)
    save_checkpoint(tmp_path / "a", config, th.numpy_state())
    jh = jt_heads.heads_from_state(*load_checkpoint(tmp_path / "a"), 32, 50)
    save_checkpoint(tmp_path / "b", config, jh.numpy_state())
    back = torch_heads_from_state(*load_checkpoint(tmp_path / "b"), 32, 50, torch.float32, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(th.state_dict().values(), back.state_dict().values()))


@pytest.mark.slow
def test_hybrid_rejects_incompatible_heads(tmp_path):
    from medusa.core.backends import load_backend

    bad = {"0.0.linear.weight": np.zeros((8, 8), np.float32), "0.0.linear.bias": np.zeros(8, np.float32)}
    save_checkpoint(tmp_path, MedusaConfig(1, 1, shared_lm_head=True), bad)
    with pytest.raises(CheckpointError, match="another model"):
        load_backend("hybrid", heads=str(tmp_path))
    with pytest.raises(CheckpointError, match="no such directory"):
        load_backend("hybrid", heads=str(tmp_path / "missing"))


def test_tiny_jittor_training_run_learns(tmp_path):
    from medusa.train.trainer import TokenData, TrainConfig
    from medusa_jittor.train import train

    from .test_train import synthetic_cache

    data = TokenData(synthetic_cache(tmp_path / "cache"), num_heads=1)
    heads = jt_heads.MedusaHeads(MedusaConfig(1, 1, shared_lm_head=False), 32, 64)
    lm = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    heads.init_lm_heads(lm)
    cfg = TrainConfig(num_heads=1, num_layers=1, shared_lm_head=False, epochs=6, batch_tokens=256, lr=1e-2,
                      bf16=False, save_every=1000)
    metrics = train(heads, lm, data, data, cfg, tmp_path / "out", "tiny")
    assert metrics["top1"][0] > 0.5  # chance is 1/64
    assert metrics["train_tokens_per_second"] > 0
    config, state = load_checkpoint(tmp_path / "out")  # the PyTorch side reads what Jittor wrote
    torch_heads_from_state(config, state, 32, 64, torch.float32, "cpu")


def test_a_killed_child_or_ctrl_c_does_not_end_a_process_that_imported_jittor():
    """Jittor's own SIGCHLD/SIGINT handlers exit(1) silently when any child dies of a signal: a test
    runner, server or recipe that kills a child would die with it, and Ctrl-C would skip cleanup."""
    import subprocess
    import sys

    script = """
import signal, subprocess, os
from medusa_jittor.runtime import jt
child = subprocess.Popen(["sleep", "30"])
child.kill()
assert child.wait() == -signal.SIGKILL
try:
    os.kill(os.getpid(), signal.SIGINT)
    import time; time.sleep(1)
except KeyboardInterrupt:
    print("survived")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "survived", run.stderr[-2000:]


def test_importing_jittor_keeps_pythons_recursion_limit():
    """Jittor sets it to 10^6: deep recursion then overflows the C stack (a segfault) instead of
    raising RecursionError, e.g. for a deeply nested JSON body sent to the server."""
    import subprocess
    import sys

    script = "import sys; before = sys.getrecursionlimit(); from medusa_jittor.runtime import jt; " \
             "print(before, sys.getrecursionlimit())"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    before, after = run.stdout.split()
    assert run.returncode == 0 and before == after, run.stderr[-2000:]
