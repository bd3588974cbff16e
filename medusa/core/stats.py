"""Run statistics: per-generation records -> per-mode summaries, speedups, a table and JSON.

Both arms of a comparison are counted the same way: new tokens emitted (stop token included)
over wall time including prefill; mean accept length is tokens per decoding step (1 for the
baseline), the Medusa paper's τ.  ``tokens_by_source`` splits the tokens by where they came from
(``engine.Step.sources``): the base model's own ("bonus"), the heads' or the n-gram branch's.
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence


@dataclass
class Record:
    question_id: Any
    category: str
    mode: str
    turn: int
    new_tokens: int
    steps: int
    wall_time_s: float
    output_ids: list[int]
    accept_hist: Optional[dict[int, int]] = None  # tokens per step -> number of steps
    sources: Optional[dict[str, int]] = None  # token source -> tokens (``source_counts``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_counts(steps: Iterable[Any]) -> dict[str, int]:
    """Tokens per source ("bonus", "heads", "ngram") over ``engine.Step``s."""
    counts: Counter[str] = Counter()
    for step in steps:
        counts.update(step.sources)
    return dict(sorted(counts.items()))


def summarize(records: Iterable[Record]) -> dict[str, dict[str, Any]]:
    """Per mode: tokens_per_second, total_tokens, total_time_s, mean_accept_length, accept_hist,
    tokens_by_source (when the records have sources), per_category."""
    by_mode: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_mode[r.mode].append(r)
    return {mode: _summary(rs) for mode, rs in by_mode.items()}


def _summary(rs: Sequence[Record]) -> dict[str, Any]:
    cats: dict[str, list[Record]] = defaultdict(list)
    for r in rs:
        cats[r.category].append(r)
    out = _totals(rs)
    hist: Counter[int] = Counter()
    sources: Counter[str] = Counter()
    for r in rs:
        hist.update({int(k): v for k, v in (r.accept_hist or {}).items()})
        sources.update(r.sources or {})
    out["accept_hist"] = dict(sorted(hist.items()))
    if sources:
        out["tokens_by_source"] = dict(sorted(sources.items()))
    out["per_category"] = {c: _totals(v) for c, v in sorted(cats.items())}
    return out


def _totals(rs: Sequence[Record]) -> dict[str, Any]:
    tokens = sum(r.new_tokens for r in rs)
    time_s = sum(r.wall_time_s for r in rs)
    steps = sum(r.steps for r in rs)
    return {
        "tokens_per_second": tokens / time_s if time_s > 0 else 0.0,
        "total_tokens": tokens,
        "total_time_s": time_s,
        "mean_accept_length": tokens / steps if steps else 0.0,
    }


def speedups(summary: dict[str, dict[str, Any]], reference: str = "baseline") -> dict[str, float]:
    """tokens/s of every other mode over the reference mode's."""
    if reference not in summary or not summary[reference]["tokens_per_second"]:
        return {}
    ref = summary[reference]["tokens_per_second"]
    return {m: s["tokens_per_second"] / ref for m, s in summary.items() if m != reference}


def format_table(summary: dict[str, dict[str, Any]], speedup: dict[str, float]) -> str:
    """A fixed-width table, one row per mode."""
    head = f"{'mode':<12}{'tokens':>8}{'time s':>9}{'tok/s':>9}{'τ (tok/step)':>14}{'speedup':>9}"
    lines = [head, "-" * len(head)]
    for mode, s in summary.items():
        sp = f"{speedup[mode]:.2f}x" if mode in speedup else "-"
        lines.append(f"{mode:<12}{s['total_tokens']:>8}{s['total_time_s']:>9.2f}"
                     f"{s['tokens_per_second']:>9.2f}{s['mean_accept_length']:>14.2f}{sp:>9}")
    return "\n".join(lines)


class StepTimer:
    """Wall time per part of a Medusa step (heads, tree forward, posterior, cache update).

    Off by default: timing a part honestly needs a device sync at its end, which lazy (Jittor) and
    asynchronous (CUDA) backends otherwise avoid.  ``sync`` is the backend's synchronize.
    """

    def __init__(self, sync: Callable[[], None], enabled: bool = False) -> None:
        self.sync, self.enabled = sync, enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.enabled:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds.clear()
        self.steps = 0

    def ms_per_step(self) -> dict[str, float]:
        return {k: round(1e3 * v / max(self.steps, 1), 3) for k, v in self.seconds.items()}
