"""Medusa-1 head training (paper §2.2.1): frozen backbone, heads trained on its hidden states.

Head k at position t predicts the token at t+k+2 (the base lm_head already predicts t+1); the
loss is Σ_k λ^k · CE_k over assistant tokens (λ = 0.8 by default).  Training reads cached hidden
states (``hidden_cache``), shuffles *token positions* (heads see one position at a time, so
sequences need not stay together) and runs AdamW with linear warm-up and cosine decay.
``accelerate`` wraps model, optimiser and data, so ``accelerate launch`` spreads the same code over
GPUs or nodes.  Every ``save_every`` steps the heads (original Medusa format) and the optimiser
state are written atomically; a rerun with the same output directory resumes from them.

Shared-lm_head heads may train over a proposal vocabulary (``token_map``, see ``core.token_map``):
the frozen lm_head keeps only the mapped rows, so the softmax the heads learn is the one they
propose from at inference, and the vocabulary projection (nearly all of the cost) shrinks ~6x for
SmolLM2.  Targets outside the map (``OUTSIDE``) carry no loss but count as misses in the accuracy.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..core.checkpoint import atomic_write_text, save_checkpoint
from ..core.config import MedusaConfig
from ..core.token_map import TOKEN_MAP_FILE
from ..core.trees import TOPK
from ..heads import MedusaHeads
from .dataset import IGNORE_INDEX
from .hidden_cache import shard_files

log = logging.getLogger(__name__)
STATE_FILE = "trainer_state.pt"
OUTSIDE = -1  # target outside the token map: no loss, always a miss


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    shared_lm_head: bool = True
    decay: float = 0.8
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    epochs: int = 1
    batch_tokens: int = 1024
    grad_accum: int = 1
    bf16: bool = True
    seed: int = 0
    save_every: int = 200
    max_steps: int = 0  # > 0: stop there (smoke runs, throughput checks); the schedule spans the shortened run
    token_map_size: int = 0  # > 0: train over that many most frequent target ids (shared lm_head only)

    def total_steps(self, positions: int) -> tuple[int, int]:
        """(steps per epoch, total steps) for ``positions`` training positions."""
        per_epoch = math.ceil(positions / self.batch_tokens)
        total = per_epoch * self.epochs
        return per_epoch, min(total, self.max_steps) if self.max_steps > 0 else total

    def medusa_config(self, base_model: str) -> MedusaConfig:
        """The ``config.json`` of heads trained with this configuration."""
        return MedusaConfig(self.num_heads, self.num_layers, base_model, self.shared_lm_head,
                            token_map=TOKEN_MAP_FILE if self.token_map_size else None)


def head_targets(labels: np.ndarray, offsets: np.ndarray, num_heads: int) -> np.ndarray:
    """[T, H] targets: column k holds labels[t + k + 2] inside the same example, else IGNORE_INDEX."""
    t = labels.shape[0]
    example = np.searchsorted(offsets, np.arange(t), side="right") - 1
    out = np.full((t, num_heads), IGNORE_INDEX, dtype=np.int64)
    for k in range(num_heads):
        shift = k + 2
        if shift < t:
            same = example[shift:] == example[:-shift]
            out[:-shift, k] = np.where(same, labels[shift:], IGNORE_INDEX)
    return out


def remap_targets(targets: np.ndarray, vocab_ids: np.ndarray) -> np.ndarray:
    """Vocabulary targets -> row indices of the token map ``vocab_ids`` (sorted); OUTSIDE where unmapped."""
    valid = targets != IGNORE_INDEX
    row = np.clip(np.searchsorted(vocab_ids, targets), 0, len(vocab_ids) - 1)
    inside = valid & (vocab_ids[row] == targets)
    return np.where(inside, row, np.where(valid, OUTSIDE, IGNORE_INDEX))


def medusa_loss(logits: Tensor, targets: Tensor, decay: float) -> tuple[Tensor, list[float]]:
    """logits [H, B, V], targets [B, H] -> (Σ λ^k · mean CE_k, per-head losses); a head with no
    valid target contributes 0, never NaN.  OUTSIDE targets carry no loss."""
    total = logits.new_zeros(())
    per_head = []
    for k in range(logits.shape[0]):
        target = targets[:, k].masked_fill(targets[:, k] < 0, IGNORE_INDEX)
        valid = int((target != IGNORE_INDEX).sum())
        ce = F.cross_entropy(logits[k].float(), target, ignore_index=IGNORE_INDEX, reduction="sum")
        loss_k = ce / max(valid, 1)
        total = total + decay ** k * loss_k
        per_head.append(loss_k.item())
    return total, per_head


def rank_hits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per head: how often the target is at rank r of the head's top-TOPK ([H, TOPK]), and valid counts [H]
    (OUTSIDE targets count: they are misses)."""
    top = logits.topk(TOPK, dim=-1).indices  # [H, B, TOPK]
    tgt = targets.t()[..., None]  # [H, B, 1]
    hits = (top == tgt).sum(dim=1)  # [H, TOPK]
    return hits, (targets != IGNORE_INDEX).sum(dim=0)


class TokenData:
    """Cached hidden states and per-head targets of every position that trains at least one head;
    with ``vocab_ids`` (a token map) targets are rows of the map."""

    def __init__(self, cache_dir: Path, num_heads: int, vocab_ids: Optional[np.ndarray] = None) -> None:
        hidden, targets = [], []
        for f in shard_files(cache_dir):
            shard = np.load(f)
            tgt = head_targets(shard["labels"], shard["offsets"], num_heads)
            if vocab_ids is not None:
                tgt = remap_targets(tgt, vocab_ids)
            keep = (tgt != IGNORE_INDEX).any(axis=1)
            hidden.append(shard["hidden"][keep])
            targets.append(tgt[keep])
        if not hidden:
            raise FileNotFoundError(f"no hidden-state shards in {cache_dir}")
        self.hidden = torch.from_numpy(np.concatenate(hidden))  # [N, h] fp16
        self.targets = torch.from_numpy(np.concatenate(targets))  # [N, H]

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def batches(self, batch_tokens: int, seed: Optional[int]) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if seed is not None \
            else torch.arange(len(self))
        for start in range(0, len(self), batch_tokens):
            idx = order[start:start + batch_tokens]
            yield self.hidden[idx].float(), self.targets[idx]


class HeadsWithBase(nn.Module):
    """Trainable heads + the frozen base lm_head they may share."""

    def __init__(self, heads: MedusaHeads, lm_head: nn.Linear) -> None:
        super().__init__()
        self.heads, self.lm_head = heads, lm_head.requires_grad_(False)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.heads(hidden, self.lm_head)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: HeadsWithBase, data: TokenData, cfg: TrainConfig) -> dict:
    """Held-out per-head loss and top-1 / top-5 accuracy, plus the rank histogram tree search uses."""
    hits = torch.zeros(cfg.num_heads, TOPK)
    counts = torch.zeros(cfg.num_heads)
    losses = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        for hidden, targets in data.batches(cfg.batch_tokens, seed=None):
            logits = model(hidden)
            losses.append(medusa_loss(logits, targets, cfg.decay)[1])
            h, c = rank_hits(logits.float(), targets)
            hits += h.float()
            counts += c.float()
    rank_acc = (hits / counts.clamp(min=1)[:, None]).tolist()
    return {"loss": np.mean(losses, axis=0).tolist(), "top1": [r[0] for r in rank_acc],
            "top5": [sum(r[:5]) for r in rank_acc], "rank_accuracy": rank_acc, "tokens": int(counts[0])}


def train(heads: MedusaHeads, lm_head: nn.Linear, train_data: TokenData, eval_data: Optional[TokenData],
          cfg: TrainConfig, out_dir: Path, base_model: str) -> dict:
    """Train (or resume training) and write the final checkpoint + metrics.json to ``out_dir``."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not torch.cuda.is_available())
    model = HeadsWithBase(heads, lm_head)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    steps_per_epoch, total = cfg.total_steps(len(train_data))
    scheduler = cosine_schedule(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step = _resume(out_dir, accelerator.unwrap_model(model), optimizer, scheduler)
    bar = tqdm(total=total, initial=step, desc="train heads", unit="step", disable=not accelerator.is_main_process)
    tokens, start = 0, time.perf_counter()
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for i, (hidden, targets) in enumerate(train_data.batches(cfg.batch_tokens, seed=cfg.seed + epoch)):
            if i < skip:
                continue
            with accelerator.accumulate(model), torch.autocast(accelerator.device.type, dtype=torch.bfloat16,
                                                               enabled=cfg.bf16):
                logits = model(hidden.to(accelerator.device))
                loss, per_head = medusa_loss(logits, targets.to(accelerator.device), cfg.decay)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            tokens += hidden.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{f"h{k}": f"{v:.2f}" for k, v in enumerate(per_head)})
            if step % cfg.save_every == 0 or step == total:
                _save(out_dir, accelerator, model, optimizer, scheduler, step, cfg, base_model)
            if step == total:
                break
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = evaluate(accelerator.unwrap_model(model), eval_data, cfg) if eval_data is not None else {}
    metrics["train_tokens_per_second"] = tokens / max(elapsed, 1e-9)
    if accelerator.is_main_process:
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def _save(out_dir: Path, accelerator, model, optimizer, scheduler, step: int, cfg: TrainConfig,
          base_model: str) -> None:
    if not accelerator.is_main_process:
        return
    heads = accelerator.unwrap_model(model).heads
    config = cfg.medusa_config(base_model)
    save_checkpoint(out_dir, config, heads.numpy_state(), extra={"training": asdict(cfg)})
    tmp = out_dir / (STATE_FILE + ".tmp")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    os.replace(tmp, out_dir / STATE_FILE)


def _resume(out_dir: Path, model: HeadsWithBase, optimizer, scheduler) -> int:
    state_file = out_dir / STATE_FILE
    if not state_file.is_file():
        return 0
    from ..core.checkpoint import load_checkpoint

    _, state = load_checkpoint(out_dir)
    model.heads.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    saved = torch.load(state_file, weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    log.info("resuming head training from step %d (%s)", saved["step"], out_dir)
    return int(saved["step"])
