"""Answer generation: FastChat format round trip, resume, crash-safe JSONL, speed summaries."""
import json

import pytest

from medusa.core.engine import Step
from medusa.core.stats import Record
from my_judge import answers as ans
from medusa.core.io import append_jsonl, read_jsonl
from my_judge.speed import format_speed_table, speed_summary

QUESTIONS = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
             {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
             {"question_id": 131, "category": "stem", "turns": ["Define entropy.", "Give an example."]}]


class FakeTokenizer:
    """Just enough of an HF tokenizer for encode_prompt; remembers every conversation it formatted."""

    chat_template = "fake"
    eos_token_id = 0

    def __init__(self):
        self.conversations = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.conversations.append([dict(m) for m in messages])
        return "\n".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens=False):
        return [1 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class FakeBackend:
    """Six tokens per turn: one per step for the baseline, two per step for Medusa."""

    name = "fake"

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.configs = []

    def generate(self, ids, cfg):
        self.configs.append(cfg)
        chunk = 2 if cfg.medusa else 1
        tokens = [10 + len(ids) % 5 + i for i in range(6)]
        for i in range(0, 6, chunk):
            yield Step(tuple(tokens[i:i + chunk]), chunk - 1, "length" if i + chunk >= 6 else None)

    def synchronize(self):
        pass

    def describe(self):
        return {"backend": "fake", "model": "m", "heads": "h", "tree": "t", "dtype": "float32", "device": "cpu",
                "live_counter": len(self.configs)}


def _args(tmp_path, *extra):
    return ans.build_parser().parse_args(["--model", "m", "--answer-dir", str(tmp_path), "--max-new-tokens", "6",
                                          *extra])


def test_answer_record_round_trips_in_fastchat_format(tmp_path):
    records = [Record(81, "writing", "baseline", 1, 12, 12, 0.5, []),
               Record(81, "writing", "baseline", 2, 7, 7, 0.25, [])]
    row = ans.answer_record(QUESTIONS[0], "m-torch-baseline", records, ["first", "second"], {"arm": "baseline"})
    path = tmp_path / "m-torch-baseline.jsonl"
    append_jsonl(path, row)
    back = ans.load_answers(path)[81]
    assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= back.keys()
    assert back["choices"] == [{"index": 0, "turns": ["first", "second"], "new_tokens": [12, 7],
                                "wall_time": [0.5, 0.25], "steps": [12, 7]}]
    again = ans.answer_records(back)
    assert [(r.question_id, r.category, r.mode, r.turn, r.new_tokens, r.steps, r.wall_time_s) for r in again] == \
        [(81, "writing", "m-torch-baseline", 1, 12, 12, 0.5), (81, "writing", "m-torch-baseline", 2, 7, 7, 0.25)]


def test_generate_answers_two_turns_turn_two_sees_turn_one(tmp_path):
    backend = FakeBackend()
    paths = ans.generate_answers(backend, QUESTIONS[:2], *ans.plan(_args(tmp_path)))
    assert [p.name for p in paths] == ["m-torch-baseline.jsonl", "m-torch-medusa-both.jsonl"]  # the default draft, named
    base, med = (ans.load_answers(p) for p in paths)
    assert list(base) == [81, 111] and base[81]["choices"][0]["steps"] == [6, 6]
    assert med[81]["choices"][0]["new_tokens"] == [6, 6] and med[81]["choices"][0]["steps"] == [3, 3]
    assert med[111]["setup"]["arm"] == "medusa" and "live_counter" not in med[111]["setup"]
    # turn 2's prompt holds turn 1's answer as the assistant message
    convs = [c for c in backend.tokenizer.conversations if len(c) == 3]
    turn1 = base[81]["choices"][0]["turns"][0]
    assert convs[0][1] == {"role": "assistant", "content": turn1} and convs[0][2]["content"] == "Now in French."


def test_resume_skips_answered_questions(tmp_path):
    backend = FakeBackend()
    ans.generate_answers(backend, QUESTIONS[:2], *ans.plan(_args(tmp_path, "--mode", "baseline")))
    path = tmp_path / "m-torch-baseline.jsonl"
    with path.open("a") as f:
        f.write('{"question_id": 131, "answer_id": "x", "mod')  # a crash in the middle of a write
    calls = len(backend.configs)
    ans.generate_answers(backend, QUESTIONS, *ans.plan(_args(tmp_path, "--mode", "baseline")))
    assert len(backend.configs) - calls == 1 + 2  # warm-up + the two turns of question 131 only
    rows = read_jsonl(path)
    assert [r["question_id"] for r in rows] == [81, 111, 131]
    assert path.read_text().count("\n") == 3


def test_resume_refuses_another_setup_before_generating(tmp_path):
    ans.generate_answers(FakeBackend(), QUESTIONS[:1], *ans.plan(_args(tmp_path, "--mode", "medusa")))
    backend = FakeBackend()
    with pytest.raises(ValueError, match="max_new_tokens=6, this run has max_new_tokens=9"):
        ans.generate_answers(backend, QUESTIONS, *ans.plan(_args(tmp_path, "--mode", "both", "--max-new-tokens", "9")))
    assert backend.configs == [] and not (tmp_path / "m-torch-baseline.jsonl").exists()


def test_fastchat_temperatures_per_category(tmp_path):
    backend = FakeBackend()
    ans.generate_answers(backend, QUESTIONS, *ans.plan(_args(tmp_path, "--mode", "baseline", "--fastchat-temperatures",
                                                   "--temperature", "0.3", "--turns", "1")))
    assert [c.temperature for c in backend.configs[1:]] == [0.7, 0.0, 0.1]  # after the warm-up
    assert ans.question_temperature("gsm8k", 0.3, True) == 0.3
    assert ans.question_temperature("writing", 0.3, False) == 0.3


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": 1, "choices": [{"turns": ["x"]}]}\n{broken\n{"question_id": 2}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not valid JSON"):
        ans.load_answers(path)
    path.write_text('{"question_id": 1, "choices": []}\n')
    with pytest.raises(ValueError, match=r"a\.jsonl:1: an answer needs"):
        ans.load_answers(path)


def test_append_ends_a_complete_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}')
    append_jsonl(path, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]


def _timed(model_id, backend, arm, rows):
    """An answer file's rows from (question_id, category, new_tokens, steps, wall_time) per one-turn answer."""
    return [{"question_id": q, "model_id": model_id, "category": c, "setup": {"backend": backend, "arm": arm},
             "choices": [{"index": 0, "turns": ["x"], "new_tokens": [n], "steps": [s], "wall_time": [t]}]}
            for q, c, n, s, t in rows]


def test_speed_summary_numbers(tmp_path):
    files = []
    for model_id, arm, rows in (("m-torch-baseline", "baseline", [(1, "math", 60, 60, 6.0), (2, "stem", 40, 40, 4.0)]),
                                ("m-torch-medusa", "medusa", [(1, "math", 60, 20, 2.0), (2, "stem", 40, 20, 4.0)])):
        files.append(tmp_path / f"{model_id}.jsonl")
        for row in _timed(model_id, "torch", arm, rows):
            append_jsonl(files[-1], row)
    result = speed_summary(files)
    base, med = result["runs"]["m-torch-baseline"], result["runs"]["m-torch-medusa"]
    assert base["tokens_per_second"] == pytest.approx(10.0) and base["speedup"] == pytest.approx(1.0)
    assert med["tokens_per_second"] == pytest.approx(100 / 6) and med["mean_accept_length"] == pytest.approx(2.5)
    assert med["reference"] == "m-torch-baseline" and med["speedup"] == pytest.approx(100 / 6 / 10)
    assert med["speedup_per_category"] == pytest.approx({"math": 3.0, "stem": 1.0})
    assert med["per_category"]["math"]["mean_accept_length"] == pytest.approx(3.0)
    table = format_speed_table(result)
    assert "m-torch-medusa" in table and "1.67x" in table
    named = speed_summary(files, baseline="m-torch-medusa")
    assert named["runs"]["m-torch-baseline"]["speedup"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        speed_summary(files, baseline="nope")


def test_speed_cli_writes_json(tmp_path, capsys):
    from my_judge.speed import main

    for row in _timed("m-torch-baseline", "torch", "baseline", [(1, "math", 10, 10, 1.0)]):
        append_jsonl(tmp_path / "answers" / "m-torch-baseline.jsonl", row)
    assert main([str(tmp_path / "answers"), "--out", str(tmp_path / "speed.json")]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["m-torch-baseline"]["tokens_per_second"] == pytest.approx(10.0)
    assert json.loads((tmp_path / "speed.json").read_text())["runs"]["m-torch-baseline"]["questions"] == 1
    assert main([str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_real_model_answers_both_arms(tmp_path, smol_backend):
    questions = [{"question_id": 1, "category": "math", "turns": ["What is 7 + 5?", "Now double it."]},
                 {"question_id": 2, "category": "writing", "turns": ["Name a color.", "Another one?"]}]
    paths = ans.generate_answers(smol_backend, questions, *ans.plan(_args(tmp_path, "--max-new-tokens", "16")))
    base, med = (ans.load_answers(p) for p in paths)
    for qid in (1, 2):
        b, m = base[qid]["choices"][0], med[qid]["choices"][0]
        assert len(b["turns"]) == 2 and all(0 < n <= 16 for n in b["new_tokens"])
        assert b["steps"] == b["new_tokens"] and all(s <= n for s, n in zip(m["steps"], m["new_tokens"]))
        assert m["turns"] == b["turns"]  # greedy Medusa emits the baseline's tokens
    assert base[1]["setup"]["device"] == "cpu" and med[1]["setup"]["arm"] == "medusa"


def _answers_process(model, questions, answer_dir):
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, "-m", "my_judge.answers", "--model", str(model), "--medusa-heads", "fresh",
           "--questions", str(questions), "--answer-dir", str(answer_dir), "--mode", "baseline",
           "--max-new-tokens", "24", "--device", "cpu"]
    env = dict(__import__("os").environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, smol_dir):
    """Answers resume after kill -9 at any point: nothing lost, nothing duplicated, same answers."""
    import signal
    import time

    from .conftest import make_hf_model

    model = tmp_path / "tiny"
    make_hf_model(model, tokenizer_from=smol_dir, vocab_size=49152)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "writing", "turns": [f"Say {i} {w}."]})
                                 + "\n" for i, w in enumerate(["hi", "yes", "no", "up", "down", "left", "right", "red"])))
    whole = _answers_process(model, questions, tmp_path / "whole")
    assert whole.wait() == 0, whole.stderr.read().decode()
    killed = _answers_process(model, questions, tmp_path / "killed")
    out = tmp_path / "killed" / "tiny-torch-baseline.jsonl"
    while killed.poll() is None and not (out.exists() and out.read_bytes().count(b"\n") >= 2):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before the kill: nothing was interrupted"
    assert 2 <= len(read_jsonl(out)) < 8
    rerun = _answers_process(model, questions, tmp_path / "killed")
    assert rerun.wait() == 0, rerun.stderr.read().decode()
    got = {r["question_id"]: r["choices"][0]["turns"] for r in read_jsonl(out)}
    want = {r["question_id"]: r["choices"][0]["turns"]
            for r in read_jsonl(tmp_path / "whole" / "tiny-torch-baseline.jsonl")}
    assert len(read_jsonl(out)) == 8 and got == want


@pytest.mark.parametrize("flags", [["--turns", "0"], ["--limit", "0"], ["--start", "-5"]])
def test_counts_out_of_range_are_refused(tmp_path, flags):
    """--turns 0 used to append an empty answer for every question, then refuse the corrected rerun."""
    with pytest.raises(SystemExit):
        _args(tmp_path, *flags)


def test_each_draft_source_answers_into_its_own_file(tmp_path):
    opts, job = ans.plan(_args(tmp_path, "--mode", "medusa", "--draft", "both"))
    paths = ans.generate_answers(FakeBackend(), QUESTIONS[:1], opts, job)
    assert [p.name for p in paths] == ["m-torch-medusa-both.jsonl"]
    assert read_jsonl(paths[0])[0]["setup"]["draft"] == "both"
