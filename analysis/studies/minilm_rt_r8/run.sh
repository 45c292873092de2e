#!/usr/bin/env bash
# Re-runs the study "AdaLoRA vs LoRA on all-MiniLM-L6-v2, Rotten Tomatoes and Reuters R8".
#   analysis/studies/minilm_rt_r8/run.sh [SWEEP_ROOT] [extra Hydra overrides...]
# Needs `make install` (or the offline packages on PYTHONPATH). One GPU recommended: the 100 runs
# took the wall time stated in report.md on one H200 with N_JOBS parallel jobs.
set -euo pipefail
ROOT=${1:-multirun/study}; shift || true
N=${N_JOBS:-12}
LAUNCH=(hydra/launcher=joblib hydra.launcher.n_jobs=$N)

# Q1-Q2: two tasks x three budgets x {AdaLoRA, matched LoRA} x five seeds
python -m experiments.train -m experiment=study_budgets "${LAUNCH[@]}" hydra.sweep.dir=$ROOT/budgets "$@"
# Q3: ablations at the middle budget on Rotten Tomatoes
python -m experiments.train -m experiment=study_ablations "${LAUNCH[@]}" hydra.sweep.dir=$ROOT/ablations "$@"
# Q3, last ablation: plain LoRA re-trained on the ranks each seed's AdaLoRA run found
python - "$ROOT/budgets" <<'PY' > "$ROOT/found_ranks_sources.txt"
import json, pathlib, sys
for s in sorted(pathlib.Path(sys.argv[1]).glob("*/summary.json")):
    d = json.loads(s.read_text())
    if (d.get("status") == "completed" and d.get("method") == "adalora" and d.get("task") == "rotten_tomatoes"
            and float(d.get("target_rank") or 0) == 2.0):
        print(d["seed"], s.parent)
PY
while read -r seed dir; do
  python -m experiments.train experiment=study_ablations ablation=lora_on_found_ranks \
      method.rank_pattern_from="$dir" seed="$seed" hydra.run.dir="$ROOT/found/seed$seed" "$@" &
done < "$ROOT/found_ranks_sources.txt"
wait
# Q4: peft's AdaLoRA against ours (the committed numbers come from this reduced CPU setting)
for s in 0 1 2; do for m in adalora peft_adalora; do
  python -m experiments.train experiment=study_budgets task=rotten_tomatoes +rank_budget=r2 method=$m seed=$s \
      trainer.epochs=1 task.max_train_samples=3000 hydra.run.dir="$ROOT/peft_cpu/${m}_$s" "$@"
done; done
# numbers and figures: python analysis/studies/minilm_rt_r8/summarize.py "$ROOT" --peft "$ROOT/peft_cpu"
