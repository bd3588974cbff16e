"""Draft sources (``core.drafts``): the suffix index against brute force, the grafted n-gram chain's
buffers, nucleus and typical acceptance with a chain, greedy identity of every draft mix on every
backend (short and long prompts), the Jittor tree shapes compiling once, and SmolLM2 copying text."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from medusa.core.buffers import NGRAM, build_buffers, graft_chain
from medusa.core.config import GenerationConfig
from medusa.core.drafts import NgramDraft, SuffixIndex, draft_buffers, first_twins, step_draft, verified_nodes
from medusa.core.engine import generate, generate_ids
from medusa.core.options import RunOptions
from medusa.core.stats import Record, source_counts, summarize
from medusa.core.trees import named_trees, validate
from medusa.decoding import TorchTree, evaluate_posterior

from .conftest import make_hf_model
from .test_decoding import V, assert_follows, nucleus, rows_logits
from .test_resolve import faster_decoding_heads

DRAFTS = ("heads", "ngram", "both")


# ----------------------------------------------------------------------------- the suffix index

def brute_match(seq: list[int]) -> tuple[int, int]:
    """(L, e): the longest suffix of ``seq`` also ending at some e < n - 1, the latest such e."""
    n = len(seq)
    for length in range(n - 1, 0, -1):
        suffix = seq[n - length:]
        for end in range(n - 2, length - 2, -1):
            if seq[end - length + 1:end + 1] == suffix:
                return length, end
    return 0, -1


def brute_continuation(seq: list[int], count: int) -> list[int]:
    length, end = brute_match(seq)
    if length == 0:
        return []
    extended = list(seq)
    for i in range(end + 1, end + 1 + count):
        extended.append(extended[i])
    return extended[len(seq):]


@pytest.mark.parametrize("alphabet", [1, 2, 3, 5, 40])
def test_suffix_index_equals_brute_force_after_every_append(alphabet):
    rng = np.random.default_rng(alphabet)
    for _ in range(12):
        seq = rng.integers(0, alphabet, int(rng.integers(1, 70))).tolist()
        index = SuffixIndex()
        for n, tok in enumerate(seq, 1):
            index.append(tok)
            assert index.match() == brute_match(seq[:n]), seq[:n]
            assert index.continuation(5) == brute_continuation(seq[:n], 5), seq[:n]
        assert len(index.length) <= max(2 * len(seq), 2)  # a suffix automaton has at most 2n states


def test_suffix_index_copies_the_latest_occurrence_follows_a_loop_and_prefers_the_longest_match():
    index = SuffixIndex([7, 1, 2, 3, 9, 1, 2, 4, 1, 2])
    assert index.match() == (2, 6) and index.continuation(3) == [4, 1, 2]  # "1 2" last ended at 6
    index.extend([3])  # "1 2 3" now matches the first occurrence only
    assert index.match() == (3, 3) and index.continuation(2) == [9, 1]
    loop = SuffixIndex([5, 6, 5, 6, 5])
    assert loop.continuation(6) == [6, 5, 6, 5, 6, 5]  # copies with overlap past the end
    items = SuffixIndex([11, 1, 20, 21, 11, 2, 30, 31, 11])  # "- 1 ...", "- 2 ...": a list goes on
    assert items.match() == (1, 4) and items.continuation(1) == [2]


def test_suffix_index_stays_valid_past_its_update_depth():
    """A degenerate repetition makes the suffix-link path as long as the text; past RECENT_DEPTH an
    append stops recording, and a match then names an older, still real, earlier occurrence."""
    depth = SuffixIndex.RECENT_DEPTH
    seq = [4] * (depth + 40) + [5] + [4] * 3
    index = SuffixIndex()
    for n, tok in enumerate(seq, 1):
        index.append(tok)
        length, end = index.match()
        assert length == brute_match(seq[:n])[0] and end < n - 1
        assert seq[end - length + 1:end + 1] == seq[n - length:n]


def test_ngram_draft_pads_to_a_fixed_length():
    assert NgramDraft([3, 4, 5], 4).propose().tolist() == [5, 5, 5, 5]  # 5 never seen before: no match
    draft = NgramDraft([3, 4, 5, 3], 4)
    assert draft.propose().tolist() == [4, 5, 3, 4]
    draft.extend([8])
    assert draft.propose().tolist() == [8, 8, 8, 8]


# ----------------------------------------------------------------------------- grafted buffers

def ancestors(parents, node):
    out = {node}
    while parents[node] >= 0:
        node = int(parents[node])
        out.add(node)
    return out


def test_a_step_verifies_the_chain_only_after_a_long_enough_match():
    assert [step_draft("both", m, 2) for m in (0, 1, 2, 9)] == ["heads", "heads", "both", "both"]
    assert [step_draft("ngram", m, 3) for m in (0, 2, 3)] == ["root", "root", "ngram"]
    assert step_draft("heads", 50, 2) == "heads"
    root = draft_buffers(build_buffers(validate([(0,), (1,)])), "root", 6)
    assert root.num_nodes == 1 and root.head_depth == 0 and root.chain == 0


class DraftRecorder:
    """A decoder that proposes nothing right and records the draft mix of every step."""

    def __init__(self, max_len=400):
        self.max_len, self.tree_size, self.cache_length, self.drafts = max_len, 5, 0, []

    def prefill(self, ids, cfg):
        self.cache_length = len(ids)
        return self.next_token(ids[-1])

    def medusa_step(self, root, cfg, ngram=None, draft=None):
        self.drafts.append(draft)
        self.cache_length += 1
        return [root], 0, self.next_token(root)

    @staticmethod
    def next_token(root):
        return (root + 1) % 6  # the text cycles 0..5: matches grow as it repeats


@pytest.mark.parametrize("draft,unmatched", [("ngram", "root"), ("both", "heads")])
def test_the_engine_picks_each_steps_tree_from_the_context_match(draft, unmatched):
    decoder = DraftRecorder()
    cfg = GenerationConfig(max_new_tokens=14, draft=draft, ngram_min_match=3)
    list(generate(decoder, [40, 41, 0], cfg))  # no token repeats until the cycle comes round
    # the roots are 1 2 3 4 5 0 1 2 ...: the context's suffix first recurs at the second 0
    assert decoder.drafts[:5] == [unmatched] * 5
    assert decoder.drafts[5:7] == [unmatched] * 2  # "0", then "0 1" match: shorter than 3
    assert decoder.drafts[7:] == [draft] * (len(decoder.drafts) - 7)


@pytest.mark.parametrize("tree", ["cpu_small", "mc_sim_7b_63", "chain2"])
@pytest.mark.parametrize("draft", ["ngram", "both"])
def test_grafted_buffers_are_a_valid_tree(tree, draft):
    heads = build_buffers(validate(named_trees()[tree]))
    b = draft_buffers(heads, draft, 5)
    n = b.num_nodes
    assert n == verified_nodes(heads.num_nodes, draft, 5) and b.chain == 5
    for i in range(n):
        assert set(np.flatnonzero(b.attn_mask[i])) == ancestors(b.parents, i)
        assert b.position_ids[i] == len(ancestors(b.parents, i)) - 1
    leaves = set(range(n)) - set(b.parents[1:].tolist())
    rows = [[int(x) for x in r if x >= 0] for r in b.retrieve_indices]
    assert {r[-1] for r in rows} == leaves and len(rows) == len(leaves)
    assert all(r[0] == 0 and all(b.parents[c] == p for p, c in zip(r, r[1:])) for r in rows)
    chain = np.flatnonzero(b.sources == NGRAM)
    assert rows[-1] == [0] + chain.tolist()  # the chain's row is last: ties go to the heads
    first = 1 + b.head_depth * 10
    assert b.tree_indices[chain].tolist() == list(range(first, first + 5))
    assert b.head_depth == (heads.depth if draft == "both" else 0)
    if draft == "both":  # the heads' part is unchanged
        h = heads.num_nodes
        assert (b.attn_mask[:h, :h] == heads.attn_mask).all() and (b.tree_indices[:h] == heads.tree_indices).all()
    assert draft_buffers(heads, "heads", 5) is heads
    with pytest.raises(ValueError, match="one chain"):
        graft_chain(b, 2)


def test_first_twins_pairs_nodes_with_the_same_tokens_from_the_root():
    b = draft_buffers(build_buffers(validate([(0,), (1,), (0, 0)])), "both", 3)  # nodes 4, 5, 6 chain
    cands = np.array([9, 1, 2, 3, 1, 3, 5])  # chain 1 -> 3 -> 5 repeats head path 1 -> 3
    assert first_twins(cands, b.parents).tolist() == [0, 1, 2, 3, 1, 3, 6]
    assert first_twins(np.array([9, 1, 2, 3, 4, 3, 5]), b.parents).tolist() == list(range(7))


# ----------------------------------------------------------------------------- acceptance with a chain

# Heads' tree root -> a (0,), b (1,); chain c -> d under the root.  Candidates: a = 1, b = 2, c = 1
# (repeats a), d = 3.  a and c share their context, so the same next-token distribution.
CHAIN_TREE = draft_buffers(build_buffers(validate([(0,), (1,)])), "both", 2)
CHAIN_CANDS = [0, 1, 2, 1, 3]
CHAIN_ROWS = [{1: 0.5, 2: 0.3, 4: 0.2},      # root
              {3: 0.3, 5: 0.4, 6: 0.3},      # a
              {4: 0.4, 6: 0.35, 7: 0.25},    # b
              {3: 0.3, 5: 0.4, 6: 0.3},      # c, the same context as a
              {0: 1.0}]                      # d
DRAWS = 2000


def chain_case(top_p):
    """(logits [5, V], the exact law of the first two tokens of sequential sampling)."""
    logits = rows_logits(CHAIN_ROWS, V)
    law = {}
    for x1, p1 in nucleus(CHAIN_ROWS[0], top_p).items():
        if x1 in (1, 2):
            law.update({(x1, x2): p1 * p2 for x2, p2 in nucleus(CHAIN_ROWS[x1], top_p).items()})
        else:
            law[(x1,)] = p1
    return logits, law


def emitted(cands, retrieve, best, length, bonus):
    return tuple([cands[int(n)] for n in retrieve[best, 1:length + 1]] + [int(bonus)])[:2]


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_nucleus_with_a_repeated_branch_reproduces_sequential_sampling(device, top_p):
    """Independent samples at a and c would emit (1, 3) with probability .5 (.3 + .7 * .3), not .15."""
    cfg = GenerationConfig(temperature=1.0, top_p=top_p, acceptance="nucleus")
    logits, law = chain_case(top_p)
    tree = TorchTree.from_buffers(CHAIN_TREE, device)
    logits, cands = torch.from_numpy(logits).to(device), torch.tensor(CHAIN_CANDS, device=device)
    gen, counts = torch.Generator(device=device).manual_seed(0), {}
    for _ in range(DRAWS):
        out = emitted(CHAIN_CANDS, CHAIN_TREE.retrieve_indices, *evaluate_posterior(logits, cands, tree, cfg, gen))
        counts[out] = counts.get(out, 0) + 1
    assert_follows(counts, law, DRAWS)


def test_jittor_nucleus_with_a_repeated_branch_reproduces_sequential_sampling():
    jd = pytest.importorskip("medusa_jittor_all.decoding")
    from medusa_jittor.runtime import jt

    cfg = GenerationConfig(temperature=1.0, top_p=1.0, acceptance="nucleus")
    logits, law = chain_case(1.0)
    tree, rng, counts = jd.JittorTree.from_buffers(CHAIN_TREE), np.random.default_rng(0), {}
    logits, cands = jt.array(logits), np.array(CHAIN_CANDS, np.int32)
    for _ in range(DRAWS):
        out = emitted(CHAIN_CANDS, CHAIN_TREE.retrieve_indices, *jd.evaluate_posterior(logits, cands, tree, cfg, rng))
        counts[out] = counts.get(out, 0) + 1
    assert_follows(counts, law, DRAWS)


def test_typical_accepts_the_chain_where_it_beats_the_heads():
    """root -> 1 is likely, 1 -> 3 certain: the chain's path (c, d) is longer than the heads' (a)."""
    cfg = GenerationConfig(temperature=1.0, acceptance="typical")
    logits = np.full((5, V), -5.0, np.float32)
    logits[0, 1], logits[1, 3], logits[3, 3], logits[2, 0], logits[4, 0] = 4.0, 8.0, 8.0, 8.0, 8.0
    tree, cands = TorchTree.from_buffers(CHAIN_TREE, "cpu"), torch.tensor(CHAIN_CANDS)
    best, length, _ = evaluate_posterior(torch.from_numpy(logits), cands, tree, cfg, torch.Generator().manual_seed(0))
    assert length == 2 and CHAIN_TREE.retrieve_indices[best, :3].tolist() == [0, 3, 4]
    jd = pytest.importorskip("medusa_jittor_all.decoding")
    from medusa_jittor.runtime import jt

    got = jd.evaluate_posterior(jt.array(logits), np.array(CHAIN_CANDS, np.int32), jd.JittorTree.from_buffers(CHAIN_TREE),
                                cfg, np.random.default_rng(0))
    assert got[:2] == (best, length)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_with_heads(tmp_path_factory, smol_dir) -> tuple[Path, Path]:
    """A tiny random Llama (SmolLM2's tokenizer files, 2k positions) and heads that propose its own
    next token: random models fall into loops, which both the heads and the n-gram source catch."""
    root = tmp_path_factory.mktemp("drafts")
    make_hf_model(root / "model", tokenizer_from=smol_dir, max_position_embeddings=2048)
    return root / "model", faster_decoding_heads(root / "heads", root / "model", num_heads=3, config_heads=3)


def repeating_prompt(length: int, period: int, seed: int) -> list[int]:
    unit = np.random.default_rng(seed).integers(3, 250, period).tolist()
    return (unit * (length // period + 1))[:length]


PROMPTS = {"short": repeating_prompt(36, 12, 1), "long": repeating_prompt(600, 150, 2)}


@pytest.mark.parametrize("backend", ["torch", "hybrid", "jittor"])
def test_every_draft_mix_is_lossless_on_every_backend(tiny_with_heads, backend):
    if backend != "torch":
        pytest.importorskip("medusa_jittor.runtime")
    from medusa.core.backends import load_backend

    model, heads = tiny_with_heads
    b = load_backend(backend, model=str(model), heads=str(heads), tree="cpu_small", device="cpu")
    cfg = GenerationConfig(max_new_tokens=48)
    totals = {d: {} for d in DRAFTS}
    for name, prompt in PROMPTS.items():
        base, _ = generate_ids(b.decoder, prompt, cfg.with_(medusa=False))
        for draft in DRAFTS:
            out, steps = generate_ids(b.decoder, prompt, cfg.with_(draft=draft))
            assert out == base, (backend, name, draft)
            counts = source_counts(steps)
            assert sum(counts.values()) == len(out)
            assert len(steps) - 1 <= counts["bonus"] <= len(steps)  # the budget may cut the last bonus
            for k, v in counts.items():
                totals[draft][k] = totals[draft].get(k, 0) + v
    assert "ngram" not in totals["heads"] and "heads" not in totals["ngram"]
    assert totals["ngram"].get("ngram", 0) > 0 and totals["both"].get("ngram", 0) > 0, totals
    assert totals["heads"].get("heads", 0) > 0, totals


@pytest.mark.parametrize("acceptance", ["typical", "nucleus"])
def test_sampling_with_both_sources_runs_to_the_budget(tiny_with_heads, acceptance):
    from medusa.core.backends import load_backend

    model, heads = tiny_with_heads
    b = load_backend("torch", model=str(model), heads=str(heads), tree="cpu_small", device="cpu")
    cfg = GenerationConfig(max_new_tokens=40, temperature=0.7, acceptance=acceptance, draft="both", seed=0)
    out, steps = generate_ids(b.decoder, PROMPTS["short"], cfg)
    assert len(out) == 40 and all(0 <= t < 256 for t in out)
    assert generate_ids(b.decoder, PROMPTS["short"], cfg)[0] == out  # seeded: reproducible


def test_a_chain_never_overflows_the_kv_budget(tiny_with_heads):
    from medusa.backend import TorchDecoder
    from medusa.llama import load_llama

    model = load_llama(tiny_with_heads[0])
    tree = TorchTree.from_buffers(build_buffers(validate(named_trees()["cpu_small"])), "cpu")
    heads_topk = lambda hidden, depth, k: torch.zeros(depth, 10, dtype=torch.long)  # noqa: E731
    prompt = PROMPTS["short"]
    for draft in DRAFTS:
        decoder = TorchDecoder(model, heads_topk, tree, max_len=len(prompt) + 20)
        steps = list(generate(decoder, prompt, GenerationConfig(max_new_tokens=100, draft=draft, ngram_tokens=8)))
        assert steps[-1].finish_reason == "length" and decoder.cache_length <= decoder.max_len


def test_jittor_draft_trees_compile_once(tiny_with_heads):
    jtl = pytest.importorskip("medusa_jittor_all.llama")
    from medusa.core.resolve import FRESH_HEADS
    from medusa.core.trees import resolve as resolve_tree
    from medusa_jittor.heads import MedusaHeads
    from medusa_jittor_all.backend import JittorDecoder
    from medusa_jittor_all.decoding import JittorTree

    from .test_jittor_all import kernel_keys

    model = jtl.load_llama(tiny_with_heads[0])
    tree = JittorTree.from_buffers(build_buffers(resolve_tree("cpu_small", FRESH_HEADS.medusa_num_heads)))
    decoder = JittorDecoder(model, MedusaHeads(FRESH_HEADS, model.args.hidden_size, model.args.vocab_size), tree, 512)
    prompt = repeating_prompt(40, 8, 3)

    def run(tokens):
        for draft in DRAFTS:
            out, _ = generate_ids(decoder, prompt, GenerationConfig(max_new_tokens=tokens, draft=draft))
            assert len(out) == tokens

    warm = kernel_keys(lambda: run(40))
    steady = kernel_keys(lambda: run(200))  # crosses window buckets, matches come and go
    assert steady <= warm, sorted(steady - warm)[:3]


# ----------------------------------------------------------------------------- options and statistics

def test_draft_flag_reaches_the_generation_config():
    p = RunOptions.add_args(argparse.ArgumentParser())
    assert RunOptions.from_args(p.parse_args([])).generation().draft == "both"
    assert RunOptions.from_args(p.parse_args(["--draft", "heads"])).generation().draft == "heads"
    cfg = RunOptions.from_args(p.parse_args(["--ngram-tokens", "4", "--ngram-min-match", "3"])).generation()
    assert (cfg.ngram_tokens, cfg.ngram_min_match) == (4, 3)
    with pytest.raises(SystemExit):
        p.parse_args(["--draft", "eagle"])
    for bad in (dict(draft="eagle"), dict(ngram_tokens=0), dict(ngram_min_match=0)):
        with pytest.raises(ValueError):
            GenerationConfig(**bad)


def test_summary_totals_tokens_by_source():
    recs = [Record(1, "rag", "medusa", 1, 10, 4, 1.0, [], None, {"bonus": 4, "heads": 2, "ngram": 4}),
            Record(2, "rag", "medusa", 1, 5, 3, 1.0, [], None, {"bonus": 3, "ngram": 2})]
    assert summarize(recs)["medusa"]["tokens_by_source"] == {"bonus": 7, "heads": 2, "ngram": 6}
    assert "tokens_by_source" not in summarize([Record(1, "rag", "baseline", 1, 3, 3, 1.0, [])])["baseline"]


# ----------------------------------------------------------------------------- the real model

COPY_TEXT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, "
             "polished the great lens, and wrote the weather in a leather logbook. Ships passing the rocky "
             "point would see the beam sweep across the water every ten seconds, and they would know to steer "
             "wide of the reef that had wrecked so many vessels before the light was built.")


@pytest.mark.slow
def test_smollm2_copying_with_both_sources_equals_the_baseline(smol_backend):
    from medusa.core.prompts import encode_prompt, stop_token_ids

    tok = smol_backend.tokenizer
    ids = encode_prompt(tok, [{"role": "user", "content": f"Repeat this text exactly: {COPY_TEXT}"}])
    cfg = GenerationConfig(max_new_tokens=64, stop_token_ids=stop_token_ids(tok))
    base, _ = generate_ids(smol_backend.decoder, ids, cfg.with_(medusa=False))
    out, steps = generate_ids(smol_backend.decoder, ids, cfg.with_(draft="both"))
    assert out == base
    assert source_counts(steps).get("ngram", 0) > 0 and len(steps) < len(out) / 2
