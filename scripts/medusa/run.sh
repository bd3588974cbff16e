#!/usr/bin/env bash
# Medusa-1 heads by self-distillation, end to end; every step resumes where an earlier run stopped.
#   MODEL          base model: short name or HF dir           (default smollm2-135m)
#   WORK           where data, hidden states and heads go     (default $JEDUSA_CACHE/work or ~/.cache/jedusa/work)
#   CONVERSATIONS  self-distilled conversations to generate   (default 4000, ~0.8M tokens for SmolLM2)
#   NUM_HEADS NUM_LAYERS EPOCHS LR BATCH_TOKENS               head shape and schedule
#   LAUNCH         how training starts: "python" or e.g. "accelerate launch --num_processes 8"
#   TOKEN_MAP_SIZE proposal vocabulary the heads train over and propose from (default 8192; 0 = full)
#   TREE_BACKENDS  besides torch, backends to measure a tree for (default jittor; "" for none)
#   SHIP_AS        if set, copy the result into medusa/shipped/$SHIP_AS (the package default for that model)
set -euo pipefail
source "$(dirname "$0")/../training_env.sh"
OUT=${OUT:-$WORK/$NAME-heads}

$PY -m medusa.train.distill --model "$MODEL" --out "$DATA" --limit "${CONVERSATIONS:-4000}" \
    --batch-size "${DISTILL_BATCH:-32}" --max-new-tokens "${DISTILL_MAX_NEW:-256}"
$LAUNCH -m medusa.train --model "$MODEL" --data "$DATA" --out "$OUT" \
    --num-heads "${NUM_HEADS:-4}" --num-layers "${NUM_LAYERS:-1}" --epochs "${EPOCHS:-2}" \
    --lr "${LR:-2e-3}" --batch-tokens "${BATCH_TOKENS:-1024}" --token-map-size "${TOKEN_MAP_SIZE:-8192}"
$PY -m medusa.train.tree_search --medusa-heads "$OUT" --model "$MODEL" --plot "$OUT/tree.png"
for backend in ${TREE_BACKENDS:-jittor}; do   # backends whose own step latency gets its own tree
    $PY -m medusa.train.tree_search --medusa-heads "$OUT" --model "$MODEL" --backend "$backend"
done
if [ -n "${SHIP_AS:-}" ]; then
    $PY -m medusa.train.ship --medusa-heads "$OUT" --name "$SHIP_AS"
fi
