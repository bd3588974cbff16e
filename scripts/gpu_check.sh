#!/usr/bin/env bash
# GPU readiness check (issue 12): every backend x {baseline, Medusa} on a tiny random model and on
# SmolLM2 (fp16 + bf16 for torch and hybrid, fp32 for jittor), greedy equality, a 20-step training
# run, a table of tokens/s.  Under 10 minutes on one GPU.  Knobs: see scripts/gpu_check.py.
#
#   bash scripts/gpu_check.sh                      # on CUDA
#   DEVICE=cpu QUICK=1 bash scripts/gpu_check.sh   # CPU dry run: tiny model only, a few minutes
#
# Python: $PYTHON if set, else ./.venv, else a python3 that already has PyTorch and transformers (a
# GPU image), else a new ./.venv from `make install`.  The raw JSON goes under $OUT (if set) or
# results/gpu_check/; the last line printed is a JSON summary; exit status 1 = a check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then
        PYTHON=.venv/bin/python
    elif python3 -c "import torch, transformers, accelerate, safetensors" 2>/dev/null; then
        PYTHON=python3
    else
        make install
        PYTHON=.venv/bin/python
    fi
fi
# The repository's packages without `pip install -e .` (a GPU image's python3 does not have them).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" scripts/gpu_check.py "$@"
