"""Tree buffers: the static index arrays that let one forward pass verify a whole tree.

Built once per tree (stdlib + numpy) and converted by each backend with a single call.
Nodes are numbered 0..N-1 with the root first and then the tree's paths in sorted order
(shorter first), so a node's parent always has a smaller index.  ``graft_chain`` appends a chain
of draft nodes under the root (the n-gram branch of ``core.drafts``) and keeps that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trees import TOPK, Tree

# Where a node's token comes from, by code: the root is the base model's own choice (the bonus
# token of the previous step), then the heads' top-k, then the n-gram chain (``core.drafts``).
SOURCES = ("bonus", "heads", "ngram")
ROOT, HEADS, NGRAM = range(len(SOURCES))


@dataclass(frozen=True)
class TreeBuffers:
    """Pure-data description of a candidate tree with N nodes (root included) and P leaves.

    attn_mask:        [N, N] bool, True where node i may attend node j (j is i or an ancestor)
    tree_indices:     [N] int64, index of each node's token in the flat candidate vector
                      ``[root, head0 top-K..., head1 top-K..., ..., ngram 0..C-1]``
    position_ids:     [N] int64, depth of each node (root 0); added to the cache length for RoPE
    retrieve_indices: [P, D+1] int64, node indices of every root-to-leaf path, padded with -1
    parents:          [N] int64, parent node of each node (-1 for the root)
    sources:          [N] int8, each node's draft source as an index into ``SOURCES``
    depth:            D, the deepest level
    topk:             the number of ranks per head the tree needs (max rank + 1)
    head_depth:       the number of heads the tree reads (= D without a grafted chain)
    chain:            C, the length of the grafted n-gram chain (0: none)
    """

    attn_mask: np.ndarray
    tree_indices: np.ndarray
    position_ids: np.ndarray
    retrieve_indices: np.ndarray
    parents: np.ndarray
    sources: np.ndarray
    depth: int
    topk: int
    head_depth: int
    chain: int = 0

    @property
    def num_nodes(self) -> int:
        return int(self.tree_indices.shape[0])


def build_buffers(tree: Tree) -> TreeBuffers:
    """Build the buffers of a validated tree (see ``trees.validate``)."""
    paths: list[tuple[int, ...]] = [()] + list(tree)
    index = {p: i for i, p in enumerate(paths)}
    parents = np.array([-1] + [index[p[:-1]] for p in tree], dtype=np.int64)
    depth = max((len(p) for p in tree), default=0)
    return TreeBuffers(
        attn_mask=_ancestor_mask(parents),
        tree_indices=np.array([0] + [1 + (len(p) - 1) * TOPK + p[-1] for p in tree], dtype=np.int64),
        position_ids=np.array([len(p) for p in paths], dtype=np.int64),
        retrieve_indices=_retrieve_indices(paths, index),
        parents=parents,
        sources=np.array([ROOT] + [HEADS] * len(tree), dtype=np.int8),
        depth=depth,
        topk=max((max(p) for p in tree), default=-1) + 1,
        head_depth=depth,
    )


def graft_chain(b: TreeBuffers, length: int) -> TreeBuffers:
    """``b`` plus a chain of ``length`` n-gram nodes hanging off the root.

    The chain's tokens sit after the heads' block of the flat candidate vector, so the heads' slots
    keep their indices.  Its path goes last in ``retrieve_indices``: a tie in accept length goes to
    the heads' paths, so the statistics credit the n-gram branch only with what the heads missed.
    """
    if length < 1 or b.chain:
        raise ValueError("graft one chain of at least one node (its slots follow the heads' block)")
    n = b.num_nodes
    chain = np.arange(n, n + length, dtype=np.int64)
    parents = np.concatenate([b.parents, [0], chain[:-1]])
    first_slot = 1 + b.head_depth * TOPK
    return TreeBuffers(
        attn_mask=_ancestor_mask(parents),
        tree_indices=np.concatenate([b.tree_indices, first_slot + np.arange(length)]),
        position_ids=np.concatenate([b.position_ids, np.arange(1, length + 1)]),
        retrieve_indices=_add_row(b.retrieve_indices, np.concatenate([[0], chain])),
        parents=parents,
        sources=np.concatenate([b.sources, np.full(length, NGRAM, dtype=np.int8)]),
        depth=max(b.depth, length),
        topk=b.topk,
        head_depth=b.head_depth,
        chain=length,
    )


@dataclass(frozen=True)
class HeadLevel:
    """The heads' nodes at depth d + 1 of a tree: what head d drafts in one batched call.

    Medusa heads read only the hidden state, so ``tree_indices`` places their top-k directly; Hydra
    heads also read the tokens of the path they extend, so head d runs once per distinct parent.

    parents:  [M] the depth-d nodes with heads' children, ascending
    paths:    [M, d + 1] node indices from the root to each parent
    children: [C] the heads' nodes at depth d + 1
    row:      [C] the row of ``parents`` each child hangs from
    rank:     [C] the child's rank in its parent's top-k
    """

    parents: np.ndarray
    paths: np.ndarray
    children: np.ndarray
    row: np.ndarray
    rank: np.ndarray

    @property
    def topk(self) -> int:
        return int(self.rank.max()) + 1


def head_levels(b: TreeBuffers) -> list[HeadLevel]:
    """One ``HeadLevel`` per depth the heads draft (``b.head_depth``), shallowest first."""
    heads = np.flatnonzero(b.sources == HEADS)
    levels = []
    for d in range(b.head_depth):
        children = heads[b.position_ids[heads] == d + 1]
        parents = np.unique(b.parents[children])
        paths = np.array([_path(b.parents, p) for p in parents], dtype=np.int64).reshape(len(parents), d + 1)
        levels.append(HeadLevel(parents, paths, children, np.searchsorted(parents, b.parents[children]),
                                (b.tree_indices[children] - 1) % TOPK))
    return levels


def _path(parents: np.ndarray, node: int) -> list[int]:
    """Node indices from the root to ``node``."""
    path = [int(node)]
    while parents[path[0]] >= 0:
        path.insert(0, int(parents[path[0]]))
    return path


def _add_row(rows: np.ndarray, path: np.ndarray) -> np.ndarray:
    """``rows`` without a bare-root row (the root stops being a leaf) plus ``path``, -1 padded."""
    rows = rows[(rows[:, 1:] >= 0).any(axis=1)]
    out = np.full((rows.shape[0] + 1, max(rows.shape[1], path.shape[0])), -1, dtype=np.int64)
    out[:-1, :rows.shape[1]] = rows
    out[-1, :path.shape[0]] = path
    return out


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
