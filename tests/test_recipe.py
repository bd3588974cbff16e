"""Training recipes that cannot silently go wrong (issue 14), tried as a new user would, on tiny models.

- ``scripts/medusa/run.sh`` end to end with 12 conversations; its rerun recomputes nothing (every file
  under WORK keeps its bytes and mtime: same data, cache, heads, metrics and tree); a second WORK
  with other data trains on that data (its own position count) and leaves the first cache alone.
- The hidden-state cache is keyed by what it holds: the same file name with other contents is
  rebuilt, appended data only extends it, another model or backbone rebuilds it.
- The held-out split is never empty; ``--eval-only`` needs neither ``--data`` nor ``--model``.
- Tree search: a saved tree is reused for the same inputs (``--force`` measures again), and noisy
  timings still pick one tree.
- Every knob reaches every trainer, ``TREE_BACKENDS=`` turns the extra tree searches off, the Jittor
  recipes measure their own tree; bad MODEL / DATA / OUT end in one line; run plots stay out of ``assets/``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import make_hf_model
from .test_eval_plots import speed_file  # noqa: F401  (fixture)
from .test_train_distributed import tiny_training_setup

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
RECIPES = {"torch": "scripts/medusa/run.sh", "hybrid": "scripts/medusa_jittor/run_split.sh",
           "jittor": "scripts/medusa_jittor_all/run_jittor_split.sh"}


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, smol_dir) -> Path:
    """A tiny random Llama that speaks SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat")
    make_hf_model(path, vocab_size=len(AutoTokenizer.from_pretrained(smol_dir)), tokenizer_from=smol_dir)
    shutil.copy(smol_dir / "chat_template.jinja", path / "chat_template.jinja")
    return path


def sharegpt(path: Path, prompts: list[str]) -> Path:
    items = [{"id": f"{path.stem}-{i}", "conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": "."}]}
             for i, p in enumerate(prompts)]
    path.write_text(json.dumps(items))
    return path


def recipe_env(tmp_path: Path, model: Path, work: Path, source: Path, conversations: int, **knobs: str) -> dict:
    """The recipe at toy scale; JEDUSA_CACHE is shared by every WORK, as on a user's machine."""
    return dict(ENV, PY=sys.executable, MODEL=str(model), WORK=str(work), SHAREGPT=str(source),
                CONVERSATIONS=str(conversations), DISTILL_MAX_NEW="8", DISTILL_BATCH="6", DISTILL_DTYPE="float32",
                DEVICE="cpu", EPOCHS="1", BATCH_TOKENS="64", NUM_HEADS="2", MAX_LENGTH="96", TOKEN_MAP_SIZE="64",
                BACKBONE_DTYPE="float32", TREE_BACKENDS="", TREE_BUDGETS="1 2 3",
                JEDUSA_CACHE=str(tmp_path / "jedusa-cache"), **knobs)


def run_script(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / script)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900, preexec_fn=lambda: os.umask(0o022))


def files(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(f.relative_to(root)): (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(root.rglob("*"))
            if f.is_file()}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("ERROR")]


def expected_positions(model_dir: Path, data: Path, max_length: int, num_heads: int, fraction: float) -> int:
    """Oracle: trainable positions of ``data``'s training split, from the data itself (no cache).
    The split rule: an id is held out when its sha1 hashes below ``fraction``, else the lowest one."""
    from transformers import AutoTokenizer

    from medusa.train.data import load_conversations
    from medusa.train.dataset import IGNORE_INDEX, tokenize_conversation

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs, _ = load_conversations(data)
    score = {c.id: int(hashlib.sha1(c.id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for c in convs}
    held = {i for i, s in score.items() if s < fraction} or {min(score, key=score.get)}
    total = 0
    for conv in convs:
        if conv.id not in held:
            labels = np.array(tokenize_conversation(tok, conv.messages, max_length).labels)
            ahead = [labels[k + 2:] for k in range(num_heads)]  # head k predicts the token k+2 ahead
            total += sum(bool((np.array([a[t] for a in ahead if t < len(a)]) != IGNORE_INDEX).any())
                         for t in range(len(labels)))
    return total


# --- the recipe, end to end ----------------------------------------------------------------------

def test_recipe_reruns_in_place_and_trains_a_second_work_on_its_own_data(tmp_path, tiny_chat):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(16)]
    first = recipe_env(tmp_path, tiny_chat, tmp_path / "w1", sharegpt(tmp_path / "sg1.json", prompts), 12)
    run = run_script(RECIPES["torch"], first)
    assert run.returncode == 0, run.stderr[-3000:]
    heads = next((tmp_path / "w1").glob("*-heads"))
    metrics = json.loads((heads / "metrics.json").read_text())
    assert metrics["train_conversations"] + metrics["eval_conversations"] == 12 and metrics["eval_conversations"] >= 1
    assert metrics["model_fingerprint"] and metrics["data_sha256"] and metrics["eval_positions"] > 0
    assert "too noisy to trust" in run.stderr  # 12 conversations: the held-out split is tiny, and we say so
    assert json.loads((heads / "config.json").read_text())["tree"] == "tree.json"
    assert not list(heads.glob("tree-*.json"))  # TREE_BACKENDS="": no other backend's tree search
    assert "chosen tree (tree.json)" in run.stderr and not any(l.startswith("{") for l in run.stdout.splitlines())
    assert {oct(f.stat().st_mode & 0o777) for f in heads.iterdir() if f.is_file()} == {"0o644"}

    before = files(tmp_path / "w1")
    again = run_script(RECIPES["torch"], first)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(tmp_path / "w1") == before  # nothing recomputed or rewritten: data, cache, heads, metrics, tree
    assert "nothing to distil" in again.stderr and "already trained" in again.stderr
    assert "reusing" in again.stderr and "train heads" not in again.stderr

    other = sharegpt(tmp_path / "sg2.json", [f"Tell me a story about the number {i}, at length." for i in range(6)])
    second = run_script(RECIPES["torch"], recipe_env(tmp_path, tiny_chat, tmp_path / "w2", other, 6))
    assert second.returncode == 0, second.stderr[-3000:]
    metrics2 = json.loads(next((tmp_path / "w2").glob("*-heads")).joinpath("metrics.json").read_text())
    data2 = next((tmp_path / "w2").glob("*-distill.jsonl"))
    assert metrics2["train_conversations"] + metrics2["eval_conversations"] == 6
    assert metrics2["train_positions"] == expected_positions(tiny_chat, data2, 96, 2, 0.05)
    assert files(tmp_path / "w1") == before  # the first WORK's cache (and everything else there) untouched


# --- the hidden-state cache ----------------------------------------------------------------------

def test_the_cache_reuses_extends_and_rebuilds_by_what_it_holds(tmp_path):
    from medusa.train.dataset import Example
    from medusa.train.hidden_cache import build_cache, read_meta, shard_files

    computed: list[list[int]] = []

    def hidden(ids):
        computed.append(list(ids))
        return np.array(ids, np.float32)[:, None].repeat(4, 1)

    def build(examples, **key):
        computed.clear()
        build_cache(hidden, 4, examples, tmp_path, shard_size=2, key={"model": "a", **key})
        return [ex[0] for ex in computed]

    examples = [Example([i, i + 1], [i, i + 1]) for i in range(0, 50, 10)]
    assert build(examples) == [0, 10, 20, 30, 40]
    assert build(examples) == []  # the same: reused
    grown = examples + [Example([90, 91], [90, 91])]
    assert build(grown) == [90]  # appended: only the new example
    changed = grown[:3] + [Example([7, 7], [7, 7])] + grown[4:]
    assert build(changed) == [20, 7, 40, 90]  # from the shard holding the changed example on
    assert build(changed, model="b") == [0, 10, 20, 7, 40, 90]  # another model: everything
    meta = read_meta(tmp_path)
    assert meta["key"] == {"model": "b"} and sum(s["examples"] for s in meta["shards"]) == 6
    cached = np.concatenate([np.load(f)["ids"] for f in shard_files(tmp_path)])
    assert cached.tolist() == [t for ex in changed for t in ex.ids]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Heads trained by ``python -m medusa.train`` (in process) on a tiny byte-level model."""
    from medusa.train.cli import main

    root = tmp_path_factory.mktemp("trained")
    setup = tiny_training_setup(root, conversations=12)
    flags = ["--model", str(setup["model"]), "--data", str(setup["data"]), "--cache-root", str(root / "hidden"),
             "--max-length", "64", "--num-heads", "2", "--backbone-dtype", "float32", "--fp32", "--epochs", "1",
             "--batch-tokens", "32", "--lr", "1e-2"]
    metrics = main(flags + ["--out", str(root / "heads")])
    return dict(setup, root=root, flags=flags, heads=root / "heads", metrics=metrics)


def test_the_same_file_name_with_other_contents_is_rebuilt(tmp_path, monkeypatch, caplog):
    """The default cache (under JEDUSA_CACHE) of one data file, whose replies are then all changed."""
    from medusa.train.cli import main

    monkeypatch.setenv("JEDUSA_CACHE", str(tmp_path / "jedusa-cache"))
    setup = tiny_training_setup(tmp_path, conversations=8)
    flags = ["--model", str(setup["model"]), "--data", str(setup["data"]), "--max-length", "64", "--num-heads", "2",
             "--backbone-dtype", "float32", "--fp32", "--epochs", "1", "--batch-tokens", "32"]
    first = main(flags + ["--out", str(tmp_path / "heads1")])
    convs = json.loads(setup["data"].read_text())
    for conv in convs:
        conv["conversations"][1]["value"] = "OK."
    setup["data"].write_text(json.dumps(convs))  # the same file, other contents
    with caplog.at_level(logging.INFO):
        second = main(flags + ["--out", str(tmp_path / "heads2")])
    assert "rebuilding" in caplog.text
    assert second["train_positions"] == expected_positions(setup["model"], setup["data"], 64, 2, 0.05)
    assert second["train_positions"] < first["train_positions"]  # "OK." is shorter than the spelled replies


def test_small_data_always_holds_out_a_conversation():
    from medusa.train.cli import split_conversations
    from medusa.train.data import Conversation

    messages = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    ids = [f"c{i}" for i in range(40) if int(hashlib.sha1(f"c{i}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF >= 0.05]
    convs = [Conversation(i, messages) for i in ids[:12]]
    parts = split_conversations(convs, 0.05)  # 5% of 12: the hash holds none of them out
    assert len(parts["eval"]) == 1 and len(parts["train"]) == 11
    assert split_conversations(list(reversed(convs)), 0.05)["eval"] == parts["eval"]  # the same one, by its id


# --- what the heads were trained on: reruns and --eval-only --------------------------------------

def test_a_rerun_of_finished_training_rewrites_nothing(trained, caplog):
    from medusa.train.cli import main

    before = files(trained["heads"])
    with caplog.at_level(logging.INFO):
        again = main(trained["flags"] + ["--out", str(trained["heads"])])
    assert files(trained["heads"]) == before and again["train_tokens_per_second"] > 0
    assert "already trained" in caplog.text


def test_a_rerun_with_other_settings_refuses_instead_of_relabelling(trained):
    """A finished run rerun with another --lr used to write the new settings over the old heads'
    metrics without training anything (or crash with a shape mismatch for another --num-heads)."""
    from medusa.train.cli import main
    from medusa.train.trainer import TrainError

    before = files(trained["heads"])
    flags = [f if f != "1e-2" else "5e-3" for f in trained["flags"]]
    with pytest.raises(TrainError, match=r"already trained with lr=0.01 \(this run: 0.005\)"):
        main(flags + ["--out", str(trained["heads"])])
    assert files(trained["heads"]) == before


def test_eval_only_needs_no_data_and_no_model(trained, tmp_path):
    from medusa.train.cli import main
    from medusa.train.trainer import TrainError

    metrics = main(["--out", str(trained["heads"]), "--eval-only"])  # data, cache, model: the heads' own
    assert metrics["top1"] == pytest.approx(trained["metrics"]["top1"], abs=1e-6)
    assert metrics["tokens"] == trained["metrics"]["tokens"]
    bare = tmp_path / "bare"
    shutil.copytree(trained["heads"], bare)
    (bare / "metrics.json").unlink()
    with pytest.raises(TrainError, match="pass --data"):
        main(["--out", str(bare), "--eval-only"])
    record = dict(json.loads((trained["heads"] / "metrics.json").read_text()), backbone="jittor",
                  cache_dir=str(tmp_path / "gone"))
    (bare / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(TrainError, match="medusa_jittor_all.train --eval-only"):  # not a torch cache silently
        main(["--out", str(bare), "--eval-only"])


# --- tree search ---------------------------------------------------------------------------------

def test_a_saved_tree_is_reused_unless_forced(trained, monkeypatch):
    from medusa.train import tree_search

    flags = ["--medusa-heads", str(trained["heads"]), "--budgets", "1", "2", "--rounds", "1", "--repeats", "1",
             "--device", "cpu"]
    first = tree_search.main(flags)

    def no_backend(*args, **kwargs):
        raise AssertionError("the saved tree should have been reused")

    monkeypatch.setattr(tree_search, "load_backend", no_backend)
    assert tree_search.main(flags) == first
    with pytest.raises(AssertionError, match="reused"):
        tree_search.main(flags + ["--force"])


def test_noisy_timings_still_pick_one_tree():
    """A CPU's step latency (flat up to 5 nodes, then 1.5 ms per node), each timing off by up to ±5%
    with a 3x stall one time in twenty: one timing per budget lets the noise choose the tree; the
    medians of interleaved rounds, through the fitted latency model, choose the best one every time."""
    from medusa.train.tree_search import choose_tree

    acc = [[0.5, 0.15, 0.08] + [0.02] * 7, [0.3, 0.1, 0.05] + [0.02] * 7, [0.2, 0.08] + [0.02] * 8]

    def noisy(seed):
        rng = np.random.default_rng(seed)

        def latency(tree):
            true = 0.035 + 0.0015 * max(0, len(tree) - 5)
            return [true * rng.uniform(0.95, 1.05) * (3 if rng.random() < 0.05 else 1) for _ in range(8)]

        return latency

    budgets = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32)
    exact = choose_tree(acc, lambda t: 0.035 + 0.0015 * max(0, len(t) - 5), budgets)["chosen"]["nodes"]
    robust = {choose_tree(acc, noisy(seed), budgets, rounds=4)["chosen"]["nodes"] for seed in range(8)}
    single = {choose_tree(acc, lambda t, f=noisy(seed): f(t)[0], budgets, rounds=1, tie=0)["chosen"]["nodes"]
              for seed in range(8)}
    assert robust == {exact} and len(single) > 2
    row = choose_tree(acc, noisy(0), budgets, rounds=4)["chosen"]
    assert row["expected_tau"] == pytest.approx(1 + row["expected_accept_length"]) and row["samples"] == 32


# --- the recipe's wiring, errors, plots ----------------------------------------------------------

def fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A PY that records each command line instead of running it."""
    log, py = tmp_path / "calls.log", tmp_path / "fakepy"
    py.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    py.chmod(0o755)
    return py, log


@pytest.mark.parametrize("trainer", list(RECIPES))
@pytest.mark.parametrize("tree_backends", [None, ""])
def test_every_knob_reaches_every_trainer(tmp_path, trainer, tree_backends):
    py, log = fake_python(tmp_path)
    knobs = dict(PY=str(py), MODEL="m", WORK=str(tmp_path / "w"), CONVERSATIONS="12", DISTILL_BATCH="3",
                 DISTILL_MAX_NEW="5", EVAL_FRACTION="0.3", MAX_LENGTH="77", EPOCHS="9", TREE_BUDGETS="1 2",
                 TOKEN_MAP_SIZE="0", DEVICE="cpu")
    if tree_backends is not None:
        knobs["TREE_BACKENDS"] = tree_backends
    run = run_script(RECIPES[trainer], dict(ENV, **knobs))
    assert run.returncode == 0, run.stderr
    distill, train, *trees = log.read_text().splitlines()
    assert "--limit 12 --batch-size 3 --max-new-tokens 5 --device cpu" in distill
    module = {"torch": "medusa.train", "hybrid": "medusa_jittor.train", "jittor": "medusa_jittor_all.train"}[trainer]
    assert train.startswith(f"-m {module} --model m ") and f"--cache-root {tmp_path}/w/hidden" in train
    assert all(f in train for f in ("--max-length 77", "--eval-fraction 0.3", "--epochs 9", "--token-map-size 0"))
    own = {"torch": "jittor", "hybrid": "hybrid", "jittor": "jittor"}[trainer]
    backends = [t.split("--backend ")[1].split()[0] if "--backend" in t else "torch" for t in trees]
    assert backends == (["torch"] if tree_backends == "" else ["torch", own])
    assert all(t.startswith("-m medusa.train.tree_search") and "--budgets 1 2" in t for t in trees)


def test_hydra_heads_train_in_torch_into_their_own_directory(tmp_path):
    py, log = fake_python(tmp_path)
    knobs = dict(ENV, PY=str(py), MODEL="m", WORK=str(tmp_path / "w"), DEVICE="cpu", HEAD_TYPE="hydra")
    run = run_script(RECIPES["torch"], knobs)
    assert run.returncode == 0, run.stderr
    _, train, *trees = log.read_text().splitlines()
    assert "--head-type hydra" in train and f"--out {tmp_path}/w/m-heads-hydra " in train
    assert [t.split("--backend ")[1].split()[0] for t in trees[1:]] == ["jittor"]  # every backend runs them
    for trainer in ("hybrid", "jittor"):
        bad = run_script(RECIPES[trainer], knobs)
        assert bad.returncode == 2 and bad.stderr.strip().startswith("ERROR recipe: HEAD_TYPE=hydra"), bad.stderr
    bad = run_script(RECIPES["torch"], dict(knobs, HEAD_TYPE="eagle"))
    assert bad.returncode == 2 and "HEAD_TYPE=eagle" in bad.stderr


def test_bad_model_data_and_out_are_one_line(tmp_path, tiny_chat):
    source = sharegpt(tmp_path / "sg.json", ["hi"] * 3)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    base = dict(ENV, PY=sys.executable, WORK=str(tmp_path / "w"), SHAREGPT=str(source), CONVERSATIONS="2",
                DEVICE="cpu", MODEL=str(tiny_chat))
    cases = [
        (["bash", RECIPES["torch"]], dict(base, MODEL="no-such-model"), "no-such-model"),
        (["bash", RECIPES["torch"]], dict(base, OUT=str(a_file)), "is a file"),
        (["bash", RECIPES["hybrid"]], dict(base, DATA=str(tmp_path)), "is a directory"),
        ([sys.executable, "-m", "medusa.train", "--data", str(tmp_path / "missing.jsonl"), "--out",
          str(tmp_path / "h")], ENV, "missing.jsonl: no such file"),
        ([sys.executable, "-m", "medusa.train", "--data", str(source), "--out", str(a_file), "--model", str(tiny_chat)],
         ENV, "is a file"),
        ([sys.executable, "-m", "medusa.train.tree_search", "--medusa-heads", str(tmp_path)], ENV, "metrics.json"),
    ]
    for cmd, env, message in cases:
        run = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 2 and "Traceback" not in run.stderr, (cmd, run.stderr[-2000:])
        assert len(error_lines(run.stderr)) == 1 and message in error_lines(run.stderr)[0], (cmd, run.stderr)


def test_run_plots_stay_out_of_the_readme_figures(tmp_path, speed_file, monkeypatch):  # noqa: F811
    from my_judge.plots import main

    (tmp_path / "cwd" / "assets").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    assert main([str(speed_file)]) == 0
    assert not list((tmp_path / "cwd" / "assets").iterdir())
    written = list((speed_file.parent / "plots").iterdir())
    assert len(written) == 4 and {f.stat().st_mode & 0o777 for f in written} == {0o644}
    py, log = fake_python(tmp_path)
    for script in ("scripts/run_all_eval.sh", "scripts/run_gsm8k_eval.sh"):
        out = tmp_path / Path(script).stem
        run = run_script(script, dict(ENV, PY=str(py), LIMIT="2", BACKENDS="torch", OUT=str(out), OPENAI_API_KEY=""))
        assert run.returncode == 0, run.stderr
        plots = [line for line in log.read_text().splitlines() if line.startswith("-m my_judge.plots")][-1]
        assert f"--out-dir {out}/plots" in plots


def test_shipped_heads_carry_no_paths_of_the_training_machine(trained, tmp_path):
    from medusa.train.ship import ship

    dest = ship(trained["heads"], tmp_path / "shipped")
    metrics = json.loads((dest / "metrics.json").read_text())
    assert not {"data", "model_dir", "cache_dir"} & metrics.keys()
    assert metrics["data_sha256"] == trained["metrics"]["data_sha256"] and metrics["train_conversations"] > 0
    records = [f for f in dest.glob("*.json") if f.name != "config.json"]  # config names its base model, as published
    assert records and str(trained["root"]) not in "".join(f.read_text() for f in records)


def test_shipping_again_leaves_no_file_of_the_earlier_heads(trained, tmp_path):
    """A tree-BACKEND.json of earlier heads survived a new ship and was preferred by that backend."""
    from medusa.train.ship import ship

    heads = tmp_path / "heads"
    shutil.copytree(trained["heads"], heads)
    (heads / "tree-hybrid.json").write_text(json.dumps([[0], [1]]))  # a plain list of paths is a tree file too
    dest = ship(heads, tmp_path / "shipped")
    assert json.loads((dest / "tree-hybrid.json").read_text()) == [[0], [1]]
    (heads / "tree-hybrid.json").unlink()
    ship(heads, dest)
    assert not (dest / "tree-hybrid.json").exists() and (dest / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads", "shipped"]  # no staging left behind
