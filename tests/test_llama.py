"""Our PyTorch Llama against HF transformers (the oracle), tree verification, KV compaction and
batched plain decoding; each on every device (``device``: cpu, and cuda where present)."""
import pytest
import torch

from medusa.backend import TorchDecoder
from medusa.core.buffers import build_buffers
from medusa.core.config import GenerationConfig
from medusa.core.engine import generate_ids
from medusa.core.trees import chain, named_trees, validate
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
    t, dev = len(ids), cache.k.device
    mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
    out = model(torch.tensor([ids], device=dev), torch.arange(t, device=dev) + cache.length, torch.cat(
        [torch.ones(t, cache.length, dtype=torch.bool, device=dev), mask], 1), cache)
    cache.commit(t)
    return out


def new_cache(model, max_len):
    w = model.tok_embeddings.weight
    return KVCache(model.args, max_len, w.dtype, w.device)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pack", [False, True])
def test_logits_match_hf(tmp_path, variant, pack, device):
    model_type, overrides = VARIANTS[variant]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    ours = load_llama(tmp_path, device=device, pack=pack)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits[0]  # the oracle runs on the CPU
        got = ours.logits(prefill(ours, ids[0].tolist(), new_cache(ours, 64)))[0].cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_full_forward(tiny_dir, device):
    model = load_llama(tiny_dir, device=device)
    ids = list(range(3, 23))
    with torch.no_grad():
        full = model.logits(prefill(model, ids, new_cache(model, 64)))[0]
        cache = new_cache(model, 64)
        prefill(model, ids[:10], cache)
        for i in range(10, 20):
            h = model(torch.tensor([[ids[i]]], device=device), torch.tensor([cache.length], device=device), None, cache)
            cache.commit(1)
            torch.testing.assert_close(model.logits(h)[0, 0], full[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "cpu_medium", "chain4"])
def test_tree_logits_equal_sequential_logits(tiny_dir, name, device):
    model = load_llama(tiny_dir, device=device)
    tree = TorchTree.from_buffers(build_buffers(validate(named_trees()[name])), device)
    prompt = [5, 17, 33, 2, 99, 7]
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randint(0, 256, (tree.num_nodes,), generator=gen).to(device)
    with torch.no_grad():
        cache = new_cache(model, 128)
        prefill(model, prompt, cache)
        _, tree_logits = tree_decode(model, cache, candidates, tree)
        parents = tree.parents.tolist()
        for node in range(tree.num_nodes):
            path = [node]
            while path[-1] != 0:
                path.append(parents[path[-1]])
            seq = prompt + candidates[path[::-1]].tolist()
            ref = model.logits(prefill(model, seq, new_cache(model, 128)))[0, -1]
            torch.testing.assert_close(tree_logits[node], ref, rtol=1e-4, atol=1e-4)


def test_compaction_equals_fresh_prefill(tiny_dir, device):
    model = load_llama(tiny_dir, device=device)
    tree = TorchTree.from_buffers(build_buffers(validate(named_trees()["cpu_medium"])), device)
    prompt = [5, 17, 33, 2, 99, 7]
    candidates = torch.randint(0, 256, (tree.num_nodes,), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        cache = new_cache(model, 128)
        prefill(model, prompt, cache)
        tree_decode(model, cache, candidates, tree)
        path = tree.retrieve_indices[2][tree.retrieve_indices[2] >= 0]
        cache.compact(path)
        fresh = new_cache(model, 128)
        prefill(model, prompt + candidates[path].tolist(), fresh)
    n = fresh.length
    assert cache.length == n
    torch.testing.assert_close(cache.k[:, :, :, :n], fresh.k[:, :, :, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :, :n], fresh.v[:, :, :, :n], rtol=1e-5, atol=1e-5)


def greedy_reference(model, prompt, max_new_tokens, stop_ids=()):
    """The decoding engine's own greedy output (baseline arm): the oracle of batched decoding."""
    tree = TorchTree.from_buffers(build_buffers(chain(1)), model.tok_embeddings.weight.device)
    decoder = TorchDecoder(model, None, tree, max_len=64)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, medusa=False, stop_token_ids=tuple(stop_ids))
    return generate_ids(decoder, prompt, cfg)[0]


def test_batched_generation_equals_one_by_one(tmp_path, device):
    """Left-padded rows of different lengths; one row stops early and leaves the batch mid-way."""
    make_hf_model(tmp_path, initializer_range=0.1)  # weights large enough that positions change the argmax
    model = load_llama(tmp_path, device=device)
    prompts = [[5, 6, 7], [9] * 11, [100, 3, 4, 5, 6]]
    free = [greedy_reference(model, p, 12) for p in prompts]
    # a stop token that row 0 emits after a few tokens and no other row emits at all
    stop = next(t for t in free[0][2:] if all(t not in other for other in free[1:]))
    want = [greedy_reference(model, p, 12, [stop]) for p in prompts]
    assert len(want[0]) < 12 and want[0][-1] == stop and [len(w) for w in want[1:]] == [12, 12]
    assert batched_generate(model, prompts, 12, stop_ids=[stop]) == want
