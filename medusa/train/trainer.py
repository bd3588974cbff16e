"""Medusa-1 head training (paper §2.2.1): frozen backbone, heads trained on its hidden states.

Head k at position t predicts the token at t+k+2 (the base lm_head already predicts t+1); the
loss is Σ_k λ^k · CE_k over assistant tokens (λ = 0.8 by default).  Training reads cached hidden
states (``hidden_cache``, memory-mapped), shuffles *token positions* (heads see one position at a
time, so sequences need not stay together) and runs AdamW with linear warm-up and cosine decay.
Hydra heads (``--head-type hydra``) train the same way with teacher forcing: head k at t also
reads the true tokens t+1..t+k+1 (``TokenData.inputs``, from the cached ids), which at inference
are the root and the drafts of heads < k on the path being extended.

Distribution (``accelerate launch --num_processes N -m medusa.train``): every epoch's batches are
dealt round-robin over the ranks (``rank_batches``), so each rank trains different positions and
all run the same number of optimiser steps; DDP averages their gradients.  One optimiser step
therefore sees ``batch_tokens x grad_accum x N`` positions, and the schedule is counted in
optimiser steps: N ranks with ``--batch-tokens B`` follow the same learning-rate curve (and, up to
float rounding, the same weights) as one process with ``--grad-accum N``.  The scheduler is stepped
by hand once per optimiser step (prepared by accelerate it would step N times).

Checkpoints: every ``save_every`` steps the heads are published in ``out_dir`` in the original
Medusa format, then ``accelerate``'s ``save_state`` writes heads, optimiser, scheduler and RNG
state as one directory, ``resume/step-NNNNNNNN``, first under a temporary name that is renamed
when complete, so a crash or a failing save (disk full) leaves the previous pair intact.  A rerun
with the same output directory and process count resumes from the newest pair.

Shared-lm_head heads may train over a proposal vocabulary (``token_map``, see ``core.token_map``):
the frozen lm_head keeps only the mapped rows, so the softmax the heads learn is the one they
propose from at inference, and the vocabulary projection (nearly all of the cost) shrinks ~6x for
SmolLM2.  Targets outside the map (``OUTSIDE``) carry no loss but count as misses in the accuracy.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from ..core.checkpoint import save_checkpoint
from ..core.config import HEAD_TYPES, MedusaConfig
from ..core.io import atomic_write_text
from ..core.token_map import TOKEN_MAP_FILE
from ..core.trees import TOPK
from ..heads import HydraHeads, MedusaHeads
from .dataset import IGNORE_INDEX
from .hidden_cache import open_hidden, shard_files

log = logging.getLogger(__name__)
OUTSIDE = -1  # target outside the token map: no loss, always a miss
METRICS_FILE = "metrics.json"
RESUME_DIR = "resume"  # under the output directory: one complete step-NNNNNNNN directory per save
PROGRESS_FILE = "progress.json"
LEGACY_STATE_FILES = ("trainer_state.pt", "jittor_trainer_state.json")  # resume files of earlier versions
_STEP_DIR = re.compile(r"step-(\d{8})")
_FLAGS = {"shared_lm_head": "per_head_lm_head", "bf16": "fp32"}  # fields set by a negated CLI switch
_HELP = {
    "batch_tokens": "positions per micro-batch on each process",
    "grad_accum": "micro-batches per optimiser step (one step sees batch-tokens x grad-accum x processes positions)",
    "max_steps": "stop at this optimiser step; the schedule spans the shortened run (smoke runs)",
    "stop_after": "save and stop after this many optimiser steps in this run, schedule unchanged; rerun to go on",
    "save_every": "optimiser steps between checkpoints (resume state + published heads)",
    "head_type": "medusa (heads read the hidden state) or hydra (each head also reads the tokens drafted before it)",
}


class TrainError(ValueError):
    """A training run that cannot start or continue as asked; the message says what to do."""


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
    batch_tokens: int = 1024  # positions per micro-batch and rank
    grad_accum: int = 1  # micro-batches per optimiser step
    bf16: bool = True
    seed: int = 0
    save_every: int = 200
    max_steps: int = 0  # > 0: stop there (smoke runs, throughput checks); the schedule spans the shortened run
    stop_after: int = 0  # > 0: save and stop after this many optimiser steps in this run; the schedule is unchanged
    token_map_size: int = 0  # > 0: train over that many most frequent target ids (shared lm_head only)
    trace_steps: bool = False  # log every optimiser step's learning rate and batch numbers, on every rank
    head_type: str = "medusa"  # or "hydra": sequentially dependent heads (``medusa.heads``)

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise TrainError(f"--head-type {self.head_type}: use {' or '.join(HEAD_TYPES)}")
        for name in ("num_heads", "batch_tokens", "grad_accum", "epochs", "save_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def total_steps(self, positions: int, world_size: int = 1) -> tuple[int, int]:
        """(optimiser steps per epoch, total optimiser steps) for ``positions`` training positions
        dealt over ``world_size`` ranks."""
        per_rank = math.ceil(math.ceil(positions / self.batch_tokens) / world_size)
        per_epoch = math.ceil(per_rank / self.grad_accum)
        total = per_epoch * self.epochs
        return per_epoch, min(total, self.max_steps) if self.max_steps > 0 else total

    def medusa_config(self, base_model: str) -> MedusaConfig:
        """The ``config.json`` of heads trained with this configuration."""
        return MedusaConfig(self.num_heads, self.num_layers, base_model, self.shared_lm_head,
                            token_map=TOKEN_MAP_FILE if self.token_map_size else None, head_type=self.head_type)

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field (``--batch-tokens``...); booleans as switches (``--per-head-lm-head``, ``--fp32``)."""
        defaults = cls()
        for f in fields(cls):
            if f.name not in _FLAGS and f.name != "trace_steps":
                parser.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                                    default=getattr(defaults, f.name), help=_HELP.get(f.name),
                                    choices=HEAD_TYPES if f.name == "head_type" else None)
        parser.add_argument("--per-head-lm-head", action="store_true",
                            help="original Medusa-1 heads with their own vocabulary projection (default: shared lm_head)")
        parser.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
        parser.add_argument("--trace-steps", action="store_true",
                            help="log each optimiser step's learning rate and batch numbers on every rank")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainConfig":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in _FLAGS}
        return cls(**values, shared_lm_head=not args.per_head_lm_head, bf16=not args.fp32)


def head_targets(labels: np.ndarray, offsets: np.ndarray, num_heads: int) -> np.ndarray:
    """[T, H] targets: column k holds labels[t + k + 2] inside the same example, else IGNORE_INDEX."""
    return shifted_labels(labels, offsets, range(2, num_heads + 2))


def head_inputs(ids: np.ndarray, offsets: np.ndarray, num_heads: int) -> np.ndarray:
    """[T, H] the tokens after each position: column j holds ids[t + j + 1] inside the same example,
    else IGNORE_INDEX (Hydra head k reads columns 0..k: the root, then the heads' drafts).  Wherever
    head k has a target (t + k + 2 inside the example) its k + 1 inputs are inside too."""
    return shifted_labels(ids, offsets, range(1, num_heads + 1))


def shifted_labels(labels: np.ndarray, offsets: np.ndarray, shifts: Sequence[int]) -> np.ndarray:
    """[T, len(shifts)]: column c holds labels[t + shifts[c]] inside the same example, else IGNORE_INDEX."""
    t = labels.shape[0]
    example = np.searchsorted(offsets, np.arange(t), side="right") - 1
    out = np.full((t, len(shifts)), IGNORE_INDEX, dtype=np.int64)
    for c, shift in enumerate(shifts):
        if shift < t:
            same = example[shift:] == example[:-shift]
            out[:-shift, c] = np.where(same, labels[shift:], IGNORE_INDEX)
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
    """The positions of a cache split that train at least one head, as numpy batches.

    Per-head targets (int32, [N, H]) are held in memory; hidden states stay in the memory-mapped
    shards and a batch reads only its rows, so the cache may be far larger than RAM.  With
    ``vocab_ids`` (a token map) targets are rows of the map."""

    def __init__(self, cache_dir: Path, num_heads: int, vocab_ids: Optional[np.ndarray] = None) -> None:
        hidden, rows, targets, inputs = [], [], [], []
        for f in shard_files(cache_dir):
            with np.load(f) as shard:
                tgt = head_targets(shard["labels"], shard["offsets"], num_heads)
                ins = head_inputs(shard["ids"], shard["offsets"], num_heads)
            if vocab_ids is not None:
                tgt = remap_targets(tgt, vocab_ids)
            keep = np.flatnonzero((tgt != IGNORE_INDEX).any(axis=1))
            hidden.append(open_hidden(f))
            rows.append(keep)
            targets.append(tgt[keep].astype(np.int32))
            inputs.append(np.maximum(ins[keep], 0).astype(np.int32))  # past the example's end: never read
        if not hidden:
            raise FileNotFoundError(f"no hidden-state shards in {cache_dir}")
        self._hidden = hidden  # per shard, memory-mapped [tokens, h] fp16
        self._starts = np.cumsum([0] + [len(r) for r in rows])  # first position of each shard
        self._rows = np.concatenate(rows)  # position -> row inside its shard
        self.targets = np.concatenate(targets)  # [N, H]
        self.inputs = np.concatenate(inputs)  # [N, H] ids x_1..x_H after each position (Hydra heads' inputs)

    def __len__(self) -> int:
        return len(self._rows)

    def num_batches(self, batch_tokens: int) -> int:
        return math.ceil(len(self) / batch_tokens)

    def order(self, seed: Optional[int]) -> np.ndarray:
        """The positions of one epoch in order: shuffled by ``seed`` (the same on every rank), or as stored."""
        return np.random.default_rng(seed).permutation(len(self)) if seed is not None else np.arange(len(self))

    def batch(self, order: np.ndarray, number: int, batch_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch ``number`` of the epoch ``order``: hidden states [B, h] fp32 and targets [B, H] int64."""
        idx = order[number * batch_tokens:(number + 1) * batch_tokens]
        return self._gather(idx), self.targets[idx].astype(np.int64)

    def batch_inputs(self, order: np.ndarray, number: int, batch_tokens: int) -> np.ndarray:
        """The Hydra inputs [B, H] (int64) of batch ``number``."""
        return self.inputs[order[number * batch_tokens:(number + 1) * batch_tokens]].astype(np.int64)

    def batches(self, batch_tokens: int, seed: Optional[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = self.order(seed)
        for number in range(self.num_batches(batch_tokens)):
            yield self.batch(order, number, batch_tokens)

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        out = np.empty((len(idx), self._hidden[0].shape[1]), np.float32)
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            rows = self._rows[idx[sel]]
            ascending = np.argsort(rows)  # read the mapped file front to back
            out[sel[ascending]] = self._hidden[s][rows[ascending]]
        return out


def rank_batches(num_batches: int, rank: int, world_size: int) -> list[int]:
    """The batch numbers ``rank`` trains in one epoch: every ``world_size``-th from ``rank`` on.  A rank
    short of a batch at the end takes one from the start again, so every rank runs the same number
    of steps (a rank with fewer would leave the others waiting in DDP's all-reduce forever)."""
    return [(i * world_size + rank) % num_batches for i in range(math.ceil(num_batches / world_size))]


class HeadsWithBase(nn.Module):
    """Trainable heads + the frozen base lm_head they may share (+ the frozen embedding Hydra heads read)."""

    def __init__(self, heads: MedusaHeads | HydraHeads, lm_head: nn.Linear, embed: Optional[nn.Embedding] = None) -> None:
        super().__init__()
        self.heads, self.lm_head = heads, lm_head.requires_grad_(False)
        self.embed = None if embed is None else embed.requires_grad_(False)

    def forward(self, hidden: Tensor, inputs: Optional[Tensor] = None) -> Tensor:
        return head_logits(self.heads, hidden, self.lm_head, self.embed, inputs)


def head_logits(heads: nn.Module, hidden: Tensor, lm_head: nn.Module, embed: Optional[nn.Module],
                inputs: Optional[Tensor]) -> Tensor:
    """[H, B, V]: Medusa heads read ``hidden``; Hydra heads (``embed`` given) also the ``inputs`` [B, H]."""
    return heads(hidden, lm_head) if embed is None else heads(hidden, lm_head, embed, inputs)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: HeadsWithBase, data: TokenData, cfg: TrainConfig) -> dict:
    """Held-out per-head loss and top-1 / top-5 accuracy, plus the rank histogram tree search uses."""
    device = model.lm_head.weight.device
    hits = torch.zeros(cfg.num_heads, TOPK)
    counts = torch.zeros(cfg.num_heads)
    losses = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        order = data.order(None)
        for number in range(data.num_batches(cfg.batch_tokens)):
            hidden, targets = data.batch(order, number, cfg.batch_tokens)
            inputs = torch.from_numpy(data.batch_inputs(order, number, cfg.batch_tokens)).to(device)
            logits = model(torch.from_numpy(hidden).to(device), inputs)
            targets = torch.from_numpy(targets).to(device)
            losses.append(medusa_loss(logits, targets, cfg.decay)[1])
            h, c = rank_hits(logits.float(), targets)
            hits += h.float().cpu()
            counts += c.float().cpu()
    rank_acc = (hits / counts.clamp(min=1)[:, None]).tolist()
    return {"loss": np.mean(losses, axis=0).tolist(), "top1": [r[0] for r in rank_acc],
            "top5": [sum(r[:5]) for r in rank_acc], "rank_accuracy": rank_acc, "tokens": int(counts[0])}


@dataclass
class _Run:
    """One training process: accelerate's handle, what it prepared, and the optimiser step reached."""

    accelerator: Any
    model: nn.Module  # the heads, DDP-wrapped when distributed
    lm_head: nn.Linear  # frozen, on this rank's device
    embed: Optional[nn.Embedding]  # frozen, on this rank's device: Hydra heads only
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    cfg: TrainConfig
    total: int  # optimiser steps of the whole schedule
    step: int = 0


def train(heads: MedusaHeads | HydraHeads, lm_head: nn.Linear, train_data: TokenData, eval_data: Optional[TokenData],
          cfg: TrainConfig, out_dir: Path, base_model: str, embed: Optional[nn.Embedding] = None) -> dict:
    """Train (or resume training) on this rank's share of the batches; the main process writes the
    checkpoints and, once the schedule is complete, ``metrics.json`` (returned)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    per_epoch, total = cfg.total_steps(len(train_data), accelerator.num_processes)
    run = _prepare(accelerator, heads, lm_head, embed, cfg, total)
    run.step = _resume(run, out_dir)
    stop = min(total, run.step + cfg.stop_after) if cfg.stop_after > 0 else total
    start = time.perf_counter()
    positions = _train_until(run, train_data, per_epoch, stop, out_dir, base_model)
    elapsed = time.perf_counter() - start
    if run.step < total:
        log.info("stopped after step %d of %d (--stop-after); rerun to continue", run.step, total)
        return {"step": run.step, "total_steps": total}
    return _finish(run, eval_data, out_dir, positions, elapsed, len(train_data))


def _prepare(accelerator: Any, heads: nn.Module, lm_head: nn.Linear, embed: Optional[nn.Embedding], cfg: TrainConfig,
             total: int) -> _Run:
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, int(cfg.warmup_ratio * total), total)
    model, optimizer = accelerator.prepare(heads, optimizer)
    # Not prepared: accelerate's wrapper steps a scheduler once per process per optimiser step.
    accelerator.register_for_checkpointing(scheduler)
    frozen = lm_head.requires_grad_(False).to(accelerator.device)
    embed = None if embed is None else embed.requires_grad_(False).to(accelerator.device)
    return _Run(accelerator, model, frozen, embed, optimizer, scheduler, cfg, total)


def _train_until(run: _Run, data: TokenData, per_epoch: int, stop: int, out_dir: Path, base_model: str) -> int:
    """Optimiser steps up to ``stop``, saving every ``save_every`` and at ``stop``; returns the
    positions this rank trained."""
    acc, cfg = run.accelerator, run.cfg
    bar = tqdm(total=stop, initial=run.step, desc="train heads", unit="step", disable=not acc.is_main_process)
    positions = 0
    while run.step < stop:
        epoch, skip = divmod(run.step, per_epoch)
        order = data.order(cfg.seed + epoch)
        mine = rank_batches(data.num_batches(cfg.batch_tokens), acc.process_index, acc.num_processes)
        groups = [mine[i:i + cfg.grad_accum] for i in range(0, len(mine), cfg.grad_accum)]
        for group in groups[skip:]:
            if cfg.trace_steps:
                log.info("trace %s", json.dumps({"rank": acc.process_index, "step": run.step, "epoch": epoch,
                                                 "lr": run.optimizer.param_groups[0]["lr"], "batches": group}))
            batches = [(*data.batch(order, n, cfg.batch_tokens), data.batch_inputs(order, n, cfg.batch_tokens))
                       for n in group]
            loss = _optimizer_step(run, batches)
            run.step += 1
            positions += sum(len(hidden) for hidden, *_ in batches)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if run.step % cfg.save_every == 0 or run.step == stop:
                _save(run, out_dir, base_model)
            if run.step == stop:
                break
    bar.close()
    return positions


def _optimizer_step(run: _Run, batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> float:
    """One optimiser step on the mean gradient of ``batches`` (gradient accumulation); DDP
    all-reduces on the last micro-batch only.  Returns the mean loss."""
    acc, device = run.accelerator, run.accelerator.device
    losses = []
    for k, (hidden, targets, inputs) in enumerate(batches):
        with nullcontext() if k == len(batches) - 1 else acc.no_sync(run.model):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.cfg.bf16):
                logits = head_logits(run.model, torch.from_numpy(hidden).to(device), run.lm_head, run.embed,
                                     torch.from_numpy(inputs).to(device))
                loss, _ = medusa_loss(logits, torch.from_numpy(targets).to(device), run.cfg.decay)
            acc.backward(loss / len(batches))
        losses.append(loss.item())
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    return float(np.mean(losses))


def _finish(run: _Run, eval_data: Optional[TokenData], out_dir: Path, positions: int, elapsed: float,
            train_positions: int) -> dict:
    """Held-out metrics of the finished heads, written by the main process to ``metrics.json``."""
    acc = run.accelerator
    seen = int(acc.reduce(torch.tensor(positions, device=acc.device), "sum").item())
    if seen == 0 and (out_dir / METRICS_FILE).is_file():  # the run was already complete: its metrics stand
        return json.loads((out_dir / METRICS_FILE).read_text())
    metrics: dict = {}
    if acc.is_main_process:
        heads = HeadsWithBase(acc.unwrap_model(run.model), run.lm_head, run.embed)
        metrics = evaluate(heads, eval_data, run.cfg) if eval_data is not None else {}
        metrics.update(world_size=acc.num_processes, train_positions=train_positions, steps=run.total,
                       positions_per_step=run.cfg.batch_tokens * run.cfg.grad_accum * acc.num_processes,
                       positions_this_run=seen, train_tokens_per_second=seen / max(elapsed, 1e-9))
        atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    acc.wait_for_everyone()
    return metrics


def _save(run: _Run, out_dir: Path, base_model: str) -> None:
    """The heads in the published format (main process), then the resume state: heads + optimiser +
    scheduler as one atomic directory.  In this order a crash between the two leaves an older
    resume state, from which the rerun retrains the same steps and publishes the same heads."""
    acc = run.accelerator
    if acc.is_main_process:
        heads = acc.unwrap_model(run.model)
        save_checkpoint(out_dir, run.cfg.medusa_config(base_model), heads.numpy_state(),
                        extra={"training": asdict(run.cfg)})
    progress = {"step": run.step, "total_steps": run.total, "world_size": acc.num_processes, "framework": "torch"}
    save_resume_state(acc, out_dir / RESUME_DIR, progress)


def save_resume_state(accelerator: Any, root: Path, progress: dict) -> Path:
    """``accelerator.save_state`` (every rank) into a new ``root/step-NNNNNNNN``, see ``commit_state``."""
    main = accelerator.is_main_process

    def write(tmp: Path) -> None:
        accelerator.wait_for_everyone()  # the main process made ``tmp``
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            (tmp / PROGRESS_FILE).write_text(json.dumps(progress) + "\n")

    return commit_state(root, progress["step"], write, main)


def commit_state(root: Path, step: int, write: Callable[[Path], None], main: bool = True) -> Path:
    """Write a resume state as one directory, atomically: ``write(tmp)`` fills a temporary directory,
    which the main process renames to ``root/step-NNNNNNNN`` once complete and flushed, then removes
    older states.  A failing write raises TrainError and leaves the previous state as it was."""
    final = root / f"step-{step:08d}"
    tmp = root / f".{final.name}.tmp"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        write(tmp)
        if main:
            _fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)  # only if this very step was saved before
            tmp.rename(final)
    except OSError as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TrainError(f"cannot save the training state to {root} ({err}); the previous checkpoint there is "
                         "intact: free space or fix permissions and rerun to resume") from err
    if main:
        for old in root.iterdir():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def latest_resume_state(out_dir: Path) -> Optional[Path]:
    """The newest complete resume directory under ``out_dir`` (temporary ones never match)."""
    root = out_dir / RESUME_DIR
    found = sorted(d for d in root.iterdir() if _STEP_DIR.fullmatch(d.name)) if root.is_dir() else []
    return found[-1] if found else None


def resume_progress(out_dir: Path, expected: dict) -> Optional[tuple[Path, dict]]:
    """(newest resume directory, its progress) when ``out_dir`` holds one saved with the ``expected``
    settings (framework, total steps, processes); None for a fresh start; TrainError otherwise."""
    state = latest_resume_state(out_dir)
    if state is None:
        for name in LEGACY_STATE_FILES:
            if (out_dir / name).exists():
                raise TrainError(f"{out_dir / name} was written by an earlier version and cannot be resumed: "
                                 "train into a new --out, or delete it to start over")
        return None
    progress = json.loads((state / PROGRESS_FILE).read_text())
    for key, value in expected.items():
        if progress.get(key) != value:
            raise TrainError(f"{state} was saved with {key}={progress.get(key)} but this run has {value}: resume "
                             "with the same trainer, data, flags and number of processes, or use a new --out")
    log.info("resuming head training from step %d (%s)", progress["step"], state)
    return state, progress


def _resume(run: _Run, out_dir: Path) -> int:
    """Load the newest resume state (every rank); the step it reached, 0 for a fresh start."""
    found = resume_progress(out_dir, {"framework": "torch", "total_steps": run.total,
                                      "world_size": run.accelerator.num_processes})
    if found is None:
        return 0
    state, progress = found
    run.accelerator.load_state(str(state))
    return int(progress["step"])


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk before it is renamed into place."""
    for f in root.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
