"""Proposal vocabulary: the token ids Medusa heads may propose (vLLM calls it a truncated vocabulary).

A shared-lm_head head spends nearly all its time projecting onto the full vocabulary (49,152 rows
for SmolLM2), yet what it proposes is almost always among a few thousand frequent tokens.  Heads
with a token map project onto those rows only and map the winners back to vocabulary ids.  Output
is unchanged (tree verification always uses the full vocabulary); only proposals outside the map
become impossible, which the map's measured coverage bounds.  File: ``token_map.json`` beside the
heads, ``{"ids": [...], "coverage": fraction of training targets inside the map}``.

Heads with their own (full-vocabulary) lm_heads propose over all of it: a map beside them (an
export of shared heads for TensorRT-LLM keeps it, so a later ``--format vllm`` export can truncate
vLLM's lm_heads the same way) is read by the exporter, not applied when decoding.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .checkpoint import CheckpointError
from .config import MedusaConfig

log = logging.getLogger(__name__)

TOKEN_MAP_FILE = "token_map.json"


def build_token_map(labels: np.ndarray, size: int) -> dict:
    """The ``size`` most frequent ids among ``labels`` (negatives are ignored), sorted by id."""
    counts = np.bincount(labels[labels >= 0])
    if counts.sum() == 0:
        raise ValueError("no target tokens to build a token map from")
    top = np.sort(np.argsort(-counts, kind="stable")[:size])
    return {"ids": top.tolist(), "coverage": float(counts[top].sum() / counts.sum())}


def coverage(ids: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of the (non-negative) ``labels`` that a map of ``ids`` can propose."""
    labels = labels[labels >= 0]
    return float(np.isin(labels, ids).mean()) if labels.size else 0.0


def load_token_map(heads_dir: Optional[Path], config: MedusaConfig) -> Optional[np.ndarray]:
    """The proposal ids [K] decoding applies, or None: shared-lm_head heads with a map only."""
    if config.token_map and heads_dir is not None and not config.shared_lm_head:
        log.info("%s: heads with their own lm_heads propose over the full vocabulary; %s is kept for exports only",
                 heads_dir, config.token_map)
        return None
    return read_token_map(heads_dir, config)


def read_token_map(heads_dir: Optional[Path], config: MedusaConfig) -> Optional[np.ndarray]:
    """The ids [K] of the map the heads' config names (any head layout), or None."""
    if not config.token_map or heads_dir is None:
        return None
    file = heads_dir / config.token_map
    try:
        ids = np.asarray(json.loads(file.read_text())["ids"], dtype=np.int64)
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable token map ({err})") from err
    if ids.ndim != 1 or ids.size == 0:
        raise CheckpointError(f"{file}: 'ids' must be a non-empty list of token ids")
    return ids
