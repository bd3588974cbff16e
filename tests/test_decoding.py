"""Acceptance rules on hand-built logits: greedy, typical, nucleus (statistical), accept 0; on every
device.  The nucleus case and its exact law are shared with the Jittor tests (``test_jittor_all``)."""
import math

import numpy as np
import pytest
import torch

from medusa.core.buffers import build_buffers
from medusa.core.config import GenerationConfig
from medusa.core.trees import validate
from medusa.decoding import TorchTree, evaluate_posterior, generate_candidates, sample_top_p

V = 8
# root -> a (0,), b (1,); a -> c (0,0); c -> d (0,0,0).  Candidates [0, 1, 2, 3, 4]: node i proposes token i.
PATHS = [(0,), (1,), (0, 0), (0, 0, 0)]
TREE = TorchTree.from_buffers(build_buffers(validate(PATHS)), "cpu")
CANDS = [0, 1, 2, 3, 4]


def tree_on(device):
    return TorchTree.from_buffers(build_buffers(validate(PATHS)), device)


def peaked(*tokens, strength=10.0):
    logits = torch.zeros(len(tokens), V)
    for i, t in enumerate(tokens):
        logits[i, t] = strength
    return logits


def test_generate_candidates_layout(device):
    topk = torch.arange(30, device=device).view(3, 10)  # head h rank r -> 10h + r
    cands = generate_candidates(torch.tensor(99, device=device), topk, tree_on(device))
    assert cands.tolist() == [99, 0, 1, 10, 20]  # root, (0,), (1,), (0,0), (0,0,0)


def test_greedy_accepts_longest_matching_path(device):
    tree = tree_on(device)
    logits = peaked(1, 3, 5, 6, 7).to(device)  # root->1 (a), a->3 (c), c->6 (not d=4), ...
    best, length, bonus = evaluate_posterior(logits, torch.tensor(CANDS, device=device), tree, GenerationConfig())
    nodes = tree.retrieve_indices[best, : length + 1].tolist()
    assert (length, nodes, bonus) == (2, [0, 1, 3], 6)


def test_greedy_accepts_nothing(device):
    cands, logits = torch.tensor(CANDS, device=device), peaked(7, 3, 5, 6, 7).to(device)
    best, length, bonus = evaluate_posterior(logits, cands, tree_on(device), GenerationConfig())
    assert (length, bonus) == (0, 7)


def test_typical_threshold_and_tie_break(device):
    cfg = GenerationConfig(temperature=1.0, acceptance="typical", posterior_threshold=0.09, posterior_alpha=0.3)
    cands, tree = torch.tensor(CANDS, device=device), tree_on(device)
    logits = torch.full((5, V), -5.0)
    logits[0, 1], logits[0, 2] = 3.0, 2.9  # root: a and b both plausible, a slightly more
    logits[1, 3] = 8.0  # a -> c certain
    logits[2, 0] = 8.0  # b has no children: irrelevant
    logits[3, 0] = 8.0  # c -> d implausible: c is confident about another token
    gen = torch.Generator(device=device)
    best, length, _ = evaluate_posterior(logits.to(device), cands, tree, cfg, gen.manual_seed(0))
    assert length == 2 and tree.retrieve_indices[best, :3].tolist() == [0, 1, 3]
    # with a strict threshold nothing passes
    strict = cfg.with_(posterior_threshold=0.99, posterior_alpha=1.0)
    flat = torch.zeros(5, V, device=device)
    assert evaluate_posterior(flat, cands, tree, strict, gen.manual_seed(0))[1] == 0


# Each node's distribution of the next token; the walk must emit what sequential sampling emits:
# x1 from the root's nucleus, then x2 from the nucleus of the node that proposed x1 (a for 1, b for 2);
# x1 = 3 is proposed by no child of the root, so the step emits x1 alone.
NUCLEUS_ROWS = [{1: 0.5, 2: 0.3, 3: 0.2},            # root
                {3: 0.6, 5: 0.25, 6: 0.15},          # a (token 1)
                {4: 0.4, 6: 0.35, 7: 0.25},          # b (token 2)
                {4: 0.5, 7: 0.5},                    # c
                {0: 1.0}]                            # d
NUCLEUS_DRAWS = 2000


def nucleus(dist, top_p):
    """The top-p renormalisation of ``dist``: keep tokens while the mass before them is below top_p."""
    kept, before = {}, 0.0
    for token, p in sorted(dist.items(), key=lambda kv: -kv[1]):
        if before < top_p:
            kept[token] = p
        before += p
    total = sum(kept.values())
    return {t: p / total for t, p in kept.items()}


def rows_logits(rows, vocab: int = V) -> np.ndarray:
    """Logits [len(rows), vocab] whose softmax is each row's {token: p} (other tokens ~1e-12)."""
    logits = np.full((len(rows), vocab), math.log(1e-12), np.float32)
    for node, dist in enumerate(rows):
        for token, p in dist.items():
            logits[node, token] = math.log(p)
    return logits


def nucleus_case(top_p):
    """(logits [5, V] as numpy, the exact law of the step's first two emitted tokens)."""
    logits = rows_logits(NUCLEUS_ROWS)
    law = {}
    for x1, p1 in nucleus(NUCLEUS_ROWS[0], top_p).items():
        if x1 in (1, 2):  # proposed by child a or b: accepted, then that node's own sample follows
            law.update({(x1, x2): p1 * p2 for x2, p2 in nucleus(NUCLEUS_ROWS[x1], top_p).items()})
        else:
            law[(x1,)] = p1
    return logits, law


def first_two(retrieve_indices, best, length, bonus):
    """The first two tokens a step emits (candidate i is token i): accepted candidates, then the bonus."""
    return tuple([int(n) for n in retrieve_indices[best, 1:length + 1]] + [int(bonus)])[:2]


def assert_follows(counts, law, n):
    """Empirical frequencies within 4.5 standard errors of the law; outcomes outside it never drawn."""
    assert set(counts) <= set(law), sorted(set(counts) - set(law))
    for outcome, p in law.items():
        freq = counts.get(outcome, 0) / n
        assert abs(freq - p) <= 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, (outcome, freq, p)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_nucleus_walk_reproduces_sequential_sampling(device, top_p):
    """Over many draws, the joint law of the first two emitted tokens is that of sequential sampling."""
    cfg = GenerationConfig(temperature=1.0, top_p=top_p, acceptance="nucleus")
    logits, law = nucleus_case(top_p)
    tree, logits = tree_on(device), torch.from_numpy(logits).to(device)
    cands, gen = torch.tensor(CANDS, device=device), torch.Generator(device=device).manual_seed(0)
    counts = {}
    for _ in range(NUCLEUS_DRAWS):
        outcome = first_two(tree.retrieve_indices_host, *evaluate_posterior(logits, cands, tree, cfg, gen))
        counts[outcome] = counts.get(outcome, 0) + 1
    assert_follows(counts, law, NUCLEUS_DRAWS)


def test_top_p_keeps_the_nucleus_only(device):
    cfg = GenerationConfig(temperature=1.0, top_p=0.6)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device=device)).repeat(2000, 1)
    draws = sample_top_p(logits, cfg, torch.Generator(device=device).manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
