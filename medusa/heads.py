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


def heads_from_state(config: MedusaConfig, state: Optional[StateDict], hidden_size: int, vocab_size: int,
                     dtype: torch.dtype, device: str) -> MedusaHeads:
    """Strictly load a numpy state dict (see ``core.checkpoint``) into PyTorch heads; ``state`` None
    gives fresh heads of ``config``'s shape."""
    heads = MedusaHeads(config, hidden_size, vocab_size)
    if state is not None:
        infer_layout(state)
        check_shapes(state, hidden_size, vocab_size)
        heads.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    return heads.to(device=device, dtype=dtype).eval()
