#!/usr/bin/env bash
# MT-Bench evaluation end to end; every step resumes where an earlier run stopped:
#   answers (baseline + Medusa) per backend -> speed summary -> LLM judge (if configured) -> results -> plots.
#   BACKENDS        backends to evaluate              (default "torch hybrid jittor")
#   MODEL HEADS TREE DTYPE DEVICE CONV_TEMPLATE       as --model --medusa-heads --tree --dtype --device
#                   --conv-template                   (default: embedded SmolLM2, its shipped heads, fp32, auto)
#   LIMIT START     which MT-Bench questions          (default 3 from 0: minutes on a CPU; LIMIT=80 for all)
#   MAX_NEW_TOKENS  per turn                          (default 128)
#   TEMPERATURE     0 = greedy (default); FASTCHAT_TEMPS=1 for FastChat's per-category temperatures
#   OUT             results directory                 (default results/mt_bench)
#   ASSETS          plot directory                    (default $OUT/plots, next to the results;
#                                                      ASSETS=assets updates the README's committed figures)
#   Judge, only when OPENAI_API_KEY is set (any value for a local server without auth):
#   JUDGE_BASE_URL  OpenAI-compatible endpoint        (default: OpenAI)
#   JUDGE_MODEL     (default gpt-4o)   JUDGE_MODE single | pairwise-baseline | pairwise-all (default single)
#   JUDGE_BASELINE  pairwise-baseline reference       (default: the first backend's baseline answers)
#   JUDGE_PARALLEL  concurrent judge requests         (default 4)
#   JUDGE_MAX_TOKENS judgment length limit            (default 2048; small for a local CPU judge)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
BACKENDS=${BACKENDS:-torch hybrid jittor}
MODEL=${MODEL:-smollm2-135m}
OUT=${OUT:-results/mt_bench}
ASSETS=${ASSETS:-$OUT/plots}
JUDGE_MODEL=${JUDGE_MODEL:-gpt-4o}
JUDGE_MODE=${JUDGE_MODE:-single}

gen=(--model "$MODEL" --dtype "${DTYPE:-float32}" --device "${DEVICE:-auto}" --start "${START:-0}"
     --limit "${LIMIT:-3}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --temperature "${TEMPERATURE:-0}"
     --answer-dir "$OUT/model_answer")
if [ -n "${HEADS:-}" ]; then gen+=(--medusa-heads "$HEADS"); fi
if [ -n "${TREE:-}" ]; then gen+=(--tree "$TREE"); fi
if [ -n "${CONV_TEMPLATE:-}" ]; then gen+=(--conv-template "$CONV_TEMPLATE"); fi
if [ "${FASTCHAT_TEMPS:-0}" = 1 ]; then gen+=(--fastchat-temperatures); fi

for backend in $BACKENDS; do
    echo "== answers: $backend (baseline + medusa)"
    $PY -m my_judge.answers --backend "$backend" --mode both "${gen[@]}"
done

echo "== speed"
$PY -m my_judge.speed "$OUT/model_answer" --out "$OUT/speed.json"

if [ -n "${OPENAI_API_KEY:-}" ]; then
    echo "== judge: $JUDGE_MODEL ($JUDGE_MODE)"
    baseline=${JUDGE_BASELINE:-$(basename "$MODEL")-${BACKENDS%% *}-baseline}
    judge=(--answer-dir "$OUT/model_answer" --judgment-dir "$OUT/model_judgment" --mode "$JUDGE_MODE"
           --judge-model "$JUDGE_MODEL" --parallel "${JUDGE_PARALLEL:-4}" --baseline-model "$baseline"
           --max-tokens "${JUDGE_MAX_TOKENS:-2048}")
    if [ -n "${JUDGE_BASE_URL:-}" ]; then judge+=(--judge-base-url "$JUDGE_BASE_URL"); fi
    if ! $PY -m my_judge.judge "${judge[@]}"; then
        echo "judge: not every judgment finished (see above); rerun this script to retry the rest" >&2
    fi
    kind=$([ "$JUDGE_MODE" = single ] && echo single || echo pair)
    judgments="$OUT/model_judgment/${JUDGE_MODEL//\//_}_$kind.jsonl"
    if [ -f "$judgments" ]; then
        $PY -m my_judge.results "$judgments" --baseline-model "$baseline" --out "$OUT/judge_results.json"
    fi
else
    echo "== judge: skipped (OPENAI_API_KEY is not set; set it, and JUDGE_BASE_URL for a non-OpenAI endpoint," \
         "to grade the answers with $JUDGE_MODEL)"
fi

echo "== plots"
$PY -m my_judge.plots "$OUT/speed.json" --out-dir "$ASSETS" --prefix mt_bench_ --title MT-Bench
