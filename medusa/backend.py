"""The PyTorch reference backend: our Llama + static KV cache + PyTorch Medusa heads.

``TorchDecoder`` implements the engine's per-step primitives; the hybrid backend reuses it with
the head computation swapped out, so the backbone path is written once.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .core.backends import BackendBase
from .core.buffers import TreeBuffers
from .core.config import GenerationConfig, check_context
from .core.models import load_args
from .core.drafts import DraftLevel, DraftTrees, draft_by_level, source_names
from .core.engine import Verified
from .core.stats import StepTimer
from .decoding import (TorchTree, evaluate_posterior, generate_candidates, sample_token, sample_typical, tree_decode,
                       update_inputs)
from .heads import HydraHeads, MedusaHeads, heads_from_state
from .llama import CAUSAL, KVCache, Transformer, load_llama, pack_linears, packed

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

HeadsTopK = Callable[[Tensor, int, int], Tensor]  # hidden [h], heads used, ranks used -> [heads, TOPK] ids


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def pick_device(name: str) -> str:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; anything else is a ValueError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


class TorchDecoder:
    """Engine primitives over a PyTorch backbone; ``heads_topk`` may run in any framework."""

    def __init__(self, model: Transformer, heads_topk: HeadsTopK, tree: TorchTree, max_len: int,
                 profile: bool = False, draft_level: Optional[DraftLevel] = None) -> None:
        """``draft_level``: sequentially dependent heads (Hydra), which draft level by level."""
        self.model, self.heads_topk, self.tree = model, heads_topk, tree
        self.draft_level = draft_level
        self.device = model.tok_embeddings.weight.device
        self.trees = DraftTrees(tree.buffers, self._convert, tree)
        self.cache = KVCache(model.args, max_len, model.tok_embeddings.weight.dtype, self.device)
        self.max_len = max_len
        self.hidden: Optional[Tensor] = None  # [h] at the last committed position
        self.generator = torch.Generator(device=self.device)
        self.timer = StepTimer(self.synchronize, profile)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @property
    def cache_length(self) -> int:
        return self.cache.length

    @property
    def tree_size(self) -> int:
        return self.tree.num_nodes

    def set_tree(self, buffers: TreeBuffers) -> None:
        self.trees = DraftTrees(buffers, self._convert)
        self.tree = self.trees.heads

    def _convert(self, buffers: TreeBuffers) -> TorchTree:
        return TorchTree.from_buffers(buffers, self.device)

    @torch.inference_mode()
    def prefill(self, ids: list[int], cfg: GenerationConfig) -> int:
        self.cache.reset()
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        t = len(ids)
        positions = torch.arange(t, device=self.device)
        self.hidden = self.model(torch.tensor([ids], device=self.device), positions, CAUSAL, self.cache)[0, -1]
        self.cache.commit(t)
        logits = self.model.logits(self.hidden)
        if cfg.medusa and cfg.mode == "typical":
            return sample_typical(logits, cfg, self.generator)
        return sample_token(logits, cfg, self.generator)

    @torch.inference_mode()
    def decode_one(self, root: int, cfg: GenerationConfig) -> int:
        positions = torch.tensor([self.cache.length], device=self.device)
        self.hidden = self.model(torch.tensor([[root]], device=self.device), positions, None, self.cache)[0, -1]
        self.cache.commit(1)
        return sample_token(self.model.logits(self.hidden), cfg, self.generator)

    @torch.inference_mode()
    def medusa_step(self, root: int, cfg: GenerationConfig, ngram: Optional[np.ndarray] = None,
                    draft: Optional[str] = None) -> Verified:
        tree = self.trees.get(draft or cfg.draft, cfg.ngram_tokens)
        with self.timer.part("heads"):
            if self.draft_level is not None:
                drafted = draft_by_level(root, tree.buffers, tree.levels, self.hidden, self.draft_level, ngram)
                candidates = torch.as_tensor(drafted, device=self.device)
            else:
                chain = None if ngram is None else torch.as_tensor(ngram, device=self.device)
                candidates = generate_candidates(torch.tensor(root, device=self.device), self._heads_topk(tree), tree,
                                                 chain)
        with self.timer.part("tree_forward"):
            hidden, logits = tree_decode(self.model, self.cache, candidates, tree)
        with self.timer.part("posterior"):
            best, accepted, bonus = evaluate_posterior(logits, candidates, tree, cfg, self.generator)
        with self.timer.part("cache_update"):
            nodes = update_inputs(self.cache, tree, best, accepted)
            self.hidden = hidden[nodes[-1]]
        self.timer.steps += 1
        path = tree.retrieve_indices_host[best, 1:accepted + 1]
        return Verified(candidates[nodes].tolist(), accepted, bonus, source_names(tree.buffers.sources[path]))

    def _heads_topk(self, tree: TorchTree) -> Tensor:
        """[heads the tree reads, TOPK] ids; none for a tree without heads' nodes (n-gram only)."""
        if tree.buffers.head_depth == 0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return self.heads_topk(self.hidden, tree.buffers.head_depth, tree.topk)


class TorchBackend(BackendBase):
    """Load a base model (short name or HF dir), Medusa heads and a tree; generate token ids."""

    name = "torch"

    def __init__(self, model: Optional[str] = None, heads: Optional[str] = None, tree: Optional[str] = None,
                 dtype: str = "float32", device: str = "auto", max_len: int = 2048, profile: bool = False) -> None:
        """``model``/``heads``/``tree``: see ``core.resolve`` (None = the defaults it documents).
        ``profile``: time the parts of each Medusa step (see ``describe()``)."""
        self.device, self.dtype = pick_device(device), torch_dtype(dtype)
        run = self._resolve(model, heads, tree, self.device)
        check_context(load_args(self.model_dir), max_len)
        self.model = load_llama(self.model_dir, self.dtype, self.device)
        self.heads = self._heads()  # before packing: heads may copy the dense lm_head
        self.proposal_ids, self.proposal_head = self._proposal_head(run.token_map)
        pack_linears(self.model)
        self.decoder = TorchDecoder(self.model, self.heads_topk, TorchTree.from_buffers(self.tree_buffers(), self.device),
                                    max_len, profile, self.draft_level if run.heads_config.head_type == "hydra" else None)

    def _heads(self) -> MedusaHeads | HydraHeads:
        args, run = self.model.args, self.resolved
        heads = heads_from_state(run.heads_config, run.heads_state, args.hidden_size, args.vocab_size, self.dtype,
                                 self.device)
        return pack_linears(heads)

    def _proposal_head(self, ids: Optional[np.ndarray]) -> tuple[Optional[Tensor], torch.nn.Module]:
        """The projection shared heads propose through: the base lm_head, or its token-map rows."""
        if ids is None:
            return None, self.model.output
        rows = torch.nn.Linear(self.model.args.hidden_size, len(ids), bias=False, device=self.device, dtype=self.dtype)
        rows.weight.data.copy_(self.model.output.weight.detach()[torch.as_tensor(ids, device=self.device)])
        return torch.as_tensor(ids, device=self.device), packed(rows)

    def heads_topk(self, hidden: Tensor, depth: int, k: int) -> Tensor:
        top = self.heads.topk(hidden, self.proposal_head, depth, k)
        return top if self.proposal_ids is None else self.proposal_ids[top]

    def draft_level(self, k: int, hidden: Tensor, paths: np.ndarray, ranks: int) -> np.ndarray:
        """Hydra head k over paths [M, k+1] (token ids, root first) -> its ``ranks`` best ids [M, ranks]."""
        paths_t = torch.as_tensor(paths, device=self.device)
        logits = self.heads.level(k, hidden, paths_t, self.proposal_head, self.model.tok_embeddings)
        top = logits.topk(ranks, dim=-1).indices
        return (top if self.proposal_ids is None else self.proposal_ids[top]).cpu().numpy()

    def synchronize(self) -> None:
        self.decoder.synchronize()

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), proposal_vocab=len(self.proposal_ids) if self.proposal_ids is not None else self.model.args.vocab_size,
                    dtype=str(self.dtype).replace("torch.", ""), device=self.device)
