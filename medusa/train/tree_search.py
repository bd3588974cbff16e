"""Hardware-aware tree choice: the best sparse tree for the measured heads on *this* machine.

1. Accuracy: ``rank_accuracy[k][r]``, how often head k's rank-r token is the right one on held-out
   self-distilled conversations (written by training into ``metrics.json``).
2. Tree for a node budget (Medusa paper §3.3.1): assuming heads err independently, a node
   ``(r0..rd)`` is accepted with probability Π_k acc[k][r_k], and the expected accept length of a
   tree is the sum over its nodes; adding nodes best-first maximises it, and stays prefix-closed
   because a child is never likelier than its parent.
3. Budget: tree verification cost grows with node count much faster on a CPU than on a GPU, so
   the step latency is *measured* here for every budget and the tree maximising expected
   tokens per second, τ / latency with τ = 1 + E[accept], wins.  It is saved as ``tree.json`` next
   to the heads and named in their ``config.json``, so every CLI uses it by default.

Stable choice: a single timing per budget lets noise pick the tree (trees of 1 to 6 nodes cost
nearly the same on a CPU).  So every budget is timed in ``rounds`` interleaved passes (a slow
spell of the machine hits all budgets alike), ``repeats`` steps each after a discarded warm-up
step; its median timing is robust to stalls.  The medians then fit the latency model the choice
uses, flat then linear, ``a + b·max(0, nodes - knee)`` (``b >= 0``; least squares, the knee among
the budgets): one tree forward verifies all nodes, which costs nothing extra until the hardware
is saturated and grows with every node beyond; the fit pools all budgets' timings, so the noise
of one budget's median hardly moves it.  Trees within ``TIE`` of the best expected tokens/s are
a tie, won by the smallest (the cheapest to verify).  Two runs on one machine thus pick the same
tree unless two budgets are nearly tied at that margin.

Reruns: the saved tree records what it was measured for (heads and rank accuracies, model,
backend, dtype, device, budgets); when those are unchanged it is reused without loading a model
(``--force`` remeasures).
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ..core.backends import BACKENDS, load_backend
from ..core.checkpoint import CONFIG_NAME, WEIGHTS_PT, WEIGHTS_SAFETENSORS, CheckpointError
from ..core.io import atomic_write, atomic_write_text
from ..core.models import DEFAULT_MODEL, load_args, resolve_model
from ..core.token_map import TOKEN_MAP_FILE
from ..core.trees import TOPK, Tree, validate
from .cli import warn_if_untrustworthy
from ..core.io import file_sha256
from .hidden_cache import model_fingerprint

log = logging.getLogger("medusa.train.tree_search")
TREE_FILE = "tree.json"
BUDGETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)
ROUNDS = 4  # interleaved passes over all budgets
REPEATS = 8  # timed steps per budget and pass, after one discarded warm-up step
TIE = 0.02  # expected tokens/s this close to the best: a tie, won by the smallest tree
Latency = Callable[[Tree], Union[float, Sequence[float]]]  # one or several timings of a step with this tree


def node_probability(path: Sequence[int], rank_acc: Sequence[Sequence[float]]) -> float:
    p = 1.0
    for depth, rank in enumerate(path):
        p *= rank_acc[depth][rank]
    return p


def expected_accept_length(tree: Tree, rank_acc: Sequence[Sequence[float]]) -> float:
    """E[accepted candidates per step] under independent heads."""
    return sum(node_probability(p, rank_acc) for p in tree)


def greedy_tree(rank_acc: Sequence[Sequence[float]], budget: int) -> Tree:
    """The ``budget``-node tree of maximal expected accept length (best-first growth)."""
    heap = [(-rank_acc[0][r], (r,)) for r in range(TOPK)]
    heapq.heapify(heap)
    chosen: list[tuple[int, ...]] = []
    while heap and len(chosen) < budget:
        neg_p, path = heapq.heappop(heap)
        chosen.append(path)
        if len(path) < len(rank_acc):
            for r in range(TOPK):
                heapq.heappush(heap, (neg_p * rank_acc[len(path)][r], path + (r,)))
    return validate(chosen)


def choose_tree(rank_acc: Sequence[Sequence[float]], step_latency: Latency, budgets: Sequence[int] = BUDGETS,
                rounds: int = 1, tie: float = TIE) -> dict:
    """Time each budget's tree (``rounds`` interleaved passes) and return the one with the best
    expected tokens/s (see the module docstring), with the table of all."""
    budgets = sorted(set(budgets))
    trees = [greedy_tree(rank_acc, n) for n in budgets]
    samples = measure_latencies(trees, step_latency, rounds)
    latency = flat_then_linear(budgets, [float(np.median(s)) for s in samples])
    rows = []
    for n, tree, times, lat in zip(budgets, trees, samples, latency):
        tau = 1 + expected_accept_length(tree, rank_acc)
        q1, q3 = np.percentile(times, [25, 75])
        rows.append({"nodes": n, "expected_accept_length": tau - 1, "expected_tau": tau, "latency_ms": lat * 1e3,
                     "median_ms": float(np.median(times)) * 1e3, "spread_ms": float(q3 - q1) * 1e3,
                     "samples": len(times), "expected_tokens_per_second": tau / lat, "tree": [list(p) for p in tree]})
    best = max(r["expected_tokens_per_second"] for r in rows)
    chosen = next(r for r in rows if r["expected_tokens_per_second"] >= (1 - tie) * best)
    return {"tree": chosen["tree"], "chosen": {k: v for k, v in chosen.items() if k != "tree"},
            "candidates": [{k: v for k, v in r.items() if k != "tree"} for r in rows]}


def measure_latencies(trees: Sequence[Tree], step_latency: Latency, rounds: int) -> list[list[float]]:
    """Timings of each tree, taken in ``rounds`` passes over all trees in turn."""
    samples: list[list[float]] = [[] for _ in trees]
    for _ in range(rounds):
        for times, tree in zip(samples, trees):
            times.extend(float(t) for t in np.atleast_1d(step_latency(tree)))
    return samples


def flat_then_linear(nodes: Sequence[int], latency: Sequence[float]) -> list[float]:
    """The least-squares fit of ``a + b·max(0, n - knee)`` (``b >= 0``, the knee one of ``nodes``) to the
    measured ``latency`` per node count: its values at ``nodes``."""
    n, y = np.asarray(nodes, dtype=float), np.asarray(latency, dtype=float)
    best: Optional[tuple[float, np.ndarray]] = None
    for knee in nodes:
        x = np.maximum(0.0, n - knee)
        slope, intercept = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, y.mean())
        if slope < 0:  # more nodes never cost less: the best non-increasing fit is flat
            slope, intercept = 0.0, y.mean()
        fit = intercept + slope * x
        error = float(((fit - y) ** 2).sum())
        if best is None or error < best[0]:
            best = (error, fit)
    return best[1].tolist()


def backend_step_latency(backend: Any, vocab_size: int, prompt_len: int = 256, repeats: int = REPEATS
                         ) -> Callable[[Tree], list[float]]:
    """``repeats`` wall times of one Medusa step (heads + tree forward + acceptance + KV update) with a
    given tree, all at the same context length, after one warm-up step that is not counted."""
    from ..core.buffers import build_buffers
    from ..core.config import GenerationConfig

    decoder = backend.decoder
    cfg = GenerationConfig()
    prompt = [(1000 + i) % vocab_size for i in range(prompt_len)]  # any ids the model has

    def measure(tree: Tree) -> list[float]:
        decoder.set_tree(build_buffers(tree))
        root = decoder.prefill(prompt, cfg)
        length = decoder.cache.length
        times = []
        for _ in range(repeats + 1):
            backend.synchronize()
            start = time.perf_counter()
            decoder.medusa_step(root, cfg)
            backend.synchronize()
            times.append(time.perf_counter() - start)
            decoder.cache.length = length  # every repetition verifies at the same context length
        return times[1:]

    measure(((0,),))  # first use of the kernels (oneDNN primitives, allocator) is not part of any budget
    return measure


def plot_tree(tree: Tree, path: Path) -> None:
    """Draw the tree (nodes by depth, labelled by rank) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [()] + list(tree)
    depth_rows: dict[int, list[tuple[int, ...]]] = {}
    for p in paths:
        depth_rows.setdefault(len(p), []).append(p)
    xy = {p: (i - (len(row) - 1) / 2, -d) for d, row in depth_rows.items() for i, p in enumerate(row)}
    fig, ax = plt.subplots(figsize=(max(4, len(depth_rows.get(max(depth_rows), [])) * 0.6), 1.5 * len(depth_rows)))
    for p in tree:
        (x0, y0), (x1, y1) = xy[p[:-1]], xy[p]
        ax.plot([x0, x1], [y0, y1], color="0.6", zorder=1)
    for p, (x, y) in xy.items():
        ax.scatter([x], [y], s=300, color="tab:blue" if p else "tab:orange", zorder=2)
        ax.text(x, y, str(p[-1]) if p else "root", ha="center", va="center", fontsize=7, color="white", zorder=3)
    ax.set_axis_off()
    ax.set_title(f"Medusa tree: {len(tree)} nodes")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)


def tree_file_name(backend: str) -> str:
    """``tree.json`` (the heads' default, named in config.json) for torch, else ``tree-BACKEND.json``."""
    return TREE_FILE if backend == "torch" else f"tree-{backend}.json"


def heads_rank_accuracy(heads_dir: Path) -> list[list[float]]:
    """The held-out rank accuracies training wrote to ``metrics.json`` (with a warning when they rest
    on too few held-out conversations to trust)."""
    try:
        metrics = json.loads((heads_dir / "metrics.json").read_text())
        rank_acc = metrics["rank_accuracy"]
    except FileNotFoundError:
        raise CheckpointError(f"{heads_dir / 'metrics.json'}: no such file; the tree search needs the held-out rank "
                              "accuracies that training writes there (train the heads first)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{heads_dir / 'metrics.json'} has no rank_accuracy: not written by a finished "
                              "training run (rerun python -m medusa.train)") from None
    if "eval_conversations" in metrics:
        warn_if_untrustworthy(metrics["eval_conversations"], metrics.get("eval_positions", 0))
    return rank_acc


def heads_config(heads_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((heads_dir / CONFIG_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise CheckpointError(f"{heads_dir}: no readable {CONFIG_NAME}: not a heads directory") from None


def tree_key(heads_dir: Path, rank_acc: Sequence[Sequence[float]], model_dir: Path,
             args: argparse.Namespace) -> dict[str, Any]:
    """What a measured tree depends on: a saved tree with the same key is reused."""
    h = hashlib.sha256(json.dumps(rank_acc).encode())
    for name in (WEIGHTS_SAFETENSORS, WEIGHTS_PT, TOKEN_MAP_FILE):  # the heads' weights and proposal vocabulary
        if (heads_dir / name).is_file():
            h.update(f"{name}:{file_sha256(heads_dir / name)}".encode())
    return {"heads_sha256": h.hexdigest(), "model_dir": str(model_dir),
            "model_fingerprint": model_fingerprint(model_dir),
            "backend": args.backend, "dtype": args.dtype, "device": args.device, "budgets": sorted(set(args.budgets))}


def saved_tree(path: Path, key: dict[str, Any]) -> Optional[dict]:
    """The tree saved at ``path`` if it was measured under ``key``."""
    try:
        saved = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("key") == key else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Pick the Medusa tree maximising expected tokens/s on this machine.")
    p.add_argument("--medusa-heads", type=Path, required=True, help="heads dir with metrics.json from training")
    p.add_argument("--model", default=None, help="base model (default: the heads' base_model_name_or_path)")
    p.add_argument("--backend", choices=list(BACKENDS), default="torch",
                   help="whose step latency to measure; other than torch, the tree is saved as tree-BACKEND.json, "
                        "which that backend prefers")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing passes over all budgets")
    p.add_argument("--repeats", type=int, default=REPEATS, help="timed steps per budget and pass (after a warm-up)")
    p.add_argument("--force", action="store_true", help="measure again even if a tree for the same inputs is saved")
    p.add_argument("--plot", type=Path, default=None, help="also draw the chosen tree to this PNG")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if min(args.rounds, args.repeats) < 1:
        raise ValueError("--rounds and --repeats must be at least 1")
    heads_dir = args.medusa_heads
    rank_acc = heads_rank_accuracy(heads_dir)
    config = heads_config(heads_dir)
    model = args.model or config.get("base_model_name_or_path") or DEFAULT_MODEL
    model_dir = resolve_model(model)
    key = tree_key(heads_dir, rank_acc, model_dir, args)
    tree_path = heads_dir / tree_file_name(args.backend)
    result = None if args.force else saved_tree(tree_path, key)
    measured = result is None
    if not measured:
        log.info("reusing %s: measured for these heads, model, backend and budgets (--force measures again)", tree_path)
    else:
        backend = load_backend(args.backend, model=model, heads=str(heads_dir), dtype=args.dtype, device=args.device)
        latency = backend_step_latency(backend, load_args(model_dir).vocab_size, repeats=args.repeats)
        result = choose_tree(rank_acc, latency, args.budgets, args.rounds)
        result.update(measured_on={"backend": args.backend, "dtype": args.dtype, "device": backend.device}, key=key)
        atomic_write_text(tree_path, json.dumps(result, indent=1) + "\n")
        for row in result["candidates"]:
            log.info("%3d nodes: τ %.2f, step %.1f ms (median %.1f, spread %.1f), %.1f tok/s expected", row["nodes"],
                     row["expected_tau"], row["latency_ms"], row["median_ms"], row["spread_ms"],
                     row["expected_tokens_per_second"])
    if args.backend == "torch" and config.get("tree") != TREE_FILE:
        atomic_write_text(heads_dir / CONFIG_NAME, json.dumps(dict(config, tree=TREE_FILE), indent=2) + "\n")
    if args.plot and (measured or not args.plot.is_file()):
        plot_tree(validate(result["tree"]), args.plot)
    report_choice(result, tree_path)
    return result


def report_choice(result: dict, tree_path: Path) -> None:
    c = result["chosen"]
    log.info("chosen tree (%s): %d nodes, expected τ %.2f tokens/step, step %.1f ms (median of %d timings), "
             "%.1f tokens/s expected", tree_path.name, c["nodes"], c["expected_tau"], c["latency_ms"], c["samples"],
             c["expected_tokens_per_second"])


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry: errors a user can fix are one log line and exit status 2."""
    try:
        main(argv)
    except ValueError as err:  # CheckpointError, ModelError, BackendError
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
