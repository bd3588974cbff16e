"""The PyTorch reference backend: our Llama + static KV cache + PyTorch Medusa heads.

``TorchDecoder`` implements the engine's per-step primitives; the hybrid backend reuses it with
the head computation swapped out, so the backbone path is written once.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from .core import engine
from .core.buffers import build_buffers
from .core.checkpoint import StateDict, load_checkpoint
from .core.config import GenerationConfig, MedusaConfig
from .core.models import DEFAULT_MODEL, resolve_model, shipped_heads
from .core.trees import resolve as resolve_tree
from .decoding import (TorchTree, evaluate_posterior, generate_candidates, sample_token, sample_typical,
                       tree_decode, update_inputs)
from .heads import MedusaHeads, heads_from_state
from .llama import KVCache, Transformer, load_llama, pack_linears

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DEFAULT_TREE = "cpu_small"
FRESH_HEADS = MedusaConfig(medusa_num_heads=4, medusa_num_layers=1, shared_lm_head=True)

HeadsTopK = Callable[[Tensor], Tensor]  # hidden [h] -> [H, TOPK] token ids


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use float32, bfloat16 or float16")
    return DTYPES[name]


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return name


class TorchDecoder:
    """Engine primitives over a PyTorch backbone; ``heads_topk`` may run in any framework."""

    def __init__(self, model: Transformer, heads_topk: HeadsTopK, tree: TorchTree, max_len: int) -> None:
        self.model, self.heads_topk, self.tree = model, heads_topk, tree
        self.device = model.tok_embeddings.weight.device
        self.cache = KVCache(model.args, max_len, model.tok_embeddings.weight.dtype, self.device)
        self.max_len = max_len
        self.hidden: Optional[Tensor] = None  # [h] at the last committed position
        self.generator = torch.Generator(device=self.device)

    @property
    def cache_length(self) -> int:
        return self.cache.length

    @property
    def tree_size(self) -> int:
        return self.tree.num_nodes

    @torch.inference_mode()
    def prefill(self, ids: list[int], cfg: GenerationConfig) -> int:
        self.cache.reset()
        self.generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        t = len(ids)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        positions = torch.arange(t, device=self.device)
        self.hidden = self.model(torch.tensor([ids], device=self.device), positions, mask, self.cache)[0, -1]
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
    def medusa_step(self, root: int, cfg: GenerationConfig) -> tuple[list[int], int, int]:
        candidates = generate_candidates(torch.tensor(root, device=self.device), self.heads_topk(self.hidden), self.tree)
        hidden, logits = tree_decode(self.model, self.cache, candidates, self.tree)
        best, accepted, bonus = evaluate_posterior(logits, candidates, self.tree, cfg, self.generator)
        nodes = update_inputs(self.cache, self.tree, best, accepted)
        self.hidden = hidden[nodes[-1]]
        return candidates[nodes].tolist(), accepted, bonus


class TorchBackend:
    """Load a base model (short name or HF dir), Medusa heads and a tree; generate token ids."""

    name = "torch"

    def __init__(self, model: str = DEFAULT_MODEL, heads: Optional[str] = None, tree: Optional[str] = None,
                 dtype: str = "float32", device: str = "auto", max_len: int = 2048) -> None:
        """``heads``: a checkpoint dir; None = the heads shipped for ``model`` (if any); "fresh" = untrained."""
        from transformers import AutoTokenizer

        self.model_name, self.model_dir = model, resolve_model(model)
        self.device, self.dtype = pick_device(device), torch_dtype(dtype)
        self.model = load_llama(self.model_dir, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.heads_path = shipped_heads(model) if heads is None else None if heads == "fresh" else Path(heads)
        self.heads_config, self.heads = self._load_heads()  # before packing: heads may copy the dense lm_head
        pack_linears(self.model)
        self.tree_name = tree or self._heads_tree() or DEFAULT_TREE
        buffers = build_buffers(resolve_tree(self.tree_name, self.heads_config.medusa_num_heads))
        self.decoder = TorchDecoder(self.model, self.heads_topk, TorchTree.from_buffers(buffers, self.device), max_len)

    def _heads_checkpoint(self) -> tuple[MedusaConfig, Optional[StateDict]]:
        """The heads' config and numpy weights; (fresh config, None) when there is no checkpoint."""
        if self.heads_path is None:
            log.warning("no Medusa heads for %s: using freshly initialised heads (expect little speed-up)",
                        self.model_name)
            return FRESH_HEADS, None
        return load_checkpoint(self.heads_path)

    def _load_heads(self) -> tuple[MedusaConfig, MedusaHeads]:
        args = self.model.args
        config, state = self._heads_checkpoint()
        if state is None:
            heads = MedusaHeads(config, args.hidden_size, args.vocab_size).to(device=self.device, dtype=self.dtype)
        else:
            heads = heads_from_state(config, state, args.hidden_size, args.vocab_size, self.dtype, self.device)
        return config, pack_linears(heads.eval())

    def _heads_tree(self) -> Optional[str]:
        """The tree the heads' config.json names: a named tree or a file beside the heads."""
        name = self.heads_config.tree
        if name and self.heads_path is not None and (self.heads_path / name).is_file():
            return str(self.heads_path / name)
        return name

    def heads_topk(self, hidden: Tensor) -> Tensor:
        return self.heads.topk(hidden, self.model.output)

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[engine.Step]:
        return engine.generate(self.decoder, prompt_ids, cfg)

    def synchronize(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "heads": str(self.heads_path or "fresh"),
                "num_heads": self.heads_config.medusa_num_heads, "tree": self.tree_name,
                "tree_nodes": self.decoder.tree_size, "dtype": str(self.dtype).replace("torch.", ""),
                "device": self.device}
