"""Medusa decoding in Jittor, in the paper's four steps (glossary: ``medusa.decoding``).

generate_candidates -> tree_decode -> evaluate_posterior -> update_inputs, as in the PyTorch
reference.  What crosses to the host each step is small and fixed: the heads' top-k ids [H, TOPK],
the per-node verdicts [N] (or, when sampling, the N probability rows the samplers need), and the
accepted node indices.  Everything vocabulary-sized stays in Jittor for greedy decoding.

Shapes are static from step to step: the tree forward always has N queries over a cache window
that grows in ``WINDOW`` buckets, the mask is rebuilt on the host once per step (additive,
shared by all layers), and the cache compaction always moves D+1 entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from medusa.core.acceptance import best_path, sample_top_p, sample_typical, softmax, typical_threshold
from medusa.core.buffers import HeadLevel, TreeBuffers, head_levels, step_visibility
from medusa.core.config import GenerationConfig
from medusa.core.drafts import first_twins
from medusa_jittor.runtime import jt

from .llama import NEG_INF, KVCache, Transformer


@dataclass(frozen=True)
class JittorTree:
    """The tree buffers the Jittor steps read: host arrays (masks and paths are assembled on the host)."""

    buffers: TreeBuffers
    parents: np.ndarray  # [N], root's parent clamped to 0 (never read as a parent)
    levels: tuple[HeadLevel, ...] = ()  # what each head drafts, for sequentially dependent heads

    @classmethod
    def from_buffers(cls, b: TreeBuffers) -> "JittorTree":
        return cls(b, np.maximum(b.parents, 0), tuple(head_levels(b)))

    @property
    def num_nodes(self) -> int:
        return self.buffers.num_nodes


def additive_mask(length: int, block: np.ndarray, width: int) -> jt.Var:
    """The step's [T, width] additive mask (0 visible, NEG_INF hidden) for every layer."""
    return jt.array(np.where(step_visibility(length, block, width), 0.0, NEG_INF).astype(np.float32))


def generate_candidates(root: int, head_topk: np.ndarray, tree: JittorTree,
                        ngram: Optional[np.ndarray] = None) -> np.ndarray:
    """root id, head_topk [H, TOPK], ngram [C] (a tree with a chain) -> tree candidates [N]."""
    b = tree.buffers
    parts = [[root], head_topk[: b.head_depth].reshape(-1)] + ([ngram] if b.chain else [])
    return np.concatenate(parts)[b.tree_indices].astype(np.int32)


def tree_decode(model: Transformer, cache: KVCache, candidates: np.ndarray, tree: JittorTree) -> tuple[jt.Var, jt.Var]:
    """One forward over all N tree nodes -> (hidden [N, h], logits [N, V]); positions = length + depth."""
    n = tree.num_nodes
    mask = additive_mask(cache.length, tree.buffers.attn_mask, cache.window(n))
    hidden = model(jt.array(candidates[None]), tree.buffers.position_ids + cache.length, mask, cache)[0]
    return hidden, model.logits(hidden)


def evaluate_posterior(logits: jt.Var, candidates: np.ndarray, tree: JittorTree, cfg: GenerationConfig,
                       rng: np.random.Generator) -> tuple[int, int, int]:
    """-> (best path row, accept length, bonus token); the rules of ``medusa.decoding.evaluate_posterior``.

    greedy:  argmax in Jittor, only N ids come back.
    nucleus: every node samples once from its top-p distribution (host sampler); a node is accepted
             when it equals its parent's sample; the bonus is the last accepted node's sample.
             Nodes with the same tokens from the root share one sample (``drafts.first_twins``).
    typical: p(node | parent) against the parent's entropy-adaptive threshold; ties go to the most
             likely path; the bonus is a typical sample from the last accepted node.
    """
    parents, retrieve = tree.parents, tree.buffers.retrieve_indices
    if cfg.mode == "greedy":
        choice = jt.argmax(logits, dim=-1)[0].numpy()
        best, accepted = best_path(candidates == choice[parents], retrieve)
        return best, accepted, int(choice[retrieve[best, accepted]])
    probs = softmax(logits.numpy(), cfg.temperature)  # [N, V] on the host: sampling is host-side
    if cfg.mode == "nucleus":
        choice = sample_top_p(probs, cfg.top_p, rng)
        if tree.buffers.chain:
            choice = choice[first_twins(candidates, tree.buffers.parents)]
        best, accepted = best_path(candidates == choice[parents], retrieve)
        return best, accepted, int(choice[retrieve[best, accepted]])
    node_prob = probs[parents, candidates]
    threshold = typical_threshold(probs, cfg.posterior_threshold, cfg.posterior_alpha)
    best, accepted = best_path(node_prob > threshold[parents], retrieve, np.log(node_prob))
    last = retrieve[best, accepted]
    return best, accepted, sample_typical(probs[last], cfg.posterior_threshold, cfg.posterior_alpha, rng)


def update_inputs(cache: KVCache, tree: JittorTree, best: int, accept_length: int) -> np.ndarray:
    """Compact the accepted path's KV entries into place; return its node indices [accept_length+1]."""
    nodes = tree.buffers.retrieve_indices[best, : accept_length + 1]
    cache.compact(nodes, tree.buffers.depth + 1)
    return nodes


def sample_token(logits: jt.Var, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """The next token from logits [V] as plain sampling (baseline, and the first Medusa root)."""
    if cfg.temperature == 0:
        return int(jt.argmax(logits, dim=-1)[0].item())
    return int(sample_top_p(softmax(logits.numpy()[None], cfg.temperature), cfg.top_p, rng)[0])


def sample_first(logits: jt.Var, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """The root after prefill: typical Medusa decoding samples it from the typical set."""
    if cfg.medusa and cfg.mode == "typical":
        return sample_typical(softmax(logits.numpy(), cfg.temperature), cfg.posterior_threshold, cfg.posterior_alpha, rng)
    return sample_token(logits, cfg, rng)
