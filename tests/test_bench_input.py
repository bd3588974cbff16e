"""bench_speed on bad input: one error line naming the file (and line), exit status 2, no traceback.

Question files are checked before any model loads; a question longer than ``--max-len`` is refused
once the tokenizer is known, and one that fits is measured.  A tiny random Llama with SmolLM2's
tokenizer stands in for a real model.
"""
import json
import logging

import pytest

from my_judge import bench_speed
from my_judge.harness import run_config, run_options

from .conftest import make_hf_model

QUESTION = {"question_id": 1, "category": "writing", "turns": ["Say hi."]}


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smol_dir):
    path = tmp_path_factory.mktemp("tiny-smol-tokenizer")
    make_hf_model(path, tokenizer_from=smol_dir, vocab_size=49152)
    return path


def run_bench(caplog, *argv):
    """bench_speed.main's exit status and the error lines it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = bench_speed.main([str(a) for a in argv])
    return code, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


BAD_FILES = {
    "empty": (b"", "no questions in the file"),
    "blank lines": (b"\n\n", "no questions in the file"),
    "not JSON": (b"hello\n", ":1: not valid JSON"),
    "binary": (bytes(range(255, 127, -1)), ":1: not UTF-8"),
    "a JSON array": (json.dumps([QUESTION]).encode(), ":1: expected a JSON object"),
    "no turns on line 2": ((json.dumps(QUESTION) + '\n{"question_id": 2}\n').encode(), ":2: a question is"),
    "empty turns": (b'{"question_id": 1, "turns": []}\n', ":1: a question is"),
    "turns not text": (b'{"question_id": 1, "turns": [1, 2]}\n', ":1: a question is"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_questions_file_is_one_line_naming_it(tmp_path, caplog, case):
    data, message = BAD_FILES[case]
    path = tmp_path / "q.jsonl"
    path.write_bytes(data)
    code, errors = run_bench(caplog, "--questions", path, "--model", tmp_path / "never-loaded")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(str(path)) and message in errors[0]


def test_a_question_longer_than_max_len_is_refused(tmp_path, caplog, tiny_with_tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(dict(QUESTION, turns=["tell me about the sea " * 1000])) + "\n")
    code, errors = run_bench(caplog, "--questions", path, "--model", tiny_with_tokenizer, "--medusa-heads", "fresh",
                             "--device", "cpu")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("question 1 turn 1: the prompt is") and "longer than --max-len 2048" in errors[0]


def test_a_long_question_that_fits_is_measured(tmp_path, caplog, capsys, tiny_with_tokenizer):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(dict(QUESTION, turns=["tell me about the sea " * 200])) + "\n")
    out = tmp_path / "bench.json"
    code, errors = run_bench(caplog, "--questions", path, "--model", tiny_with_tokenizer, "--medusa-heads", "fresh",
                             "--device", "cpu", "--max-len", 1200, "--max-new-tokens", 4, "--out", out)
    assert code == 0 and not errors
    result = json.loads(out.read_text())
    assert [r["mode"] for r in result["records"]] == ["baseline", "medusa"] and result["args"]["max_len"] == 1200
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outputs_identical"] is True


def test_every_decoding_flag_reaches_the_config():
    args = bench_speed.build_parser().parse_args(["--temperature", "0.7", "--top-p", "0.9", "--acceptance", "nucleus",
                                                  "--posterior-threshold", "0.2", "--seed", "5"])
    cfg = run_config(type("Tok", (), {"eos_token_id": 2})(), run_options(args))
    assert (cfg.temperature, cfg.top_p, cfg.acceptance, cfg.posterior_threshold, cfg.seed) == (0.7, 0.9, "nucleus",
                                                                                                 0.2, 5)
    assert cfg.max_new_tokens == 256 and cfg.stop_token_ids == (2,)  # the bench's documented default


def test_baseline_flag_is_refused_not_ignored(caplog):
    code, errors = run_bench(caplog, "--baseline", "--mode", "medusa")
    assert code == 2 and errors == ["--baseline does not apply here: choose the arms with --mode baseline|medusa|both"]


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, caplog):
    """--out used to be written only after every arm had run: a directory lost the whole run."""
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(QUESTION) + "\n")
    code, errors = run_bench(caplog, "--questions", path, "--model", tmp_path / "no-model", "--out", tmp_path)
    assert code == 2 and len(errors) == 1 and "is a directory" in errors[0]


def test_devices_are_checked_in_one_line():
    from medusa.backend import pick_device

    assert pick_device("cpu") == "cpu"
    for bad, message in [("gpu", "unknown device"), ("mps", "not supported")]:
        with pytest.raises(ValueError, match=message):
            pick_device(bad)
