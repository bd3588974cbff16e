"""Tree buffers: the static index arrays that let one forward pass verify a whole tree.

Built once per tree (stdlib + numpy) and converted by each backend with a single call.
Nodes are numbered 0..N-1 with the root first and then the tree's paths in sorted order
(shorter first), so a node's parent always has a smaller index.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trees import TOPK, Tree


@dataclass(frozen=True)
class TreeBuffers:
    """Pure-data description of a candidate tree with N nodes (root included) and P leaves.

    attn_mask:        [N, N] bool, True where node i may attend node j (j is i or an ancestor)
    tree_indices:     [N] int64, index of each node's token in the flat candidate vector
                      ``[root, head0 top-K..., head1 top-K..., ...]``
    position_ids:     [N] int64, depth of each node (root 0); added to the cache length for RoPE
    retrieve_indices: [P, D+1] int64, node indices of every root-to-leaf path, padded with -1
    parents:          [N] int64, parent node of each node (-1 for the root)
    depth:            D, the deepest level (= number of heads used)
    topk:             the number of ranks per head the tree needs (max rank + 1)
    """

    attn_mask: np.ndarray
    tree_indices: np.ndarray
    position_ids: np.ndarray
    retrieve_indices: np.ndarray
    parents: np.ndarray
    depth: int
    topk: int

    @property
    def num_nodes(self) -> int:
        return int(self.tree_indices.shape[0])


def build_buffers(tree: Tree) -> TreeBuffers:
    """Build the buffers of a validated tree (see ``trees.validate``)."""
    paths: list[tuple[int, ...]] = [()] + list(tree)
    index = {p: i for i, p in enumerate(paths)}
    parents = np.array([-1] + [index[p[:-1]] for p in tree], dtype=np.int64)
    return TreeBuffers(
        attn_mask=_ancestor_mask(parents),
        tree_indices=np.array([0] + [1 + (len(p) - 1) * TOPK + p[-1] for p in tree], dtype=np.int64),
        position_ids=np.array([len(p) for p in paths], dtype=np.int64),
        retrieve_indices=_retrieve_indices(paths, index),
        parents=parents,
        depth=max((len(p) for p in tree), default=0),
        topk=max((max(p) for p in tree), default=-1) + 1,
    )


def _ancestor_mask(parents: np.ndarray) -> np.ndarray:
    n = parents.shape[0]
    mask = np.eye(n, dtype=bool)
    for i in range(1, n):  # parents[i] < i, so its row is complete already
        mask[i] |= mask[parents[i]]
    return mask


def _retrieve_indices(paths: list[tuple[int, ...]], index: dict[tuple[int, ...], int]) -> np.ndarray:
    prefixes = {p[:k] for p in paths for k in range(len(p))}
    leaves = [p for p in paths if p not in prefixes]
    width = max(len(p) for p in paths) + 1
    rows = np.full((len(leaves), width), -1, dtype=np.int64)
    for r, leaf in enumerate(leaves):
        for k in range(len(leaf) + 1):
            rows[r, k] = index[leaf[:k]]
    return rows


def step_visibility(length: int, block: np.ndarray, width: int) -> np.ndarray:
    """[T, width] bool: which of ``width`` cache slots each of T pending queries may see.

    Slots [0, length) hold the committed prefix (visible to all); slot length + j holds pending
    entry j, visible where ``block`` [T, T] says so (a causal ``tril`` for plain decoding, the
    tree's ``attn_mask`` for verification); slots past length + T are stale and hidden.
    """
    t = block.shape[0]
    visible = np.zeros((t, width), dtype=bool)
    visible[:, :length] = True
    visible[:, length:length + t] = block
    return visible
