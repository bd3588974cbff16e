"""Our PyTorch Llama against HF transformers (the oracle), tree verification and KV compaction."""
import pytest
import torch

from medusa.core.buffers import build_buffers
from medusa.core.trees import named_trees, validate
from medusa.decoding import TorchTree, tree_decode
from medusa.llama import KVCache, load_llama
from medusa.train.distill import batched_generate

from .conftest import make_hf_model

VARIANTS = {
    "llama-gqa": ("llama", {}),
    "llama-tied-mha": ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    "llama3-rope-scaling": ("llama", {"rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    "qwen2-bias": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}


def prefill(model, ids, cache):
    t = len(ids)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    out = model(torch.tensor([ids]), torch.arange(t) + cache.length, torch.cat(
        [torch.ones(t, cache.length, dtype=torch.bool), mask], 1), cache)
    cache.commit(t)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pack", [False, True])
def test_logits_match_hf(tmp_path, variant, pack):
    model_type, overrides = VARIANTS[variant]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    ours = load_llama(tmp_path, pack=pack)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits[0]
        cache = KVCache(ours.args, 64, torch.float32, "cpu")
        got = ours.logits(prefill(ours, ids[0].tolist(), cache))[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_full_forward(tiny_dir):
    model = load_llama(tiny_dir)
    ids = list(range(3, 23))
    with torch.no_grad():
        full = model.logits(prefill(model, ids, KVCache(model.args, 64, torch.float32, "cpu")))[0]
        cache = KVCache(model.args, 64, torch.float32, "cpu")
        prefill(model, ids[:10], cache)
        for i in range(10, 20):
            h = model(torch.tensor([[ids[i]]]), torch.tensor([cache.length]), None, cache)
            cache.commit(1)
            torch.testing.assert_close(model.logits(h)[0, 0], full[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "cpu_medium", "chain4"])
def test_tree_logits_equal_sequential_logits(tiny_dir, name):
    model = load_llama(tiny_dir)
    tree = TorchTree.from_buffers(build_buffers(validate(named_trees()[name])), "cpu")
    prompt = [5, 17, 33, 2, 99, 7]
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randint(0, 256, (tree.num_nodes,), generator=gen)
    with torch.no_grad():
        cache = KVCache(model.args, 128, torch.float32, "cpu")
        prefill(model, prompt, cache)
        _, tree_logits = tree_decode(model, cache, candidates, tree)
        parents = tree.parents.tolist()
        for node in range(tree.num_nodes):
            path = [node]
            while path[-1] != 0:
                path.append(parents[path[-1]])
            seq = prompt + candidates[path[::-1]].tolist()
            ref = model.logits(prefill(model, seq, KVCache(model.args, 128, torch.float32, "cpu")))[0, -1]
            torch.testing.assert_close(tree_logits[node], ref, rtol=1e-4, atol=1e-4)


def test_compaction_equals_fresh_prefill(tiny_dir):
    model = load_llama(tiny_dir)
    tree = TorchTree.from_buffers(build_buffers(validate(named_trees()["cpu_medium"])), "cpu")
    prompt = [5, 17, 33, 2, 99, 7]
    candidates = torch.randint(0, 256, (tree.num_nodes,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = KVCache(model.args, 128, torch.float32, "cpu")
        prefill(model, prompt, cache)
        tree_decode(model, cache, candidates, tree)
        path = tree.retrieve_indices[2][tree.retrieve_indices[2] >= 0]
        cache.compact(path)
        fresh = KVCache(model.args, 128, torch.float32, "cpu")
        prefill(model, prompt + candidates[path].tolist(), fresh)
    n = fresh.length
    assert cache.length == n
    torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], rtol=1e-5, atol=1e-5)


def test_batched_generation_equals_one_by_one(tiny_dir):
    model = load_llama(tiny_dir)
    prompts = [[5, 6, 7], [9] * 11, [100, 3, 4, 5, 6]]
    outs = batched_generate(model, prompts, 12, stop_ids=[7, 8])
    for p, out in zip(prompts, outs):
        assert out == batched_generate(model, [p], 12, stop_ids=[7, 8])[0]
        assert all(t not in (7, 8) for t in out[:-1])
