"""Pick the setting (by default the learning rate) of each task and method on the VALIDATION split:

    python -m analysis.tune SWEEP_DIR [--metric M] [--by trainer.lr,trainer.head_lr]

SWEEP_DIR holds the run folders of a tuning sweep: a grid over the `--by` settings × methods ×
tasks, with seeds as the repeat axis. For each (task, method label) the setting with the best
mean validation metric over seeds wins; ties go to the smaller value of the first `--by` key
(the smaller learning rate), then the next. Only settings with as many completed seeds as the
best-covered setting of their group compete, so a setting whose failed seeds left a mean over
fewer runs cannot win by luck. The test split is never read: selection uses `final.val.<metric>`
of completed runs only.

Writes SWEEP_DIR/tuned.json atomically:

    {task: {label: {"overrides": {"trainer.lr": x, ...}, "hydra": "task=... method=... trainer.lr=x",
                    "metric": m, "split": "val", "val_mean": .., "val_sd": .., "n": k, "seeds": [..],
                    "grid": [{"trainer.lr": x, ..., "val_mean": .., "val_sd": .., "n": k,
                              "seeds": [..], "eligible": true}, ...]}}}

and prints one line per (task, label): its Hydra overrides and the validation score. `hydra` is
what the runs were launched with (`.hydra/overrides.yaml`, config option names kept), less the
seed and the tuned keys, plus the chosen setting: it re-creates the runs. Runs of one label
launched with other differing overrides are refused. The metric is the task's own (`task.metric`
in the run's config: accuracy for rotten_tomatoes, macro_f1 for the Reuters tasks) unless
--metric is given.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.runs import config_columns, default_scale, launch_overrides, load_sweep

DEFAULT_BY = ("trainer.lr",)
TASK_METRICS = {"rotten_tomatoes": "accuracy", "reuters_r8": "macro_f1", "reuters_r52": "macro_f1"}
# Axes a tuning group must not mix unless they are tuned (--by): pooling them would select on
# a mean over different experiments.
_FIXED = {"epochs": "trainer.epochs", "budget_label": "schedule.target_rank / the LoRA rank"}
# Launch overrides that belong to one run, not to the experiment: a re-run picks its own.
_PER_RUN = ("seed", "trainer.resume")


class TuneError(ValueError):
    """A sweep that cannot be tuned as given (the message says why and what to do)."""


def select(sweep, by=DEFAULT_BY, metric: str | None = None) -> dict:
    """{task: {label: choice}} as documented in the module docstring, from a loaded sweep."""
    by = list(by)
    if not by:
        raise TuneError("--by is empty: name the config keys that were tuned, e.g. trainer.lr")
    runs = sweep.runs[sweep.runs["ok"]].copy()
    if runs.empty:
        raise TuneError("no completed run in the sweep")
    settings = config_columns(sweep, by)
    runs = runs.merge(settings.rename(columns={k: f"setting:{k}" for k in by}), on="run", how="left")
    cols = [f"setting:{k}" for k in by]
    missing = runs[runs[cols].isna().any(axis=1)]
    if len(missing):
        raise TuneError(f"run {missing['run'].iloc[0]} has no value for {', '.join(by)} in its config")
    out: dict = {}
    for (task, label), g in runs.groupby(["task", "label"], sort=True):
        for col, key in _FIXED.items():
            if col in g and g[col].nunique(dropna=False) > 1 and key not in by:
                raise TuneError(f"{task} / {label}: runs differ in {col} ({', '.join(map(str, g[col].unique()))}); "
                                f"tune them in separate sweeps or add {key} to --by")
        m = metric or _task_metric(g, task)
        val = pd.to_numeric(g.get(f"final.val.{m}"), errors="coerce") if f"final.val.{m}" in g else None
        if val is None or val.isna().all():
            raise TuneError(f"{task} / {label}: no completed run reports validation {m}")
        g = g.assign(val=val)
        grid = []
        for key, s in g[g["val"].notna()].groupby(cols, sort=True):
            key = key if isinstance(key, tuple) else (key,)
            per_seed = s.groupby("seed")["val"].mean()  # a repeated seed counts once
            grid.append({**{k: _py(v) for k, v in zip(by, key)}, "val_mean": float(per_seed.mean()),
                         "val_sd": _py(per_seed.std(ddof=1)), "n": int(per_seed.size),
                         "seeds": [int(x) for x in per_seed.index]})
        n_full = max(e["n"] for e in grid)
        for e in grid:
            e["eligible"] = e["n"] == n_full
        best = max(e["val_mean"] for e in grid if e["eligible"])
        tied = [e for e in grid if e["eligible"] and math.isclose(e["val_mean"], best, rel_tol=1e-12, abs_tol=1e-15)]
        win = min(tied, key=lambda e: tuple(e[k] for k in by))
        overrides = {k: win[k] for k in by}
        out.setdefault(task, {})[label] = {
            "overrides": overrides, "hydra": _hydra(task, label, g, overrides), "metric": m, "split": "val",
            "val_mean": win["val_mean"], "val_sd": win["val_sd"], "n": win["n"], "seeds": win["seeds"],
            "grid": grid}
    return out


def _task_metric(g: pd.DataFrame, task: str) -> str:
    if "task_metric" in g and g["task_metric"].notna().any():
        return str(g["task_metric"].dropna().iloc[0])
    if task in TASK_METRICS:
        return TASK_METRICS[task]
    for m in ("accuracy", "macro_f1", "mcc"):
        if f"final.val.{m}" in g and pd.to_numeric(g[f"final.val.{m}"], errors="coerce").notna().any():
            return m
    raise TuneError(f"{task}: no validation metric found; give --metric")


def _hydra(task: str, label: str, g: pd.DataFrame, overrides: dict) -> str:
    """The overrides that re-create the label's runs at the chosen setting: the overrides the runs
    were launched with (config option names: `task=rotten_tomatoes_small`, `budget=matched`),
    less the seed and the tuned keys, then the chosen setting."""
    launched = [o for o in map(launch_overrides, g["path"]) if o is not None]
    if not launched:
        return _hydra_from_summary(task, g.iloc[0], overrides)
    drop = {*_PER_RUN, *overrides}
    kept = [[o for o in run if _key(o) not in drop] for run in launched]
    for other in kept[1:]:
        if set(other) != set(kept[0]):
            key = _key(sorted(set(kept[0]) ^ set(other))[0])
            raise TuneError(f"{task} / {label}: runs were launched with different {key} overrides; "
                            f"tune them in separate sweeps or add {key} to --by")
    # a tuned key added with `+` (not in the defaults) needs its `+` again
    plus = {_key(o): o[: len(o) - len(o.lstrip("+"))] for run in launched for o in run}
    return " ".join(kept[0] + [f"{plus.get(k, '')}{k}={v}" for k, v in overrides.items()])


def _key(override: str) -> str:
    """`+trainer.lr=1e-3` -> `trainer.lr`; `~method.targets` -> `method.targets`."""
    return override.partition("=")[0].lstrip("+~")


def _hydra_from_summary(task: str, run: pd.Series, overrides: dict) -> str:
    """For run folders without .hydra/overrides.yaml: rebuilt from the summary, which names the
    task (not the option that chose it) and not the budget option, so check it before reuse."""
    parts = [f"task={task}", f"method={run['method']}"]
    ablation = run.get("ablation")
    if isinstance(ablation, str) and ablation not in ("none", ""):
        parts.append(f"ablation={ablation}")
    rule = run.get("scale_rule")
    plain = not isinstance(ablation, str) or ablation in ("none", "")
    if isinstance(rule, str) and rule != default_scale(run["method"], None if plain else ablation):
        parts.append(f"method.scale={rule}")
    return " ".join(parts + [f"{k}={v}" for k, v in overrides.items()])


def _py(v):
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.tune", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", type=Path, help="the tuning sweep's folder (Hydra multirun or nested run folders)")
    ap.add_argument("--metric", default=None, help="accuracy | macro_f1 | mcc (default: each task's metric)")
    ap.add_argument("--by", default=",".join(DEFAULT_BY),
                    help="comma-separated config keys that were tuned (default: trainer.lr)")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_dir)
        tuned = select(sweep, [k.strip() for k in args.by.split(",") if k.strip()], args.metric)
    except (TuneError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_json_atomic(args.sweep_dir / "tuned.json", tuned)
    skipped = int((~sweep.runs["ok"]).sum())
    for task, labels in tuned.items():
        for label, c in labels.items():
            sd = "" if c["val_sd"] is None else f" ± {c['val_sd']:.4f}"
            print(f"{task} | {label} | {c['hydra']} | val {c['metric']} {c['val_mean']:.4f}{sd} (n={c['n']})")
    note = f"; {skipped} run(s) not completed were left out" if skipped else ""
    print(f"wrote {args.sweep_dir / 'tuned.json'}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
