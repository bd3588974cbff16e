#!/usr/bin/env bash
# GSM8K evaluation end to end; every step resumes where an earlier run stopped:
#   test split -> answers (baseline + Medusa) per backend -> accuracy -> speed summary -> plots.
#   BACKENDS        backends to evaluate              (default "torch hybrid jittor")
#   MODEL HEADS TREE DTYPE DEVICE CONV_TEMPLATE       as --model --medusa-heads --tree --dtype --device
#                   --conv-template                   (default: embedded SmolLM2, its shipped heads, fp32, auto)
#   LIMIT START     which test problems               (default 3 from 0: minutes on a CPU; LIMIT=1319 for all)
#   MAX_NEW_TOKENS  per answer                        (default 256)
#   OUT             results directory                 (default results/gsm8k)
#   ASSETS          plot directory                    (default $OUT/plots, next to the results;
#                                                      ASSETS=assets updates the README's committed figures)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
BACKENDS=${BACKENDS:-torch hybrid jittor}
OUT=${OUT:-results/gsm8k}
ASSETS=${ASSETS:-$OUT/plots}

gen=(--model "${MODEL:-smollm2-135m}" --dtype "${DTYPE:-float32}" --device "${DEVICE:-auto}" --start "${START:-0}"
     --limit "${LIMIT:-3}" --max-new-tokens "${MAX_NEW_TOKENS:-256}" --temperature 0
     --questions "$OUT/question.jsonl" --answer-dir "$OUT/model_answer")
if [ -n "${HEADS:-}" ]; then gen+=(--medusa-heads "$HEADS"); fi
if [ -n "${TREE:-}" ]; then gen+=(--tree "$TREE"); fi
if [ -n "${CONV_TEMPLATE:-}" ]; then gen+=(--conv-template "$CONV_TEMPLATE"); fi

echo "== data"
$PY -m my_judge.gsm8k extract --out "$OUT/question.jsonl"

for backend in $BACKENDS; do
    echo "== answers: $backend (baseline + medusa)"
    $PY -m my_judge.answers --backend "$backend" --mode both "${gen[@]}"
done

echo "== accuracy"
$PY -m my_judge.gsm8k score "$OUT/model_answer" --questions "$OUT/question.jsonl" --out "$OUT/accuracy.json"

echo "== speed"
$PY -m my_judge.speed "$OUT/model_answer" --out "$OUT/speed.json"

echo "== plots"
$PY -m my_judge.plots "$OUT/speed.json" --out-dir "$ASSETS" --prefix gsm8k_ --title GSM8K
