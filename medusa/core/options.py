"""Run options: the one typed home of the flags that load a backend and set decoding.

Every generating entry point (chat CLI, server, app, benchmark, evaluation answers) takes the same
flag group; it is declared once here (``RunOptions.add_args``), parsed into a frozen dataclass
(``RunOptions.from_args``) and passed around as data, never as an ``argparse.Namespace``.  A tool
that wants another default (the app's shorter answers, say) passes it to ``add_args``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any, Optional

from .config import DRAFTS, GenerationConfig
from .models import DEFAULT_MODEL

BACKEND_NAMES = ("torch", "hybrid", "jittor")


@dataclass(frozen=True)
class RunOptions:
    """Which backend, model, heads and tree to load, and how to decode with them.

    ``heads``: a heads directory; None = the heads shipped for the model (or those inside a
    Medusa-2 model directory), else freshly initialised heads; ``"fresh"`` = untrained heads.
    ``baseline``: decode without Medusa.  ``seed`` None = a fresh seed per generation.
    ``draft``: what the verified tree holds: the heads' tree, an n-gram chain, or both (``core.drafts``).
    """

    backend: str = "torch"
    model: Optional[str] = None  # None: the base model the heads name, else DEFAULT_MODEL (core.resolve)
    heads: Optional[str] = None
    tree: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    max_len: int = 2048
    conv_template: Optional[str] = None
    profile: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    acceptance: str = "typical"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    baseline: bool = False
    seed: Optional[int] = None
    draft: str = "both"  # 1.58x vs heads-only 0.97x on the task mix (docs/performance.md; not on factual QA)
    ngram_tokens: int = GenerationConfig.ngram_tokens  # one home for the n-gram defaults: the engine's
    ngram_min_match: int = GenerationConfig.ngram_min_match

    @staticmethod
    def add_args(p: argparse.ArgumentParser, backend: bool = True, **defaults: Any) -> argparse.ArgumentParser:
        """Add the flag group to ``p``; ``backend=False`` for a CLI whose backend is fixed;
        ``defaults`` override field defaults by field name (e.g. ``max_new_tokens=128``)."""
        d = {f.name: f.default for f in fields(RunOptions)}
        unknown = set(defaults) - set(d)
        if unknown:
            raise TypeError(f"unknown run options: {', '.join(sorted(unknown))}")
        d.update(defaults)
        if backend:
            p.add_argument("--backend", choices=BACKEND_NAMES, default=d["backend"])
        p.add_argument("--model", default=d["model"],
                       help=f"short name ({DEFAULT_MODEL}), local Hugging Face directory, GGUF file, Medusa-2 "
                            "directory, or hub id in the local Hugging Face cache (default: the base model "
                            f"the --medusa-heads name, else {DEFAULT_MODEL})")
        p.add_argument("--medusa-heads", dest="heads", default=d["heads"],
                       help="Medusa heads directory (default: the model's shipped or built-in heads, "
                            "else fresh ones; 'fresh' = untrained)")
        p.add_argument("--tree", default=d["tree"], help="named tree or JSON file of paths (default: the heads' tree)")
        p.add_argument("--dtype", default=d["dtype"], choices=("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
        p.add_argument("--device", default=d["device"], help="auto (CUDA when present), cpu, cuda, cuda:N")
        p.add_argument("--max-len", type=int, default=d["max_len"], help="KV cache budget in tokens")
        p.add_argument("--conv-template", default=d["conv_template"],
                       help="FastChat template, e.g. vicuna_v1.1 (default: the model's chat template)")
        p.add_argument("--profile", action="store_true", default=d["profile"],
                       help="time the parts of each Medusa step (heads, tree forward, posterior, cache update)")
        p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
        p.add_argument("--temperature", type=float, default=d["temperature"], help="0 = greedy")
        p.add_argument("--top-p", type=float, default=d["top_p"])
        p.add_argument("--acceptance", choices=("typical", "nucleus"), default=d["acceptance"],
                       help="Medusa acceptance when temperature > 0")
        p.add_argument("--posterior-threshold", type=float, default=d["posterior_threshold"])
        p.add_argument("--posterior-alpha", type=float, default=d["posterior_alpha"])
        p.add_argument("--baseline", action="store_true", default=d["baseline"], help="plain decoding, no Medusa")
        p.add_argument("--seed", type=int, default=d["seed"])
        p.add_argument("--draft", choices=DRAFTS, default=d["draft"],
                       help="draft sources verified each step: Medusa heads, n-gram lookup of the context "
                            "(prompt lookup), or both (default: the heads' tree, plus the n-gram chain on steps "
                            "whose context repeats)")
        p.add_argument("--ngram-tokens", type=int, default=d["ngram_tokens"],
                       help="n-gram draft: tokens of the context's earlier match verified per step")
        p.add_argument("--ngram-min-match", type=int, default=d["ngram_min_match"],
                       help="n-gram draft: verify the chain only when the context's suffix matches at least "
                            "this many tokens (other steps verify the heads' tree, or nothing more)")
        return p

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "RunOptions":
        """The options parsed by ``add_args`` (fields absent from ``args`` keep their defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**dict(values, **overrides))

    def with_(self, **changes: Any) -> "RunOptions":
        return replace(self, **changes)

    def backend_kwargs(self) -> dict[str, Any]:
        """What ``load_backend`` takes besides the backend name."""
        return {"model": self.model, "heads": self.heads, "tree": self.tree, "dtype": self.dtype,
                "device": self.device, "max_len": self.max_len, "profile": self.profile}

    def load(self, backend: Optional[str] = None) -> Any:
        """Load ``backend`` (default: ``self.backend``) with these options."""
        from .backends import load_backend

        return load_backend(backend or self.backend, **self.backend_kwargs())

    def generation(self, stop_token_ids: tuple[int, ...] = (), **changes: Any) -> GenerationConfig:
        """The decoding config; ``stop_token_ids`` come from the tokenizer (``prompts.stop_token_ids``)."""
        cfg = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                               acceptance=self.acceptance,  # type: ignore[arg-type]
                               posterior_threshold=self.posterior_threshold, posterior_alpha=self.posterior_alpha,
                               medusa=not self.baseline, stop_token_ids=tuple(stop_token_ids), seed=self.seed,
                               draft=self.draft, ngram_tokens=self.ngram_tokens,  # type: ignore[arg-type]
                               ngram_min_match=self.ngram_min_match)
        return cfg.with_(**changes) if changes else cfg
