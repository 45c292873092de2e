#!/usr/bin/env bash
# Runs the study "AdaLoRA vs LoRA at tuned learning rates, scale and training length controlled"
# (all-MiniLM-L6-v2 on Rotten Tomatoes, Reuters R8 and R52) in three stages:
#   analysis/studies/minilm_v2/run.sh tune ROOT    # LR grid on validation, then analysis.tune -> ROOT/tune/tuned.json
#   analysis/studies/minilm_v2/run.sh main ROOT    # 1 epoch x 3 budgets x 3 methods, peft, ablations
#   analysis/studies/minilm_v2/run.sh long ROOT    # 3 epochs at budget 2, LoRA on the ranks AdaLoRA found
# then: python analysis/studies/minilm_v2/summarize.py build ROOT/main ROOT/long --tuned ROOT/tune/tuned.json \
#           --out analysis/studies/minilm_v2 && python analysis/studies/minilm_v2/summarize.py report --out analysis/studies/minilm_v2
# N_JOBS parallel runs (one CPU thread each); a stage skips runs that already completed.
set -euo pipefail
STAGE=$1; ROOT=$2
N=${N_JOBS:-16}
PY=${PYTHON:-python3}
HERE=$(dirname "$0")
case $STAGE in
  tune)
    $PY -m experiments.train -m experiment=v2_tune hydra/launcher=joblib hydra.launcher.n_jobs=$N \
        hydra.sweep.dir="$ROOT/tune"
    $PY -m analysis.tune "$ROOT/tune" ;;
  main|long)
    $PY "$HERE/jobs.py" "$STAGE" "$ROOT/tune/tuned.json" "$ROOT" |
      xargs -P "$N" -L 1 sh -c 'dir=$0; ${PYTHON:-python3} -m experiments.train hydra.run.dir="$dir" "$@" >/dev/null 2>&1 || echo "failed: $dir"' ;;
  *) echo "error: stage $STAGE: use tune, main or long" >&2; exit 2 ;;
esac
