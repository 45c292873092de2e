"""The study's runs, one line each: ``<run dir> <Hydra overrides...>``, at the tuned learning rates.

    python analysis/studies/minilm_v2/jobs.py main ROOT/tune/tuned.json ROOT     # 1-epoch grid, peft, ablations
    python analysis/studies/minilm_v2/jobs.py long ROOT/tune/tuned.json ROOT     # 3 epochs, LoRA on found ranks

Runs whose folder already holds a completed run are left out, so a stage can be re-started.
Reads files only (tuned.json, summary.json); run.sh feeds the lines to parallel workers.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("rotten_tomatoes", "reuters_r52", "reuters_r8")          # longest first
SEEDS = range(5)
BUDGETS = ("r1", "r2", "r4")
METHODS = ("adalora", "adalora_scaled", "lora")
ABLATIONS = ("no_orth", "sensitivity_only", "magnitude", "random_fixed", "random_churn")


def tuned_lr(tuned: dict, task: str, method: str) -> float:
    """The learning rate chosen on validation for (task, method option)."""
    labels = tuned[task]
    if method == "adalora_scaled":
        label = next(k for k in labels if k.startswith("adalora") and "target" in k)
    else:
        label = method
    return float(labels[label]["overrides"]["trainer.lr"])


def completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def jobs(stage: str, tuned: dict, root: Path):
    def job(sub: str, *overrides: str):
        return root / stage / sub, ["experiment=v2_base", *overrides]
    if stage == "main":
        for task in TASKS:
            for seed in SEEDS:
                for b in BUDGETS:
                    for m in METHODS:
                        yield job(f"{task}/{m}_{b}_e1_s{seed}", f"task={task}", f"method={m}", f"+rank_budget={b}",
                                  f"trainer.lr={tuned_lr(tuned, task, m)}", f"seed={seed}")
                lr = tuned_lr(tuned, task, "adalora")
                yield job(f"{task}/peft_adalora_r2_e1_s{seed}", f"task={task}", "method=peft_adalora",
                          "+rank_budget=r2", f"trainer.lr={lr}", f"seed={seed}")
                for a in ABLATIONS:
                    yield job(f"{task}/{a}_r2_e1_s{seed}", f"task={task}", f"ablation={a}", "+rank_budget=r2",
                              f"trainer.lr={lr}", f"seed={seed}")
    elif stage == "long":
        for task in TASKS:
            for seed in SEEDS:
                for m in METHODS:
                    yield job(f"{task}/{m}_r2_e3_s{seed}", f"task={task}", f"method={m}", "+rank_budget=r2",
                              "trainer.epochs=3", f"trainer.lr={tuned_lr(tuned, task, m)}", f"seed={seed}")
                found = root / "main" / f"{task}/adalora_r2_e1_s{seed}"
                if completed(found):
                    yield job(f"{task}/lora_on_found_ranks_r2_e1_s{seed}", f"task={task}",
                              "ablation=lora_on_found_ranks", f"method.rank_pattern_from={found}",
                              "+rank_budget=r2", f"trainer.lr={tuned_lr(tuned, task, 'lora')}", f"seed={seed}")
    else:
        raise SystemExit(f"error: stage {stage!r}: use main or long")


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: jobs.py main|long TUNED_JSON ROOT")
    stage, tuned_path, root = argv[0], Path(argv[1]), Path(argv[2])
    tuned = json.loads(tuned_path.read_text())
    # The method grid first, then peft and the ablations (a stage cut short loses the least);
    # within each, the longest runs first so that they do not start last and leave workers idle.
    def order(job):
        d = str(job[0])
        group = 2 if any(f"/{a}_" in d for a in ABLATIONS + ("lora_on_found_ranks",)) else int("peft" in d)
        return group, -("_e3_" in d), TASKS.index(d.split("/")[-2]) if d.split("/")[-2] in TASKS else 0
    lines = sorted(((d, o) for d, o in jobs(stage, tuned, root) if not completed(d)), key=order)
    for d, overrides in lines:
        print(d, *overrides)


if __name__ == "__main__":
    main(sys.argv[1:])
