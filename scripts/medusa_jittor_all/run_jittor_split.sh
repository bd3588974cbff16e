#!/usr/bin/env bash
# Jittor heads trained on the *Jittor* backbone's hidden states (backend "jittor"), resumable: the
# recipe of scripts/medusa_jittor/run_split.sh with the Jittor Llama filling its own fp32 cache.
set -euo pipefail
source "$(dirname "$0")/../training_env.sh"
export OUT=${OUT:-$WORK/$NAME-heads-jittor-all} TRAIN_MODULE=medusa_jittor_all.train
exec bash "$(dirname "$0")/../medusa_jittor/run_split.sh"
