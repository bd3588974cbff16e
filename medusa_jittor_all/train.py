"""Medusa head training with no PyTorch in the compute: hidden states from the Jittor Llama, Jittor heads.

``python -m medusa_jittor_all.train`` takes the flags of ``python -m medusa.train``; it reuses the
data pipeline, loss, schedule and checkpoint format of ``medusa_jittor.train`` and only swaps the
backbone that fills the hidden-state cache (keyed ``jittor``/``float32``, so never mixed with the
PyTorch backbone's; Jittor runs fp32, so ``--backbone-dtype`` is ignored).  Tokenisation still uses the HF tokenizer.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from medusa.train.cli import Backbone
from medusa_jittor.train import cli as train_cli
from medusa_jittor.train import main as train_main

from .llama import hidden_states, load_llama


def _load_hidden_fn(model_dir: Path) -> Callable[[list[int]], np.ndarray]:
    return partial(hidden_states, load_llama(model_dir))


def jittor_backbone() -> Backbone:
    """The Jittor Llama as the cache's backbone (fp32), its caches kept apart from PyTorch's by their key."""
    return Backbone(_load_hidden_fn, framework="jittor", dtype="float32")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return train_main(argv, backbone=jittor_backbone())


if __name__ == "__main__":
    raise SystemExit(train_cli(backbone=jittor_backbone()))
