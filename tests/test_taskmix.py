"""The six-category task mix: what it holds, that it is the same every run, and how tools select it.

Built from the installed data packages (MT-Bench, GSM8K, ShareGPT) and our prompt file, with
SmolLM2's tokenizer measuring the long prompts.
"""
import json
from pathlib import Path

import pytest

from my_judge import questions as questions_module
from my_judge import taskmix
from my_judge.questions import load_questions


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="module")
def mix(smol_tokenizer):
    return taskmix.build(smol_tokenizer)


def tokens(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_six_categories_of_four_to_eight_questions(mix):
    per_category = {c: [q for q in mix if q["category"] == c] for c in taskmix.CATEGORIES}
    assert set(q["category"] for q in mix) == set(taskmix.CATEGORIES) and len(taskmix.CATEGORIES) == 6
    assert all(4 <= len(qs) <= 8 for qs in per_category.values()), {c: len(qs) for c, qs in per_category.items()}
    assert len({q["question_id"] for q in mix}) == len(mix)
    assert all(len(q["turns"]) == 2 for q in per_category["chat"])  # multi-turn
    assert all(q["reference"] for q in per_category["math"])  # GSM8K's worked solution, for scoring


def test_long_categories_hold_500_to_1500_token_prompts(mix, smol_tokenizer):
    for q in mix:
        if q["category"] in ("rag", "summarization"):
            assert 500 <= tokens(smol_tokenizer, q["turns"][0]) <= 1500, q["question_id"]
            assert q["source"].startswith("sharegpt:")


def test_sources_are_the_offline_packages_and_our_file(mix):
    sources = {c: {q["source"].split(":")[0] for q in mix if q["category"] == c} for c in taskmix.CATEGORIES}
    assert sources["chat"] == {"mtbench"} and sources["math"] == {"gsm8k"} and sources["factual_qa"] == {"own"}
    assert "sharegpt" in sources["translation"] and sources["rag"] == sources["summarization"] == {"sharegpt"}


def test_the_cli_writes_the_same_mix_again_in_the_questions_format(mix, tmp_path):
    out = tmp_path / "mix.jsonl"
    assert taskmix.main(["--out", str(out)]) == 0
    assert load_questions(out) == json.loads(json.dumps(mix))  # a second, independent build: deterministic


def test_questions_taskmix_builds_the_mix_unless_a_file_has_that_name(monkeypatch, tmp_path):
    monkeypatch.setattr(taskmix, "build", lambda: [{"question_id": "x", "category": "qa", "turns": ["hi"]}])
    monkeypatch.chdir(tmp_path)
    assert load_questions(Path("taskmix")) == [{"question_id": "x", "category": "qa", "turns": ["hi"]}]
    Path("taskmix").write_text(json.dumps({"question_id": 1, "turns": ["from the file"]}) + "\n")
    assert load_questions(Path("taskmix"))[0]["turns"] == ["from the file"]
    assert "taskmix" in questions_module.QUESTION_SETS


def test_per_category_keeps_the_first_n_of_each_category_in_order(tmp_path):
    path = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": c, "turns": ["t"]} for i, c in enumerate("aabbbca")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q["question_id"] for q in load_questions(path, per_category=1)] == [0, 2, 5]
    assert [q["question_id"] for q in load_questions(path, per_category=2, limit=3)] == [0, 1, 2]
