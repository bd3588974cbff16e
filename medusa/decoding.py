"""Medusa decoding in PyTorch, in the paper's four steps.

Glossary (Medusa, arxiv 2401.10774):
  root              the token the base model chose last; verified context, not yet in the KV cache
  candidate         a drafted token: head k proposes TOPK tokens for position +k+1; the n-gram
                    source (``core.drafts``) proposes a chain continuing the context's longest
                    earlier match
  tree candidates   [N] the tree's tokens, root first: ``flat[tree_indices]`` with
                    ``flat = [root, head0 top-K, head1 top-K, ..., ngram chain]``
  retrieve indices  [P, D+1] node indices of each root-to-leaf path (padding -1)
  accept length     how many candidates after the root a path keeps (0..D)
  bonus token       the base model's own next token after the last accepted node: the next root
  posterior threshold ε, posterior alpha δ
                    typical acceptance keeps a candidate x when p(x) > min(ε, δ·exp(-H(p)))
                    (entropy-adaptive: confident distributions demand more of a candidate)

One step: generate_candidates -> tree_decode -> evaluate_posterior -> update_inputs.
Acceptance is evaluated per node against its parent's distribution, then gathered along the
retrieve indices, so full-vocabulary logits are never copied per path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .core.acceptance import best_path
from .core.buffers import HeadLevel, TreeBuffers, head_levels
from .core.config import GenerationConfig
from .core.drafts import first_twins
from .llama import KVCache, Transformer


@dataclass(frozen=True)
class TorchTree:
    """TreeBuffers on the model's device (converted once)."""

    mask: Tensor  # [N, N] bool
    tree_indices: Tensor  # [N]
    position_ids: Tensor  # [N]
    retrieve_indices: Tensor  # [P, D+1], -1 padded
    parents: Tensor  # [N], root's parent clamped to 0 (never read as a parent)
    depth: int
    topk: int  # ranks per head the tree uses
    retrieve_indices_host: np.ndarray  # [P, D+1] for the path walk, which runs on the host
    buffers: TreeBuffers  # the host original (sources, head depth, chain length)
    levels: tuple[HeadLevel, ...] = ()  # what each head drafts, for sequentially dependent heads (host)

    @classmethod
    def from_buffers(cls, b: TreeBuffers, device: torch.device | str) -> "TorchTree":
        t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
        return cls(t(b.attn_mask), t(b.tree_indices), t(b.position_ids), t(b.retrieve_indices),
                   t(b.parents).clamp(min=0), b.depth, b.topk, b.retrieve_indices, b, tuple(head_levels(b)))

    @property
    def num_nodes(self) -> int:
        return self.tree_indices.shape[0]


def generate_candidates(root: Tensor, head_topk: Tensor, tree: TorchTree, ngram: Optional[Tensor] = None) -> Tensor:
    """root: [] id, head_topk: [H, TOPK], ngram: [C] (a tree with a chain) -> tree candidates [N]."""
    parts = [root.view(1), head_topk[: tree.buffers.head_depth].reshape(-1)]
    if tree.buffers.chain:
        parts.append(ngram)
    return torch.cat(parts)[tree.tree_indices]


def tree_decode(model: Transformer, cache: KVCache, candidates: Tensor, tree: TorchTree) -> tuple[Tensor, Tensor]:
    """One forward over all N tree nodes -> (hidden [N, h], logits [N, V]).

    Each node attends to the committed prefix and to its own ancestors (tree mask); its RoPE
    position is the prefix length plus its depth, so its logits equal those of a sequential
    forward over its root path.
    """
    n = tree.num_nodes
    mask = None  # a bare root sees everything: SDPA's mask-free path, as in plain decoding
    if n > 1:
        prefix = torch.ones(n, cache.length, dtype=torch.bool, device=candidates.device)
        mask = torch.cat([prefix, tree.mask], dim=1)  # [N, length + N]
    hidden = model(candidates[None], tree.position_ids + cache.length, mask, cache)[0]
    return hidden, model.logits(hidden)


def evaluate_posterior(logits: Tensor, candidates: Tensor, tree: TorchTree, cfg: GenerationConfig,
                       generator: Optional[torch.Generator] = None) -> tuple[int, int, int]:
    """-> (best path row, accept length, bonus token).

    greedy:  a node is accepted when it is its parent's argmax.
    nucleus: every node draws one sample from its top-p distribution; a node is accepted when it
             equals its parent's sample, so the walk reproduces sequential sampling exactly and the
             bonus token is the last accepted node's own sample.  Nodes with the same tokens from
             the root (an n-gram chain repeating a heads' branch) share one sample: independent
             samples would let the walk pick whichever matched, favouring drafted tokens.
    typical: a node is accepted when its probability under the parent passes the entropy-adaptive
             threshold; ties in length go to the most likely path; the bonus is a typical sample.
    """
    mode = cfg.mode
    if mode == "typical":
        probs = torch.softmax(logits / cfg.temperature, dim=-1)
        node_prob = probs[tree.parents, candidates]  # [N] p(node | parent)
        node_ok = node_prob > typical_threshold(probs, cfg)[tree.parents]
    else:
        choice = logits.argmax(-1) if mode == "greedy" else sample_top_p(logits, cfg, generator)
        if mode == "nucleus" and tree.buffers.chain:
            twins = first_twins(candidates.cpu().numpy(), tree.buffers.parents)
            choice = choice[torch.as_tensor(twins, device=choice.device)]
        node_ok = candidates == choice[tree.parents]
    logprob = torch.log(node_prob).cpu().numpy() if mode == "typical" else None
    best, best_len = best_path(node_ok.cpu().numpy(), tree.retrieve_indices_host, logprob)
    last = int(tree.retrieve_indices_host[best, best_len])
    if mode == "typical":
        bonus = sample_typical(logits[last], cfg, generator)
    else:
        bonus = int(choice[last])
    return best, best_len, bonus


def update_inputs(cache: KVCache, tree: TorchTree, best: int, accept_length: int) -> Tensor:
    """Compact the accepted path's KV entries into place; return its node indices [accept_length+1]."""
    nodes = tree.retrieve_indices[best, : accept_length + 1]
    cache.compact(nodes)
    return nodes


def typical_threshold(probs: Tensor, cfg: GenerationConfig) -> Tensor:
    """probs [..., V] -> min(ε, δ·exp(-H)) [...]."""
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)
    return torch.clamp(cfg.posterior_alpha * torch.exp(-entropy), max=cfg.posterior_threshold)


def sample_typical(logits: Tensor, cfg: GenerationConfig, generator: Optional[torch.Generator]) -> int:
    """Sample one token from the typical set of softmax(logits / T) (logits [V])."""
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    probs = torch.where(probs < typical_threshold(probs, cfg), 0.0, probs)
    if probs.sum() <= 0:  # threshold above every token: fall back to the mode of the distribution
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_top_p(logits: Tensor, cfg: GenerationConfig, generator: Optional[torch.Generator]) -> Tensor:
    """One sample per row of logits [R, V] from the temperature-scaled top-p distribution -> [R]."""
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p  # mass before a token already covers top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample_token(logits: Tensor, cfg: GenerationConfig, generator: Optional[torch.Generator]) -> int:
    """The next token from logits [V] as plain sampling (baseline, and the first Medusa root)."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    return int(sample_top_p(logits[None], cfg, generator)[0])
