"""The backend registry: ``--backend torch|hybrid|jittor`` -> a lazily imported Backend class.

Every CLI, the app and the evaluation harness go through ``load_backend``, so ``--backend torch``
never imports Jittor and a backend that is not installed fails with one clear line.

The contract (``Backend``): ``generate(prompt_ids, cfg)`` yields ``engine.Step``s, ``synchronize()``
waits for the device so timers are honest, ``tokenizer`` is the HF tokenizer of the base model,
and ``describe()`` says what was loaded.
"""
from __future__ import annotations

import importlib
from typing import Any, Iterator, Protocol

from .config import GenerationConfig
from .engine import Step

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
