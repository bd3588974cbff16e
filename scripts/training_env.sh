# Shared defaults of the training recipes (sourced, not run): every path can be overridden.
PY=${PY:-python}
MODEL=${MODEL:-smollm2-135m}
NAME=$(basename "$MODEL")
WORK=${WORK:-${JEDUSA_CACHE:-$HOME/.cache/jedusa}/work}
DATA=${DATA:-$WORK/$NAME-distill.jsonl}
LAUNCH=${LAUNCH:-$PY}
mkdir -p "$WORK"
