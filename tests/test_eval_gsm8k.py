"""GSM8K: answer extraction on tricky texts, the packaged test split, scoring answer files."""
import json

import pytest

from my_judge import gsm8k
from medusa.core.io import append_jsonl


@pytest.mark.parametrize("text, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("The total is $1,234,567.50.", 1234567.5),
    ("It drops by 5 degrees, so the answer is -5", -5),
    ("#### -12", -12),
    ("5-3=2, so 2 apples remain", 2),
    ("3 cats, 4 dogs and 12 fish: 19 pets.", 19),
    ("The probability is .25", 0.25),
    ("She ran 3.5 km on Monday and 4 km on Tuesday.\n#### 7.5\n", 7.5),
    ("#### 1,000 dollars", 1000),
    ("#### 5 + 7 = 12", 12),
    ("Answer: 42. Done", 42),
    ("#### \nso it is 3", 3),  # nothing after ####: the last number anywhere
    ("I don't know.", None),
])
def test_extract_number(text, number):
    assert gsm8k.extract_number(text) == number


def test_is_correct_within_tolerance():
    assert gsm8k.is_correct(18.0000001, 18) and not gsm8k.is_correct(18.01, 18)
    assert not gsm8k.is_correct(None, 18)


def test_packaged_test_split():
    questions = gsm8k.read_test_split()
    assert len(questions) == 1319 and len({q["question_id"] for q in questions}) == 1319
    first = questions[0]
    assert first["category"] == "gsm8k" and first["turns"][0].startswith("Janet")
    assert gsm8k.extract_number(first["reference"][0]) == 18
    assert all(gsm8k.extract_number(q["reference"][0]) is not None for q in questions)


def test_extract_and_score_cli(tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    assert gsm8k.main(["extract", "--out", str(qfile), "--start", "1", "--limit", "3"]) == 0
    questions = [json.loads(line) for line in qfile.read_text().splitlines()]
    assert [q["question_id"] for q in questions] == [1, 2, 3]
    golds = [gsm8k.extract_number(q["reference"][0]) for q in questions]
    texts = [f"... so the answer is {golds[0]:,.0f}", f"#### {golds[1] + 1}", "no idea"]
    for q, text in zip(questions, texts):
        append_jsonl(tmp_path / "a" / "m-torch-medusa.jsonl",
                     {"question_id": q["question_id"], "model_id": "m-torch-medusa", "choices": [{"turns": [text]}]})
    out = tmp_path / "acc.json"
    assert gsm8k.main(["score", str(tmp_path / "a"), "--questions", str(qfile), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"m-torch-medusa": pytest.approx(1 / 3)}
    run = json.loads(out.read_text())["runs"]["m-torch-medusa"]
    assert (run["correct"], run["total"]) == (1, 3) and run["per_question"]["3"]["predicted"] is None


def test_score_rejects_answers_to_unknown_questions(tmp_path):
    append_jsonl(tmp_path / "m.jsonl", {"question_id": 99, "model_id": "m", "choices": [{"turns": ["1"]}]})
    with pytest.raises(ValueError, match="question 99"):
        gsm8k.score([{"question_id": 1, "reference": ["#### 1"]}], [tmp_path / "m.jsonl"])
