"""Medusa head training with no PyTorch in the compute: hidden states from the Jittor Llama, Jittor heads.

``python -m medusa_jittor_all.train`` takes the flags of ``python -m medusa.train``; it reuses the
data pipeline, loss, schedule and checkpoint format of ``medusa_jittor.train`` and only swaps the
backbone that fills the hidden-state cache (its own cache directory, tagged ``-jittor``; Jittor
runs fp32, so ``--backbone-dtype`` is ignored).  Tokenisation still uses the HF tokenizer.
"""
from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from medusa_jittor.train import main as train_main

from .llama import hidden_states, load_llama


def jittor_backbone(args: argparse.Namespace, model_dir: Path) -> tuple[Callable[[list[int]], np.ndarray], str]:
    return partial(hidden_states, load_llama(model_dir)), "-jittor"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return train_main(argv, backbone=jittor_backbone)


if __name__ == "__main__":
    main()
