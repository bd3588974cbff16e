"""Backend ``jittor``: the Jittor Llama, its fixed-shape KV cache, Jittor tree verification and the
Jittor heads of ``medusa_jittor`` — no PyTorch in the decoding loop (the tokenizer is HF's).

With ``profile=True``, ``describe()`` reports the per-step time split (heads, tree forward,
posterior, cache update), measured with a sync at each boundary (which costs a little).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from medusa.core.backends import BackendBase, BackendError
from medusa.core.buffers import TreeBuffers
from medusa.core.config import GenerationConfig, check_context
from medusa.core.models import load_args
from medusa.core.drafts import DraftTrees, draft_by_level, source_names
from medusa.core.engine import Verified
from medusa.core.stats import StepTimer
from medusa_jittor.heads import HydraHeads, MedusaHeads, heads_from_state, jittor_rows, topk_ids
from medusa_jittor.runtime import jt

from .decoding import (JittorTree, additive_mask, evaluate_posterior, generate_candidates, sample_first,
                       sample_token, tree_decode, update_inputs)
from .llama import KVCache, Transformer, load_llama

DTYPES = ("float32", "fp32")  # Jittor's CPU kernels have no bf16, and fp16 on CUDA is untested here


class JittorDecoder:
    """Engine primitives over the Jittor model and heads."""

    def __init__(self, model: Transformer, heads: MedusaHeads | HydraHeads, tree: JittorTree, max_len: int,
                 profile: bool = False, proposal_ids: Optional[np.ndarray] = None) -> None:
        """``proposal_ids``: the heads' token map (their shared projection then covers only those rows)."""
        self.model, self.heads, self.tree = model, heads, tree
        self.trees = DraftTrees(tree.buffers, JittorTree.from_buffers, tree)
        self.proposal_ids = proposal_ids
        self.proposal_head = model.output if proposal_ids is None else jittor_rows(model.output.weight.numpy(), proposal_ids)
        self.cache = KVCache(model.args, max_len)
        self.max_len = max_len
        self.hidden: Optional[jt.Var] = None  # [h] at the last committed position
        self.rng = np.random.default_rng()
        self.timer = StepTimer(jt.sync_all, profile)

    @property
    def cache_length(self) -> int:
        return self.cache.length

    @property
    def tree_size(self) -> int:
        return self.tree.num_nodes

    def set_tree(self, buffers: TreeBuffers) -> None:
        self.trees = DraftTrees(buffers, JittorTree.from_buffers)
        self.tree = self.trees.heads

    def _forward(self, ids: list[int], positions: np.ndarray) -> jt.Var:
        """Causal forward of ``ids`` at ``positions``; commits them; returns the last hidden [h]."""
        t = len(ids)
        mask = additive_mask(self.cache.length, np.tril(np.ones((t, t), dtype=bool)), self.cache.window(t))
        hidden = self.model(jt.array(np.array([ids], dtype=np.int32)), positions, mask, self.cache)[0, -1]
        self.cache.commit(t)
        return hidden

    def prefill(self, ids: list[int], cfg: GenerationConfig) -> int:
        self.cache.reset()
        self.rng = np.random.default_rng(cfg.seed)
        with jt.no_grad():
            self.hidden = self._forward(ids, np.arange(len(ids)))
            return sample_first(self.model.logits(self.hidden), cfg, self.rng)

    def decode_one(self, root: int, cfg: GenerationConfig) -> int:
        with jt.no_grad():
            self.hidden = self._forward([root], np.array([self.cache.length]))
            return sample_token(self.model.logits(self.hidden), cfg, self.rng)

    def medusa_step(self, root: int, cfg: GenerationConfig, ngram: Optional[np.ndarray] = None,
                    draft: Optional[str] = None) -> Verified:
        tree = self.trees.get(draft or cfg.draft, cfg.ngram_tokens)
        with jt.no_grad():
            with self.timer.part("heads"):
                if isinstance(self.heads, HydraHeads):
                    candidates = draft_by_level(root, tree.buffers, tree.levels, self.hidden, self.draft_level,
                                                ngram).astype(np.int32)
                else:
                    candidates = generate_candidates(root, self._heads_topk(tree.buffers), tree, ngram)
            with self.timer.part("tree_forward"):
                hidden, logits = tree_decode(self.model, self.cache, candidates, tree)
            with self.timer.part("posterior"):
                best, accepted, bonus = evaluate_posterior(logits, candidates, tree, cfg, self.rng)
            with self.timer.part("cache_update"):
                nodes = update_inputs(self.cache, tree, best, accepted)
                self.hidden = hidden[int(nodes[-1])]
        self.timer.steps += 1
        sources = source_names(tree.buffers.sources[nodes[1:]])
        return Verified(candidates[nodes].tolist(), accepted, bonus, sources)

    def draft_level(self, k: int, hidden: jt.Var, paths: np.ndarray, ranks: int) -> np.ndarray:
        """Hydra head k over paths [M, k+1] (token ids, root first) -> its ``ranks`` best ids [M, ranks]."""
        logits = self.heads.level(k, hidden, jt.array(paths.astype(np.int32)), self.proposal_head,
                                  self.model.tok_embeddings)
        top = topk_ids(logits, ranks).numpy()
        return top if self.proposal_ids is None else self.proposal_ids[top]

    def _heads_topk(self, b: TreeBuffers) -> np.ndarray:
        """[heads the tree reads, TOPK] ids; none for a tree without heads' nodes (n-gram only)."""
        if b.head_depth == 0:
            return np.empty(0, dtype=np.int64)
        head_topk = self.heads.topk(self.hidden, self.proposal_head, b.head_depth, b.topk).numpy()
        return head_topk if self.proposal_ids is None else self.proposal_ids[head_topk]


class JittorBackend(BackendBase):
    """Load a base model (short name or HF dir) into the Jittor Llama, Jittor heads and a tree."""

    name = "jittor"

    def __init__(self, model: Optional[str] = None, heads: Optional[str] = None, tree: Optional[str] = None,
                 dtype: str = "float32", device: str = "auto", max_len: int = 2048, profile: bool = False) -> None:
        self.device = self._device(device)
        if dtype not in DTYPES:
            raise BackendError(f"backend 'jittor' runs float32 only, not {dtype!r}: use --dtype float32")
        self.dtype = "float32"
        run = self._resolve(model, heads, tree, self.device)
        check_context(load_args(self.model_dir), max_len)
        self.model = load_llama(self.model_dir, self.dtype)
        args = self.model.args
        self.heads = heads_from_state(run.heads_config, run.heads_state, args.hidden_size, args.vocab_size)
        self.decoder = JittorDecoder(self.model, self.heads, JittorTree.from_buffers(self.tree_buffers()), max_len,
                                     profile, run.token_map)

    @staticmethod
    def _device(name: str) -> str:
        if name == "auto":
            return "cuda" if jt.flags.use_cuda else "cpu"
        if name.startswith("cuda") and not jt.flags.use_cuda:
            raise BackendError(f"device {name!r} requested but Jittor has no CUDA here")
        if name == "cpu":
            jt.flags.use_cuda = 0
        return name

    def synchronize(self) -> None:
        jt.sync_all()

    def describe(self) -> dict[str, Any]:
        ids = self.decoder.proposal_ids
        return dict(super().describe(), dtype=self.dtype,
                    device=self.device, proposal_vocab=self.model.args.vocab_size if ids is None else len(ids))
