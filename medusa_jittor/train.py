"""Medusa head training in Jittor on hidden states of the PyTorch backbone (backend ``hybrid``).

Both frameworks live in one process (they coexist on CPU): the PyTorch backbone fills the same
hidden-state cache as ``python -m medusa.train``, and this module trains Jittor heads on it with
the same loss (Σ λ^k CE_k on the token k+2 ahead), schedule (AdamW, warm-up + cosine), metrics and
checkpoint format; a checkpoint written here loads in the PyTorch backend and vice versa.
Multi-GPU: run under ``mpirun -np N`` — Jittor splits batches across MPI ranks by itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from medusa.core.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from medusa.core.config import MedusaConfig
from medusa.core.models import load_args
from medusa.core.trees import TOPK
from medusa.core.weights import our_state, read_hf_numpy
from medusa.train.cli import build_parser, prepare_data, torch_backbone, train_config
from medusa.train.dataset import IGNORE_INDEX
from medusa.train.trainer import TokenData, TrainConfig

from .heads import MedusaHeads
from .runtime import jt

log = logging.getLogger("medusa_jittor.train")
Backbone = Callable[[argparse.Namespace, Path], tuple[Callable[[list[int]], np.ndarray], str]]
STEP_FILE = "jittor_trainer_state.json"


def medusa_loss(logits: jt.Var, targets: jt.Var, decay: float) -> tuple[jt.Var, list[float]]:
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
        self.lm_head = jt.nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0], bias=False)
        self.lm_head.weight.assign(jt.array(lm_head_weight))
        self.lm_head.weight.stop_grad()  # the base lm_head stays frozen

    def execute(self, hidden: jt.Var) -> jt.Var:
        return self.heads(hidden, self.lm_head)


def evaluate(model: JittorHeadsWithBase, data: TokenData, cfg: TrainConfig) -> dict:
    hits = np.zeros((cfg.num_heads, TOPK))
    counts = np.zeros(cfg.num_heads)
    losses = []
    with jt.no_grad():
        for hidden, targets in data.batches(cfg.batch_tokens, seed=None):
            logits = model(jt.array(hidden.numpy()))
            tgt = jt.array(targets.numpy())
            losses.append([v.item() for v in medusa_loss(logits, tgt, cfg.decay)[1]])
            top = jt.topk(logits, TOPK, dim=-1)[1].numpy()  # [H, B, TOPK]
            t = targets.numpy().T[..., None]
            hits += (top == t).sum(axis=1)
            counts += (targets.numpy() != IGNORE_INDEX).sum(axis=0)
    rank_acc = (hits / np.maximum(counts, 1)[:, None]).tolist()
    return {"loss": np.mean(losses, axis=0).tolist(), "top1": [r[0] for r in rank_acc],
            "top5": [sum(r[:5]) for r in rank_acc], "rank_accuracy": rank_acc, "tokens": int(counts[0])}


def train(heads: MedusaHeads, lm_head_weight: np.ndarray, train_data: TokenData, eval_data: Optional[TokenData],
          cfg: TrainConfig, out_dir: Path, base_model: str) -> dict:
    """Train Jittor heads (resuming from ``out_dir``), then evaluate; reports tokens/s in metrics."""
    model = JittorHeadsWithBase(heads, lm_head_weight)
    optimizer = jt.optim.AdamW(model.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch, total = cfg.total_steps(len(train_data))
    warmup = int(cfg.warmup_ratio * total)
    step = _resume(out_dir, model.heads)
    tokens, start = 0, time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train heads (jittor)", unit="step")
    while step < total:
        epoch, skip = divmod(step, steps_per_epoch)
        for i, (hidden, targets) in enumerate(train_data.batches(cfg.batch_tokens, seed=cfg.seed + epoch)):
            if i < skip:
                continue
            optimizer.lr = cfg.lr * _schedule(step, warmup, total)
            logits = model(jt.array(hidden.numpy()))
            loss, per_head = medusa_loss(logits, jt.array(targets.numpy()), cfg.decay)
            optimizer.step(loss)
            step += 1
            tokens += hidden.shape[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{f"h{k}": f"{v.item():.2f}" for k, v in enumerate(per_head)})
            if step % cfg.save_every == 0 or step == total:
                _save(out_dir, model.heads, cfg, step, base_model)
            if step == total:
                break
    bar.close()
    elapsed = time.perf_counter() - start
    metrics = evaluate(model, eval_data, cfg) if eval_data is not None else {}
    metrics["train_tokens_per_second"] = tokens / max(elapsed, 1e-9)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    return metrics


def _schedule(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))


def _save(out_dir: Path, heads: MedusaHeads, cfg: TrainConfig, step: int, base_model: str) -> None:
    save_checkpoint(out_dir, cfg.medusa_config(base_model), heads.numpy_state(), extra={"training": dict(vars(cfg), framework="jittor")})
    atomic_write_text(out_dir / STEP_FILE, json.dumps({"step": step}) + "\n")


def _resume(out_dir: Path, heads: MedusaHeads) -> int:
    """Weights and step come back; AdamW moments restart (documented: a short re-warm-up)."""
    state_file = out_dir / STEP_FILE
    if not state_file.is_file():
        return 0
    _, state = load_checkpoint(out_dir)
    heads.load_state_dict({k: jt.array(v) for k, v in state.items()})
    step = int(json.loads(state_file.read_text())["step"])
    log.info("resuming Jittor head training from step %d (%s)", step, out_dir)
    return step


def main(argv: Optional[Sequence[str]] = None, backbone: Optional[Backbone] = None) -> dict:
    """Train Jittor heads; ``backbone`` fills the hidden-state cache and gives the base lm_head
    (default: the PyTorch Llama, i.e. the hybrid recipe)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = train_config(args)
    model_dir, data, vocab_ids = prepare_data(args, cfg, backbone or torch_backbone)
    margs = load_args(model_dir)
    lm_head = read_lm_head(model_dir)
    heads = MedusaHeads(MedusaConfig(cfg.num_heads, cfg.num_layers, shared_lm_head=cfg.shared_lm_head),
                        margs.hidden_size, margs.vocab_size)
    heads.init_lm_heads(lm_head)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = lm_head if vocab_ids is None else lm_head[vocab_ids]  # training over the token map: its rows only
    metrics = train(heads, rows, data["train"], data["eval"], cfg, args.out, args.model)
    log.info("held-out top-1 per head: %s", [round(a, 3) for a in metrics["top1"]])
    log.info("training throughput: %.0f tokens/s", metrics["train_tokens_per_second"])
    return metrics


def read_lm_head(model_dir: Path) -> np.ndarray:
    """The base model's output projection [V, h] in fp32, read straight from its weight files."""
    args = load_args(model_dir)
    return np.asarray(our_state(args, read_hf_numpy(model_dir), model_dir)["output.weight"], dtype=np.float32)


if __name__ == "__main__":
    main()
