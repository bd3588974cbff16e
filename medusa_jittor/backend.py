"""Backend ``hybrid``: PyTorch backbone, static KV cache and tree decoding from ``medusa``; the
Medusa heads run in Jittor.

Only what must cross the framework boundary crosses it: the hidden state at the last accepted
position goes to Jittor ([h] floats), the heads' top-k token ids come back ([H, TOPK] ints) —
never full-vocabulary logits.  The time spent crossing is measured and reported by ``describe()``.
Heads compute in fp32 in Jittor whatever the backbone dtype.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from medusa.backend import TorchBackend

from .heads import HydraHeads, MedusaHeads, heads_from_state, jittor_rows, topk_ids
from .runtime import jt


class HybridBackend(TorchBackend):
    name = "hybrid"

    def _heads(self) -> MedusaHeads | HydraHeads:
        args, run = self.model.args, self.resolved
        self.bridge_s = self.heads_s = 0.0
        self.embed: Optional[jt.nn.Embedding] = None
        self.head_calls = 0
        return heads_from_state(run.heads_config, run.heads_state, args.hidden_size, args.vocab_size)

    def _proposal_head(self, ids: Optional[np.ndarray]) -> tuple[Optional[Tensor], jt.nn.Module]:
        """A Jittor copy of the base lm_head (or of its token-map rows) for the shared heads."""
        weight = self.model.output.weight.detach().float().cpu().numpy()
        return (None if ids is None else torch.as_tensor(ids, device=self.device)), jittor_rows(weight, ids)

    def heads_topk(self, hidden: Tensor, depth: int, k: int) -> Tensor:
        """hidden [h] (torch) -> [depth, TOPK] token ids (torch), computed by the Jittor heads."""
        t0 = time.perf_counter()
        x = jt.array(hidden.detach().float().cpu().numpy())
        t1 = time.perf_counter()
        with jt.no_grad():
            ids = self.heads.topk(x, self.proposal_head, depth, k).numpy()
        t2 = time.perf_counter()
        out = torch.from_numpy(ids.astype(np.int64)).to(self.device)
        if self.proposal_ids is not None:
            out = self.proposal_ids[out]
        self._account(t0, t1, t2, time.perf_counter(), step=True)
        return out

    def _account(self, t0: float, t1: float, t2: float, t3: float, step: bool) -> None:
        """Crossing (t0-t1 in, t2-t3 out) and Jittor heads (t1-t2) time; ``step``: a step's first head call."""
        self.bridge_s += (t1 - t0) + (t3 - t2)
        self.heads_s += t2 - t1
        self.head_calls += step

    def draft_level(self, k: int, hidden: Tensor, paths: np.ndarray, ranks: int) -> np.ndarray:
        """Hydra head k (Jittor) over paths [M, k+1] -> its ``ranks`` best ids [M, ranks] (numpy)."""
        if self.embed is None:  # the embedding the Hydra heads read, copied to Jittor on first use
            self.embed = jt.nn.Embedding(*self.model.tok_embeddings.weight.shape)
            self.embed.weight.assign(jt.array(self.model.tok_embeddings.weight.detach().float().cpu().numpy()))
        t0 = time.perf_counter()
        x, at = jt.array(hidden.detach().float().cpu().numpy()), jt.array(paths.astype(np.int32))
        t1 = time.perf_counter()
        with jt.no_grad():
            logits = self.heads.level(k, x, at, self.proposal_head, self.embed)
            top = topk_ids(logits, ranks).numpy()
        t2 = time.perf_counter()
        out = top if self.proposal_ids is None else self.proposal_ids.cpu().numpy()[top]
        self._account(t0, t1, t2, time.perf_counter(), step=k == 0)  # level 0 opens every step
        return out

    def describe(self) -> dict[str, Any]:
        calls = max(self.head_calls, 1)
        return dict(super().describe(), heads_framework="jittor",
                    bridge_ms_per_step=1e3 * self.bridge_s / calls, jittor_heads_ms_per_step=1e3 * self.heads_s / calls)
