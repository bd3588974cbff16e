"""Medusa heads in PyTorch (Medusa paper §2.1.1).

Head k maps the base model's last hidden state to a distribution over the token k+2 positions
ahead: ``p_k = softmax(W2_k (h + SiLU(W1_k h + b1_k)))``, with L ResBlocks per head.  W1 is
zero-initialised so a fresh head starts as the base model's own next-token predictor.
Module names follow the original ``nn.ModuleList`` of ``nn.Sequential`` so ``state_dict()`` keys are
the FasterDecoding checkpoint keys verbatim.  With ``shared_lm_head`` the heads keep only their
ResBlocks and project with the base model's (frozen) lm_head: the legacy layout, and the right
choice for small models whose vocabulary projection outweighs the blocks.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .core.checkpoint import StateDict, build_head_modules, check_shapes, infer_layout
from .core.config import MedusaConfig
from .core.trees import TOPK


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)  # identity at init (Medusa's recipe)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """num_heads distinct heads, each L distinct ResBlocks (+ its own lm_head unless shared)."""

    def __init__(self, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        heads = build_head_modules(nn, ResBlock, config, hidden_size, vocab_size)
        super().__init__(heads)
        self.config = config

    def init_lm_heads(self, base_lm_head: Tensor) -> None:
        """Start each per-head lm_head as a copy of the base model's (the original initialisation)."""
        if not self.config.shared_lm_head:
            for head in self:
                head[-1].weight.data.copy_(base_lm_head)

    def forward(self, hidden: Tensor, base_lm_head: nn.Module, depth: Optional[int] = None) -> Tensor:
        """hidden [..., h] -> logits [num_heads, ..., V] (fp32) of the first ``depth`` heads (all by
        default); ``base_lm_head`` is the model's output layer (or its token-map rows)."""
        states = torch.stack([head(hidden) for head in list(self)[:depth]])
        return (base_lm_head(states) if self.config.shared_lm_head else states).float()

    def topk(self, hidden: Tensor, base_lm_head: nn.Module, depth: Optional[int] = None, k: int = TOPK) -> Tensor:
        """hidden [h] -> the k best ids of the first ``depth`` heads, [depth, TOPK]; ranks >= k are 0
        (a tree that never uses a head or a rank does not pay for it)."""
        return F.pad(self(hidden, base_lm_head, depth).topk(k, dim=-1).indices, (0, TOPK - k))

    def numpy_state(self) -> StateDict:
        return {k: v.detach().float().cpu().numpy() for k, v in self.state_dict().items()}


class HydraHead(nn.Module):
    """Head ``k`` of Hydra heads: the input projection, L ResBlocks, its own lm_head unless shared
    (children named so that ``state_dict()`` keys are ``proj.*``, ``0.linear.*``, ..., ``L.weight``)."""

    def __init__(self, k: int, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear((k + 2) * hidden_size, hidden_size)
        with torch.no_grad():  # pass h through at init: a fresh head is a Medusa head
            self.proj.weight.zero_()
            self.proj.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
            self.proj.bias.zero_()
        blocks = [ResBlock(hidden_size) for _ in range(config.medusa_num_layers)]
        if not config.shared_lm_head:
            blocks.append(nn.Linear(hidden_size, vocab_size, bias=False))
        for j, block in enumerate(blocks):
            self.add_module(str(j), block)
        self.num_blocks = len(blocks)

    def forward(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """hidden [B, h], token embeddings [B, k+1, h] -> [B, h] (or [B, V] with its own lm_head)."""
        x = self.proj(torch.cat([hidden, tokens.flatten(1)], dim=-1))
        for j in range(self.num_blocks):  # by name: packing (``llama.pack_linears``) swaps the modules
            x = getattr(self, str(j))(x)
        return x


class HydraHeads(nn.ModuleList):
    """num_heads sequentially dependent heads (see the module docstring)."""

    def __init__(self, config: MedusaConfig, hidden_size: int, vocab_size: int) -> None:
        super().__init__([HydraHead(k, config, hidden_size, vocab_size) for k in range(config.medusa_num_heads)])
        self.config = config

    def init_lm_heads(self, base_lm_head: Tensor) -> None:
        """Start each per-head lm_head (the last block) as a copy of the base model's."""
        if not self.config.shared_lm_head:
            for head in self:
                getattr(head, str(head.num_blocks - 1)).weight.data.copy_(base_lm_head)

    def forward(self, hidden: Tensor, base_lm_head: nn.Module, embed: nn.Module, inputs: Tensor) -> Tensor:
        """Teacher-forced training: hidden [B, h], inputs [B, H] token ids (x_1 .. x_H) -> logits
        [H, B, V] (fp32); head k reads ``inputs[:, :k+1]``."""
        emb = embed(inputs)
        states = torch.stack([head(hidden, emb[:, :k + 1]) for k, head in enumerate(self)])
        return (base_lm_head(states) if self.config.shared_lm_head else states).float()

    def level(self, k: int, hidden: Tensor, paths: Tensor, base_lm_head: nn.Module, embed: nn.Module) -> Tensor:
        """Head k over M paths: hidden [h], paths [M, k+1] token ids (root first) -> logits [M, V]."""
        states = self[k](hidden.expand(paths.shape[0], -1), embed(paths))
        return (base_lm_head(states) if self.config.shared_lm_head else states).float()

    numpy_state = MedusaHeads.numpy_state


def heads_from_state(config: MedusaConfig, state: Optional[StateDict], hidden_size: int, vocab_size: int,
                     dtype: torch.dtype, device: str) -> MedusaHeads | HydraHeads:
    """Strictly load a numpy state dict (see ``core.checkpoint``) into PyTorch heads; ``state`` None
    gives fresh heads of ``config``'s shape."""
    kind = HydraHeads if config.head_type == "hydra" else MedusaHeads
    heads = kind(config, hidden_size, vocab_size)
    if state is not None:
        infer_layout(state)
        check_shapes(state, hidden_size, vocab_size)
        heads.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    return heads.to(device=device, dtype=dtype).eval()
