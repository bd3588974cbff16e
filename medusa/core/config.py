"""Configuration dataclasses shared by every backend.

``LlamaArgs`` is the architecture read from a Hugging Face ``config.json`` (Llama, Mistral and
Qwen2 decoders differ only in the fields kept here); ``GenerationConfig`` holds every decoding
option, so a backend can refuse the ones it does not support instead of ignoring them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

Acceptance = Literal["greedy", "typical", "nucleus"]
Draft = Literal["heads", "ngram", "both"]
DRAFTS = ("heads", "ngram", "both")  # see ``core.drafts``


@dataclass(frozen=True)
class LlamaArgs:
    """Architecture of a Llama-style decoder (GQA, RoPE, RMSNorm, SwiGLU)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral-style local attention span; None = full attention

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "LlamaArgs":
        """Parse a transformers ``config.json`` dict; unsupported architectures raise ValueError."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r}: Jedusa runs {', '.join(SUPPORTED_MODEL_TYPES)} decoders"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg['hidden_act']!r}: only SwiGLU (silu) decoders are supported")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = cfg["num_attention_heads"]
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=_check_rope_scaling(scaling),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 has biases on q/k/v only; Llama's attention_bias puts them on all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=_sliding_window(cfg),
        )


def _sliding_window(cfg: dict[str, Any]) -> Optional[int]:
    """The attention window a config really uses: Mistral's ``sliding_window`` (null in v0.2+), or
    Qwen2's when ``use_sliding_window`` turns it on."""
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    window = cfg.get("sliding_window")
    return int(window) if window else None


def check_context(args: "LlamaArgs", context: int) -> None:
    """Refuse a context longer than the model's sliding window: our attention is full attention,
    exact only while every position lies inside the window (Mistral-7B-v0.1: 4,096 tokens)."""
    if args.sliding_window is not None and context > args.sliding_window:
        raise ValueError(f"this model attends within a sliding window of {args.sliding_window} tokens, which "
                         f"Jedusa does not implement: use a context (--max-len / --max-length) of at most "
                         f"{args.sliding_window}, not {context}")


def _check_rope_scaling(scaling: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported RoPE scaling {kind!r}: Jedusa supports linear and llama3 scaling")
    return dict(scaling, rope_type=kind)


def rope_inv_freq(args: LlamaArgs) -> list[float]:
    """RoPE inverse frequencies (RoFormer, arxiv 2104.09864) with linear / llama3 scaling applied."""
    dim = args.head_dim
    inv = [1.0 / args.rope_theta ** (i / dim) for i in range(0, dim, 2)]
    scaling = args.rope_scaling
    if scaling is None:
        return inv
    if scaling["rope_type"] == "linear":
        return [f / scaling["factor"] for f in inv]
    return [_llama3_scale(f, scaling) for f in inv]


def _llama3_scale(freq: float, s: dict[str, Any]) -> float:
    """Llama 3.1 frequency-dependent scaling: long wavelengths slowed, short kept, smooth in between."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high:
        return freq
    if wavelen > old_len / low:
        return freq / factor
    smooth = (old_len / wavelen - low) / (high - low)
    return (1 - smooth) * freq / factor + smooth * freq


# Head architectures a checkpoint may declare (``head_type`` in its config.json); a config without
# the field is a Medusa checkpoint, as every one published before the field existed.  ``hydra``
# heads (Ankner et al. 2024, arxiv 2402.05109) are sequentially dependent: head k also reads the
# embeddings of the root token and of the tokens heads < k drafted on its path (``medusa.heads``).
HEAD_TYPES = ("medusa", "hydra")


@dataclass(frozen=True)
class MedusaConfig:
    """What ``config.json`` of an original-format Medusa checkpoint says, plus our additions: the
    tree (a named tree or a file beside the heads), the proposal vocabulary (``token_map``: a
    file beside the heads listing the token ids heads may propose; see ``core.token_map``) and the
    head architecture (``head_type``, so later kinds of draft heads can share the format)."""

    medusa_num_heads: int
    medusa_num_layers: int = 1
    base_model_name_or_path: str = ""
    shared_lm_head: bool = False
    tree: Optional[str] = None
    token_map: Optional[str] = None
    head_type: str = "medusa"

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head_type {self.head_type!r}: this Jedusa runs {', '.join(HEAD_TYPES)} heads")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding options; the same object drives baseline and Medusa decoding.

    temperature 0 means greedy.  With temperature > 0 the Medusa acceptance rule is
    ``acceptance``: ``typical`` (Medusa-2's entropy-adaptive rule with threshold ε and alpha δ)
    or ``nucleus`` (exact: each tree node samples from the top-p target distribution and the walk
    follows matching children, so output is distributed as baseline sampling).

    ``draft`` says what fills the verified tree (``core.drafts``): ``heads`` (Medusa's tree),
    ``ngram`` (a chain of ``ngram_tokens`` tokens continuing the longest earlier match of the
    context's suffix: prompt lookup) or ``both`` (the heads' tree plus that chain).  The chain is
    verified only on steps whose context matches at least ``ngram_min_match`` tokens
    (``core.drafts.step_draft``); other steps verify the bare root (``ngram``) or the heads' tree.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    acceptance: Acceptance = "typical"
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    medusa: bool = True
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    seed: Optional[int] = None
    draft: Draft = "heads"
    ngram_tokens: int = 12
    ngram_min_match: int = 2

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.acceptance not in ("greedy", "typical", "nucleus"):
            raise ValueError(f"unknown acceptance {self.acceptance!r}: use greedy, typical or nucleus")
        if self.draft not in DRAFTS:
            raise ValueError(f"unknown draft {self.draft!r}: use {', '.join(DRAFTS)}")
        if self.ngram_tokens < 1:
            raise ValueError("ngram_tokens must be >= 1")
        if self.ngram_min_match < 1:
            raise ValueError("ngram_min_match must be >= 1")

    @property
    def mode(self) -> Acceptance:
        """The acceptance rule actually used: greedy whenever temperature is 0."""
        return "greedy" if self.temperature == 0 else self.acceptance

    def with_(self, **changes: Any) -> "GenerationConfig":
        return replace(self, **changes)
