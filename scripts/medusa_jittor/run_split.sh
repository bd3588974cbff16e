#!/usr/bin/env bash
# Jittor Medusa heads on the PyTorch backbone's hidden states (backend "hybrid"): the one recipe of
# scripts/training_env.sh with TRAINER=hybrid, every knob documented there and honoured alike.
# OUT defaults to $WORK/$NAME-heads-jittor; the trees measured are torch's (the heads' default) and
# hybrid's own (TREE_BACKENDS, "" for none).  Training runs in one process: the Jittor trainer
# refuses mpirun and several ranks (train on several GPUs with scripts/medusa/run.sh and
# LAUNCH="accelerate launch --num_processes N").  Rerun to resume; a finished run reruns in seconds.
set -euo pipefail
TRAINER=hybrid
source "$(dirname "$0")/../training_env.sh"
run_recipe
