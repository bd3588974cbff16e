"""Bar charts of speed summaries (``my_judge.speed --out``): every number drawn is read from them.

Four PNGs per summary: tokens/s per backend for baseline and Medusa, tokens/s per category for
every backend x arm, Medusa's speedup per backend, and its speedup per category.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from medusa.core.io import atomic_write

log = logging.getLogger("plots")

Series = dict[str, list[float]]  # legend label -> one value per group (nan = missing)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("speed", type=Path, nargs="+", help="speed summaries written by my_judge.speed --out")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the PNGs go (default: plots/ beside the first speed summary; assets/ holds the "
                        "README's figures, pass it only to update them)")
    p.add_argument("--prefix", default="", help="file name prefix, e.g. mt_bench_")
    p.add_argument("--title", default="MT-Bench")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        runs = load_runs(args.speed)
        paths = plot_all(runs, args.out_dir or args.speed[0].parent / "plots", args.prefix, args.title)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    for path in paths:
        log.info("wrote %s", path)
    return 0


def load_runs(files: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """The runs of one or more speed summaries, keyed by (backend, arm): one run each."""
    runs: dict[str, dict[str, Any]] = {}
    seen: dict[tuple[str, str], str] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: no such speed summary (run my_judge.speed --out first)")
        try:
            file_runs = json.loads(f.read_text())["runs"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{f}: not a speed summary written by my_judge.speed ({err!r})") from err
        for model_id, run in file_runs.items():
            key = (run["backend"], run["arm"])
            if key in seen:
                raise ValueError(f"{model_id} and {seen[key]} are both backend {key[0]!r} arm {key[1]!r}: "
                                 "plot one model per summary")
            seen[key] = model_id
            runs[model_id] = {**run, "model_id": model_id}
    if not runs:
        raise ValueError("the speed summaries hold no runs")
    return runs


def plot_all(runs: dict[str, dict[str, Any]], out_dir: Path, prefix: str = "", title: str = "") -> list[Path]:
    """Write the four charts; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    backends = list(dict.fromkeys(r["backend"] for r in runs.values()))
    arms = list(dict.fromkeys(r["arm"] for r in runs.values()))
    cats = sorted({c for r in runs.values() for c in r["per_category"]})
    by_key = {(r["backend"], r["arm"]): r for r in runs.values()}
    # runs with a speedup over another run (the reference itself is 1.0x by definition)
    sped = [k for k, r in by_key.items() if r["speedup"] is not None and r["reference"] != r["model_id"]]
    note = _setup_note(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = [  # file name, chart title, x axis, groups, series, reference line
        ("tps_overall", "tokens/s", "backend", backends,
         {a: [_get(by_key, (b, a), "tokens_per_second") for b in backends] for a in arms}, None),
        ("tps_per_category", "tokens/s per category", "category", cats,
         {f"{b}/{a}": [_cat(by_key, (b, a), c) for c in cats] for (b, a) in by_key}, None),
        ("speedup_overall", "speedup over baseline", "backend", backends,
         {a: [by_key[(b, a)]["speedup"] if (b, a) in sped else math.nan for b in backends]
          for a in dict.fromkeys(a for _, a in sped)}, 1.0),
        ("speedup_per_category", "speedup over baseline per category", "category", cats,
         {f"{b}/{a}": [by_key[(b, a)]["speedup_per_category"].get(c, math.nan) for c in cats] for b, a in sped}, 1.0),
    ]
    paths = []
    for name, what, xlabel, groups, series, hline in charts:
        if not any(not math.isnan(v) for vs in series.values() for v in vs):
            log.warning("%s: nothing to draw (no baseline run to compare with?), skipped", name)
            continue
        path = out_dir / f"{prefix}{name}.png"
        ylabel = "speedup (x)" if hline else "tokens/s"
        _bar_chart(path, groups, series, xlabel, ylabel, f"{title}: {what}\n{note}", hline)
        paths.append(path)
    return paths


def _get(by_key: dict[tuple[str, str], dict[str, Any]], key: tuple[str, str], field: str) -> float:
    return by_key[key][field] if key in by_key else math.nan


def _cat(by_key: dict[tuple[str, str], dict[str, Any]], key: tuple[str, str], cat: str) -> float:
    per_cat = by_key[key]["per_category"] if key in by_key else {}
    return per_cat[cat]["tokens_per_second"] if cat in per_cat else math.nan


def _setup_note(runs: dict[str, dict[str, Any]]) -> str:
    """model, device, dtype as the runs' setups say (joined when they differ)."""
    setups = [r.get("setup", {}) for r in runs.values()]
    parts = [", ".join(sorted({str(s[k]) for s in setups if s.get(k) is not None}))
             for k in ("model", "device", "dtype")]
    return "; ".join(p for p in parts if p)


def _bar_chart(path: Path, groups: list[str], series: Series, xlabel: str, ylabel: str, title: str,
               hline: Optional[float]) -> None:
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.3 * len(groups) * len(series) + 2)), 4.5))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [0 if math.isnan(v) else v for v in values], width, label=name)
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.2f}" if hline else f"{v:.1f}" for v in values],
                     fontsize=7, padding=2)
    if hline is not None:
        ax.axhline(hline, color="gray", linestyle="--", linewidth=1)
    tilt = len(groups) > 4
    ax.set_xticks(range(len(groups)), groups, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))  # 0644, never half a PNG
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
