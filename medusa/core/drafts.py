"""Draft sources: what fills the verified tree's slots each step, besides the Medusa heads.

The heads guess the next tokens from the last hidden state.  Where an answer copies its input
(summaries, answers from a given text, translation that echoes, a model repeating itself) the
context is the better guess: the longest suffix of the context (prompt + generated) that occurred
before probably continues as it did then (prompt lookup decoding, Saxena 2023; SAM-Decoding,
arxiv 2411.10666), and as it did the *last* time (text is local: a list continues like its latest
item; measured on 600 self-distilled SmolLM2 replies, 15,065 steps with a match: 4.26 chain tokens
accepted against 4.02 when copying the first occurrence).  ``SuffixIndex`` finds that match in
O(1) amortised time per appended token (a suffix automaton, Blumer et al. 1985); ``NgramDraft`` reads a fixed number of tokens after it,
and ``draft_buffers`` grafts a chain of that many nodes under the tree's root, so the tree of a
draft mix has one shape every step (Jittor compiles its kernels once).

Verification never asks where a candidate came from: greedy output stays the baseline's.  One
care: the chain may repeat a heads' branch (same tokens from the root).  Nucleus acceptance is
exact only if nodes with the same context share one sample (``first_twins``), so that every
accepted path is a prefix of the same sequentially sampled chain.
"""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterable, Optional, Sequence, TypeVar

import numpy as np

from .buffers import NGRAM, SOURCES, HeadLevel, TreeBuffers, build_buffers, graft_chain
from .config import Draft

T = TypeVar("T")


class SuffixIndex:
    """A suffix automaton over a growing token sequence.

    ``match()`` gives the longest suffix of the sequence that also ends at an earlier position, and
    the latest such position.  The suffix link of the state of the whole sequence is the longest
    suffix that occurs at least twice, so the match costs O(1).  Each state keeps the latest end
    position recorded for its strings; appending a token records it on the new state's suffix-link
    path (the suffixes that now end there), at most ``RECENT_DEPTH`` states deep, so an append stays
    O(1) even in a degenerate repetition ("a a a ..."), where that path grows with the text.  A state
    deeper than that keeps an older end: still a real earlier occurrence, only not the latest.
    """

    RECENT_DEPTH = 256

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.tokens: list[int] = []
        self.next: list[dict[int, int]] = [{}]
        self.link, self.length, self.end = [-1], [0], [-1]
        self.last = 0
        self._match = (0, -1)
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for tok in tokens:
            self.append(tok)

    def append(self, tok: int) -> None:
        tok = int(tok)
        self.tokens.append(tok)
        now = len(self.tokens) - 1
        cur = self._state(self.length[self.last] + 1, now, {})
        p = self.last
        while p != -1 and tok not in self.next[p]:
            self.next[p][tok] = cur
            p = self.link[p]
        state = self.link[cur] = 0 if p == -1 else self._split(p, tok)
        self._match = (self.length[state], self.end[state]) if state > 0 else (0, -1)
        for _ in range(self.RECENT_DEPTH):  # the suffixes of the sequence now also end at ``now``
            if state <= 0:
                break
            self.end[state] = now
            state = self.link[state]
        self.last = cur

    def _split(self, p: int, tok: int) -> int:
        """The state the new suffix state links to: ``next[p][tok]``, cloned if it is too long."""
        q = self.next[p][tok]
        if self.length[p] + 1 == self.length[q]:
            return q
        clone = self._state(self.length[p] + 1, self.end[q], dict(self.next[q]))
        self.link[clone] = self.link[q]
        while p != -1 and self.next[p].get(tok) == q:
            self.next[p][tok] = clone
            p = self.link[p]
        self.link[q] = clone
        return clone

    def _state(self, length: int, end: int, transitions: dict[int, int]) -> int:
        self.next.append(transitions)
        self.link.append(-1)
        self.length.append(length)
        self.end.append(end)
        return len(self.length) - 1

    def match(self) -> tuple[int, int]:
        """(length L, end position e) of the longest suffix that also ends at an earlier position
        e < n - 1 (the latest such e, see the class note); (0, -1) when the last token never
        occurred before."""
        return self._match

    def continuation(self, count: int) -> list[int]:
        """Up to ``count`` tokens that followed the match, copying with overlap (LZ77): a match that
        runs into the end of the sequence continues with the tokens it has just proposed, so a
        repeating loop is followed around.  Empty when there is no match."""
        length, end = self.match()
        if length == 0:
            return []
        out: list[int] = []
        n = len(self.tokens)
        for i in range(end + 1, end + 1 + count):
            out.append(self.tokens[i] if i < n else out[i - n])
        return out


class NgramDraft:
    """The n-gram draft source of one generation: the context indexed, ``tokens`` proposals a step."""

    def __init__(self, context: Iterable[int], tokens: int) -> None:
        self.index = SuffixIndex(context)
        self.tokens = tokens

    def extend(self, tokens: Iterable[int]) -> None:
        self.index.extend(tokens)

    def propose(self) -> np.ndarray:
        """[tokens] int64: the continuation of the longest earlier match, padded with the last token
        (a guess that the text repeats; the chain keeps its shape whether or not a match exists)."""
        out = self.index.continuation(self.tokens)
        pad = out[-1] if out else self.index.tokens[-1]
        return np.array(out + [pad] * (self.tokens - len(out)), dtype=np.int64)

    def match_length(self) -> int:
        """How many tokens the context's suffix matches at its earlier occurrence (0: none)."""
        return self.index.match()[0]


def step_draft(draft: Draft, match: int, min_match: int) -> Draft:
    """The draft mix one step verifies, given the context's ``match`` length.

    A short match rarely continues (measured on the task mix, SmolLM2: after a 1-token match the
    chain's first token is right 0.47 times a step, after 2 tokens 1.29, after 12+ 5.1 of 6), while
    every verified node costs time on a CPU.  So below ``min_match`` an ``ngram`` step verifies the
    bare root (a plain decoding step) and a ``both`` step the heads' tree alone; at or above it the
    chain is verified (``both``: grafted on the heads' tree, so the heads' acceptance is kept).
    The step's tree is one of two fixed shapes either way.
    """
    if draft == "heads" or match >= min_match:
        return draft
    return "heads" if draft == "both" else "root"


def draft_buffers(heads: TreeBuffers, draft: Draft, length: int) -> TreeBuffers:
    """The verified tree of a draft mix: the heads' tree, a chain of ``length`` n-gram nodes under
    the bare root (``ngram``: prompt lookup), the heads' tree with that chain grafted (``both``), or
    the bare root (``root``: a plain decoding step, what ``ngram`` verifies without a match)."""
    if draft == "heads":
        return heads
    if draft == "root":
        return build_buffers(())
    return graft_chain(heads if draft == "both" else build_buffers(()), length)


def verified_nodes(heads_nodes: int, draft: Draft, length: int) -> int:
    """The node count of ``draft_buffers`` for a heads' tree of ``heads_nodes`` nodes (root included)."""
    return {"heads": heads_nodes, "ngram": 1 + length, "both": heads_nodes + length}[draft]


class DraftTrees(Generic[T]):
    """A decoder's verified trees, one per draft mix, grafted from its heads' tree and converted to
    its framework once (a new tree shape costs Jittor one compilation, on first use)."""

    def __init__(self, heads: TreeBuffers, convert: Callable[[TreeBuffers], T], converted: Optional[T] = None) -> None:
        self.buffers, self.convert = heads, convert
        self.heads: T = converted if converted is not None else convert(heads)
        self._grafted: dict[tuple[str, int], T] = {}

    def get(self, draft: Draft, length: int) -> T:
        if draft == "heads":
            return self.heads
        key = (draft, length)
        if key not in self._grafted:
            self._grafted[key] = self.convert(draft_buffers(self.buffers, draft, length))
        return self._grafted[key]


# Sequentially dependent heads (Hydra), as a backend runs them: (head k, the hidden state in the
# backend's framework, path token ids [M, k+1] root first, ranks) -> the heads' best ids [M, ranks]
DraftLevel = Callable[[int, Any, np.ndarray, int], np.ndarray]


def draft_by_level(root: int, tree: TreeBuffers, levels: Sequence[HeadLevel], hidden: Any, draft_level: DraftLevel,
                   ngram: Optional[np.ndarray] = None) -> np.ndarray:
    """Tree candidates [N] from sequentially dependent heads: head d runs once on the paths of the
    depth-d nodes that have heads' children (``buffers.head_levels``), and each child takes its
    rank of its parent's top-k; the n-gram chain, if any, fills its own nodes.  Same nodes and
    order as the flat Medusa layout (``tree_indices``), so verification is unchanged."""
    tokens = np.zeros(tree.num_nodes, dtype=np.int64)
    tokens[0] = root
    for d, level in enumerate(levels):
        top = np.asarray(draft_level(d, hidden, tokens[level.paths], level.topk))  # [M, topk]
        tokens[level.children] = top[level.row, level.rank]
    if tree.chain:
        tokens[tree.sources == NGRAM] = ngram
    return tokens


def first_twins(candidates: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """[N] for each node the first node with the same tokens from the root (itself when unique).

    Twins have the same context, hence the same target distribution; nucleus acceptance gives them
    one shared sample (``sample[first_twins]``).  ``parents[i] < i``, so one pass suffices.
    """
    twin = np.arange(len(candidates))
    seen: dict[tuple[int, int], int] = {}
    for i in range(1, len(candidates)):
        key = (int(twin[parents[i]]), int(candidates[i]))
        twin[i] = seen.setdefault(key, i)
    return twin


def source_names(codes: Any) -> tuple[str, ...]:
    """Source names (``buffers.SOURCES``) of node source codes."""
    return tuple(SOURCES[int(c)] for c in codes)
