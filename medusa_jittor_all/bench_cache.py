"""Micro-benchmark: the cost of one in-place KV-cache write must not grow with the cache size.

The Jittor cache is preallocated for the whole budget and written with ``setitem`` on a fixed
buffer, which Jittor performs in place (only the written slice is touched).  This times one
decode-step's writes (every layer, one position) for several budgets and fill levels; a copy-on-write
cache would scale with ``max_len``.  Prints a table, then one JSON line.

    python -m medusa_jittor_all.bench_cache --max-lens 512 2048 8192
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

import numpy as np

from medusa.core.config import LlamaArgs
from medusa_jittor.runtime import jt

from .llama import KVCache

SMOLLM2 = LlamaArgs(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64)


def write_cost_us(max_len: int, fill: float, steps: int) -> float:
    """Mean microseconds for one step's writes (all layers, 1 position) at ``fill`` of the budget."""
    cache = KVCache(SMOLLM2, max_len)
    cache.length = int(fill * (max_len - steps - 1))
    k = jt.array(np.ones((1, SMOLLM2.num_kv_heads, 1, SMOLLM2.head_dim), np.float32))
    for warm in (True, False):
        start = time.perf_counter()
        for _ in range(steps):
            for layer in range(SMOLLM2.num_layers):
                cache.write(layer, k, k)
            jt.sync(cache.k + cache.v)
            cache.commit(1)
        elapsed = time.perf_counter() - start
        cache.length -= steps if warm else 0
    return 1e6 * elapsed / steps


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-lens", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    rows = {n: {f"fill_{f}": round(write_cost_us(n, f, args.steps), 1) for f in (0.1, 0.9)} for n in args.max_lens}
    print(f"{'max_len':>8} {'us/step @10%':>14} {'us/step @90%':>14}")
    for n, r in rows.items():
        print(f"{n:>8} {r['fill_0.1']:>14} {r['fill_0.9']:>14}")
    result = {"us_per_step_write": rows, "layers": SMOLLM2.num_layers}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
