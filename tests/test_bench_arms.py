"""bench_speed's arms and report: the category x arm table, prefill/decode split, output agreement.

A tiny random Llama with SmolLM2's tokenizer and fresh heads stands in for a real model (its
outputs are meaningless; the bench's bookkeeping is what is tested).  No timing is asserted, only
that the times add up and every rate is the quotient it claims to be.
"""
import json
import logging

import pytest

from medusa.core.backends import BackendError
from medusa.core.options import RunOptions
from medusa.core.prompts import encode_prompt
from my_judge import bench_speed
from my_judge.harness import Arm, backend_arm

from .conftest import make_hf_model

CATEGORIES = ["chat", "math", "factual_qa", "translation", "rag", "summarization"]
ARMS = ["baseline", "heads", "ngram", "both", "hf", "hf_lookup"]
QUESTIONS = [{"question_id": "c1", "category": "chat", "turns": ["Say hi.", "Say it again, louder."]},
             {"question_id": "m1", "category": "math", "turns": ["What is 2 + 3? Think step by step."]},
             {"question_id": "m2", "category": "math", "turns": ["Left out by --per-category 1."]},
             {"question_id": "q1", "category": "factual_qa", "turns": ["What is the capital of France?"]},
             {"question_id": "t1", "category": "translation", "turns": ["Translate into French: the cat sleeps."]},
             {"question_id": "r1", "category": "rag", "turns": ["The sea is blue. " * 60 + "What colour is the sea?"]},
             {"question_id": "s1", "category": "summarization", "turns": ["Summarize: " + "the tide rises. " * 60]}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    path = tmp_path_factory.mktemp("tiny-smol-tokenizer")
    make_hf_model(path, tokenizer_from=smol_dir, vocab_size=49152)
    return path


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("questions") / "mix.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def run_bench(capsys, *argv):
    """(exit status, the --out JSON, the printed text, the last line's JSON)."""
    out = argv[argv.index("--out") + 1]
    code = bench_speed.main([str(a) for a in argv])
    printed = capsys.readouterr().out
    return code, json.loads(out.read_text()), printed, json.loads(printed.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def all_arms(tiny, questions_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = ["--model", tiny, "--medusa-heads", "fresh", "--device", "cpu", "--questions", questions_file,
            "--per-category", 1, "--max-new-tokens", 6, "--arms", "baseline,heads,ngram,both,hf,hf-lookup",
            "--out", out]
    code = bench_speed.main([str(a) for a in argv])
    return code, json.loads(out.read_text())


def test_table_has_every_category_and_arm(all_arms):
    code, result = all_arms
    assert code == 0 and not result["skipped_arms"]
    cells = [(r["category"], r["arm"]) for r in result["table"]]
    assert cells == [(c, a) for c in CATEGORIES + ["all"] for a in ARMS]
    assert "m2" not in {r["question_id"] for r in result["records"]}  # --per-category 1
    for row in result["table"]:
        assert row["speedup"] is None if row["arm"] == "baseline" else row["speedup"] > 0
        assert row["tokens_per_second"] == pytest.approx(row["new_tokens"] / row["wall_s"])
        assert row["tau"] >= 1


def test_arms_take_turns_on_each_question(all_arms):
    """A machine's speed drifts over minutes: each question is run by every arm before the next."""
    _, result = all_arms
    order = [(r["question_id"], r["mode"]) for r in result["records"] if r["turn"] == 1]
    asked = [q["question_id"] for q in QUESTIONS if q["question_id"] != "m2"]
    assert order == [(q, arm) for q in asked for arm in ARMS]


def test_prefill_and_decode_add_up_to_the_wall_time(all_arms, tiny):
    from transformers import AutoTokenizer

    _, result = all_arms
    tok = AutoTokenizer.from_pretrained(tiny)
    prompts = {(q["question_id"], 1): q["turns"][0] for q in QUESTIONS}
    for rec in result["records"]:
        assert rec["prefill_s"] > 0 and rec["decode_s"] >= 0
        assert rec["prefill_s"] + rec["decode_s"] == pytest.approx(rec["wall_time_s"], rel=1e-9, abs=1e-9)
        assert 1 <= rec["first_tokens"] <= rec["new_tokens"]
        if (rec["question_id"], rec["turn"]) in prompts:
            text = prompts[(rec["question_id"], rec["turn"])]
            assert rec["prompt_tokens"] == len(encode_prompt(tok, [{"role": "user", "content": text}]))
    for row in result["table"]:
        recs = [r for r in result["records"] if r["mode"] == row["arm"] and row["category"] in ("all", r["category"])]
        assert row["prefill_s"] == pytest.approx(sum(r["prefill_s"] for r in recs))
        assert row["prefill_s"] + row["decode_s"] == pytest.approx(row["wall_s"])
        prompt_tokens = sum(r["prompt_tokens"] for r in recs)
        assert row["prefill_tokens_per_second"] == pytest.approx(prompt_tokens / row["prefill_s"])
        decode_tokens = sum(r["new_tokens"] - r["first_tokens"] for r in recs)
        assert row["decode_tokens"] == decode_tokens
        if row["decode_s"]:
            assert row["decode_tokens_per_second"] == pytest.approx(decode_tokens / row["decode_s"])


def test_every_arm_is_compared_with_the_baseline_and_sources_are_counted(all_arms):
    _, result = all_arms
    turns = sum(1 for r in result["records"] if r["mode"] == "baseline")
    assert set(result["agreement"]) == set(ARMS) - {"baseline"}
    for arm, a in result["agreement"].items():
        assert a["compared"] == turns and a["share_identical"] == a["identical"] / turns
        assert len(a["divergences"]) == turns - a["identical"]
        if not arm.startswith("hf"):  # greedy fp32: our draft arms are lossless (HF's kernels may break ties apart)
            assert a["identical"] == turns and a["divergences"] == []
    assert result["outputs_identical"] is True
    for rec in result["records"]:
        if not rec["mode"].startswith("hf"):
            assert sum(rec["sources"].values()) == rec["new_tokens"]
            assert set(rec["sources"]) <= {"bonus", "heads", "ngram"}
    all_rows = {r["arm"]: r for r in result["table"] if r["category"] == "all"}
    assert all_rows["ngram"]["tokens_by_source"].get("heads", 0) == 0  # n-gram only: the heads draft nothing


def _diverging(arm: Arm, position: int) -> Arm:
    """``arm`` with its output token at ``position`` changed, as a lossy draft source would."""
    def generate(ids, cfg):
        out = arm.generate(ids, cfg)
        changed = list(out.ids)
        changed[min(position, len(changed) - 1)] += 1
        return out._replace(ids=changed)

    return Arm("lossy", generate, arm.synchronize, True)


def test_a_mismatching_arm_is_reported_with_its_first_divergence(tiny, capsys):
    opts = RunOptions(model=str(tiny), heads="fresh", device="cpu", max_new_tokens=6)
    backend = opts.load()
    plan = bench_speed.BenchPlan(arms=("baseline", "heads"), turns=1)
    questions = [q for q in QUESTIONS if q["question_id"] in ("q1", "t1")]
    result = bench_speed.bench(opts, plan, questions, backend, [_diverging(backend_arm(backend, medusa=False), 2)])
    printed = capsys.readouterr().out
    lossy = result["agreement"]["lossy"]
    assert (lossy["compared"], lossy["identical"]) == (2, 0)
    assert [(d["question_id"], d["turn"], d["position"]) for d in lossy["divergences"]] == [("q1", 1, 2), ("t1", 1, 2)]
    assert result["agreement"]["heads"]["identical"] == 2 and result["outputs_identical"] is False
    assert ("lossy vs baseline (float32, greedy): 0/2 outputs identical; "
            "first divergence: q1 turn 1 at token 2, t1 turn 1 at token 2") in printed
    assert json.loads(printed.strip().splitlines()[-1])["agreement"]["lossy"] == {"reference": "baseline", "identical": 0,
                                                                                   "compared": 2, "share_identical": 0.0}
    assert [r["identical"] for r in result["table"] if r["arm"] == "lossy"] == [0, 0, 0]


def test_bf16_reports_agreement_with_the_bf16_baseline(tiny, questions_file, tmp_path, capsys):
    code, result, printed, last = run_bench(capsys, "--model", tiny, "--medusa-heads", "fresh", "--device", "cpu",
                                            "--dtype", "bfloat16", "--questions", questions_file, "--limit", 2,
                                            "--turns", 1, "--max-new-tokens", 4, "--arms", "baseline,heads",
                                            "--out", tmp_path / "b.json")
    assert code == 0 and last["dtype"] == "bfloat16" and result["setup"]["dtype"] == "bfloat16"
    heads = last["agreement"]["heads"]
    assert heads["compared"] == 2 and heads["share_identical"] == heads["identical"] / 2
    assert f"heads vs baseline (bfloat16, greedy): {heads['identical']}/2 outputs identical" in printed


def test_an_engine_without_draft_sources_skips_the_ngram_arms(tiny, questions_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_speed, "ENGINE_DRAFTS", False)
    code, result, printed, last = run_bench(capsys, "--model", tiny, "--medusa-heads", "fresh", "--device", "cpu",
                                            "--questions", questions_file, "--limit", 1, "--turns", 1,
                                            "--max-new-tokens", 3, "--arms", "baseline,heads,ngram,both",
                                            "--out", tmp_path / "b.json")
    assert code == 0 and {r["mode"] for r in result["records"]} == {"baseline", "heads"}
    assert set(last["skipped_arms"]) == {"ngram", "both"} and "ngram: skipped (this engine has no draft" in printed


def test_a_backend_refusing_a_draft_source_skips_that_arm(tiny, caplog, capsys):
    opts = RunOptions(model=str(tiny), heads="fresh", device="cpu", max_new_tokens=3)
    backend = opts.load()

    def refuse(ids, cfg):
        raise BackendError("backend 'x' has no n-gram drafts")

    refusing = Arm("ngram", refuse, backend.synchronize, True)
    with caplog.at_level(logging.WARNING):
        result = bench_speed.bench(opts, bench_speed.BenchPlan(arms=("baseline",)), QUESTIONS[3:4], backend, [refusing])
    assert result["skipped_arms"] == {"ngram": "backend 'x' has no n-gram drafts"}
    assert "arm ngram skipped: backend 'x' has no n-gram drafts" in caplog.text
    assert {r["mode"] for r in result["records"]} == {"baseline"}


def test_arms_and_modes_parse():
    parse = bench_speed.build_parser().parse_args
    assert bench_speed.BenchPlan.from_args(parse(["--arms", "baseline, ngram,hf-lookup"])).arm_names == \
        ("baseline", "ngram", "hf_lookup")
    assert bench_speed.BenchPlan.from_args(parse([])).arm_names == ("baseline", "medusa")  # the old default
    assert bench_speed.BenchPlan.from_args(parse(["--mode", "all"])).arm_names == ("baseline", "medusa", "hf",
                                                                                    "hf_lookup")
    for bad in (["--arms", "baseline,eagle"], ["--arms", ","], ["--mode", "all", "--arms", "baseline"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_first_divergence():
    assert bench_speed.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench_speed.first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert bench_speed.first_divergence([1, 2], [1, 2, 3]) == 2
    assert bench_speed.first_divergence([1, 2, 3, 4], [1, 2, 3]) == 3


def _record(mode, ids, qid="q1"):
    from medusa.core.stats import Record
    return Record(qid, "chat", mode, 1, len(ids), len(ids), 1.0, ids)


def test_another_backends_arms_are_checked_against_that_backends_baseline():
    """Frameworks may round apart (jittor:baseline != baseline); losslessness is within one backend."""
    records = [_record("baseline", [1, 2, 3]), _record("both", [1, 2, 3]),
               _record("jittor:baseline", [1, 2, 4]), _record("jittor:both", [1, 2, 4])]
    agreement = bench_speed.compare_outputs(records)
    assert agreement["both"]["reference"] == "baseline" and agreement["both"]["identical"] == 1
    assert agreement["jittor:both"]["reference"] == "jittor:baseline" and agreement["jittor:both"]["identical"] == 1
    assert agreement["jittor:baseline"]["reference"] == "baseline"
    assert agreement["jittor:baseline"]["divergences"][0]["position"] == 2
    rows = {r["arm"]: r for r in bench_speed.category_table(records) if r["category"] == "all"}
    assert rows["jittor:both"]["identical"] == 1 and rows["jittor:baseline"]["identical"] == 0
    assert rows["jittor:both"]["speedup"] == pytest.approx(1.0)  # against the first backend's baseline
    result = bench_speed._result(records, {}, {}, True, {})
    assert result["outputs_identical"] is True
    records.append(_record("jittor:heads", [1, 9, 9]))
    assert bench_speed._result(records, {}, {}, True, {})["outputs_identical"] is False


def test_compare_backends_runs_their_arms_in_the_same_turns(tiny, questions_file, tmp_path, capsys):
    from .conftest import import_jittor_or_skip

    import_jittor_or_skip()
    out = tmp_path / "bench.json"
    code, result, printed, last = run_bench(
        capsys, "--model", tiny, "--medusa-heads", "fresh", "--device", "cpu", "--questions", questions_file,
        "--limit", 2, "--max-new-tokens", 6, "--turns", 1, "--arms", "baseline,both,hf",
        "--compare-backends", "jittor", "--out", out)
    assert code == 0
    order = [(r["question_id"], r["mode"]) for r in result["records"]]
    arms = ["baseline", "both", "hf", "jittor:baseline", "jittor:both"]  # no second HF arm
    assert order == [(q, arm) for q in ("c1", "m1") for arm in arms]
    assert result["agreement"]["jittor:both"] == {**result["agreement"]["jittor:both"], "reference": "jittor:baseline",
                                                  "identical": 2, "compared": 2}
    assert "jittor:both vs jittor:baseline (float32, greedy): 2/2 outputs identical" in printed
    assert last["summary"]["jittor:both"]["speedup"] > 0
    assert last["agreement"]["jittor:both"]["reference"] == "jittor:baseline"
    assert result["setup"]["compared_backends"]["jittor"]["backend"] == "jittor"


def test_compare_backends_refuses_the_backend_already_run(tiny, questions_file, tmp_path, caplog):
    out = tmp_path / "bench.json"
    argv = ["--model", tiny, "--medusa-heads", "fresh", "--device", "cpu", "--questions", questions_file,
            "--limit", 1, "--max-new-tokens", 2, "--compare-backends", "torch", "--out", out]
    with caplog.at_level(logging.ERROR):
        assert bench_speed.main([str(a) for a in argv]) == 2
    assert caplog.text.count("--compare-backends torch: that is --backend already") == 1 and not out.exists()
    with pytest.raises(SystemExit):
        bench_speed.main(["--compare-backends", "tensorflow"])
