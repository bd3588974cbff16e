"""Acceptance rules on hand-built logits: greedy, typical, nucleus (statistical), accept 0."""
import pytest
import torch

from medusa.core.buffers import build_buffers
from medusa.core.config import GenerationConfig
from medusa.core.trees import validate
from medusa.decoding import TorchTree, evaluate_posterior, generate_candidates, sample_top_p

V = 8
# root -> a (0,), b (1,); a -> c (0,0); c -> d (0,0,0)
TREE = TorchTree.from_buffers(build_buffers(validate([(0,), (1,), (0, 0), (0, 0, 0)])), "cpu")


def peaked(*tokens, strength=10.0):
    logits = torch.zeros(len(tokens), V)
    for i, t in enumerate(tokens):
        logits[i, t] = strength
    return logits


def test_generate_candidates_layout():
    topk = torch.arange(30).view(3, 10)  # head h rank r -> 10h + r
    cands = generate_candidates(torch.tensor(99), topk, TREE)
    assert cands.tolist() == [99, 0, 1, 10, 20]  # root, (0,), (1,), (0,0), (0,0,0)


def test_greedy_accepts_longest_matching_path():
    cands = torch.tensor([0, 1, 2, 3, 4])  # nodes: root, a, b, c, d
    logits = peaked(1, 3, 5, 6, 7)  # root->1 (a), a->3 (c), c->6 (not d=4), ...
    best, length, bonus = evaluate_posterior(logits, cands, TREE, GenerationConfig())
    nodes = TREE.retrieve_indices[best, : length + 1].tolist()
    assert (length, nodes, bonus) == (2, [0, 1, 3], 6)


def test_greedy_accepts_nothing():
    cands = torch.tensor([0, 1, 2, 3, 4])
    best, length, bonus = evaluate_posterior(peaked(7, 3, 5, 6, 7), cands, TREE, GenerationConfig())
    assert (length, bonus) == (0, 7)


def test_typical_threshold_and_tie_break():
    cfg = GenerationConfig(temperature=1.0, acceptance="typical", posterior_threshold=0.09, posterior_alpha=0.3)
    cands = torch.tensor([0, 1, 2, 3, 4])
    logits = torch.full((5, V), -5.0)
    logits[0, 1], logits[0, 2] = 3.0, 2.9  # root: a and b both plausible, a slightly more
    logits[1, 3] = 8.0  # a -> c certain
    logits[2, 0] = 8.0  # b has no children: irrelevant
    logits[3, 0] = 8.0  # c -> d implausible: c is confident about another token
    best, length, _ = evaluate_posterior(logits, cands, TREE, cfg, torch.Generator().manual_seed(0))
    assert length == 2 and TREE.retrieve_indices[best, :3].tolist() == [0, 1, 3]
    # with a strict threshold nothing passes
    strict = cfg.with_(posterior_threshold=0.99, posterior_alpha=1.0)
    flat = torch.zeros(5, V)
    assert evaluate_posterior(flat, cands, TREE, strict, torch.Generator().manual_seed(0))[1] == 0


def test_nucleus_walk_reproduces_sequential_sampling():
    """Over many draws, the first emitted token after the root follows the target distribution."""
    cfg = GenerationConfig(temperature=1.0, top_p=1.0, acceptance="nucleus")
    probs0 = torch.tensor([0.0, 0.5, 0.3, 0.2, 0, 0, 0, 0])
    logits = torch.log(probs0.clamp(min=1e-12)).repeat(5, 1)
    cands = torch.tensor([0, 1, 2, 3, 4])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    n = 4000
    for _ in range(n):
        best, length, bonus = evaluate_posterior(logits, cands, TREE, cfg, gen)
        first = cands[TREE.retrieve_indices[best, 1]].item() if length else bonus
        counts[first] += 1
    freq = counts / n
    assert torch.allclose(freq, probs0, atol=0.03), freq


def test_top_p_keeps_the_nucleus_only():
    cfg = GenerationConfig(temperature=1.0, top_p=0.6)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    draws = sample_top_p(logits, cfg, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
