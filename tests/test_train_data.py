"""Training data: tolerant ShareGPT reading and resumable self-distillation."""
import json
import logging

import pytest

from medusa.core.io import read_jsonl
from medusa.train.data import load_conversations, normalise

GOOD = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
ROLES = {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hey"}]}


def test_truncated_json_array_keeps_complete_items(tmp_path):
    text = json.dumps([GOOD, dict(GOOD, id="b"), ROLES], indent=1)
    f = tmp_path / "sharegpt.json"
    f.write_text(text[: text.rindex('"hey"')])  # cut inside the third item
    convs, skipped = load_conversations(f)
    assert [c.id for c in convs] == ["a", "b"] and skipped == 1
    assert convs[0].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})


def test_jsonl_and_role_content_messages(tmp_path):
    f = tmp_path / "data.jsonl"
    f.write_text(json.dumps(GOOD) + "\n" + json.dumps(ROLES) + "\n{bad line\n")
    convs, skipped = load_conversations(f)
    assert len(convs) == 2 and skipped == 1 and convs[1].messages[0]["role"] == "system"


def test_jsonl_keeps_text_with_unicode_line_separators(tmp_path):
    """U+2028, U+2029, U+0085, form feeds are legal raw inside JSON strings (``ensure_ascii=False``,
    as distillation writes them): only a newline ends a JSONL record, so no conversation is lost."""
    odd = "line\u2028sep\u2029par\x85next\x0cfeed\x1cfile"
    rows = [dict(GOOD, id=f"c{i}", conversations=[GOOD["conversations"][0],
                                                   {"from": "gpt", "value": f"{odd} {i}"}]) for i in range(3)]
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" * (i == 1) + "\n" * (i != 1)
                         for i, r in enumerate(rows)), encoding="utf-8")
    convs, skipped = load_conversations(f)
    assert [c.id for c in convs] == ["c0", "c1", "c2"] and skipped == 0
    assert convs[2].messages[1]["content"] == f"{odd} 2"


def test_malformed_item_in_the_middle_is_counted_and_reading_goes_on(tmp_path, caplog):
    good = [json.dumps(dict(GOOD, id=f"g{i}"), indent=1) for i in range(4)]
    broken = '{"id": "bad", "conversations": [{"from": "human", "value": "a "quoted" word"}]}'
    f = tmp_path / "sharegpt.json"
    f.write_text("[\n" + ",\n".join(good[:2] + [broken] + good[2:]) + "\n]")
    with caplog.at_level(logging.INFO, logger="medusa.train.data"):
        convs, skipped = load_conversations(f)
    assert [c.id for c in convs] == ["g0", "g1", "g2", "g3"] and skipped == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 items that are not valid JSON" in warnings[0]


@pytest.mark.parametrize("turns", [
    [{"from": "gpt", "value": "starts with the model"}],
    [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
    [{"from": "human", "value": "   "}],
    [{"from": "alien", "value": "x"}],
    [],
])
def test_malformed_conversations_are_filtered(turns):
    assert normalise({"conversations": turns}, "x") is None


def test_self_distillation_resumes_after_interruption(tmp_path, smol_dir):
    from transformers import AutoTokenizer

    from medusa.llama import load_llama
    from medusa.train.data import Conversation
    from medusa.train.distill import distill

    from .conftest import make_hf_model

    tok = AutoTokenizer.from_pretrained(smol_dir)
    make_hf_model(tmp_path / "model", vocab_size=tok.vocab_size + len(tok.get_added_vocab()))
    model = load_llama(tmp_path / "model")
    convs = [Conversation(f"c{i}", ({"role": "user", "content": f"question {i}"},)) for i in range(5)]
    out = tmp_path / "distill.jsonl"
    assert distill(model, tok, convs, out, batch_size=2, max_new_tokens=4, limit=3) == 3
    with out.open("a") as f:
        f.write('{"id": "half-writ')  # a crash in the middle of a write
    assert distill(model, tok, convs, out, batch_size=2, max_new_tokens=4) == 2
    records = read_jsonl(out)
    assert sorted(r["id"] for r in records) == [f"c{i}" for i in range(5)]
    assert out.read_text().endswith("\n") and all(r["messages"][-1]["role"] == "assistant" for r in records)
