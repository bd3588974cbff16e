"""Backbone hidden states cached on disk, so epochs and head configurations reuse one backbone pass.

On a CPU the backbone forward dominates training time; with the backbone frozen its final hidden
states never change, so they are computed once.  Shards (``shard-NNNNN.npz``: ``hidden`` fp16
[tokens, h], ``ids`` and ``labels`` int32 [tokens], ``offsets`` [examples + 1]) are written
atomically, one per ``shard_size`` examples, and a rerun skips the examples already cached and
numbers its shards after the existing ones, so data that grew since (appended conversations) only
adds shards.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..core.checkpoint import atomic_write_text
from ..core.models import cache_root
from ..llama import KVCache, Transformer
from .dataset import Example

log = logging.getLogger(__name__)
HiddenFn = Callable[[list[int]], np.ndarray]  # token ids -> final hidden states [T, h]


@torch.inference_mode()
def hidden_states(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Final-norm hidden states [T, h] of one sequence (causal prefill)."""
    t = len(ids)
    device = model.tok_embeddings.weight.device
    cache = KVCache(model.args, t, model.tok_embeddings.weight.dtype, device)
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    return model(torch.tensor([ids], device=device), torch.arange(t, device=device), mask, cache)[0]


def torch_hidden_fn(model: Transformer) -> HiddenFn:
    return lambda ids: hidden_states(model, ids).float().cpu().numpy()


def build_cache(hidden_fn: HiddenFn, hidden_size: int, examples: Sequence[Example], out_dir: Path,
                shard_size: int = 256) -> int:
    """Cache hidden states of ``examples`` (in order) under ``out_dir``; returns examples cached in all.

    ``hidden_fn`` maps token ids to the frozen backbone's final hidden states [T, h] (any framework).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = shard_files(out_dir)
    done = sum(len(np.load(f)["offsets"]) - 1 for f in existing)
    todo = range(done, len(examples))
    with tqdm(total=len(examples), initial=done, desc="hidden cache", unit="ex") as bar:
        for number, start in enumerate(todo[::shard_size], start=len(existing)):
            chunk = examples[start:start + shard_size]
            _write_shard(out_dir / f"shard-{number:05d}.npz", hidden_fn, chunk, bar)
    if todo:
        atomic_write_text(out_dir / "meta.json", json.dumps({"examples": len(examples),
                                                             "hidden_size": hidden_size}) + "\n")
    return len(examples)


def _write_shard(path: Path, hidden_fn: HiddenFn, chunk: Sequence[Example], bar: tqdm) -> None:
    hidden, offsets = [], [0]
    for ex in chunk:
        hidden.append(hidden_fn(ex.ids).astype(np.float16))
        offsets.append(offsets[-1] + len(ex.ids))
        bar.update(1)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, hidden=np.concatenate(hidden), offsets=np.array(offsets, dtype=np.int64),
             ids=np.array([i for ex in chunk for i in ex.ids], dtype=np.int32),
             labels=np.array([i for ex in chunk for i in ex.labels], dtype=np.int32))
    os.replace(tmp, path)


def shard_files(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("shard-*.npz"))


def default_cache_dir(model_dir: Path, data: Path, max_length: int, tag: str = "") -> Path:
    """Where the hidden states of ``data`` through ``model_dir`` are cached unless --cache-dir says otherwise."""
    return cache_root() / "hidden" / f"{model_dir.name}-{data.stem}-{max_length}{tag}"


def cached_labels(cache_dir: Path) -> np.ndarray:
    """All labels of a cache split (IGNORE_INDEX where untrained)."""
    files = shard_files(cache_dir)
    if not files:
        raise FileNotFoundError(f"no hidden-state shards in {cache_dir}")
    return np.concatenate([np.load(f)["labels"] for f in files])
