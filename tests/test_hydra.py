"""Hydra heads (sequentially dependent): checkpoint format, level-by-level drafting, training, backends."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from medusa.core.buffers import HEADS, build_buffers, graft_chain, head_levels
from medusa.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medusa.core.config import GenerationConfig, MedusaConfig
from medusa.core.engine import generate_ids
from medusa.core.trees import TOPK, named_trees, validate
from medusa.core.drafts import draft_by_level
from medusa.decoding import TorchTree, generate_candidates
from medusa.heads import HydraHeads, MedusaHeads, heads_from_state
from medusa.train.dataset import IGNORE_INDEX
from medusa.train.trainer import TokenData, TrainConfig, head_inputs, train

from .test_drafts import PROMPTS, tiny_with_heads  # noqa: F401  (a module fixture, used below)
from .test_train import counting_run

X = IGNORE_INDEX
TREE = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


def hydra_config(num_heads: int = 3, shared: bool = True) -> MedusaConfig:
    return MedusaConfig(num_heads, 1, "tiny", shared_lm_head=shared, head_type="hydra")


@pytest.mark.parametrize("shared", [True, False])
def test_hydra_checkpoints_round_trip_and_say_their_type(tmp_path, shared):
    heads = HydraHeads(hydra_config(shared=shared), 8, 20)
    save_checkpoint(tmp_path, heads.config, heads.numpy_state())
    config, state = load_checkpoint(tmp_path)
    assert config.head_type == "hydra" and json.loads((tmp_path / "config.json").read_text())["head_type"] == "hydra"
    assert state["2.proj.weight"].shape == (8, 4 * 8)  # head 2 reads h and 3 token embeddings
    again = heads_from_state(config, state, 8, 20, torch.float32, "cpu")
    assert isinstance(again, HydraHeads)
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_per_head_lm_heads_start_as_the_base_lm_head():
    heads = HydraHeads(hydra_config(2, shared=False), 8, 20)
    base = torch.randn(20, 8)
    heads.init_lm_heads(base)
    for k in range(2):
        torch.testing.assert_close(heads.state_dict()[f"{k}.1.weight"], base)


def test_a_config_that_contradicts_the_weights_is_refused(tmp_path):
    hydra = HydraHeads(hydra_config(), 8, 20)
    save_checkpoint(tmp_path / "h", hydra.config, hydra.numpy_state())
    config = json.loads((tmp_path / "h" / "config.json").read_text())
    (tmp_path / "h" / "config.json").write_text(json.dumps(dict(config, head_type="medusa")))
    with pytest.raises(CheckpointError, match="Hydra input projections"):
        load_checkpoint(tmp_path / "h")
    medusa = MedusaHeads(MedusaConfig(2, 1, shared_lm_head=True), 8, 20)
    save_checkpoint(tmp_path / "m", medusa.config, medusa.numpy_state(), extra={"head_type": "hydra"})
    with pytest.raises(CheckpointError, match="no Hydra input projections"):
        load_checkpoint(tmp_path / "m")
    state = hydra.numpy_state()
    state["1.proj.weight"] = state["1.proj.weight"][:, :16]  # head 1 must read 3 blocks of h
    with pytest.raises(CheckpointError, match="1.proj.weight"):
        heads_from_state(hydra.config, state, 8, 20, torch.float32, "cpu")


def test_a_checkpoint_without_the_field_takes_its_type_from_the_weights(tmp_path):
    hydra = HydraHeads(hydra_config(), 8, 20)
    save_checkpoint(tmp_path, hydra.config, hydra.numpy_state())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["head_type"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_checkpoint(tmp_path)[0].head_type == "hydra"


def test_head_levels_batch_each_head_over_its_distinct_parents():
    b = graft_chain(build_buffers(validate(TREE)), 3)  # the chain's nodes are no head's business
    levels = head_levels(b)
    assert len(levels) == 3
    node = {p: i for i, p in enumerate([()] + TREE)}
    l0, l1, l2 = levels
    assert l0.parents.tolist() == [0] and l0.paths.tolist() == [[0]]
    assert sorted(l0.children.tolist()) == [node[(0,)], node[(1,)]] and l0.topk == 2
    assert l1.parents.tolist() == [node[(0,)], node[(1,)]]
    assert l1.paths.tolist() == [[0, node[(0,)]], [0, node[(1,)]]]
    kids = {int(c): (int(r), int(k)) for c, r, k in zip(l1.children, l1.row, l1.rank)}
    assert kids == {node[(0, 0)]: (0, 0), node[(0, 1)]: (0, 1), node[(1, 0)]: (1, 0)}
    assert l2.paths.tolist() == [[0, node[(0,)], node[(0, 0)]]] and l2.children.tolist() == [node[(0, 0, 0)]]
    covered = np.concatenate([lv.children for lv in levels])
    assert sorted(covered.tolist()) == np.flatnonzero(b.sources == HEADS).tolist()


@pytest.mark.parametrize("tree", ["cpu_small", "mc_sim_7b_63"])
def test_path_blind_heads_draft_what_the_flat_layout_gives(tree):
    """Heads that ignore the path must give exactly the Medusa candidates (same nodes, same order)."""
    b = graft_chain(build_buffers(validate(named_trees()[tree])), 4)
    topk = np.random.default_rng(0).integers(0, 1000, (b.head_depth, TOPK))
    chain = np.array([7, 8, 9, 10])

    def blind(d, hidden, paths, ranks):
        assert hidden == "h" and paths.shape[1] == d + 1
        return np.broadcast_to(topk[d, :ranks], (paths.shape[0], ranks))

    want = generate_candidates(torch.tensor(5), torch.as_tensor(topk), TorchTree.from_buffers(b, "cpu"),
                               torch.as_tensor(chain))
    assert draft_by_level(5, b, head_levels(b), "h", blind, chain).tolist() == want.tolist()


def test_each_head_drafts_from_its_parents_path():
    b = build_buffers(validate(TREE))
    seen = []

    def by_path(d, hidden, paths, ranks):  # token = a code of the path and the rank
        seen.append(paths.tolist())
        return paths.sum(axis=1, keepdims=True) * 10 + np.arange(ranks) + 1

    cand = draft_by_level(3, b, head_levels(b), None, by_path)
    paths = [()] + TREE
    for i, path in enumerate(paths[1:], 1):
        parent = cand[paths.index(path[:-1])] if len(path) > 1 else None
        prefix = [int(cand[paths.index(path[:j])]) for j in range(len(path))]
        assert int(cand[i]) == sum(prefix) * 10 + path[-1] + 1, (path, parent)
    assert seen[0] == [[3]] and len(seen) == 3  # head 0 reads the root alone; one call per head


def markov_cache(tmp_path, vocab=32, hidden=16, n=3000):
    """Tokens of a fixed permutation chain (x_{t+1} = perm[x_t]) behind hidden states of pure noise:
    only a head that reads the token before its target can predict it."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(vocab)
    ids = np.empty(n, np.int64)
    ids[0] = 0
    for i in range(1, n):
        ids[i] = perm[ids[i - 1]] if rng.random() > 0.1 else rng.integers(vocab)  # restarts: every token occurs
    h = rng.standard_normal((n, hidden)).astype(np.float16)
    np.savez(tmp_path / "shard-00000.npz", hidden=h, ids=ids.astype(np.int32), labels=ids.astype(np.int32),
             offsets=np.array([0, n]))
    return tmp_path


def test_hydra_heads_learn_what_medusa_heads_cannot(tmp_path):
    vocab, hidden = 32, 16
    cache = markov_cache(tmp_path / "cache", vocab, hidden)
    embed = nn.Embedding.from_pretrained(torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(1)))
    top1 = {}
    for kind in ("medusa", "hydra"):
        torch.manual_seed(0)
        cls = HydraHeads if kind == "hydra" else MedusaHeads
        heads = cls(MedusaConfig(2, 1, shared_lm_head=False, head_type=kind), hidden, vocab)
        cfg = TrainConfig(num_heads=2, num_layers=1, shared_lm_head=False, epochs=8, batch_tokens=256, lr=1e-2,
                          bf16=False, save_every=1000, head_type=kind)
        data = TokenData(cache, num_heads=2)
        metrics = train(heads, nn.Linear(hidden, vocab, bias=False), data, data, cfg, tmp_path / kind, "tiny",
                        embed if kind == "hydra" else None)
        top1[kind] = metrics["top1"]
    assert max(top1["medusa"]) < 0.15  # noise: about chance (1/32)
    assert min(top1["hydra"]) > 0.6, top1  # 0.9 of the chain is deterministic; head 1 reads the teacher's token
    assert load_checkpoint(tmp_path / "hydra")[0].head_type == "hydra"


def test_hydra_inputs_are_the_tokens_after_each_position(tmp_path):
    ids = np.array([1, 11, 2, 13, 14, 5, 21, 22, 23])
    labels = np.array([X, 11, X, 13, 14, X, 21, 22, 23])  # position 2 is not trained (a user token, say)
    offsets = np.array([0, 5, 9])
    assert head_inputs(ids, offsets, 2).tolist() == [[11, 2], [2, 13], [13, 14], [14, X], [X, X],
                                                      [21, 22], [22, 23], [23, X], [X, X]]
    np.savez(tmp_path / "shard-00000.npz", hidden=np.zeros((9, 4), np.float16), ids=ids, labels=labels,
             offsets=offsets)
    data = TokenData(tmp_path, 2)
    assert data.targets.tolist() == [[X, 13], [13, 14], [14, X], [22, 23], [23, X]]
    assert data.inputs.tolist() == [[11, 2], [2, 13], [13, 14], [21, 22], [22, 23]]  # ids, trained or not
    order = np.arange(len(data))
    assert data.batch_inputs(order, 1, 2).tolist() == [[13, 14], [21, 22]]


@pytest.mark.parametrize("backend", ["torch", "hybrid", "jittor"])
def test_hydra_heads_that_ignore_the_path_decode_like_their_medusa_twins(tiny_with_heads, tmp_path, backend):  # noqa: F811
    """Hydra heads whose projections pass h through are Medusa heads: the same tokens, steps and
    acceptances through the level-by-level path (and, against the baseline, lossless), on every backend."""
    if backend != "torch":
        pytest.importorskip("medusa_jittor.runtime")
    from medusa.core.backends import load_backend

    model, heads_dir = tiny_with_heads
    config, state = load_checkpoint(heads_dir)
    h = state["0.0.linear.weight"].shape[0]
    twin = dict(state)
    for k in range(config.medusa_num_heads):
        proj = np.zeros((h, (k + 2) * h), np.float32)
        proj[:, :h] = np.eye(h)
        twin[f"{k}.proj.weight"], twin[f"{k}.proj.bias"] = proj, np.zeros(h, np.float32)
    save_checkpoint(tmp_path, MedusaConfig(config.medusa_num_heads, 1, str(model), False, head_type="hydra"), twin)
    runs = {}
    sampled = {"typical": GenerationConfig(max_new_tokens=32, temperature=0.7, seed=3, draft="both"),
               "nucleus": GenerationConfig(max_new_tokens=32, temperature=0.7, top_p=0.8, acceptance="nucleus",
                                           seed=3, draft="both")} if backend == "torch" else {}
    for name, where in (("medusa", heads_dir), ("hydra", tmp_path)):
        b = load_backend(backend, model=str(model), heads=str(where), tree="cpu_small", device="cpu")
        assert b.describe()["head_type"] == name
        cfg = GenerationConfig(max_new_tokens=40)
        base, _ = generate_ids(b.decoder, PROMPTS["short"], cfg.with_(medusa=False))
        for draft in ("heads", "both"):
            out, steps = generate_ids(b.decoder, PROMPTS["short"], cfg.with_(draft=draft))
            assert out == base
            runs[name, draft] = [(s.tokens, s.accepted, s.sources) for s in steps]
        for rule, scfg in sampled.items():  # same candidates, same seed: the same samples
            runs[name, rule] = [(s.tokens, s.accepted) for s in generate_ids(b.decoder, PROMPTS["short"], scfg)[1]]
    for key in ["heads", "both", *sampled]:
        assert runs["hydra", key] == runs["medusa", key], key
    assert sum(a for _, a, _ in runs["hydra", "heads"]) > 0


def test_export_refuses_hydra_heads(tmp_path):
    from medusa.export import export

    heads = HydraHeads(hydra_config(2), 8, 20)
    save_checkpoint(tmp_path / "h", heads.config, heads.numpy_state())
    with pytest.raises(CheckpointError, match="no vLLM or TensorRT-LLM"):
        export(tmp_path / "h", tmp_path / "out", "vllm")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_trains_hydra_heads_that_the_torch_backend_runs(tmp_path):
    from medusa.core.backends import load_backend
    from medusa.core.prompts import encode_prompt
    from medusa.train.cli import main

    args = counting_run(tmp_path, epochs=3) + ["--head-type", "hydra", "--backbone-dtype", "float32"]
    trained = main(args)
    config, _ = load_checkpoint(tmp_path / "heads")
    assert config.head_type == "hydra" and len(trained["top1"]) == 2
    assert main(args + ["--eval-only"])["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    b = load_backend("torch", heads=str(tmp_path / "heads"), tree="cpu_small", device="cpu")
    assert b.describe()["head_type"] == "hydra"
    ids = encode_prompt(b.tokenizer, [{"role": "user", "content": "Count from 3 to 12."}])
    cfg = GenerationConfig(max_new_tokens=24)
    base, _ = generate_ids(b.decoder, ids, cfg.with_(medusa=False))
    out, steps = generate_ids(b.decoder, ids, cfg.with_(draft="heads"))
    assert out == base and sum(s.accepted for s in steps) > 0  # counting: the heads learnt it
