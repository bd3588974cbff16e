"""Judge results: mean scores per model and turn, and pairwise win/loss/tie with FastChat's win rates.

Reads the judgment files ``my_judge.judge`` writes.  Single grading: mean score for turn 1, turn 2
and both together, ratings of -1 (no verdict) and API failures left out, as FastChat's
``show_result.py`` does.  Pairwise: a comparison counts as a win only when both position orders
agree, otherwise a tie; adjusted win rate = (win + tie / 2) / total.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from medusa.core.io import atomic_write_text
from medusa.core.io import read_jsonl

from .judge import judgment_key

log = logging.getLogger("results")


def latest_judgments(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last successful judgment per key (a rerun may have appended a retry after a failure)."""
    latest = {judgment_key(r): r for r in rows if "error" not in r}
    return list(latest.values())


def single_scores(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model -> {turn_1, turn_2, average, judged, no_verdict}; a mean is None when nothing was rated."""
    scores: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    no_verdict: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["score"] == -1:
            no_verdict[r["model"]] += 1
        else:
            scores[r["model"]][r["turn"]].append(r["score"])
    models = sorted(set(scores) | set(no_verdict))

    def mean(xs: list[float]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None

    table = {m: {"turn_1": mean(scores[m][1]), "turn_2": mean(scores[m][2]),
                 "average": mean(scores[m][1] + scores[m][2]),
                 "judged": len(scores[m][1]) + len(scores[m][2]), "no_verdict": no_verdict[m]} for m in models}
    return dict(sorted(table.items(), key=lambda kv: -(kv[1]["average"] or 0)))


def pairwise_results(rows: Sequence[dict[str, Any]], baseline: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """model -> win, loss, tie, win_rate, loss_rate, win_rate_adjusted (the baseline itself left out)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0})
    for r in rows:
        if "error" in (r["g1_winner"], r["g2_winner"]):
            continue
        if baseline is not None and baseline not in (r["model_1"], r["model_2"]):
            continue
        if r["g1_winner"] == "tie" or r["g1_winner"] != r["g2_winner"]:
            counts[r["model_1"]]["tie"] += 1
            counts[r["model_2"]]["tie"] += 1
        else:
            winner = r[r["g1_winner"]]  # "model_1" / "model_2" -> its id
            loser = r["model_2"] if winner == r["model_1"] else r["model_1"]
            counts[winner]["win"] += 1
            counts[loser]["loss"] += 1
    table = {}
    for model, c in counts.items():
        if model == baseline:
            continue
        total = c["win"] + c["loss"] + c["tie"]
        table[model] = {**c, "win_rate": c["win"] / total, "loss_rate": c["loss"] / total,
                        "win_rate_adjusted": (c["win"] + 0.5 * c["tie"]) / total}
    return dict(sorted(table.items(), key=lambda kv: -kv[1]["win_rate_adjusted"]))


def collect(files: Sequence[Path], baseline: Optional[str] = None) -> dict[str, Any]:
    """{"single": {...}, "pairwise": {...}, "failed": n} from any mix of single and pairwise files."""
    judged: list[dict[str, Any]] = []
    failed = 0
    for f in files:
        rows = read_jsonl(f)
        ok = latest_judgments(rows)
        failed += len({judgment_key(r) for r in rows if "error" in r} - {judgment_key(r) for r in ok})
        judged += ok
    single = [r for r in judged if "score" in r]
    pair = [r for r in judged if "g1_winner" in r]
    return {"single": single_scores(single) if single else {},
            "pairwise": pairwise_results(pair, baseline) if pair else {}, "failed": failed}


def format_results(result: dict[str, Any]) -> str:
    def num(x: Optional[float]) -> str:
        return f"{x:.2f}" if x is not None else "-"

    lines = []
    if result["single"]:
        width = max(len("model"), *map(len, result["single"])) + 2
        head = f"{'model':<{width}}{'turn 1':>8}{'turn 2':>8}{'average':>9}{'judged':>8}{'no verdict':>12}"
        lines += [head, "-" * len(head)]
        lines += [f"{m:<{width}}{num(s['turn_1']):>8}{num(s['turn_2']):>8}{num(s['average']):>9}{s['judged']:>8}"
                  f"{s['no_verdict']:>12}" for m, s in result["single"].items()]
    if result["pairwise"]:
        width = max(len("model"), *map(len, result["pairwise"])) + 2
        head = f"{'model':<{width}}{'win':>5}{'loss':>6}{'tie':>5}{'win rate':>10}{'loss rate':>11}{'adjusted':>10}"
        lines += ([""] if lines else []) + [head, "-" * len(head)]
        lines += [f"{m:<{width}}{s['win']:>5}{s['loss']:>6}{s['tie']:>5}{s['win_rate']:>10.3f}{s['loss_rate']:>11.3f}"
                  f"{s['win_rate_adjusted']:>10.3f}" for m, s in result["pairwise"].items()]
    return "\n".join(lines) or "no judgments yet"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("judgments", type=Path, nargs="+", help="judgment files (single and/or pairwise)")
    p.add_argument("--baseline-model", default=None, help="pairwise: count only comparisons with this model")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [p for p in args.judgments if not p.is_file()]
    if missing:
        log.error("%s: no such judgment file (run my_judge.judge first)", missing[0])
        return 2
    try:
        result = collect(args.judgments, args.baseline_model)
    except ValueError as err:
        log.error("%s", err)
        return 2
    if result["failed"]:
        log.warning("%d judgments failed with API errors: rerun my_judge.judge to retry them",
                    result["failed"])
    print(format_results(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
