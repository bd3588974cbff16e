#!/usr/bin/env bash
# Jittor Medusa heads on the PyTorch backbone's hidden states (backend "hybrid"), resumable.
# Reuses the self-distilled data and hidden-state cache of scripts/medusa/run.sh.
#   MODEL WORK DATA OUT   as in scripts/medusa/run.sh (OUT defaults to a separate jittor dir)
#   TRAIN_MODULE          medusa_jittor.train (PyTorch backbone) or medusa_jittor_all.train (Jittor backbone)
#   LAUNCH                "python" or e.g. "mpirun -np 4 python" (Jittor splits batches over MPI ranks)
set -euo pipefail
source "$(dirname "$0")/../training_env.sh"
OUT=${OUT:-$WORK/$NAME-heads-jittor}
if [ ! -f "$DATA" ]; then
    $PY -m medusa.train.distill --model "$MODEL" --out "$DATA" --limit "${CONVERSATIONS:-4000}"
fi
$LAUNCH -m "${TRAIN_MODULE:-medusa_jittor.train}" --model "$MODEL" --data "$DATA" --out "$OUT" \
    --num-heads "${NUM_HEADS:-4}" --num-layers "${NUM_LAYERS:-1}" --epochs "${EPOCHS:-2}" \
    --lr "${LR:-2e-3}" --batch-tokens "${BATCH_TOKENS:-1024}" --token-map-size "${TOKEN_MAP_SIZE:-8192}"
