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
from typing import Any, Iterator, Optional, Protocol

from . import engine
from .buffers import TreeBuffers, build_buffers
from .config import GenerationConfig, MedusaConfig
from .engine import Step
from .resolve import FRESH_HEADS, Resolved, resolve  # noqa: F401 (FRESH_HEADS: re-exported)

log = logging.getLogger(__name__)

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
    """The framework-free half of every backend: what ``core.resolve`` decided (model directory,
    heads, token map, tree), the tokenizer and the engine loop.  Subclasses set ``self.decoder``
    (an ``engine.Decoder``) and turn ``self.resolved.heads_state`` into their framework's heads."""

    name = "base"
    decoder: engine.Decoder
    resolved: Resolved

    def _resolve(self, model: Optional[str], heads: Optional[str], tree: Optional[str], device: str) -> Resolved:
        from transformers import AutoTokenizer

        self.resolved = resolve(model, heads, tree, self.name, device)
        self.model_name, self.model_dir = self.resolved.model, self.resolved.model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return self.resolved

    @property
    def heads_config(self) -> MedusaConfig:
        return self.resolved.heads_config

    @property
    def tree_name(self) -> str:
        return self.resolved.tree_name

    def tree_buffers(self) -> TreeBuffers:
        return build_buffers(self.resolved.tree)

    def generate(self, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
        return engine.generate(self.decoder, prompt_ids, cfg)

    def describe(self) -> dict[str, Any]:
        out = dict(self.resolved.describe(), backend=self.name, tree_nodes=self.decoder.tree_size)
        timer = getattr(self.decoder, "timer", None)
        if timer is not None and timer.enabled:
            out["ms_per_step"] = timer.ms_per_step()
        return out
