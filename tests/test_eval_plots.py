"""Plots are drawn from speed summaries built from a small fixture of answer files."""
import json
import subprocess
import sys

import pytest

from my_judge.jsonl import append_jsonl
from my_judge.plots import load_runs, main, plot_all
from my_judge.speed import speed_summary

CHARTS = ("tps_overall", "tps_per_category", "speedup_overall", "speedup_per_category")


@pytest.fixture
def speed_file(tmp_path):
    """Two backends x {baseline, medusa} over two categories, with made-up timings."""
    files = []
    for backend, scale in (("torch", 1.0), ("hybrid", 0.8)):
        for arm, time_s in (("baseline", 4.0), ("medusa", 2.5)):
            model_id = f"m-{backend}-{arm}"
            files.append(tmp_path / "answers" / f"{model_id}.jsonl")
            for qid, cat in ((1, "math"), (2, "writing")):
                append_jsonl(files[-1], {"question_id": qid, "model_id": model_id, "category": cat,
                                         "setup": {"backend": backend, "arm": arm, "model": "m", "device": "cpu"},
                                         "choices": [{"index": 0, "turns": ["x"], "new_tokens": [40 * qid],
                                                      "steps": [40 * qid if arm == "baseline" else 25 * qid],
                                                      "wall_time": [time_s * qid / scale]}]})
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(speed_summary(files)))
    return path


def test_plots_from_fixture_results(tmp_path, speed_file):
    paths = plot_all(load_runs([speed_file]), tmp_path / "assets", prefix="mt_bench_", title="MT-Bench")
    assert [p.name for p in paths] == [f"mt_bench_{c}.png" for c in CHARTS]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_plots_cli_and_errors(tmp_path, speed_file):
    run = subprocess.run([sys.executable, "-m", "my_judge.plots", str(speed_file), "--out-dir", str(tmp_path / "a"),
                          "--prefix", "x_"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"x_{c}.png" for c in CHARTS)
    assert main([str(tmp_path / "missing.json")]) == 2
    with pytest.raises(ValueError, match="both backend 'torch' arm 'baseline'"):
        load_runs([speed_file, speed_file])
