"""Medusa head training in Jittor on hidden states of the PyTorch backbone (backend ``hybrid``).

Both frameworks live in one process (they coexist on CPU): the PyTorch backbone fills the same
hidden-state cache as ``python -m medusa.train``, and this module trains Jittor heads on it with
the same loss (Σ λ^k CE_k on the token k+2 ahead), schedule (AdamW, warm-up + cosine), metrics,
checkpoint format and resume layout (heads + AdamW moments + step as one atomically renamed
directory); a checkpoint written here loads in the PyTorch backend and vice versa.

One process only: nothing here splits the data or the checkpoint writes over MPI ranks, so a
launch under ``mpirun`` (or ``accelerate launch``) is refused; several GPUs train with
``accelerate launch --num_processes N -m medusa.train``.  Gradient accumulation is refused too
(Jittor's AdamW counts its bias-correction step per backward pass, not per update): raise
``--batch-tokens`` instead.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from medusa.core.checkpoint import load_checkpoint, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.core.io import atomic_write_text
from medusa.core.models import load_args
from medusa.core.trees import TOPK
from medusa.train.cli import (Backbone, Prepared, backbone_dtype, base_lm_head, build_parser, report,
                              start_processes, torch_backbone, train_or_evaluate)
from medusa.train.dataset import IGNORE_INDEX
from medusa.train.trainer import (METRICS_FILE, PROGRESS_FILE, RESUME_DIR, TokenData, TrainConfig, TrainError,
                                  commit_state, resume_progress)

from .heads import MedusaHeads, heads_from_state, jittor_rows
from .runtime import jt

log = logging.getLogger("medusa_jittor.train")
OPTIMIZER_FILE = "adamw.npz"  # AdamW moments and step count, beside the heads in a resume directory


def medusa_loss(logits: jt.Var, targets: jt.Var, decay: float) -> tuple[jt.Var, list[jt.Var]]:
    """Same definition as ``medusa.train.trainer.medusa_loss``: logits [H, B, V], targets [B, H]."""
    total = jt.zeros(())
    per_head = []
    for k in range(logits.shape[0]):
        tgt = targets[:, k]
        valid = (tgt >= 0).float32()  # IGNORE_INDEX and OUTSIDE (off the token map) carry no loss
        peak = logits[k].max(dim=-1, keepdims=True)
        lse = (logits[k] - peak).exp().sum(-1).log() + peak.squeeze(-1)  # [B], stable log-sum-exp
        picked = logits[k].gather(1, tgt.maximum(0).unsqueeze(1)).squeeze(1)
        loss_k = ((lse - picked) * valid).sum() / valid.sum().maximum(1.0)
        total = total + decay ** k * loss_k
        per_head.append(loss_k)
    return total, per_head


class JittorHeadsWithBase(jt.nn.Module):
    def __init__(self, heads: MedusaHeads, lm_head_weight: np.ndarray) -> None:
        super().__init__()
        self.heads = heads
        self.lm_head = jittor_rows(lm_head_weight, None)
        self.lm_head.weight.stop_grad()  # the base lm_head stays frozen

    def execute(self, hidden: jt.Var) -> jt.Var:
        return self.heads(hidden, self.lm_head)


def evaluate(model: JittorHeadsWithBase, data: TokenData, cfg: TrainConfig) -> dict:
    hits = np.zeros((cfg.num_heads, TOPK))
    counts = np.zeros(cfg.num_heads)
    losses = []
    with jt.no_grad():
        for hidden, targets in data.batches(cfg.batch_tokens, seed=None):
            logits = model(jt.array(hidden))
            losses.append([v.item() for v in medusa_loss(logits, jt.array(targets), cfg.decay)[1]])
            top = jt.topk(logits, TOPK, dim=-1)[1].numpy()  # [H, B, TOPK]
            hits += (top == targets.T[..., None]).sum(axis=1)
            counts += (targets != IGNORE_INDEX).sum(axis=0)
    rank_acc = (hits / np.maximum(counts, 1)[:, None]).tolist()
    return {"loss": np.mean(losses, axis=0).tolist(), "top1": [r[0] for r in rank_acc],
            "top5": [sum(r[:5]) for r in rank_acc], "rank_accuracy": rank_acc, "tokens": int(counts[0])}


def train(heads: MedusaHeads, lm_head_weight: np.ndarray, train_data: TokenData, eval_data: Optional[TokenData],
          cfg: TrainConfig, out_dir: Path, base_model: str) -> dict:
    """Train Jittor heads (resuming from ``out_dir``), then evaluate; reports tokens/s in metrics."""
    if cfg.grad_accum != 1:
        raise TrainError(f"the Jittor trainer does not accumulate gradients (--grad-accum {cfg.grad_accum}): "
                         "raise --batch-tokens instead, or train with python -m medusa.train")
    model = JittorHeadsWithBase(heads, lm_head_weight)
    optimizer = jt.optim.AdamW(model.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch, total = cfg.total_steps(len(train_data))
    step = _resume(out_dir, model.heads, optimizer, total)
    stop = min(total, step + cfg.stop_after) if cfg.stop_after > 0 else total
    start, positions = time.perf_counter(), 0
    bar = tqdm(total=stop, initial=step, desc="train heads (jittor)", unit="step")
    while step < stop:
        epoch, skip = divmod(step, steps_per_epoch)
        order = train_data.order(cfg.seed + epoch)
        for number in range(skip, train_data.num_batches(cfg.batch_tokens)):
            hidden, targets = train_data.batch(order, number, cfg.batch_tokens)
            optimizer.lr = cfg.lr * _schedule(step, int(cfg.warmup_ratio * total), total)
            loss, _ = medusa_loss(model(jt.array(hidden)), jt.array(targets), cfg.decay)
            optimizer.step(loss)
            step, positions = step + 1, positions + len(hidden)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.save_every == 0 or step == stop:
                _save(out_dir, model.heads, optimizer, cfg, step, total, base_model)
            if step == stop:
                break
    bar.close()
    if step < total:
        log.info("stopped after step %d of %d (--stop-after); rerun to continue", step, total)
        return {"step": step, "total_steps": total}
    return _finish(model, eval_data, cfg, out_dir, positions, time.perf_counter() - start, len(train_data), total)


def _finish(model: JittorHeadsWithBase, eval_data: Optional[TokenData], cfg: TrainConfig, out_dir: Path,
            positions: int, elapsed: float, train_positions: int, total: int) -> dict:
    if positions == 0 and (out_dir / METRICS_FILE).is_file():  # the run was already complete: its metrics stand
        return json.loads((out_dir / METRICS_FILE).read_text())
    metrics = evaluate(model, eval_data, cfg) if eval_data is not None else {}
    metrics.update(world_size=1, train_positions=train_positions, steps=total, positions_per_step=cfg.batch_tokens,
                   positions_this_run=positions, train_tokens_per_second=positions / max(elapsed, 1e-9))
    atomic_write_text(out_dir / METRICS_FILE, json.dumps(metrics, indent=1) + "\n")
    return metrics


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def _adamw_moments(optimizer: jt.optim.AdamW) -> dict[str, np.ndarray]:
    """Jittor's AdamW state (``m``, ``values`` per parameter group, ``n_step``) as numpy."""
    state = {"n_step": np.array(optimizer.n_step)}
    for g, group in enumerate(optimizer.param_groups):
        for i, (m, v) in enumerate(zip(group["m"], group["values"])):
            state[f"{g}.{i}.m"], state[f"{g}.{i}.v"] = m.numpy(), v.numpy()
    return state


def _load_adamw_moments(optimizer: jt.optim.AdamW, state: dict[str, np.ndarray]) -> None:
    optimizer.n_step = int(state["n_step"])
    for g, group in enumerate(optimizer.param_groups):
        for i, (m, v) in enumerate(zip(group["m"], group["values"])):
            m.assign(jt.array(state[f"{g}.{i}.m"]))
            v.assign(jt.array(state[f"{g}.{i}.v"]))


def _save(out_dir: Path, heads: MedusaHeads, optimizer: jt.optim.AdamW, cfg: TrainConfig, step: int, total: int,
          base_model: str) -> None:
    """The heads, then heads + AdamW state + step as one resume directory (see ``commit_state``)."""
    config, weights = cfg.medusa_config(base_model), heads.numpy_state()

    def write(tmp: Path) -> None:
        save_checkpoint(tmp, config, weights)
        np.savez(tmp / OPTIMIZER_FILE, **_adamw_moments(optimizer))
        progress = {"step": step, "total_steps": total, "world_size": 1, "framework": "jittor"}
        (tmp / PROGRESS_FILE).write_text(json.dumps(progress) + "\n")

    save_checkpoint(out_dir, config, weights, extra={"training": dict(asdict(cfg), framework="jittor")})
    commit_state(out_dir / RESUME_DIR, step, write)  # after the heads: see medusa.train.trainer._save


def _resume(out_dir: Path, heads: MedusaHeads, optimizer: jt.optim.AdamW, total: int) -> int:
    found = resume_progress(out_dir, {"framework": "jittor", "total_steps": total, "world_size": 1})
    if found is None:
        return 0
    state, progress = found
    heads.load_state_dict({k: jt.array(v) for k, v in load_checkpoint(state)[1].items()})
    with np.load(state / OPTIMIZER_FILE) as moments:
        _load_adamw_moments(optimizer, dict(moments))
    return int(progress["step"])


def check_single_process() -> None:
    """Refuse a launch over several processes: each would train all the data and write the same files."""
    from accelerate import PartialState

    start_processes()
    if jt.in_mpi or jt.world_size > 1 or PartialState().num_processes > 1:
        raise TrainError("Jittor head training runs in one process only (it splits neither data nor checkpoint "
                         "writes over ranks): run it without mpirun, or train on several GPUs with "
                         "accelerate launch --num_processes N -m medusa.train")


def measure(model_dir: Path, data: TokenData, config: MedusaConfig, state: dict, vocab: Optional[np.ndarray],
            cfg: TrainConfig) -> dict:
    """``--eval-only``: held-out metrics of trained heads, computed by Jittor."""
    lm_head = base_lm_head(model_dir)
    heads = heads_from_state(config, state, lm_head.shape[1], lm_head.shape[0])
    return evaluate(JittorHeadsWithBase(heads, lm_head if vocab is None else lm_head[vocab]), data, cfg)


def train_heads(model_dir: Path, prepared: Prepared, cfg: TrainConfig, out: Path, base_model: str) -> dict:
    """Fresh Jittor heads (seeded: reruns start alike) trained over the prepared positions."""
    if cfg.head_type != "medusa":
        raise TrainError(f"--head-type {cfg.head_type}: the Jittor trainers train Medusa heads; train Hydra heads "
                         "with python -m medusa.train")
    lm_head = base_lm_head(model_dir)
    margs = load_args(model_dir)
    jt.set_global_seed(cfg.seed)  # the heads' initial biases: reruns start alike
    heads = MedusaHeads(MedusaConfig(cfg.num_heads, cfg.num_layers, shared_lm_head=cfg.shared_lm_head),
                        margs.hidden_size, margs.vocab_size)
    heads.init_lm_heads(lm_head)
    vocab_ids = prepared.vocab_ids
    rows = lm_head if vocab_ids is None else lm_head[vocab_ids]  # training over the token map: its rows only
    return train(heads, rows, prepared.splits["train"], prepared.splits["eval"], cfg, out, base_model)


def main(argv: Optional[Sequence[str]] = None, backbone: Optional[Backbone] = None) -> dict:
    """Train (or with ``--eval-only`` measure) Jittor heads; ``backbone`` fills the hidden-state
    cache (default: the PyTorch Llama, i.e. the hybrid recipe)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    check_single_process()
    if args.grad_accum != 1 and not args.eval_only:  # before the backbone pass, not after it
        raise TrainError(f"the Jittor trainer does not accumulate gradients (--grad-accum {args.grad_accum}): "
                         "raise --batch-tokens instead, or train with python -m medusa.train")
    backbone = backbone or torch_backbone(backbone_dtype(args), args.device)
    metrics = train_or_evaluate(args, backbone, train_heads, measure)
    report(metrics, args.out)
    return metrics


def cli(argv: Optional[Sequence[str]] = None, backbone: Optional[Backbone] = None) -> int:
    """Command-line entry: errors a user can fix are one log line and exit status 2."""
    try:
        main(argv, backbone)
    except ValueError as err:  # TrainError, ModelError, CheckpointError...
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
