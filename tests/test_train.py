"""Head training: target alignment, loss, a tiny run that learns, tree search, checkpoint compatibility."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from medusa.core.checkpoint import load_checkpoint, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.core.trees import TOPK, chain, validate
from medusa.heads import MedusaHeads, heads_from_state
from medusa.train.dataset import IGNORE_INDEX, tokenize_conversation
from medusa.train.trainer import (OUTSIDE, TokenData, TrainConfig, head_targets, latest_resume_state, medusa_loss,
                                  remap_targets, train)
from medusa.train.tree_search import choose_tree, expected_accept_length, greedy_tree

X = IGNORE_INDEX


def test_head_k_targets_the_token_k_plus_2_ahead_within_its_example():
    labels = np.array([X, 11, 12, 13, 14, X, 21, 22, 23])
    offsets = np.array([0, 5, 9])  # two examples: positions 0-4 and 5-8
    t = head_targets(labels, offsets, num_heads=2)
    assert t[:, 0].tolist() == [12, 13, 14, X, X, 22, 23, X, X]
    assert t[:, 1].tolist() == [13, 14, X, X, X, 23, X, X, X]


def test_loss_decay_weights_and_no_nan_without_labels():
    logits = torch.zeros(3, 4, 10)
    targets = torch.tensor([[1, 2, X], [3, X, X], [X, X, X], [4, 5, X]])
    loss, per_head = medusa_loss(logits, targets, decay=0.5)
    ln10 = math.log(10)
    assert per_head == pytest.approx([ln10, ln10, 0.0])
    assert loss.item() == pytest.approx(ln10 + 0.5 * ln10)
    all_ignored, _ = medusa_loss(logits, torch.full((4, 3), X), decay=0.8)
    assert torch.isfinite(all_ignored) and all_ignored.item() == 0.0


def test_labels_only_on_assistant_tokens(smol_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]
    ex = tokenize_conversation(tok, messages, max_length=512)
    labelled = tok.decode([i for i, l in zip(ex.ids, ex.labels) if l != X])
    assert labelled == "Hello! How can I help?<|im_end|>Goodbye.<|im_end|>"
    assert all(l in (X, i) for i, l in zip(ex.ids, ex.labels))
    assert len(tokenize_conversation(tok, messages, max_length=10).ids) == 10


def synthetic_cache(tmp_path, vocab=64, hidden=32, n=3000):
    """Hidden states that encode the future: token t+2 is a fixed function of h_t, learnable by a ResBlock."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, n)
    proj = rng.standard_normal((vocab, hidden)).astype(np.float32)
    h = np.zeros((n, hidden), np.float32)
    h[:-2] = proj[ids[2:]] + 0.1 * rng.standard_normal((n - 2, hidden))
    np.savez(tmp_path / "shard-00000.npz", hidden=h.astype(np.float16), ids=ids.astype(np.int32),
             labels=ids.astype(np.int32), offsets=np.array([0, n]))
    return tmp_path


def test_tiny_training_run_learns(tmp_path):
    torch.manual_seed(0)  # the heads' initial biases
    cache = synthetic_cache(tmp_path / "cache")
    data = TokenData(cache, num_heads=1)
    heads = MedusaHeads(MedusaConfig(1, 1, shared_lm_head=False), 32, 64)
    lm_head = nn.Linear(32, 64, bias=False)
    cfg = TrainConfig(num_heads=1, num_layers=1, shared_lm_head=False, epochs=6, batch_tokens=256, lr=1e-2,
                      bf16=False, save_every=1000)
    metrics = train(heads, lm_head, data, data, cfg, tmp_path / "out", "tiny")
    assert metrics["top1"][0] > 0.5  # chance is 1/64
    cfg2, state = load_checkpoint(tmp_path / "out")
    assert cfg2.medusa_num_heads == 1 and latest_resume_state(tmp_path / "out").name == "step-00000072"
    resumed = train(heads, lm_head, data, data, cfg, tmp_path / "out", "tiny")  # already complete: no new steps
    assert resumed["top1"][0] == pytest.approx(metrics["top1"][0])


def test_remap_targets_to_token_map_rows():
    vocab = np.array([3, 5, 9])
    targets = np.array([[5, X], [4, 9], [3, 10]])
    assert remap_targets(targets, vocab).tolist() == [[1, X], [OUTSIDE, 2], [0, OUTSIDE]]
    logits = torch.zeros(1, 2, 3)
    loss, per_head = medusa_loss(logits, torch.tensor([[OUTSIDE], [X]]), 0.8)  # no target on the map: no loss
    assert loss.item() == 0.0 and per_head == [0.0]


def test_training_over_a_token_map_learns_and_counts_unmapped_targets_as_misses(tmp_path):
    torch.manual_seed(0)  # the heads' initial biases
    cache = synthetic_cache(tmp_path / "cache")
    vocab = np.arange(0, 64, 2)  # half of the vocabulary
    labels = np.load(cache / "shard-00000.npz")["labels"][2:]
    inside = np.isin(labels, vocab).mean()
    data = TokenData(cache, num_heads=1, vocab_ids=vocab)
    heads = MedusaHeads(MedusaConfig(1, 1, shared_lm_head=True), 32, 64)
    rows = nn.Linear(32, len(vocab), bias=False)
    cfg = TrainConfig(num_heads=1, num_layers=1, epochs=8, batch_tokens=256, lr=1e-2, bf16=False, save_every=1000,
                      token_map_size=len(vocab))
    metrics = train(heads, rows, data, data, cfg, tmp_path / "out", "tiny")
    assert 0.8 * inside < metrics["top1"][0] <= inside + 1e-9  # learns the mapped targets, never the others
    assert metrics["tokens"] == len(labels)
    assert load_checkpoint(tmp_path / "out")[0].token_map == "token_map.json"


SYNTH_ACC = [[0.5, 0.15, 0.08] + [0.02] * 7, [0.3, 0.1, 0.05] + [0.02] * 7, [0.2, 0.08] + [0.02] * 8]


def test_greedy_tree_is_valid_and_beats_a_chain():
    for n in (3, 8, 20):
        tree = greedy_tree(SYNTH_ACC, n)
        assert validate(tree) == tree and len(tree) == n and max(len(p) for p in tree) <= 3
        chain_n = tuple((0,) * d for d in range(1, 4))[:n] if n <= 3 else None
        if chain_n is not None:
            assert expected_accept_length(tree, SYNTH_ACC) >= expected_accept_length(chain_n, SYNTH_ACC)
    # at equal size the best tree beats the same-size chain once branching pays off
    three = greedy_tree(SYNTH_ACC, 3)
    assert expected_accept_length(three, SYNTH_ACC) > expected_accept_length(chain(3), SYNTH_ACC)


def test_latency_aware_choice_prefers_small_trees_when_latency_grows_steeply():
    flat = choose_tree(SYNTH_ACC, lambda tree: 0.05, budgets=(1, 4, 16, 32))
    steep = choose_tree(SYNTH_ACC, lambda tree: 0.05 * (1 + 0.2 * len(tree)), budgets=(1, 4, 16, 32))
    assert flat["chosen"]["nodes"] == 32
    assert steep["chosen"]["nodes"] < flat["chosen"]["nodes"]


class OriginalResBlock(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.linear = nn.Linear(h, h)
        self.act = nn.SiLU()


def original_heads(n, layers, h, v):
    """The module structure of FasterDecoding's MedusaModel.medusa_head."""
    return nn.ModuleList(nn.Sequential(*[OriginalResBlock(h) for _ in range(layers)], nn.Linear(h, v, bias=False))
                         for _ in range(n))


def test_fasterdecoding_checkpoints_load_both_ways(tmp_path):
    torch.manual_seed(0)
    theirs = original_heads(3, 2, 16, 40)
    (tmp_path / "theirs").mkdir()
    torch.save(theirs.state_dict(), tmp_path / "theirs" / "medusa_lm_head.pt")
    (tmp_path / "theirs" / "config.json").write_text('{"medusa_num_heads": 3, "medusa_num_layers": 2}')
    cfg, state = load_checkpoint(tmp_path / "theirs")
    ours = heads_from_state(cfg, state, 16, 40, torch.float32, "cpu")
    x = torch.randn(16)
    for k in range(3):
        blocks = theirs[k]
        y = x
        for b in blocks[:-1]:
            y = y + b.act(b.linear(y))
        torch.testing.assert_close(ours(x, None)[k], blocks[-1](y))
    save_checkpoint(tmp_path / "ours", cfg, ours.numpy_state(), fmt="pt")
    back = original_heads(3, 2, 16, 40)
    back.load_state_dict(torch.load(tmp_path / "ours" / "medusa_lm_head.pt"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), theirs.state_dict().values()))


def test_max_steps_shortens_the_run():
    from medusa.train.trainer import TrainConfig

    assert TrainConfig(batch_tokens=100, epochs=2).total_steps(950) == (10, 20)
    assert TrainConfig(batch_tokens=100, epochs=2, max_steps=7).total_steps(950) == (10, 7)


def test_hidden_cache_grows_without_overwriting_its_last_shard(tmp_path):
    from medusa.train.dataset import Example
    from medusa.train.hidden_cache import build_cache, shard_files

    examples = [Example(ids=[i, i + 1], labels=[i, i + 1]) for i in range(7)]
    fn = lambda ids: np.array(ids, np.float32)[:, None].repeat(4, 1)  # noqa: E731 - hidden = token id
    build_cache(fn, 4, examples[:5], tmp_path, shard_size=3)  # shards of 3 + 2 examples
    build_cache(fn, 4, examples, tmp_path, shard_size=3)  # data grew by 2: a new shard, the old ones kept
    shards = [np.load(f) for f in shard_files(tmp_path)]
    assert [len(s["offsets"]) - 1 for s in shards] == [3, 2, 2]
    assert np.concatenate([s["hidden"][:, 0] for s in shards]).tolist() == [i + d for i in range(7) for d in (0, 1)]


def counting_run(tmp_path, epochs: int = 2) -> list[str]:
    """``medusa.train`` arguments for two heads over 12 tiny counting conversations (a token map of
    32 last, so that ``[:-2]`` drops it)."""
    import json

    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Count from {i} to {i + 9}."},
                                                {"from": "gpt", "value": ", ".join(str(i + k) for k in range(10))}]}
             for i in range(12)]
    (tmp_path / "convs.json").write_text(json.dumps(convs))
    return ["--data", str(tmp_path / "convs.json"), "--out", str(tmp_path / "heads"), "--cache-dir",
            str(tmp_path / "cache"), "--max-length", "64", "--eval-fraction", "0.2", "--epochs", str(epochs),
            "--batch-tokens", "128", "--num-heads", "2", "--token-map-size", "32"]


@pytest.mark.slow
def test_cli_trains_over_a_token_map_and_evaluates_with_it(tmp_path):
    from medusa.train.cli import main

    args = counting_run(tmp_path)
    trained = main(args)
    assert load_checkpoint(tmp_path / "heads")[0].token_map == "token_map.json"
    again = main(args[:-2] + ["--eval-only"])  # the heads' own map is used, whatever the flags say
    assert again["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    with pytest.raises(ValueError, match="token.map.size"):
        main(args[:-1] + ["16"])  # another map size into finished heads: refused, never relabelled


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Two accumulated micro-batches of B positions are one optimiser step on their 2B positions:
    same update, and the schedule counts optimiser steps, not micro-batches."""
    data = TokenData(synthetic_cache(tmp_path / "cache", n=2050), num_heads=1)  # 2048 positions: 8 x 256
    cfg = TrainConfig(num_heads=1, num_layers=1, shared_lm_head=False, epochs=2, batch_tokens=256, lr=1e-2,
                      bf16=False, save_every=1000)

    def final_heads(name, **changes):
        torch.manual_seed(0)
        heads, lm_head = MedusaHeads(MedusaConfig(1, 1, shared_lm_head=False), 32, 64), nn.Linear(32, 64, bias=False)
        metrics = train(heads, lm_head, data, None, replace(cfg, **changes), tmp_path / name, "tiny")
        return load_checkpoint(tmp_path / name)[1], metrics

    accumulated, metrics = final_heads("accumulated", grad_accum=2)
    large, _ = final_heads("large", batch_tokens=512)
    small, _ = final_heads("small")
    assert metrics["steps"] == 8 and metrics["positions_per_step"] == 512
    for key in accumulated:
        np.testing.assert_allclose(accumulated[key], large[key], rtol=0, atol=1e-5, err_msg=key)
    assert any(np.abs(accumulated[k] - small[k]).max() > 1e-3 for k in small)


def test_token_data_maps_the_hidden_states_instead_of_loading_them(tmp_path):
    """A cache far larger than RAM must still train: TokenData keeps targets, not hidden states."""
    import tracemalloc

    rng = np.random.default_rng(0)
    tokens, hidden = 8192, 512  # 8 MB of fp16 hidden states per shard
    for n in range(2):
        labels = rng.integers(0, 100, tokens).astype(np.int32)
        np.savez(tmp_path / f"shard-{n:05d}.npz", hidden=rng.standard_normal((tokens, hidden)).astype(np.float16),
                 ids=labels, labels=labels, offsets=np.array([0, tokens]))
    tracemalloc.start()
    data = TokenData(tmp_path, num_heads=2)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.0f} MB held for {2 * tokens * hidden * 2 / 2**20:.0f} MB of hidden states"
    order = data.order(seed=0)
    got, _ = data.batch(order, 3, 100)
    rows = order[300:400]
    shard1 = np.load(tmp_path / "shard-00001.npz")["hidden"]
    kept_per_shard = tokens - 2  # the last two positions of each shard train no head
    want = [shard1[r - kept_per_shard] if r >= kept_per_shard else np.load(tmp_path / "shard-00000.npz")["hidden"][r]
            for r in rows]
    np.testing.assert_array_equal(got, np.asarray(want, dtype=np.float32))
