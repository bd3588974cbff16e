"""Speed benchmark: baseline vs Medusa (and optional HF references) on MT-Bench-format questions.

Prints a table, then the summary as one JSON line (last line).  OUT.json holds ``records`` (one per
question x turn x mode), ``summary`` per mode, ``speedup`` over the baseline and, at temperature 0,
whether Medusa's output ids equal the baseline's for every question.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from medusa.core.checkpoint import atomic_write_text
from medusa.core.stats import Record, format_table, speedups, summarize

from .harness import Arm, add_run_args, backend_arm, backend_from_args, config_from_args, hf_arm, run_question, warm_up
from .questions import load_questions

log = logging.getLogger("bench_speed")

MODES = {"baseline": ("baseline",), "medusa": ("medusa",), "both": ("baseline", "medusa"),
         "all": ("baseline", "medusa", "hf", "hf_lookup")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--mode", choices=list(MODES), default="both",
                   help="arms to run; 'all' adds HF generate and HF prompt-lookup on the same weights")
    p.add_argument("--questions", type=Path, default=None, help="MT-Bench-format JSONL (default: MT-Bench)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--turns", type=int, default=None, help="turns per question (default: all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--show-answers", action="store_true", help="print every answer's text")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        questions = load_questions(args.questions, args.limit)
        backend = backend_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    bench(args, questions, backend)
    return 0


def bench(args: argparse.Namespace, questions: list[dict[str, Any]], backend: Any) -> dict[str, Any]:
    """Run every arm over the questions; print the table and the JSON line; write --out."""
    tok = backend.tokenizer
    cfg = config_from_args(tok, args)
    arms = _arms(MODES[args.mode], backend, args)
    records: list[Record] = []
    for arm in arms:
        warm_up(arm, tok, questions[0], cfg, args.conv_template)
        if hasattr(backend.decoder, "timer"):
            backend.decoder.timer.reset()  # --profile: time steady-state steps only
        for q in tqdm(questions, desc=f"{args.backend}/{arm.name}", unit="q"):
            recs, answers = run_question(arm, tok, q, cfg, args.conv_template, args.turns)
            records += recs
            if args.show_answers:
                _show(q, recs, answers)
    result = _result(records, backend.describe(), vars(args), args.temperature == 0)
    print(format_table(result["summary"], result["speedup"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1, default=str))
    print(json.dumps({"backend": args.backend, "summary": _compact(result["summary"]), "speedup": result["speedup"],
                      "outputs_identical": result["outputs_identical"],
                      "ms_per_medusa_step": result["setup"].get("ms_per_step")}))
    return result


def _show(question: dict[str, Any], records: list[Record], answers: list[str]) -> None:
    for rec, answer, prompt in zip(records, answers, question["turns"]):
        tps = rec.new_tokens / rec.wall_time_s if rec.wall_time_s else 0.0
        print(f"\n### [{rec.mode}] question {rec.question_id} turn {rec.turn}: {prompt[:100]}\n{answer}\n"
              f"--- {rec.new_tokens} tokens, {tps:.1f} tok/s, {rec.new_tokens / max(rec.steps, 1):.2f} tokens/step")


def _arms(modes: Sequence[str], backend: Any, args: argparse.Namespace) -> list[Arm]:
    arms = [backend_arm(backend, medusa=m == "medusa") for m in modes if m in ("baseline", "medusa")]
    if any(m.startswith("hf") for m in modes):
        import torch
        from transformers import AutoModelForCausalLM

        from medusa.backend import torch_dtype

        hf = AutoModelForCausalLM.from_pretrained(backend.model_dir, dtype=torch_dtype(args.dtype))
        hf = hf.to(backend.describe()["device"]).eval()
        torch.manual_seed(args.seed)
        arms += [hf_arm(hf, "hf"), hf_arm(hf, "hf_lookup", prompt_lookup=10)]
    return arms


def _result(records: list[Record], setup: dict[str, Any], argv: dict[str, Any], greedy: bool) -> dict[str, Any]:
    summary = summarize(records)
    by_key = {(r.mode, r.question_id, r.turn): r.output_ids for r in records}
    identical: Optional[bool] = None
    if greedy and "baseline" in summary and "medusa" in summary:
        identical = all(ids == by_key.get(("baseline", q, t)) for (m, q, t), ids in by_key.items() if m == "medusa")
    return {"setup": setup, "args": argv, "records": [r.to_dict() for r in records], "summary": summary,
            "speedup": speedups(summary), "outputs_identical": identical}


def _compact(summary: dict[str, Any]) -> dict[str, Any]:
    return {m: {k: v for k, v in s.items() if k != "per_category"} for m, s in summary.items()}


if __name__ == "__main__":
    sys.exit(main())
