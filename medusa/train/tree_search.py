"""Hardware-aware tree choice: the best sparse tree for the measured heads on *this* machine.

1. Accuracy: ``rank_accuracy[k][r]``, how often head k's rank-r token is the right one on held-out
   self-distilled conversations (written by training into ``metrics.json``).
2. Tree for a node budget (Medusa paper §3.3.1): assuming heads err independently, a node
   ``(r0..rd)`` is accepted with probability Π_k acc[k][r_k], and the expected accept length of a
   tree is the sum over its nodes; adding nodes best-first maximises it, and stays prefix-closed
   because a child is never likelier than its parent.
3. Budget: tree verification cost grows with node count much faster on a CPU than on a GPU, so
   the step latency is *measured* here for every budget and the tree maximising expected
   tokens per second, (1 + E[accept]) / latency, wins.  It is saved as ``tree.json`` next to the
   heads and named in their ``config.json``, so every CLI uses it by default.
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..core.backends import BACKENDS, load_backend
from ..core.checkpoint import CONFIG_NAME, atomic_write_text
from ..core.trees import TOPK, Tree, validate

log = logging.getLogger(__name__)
TREE_FILE = "tree.json"
BUDGETS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


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


def choose_tree(rank_acc: Sequence[Sequence[float]], step_latency: Callable[[Tree], float],
                budgets: Sequence[int] = BUDGETS) -> dict:
    """Measure each budget's tree and return the one with the best expected tokens/s (and the table)."""
    rows = []
    for n in budgets:
        tree = greedy_tree(rank_acc, n)
        latency = step_latency(tree)
        accept = expected_accept_length(tree, rank_acc)
        rows.append({"nodes": n, "expected_accept_length": accept, "latency_ms": latency * 1e3,
                     "expected_tokens_per_second": (1 + accept) / latency, "tree": [list(p) for p in tree]})
    best = max(rows, key=lambda r: r["expected_tokens_per_second"])
    return {"tree": best["tree"], "chosen": {k: v for k, v in best.items() if k != "tree"},
            "candidates": [{k: v for k, v in r.items() if k != "tree"} for r in rows]}


def backend_step_latency(backend, prompt_len: int = 256, repeats: int = 6) -> Callable[[Tree], float]:
    """Wall time of one Medusa step (heads + tree forward + acceptance + KV update) for a given tree."""
    from ..core.buffers import build_buffers
    from ..core.config import GenerationConfig

    decoder = backend.decoder
    cfg = GenerationConfig()

    def measure(tree: Tree) -> float:
        decoder.set_tree(build_buffers(tree))
        root = decoder.prefill(list(range(1000, 1000 + prompt_len)), cfg)
        length = decoder.cache.length
        times = []
        for _ in range(repeats + 2):
            backend.synchronize()
            start = time.perf_counter()
            decoder.medusa_step(root, cfg)
            backend.synchronize()
            times.append(time.perf_counter() - start)
            decoder.cache.length = length  # every repetition verifies at the same context length
        return sorted(times[2:])[len(times[2:]) // 2]  # median after warm-up

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
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description="Pick the Medusa tree maximising expected tokens/s on this machine.")
    p.add_argument("--medusa-heads", type=Path, required=True, help="heads dir with metrics.json from training")
    p.add_argument("--model", default=None, help="base model (default: the heads' base_model_name_or_path)")
    p.add_argument("--backend", choices=list(BACKENDS), default="torch",
                   help="whose step latency to measure; other than torch, the tree is saved as tree-BACKEND.json, "
                        "which that backend prefers")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    p.add_argument("--plot", type=Path, default=None, help="also draw the chosen tree to this PNG")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    heads_dir = args.medusa_heads
    rank_acc = json.loads((heads_dir / "metrics.json").read_text())["rank_accuracy"]
    config = json.loads((heads_dir / CONFIG_NAME).read_text())
    backend = load_backend(args.backend, model=args.model or config["base_model_name_or_path"], heads=str(heads_dir),
                           dtype=args.dtype, device=args.device)
    result = choose_tree(rank_acc, backend_step_latency(backend), args.budgets)
    result["measured_on"] = {"backend": args.backend, "dtype": args.dtype, "device": backend.device}
    tree_file = TREE_FILE if args.backend == "torch" else f"tree-{args.backend}.json"
    atomic_write_text(heads_dir / tree_file, json.dumps(result, indent=1) + "\n")
    if args.backend == "torch":
        config["tree"] = TREE_FILE
        atomic_write_text(heads_dir / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    if args.plot:
        plot_tree(validate(result["tree"]), args.plot)
    for row in result["candidates"]:
        log.info("%3d nodes: E[accept] %.2f, step %.1f ms, %.1f tok/s expected", row["nodes"],
                 row["expected_accept_length"], row["latency_ms"], row["expected_tokens_per_second"])
    log.info("chosen: %s", result["chosen"])
    return result


if __name__ == "__main__":
    main()
