"""Framework-free pieces of Medusa acceptance: the path walk and host-side samplers (numpy).

Backends compute per-node verdicts on their device (is node i its parent's argmax / sample /
typical?) and hand back N booleans; ``best_path`` turns them into the accepted path.  The Jittor
backend also samples here, on host copies of the few rows it needs.  Semantics match
``medusa.decoding`` (the PyTorch reference); tests compare the two.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def best_path(node_ok: np.ndarray, retrieve_indices: np.ndarray,
              node_logprob: Optional[np.ndarray] = None) -> tuple[int, int]:
    """node_ok [N] bool -> (best path row, accept length).

    A path's accept length is its longest prefix of accepted nodes (the root never counts).  Ties go
    to the first row, or, given ``node_logprob`` [N] (typical acceptance), to the most likely prefix.
    """
    rows = retrieve_indices[:, 1:]
    path_ok = node_ok[np.maximum(rows, 0)] & (rows >= 0)  # [P, D]
    accept = np.cumprod(path_ok, axis=1).sum(axis=1)
    best_len = int(accept.max())
    if node_logprob is None or best_len == 0:
        return int(accept.argmax()), best_len
    likelihood = node_logprob[np.maximum(rows[:, :best_len], 0)].sum(axis=1)
    return int(np.where(accept == best_len, likelihood, -np.inf).argmax()), best_len


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def typical_threshold(probs: np.ndarray, epsilon: float, alpha: float) -> np.ndarray:
    """probs [..., V] -> min(ε, δ·exp(-H)) [...], H the entropy (same 1e-5 guard as the reference)."""
    entropy = -(probs * np.log(probs + 1e-5)).sum(axis=-1)
    return np.minimum(alpha * np.exp(-entropy), epsilon)


def sample_typical(probs: np.ndarray, epsilon: float, alpha: float, rng: np.random.Generator) -> int:
    """One token from the typical set of probs [V]; the mode when the threshold excludes everything."""
    kept = np.where(probs < typical_threshold(probs, epsilon, alpha), 0.0, probs)
    if kept.sum() <= 0:
        return int(probs.argmax())
    return int(rng.choice(probs.shape[0], p=kept / kept.sum()))


def sample_top_p(probs: np.ndarray, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """One sample per row of probs [R, V] from its top-p (nucleus) renormalisation -> [R]."""
    out = np.empty(probs.shape[0], dtype=np.int64)
    for r, p in enumerate(probs):
        if top_p >= 1.0:
            out[r] = rng.choice(p.shape[0], p=p)
            continue
        order = np.argsort(-p, kind="stable")
        sorted_p = p[order]
        keep = sorted_p.cumsum() - sorted_p < top_p  # mass before a token must not cover top_p yet
        kept = sorted_p * keep
        out[r] = order[rng.choice(kept.shape[0], p=kept / kept.sum())]
    return out
