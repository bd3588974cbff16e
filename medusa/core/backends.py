"""The backend registry: ``--backend torch|hybrid|jittor`` -> a lazily imported Backend class.

Every CLI, the app and the evaluation harness go through ``load_backend``, so ``--backend torch``
never imports Jittor and a backend that is not installed fails with one clear line.

The contract (``Backend``): ``generate(prompt_ids, cfg)`` yields ``engine.Step``s, ``synchronize()``
waits for the device so timers are honest, ``tokenizer`` is the HF tokenizer of the base model,
and ``describe()`` says what was loaded.
"""
from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

from . import engine
from .buffers import TreeBuffers, build_buffers
from .checkpoint import StateDict, load_checkpoint
from .config import GenerationConfig, MedusaConfig
from .engine import Step
from .models import resolve_model, shipped_heads
from .trees import resolve as resolve_tree

log = logging.getLogger(__name__)
DEFAULT_TREE = "cpu_small"
FRESH_HEADS = MedusaConfig(medusa_num_heads=4, medusa_num_layers=1, shared_lm_head=True)

BACKENDS: dict[str, str] = {
    "torch": "medusa.backend:TorchBackend",
    "hybrid": "medusa_jittor.backend:HybridBackend",
    "jittor": "medusa_jittor_all.backend:JittorBackend",
}


class Backend(Protocol):
    name: str
    tokenizer: Any

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]: ...

    def synchronize(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class BackendError(ValueError):
    """Unknown or unavailable backend, or an option a backend does not support."""


def backend_class(name: str) -> type:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise BackendError(f"backend {name!r} is not available in this installation ({module_name} is missing)") from err
        raise
    return getattr(module, cls_name)


def load_backend(name: str, **options: Any) -> Backend:
    """Instantiate backend ``name`` with model/heads/tree/dtype/device/max_len options."""
    return backend_class(name)(**options)


class BackendBase:
    """The framework-free half of every backend: model directory, tokenizer, heads checkpoint,
    tree choice and the engine loop.  Subclasses set ``self.decoder`` (an ``engine.Decoder``)."""

    name = "base"
    decoder: engine.Decoder

    def _locate(self, model: str, heads: Optional[str]) -> None:
        """``heads``: a checkpoint dir; None = the heads shipped for ``model`` (if any); "fresh" = untrained."""
        from transformers import AutoTokenizer

        self.model_name, self.model_dir = model, resolve_model(model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.heads_path = shipped_heads(model) if heads is None else None if heads == "fresh" else Path(heads)

    def _heads_checkpoint(self) -> tuple[MedusaConfig, Optional[StateDict]]:
        """The heads' config and numpy weights; (fresh config, None) when there is no checkpoint."""
        if self.heads_path is None:
            log.warning("no Medusa heads for %s: using freshly initialised heads (expect little speed-up)",
                        self.model_name)
            return FRESH_HEADS, None
        return load_checkpoint(self.heads_path)

    def _tree(self, tree: Optional[str], heads_config: MedusaConfig) -> TreeBuffers:
        """``tree``, else the tree measured for this backend beside the heads (``tree-NAME.json``,
        step latency differs between frameworks), else the one their config.json names (a named tree
        or a file beside the heads), else DEFAULT_TREE; trimmed to the number of heads."""
        named = heads_config.tree
        own = self.heads_path / f"tree-{self.name}.json" if self.heads_path is not None else None
        if own is not None and own.is_file():
            named = str(own)
        elif named and self.heads_path is not None and (self.heads_path / named).is_file():
            named = str(self.heads_path / named)
        self.tree_name = tree or named or DEFAULT_TREE
        return build_buffers(resolve_tree(self.tree_name, heads_config.medusa_num_heads))

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
        return engine.generate(self.decoder, prompt_ids, cfg)

    def describe(self) -> dict[str, Any]:
        out = {"backend": self.name, "model": self.model_name, "heads": str(self.heads_path or "fresh"),
               "tree": self.tree_name, "tree_nodes": self.decoder.tree_size}
        timer = getattr(self.decoder, "timer", None)
        if timer is not None and timer.enabled:
            out["ms_per_step"] = timer.ms_per_step()
        return out
