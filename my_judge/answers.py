"""Answers for MT-Bench / GSM8K from any backend x {baseline, medusa}, in FastChat's answer format.

One JSONL line per question, as FastChat's ``gen_model_answer`` writes them: ``question_id,
answer_id, model_id, choices: [{index, turns, new_tokens, wall_time, steps}], tstamp``.  The
per-turn lists ``new_tokens`` / ``wall_time`` / ``steps`` are what Medusa's own answer files add, so
``my_judge.speed`` needs nothing else (mean accepted length = new_tokens / steps).  Two extra keys
make a file self-describing: ``category`` and ``setup`` (backend, arm, model, heads, tree, dtype,
device, decoding options).  A rerun skips the questions already answered; resuming a file made
with another setup is refused, because that would mix two setups' timings in one run.

Generation is ``harness.run_question``, the code ``bench_speed`` times: multi-turn, turn 2 sees
turn 1's answer, device synchronised around each turn.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from medusa.core.backends import Backend
from medusa.core.config import GenerationConfig
from medusa.core.io import JsonlAppender, iter_jsonl
from medusa.core.options import RunOptions
from medusa.core.stats import Record

from .harness import Arm, add_run_args, backend_arm, run_config, run_options, run_question, warm_up
from .questions import load_questions

log = logging.getLogger("answers")

ARMS = {"baseline": ("baseline",), "medusa": ("medusa",), "both": ("baseline", "medusa")}

# Sampling temperature per MT-Bench category (FastChat fastchat/llm_judge/common.py, temperature_config).
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}

# describe() keys that identify what generated the answers (a backend may add live counters too)
SETUP_KEYS = ("model", "heads", "tree", "dtype", "device")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--mode", choices=list(ARMS), default="both", help="arms to answer with (one file each)")
    p.add_argument("--questions", type=Path, default=None, help="MT-Bench-format JSONL (default: MT-Bench)")
    p.add_argument("--start", type=_count(0), default=0, help="skip the first START questions")
    p.add_argument("--limit", type=_count(1), default=None, help="answer at most LIMIT questions")
    p.add_argument("--turns", type=_count(1), default=None, help="turns per question (default: all)")
    p.add_argument("--fastchat-temperatures", action="store_true",
                   help="FastChat's per-category temperatures (writing/roleplay 0.7, stem/humanities 0.1, else 0); "
                        "--temperature for other categories")
    p.add_argument("--answer-dir", type=Path, default=Path("results/mt_bench/model_answer"))
    p.add_argument("--model-id", default=None,
                   help="answers go to ANSWER_DIR/MODEL_ID-BACKEND-ARM.jsonl (default MODEL_ID: the model's name)")
    return p


def _count(least: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value

    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        questions = load_questions(args.questions, args.limit, args.start)
        opts, job = plan(args)
        backend = opts.load()
        for path in generate_answers(backend, questions, opts, job):
            log.info("%s: done", path)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    return 0


@dataclass(frozen=True)
class AnswerJob:
    """What to answer and where, besides the run options."""

    answer_dir: Path
    mode: str = "both"
    turns: Optional[int] = None
    model_id: Optional[str] = None
    fastchat_temperatures: bool = False


def plan(args: argparse.Namespace) -> tuple[RunOptions, AnswerJob]:
    """The parsed command line as (run options, answer job)."""
    return run_options(args), AnswerJob(args.answer_dir, args.mode, args.turns, args.model_id,
                                        args.fastchat_temperatures)


def generate_answers(backend: Backend, questions: list[dict[str, Any]], opts: RunOptions, job: AnswerJob) -> list[Path]:
    """Answer every question not yet in each arm's file; one line appended per finished question."""
    tok = backend.tokenizer
    cfg = run_config(tok, opts)
    described = backend.describe()
    plans = []
    for arm in [backend_arm(backend, medusa=m == "medusa") for m in ARMS[job.mode]]:
        draft = "" if not arm.medusa or opts.draft == "heads" else f"-{opts.draft}"
        model_id = f"{job.model_id or Path(described['model']).name}-{opts.backend}-{arm.name}{draft}"
        path = job.answer_dir / f"{model_id}.jsonl"
        setup = {"backend": opts.backend, "arm": arm.name, **{k: described.get(k) for k in SETUP_KEYS},
                 "conv_template": opts.conv_template, "max_new_tokens": opts.max_new_tokens, "turns": job.turns,
                 "temperature": "fastchat" if job.fastchat_temperatures else opts.temperature, "seed": opts.seed,
                 "top_p": opts.top_p, "acceptance": opts.acceptance, "max_len": opts.max_len, "draft": opts.draft,
                 "posterior_threshold": opts.posterior_threshold, "posterior_alpha": opts.posterior_alpha,
                 **({} if opts.draft == "heads" else {"ngram_tokens": opts.ngram_tokens,
                                                     "ngram_min_match": opts.ngram_min_match})}
        done = answered(path, setup)  # every arm's file is checked before anything runs
        todo = [q for q in questions if q["question_id"] not in done]
        log.info("%s: %d of %d questions already answered", path, len(questions) - len(todo), len(questions))
        plans.append((arm, model_id, path, setup, todo))
    for arm, model_id, path, setup, todo in plans:
        if todo:
            _answer(arm, tok, todo, cfg, opts, job, model_id, path, setup)
    return [path for _, _, path, _, _ in plans]


def _answer(arm: Arm, tok: Any, questions: list[dict[str, Any]], cfg: GenerationConfig, opts: RunOptions,
            job: AnswerJob, model_id: str, path: Path, setup: dict[str, Any]) -> None:
    warm_up(arm, tok, questions[0], cfg, opts.conv_template)
    with JsonlAppender(path) as out:
        for q in tqdm(questions, desc=model_id, unit="q"):
            temperature = question_temperature(q["category"], opts.temperature, job.fastchat_temperatures)
            records, texts = run_question(arm, tok, q, cfg.with_(temperature=temperature), opts.conv_template,
                                          job.turns)
            out.append(answer_record(q, model_id, records, texts, setup))  # one fsync'd line per question


def question_temperature(category: str, default: float, fastchat: bool) -> float:
    return FASTCHAT_TEMPERATURES.get(category, default) if fastchat else default


def answer_record(question: dict[str, Any], model_id: str, records: Sequence[Record], texts: Sequence[str],
                  setup: dict[str, Any]) -> dict[str, Any]:
    """One FastChat ``model_answer`` line (plus ``category`` and ``setup``)."""
    choice = {"index": 0, "turns": list(texts), "new_tokens": [r.new_tokens for r in records],
              "wall_time": [r.wall_time_s for r in records], "steps": [r.steps for r in records]}
    return {"question_id": question["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "category": question["category"], "choices": [choice], "setup": setup, "tstamp": time.time()}


def load_answers(path: Path) -> dict[Any, dict[str, Any]]:
    """question_id -> answer line of one answer file; malformed lines name ``file:line``."""
    answers = {}
    for n, row in iter_jsonl(path):
        choices = row.get("choices")
        if "question_id" not in row or not isinstance(choices, list) or not choices or "turns" not in choices[0]:
            raise ValueError(f"{path}:{n}: an answer needs 'question_id' and 'choices': [{{'turns': [...]}}]")
        answers[row["question_id"]] = row
    return answers


def answered(path: Path, setup: dict[str, Any]) -> set[Any]:
    """Question ids already in ``path``; raises if they were made with another setup."""
    answers = load_answers(path)
    want = json.loads(json.dumps(setup))  # compare as stored
    for row in answers.values():
        have = row.get("setup") or {}
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            k = diff[0]
            raise ValueError(f"{path} holds answers made with {k}={have.get(k)!r}, this run has {k}={want[k]!r}: "
                             "use another --answer-dir or --model-id, or delete the file")
    return set(answers)


def answer_records(row: dict[str, Any]) -> list[Record]:
    """The timing records of one answer line (mode = model_id); lines without timings give none."""
    choice = row["choices"][0]
    if "wall_time" not in choice:
        return []
    if "steps" not in choice or "new_tokens" not in choice:
        raise ValueError(f"answer to question {row['question_id']} by {row['model_id']} has wall_time but no "
                         "new_tokens/steps: regenerate it with my_judge.answers")
    return [Record(row["question_id"], row.get("category", "general"), row["model_id"], turn, tokens, steps, wall, [])
            for turn, (tokens, steps, wall) in
            enumerate(zip(choice["new_tokens"], choice["steps"], choice["wall_time"]), 1)]


def answer_files(paths: Sequence[Path]) -> list[Path]:
    """Files as given, directories expanded to their *.jsonl (sorted)."""
    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.jsonl"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such answer file or directory")
    if not files:
        raise FileNotFoundError(f"no answer files in {', '.join(map(str, paths))}: run my_judge.answers first")
    return files


if __name__ == "__main__":
    sys.exit(main())
