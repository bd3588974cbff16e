"""Speed summaries from answer files: tokens/s overall and per category, τ, speedups.

Reads the per-turn ``new_tokens`` / ``wall_time`` / ``steps`` that ``my_judge.answers`` records and
summarises them with ``medusa.core.stats``, so the numbers mean what ``bench_speed``'s mean: new
tokens over wall time including prefill, τ = tokens per decoding step.  Each run's speedup is over
``--baseline`` (a model id) when given, otherwise over the baseline arm of the same backend and
setup.  Prints a table and a last-line JSON; ``--out`` gets the full summary that
``my_judge.plots`` draws.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from medusa.core.io import atomic_write_text
from medusa.core.stats import summarize

from .answers import answer_files, answer_records, load_answers

log = logging.getLogger("speed")

# setup keys that do not change what the baseline arm does
_ARM_ONLY = ("arm", "heads", "tree")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("answers", type=Path, nargs="+", help="answer files, or directories of *.jsonl answer files")
    p.add_argument("--baseline", default=None,
                   help="model id every speedup is relative to (default: the same backend's baseline arm)")
    p.add_argument("--out", type=Path, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = speed_summary(answer_files(args.answers), args.baseline)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    print(format_speed_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: {"tokens_per_second": r["tokens_per_second"], "mean_accept_length": r["mean_accept_length"],
                          "speedup": r["speedup"]} for k, r in result["runs"].items()}))
    return 0


def speed_summary(files: Sequence[Path], baseline: Optional[str] = None) -> dict[str, Any]:
    """{"baseline": ..., "runs": {model_id: {backend, arm, setup, questions, tokens_per_second, ...,
    per_category, reference, speedup, speedup_per_category}}}."""
    runs: dict[str, dict[str, Any]] = {}
    for path in files:
        answers = list(load_answers(path).values())
        records = [r for row in answers for r in answer_records(row)]
        if not records:
            log.warning("%s: no timed answers, skipped", path)
            continue
        model_id = answers[0]["model_id"]
        setup = answers[0].get("setup") or {}
        summary = summarize(records)[model_id]
        summary.pop("accept_hist")  # answer files keep no per-step histogram
        runs[model_id] = {"backend": setup.get("backend", model_id), "arm": setup.get("arm", model_id),
                          "setup": setup, "questions": len(answers), **summary}
    if baseline is not None and baseline not in runs:
        raise ValueError(f"--baseline {baseline!r} is not among the runs: {', '.join(runs) or 'none'}")
    for model_id, run in runs.items():
        ref = baseline or _same_setup_baseline(run, runs)
        run["reference"] = ref
        run["speedup"], run["speedup_per_category"] = _speedup(run, runs[ref]) if ref else (None, {})
    return {"baseline": baseline, "runs": runs}


def _same_setup_baseline(run: dict[str, Any], runs: dict[str, dict[str, Any]]) -> Optional[str]:
    key = {k: v for k, v in run["setup"].items() if k not in _ARM_ONLY}
    for model_id, other in runs.items():
        if other["arm"] == "baseline" and {k: v for k, v in other["setup"].items() if k not in _ARM_ONLY} == key:
            return model_id
    return None


def _speedup(run: dict[str, Any], ref: dict[str, Any]) -> tuple[Optional[float], dict[str, float]]:
    def ratio(a: dict[str, Any], b: dict[str, Any]) -> Optional[float]:
        return a["tokens_per_second"] / b["tokens_per_second"] if b["tokens_per_second"] else None

    per_cat = {c: ratio(s, ref["per_category"][c]) for c, s in run["per_category"].items() if c in ref["per_category"]}
    return ratio(run, ref), {c: v for c, v in per_cat.items() if v is not None}


def format_speed_table(result: dict[str, Any]) -> str:
    """One row per run: overall numbers, then tokens/s per category."""
    runs = result["runs"]
    cats = sorted({c for r in runs.values() for c in r["per_category"]})
    width = max([len("run")] + [len(k) for k in runs]) + 2
    head = f"{'run':<{width}}{'q':>4}{'tokens':>8}{'time s':>9}{'tok/s':>9}{'τ':>7}{'speedup':>9}" + \
        "".join(f"{c[:10]:>11}" for c in cats)
    lines = [head, "-" * len(head)]
    for model_id, r in runs.items():
        sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        per_cat = "".join(f"{r['per_category'][c]['tokens_per_second']:>11.2f}" if c in r["per_category"]
                          else f"{'-':>11}" for c in cats)
        lines.append(f"{model_id:<{width}}{r['questions']:>4}{r['total_tokens']:>8}{r['total_time_s']:>9.2f}"
                     f"{r['tokens_per_second']:>9.2f}{r['mean_accept_length']:>7.2f}{sp:>9}{per_cat}")
    if cats:
        lines.append("(per-category columns: tokens/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
