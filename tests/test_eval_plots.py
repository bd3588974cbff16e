"""Plots are drawn from speed summaries built from a small fixture of answer files; the test reads back
what was drawn (bar heights, bar labels, groups, legend) from the figures pyplot made."""
import json
import subprocess
import sys

import pytest

from medusa.core.io import append_jsonl
from my_judge.plots import load_runs, main, plot_all
from my_judge.speed import speed_summary

CHARTS = ("tps_overall", "tps_per_category", "speedup_overall", "speedup_per_category")
# Seconds per answer of each backend and arm; question 1 (math) has 40 new tokens, question 2
# (writing) 80, so tokens/s is 40/s for math, 80/s for writing and 60/s overall.
SECONDS = {"torch": {"baseline": 4.0, "medusa": 2.5}, "hybrid": {"baseline": 5.0, "medusa": 4.0}}
DRAWN = []  # figures pyplot created while a test watched (``drawn_figures``)


def keep_figure(fig):
    DRAWN.append(fig)


@pytest.fixture
def drawn_figures():
    """The figures pyplot creates during the test (matplotlib's documented ``figure.hooks``)."""
    import matplotlib

    DRAWN.clear()
    with matplotlib.rc_context({"figure.hooks": [f"{__name__}:keep_figure"]}):
        yield DRAWN


def drawn(fig):
    """What a bar chart shows: title, x groups, bar heights per legend entry, the numbers on the bars."""
    ax = fig.axes[0]
    return {"title": ax.get_title(), "groups": [t.get_text() for t in ax.get_xticklabels()],
            "bars": {c.get_label(): [round(r.get_height(), 6) for r in c] for c in ax.containers},
            "labels": [t.get_text() for t in ax.texts]}


@pytest.fixture
def speed_file(tmp_path):
    """Two backends x {baseline, medusa} over two categories, with made-up timings."""
    files = []
    for backend, arms in SECONDS.items():
        for arm, time_s in arms.items():
            model_id = f"m-{backend}-{arm}"
            files.append(tmp_path / "answers" / f"{model_id}.jsonl")
            for qid, cat in ((1, "math"), (2, "writing")):
                append_jsonl(files[-1], {"question_id": qid, "model_id": model_id, "category": cat,
                                         "setup": {"backend": backend, "arm": arm, "model": "m", "device": "cpu"},
                                         "choices": [{"index": 0, "turns": ["x"], "new_tokens": [40 * qid],
                                                      "steps": [40 * qid if arm == "baseline" else 25 * qid],
                                                      "wall_time": [time_s]}]})
    path = tmp_path / "speed.json"
    path.write_text(json.dumps(speed_summary(files)))
    return path


def test_plots_draw_the_summary_numbers(tmp_path, speed_file, drawn_figures):
    paths = plot_all(load_runs([speed_file]), tmp_path / "assets", prefix="mt_bench_", title="MT-Bench")
    assert [p.name for p in paths] == [f"mt_bench_{c}.png" for c in CHARTS]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    tps, tps_cat, speedup, speedup_cat = (drawn(f) for f in drawn_figures)
    assert tps["title"].startswith("MT-Bench: tokens/s") and tps["groups"] == ["torch", "hybrid"]
    assert tps["bars"] == {"baseline": [15.0, 12.0], "medusa": [24.0, 15.0]}
    assert tps["labels"] == ["15.0", "12.0", "24.0", "15.0"]
    assert tps_cat["groups"] == ["math", "writing"]
    assert tps_cat["bars"] == {"torch/baseline": [10.0, 20.0], "torch/medusa": [16.0, 32.0],
                               "hybrid/baseline": [8.0, 16.0], "hybrid/medusa": [10.0, 20.0]}
    assert speedup["bars"] == {"medusa": [1.6, 1.25]} and speedup["labels"] == ["1.60", "1.25"]
    assert speedup_cat["bars"] == {"torch/medusa": [1.6, 1.6], "hybrid/medusa": [1.25, 1.25]}


def test_plots_cli_and_errors(tmp_path, speed_file):
    run = subprocess.run([sys.executable, "-m", "my_judge.plots", str(speed_file), "--out-dir", str(tmp_path / "a"),
                          "--prefix", "x_"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"x_{c}.png" for c in CHARTS)
    assert main([str(tmp_path / "missing.json")]) == 2
    with pytest.raises(ValueError, match="both backend 'torch' arm 'baseline'"):
        load_runs([speed_file, speed_file])
