#!/usr/bin/env bash
# Study "rank-allocation families side by side": all-MiniLM-L6-v2 on Rotten Tomatoes at budget 2
# (+rank_budget=r2: target rank 2 from r0 = 3), 1 epoch, 5 seeds, settings of experiment=v2_base
# (budget=matched: the LoRA baseline takes the uniform rank closest in parameters).
# Learning rates: each family's own, chosen on validation (experiment=alloc_tune: 6 rates x 2 seeds).
#   analysis/studies/allocators_rt/run.sh tune ROOT       # 72 runs into ROOT/tune, then ROOT/tune/tuned.json
#   analysis/studies/allocators_rt/run.sh run ROOT        # 30 runs into ROOT/main/<method>-s<seed> at the tuned rates
#   analysis/studies/allocators_rt/run.sh summarize ROOT  # report, agreement table, rank maps, tuned.json here
#   SMOKE=1 analysis/studies/allocators_rt/run.sh run ROOT   # 2 steps, seed 0, 64 eval examples
# N_JOBS parallel runs (default 8; one CPU thread each, v2_base); completed runs are skipped.
set -euo pipefail
STAGE=$1; ROOT=$2
N=${N_JOBS:-8}
PY=${PYTHON:-python3}
HERE=$(dirname "$0")
METHODS="adalora sora elalora eva svd_truncate lora"
SEEDS="0 1 2 3 4"
EXTRA=""
TUNE_GRID=""
if [ "${SMOKE:-0}" = 1 ]; then
  SEEDS="0"; EXTRA="trainer.max_steps=2 task.max_eval_samples=64"
  TUNE_GRID="method=adalora,sora,elalora,eva,svd_truncate,lora trainer.lr=1e-3,8e-3 seed=100"
fi
# the tuned rate of family $1 (ROOT/tune/tuned.json); SMOKE runs without tuning take 1e-3
lr() {
  if [ "${SMOKE:-0}" = 1 ] && [ ! -f "$ROOT/tune/tuned.json" ]; then echo 1e-3; return; fi
  $PY -c 'import json,sys; print(json.load(open(sys.argv[1]))["rotten_tomatoes"][sys.argv[2]]["overrides"]["trainer.lr"])' \
    "$ROOT/tune/tuned.json" "$1"
}
case $STAGE in
  tune)
    $PY -m experiments.train -m experiment=alloc_tune hydra/launcher=joblib hydra.launcher.n_jobs=$N \
        hydra.sweep.dir="$ROOT/tune" $TUNE_GRID${EXTRA:+ $EXTRA}
    $PY -m analysis.tune "$ROOT/tune" ;;
  run)
    mkdir -p "$ROOT/main"
    for m in $METHODS; do for s in $SEEDS; do
      dir="$ROOT/main/$m-s$s"
      if grep -qs '"status": "completed"' "$dir/summary.json"; then continue; fi
      echo "$dir experiment=v2_base task=rotten_tomatoes +rank_budget=r2 trainer.epochs=1 method=$m seed=$s trainer.lr=$(lr $m)${EXTRA:+ $EXTRA}"
    done; done |
      xargs -P "$N" -L 1 sh -c 'dir=$0; ${PYTHON:-python3} -m experiments.train hydra.run.dir="$dir" "$@" >"$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"' ;;
  summarize)
    $PY -m analysis.report "$ROOT/main" --out "$HERE/report"
    $PY -m analysis.agreement "$ROOT/main" --out "$HERE" --max-seeds 2
    cp "$ROOT/tune/tuned.json" "$HERE/tuned.json" ;;
  *) echo "error: stage $STAGE: use tune, run or summarize" >&2; exit 2 ;;
esac
