"""``python -m medusa.train``: conversations -> tokenised examples -> hidden-state cache -> heads.

Every stage resumes: the cache skips cached examples and training continues from the last saved
step in ``--out``.  Conversations are split into train / held-out by a hash of their id, so the
split is stable across runs and data growth.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..backend import pick_device, torch_dtype
from ..core.config import MedusaConfig
from ..core.models import DEFAULT_MODEL, load_args, resolve_model
from ..core.checkpoint import atomic_write_text, load_checkpoint
from ..core.token_map import TOKEN_MAP_FILE, load_token_map
from ..heads import MedusaHeads, heads_from_state
from ..llama import load_llama
from .data import load_conversations
from .dataset import tokenize_conversation
from .hidden_cache import HiddenFn, build_cache, default_cache_dir, torch_hidden_fn
from .token_map import write_token_map
from .trainer import HeadsWithBase, TokenData, TrainConfig, evaluate, train

log = logging.getLogger("medusa.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train Medusa-1 heads on a frozen base model.")
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--data", type=Path, required=True, help="ShareGPT/JSONL conversations (e.g. self-distilled)")
    p.add_argument("--out", type=Path, required=True, help="heads directory (checkpoint, metrics, resume state)")
    p.add_argument("--cache-dir", type=Path, default=None, help="hidden-state cache (default: under JEDUSA_CACHE)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--conv-template", default=None)
    p.add_argument("--backbone-dtype", default="bfloat16", help="dtype of the cached backbone pass")
    p.add_argument("--device", default="auto")
    p.add_argument("--per-head-lm-head", action="store_true",
                   help="original Medusa-1 heads with their own vocabulary projection (default: shared lm_head)")
    defaults = TrainConfig()
    for name in ("num_heads", "num_layers", "decay", "lr", "weight_decay", "warmup_ratio", "epochs", "batch_tokens",
                 "grad_accum", "seed", "save_every", "max_steps", "token_map_size"):
        p.add_argument("--" + name.replace("_", "-"), type=type(getattr(defaults, name)), default=getattr(defaults, name))
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--eval-only", action="store_true",
                   help="measure the heads in --out on the held-out split (per-head top-k accuracy) without training")
    return p


def held_out(conv_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(conv_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(num_heads=args.num_heads, num_layers=args.num_layers, shared_lm_head=not args.per_head_lm_head,
                       decay=args.decay, lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                       epochs=args.epochs, batch_tokens=args.batch_tokens, grad_accum=args.grad_accum,
                       bf16=not args.fp32, seed=args.seed, save_every=args.save_every, max_steps=args.max_steps,
                       token_map_size=args.token_map_size)


def torch_backbone(args: argparse.Namespace, model_dir: Path) -> tuple[HiddenFn, str]:
    """The PyTorch backbone's hidden-state function and the cache-name tag for its dtype."""
    device = pick_device(args.device)
    backbone = load_llama(model_dir, torch_dtype(args.backbone_dtype), device, pack=device == "cpu")
    return torch_hidden_fn(backbone), ""


def prepare_data(args: argparse.Namespace, cfg: TrainConfig,
                 backbone: Callable[[argparse.Namespace, Path], tuple[HiddenFn, str]] = torch_backbone,
                 ) -> tuple[Path, dict[str, TokenData], Optional[np.ndarray]]:
    """Tokenise, split and cache hidden states of ``backbone``; returns (model dir, {train, eval},
    the token map the heads train over or None)."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversations, _ = load_conversations(args.data)
    hidden_fn, tag = backbone(args, model_dir)
    cache_dir = args.cache_dir or default_cache_dir(model_dir, args.data, args.max_length, tag)
    counts = {}
    for split in ("train", "eval"):
        convs = [c for c in conversations if held_out(c.id, args.eval_fraction) == (split == "eval")]
        examples = [tokenize_conversation(tokenizer, c.messages, args.max_length, args.conv_template) for c in convs]
        with PartialState().main_process_first():  # one process fills the cache, the others then find it full
            build_cache(hidden_fn, load_args(model_dir).hidden_size, examples, cache_dir / split)
        counts[split] = len(convs)
    vocab_ids = training_token_map(args.out, cache_dir, cfg) if cfg.token_map_size else None
    data = {split: TokenData(cache_dir / split, cfg.num_heads, vocab_ids) for split in counts}
    for split, n in counts.items():
        log.info("%s: %d conversations, %d trainable positions", split, n, len(data[split]))
    return model_dir, data, vocab_ids


def training_token_map(out: Path, cache_dir: Path, cfg: TrainConfig) -> np.ndarray:
    """The proposal vocabulary the heads in ``out`` train over: the one a resumed run started with,
    else the ``cfg.token_map_size`` most frequent training targets (written beside the heads)."""
    if not cfg.shared_lm_head:
        raise ValueError("--token-map-size needs shared-lm_head heads (drop --per-head-lm-head)")
    out.mkdir(parents=True, exist_ok=True)
    file = out / TOKEN_MAP_FILE
    ids = json.loads(file.read_text())["ids"] if file.is_file() else write_token_map(out, cache_dir, cfg.token_map_size)["ids"]
    if len(ids) != cfg.token_map_size:
        raise ValueError(f"{file} has {len(ids)} ids but --token-map-size is {cfg.token_map_size}: "
                         "use a new --out or the same size")
    return np.asarray(ids, dtype=np.int64)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = train_config(args)
    if args.eval_only:  # the heads in --out say what they are
        config, state = load_checkpoint(args.out)
        vocab = load_token_map(args.out, config)
        cfg = replace(cfg, num_heads=config.medusa_num_heads, num_layers=config.medusa_num_layers,
                      shared_lm_head=config.shared_lm_head, token_map_size=0 if vocab is None else len(vocab))
    model_dir, data, vocab_ids = prepare_data(args, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    heads, lm_head = _heads(model_dir, cfg, vocab_ids)
    if args.eval_only:
        heads = heads_from_state(config, state, lm_head.in_features, lm_head.out_features, torch.float32, "cpu")
        metrics = evaluate(HeadsWithBase(heads, lm_head), data["eval"], cfg)
        atomic_write_text(args.out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    else:
        metrics = train(heads, lm_head, data["train"], data["eval"], cfg, args.out, args.model)
    log.info("held-out top-1 per head: %s", [round(a, 3) for a in metrics.get("top1", [])])
    log.info("held-out top-5 per head: %s", [round(a, 3) for a in metrics.get("top5", [])])
    return metrics


def _heads(model_dir: Path, cfg: TrainConfig, vocab_ids: Optional[np.ndarray]) -> tuple[MedusaHeads, torch.nn.Linear]:
    """Fresh heads and the base model's dense lm_head in fp32 (only the token map's rows if given)."""
    args = load_args(model_dir)
    base = load_llama(model_dir, torch.float32, "cpu")
    heads = MedusaHeads(MedusaConfig(cfg.num_heads, cfg.num_layers, shared_lm_head=cfg.shared_lm_head),
                        args.hidden_size, args.vocab_size)
    heads.init_lm_heads(base.output.weight.detach())
    if vocab_ids is None:
        return heads, base.output
    rows = torch.nn.Linear(args.hidden_size, len(vocab_ids), bias=False)
    rows.weight.data.copy_(base.output.weight.detach()[torch.from_numpy(vocab_ids)])
    return heads, rows


