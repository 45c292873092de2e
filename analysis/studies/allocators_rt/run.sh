#!/usr/bin/env bash
# Study "rank-allocation families side by side": all-MiniLM-L6-v2 on Rotten Tomatoes at budget 2
# (+rank_budget=r2: target rank 2 from r0 = 3), 1 epoch, 5 seeds, settings of experiment=v2_base
# (budget=matched: the LoRA baseline takes the uniform rank closest in parameters).
# Learning rates: no family was tuned on its own. The SVD-adapter families (adalora, sora,
# elalora, eva) take AdaLoRA's tuned 8e-3 and the LoRA ones (lora, and svd_truncate, which trains a
# uniform LoRA before truncating it) LoRA's tuned 1e-3, both from analysis/studies/minilm_v2/tuned.json
# (rotten_tomatoes, chosen on validation).
#   analysis/studies/allocators_rt/run.sh run ROOT        # 30 runs into ROOT/<method>-s<seed>
#   analysis/studies/allocators_rt/run.sh summarize ROOT  # report, agreement table, rank maps here
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
if [ "${SMOKE:-0}" = 1 ]; then SEEDS="0"; EXTRA="trainer.max_steps=2 task.max_eval_samples=64"; fi
lr() { case $1 in svd_truncate|lora) echo 1e-3 ;; *) echo 8e-3 ;; esac; }
case $STAGE in
  run)
    mkdir -p "$ROOT"
    for m in $METHODS; do for s in $SEEDS; do
      dir="$ROOT/$m-s$s"
      if grep -qs '"status": "completed"' "$dir/summary.json"; then continue; fi
      echo "$dir experiment=v2_base task=rotten_tomatoes +rank_budget=r2 trainer.epochs=1 method=$m seed=$s trainer.lr=$(lr $m)${EXTRA:+ $EXTRA}"
    done; done |
      xargs -P "$N" -L 1 sh -c 'dir=$0; ${PYTHON:-python3} -m experiments.train hydra.run.dir="$dir" "$@" >"$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"' ;;
  summarize)
    $PY -m analysis.report "$ROOT" --out "$HERE/report"
    $PY -m analysis.agreement "$ROOT" --out "$HERE" --max-seeds 2 ;;
  *) echo "error: stage $STAGE: use run or summarize" >&2; exit 2 ;;
esac
