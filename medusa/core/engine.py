"""The framework-free decoding loop every backend runs: stopping rules live here, once.

A backend supplies a ``Decoder`` (its model, cache and the four Medusa steps in its own
framework); this module turns it into a stream of ``Step``s for baseline or Medusa decoding with
identical stopping semantics: stop ids (EOS included) end generation *including* the stop token
and nothing after it, ``max_new_tokens`` counts tokens (never steps), and generation ends cleanly,
with ``finish_reason="length"``, before a forward pass would overflow the KV budget.

The engine knows only token ids; text, templates and stop strings live at the edges.  It also
owns the n-gram draft source (``core.drafts``): it indexes the context as tokens are emitted and
hands each Medusa step the chain of tokens to verify besides the heads' (``cfg.draft``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Protocol

import numpy as np

from .buffers import TreeBuffers
from .config import GenerationConfig
from .drafts import NgramDraft, step_draft, verified_nodes


@dataclass(frozen=True)
class Step:
    """What one decoding step emitted.

    The first step is the prefill's token alone (streamed before any draft is verified, so time to
    first token is the prefill's); each later step emits the drafts its tree verification
    accepted, then the base model's own next token (1 token for baseline, accepted + 1 for Medusa).

    tokens:        the ids emitted by this step, in order
    accepted:      how many speculative (drafted) tokens the tree verification accepted
    finish_reason: None while generating; "stop" (stop id emitted) or "length" (token or KV budget)
    sources:       where each token came from: "bonus" (the base model's own choice: every baseline
                   token, each Medusa step's last), "heads" or "ngram" (accepted drafts)
    """

    tokens: tuple[int, ...]
    accepted: int = 0
    finish_reason: Optional[str] = None
    sources: tuple[str, ...] = ()


class Verified(NamedTuple):
    """What a Medusa step verified: ``tokens`` (root first, then the accepted drafts), how many were
    ``accepted``, the next ``root`` (bonus token) and the source of each accepted token (empty:
    all from the heads).  A decoder may return a plain (tokens, accepted, root) tuple."""

    tokens: list[int]
    accepted: int
    root: int
    sources: tuple[str, ...] = ()


class Decoder(Protocol):
    """The per-backend primitives. ``root`` is the token chosen last but not yet in the KV cache."""

    max_len: int  # KV budget in positions

    @property
    def cache_length(self) -> int: ...

    @property
    def tree_size(self) -> int: ...

    def prefill(self, ids: list[int], cfg: GenerationConfig) -> int:
        """Reset the cache, run the prompt, return the first new token."""

    def decode_one(self, root: int, cfg: GenerationConfig) -> int:
        """Baseline: write ``root`` into the cache, return the next token."""

    def medusa_step(self, root: int, cfg: GenerationConfig, ngram: Optional[np.ndarray] = None,
                    draft: Optional[str] = None) -> Verified:
        """Verify the tree of ``draft`` (this step's mix, ``core.drafts.step_draft``; default
        ``cfg.draft``) rooted at ``root``, its n-gram chain holding ``ngram`` (given unless
        ``cfg.draft`` is "heads"): (emitted ids starting with root, accepted, next root, sources of
        the accepted ids)."""

    def set_tree(self, buffers: TreeBuffers) -> None:
        """Verify with another tree from the next step on (tree search measures each candidate)."""


def generate(decoder: Decoder, prompt_ids: list[int], cfg: GenerationConfig) -> Iterator[Step]:
    """Stream the completion of ``prompt_ids``, baseline or Medusa as ``cfg.medusa`` says."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) + 1 > decoder.max_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the KV budget of {decoder.max_len}")
    stops = set(cfg.stop_token_ids)
    root = decoder.prefill(list(prompt_ids), cfg)
    ngram = NgramDraft(prompt_ids, cfg.ngram_tokens) if cfg.medusa and cfg.draft != "heads" else None
    width = verified_nodes(decoder.tree_size, cfg.draft, cfg.ngram_tokens) if cfg.medusa else 1
    out, emitted = Step((root,), 0, None, ("bonus",)), 0
    while True:
        tokens, reason = _truncate(list(out.tokens), stops, cfg.max_new_tokens - emitted)
        emitted += len(tokens)
        if not reason and decoder.cache_length + width > decoder.max_len:
            reason = "length"  # the next forward pass would overflow the KV budget
        yield Step(tuple(tokens), min(out.accepted, len(tokens)), reason, out.sources[:len(tokens)])
        if reason:
            return
        step = _medusa_step(decoder, root, cfg, ngram) if cfg.medusa else \
            Verified([root], 0, decoder.decode_one(root, cfg))
        drafted = step.sources or ("heads",) * step.accepted
        out = Step((*step.tokens[1:], step.root), step.accepted, None, (*drafted, "bonus"))
        root = step.root


def _medusa_step(decoder: Decoder, root: int, cfg: GenerationConfig, ngram: Optional[NgramDraft]) -> Verified:
    """One Medusa step; with an n-gram source, its tree depends on the context's match
    (``step_draft``), and the context it indexes grows by what was emitted."""
    if ngram is None:
        return Verified(*decoder.medusa_step(root, cfg))
    ngram.extend([root])
    draft = step_draft(cfg.draft, ngram.match_length(), cfg.ngram_min_match)
    step = Verified(*decoder.medusa_step(root, cfg, ngram.propose(), draft))
    ngram.extend(step.tokens[1:])
    return step


def _truncate(tokens: list[int], stops: set[int], remaining: int) -> tuple[list[int], Optional[str]]:
    """Cut an accepted chunk after its first stop id or at the token budget."""
    for i, tok in enumerate(tokens[:remaining]):
        if tok in stops:
            return tokens[: i + 1], "stop"
    if len(tokens) >= remaining:
        return tokens[:remaining], "length"
    return tokens, None


def generate_ids(decoder: Decoder, prompt_ids: list[int], cfg: GenerationConfig) -> tuple[list[int], list[Step]]:
    """Run to completion: (all new ids, the steps)."""
    steps = list(generate(decoder, prompt_ids, cfg))
    return [t for s in steps for t in s.tokens], steps
