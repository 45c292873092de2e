"""analysis/: loaders, tables and the report, on synthetic run folders written by hand to the
contract of /work/notes/CONTRACT.md (the same keys experiments/logging.py writes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import save_file
from scipy import stats

from analysis import runs as R
from analysis import tables as T

TYPES = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2,
         "attention.output.dense": 3, "intermediate.dense": 4, "output.dense": 5}
N_LAYERS, R0, TARGET, STEPS, TI, TF, DT = 3, 6, 4.0, 100, 10, 30, 10
SCHEDULE = {"total_steps": STEPS, "init_warmup": TI, "final_warmup": TF, "mask_interval": DT,
            "shape": "cubic", "initial_budget": R0 * N_LAYERS * 6, "target_budget": int(TARGET * N_LAYERS * 6)}
MODULES = [f"encoder.layer.{i}.{t}" for i in range(N_LAYERS) for t in TYPES]
# Jobs of the synthetic multirun: (method, seed, status); job 5 dies before writing summary.json.
JOBS = [("adalora", 0, "completed"), ("adalora", 1, "completed"), ("lora", 0, "completed"),
        ("lora", 1, "completed"), ("adalora", 2, "failed"), ("lora", 2, None)]
ACC = {("adalora", 0): 0.86, ("adalora", 1): 0.88, ("lora", 0): 0.83, ("lora", 1): 0.86}


def _cubic(t):
    b0, bt = SCHEDULE["initial_budget"], SCHEDULE["target_budget"]
    if t <= TI:
        return b0
    if t >= STEPS - TF:
        return bt
    return round(bt + (b0 - bt) * (1 - (t - TI) / (STEPS - TF - TI)) ** 3)


def _final_ranks(seed):
    """Deeper layers and FFN matrices keep more rank (the paper's finding); sums to b_T."""
    w = np.array([(1 + i) * (1 + TYPES[m.split(".", 3)[3]] % 3) for i in range(N_LAYERS) for m in
                  [f"encoder.layer.{i}.{t}" for t in TYPES]], float) + seed
    ranks = np.minimum(R0, np.floor(w / w.sum() * SCHEDULE["target_budget"])).astype(int)
    i = 0
    while ranks.sum() < SCHEDULE["target_budget"]:  # hand out the remainder, never above r0
        if ranks[i % len(ranks)] < R0:
            ranks[i % len(ranks)] += 1
        i += 1
    return dict(zip(MODULES, ranks.tolist()))


def _write_job(d: Path, method: str, seed: int, status: str | None, last_step: int = STEPS):
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"method={method}", f"seed={seed}", "task=sst2"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": method}}))
    rng = np.random.default_rng(seed + 10 * (method == "lora"))
    acc = ACC.get((method, seed), 0.5)
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(0, last_step + 1, 10):
            f.write(json.dumps({"step": step, "split": "train", "loss": 0.7 * np.exp(-step / 40) + 0.05 * rng.random(),
                                "orth": (0.5 * np.exp(-step / 30)) if method == "adalora" else 0.0,
                                "lr": 1e-3, "epoch": step / 50, "time_s": step * 0.1}) + "\n")
            if step % 50 == 0 and step:
                f.write(json.dumps({"step": step, "split": "val", "loss": 0.4, "accuracy": acc - 0.02 * (step < STEPS),
                                    "macro_f1": acc - 0.01, "mcc": 2 * acc - 1, "epoch": step / 50}) + "\n")
    final = _final_ranks(seed)
    if method == "adalora":
        with open(d / "ranks.jsonl", "w") as f:
            steps = [0] + [t for t in range(TI + 1, STEPS - TF + 1) if t % DT == 0 or t == STEPS - TF]
            for t in (s for s in steps if s <= last_step):
                b = _cubic(t)
                # intermediate records shrink every module towards its final rank in proportion
                frac = (SCHEDULE["initial_budget"] - b) / (SCHEDULE["initial_budget"] - SCHEDULE["target_budget"])
                ranks = {m: int(round(R0 - frac * (R0 - final[m]))) for m in MODULES}
                f.write(json.dumps({"step": t, "budget": b, "threshold": None if t == 0 else 0.01 * frac,
                                    "ranks": ranks, "params_kept": sum(ranks.values()) * 2 * 64}) + "\n")
        # adalora.save_adapters' layout: alive values of lam and their positions; r0 in adapters.json
        tensors, scores, meta = {}, {}, {}
        for m in MODULES:
            kept = np.sort(rng.choice(R0, final[m], replace=False))
            tensors[m + ".lam"] = (np.sort(rng.random(final[m]))[::-1] + 0.1).astype(np.float32)
            tensors[m + ".kept"] = kept.astype(np.int64)
            meta[m] = {"type": "svd", "rank": final[m], "r0": R0}
            alive = np.isin(np.arange(R0), kept)
            scores[m] = np.where(alive, 10 ** rng.uniform(-2, 0, R0), 10 ** rng.uniform(-5, -2.5, R0)).astype(np.float32)
        save_file(tensors, str(d / "adapters.safetensors"))
        (d / "adapters.json").write_text(json.dumps({"format": "adalora-adapters/1", "modules": meta}))
        save_file(scores, str(d / "importance.safetensors"))
    if status is None:
        return
    adapter = sum(final.values()) * 2 * 64 if method == "adalora" else len(MODULES) * 4 * 2 * 64
    summary = {
        "status": status, "error": "RuntimeError: CUDA out of memory" if status == "failed" else None,
        "method": method, "ablation": "none", "task": "sst2", "model": "tiny-bert", "seed": seed,
        "init_rank": R0 if method == "adalora" else None, "target_rank": TARGET if method == "adalora" else None,
        "lora_rank": 4 if method == "lora" else None,
        "budget": {"target_params": None, "matched_lora_rank": 4 if method == "adalora" else None, "lora_params": None},
        "schedule": SCHEDULE if method == "adalora" else None,
        "params": {"trainable_start": (R0 * N_LAYERS * 6 * 129 if method == "adalora" else adapter) + 1538,
                   "trainable_end": adapter + 1538, "adapter_start": R0 * 129 * 18, "adapter_end": adapter,
                   "base": 4_000_000},
        "final": {} if status != "completed" else {
            "val": {"accuracy": acc, "macro_f1": acc - 0.01, "mcc": 2 * acc - 1, "loss": 0.4},
            "test": {"accuracy": acc - 0.01, "macro_f1": acc - 0.02, "mcc": 2 * acc - 1.02, "loss": 0.41}},
        "final_ranks": final if method == "adalora" else {m: 4 for m in MODULES},
        "module_shapes": {m: [64, 64] for m in MODULES}, "steps": last_step, "wall_time_s": 12.5 + seed,
        "versions": {"adalora": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0", "python": "3.11.7"},
        "git_commit": "abc1234",
    }
    (d / "summary.json").write_text(json.dumps(summary))


def make_sweep(root: Path) -> Path:
    """A Hydra multirun folder: jobs 0..5 of JOBS plus multirun.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    for i, (method, seed, status) in enumerate(JOBS):
        _write_job(root / str(i), method, seed, status, last_step=STEPS if status == "completed" else 40)
    with open(root / "5" / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "split": "tra')  # the half line a killed process leaves
    return root


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("multirun") / "demo")


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    return R.load_sweep(sweep_dir)
