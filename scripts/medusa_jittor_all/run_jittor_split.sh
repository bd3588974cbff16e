#!/usr/bin/env bash
# Jittor heads trained on the *Jittor* backbone's hidden states (backend "jittor", no PyTorch in the
# compute): the one recipe of scripts/training_env.sh with TRAINER=jittor, every knob documented
# there and honoured alike.  OUT defaults to $WORK/$NAME-heads-jittor-all; the trees measured are
# torch's (the heads' default) and jittor's own (TREE_BACKENDS, "" for none).  The Jittor backbone
# fills its own cache (keyed jittor/float32).  One process only; rerun to resume.
set -euo pipefail
TRAINER=jittor
source "$(dirname "$0")/../training_env.sh"
run_recipe
