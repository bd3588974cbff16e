"""Speed benchmark: baseline vs Medusa's draft sources (and HF references) on MT-Bench-format questions.

Arms (``--arms``, or a ``--mode`` preset): ``baseline`` (one token per step), ``medusa`` (Medusa with
``--draft``), ``heads`` / ``ngram`` / ``both`` (Medusa verifying the heads' tree, an n-gram chain
from the context, or both: ``core.drafts``), ``hf`` / ``hf_lookup`` (HF ``generate``, plain and with
prompt lookup, on the same weights).  Each arm is warmed up once; then the arms take turns on every
question (baseline, then each other arm, then the next question), so a machine whose speed drifts
over minutes (a shared VM's does by 10-30%) biases no arm.

Prints one row per category and arm (and "all"): end-to-end tokens/s (new tokens over wall time,
prefill included), speedup over the baseline, τ (tokens per step), prefill tokens/s (prompt tokens
over the time to the first new tokens) and decode tokens/s (the other new tokens over the rest of
the time), and, at temperature 0, how many outputs equal the baseline's: in fp32 every Medusa arm
must match it; in bf16 this is the agreement with the bf16 baseline.  Mismatches are reported
(count and first divergent token per question), never asserted.  Then the tokens each arm took from
each draft source, and the summary as one JSON line (last line).  ``--out`` gets ``records`` (one
per question x turn x arm), ``table``, ``agreement``, ``summary`` per arm and ``speedup``.

``--compare-backends hybrid,jittor`` loads those backends too and adds their arms (``jittor:both``,
...) to the same turns, so backends are compared on one run's drifting machine speed, not across
processes; speedups stay against the first backend's baseline, and each backend's arms are checked
for identity against that backend's own baseline.
"""
from __future__ import annotations

import argparse
import os
import json
import logging
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from medusa.core.backends import BackendError
from medusa.core.config import GenerationConfig
from medusa.core.io import atomic_write_text
from medusa.core.options import BACKEND_NAMES, RunOptions
from medusa.core.stats import Record, speedups, summarize

from .harness import (Arm, add_run_args, backend_arm, check_prompts_fit, hf_arm, run_config, run_options,
                      run_question, warm_up)
from .questions import QUESTION_SETS, load_questions

log = logging.getLogger("bench_speed")

DRAFT_ARMS = ("heads", "ngram", "both")  # Medusa with cfg.draft set to the arm's name
ARMS = ("baseline", "medusa", *DRAFT_ARMS, "hf", "hf_lookup")
MODES = {"baseline": ("baseline",), "medusa": ("medusa",), "both": ("baseline", "medusa"),
         "all": ("baseline", "medusa", "hf", "hf_lookup"), "drafts": ("baseline", *DRAFT_ARMS, "hf", "hf_lookup")}
REFERENCE = "baseline"
# Whether this engine has draft sources besides the heads (``GenerationConfig.draft``).
ENGINE_DRAFTS = "draft" in {f.name for f in fields(GenerationConfig)}


@dataclass(frozen=True)
class BenchPlan:
    """What the benchmark runs, besides the run options: arms, questions, turns, output."""

    mode: Optional[str] = None
    arms: Optional[tuple[str, ...]] = None
    questions: Optional[Path] = None
    limit: Optional[int] = None
    per_category: Optional[int] = None
    turns: Optional[int] = None
    out: Optional[Path] = None
    show_answers: bool = False
    compare_backends: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchPlan":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @property
    def arm_names(self) -> tuple[str, ...]:
        return self.arms or MODES[self.mode or "both"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--mode", choices=list(MODES), default=None,
                       help="preset arms (default: both = baseline,medusa; all adds hf,hf_lookup; "
                            "drafts = baseline,heads,ngram,both,hf,hf_lookup)")
    which.add_argument("--arms", type=_arm_list, default=None,
                       help=f"comma-separated arms, in run order: {','.join(ARMS)}")
    p.add_argument("--questions", type=Path, default=None,
                   help=f"MT-Bench-format JSONL, or a set built at run time: {', '.join(QUESTION_SETS)} "
                        "(default: MT-Bench)")
    p.add_argument("--limit", type=_positive, default=None, help="at most LIMIT questions (after --per-category)")
    p.add_argument("--per-category", type=_positive, default=None, help="the first N questions of each category")
    p.add_argument("--turns", type=_positive, default=None, help="turns per question (default: all)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--show-answers", action="store_true", help="print every answer's text")
    p.add_argument("--compare-backends", type=_backend_list, default=(),
                   help="also run these backends' arms (not hf), as BACKEND:ARM, in the same turns "
                        f"(of {','.join(BACKEND_NAMES)})")
    return p


def _backend_list(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKEND_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend {', '.join(unknown) or text!r}: "
                                         f"choose from {','.join(BACKEND_NAMES)}")
    return tuple(dict.fromkeys(names))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_writable(out: Optional[Path]) -> None:
    """Refuse an ``--out`` that could not be written once the run is over."""
    if out is None:
        return
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name, e.g. {out / 'bench.json'}")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def _arm_list(text: str) -> tuple[str, ...]:
    names = [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown arm {', '.join(unknown) or text!r}: choose from {','.join(ARMS)}")
    return tuple(dict.fromkeys(names))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    plan = BenchPlan.from_args(args)
    try:
        check_writable(plan.out)  # before hours of measuring, not after
        opts = run_options(args)
        questions = load_questions(plan.questions, plan.limit, per_category=plan.per_category)
        if opts.backend in plan.compare_backends:
            raise ValueError(f"--compare-backends {opts.backend}: that is --backend already")
        backend = opts.load()
        others = {name: opts.load(name) for name in plan.compare_backends}
        check_prompts_fit(backend.tokenizer, questions, opts, plan.turns)
        bench(opts, plan, questions, backend, other_backend_arms(others, opts, plan),
              {name: other.describe() for name, other in others.items()})
    except (ValueError, FileNotFoundError) as err:  # bad input; a later turn past --max-len (engine)
        log.error("%s", err)
        return 2
    return 0


def bench(opts: RunOptions, plan: BenchPlan, questions: list[dict[str, Any]], backend: Any,
          extra_arms: Sequence[Arm] = (), compared: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run every arm (then ``extra_arms``) over the questions; print the table and the JSON line;
    write ``plan.out``.  ``compared``: the other backends' ``describe()``, kept in the setup."""
    tok = backend.tokenizer
    cfg = run_config(tok, opts)
    skipped: dict[str, str] = {}
    records: list[Record] = []
    arms = [arm for arm in [*_arms(plan.arm_names, backend, opts, skipped), *extra_arms]
            if _warm_up(arm, tok, questions[0], cfg, opts.conv_template, skipped)]
    if hasattr(backend.decoder, "timer"):
        backend.decoder.timer.reset()  # --profile: time steady-state steps only
    for q in tqdm(questions, desc=f"{opts.backend}: {','.join(a.name for a in arms)}", unit="q"):
        for arm in arms:  # arms take turns on each question: a drifting machine speed biases none
            recs, answers = run_question(arm, tok, q, cfg, opts.conv_template, plan.turns)
            records += recs
            if plan.show_answers:
                _show(q, recs, answers)
    setup = {**backend.describe(), **({"compared_backends": compared} if compared else {})}
    result = _result(records, setup, {**asdict(opts), **asdict(plan)}, opts.temperature == 0, skipped)
    print(format_report(result, opts.dtype))
    if plan.out:
        plan.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.out, json.dumps(result, indent=1, default=str))
    print(json.dumps(_last_line(result, opts)))
    return result


def other_backend_arms(others: dict[str, Any], opts: RunOptions, plan: BenchPlan) -> list[Arm]:
    """The engine arms (not HF's) of each loaded backend in ``others``, named BACKEND:ARM."""
    engine = [arm for arm in plan.arm_names if not arm.startswith("hf")]
    return [replace(arm, name=f"{name}:{arm.name}") for name, other in others.items()
            for arm in _arms(engine, other, opts, {})]


def reference_of(arm: str, arms: set[str]) -> str:
    """The arm whose outputs ``arm``'s are compared with: its own backend's baseline (BACKEND:baseline)
    when that ran, else the first backend's, which a BACKEND:baseline itself is compared with."""
    own = f"{arm.split(':')[0]}:{REFERENCE}" if ":" in arm else REFERENCE
    return own if own in arms and own != arm else REFERENCE


def _warm_up(arm: Arm, tok: Any, question: dict[str, Any], cfg: GenerationConfig, template: Optional[str],
             skipped: dict[str, str]) -> bool:
    """Warm ``arm`` up; False (and why in ``skipped``) when the backend refuses its draft sources."""
    try:
        warm_up(arm, tok, question, cfg, template)
    except BackendError as err:
        if arm.name.rsplit(":", 1)[-1] not in DRAFT_ARMS:  # jittor:ngram is a draft arm too
            raise
        log.warning("arm %s skipped: %s", arm.name, err)
        skipped[arm.name] = str(err)
        return False
    return True


def _show(question: dict[str, Any], records: list[Record], answers: list[str]) -> None:
    for rec, answer, prompt in zip(records, answers, question["turns"]):
        tps = rec.new_tokens / rec.wall_time_s if rec.wall_time_s else 0.0
        print(f"\n### [{rec.mode}] question {rec.question_id} turn {rec.turn}: {prompt[:100]}\n{answer}\n"
              f"--- {rec.new_tokens} tokens, {tps:.1f} tok/s, {rec.new_tokens / max(rec.steps, 1):.2f} tokens/step")


def _arms(names: Sequence[str], backend: Any, opts: RunOptions, skipped: dict[str, str]) -> list[Arm]:
    """The arms named, in order; a draft arm this engine cannot run goes to ``skipped`` instead."""
    arms = []
    for name in names:
        if name in DRAFT_ARMS and not ENGINE_DRAFTS and name != "heads":
            log.warning("arm %s skipped: this engine has no draft sources (GenerationConfig.draft)", name)
            skipped[name] = "this engine has no draft sources (GenerationConfig.draft)"
        elif name in DRAFT_ARMS:  # an engine without draft sources drafts with the heads only
            arms.append(backend_arm(backend, medusa=True, draft=name if ENGINE_DRAFTS else None, name=name))
        elif name in ("baseline", "medusa"):
            arms.append(backend_arm(backend, medusa=name == "medusa"))
    hf_names = [n for n in names if n.startswith("hf")]
    if hf_names:
        hf = _hf_model(backend, opts)
        arms += [hf_arm(hf, n, prompt_lookup=10 if n == "hf_lookup" else None) for n in hf_names]
    return arms


def _hf_model(backend: Any, opts: RunOptions) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from medusa.backend import torch_dtype

    hf = AutoModelForCausalLM.from_pretrained(backend.model_dir, dtype=torch_dtype(opts.dtype))
    hf = hf.to(backend.describe()["device"]).eval()
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    return hf


def _result(records: list[Record], setup: dict[str, Any], argv: dict[str, Any], greedy: bool,
            skipped: dict[str, str]) -> dict[str, Any]:
    summary = summarize(records)
    agreement = compare_outputs(records) if greedy and REFERENCE in summary else {}
    # HF is a reference, not ours to keep lossless; another backend's baseline is another framework's numerics
    engine_arms = [a for a in agreement if not a.startswith("hf") and not a.endswith(f":{REFERENCE}")]
    identical = all(agreement[a]["identical"] == agreement[a]["compared"] for a in engine_arms) if engine_arms \
        else None
    return {"setup": setup, "args": argv, "records": [r.to_dict() for r in records], "summary": summary,
            "speedup": speedups(summary), "table": category_table(records), "agreement": agreement,
            "outputs_identical": identical, "skipped_arms": skipped}


def first_divergence(ids: Sequence[int], reference: Sequence[int]) -> Optional[int]:
    """The first token position where ``ids`` differs from ``reference`` (None: identical)."""
    for i, (a, b) in enumerate(zip(ids, reference)):
        if a != b:
            return i
    return None if len(ids) == len(reference) else min(len(ids), len(reference))


def compare_outputs(records: Sequence[Record], reference: str = REFERENCE) -> dict[str, dict[str, Any]]:
    """Per arm: how many of its turns have the reference arm's output ids (``compared``, ``identical``,
    ``share_identical``) and, for each that differs, where (``divergences``: question, turn, position)."""
    ids = {(r.mode, r.question_id, r.turn): r.output_ids for r in records}
    arms = {r.mode for r in records}
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        own = reference_of(r.mode, arms) if reference == REFERENCE else reference
        key = (own, r.question_id, r.turn)
        if r.mode == own or key not in ids:
            continue
        arm = out.setdefault(r.mode, {"reference": own, "compared": 0, "identical": 0, "divergences": []})
        arm["compared"] += 1
        position = first_divergence(r.output_ids, ids[key])
        if position is None:
            arm["identical"] += 1
        else:
            arm["divergences"].append({"question_id": r.question_id, "category": r.category, "turn": r.turn,
                                       "position": position})
    for arm in out.values():
        arm["share_identical"] = arm["identical"] / arm["compared"]
    return out


def category_table(records: Sequence[Record], reference: str = REFERENCE) -> list[dict[str, Any]]:
    """One row per category (in the questions' order, then "all") and arm (in run order)."""
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.category, r.mode)].append(r)
        groups[("all", r.mode)].append(r)
    cats = list(dict.fromkeys([r.category for r in records] + ["all"]))
    arms = list(dict.fromkeys(r.mode for r in records))
    ids: dict[str, dict[tuple[Any, int], list[int]]] = defaultdict(dict)
    for r in records:
        ids[r.mode][(r.question_id, r.turn)] = r.output_ids
    rows = []
    for cat in cats:
        base = _row(groups.get((cat, reference), []), ids[reference])
        for arm in arms:
            if (cat, arm) in groups:
                own = reference_of(arm, set(arms)) if reference == REFERENCE else reference
                row = _row(groups[(cat, arm)], ids[own] if arm != own else {})
                ref_tps = base["tokens_per_second"] if base else 0.0
                row["speedup"] = row["tokens_per_second"] / ref_tps if ref_tps and arm != reference else None
                rows.append({"category": cat, "arm": arm, **row})
    return rows


def _row(rs: Sequence[Record], ref_ids: dict[tuple[Any, int], list[int]]) -> dict[str, Any]:
    """Totals of one (category, arm) cell; times that a record lacks count as 0."""
    if not rs:
        return {}
    tokens, wall, steps = (sum(r.new_tokens for r in rs), sum(r.wall_time_s for r in rs), sum(r.steps for r in rs))
    prompt = sum(getattr(r, "prompt_tokens", 0) for r in rs)
    prefill = sum(getattr(r, "prefill_s", 0.0) for r in rs)
    decode = sum(getattr(r, "decode_s", 0.0) for r in rs)
    decode_tokens = tokens - sum(getattr(r, "first_tokens", 0) for r in rs)
    compared = [r for r in rs if (r.question_id, r.turn) in ref_ids]
    sources: dict[str, int] = defaultdict(int)
    for r in rs:
        for k, v in (r.sources or {}).items():
            sources[k] += v
    return {"turns": len(rs), "new_tokens": tokens, "wall_s": wall, "tokens_per_second": tokens / wall if wall else 0.0,
            "tau": tokens / steps if steps else 0.0, "prompt_tokens": prompt, "prefill_s": prefill, "decode_s": decode,
            "prefill_tokens_per_second": prompt / prefill if prefill else None,
            "decode_tokens": decode_tokens, "decode_tokens_per_second": decode_tokens / decode if decode else None,
            "compared": len(compared) if ref_ids else None,
            "identical": sum(r.output_ids == ref_ids[(r.question_id, r.turn)] for r in compared) if ref_ids else None,
            "tokens_by_source": dict(sorted(sources.items()))}


def format_report(result: dict[str, Any], dtype: str = "float32") -> str:
    """The category x arm table, then output agreement and tokens by draft source per arm."""
    lines = [format_category_table(result["table"])]
    for arm, a in result["agreement"].items():
        where = ", ".join(f"{d['question_id']} turn {d['turn']} at token {d['position']}" for d in a["divergences"][:5])
        more = f" (+{len(a['divergences']) - 5} more)" if len(a["divergences"]) > 5 else ""
        lines.append(f"{arm} vs {a.get('reference', REFERENCE)} ({dtype}, greedy): {a['identical']}/{a['compared']} outputs identical"
                     + (f"; first divergence: {where}{more}" if where else ""))
    for row in result["table"]:
        if row["category"] == "all" and set(row["tokens_by_source"]) - {"bonus"}:
            parts = ", ".join(f"{k} {v}" for k, v in row["tokens_by_source"].items())
            lines.append(f"{row['arm']} tokens by source: {parts}")
    for arm, why in result["skipped_arms"].items():
        lines.append(f"{arm}: skipped ({why})")
    return "\n".join(lines)


def format_category_table(rows: Sequence[dict[str, Any]]) -> str:
    width = max([len("category")] + [len(r["category"]) for r in rows]) + 2
    arm_w = max([len("arm")] + [len(r["arm"]) for r in rows]) + 2
    head = (f"{'category':<{width}}{'arm':<{arm_w}}{'tok/s':>8}{'speedup':>9}{'τ':>6}{'prefill tok/s':>15}"
            f"{'decode tok/s':>14}{'identical':>11}")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        cat = r["category"] if r["category"] != last else ""
        last = r["category"]
        same = f"{r['identical']}/{r['compared']}" if r["compared"] else "-"
        lines.append(f"{cat:<{width}}{r['arm']:<{arm_w}}{r['tokens_per_second']:>8.2f}{_fmt(r['speedup'], 'x'):>9}"
                     f"{r['tau']:>6.2f}{_fmt(r['prefill_tokens_per_second']):>15}"
                     f"{_fmt(r['decode_tokens_per_second']):>14}{same:>11}")
    return "\n".join(lines)


def _fmt(value: Optional[float], unit: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{unit}"


def _last_line(result: dict[str, Any], opts: RunOptions) -> dict[str, Any]:
    """The summary JSON: per arm overall ("all" row) numbers, agreement, speedups."""
    overall = {r["arm"]: {k: r[k] for k in ("tokens_per_second", "speedup", "tau", "prefill_tokens_per_second",
                                            "decode_tokens_per_second", "new_tokens", "wall_s", "tokens_by_source")}
               for r in result["table"] if r["category"] == "all"}
    return {"backend": opts.backend, "dtype": opts.dtype, "summary": overall, "speedup": result["speedup"],
            "outputs_identical": result["outputs_identical"],
            "agreement": {a: {k: v[k] for k in ("reference", "identical", "compared", "share_identical")}
                          for a, v in result["agreement"].items()},
            "skipped_arms": result["skipped_arms"], "ms_per_medusa_step": result["setup"].get("ms_per_step")}


if __name__ == "__main__":
    sys.exit(main())
