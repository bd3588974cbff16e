"""The full-Jittor backend: Jittor Llama vs HF and our PyTorch Llama, tree verification, the fixed-shape
cache (no recompilation after warm-up), acceptance semantics vs the PyTorch reference, and greedy
output equal to the baseline in all three backends.  Device-path tests run on the CPU and on CUDA
(``jt_device``); the CPU loop-nest kernels are compared with the op graph, which CUDA runs instead."""
import numpy as np
import pytest
import torch

from medusa.core.backends import FRESH_HEADS, BackendError, load_backend
from medusa.core.buffers import build_buffers
from medusa.core.config import GenerationConfig
from medusa.core.engine import generate_ids
from medusa.core.prompts import encode_prompt, stop_token_ids
from medusa.core.trees import TOPK, named_trees, validate
from medusa.core.trees import resolve as resolve_tree
from medusa.decoding import evaluate_posterior as torch_posterior

from .conftest import import_jittor_or_skip, make_hf_model
from .test_decoding import NUCLEUS_DRAWS, PATHS, assert_follows, first_two, nucleus_case
from .test_decoding import TREE as TORCH_TREE
from .test_decoding import V, peaked
from .test_llama import VARIANTS

jt = import_jittor_or_skip()
import medusa_jittor_all.llama as jtl  # noqa: E402
from medusa_jittor.heads import MedusaHeads  # noqa: E402
from medusa_jittor_all.backend import JittorDecoder  # noqa: E402
from medusa_jittor_all.decoding import JittorTree, additive_mask, evaluate_posterior, tree_decode  # noqa: E402
from medusa_jittor_all.kernels import (FEW_ROWS, attend, attend_ops, linear, rms_norm, rms_norm_ops,  # noqa: E402
                                       split_heads, split_heads_ops, swiglu, swiglu_ops)


def jt_prefill(model, ids, cache):
    """Causal forward of ``ids`` after the cache's committed entries -> hidden [T, h] (numpy)."""
    t = len(ids)
    mask = additive_mask(cache.length, np.tril(np.ones((t, t), bool)), cache.window(t))
    with jt.no_grad():
        out = model(jt.array(np.array([ids], np.int32)), np.arange(t) + cache.length, mask, cache)[0]
    cache.commit(t)
    return out


def logits_np(model, hidden):
    with jt.no_grad():
        return model.logits(hidden).numpy()


@pytest.mark.parametrize("variant", ["llama-gqa", "llama-tied-mha", "llama3-rope-scaling", "qwen2-bias"])
def test_jittor_logits_match_hf(tmp_path, variant, jt_device):
    model_type, overrides = VARIANTS[variant]
    hf = make_hf_model(tmp_path, model_type, **overrides)
    ours = jtl.load_llama(tmp_path)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits[0].numpy()
    got = logits_np(ours, jt_prefill(ours, ids[0].tolist(), jtl.KVCache(ours.args, 64)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def kernel_keys(run):
    """The set of Jittor kernels (jit keys) that ``run()`` executes: a new key is a new compilation."""
    jt.profiler.start(0, 0)
    run()
    jt.profiler.stop()
    return {row[0] for row in jt.profiler.report()[1:]}


def traced(fn, *args):
    """(fn's outputs as numpy arrays, whether it ran a CPU loop-nest kernel, i.e. a ``jt.code`` op)."""
    outs = []

    def run():
        result = fn(*args)
        outs.extend(o.numpy() for o in (result if isinstance(result, tuple) else (result,)))

    return outs, any(key.startswith("code") for key in kernel_keys(run))


def against_the_other_path(fn, fn_ops, *args):
    """``fn`` on the test's device against the other implementation of it: the op graph where ``fn``
    ran the CPU kernel, the CPU kernel where ``fn`` ran the op graph (CUDA): never a path against itself."""
    got, got_kernel = traced(fn, *args)
    assert got_kernel == (not jt.flags.use_cuda), "the CPU runs the loop-nest kernel, CUDA the op graph"
    if got_kernel:
        want, want_kernel = traced(fn_ops, *args)
    else:
        with jt.flag_scope(use_cuda=0):
            want, want_kernel = traced(fn, *args)
    assert want_kernel != got_kernel
    return got, want


@pytest.mark.parametrize("heads,kv,t,length,width", [
    (9, 3, 1, 40, 96), (9, 3, 7, 40, 96), (4, 4, 5, 40, 96), (8, 2, 33, 40, 96),
    (9, 3, 12, 40, 75),  # a window that is no multiple of the kernel's key block
    (9, 3, 41, 0, 64),  # a prefill: early queries see no entry of the last key blocks
])
def test_attention_kernel_equals_the_op_graph(jt_device, heads, kv, t, length, width):
    rng = np.random.default_rng(t)
    cap = 128  # cache capacity
    q = jt.array(rng.standard_normal((1, heads, t, 16)).astype(np.float32))
    keys, values = (jt.array(rng.standard_normal((1, kv, cap, 16)).astype(np.float32)) for _ in range(2))
    block = (rng.random((t, t)) < 0.5) | np.eye(t, dtype=bool)  # any block; every query sees itself
    mask = additive_mask(length, block, width)
    [got], [want] = against_the_other_path(attend, attend_ops, q, keys, values, mask)
    assert got.shape == (1, t, heads * 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not jt.flags.use_cuda:  # each query's result is the one it gets alone, bit for bit
        for i in range(t):
            alone = attend(q[:, :, i:i + 1], keys, values, mask[i:i + 1]).numpy()
            np.testing.assert_array_equal(got[:, i], alone[:, 0])


def linear_ops(x, weight, bias=None):
    y = jt.nn.matmul_transpose(x.reshape(-1, x.shape[-1]), weight).reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


@pytest.mark.parametrize("rows,outputs", [(1, 48), (3, 50), (FEW_ROWS, 7)])  # 50, 7: no multiple of 4
def test_linear_kernel_equals_the_op_graph_and_ignores_the_row_count(jt_device, rows, outputs):
    rng = np.random.default_rng(rows)
    x = jt.array(rng.standard_normal((1, rows, 40)).astype(np.float32))
    weight, bias = (jt.array(rng.standard_normal(shape).astype(np.float32)) for shape in ((outputs, 40), (outputs,)))
    [got], [want] = against_the_other_path(linear, linear_ops, x, weight, bias)
    assert got.shape == (1, rows, outputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if not jt.flags.use_cuda:  # a tree step's row equals the same row decoded alone, bit for bit
        alone = np.stack([linear(x[:, r:r + 1], weight, bias).numpy()[0, 0] for r in range(rows)])
        np.testing.assert_array_equal(got[0], alone)


@pytest.mark.parametrize("rows,inter", [(1, 102), (5, 102), (3, 64)])  # 102: columns past whole vectors
def test_swiglu_kernel_equals_the_op_graph_and_ignores_the_row_count(jt_device, rows, inter):
    x = jt.array(np.random.default_rng(inter).standard_normal((1, rows, 2 * inter)).astype(np.float32) * 4)
    [got], [want] = against_the_other_path(swiglu, swiglu_ops, x)
    assert got.shape == (1, rows, inter)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if not jt.flags.use_cuda:
        alone = np.stack([swiglu(x[:, r:r + 1]).numpy()[0, 0] for r in range(rows)])
        np.testing.assert_array_equal(got[0], alone)


def test_linear_runs_longer_inputs_as_a_matmul():
    x = jt.array(np.ones((FEW_ROWS + 1, 8), dtype=np.float32))
    assert not traced(linear, x, jt.array(np.ones((4, 8), dtype=np.float32)))[1]


@pytest.mark.parametrize("heads,kv,t", [(9, 3, 1), (4, 4, 6), (8, 2, 33)])
def test_rope_split_and_rms_norm_kernels_equal_the_op_graph(jt_device, heads, kv, t):
    rng = np.random.default_rng(t)
    qkv = jt.array(rng.standard_normal((2, t, (heads + 2 * kv) * 16)).astype(np.float32))
    angles = rng.random((t, 8)) * 6
    cos, sin = (jt.array(np.concatenate([f(angles)] * 2, -1).astype(np.float32)) for f in (np.cos, np.sin))
    got, want = against_the_other_path(split_heads, split_heads_ops, qkv, cos, sin, heads, kv)
    assert [g.shape for g in got] == [w.shape for w in want] and len(got) == 3
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    x, w = jt.array(rng.standard_normal((2, t, 48)).astype(np.float32)), jt.array(rng.random(48).astype(np.float32))
    [got], [want] = against_the_other_path(rms_norm, rms_norm_ops, x, w, 1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decode_across_window_buckets_matches_full_forward(tiny_dir, jt_device):
    model = jtl.load_llama(tiny_dir)
    ids = [(7 * i) % 251 for i in range(140)]  # crosses window buckets (WINDOW = 32)
    full = logits_np(model, jt_prefill(model, ids, jtl.KVCache(model.args, 256)))
    cache = jtl.KVCache(model.args, 256)
    jt_prefill(model, ids[:120], cache)
    for i in range(120, 140):
        step = logits_np(model, jt_prefill(model, [ids[i]], cache))[0]
        np.testing.assert_allclose(step, full[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mc_sim_7b_63", "cpu_medium"])
def test_tree_logits_equal_sequential_logits(tiny_dir, name, jt_device):
    model = jtl.load_llama(tiny_dir)
    tree = JittorTree.from_buffers(build_buffers(validate(named_trees()[name])))
    prompt = [5, 17, 33, 2, 99, 7]
    candidates = np.random.default_rng(0).integers(0, 256, tree.num_nodes).astype(np.int32)
    cache = jtl.KVCache(model.args, 128)
    jt_prefill(model, prompt, cache)
    with jt.no_grad():
        tree_logits = tree_decode(model, cache, candidates, tree)[1].numpy()
    for node in range(tree.num_nodes):
        path = [node]
        while path[-1] != 0:
            path.append(int(tree.parents[path[-1]]))
        seq = prompt + candidates[path[::-1]].tolist()
        ref = logits_np(model, jt_prefill(model, seq, jtl.KVCache(model.args, 128)))[-1]
        np.testing.assert_allclose(tree_logits[node], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("inter,prompt_len", [
    (128, FEW_ROWS + 8),  # a prompt long enough for the GEMM prefill; tree and plain steps share a window
    (102, 20),  # columns past the last whole SIMD vector; the tree's window is wider than the plain steps'
])
def test_tree_step_logits_equal_plain_decoding_bit_for_bit(tmp_path, inter, prompt_len):
    """Up to FEW_ROWS nodes, a node's logits in a tree step are exactly those of decoding its path
    one token at a time after the same prefill, and the accepted path's cache entries are exactly
    plain decoding's: greedy Medusa is lossless by construction."""
    if jt.flags.use_cuda:
        pytest.skip("the CPU kernels' guarantee")
    make_hf_model(tmp_path, intermediate_size=inter)
    model = jtl.load_llama(tmp_path)
    paths = list(named_trees()["cpu_medium"]) + [(0, 0, 0, 0, 0, 0)]  # one path as deep as a chain
    tree = JittorTree.from_buffers(build_buffers(validate(paths)))
    assert tree.num_nodes <= FEW_ROWS
    prompt = [(11 * i) % 251 for i in range(prompt_len)]
    candidates = np.random.default_rng(1).integers(0, 256, tree.num_nodes).astype(np.int32)
    cache = jtl.KVCache(model.args, 128)
    jt_prefill(model, prompt, cache)
    with jt.no_grad():
        tree_logits = tree_decode(model, cache, candidates, tree)[1].numpy()
    plain = jtl.KVCache(model.args, 128)
    jt_prefill(model, prompt, plain)
    for node in range(tree.num_nodes):
        path = [node]
        while path[-1] != 0:
            path.append(int(tree.parents[path[-1]]))
        plain.length = prompt_len  # later entries are stale, hidden by the mask
        for token in candidates[path[::-1]]:
            hidden = jt_prefill(model, [int(token)], plain)
        np.testing.assert_array_equal(tree_logits[node], logits_np(model, hidden)[0])
    cache.compact(np.array(path[::-1]), tree.buffers.depth + 1)  # accept the path decoded last
    assert cache.length == plain.length
    for mine, theirs in zip(cache.k + cache.v, plain.k + plain.v):
        np.testing.assert_array_equal(mine.numpy()[:, :, :cache.length], theirs.numpy()[:, :, :cache.length])


JT_TREE = JittorTree.from_buffers(build_buffers(validate(PATHS)))


def both_posteriors(logits, cfg):
    cands = np.array([0, 1, 2, 3, 4], np.int32)
    want = torch_posterior(logits, torch.from_numpy(cands).long(), TORCH_TREE, cfg, torch.Generator().manual_seed(0))
    got = evaluate_posterior(jt.array(logits.numpy()), cands, JT_TREE, cfg, np.random.default_rng(0))
    return want, got


def test_greedy_and_typical_posteriors_match_the_torch_reference():
    want, got = both_posteriors(peaked(1, 3, 5, 6, 7), GenerationConfig())
    assert got == want and want[1:] == (2, 6)
    typical = GenerationConfig(temperature=1.0, acceptance="typical")
    logits = torch.full((5, V), -5.0)
    logits[0, 1], logits[0, 2], logits[1, 3], logits[2, 0], logits[3, 0] = 3.0, 2.9, 8.0, 8.0, 8.0
    want, got = both_posteriors(logits, typical)
    assert got[:2] == want[:2] == (1, 2)  # row 1 is root -> a -> c -> d
    want, got = both_posteriors(torch.zeros(5, V), typical.with_(posterior_threshold=0.99, posterior_alpha=1.0))
    assert got[1] == want[1] == 0


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_jittor_nucleus_walk_reproduces_sequential_sampling(top_p):
    """The joint law of the first two emitted tokens (see ``test_decoding.nucleus_case``)."""
    cfg = GenerationConfig(temperature=1.0, top_p=top_p, acceptance="nucleus")
    logits, law = nucleus_case(top_p)
    logits, cands, rng = jt.array(logits), np.arange(5, dtype=np.int32), np.random.default_rng(0)
    counts = {}
    for _ in range(NUCLEUS_DRAWS):
        outcome = first_two(JT_TREE.buffers.retrieve_indices, *evaluate_posterior(logits, cands, JT_TREE, cfg, rng))
        counts[outcome] = counts.get(outcome, 0) + 1
    assert_follows(counts, law, NUCLEUS_DRAWS)


class OracleHeads:
    """Heads that propose the true continuation at rank 0: long accepted chunks stress the compaction."""

    def __init__(self, reference, prompt_len, decoder, num_heads=4):
        self.reference, self.prompt_len, self.decoder, self.num_heads = reference, prompt_len, decoder, num_heads

    def topk(self, hidden, lm_head, depth, k):
        root = self.decoder.cache_length - self.prompt_len  # the root is reference[root]
        out = np.arange(TOPK * self.num_heads).reshape(self.num_heads, TOPK) + 200
        for k in range(self.num_heads):
            if root + 1 + k < len(self.reference):
                out[k, 0] = self.reference[root + 1 + k]
        return jt.array(out)


def test_oracle_heads_accept_whole_paths_and_output_equals_baseline(tiny_dir):
    model = jtl.load_llama(tiny_dir)
    tree = JittorTree.from_buffers(build_buffers(validate(named_trees()["mc_sim_7b_63"])))
    prompt, cfg = [3, 1, 4, 1, 5, 9, 2, 6], GenerationConfig(max_new_tokens=60)
    decoder = JittorDecoder(model, MedusaHeads.__new__(MedusaHeads), tree, max_len=256)
    base, _ = generate_ids(decoder, prompt, cfg.with_(medusa=False))
    decoder.heads = OracleHeads(base, len(prompt), decoder)
    out, steps = generate_ids(decoder, prompt, cfg)
    assert out == base
    assert max(s.accepted for s in steps) == 4 and len(steps) < len(base) / 3


def test_no_recompilation_after_warm_up(tiny_dir, jt_device):
    model = jtl.load_llama(tiny_dir)
    tree = JittorTree.from_buffers(build_buffers(resolve_tree("cpu_medium", FRESH_HEADS.medusa_num_heads)))
    heads = MedusaHeads(FRESH_HEADS, model.args.hidden_size, model.args.vocab_size)
    decoder = JittorDecoder(model, heads, tree, max_len=512)
    prompt = list(range(10, 30))

    def run(tokens):
        for medusa in (False, True):
            out, _ = generate_ids(decoder, prompt, GenerationConfig(max_new_tokens=tokens, medusa=medusa))
            assert len(out) == tokens

    warm = kernel_keys(lambda: run(40))
    steady = kernel_keys(lambda: run(220))  # crosses many window buckets
    assert len(warm) >= 10, "the profiler saw no kernels: the comparison below would be vacuous"
    assert any(k.startswith("code") for k in warm) == (jt_device == "cpu")  # the CPU loop nests ran too
    assert steady <= warm, sorted(steady - warm)[:3]


def test_unsupported_dtype_is_a_clear_error():
    with pytest.raises(BackendError, match="float32"):
        load_backend("jittor", dtype="bfloat16")


@pytest.mark.slow
def test_smollm2_jittor_logits_match_torch(smol_dir, smol_backend):
    model = jtl.load_llama(smol_dir)
    ids = encode_prompt(smol_backend.tokenizer, [{"role": "user", "content": "Name three primary colours."}])
    got = logits_np(model, jt_prefill(model, ids, jtl.KVCache(model.args, 128)))
    cache = smol_backend.decoder.cache
    cache.reset()
    with torch.inference_mode():
        t = len(ids)
        hidden = smol_backend.model(torch.tensor([ids]), torch.arange(t), torch.ones(t, t, dtype=torch.bool).tril(), cache)
        want = smol_backend.model.logits(hidden)[0].numpy()
    cache.reset()
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


@pytest.mark.slow
def test_three_backends_give_identical_greedy_tokens(smol_backend):
    jittor = load_backend("jittor")
    hybrid = load_backend("hybrid")
    tok = smol_backend.tokenizer
    cfg = GenerationConfig(max_new_tokens=64, stop_token_ids=stop_token_ids(tok))
    for q in ("Write a haiku about autumn.", "Explain what a hash table is in two sentences."):
        ids = encode_prompt(tok, [{"role": "user", "content": q}])
        base, _ = generate_ids(smol_backend.decoder, ids, cfg.with_(medusa=False))
        assert generate_ids(jittor.decoder, ids, cfg.with_(medusa=False))[0] == base
        out, steps = generate_ids(jittor.decoder, ids, cfg)
        assert out == base and len(steps) < len(base)  # the shipped heads do get tokens accepted
        assert generate_ids(hybrid.decoder, ids, cfg)[0] == base
        assert generate_ids(smol_backend.decoder, ids, cfg)[0] == base
    d = hybrid.describe()
    assert d["heads_framework"] == "jittor" and d["bridge_ms_per_step"] > 0


def test_jittor_hidden_states_fill_the_same_cache_as_torch(tiny_dir, tmp_path):
    from medusa.llama import load_llama as torch_load
    from medusa.train.dataset import Example
    from medusa.train.hidden_cache import build_cache, shard_files, torch_hidden_fn
    from medusa_jittor_all.train import jittor_backbone

    examples = [Example(list(range(5, 25)), [-100] * 10 + list(range(15, 25))), Example([9, 8, 7, 6], [-100, 8, 7, 6])]
    backbone = jittor_backbone()
    jt_fn, tag = backbone.load(tiny_dir), backbone.tag
    build_cache(jt_fn, 64, examples, tmp_path / "jt")
    build_cache(torch_hidden_fn(torch_load(tiny_dir)), 64, examples, tmp_path / "torch")
    a, b = (np.load(shard_files(tmp_path / d)[0]) for d in ("jt", "torch"))
    assert tag == "-jittor" and (a["ids"] == b["ids"]).all() and (a["offsets"] == b["offsets"]).all()
    np.testing.assert_allclose(a["hidden"].astype(np.float32), b["hidden"].astype(np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_jittor_backbone_training_end_to_end(tmp_path):
    import json

    from medusa_jittor_all.train import main

    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Count from {i} to {i + 9}."},
                                                {"from": "gpt", "value": ", ".join(str(i + k) for k in range(10))}]}
             for i in range(12)]
    data = tmp_path / "convs.json"
    data.write_text(json.dumps(convs))
    metrics = main(["--data", str(data), "--out", str(tmp_path / "heads"), "--cache-dir", str(tmp_path / "cache"),
                    "--max-length", "64", "--eval-fraction", "0.2", "--epochs", "2", "--batch-tokens", "128",
                    "--num-heads", "2", "--token-map-size", "32"])
    assert metrics["train_tokens_per_second"] > 0 and len(metrics["top1"]) == 2 and metrics["tokens"] > 0
    assert min(metrics["top1"]) > 2 / 32, metrics["top1"]  # held out; chance is 1/32 (the token map)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert config["token_map"] == "token_map.json"  # trained over the 32 most frequent targets
    assert len(json.loads((tmp_path / "heads" / "token_map.json").read_text())["ids"]) == 32
    torch_backend = load_backend("torch", heads=str(tmp_path / "heads"), dtype="float32", device="cpu")
    assert torch_backend.describe()["num_heads"] == 2  # PyTorch reads what the Jittor trainer wrote
    ids = encode_prompt(torch_backend.tokenizer, [{"role": "user", "content": "Count from 3 to 12."}])
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=stop_token_ids(torch_backend.tokenizer))
    assert generate_ids(torch_backend.decoder, ids, cfg)[0] == generate_ids(torch_backend.decoder, ids,
                                                                          cfg.with_(medusa=False))[0]
