#!/usr/bin/env bash
# Medusa-1 heads by self-distillation, end to end, trained in PyTorch (backend "torch"): the one
# recipe of scripts/training_env.sh with TRAINER=torch.  Knobs (all documented there): MODEL WORK
# SHAREGPT DATA CONVERSATIONS DISTILL_BATCH DISTILL_MAX_NEW DISTILL_DTYPE DEVICE OUT CACHE MAX_LENGTH
# EVAL_FRACTION NUM_HEADS NUM_LAYERS EPOCHS LR BATCH_TOKENS TOKEN_MAP_SIZE BACKBONE_DTYPE LAUNCH
# TREE_BACKENDS TREE_BUDGETS TREE_FORCE SHIP_AS.  OUT defaults to $WORK/$NAME-heads; besides torch's
# tree the jittor backend's is measured (TREE_BACKENDS= for none).  Rerun to resume; a finished run
# reruns in seconds.
set -euo pipefail
TRAINER=torch
source "$(dirname "$0")/../training_env.sh"
run_recipe
