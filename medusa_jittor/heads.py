"""Medusa and Hydra heads in Jittor: a name-for-name mirror of ``medusa/heads.py``.

Same module tree (a ModuleList of Sequential(ResBlock..., Linear); Hydra heads add ``proj``), so
parameter names are the original checkpoint keys and a checkpoint trained in either framework
loads strictly in both.  Hydra heads are trained in PyTorch; here they draft (``level``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from medusa.core.checkpoint import StateDict, build_head_modules, check_shapes, infer_layout
from medusa.core.config import MedusaConfig
from medusa.core.trees import TOPK

from .runtime import jt

nn = jt.nn


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.linear.weight.assign(jt.zeros_like(self.linear.weight))  # identity at init (Medusa's recipe)
        self.act = nn.SiLU()

    def execute(self, x: jt.Var) -> jt.Var:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """num_heads distinct heads, each L distinct ResBlocks (+ its own lm_head unless shared)."""

    def __init__(self, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        heads = build_head_modules(nn, ResBlock, config, hidden_size, vocab_size)
        super().__init__(*heads)
        self.config = config

    def init_lm_heads(self, base_lm_head: np.ndarray) -> None:
        """Start each per-head lm_head as a copy of the base model's (the original initialisation)."""
        if not self.config.shared_lm_head:
            for head in self:
                head[-1].weight.assign(jt.array(base_lm_head))

    def execute(self, hidden: jt.Var, base_lm_head: nn.Module, depth: Optional[int] = None) -> jt.Var:
        """hidden [..., h] -> logits [num_heads, ..., V] of the first ``depth`` heads (all by default);
        ``base_lm_head`` is used by shared heads."""
        states = jt.stack([head(hidden) for head in list(self)[:depth]])
        return base_lm_head(states) if self.config.shared_lm_head else states

    def topk(self, hidden: jt.Var, base_lm_head: nn.Module, depth: Optional[int] = None, k: int = TOPK) -> jt.Var:
        """hidden [h] -> the k best ids of the first ``depth`` heads, [depth, TOPK]; ranks >= k are 0."""
        top = topk_ids(self(hidden, base_lm_head, depth), k)
        return top if k == TOPK else jt.concat([top, jt.zeros((top.shape[0], TOPK - k), top.dtype)], dim=1)

    def numpy_state(self) -> StateDict:
        return {k: v.numpy().astype(np.float32) for k, v in self.state_dict().items()}


class HydraHead(nn.Module):
    """Head ``k`` of Hydra heads: input projection over [h; k+1 token embeddings], L ResBlocks, its own
    lm_head unless shared; children ``proj``, ``0``..``L`` as in PyTorch."""

    def __init__(self, k: int, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear((k + 2) * hidden_size, hidden_size)
        eye = np.zeros(((hidden_size, (k + 2) * hidden_size)), np.float32)
        eye[:, :hidden_size] = np.eye(hidden_size)
        self.proj.weight.assign(jt.array(eye))  # pass h through at init, as in PyTorch
        self.proj.bias.assign(jt.zeros_like(self.proj.bias))
        blocks = [ResBlock(hidden_size) for _ in range(config.medusa_num_layers)]
        if not config.shared_lm_head:
            blocks.append(nn.Linear(hidden_size, vocab_size, bias=False))
        for j, block in enumerate(blocks):
            setattr(self, str(j), block)
        self.num_blocks = len(blocks)

    def execute(self, hidden: jt.Var, tokens: jt.Var) -> jt.Var:
        """hidden [B, h], token embeddings [B, k+1, h] -> [B, h] (or [B, V] with its own lm_head)."""
        x = self.proj(jt.concat([hidden, tokens.reshape(tokens.shape[0], -1)], dim=-1))
        for j in range(self.num_blocks):
            x = getattr(self, str(j))(x)
        return x


class HydraHeads(nn.ModuleList):
    """num_heads sequentially dependent heads (``medusa.heads.HydraHeads``)."""

    def __init__(self, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        super().__init__(*[HydraHead(k, config, hidden_size, vocab_size) for k in range(config.medusa_num_heads)])
        self.config = config

    def level(self, k: int, hidden: jt.Var, paths: jt.Var, base_lm_head: nn.Module, embed: nn.Module) -> jt.Var:
        """Head k over M paths: hidden [h], paths [M, k+1] token ids (root first) -> logits [M, V]."""
        states = self[k](hidden.reshape(1, -1).broadcast((paths.shape[0], hidden.shape[-1])), embed(paths))
        return base_lm_head(states) if self.config.shared_lm_head else states

    numpy_state = MedusaHeads.numpy_state


def jittor_rows(weight: np.ndarray, ids: Optional[np.ndarray]) -> nn.Linear:
    """A bias-free Jittor Linear projecting onto rows ``ids`` of ``weight`` [V, h] (all rows if None)."""
    rows = weight if ids is None else weight[ids]
    linear = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    linear.weight.assign(jt.array(np.ascontiguousarray(rows, dtype=np.float32)))
    return linear


def topk_ids(scores: jt.Var, k: int) -> jt.Var:
    """Indices of the k largest of each row of scores [R, V], best first -> [R, k].

    k rounds of argmax-and-mask: on CPU this is ~6x faster than ``jt.topk`` (which sorts the whole
    vocabulary) for the k <= 10 Medusa needs.  Ties resolve to the lowest index, like ``argmax``.
    """
    picked = []
    for _ in range(k):
        best = jt.argmax(scores, dim=-1)[0]  # [R]
        picked.append(best)
        scores = scores.scatter(1, best.unsqueeze(1), jt.full((scores.shape[0], 1), float("-inf")))
    return jt.stack(picked, dim=1)


def heads_from_state(config: MedusaConfig, state: Optional[StateDict], hidden_size: int,
                     vocab_size: int) -> MedusaHeads | HydraHeads:
    """Strictly load a numpy state dict (see ``medusa.core.checkpoint``) into Jittor heads (in eval
    mode); ``state`` None gives fresh heads of ``config``'s shape."""
    heads = (HydraHeads if config.head_type == "hydra" else MedusaHeads)(config, hidden_size, vocab_size)
    if state is None:
        return heads.eval()
    infer_layout(state)
    check_shapes(state, hidden_size, vocab_size)
    own = heads.state_dict()
    if set(own) != set(state):
        missing = sorted(set(own) - set(state)) or sorted(set(state) - set(own))
        raise KeyError(f"Jittor heads and checkpoint disagree on key {missing[0]!r}")
    heads.load_state_dict({k: jt.array(np.asarray(v, dtype=np.float32)) for k, v in state.items()})
    return heads.eval()
