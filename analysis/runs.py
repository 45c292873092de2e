"""Run folders -> tidy pandas tables. The only module that parses run folders, whose layout is the
run-folder contract (experiments/README.md).

`load_sweep(dirs)` finds every run folder under the given directories (single runs, Hydra
multirun folders with numbered jobs, or nested dated folders) and returns a `Sweep` of tables:

    runs         one row per run: run id, path, status, Hydra overrides as columns, summary.json
                 flattened with dots (`final.test.accuracy`, `params.trainable_end`,
                 `schedule.total_steps`, `versions.torch`...), `scale_rule` and `scaling` (the
                 update's α/r), `lr`, `head_lr` (empty for a language-model objective, which
                 trains no head), `epochs` and `task_metric` from the resolved config, plus
                 `label`, `budget_label`, `pair_budget` used to group and pair runs
    metrics      one row per metrics.jsonl line: run, step, split, loss, orth, lr, accuracy...
    allocations  one row per ranks.jsonl record: run, step, budget, threshold, params_kept, realised
                 (Σ ranks), unit and target (the schedule's unit and b(t) in it; allocation families)
    ranks        one row per (record, module): run, step, module, rank, budget, layer, mtype, row
    modules      one row per (run, module): init_rank, final_rank, d_out, d_in, scaling, layer, mtype, row

Runs without summary.json, or whose status is not "completed", stay in every table and are
marked (`status`, `ok`): a sweep with silent holes is worse than one with visible failures.
Facts added to the contract later (`scale`, the `random_fixed`/`random_churn` ablations) are read
with defaults, so older run folders still load: a missing scale leaves `scale_rule` empty, and
the old ablation name `random` reads as `random_churn`, which it was.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.names import module_table

# Methods whose adapters are SVD-parameterised (rank is adaptive or at least has a spectrum).
SVD_METHODS = ("adalora", "svd_lora", "peft_adalora", "sora", "elalora", "eva")
LORA_METHODS = ("lora", "peft_lora", "svd_truncate")
# Methods whose budget is the schedule's target (average rank per adapter): svd_truncate trains
# LoRA adapters but cuts them to that target, so its budget is the target, not its LoRA rank.
TARGET_METHODS = SVD_METHODS + ("svd_truncate",)
# Methods with no budget knob: every run of one model and task trains the same parameters.
NO_BUDGET_METHODS = ("full", "head")
_RUN_MARKERS = ("summary.json", "metrics.jsonl", "ranks.jsonl", ".hydra/config.yaml")
_IDS = ("run", "row", "module", "group", "mtype", "path", "label", "budget_label", "pair_budget",
        "scale_rule", "task_metric")
_SECTIONS = ("schedule", "budget", "params", "final", "versions")
_FILL_FROM_CONFIG = ("method", "task", "model", "seed", "ablation")
# Resolved-config values every run row carries: column <- dotted key of .hydra/config.yaml.
CONFIG_COLUMNS = {"lr": "trainer.lr", "head_lr": "trainer.head_lr", "epochs": "trainer.epochs",
                  "task_metric": "task.metric"}
# method.scale: what the update's α is divided by; the label names a rule that is not the default.
SCALE_NAMES = {"alpha_over_r0": "α/r0", "alpha_over_target": "α/target", "rslora": "α/√r",
               "per_module": "α/r", "uniform": "uniform α/r"}
_ABLATION_SCALE = {"lora_on_found_ranks": "uniform"}  # set by the ablation's own config file
_OLD_ABLATIONS = {"random": "random_churn"}            # the old `random` redrew scores every mask step


def default_scale(method: str | None, ablation: str | None = None) -> str | None:
    """The scale rule a method (with its ablation) gets when method.scale is not given."""
    if ablation in _ABLATION_SCALE:
        return _ABLATION_SCALE[ablation]
    return "alpha_over_r0" if method in SVD_METHODS else "per_module" if method in LORA_METHODS else None


@dataclass
class Sweep:
    runs: pd.DataFrame
    metrics: pd.DataFrame
    allocations: pd.DataFrame
    ranks: pd.DataFrame
    modules: pd.DataFrame

    def row(self, run: str) -> pd.Series:
        return self.runs.set_index("run").loc[run]

    def select(self, runs) -> "Sweep":
        """The same tables restricted to the given run ids."""
        runs = [runs] if isinstance(runs, str) else list(runs)
        pick = lambda df: df[df["run"].isin(runs)].reset_index(drop=True)  # noqa: E731
        return Sweep(*(pick(df) for df in (self.runs, self.metrics, self.allocations,
                                           self.ranks, self.modules)))

    def problems(self) -> pd.DataFrame:
        """Runs that did not complete (failed, interrupted, still running, no summary.json).
        Folders of `experiments.evaluate` are not runs that failed: `evaluations` lists them."""
        return self.runs[~self.runs["ok"] & (self.runs["status"] != "evaluated")].reset_index(drop=True)

    def evaluations(self) -> pd.DataFrame:
        """Folders of `experiments.evaluate` (status "evaluated"): re-scores of saved adapters,
        kept out of the result tables, where they would count a trained run twice."""
        return self.runs[self.runs["status"] == "evaluated"].reset_index(drop=True)

    def final_ranks(self, run: str) -> dict[str, int]:
        m = self.modules[(self.modules["run"] == run) & self.modules["final_rank"].notna()]
        return {k: int(v) for k, v in zip(m["module"], m["final_rank"])}

    def budget_unit(self, run: str) -> str:
        """What the run's schedule counts: "values" (singular values kept) or "params"
        (schedule.budget_unit=params). Its allocation records say, else its summary's schedule,
        else its resolved config; runs from before the option counted values."""
        units = self.allocations.loc[self.allocations["run"] == run, "unit"].dropna()
        if len(units):
            return str(units.iloc[-1])
        unit = (self.schedule(run) or {}).get("budget_unit")
        unit = unit or config_value(read_config(self.row(run)["path"]), "schedule.budget_unit")
        return str(unit) if unit else "values"

    def schedule(self, run: str) -> dict | None:
        """The run's `summary.schedule` as a dict, or None (LoRA runs, unfinished runs)."""
        row = self.row(run)
        keys = [c for c in row.index if c.startswith("schedule.")]
        if not keys or pd.isna(row.get("schedule.total_steps")):
            return None
        return {k.split(".", 1)[1]: _py(row[k]) for k in keys}


def load_run(path) -> Sweep:
    """One run folder -> a Sweep with one row in `runs`."""
    return load_sweep([path])


def load_sweep(dirs) -> Sweep:
    """Run folders, multirun folders, or a mix -> one Sweep. Run ids are paths relative to the
    directory given (prefixed with its name when several directories or a single run are given)."""
    roots = [Path(d) for d in ([dirs] if isinstance(dirs, (str, Path)) else dirs)]
    found: list[tuple[str, Path]] = []
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: not a directory (give a run folder or a multirun folder)")
        prefix = root.resolve().name if (len(roots) > 1 or _is_run(root)) else ""
        for path in _find_runs(root):
            rel = path.relative_to(root).as_posix()
            rid = "/".join(p for p in (prefix, "" if rel == "." else rel) if p)
            found.append((rid, path))
    if not found:
        raise FileNotFoundError(f"no run folders (with any of {_RUN_MARKERS}) under {roots}")
    parts = [_read_run(rid, path) for rid, path in found]
    tables = [pd.concat([p[i] for p in parts], ignore_index=True) for i in range(5)]
    tables = [_numeric(t) for t in tables]  # empty per-run parts leave object columns behind
    for t in tables[3:]:
        t["layer"] = t["layer"].astype("Int64")
    return Sweep(*tables)


def read_config(path) -> dict:
    """A run folder's resolved `.hydra/config.yaml` ({} when absent or unreadable)."""
    config = _read_yaml(Path(path) / ".hydra" / "config.yaml")
    return config if isinstance(config, dict) else {}


def config_value(config: dict, key: str):
    """`config["trainer"]["lr"]` for key "trainer.lr"; None when any part is missing."""
    for part in key.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def config_columns(sweep: Sweep, keys) -> pd.DataFrame:
    """run + one column per dotted config key (e.g. trainer.lr), read from each run's resolved
    config, else from its Hydra overrides."""
    rows = []
    for run, path in zip(sweep.runs["run"], sweep.runs["path"]):
        config, overrides = read_config(path), _overrides(Path(path))
        row = {"run": run}
        for k in keys:
            v = config_value(config, k)
            row[k] = overrides.get(k) if v is None else v
        rows.append(row)
    return _numeric(pd.DataFrame(rows, columns=["run", *keys]))


def launch_overrides(path) -> list[str] | None:
    """The overrides a run was launched with, as written (`.hydra/overrides.yaml`: option names
    such as `task=rotten_tomatoes_small`, `+` and `~` prefixes kept); None when the file is absent."""
    items = _read_yaml(Path(path) / ".hydra" / "overrides.yaml")
    return [str(item) for item in items] if isinstance(items, list) else None


def load_spectrum(path) -> pd.DataFrame:
    """`adapters.safetensors` -> module, index, lam, alive (one row per initial singular value).

    adalora.save_adapters keeps only the alive values plus their positions (`<module>.kept`) and
    the initial rank in adapters.json; pruned positions come back with lam = 0, alive = False.
    Files that keep all values read alive from `<module>.rank_mask`, else from lam != 0."""
    path = Path(path)
    tensors = _read_safetensors(path / "adapters.safetensors")
    meta = _read_json(path / "adapters.json").get("modules", {})
    rows = []
    for key, lam in tensors.items():
        if not key.endswith(".lam") or key.startswith("extra::"):
            continue
        module = key[: -len(".lam")]
        lam = np.asarray(lam, dtype=np.float64).reshape(-1)
        kept, mask = tensors.get(module + ".kept"), tensors.get(module + ".rank_mask")
        if kept is not None:
            # a grown adapter (ElaLoRA) keeps indices past its initial rank r0
            r0 = max(int(meta.get(module, {}).get("r0", 0)), int(np.max(kept, initial=-1)) + 1)
            full, alive = np.zeros(r0), np.zeros(r0, dtype=bool)
            full[np.asarray(kept, dtype=np.int64)], alive[np.asarray(kept, dtype=np.int64)] = lam, True
            lam = full
        else:
            alive = np.asarray(mask, dtype=bool).reshape(-1) if mask is not None else lam != 0
        rows.append(pd.DataFrame({"module": module, "index": np.arange(lam.size), "lam": lam,
                                  "alive": alive}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["module", "index", "lam", "alive"])


def load_importance(path) -> pd.DataFrame:
    """`importance.safetensors` (triplet scores at the final allocation) -> module, index, score."""
    tensors = _read_safetensors(Path(path) / "importance.safetensors")
    rows = [pd.DataFrame({"module": k, "index": np.arange(np.size(v)),
                          "score": np.asarray(v, dtype=np.float64).reshape(-1)})
            for k, v in tensors.items()]
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["module", "index", "score"])


# ---------------------------------------------------------------------------------------------

def _is_run(path: Path) -> bool:
    return any((path / m).exists() for m in _RUN_MARKERS)


def _find_runs(root: Path) -> list[Path]:
    """Depth-first, numbered job folders in numeric order (so 10 sorts after 9)."""
    if _is_run(root):
        return [root]
    key = lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, p.name)  # noqa: E731
    subdirs = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=key)
    return [run for sub in subdirs for run in _find_runs(sub)]


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Records and the number of unreadable lines (a crash can leave a half-written last line)."""
    if not path.exists():
        return [], 0
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        return {}


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested summary -> dotted keys. Per-module dicts go to the `modules` table instead, and a
    null section (`"schedule": null` for LoRA) leaves its dotted columns empty."""
    out = {}
    for k, v in d.items():
        if k in ("final_ranks", "module_shapes") or (v is None and k in _SECTIONS):
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _numeric(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing numbers and None (a LoRA run has no target_rank) -> float columns."""
    for c in df.columns[df.dtypes == object]:
        if c in _IDS:
            continue
        try:
            df[c] = pd.to_numeric(df[c])
        except (TypeError, ValueError):
            pass
    return df


def _overrides(path: Path) -> dict:
    """`.hydra/overrides.yaml` ["method=lora", "+x=1", "~y"] -> {"method": "lora", "x": 1}."""
    out = {}
    for item in _read_yaml(path / ".hydra" / "overrides.yaml") or []:
        key, sep, value = str(item).partition("=")
        if sep and not key.startswith("~"):
            try:
                out[key.lstrip("+")] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key.lstrip("+")] = value
    return out


def _read_run(rid: str, path: Path):
    summary_path = path / "summary.json"
    summary, notes = {}, []
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:  # never expected (written atomically), but say so, don't crash
            notes.append("summary.json unreadable")
    metrics, bad_m = _read_jsonl(path / "metrics.jsonl")
    records, bad_r = _read_jsonl(path / "ranks.jsonl")
    notes += [f"{n} unreadable line(s) in {f}" for n, f in ((bad_m, "metrics.jsonl"), (bad_r, "ranks.jsonl")) if n]

    scale = summary.pop("scale", None)  # rule and scaling become columns, per_module goes to `modules`
    scale = scale if isinstance(scale, dict) else None
    row = {"run": rid, "path": str(path), "status": summary.get("status", "no_summary")}
    overrides = _overrides(path)
    row["overrides"] = " ".join(f"{k}={v}" for k, v in overrides.items())
    row.update(_flatten(summary))
    config = read_config(path)
    # summary.json is the truth; a run that died before it still says what it was, from its
    # resolved config (method.name, not the option name `adalora_scaled`), then its overrides
    for k in _FILL_FROM_CONFIG:
        v = config.get(k)
        v = v.get("name") if isinstance(v, dict) else v
        if _missing(row.get(k)) and v is not None and not isinstance(v, (dict, list)):
            row[k] = v
    for k, v in overrides.items():
        if _missing(row.get(k)):
            row[k] = v
    row["ablation"] = _OLD_ABLATIONS.get(row.get("ablation"), row.get("ablation"))
    for col, key in CONFIG_COLUMNS.items():
        v = config_value(config, key)
        row[col] = overrides.get(key) if v is None else v
    if config_value(config, "task.objective") not in (None, "classify"):
        row["head_lr"] = None          # a language-model objective trains no classifier head
    row["scale_rule"], row["scaling"] = _scale(scale, config, row)
    row["ok"] = row["status"] == "completed"
    row["final_source"] = "summary" if summary.get("final") else None
    for split in ("val", "test"):  # unfinished runs: the last evaluation they logged
        last = [r for r in metrics if r.get("split") == split]
        if last and not summary.get("final", {}).get(split):
            row.update({f"final.{split}.{k}": v for k, v in last[-1].items()
                        if k not in ("step", "split", "epoch", "time_s", "lr")})
            row["final_source"] = "last_logged"
    row["notes"] = "; ".join(notes + ([summary["error"]] if summary.get("error") else []))
    _add_labels(row)

    mt = pd.DataFrame(metrics)
    mt.insert(0, "run", rid)
    alloc = pd.DataFrame([{"run": rid, "step": r.get("step"), "budget": r.get("budget"),
                           "threshold": r.get("threshold"), "params_kept": r.get("params_kept"),
                           "realised": sum((r.get("ranks") or {}).values()),
                           "unit": r.get("unit"), "target": r.get("target")} for r in records],
                         columns=["run", "step", "budget", "threshold", "params_kept", "realised",
                                  "unit", "target"])
    rk = pd.DataFrame([{"run": rid, "step": r.get("step"), "module": m, "rank": v, "budget": r.get("budget")}
                       for r in records for m, v in (r.get("ranks") or {}).items()],
                      columns=["run", "step", "module", "rank", "budget"])
    per_module = (scale or {}).get("per_module") or {}
    return pd.DataFrame([row]), mt, alloc, _with_names(rk), _modules(rid, summary, records, row, per_module)


def _scale(scale: dict | None, config: dict, row: dict):
    """(rule, scaling): summary.json's `scale`, else the rule the resolved config implies."""
    if scale:
        return scale.get("rule"), scale.get("scaling")
    method = config.get("method")
    if isinstance(method, dict) and "scale" in method:  # a config of the scale-aware application
        if method["scale"] is not None:
            return method["scale"], None
        if method.get("rslora"):
            return "rslora", None
        return default_scale(row.get("method"), row.get("ablation")), None
    return None, None


def _modules(rid: str, summary: dict, records: list[dict], row: dict,
             per_module: dict | None = None) -> pd.DataFrame:
    final = summary.get("final_ranks") or (records[-1].get("ranks") if records else None) or {}
    first = (records[0].get("ranks") or {}) if records else {}
    shapes = summary.get("module_shapes") or {}
    r0_keys = ("init_rank", "lora_rank") if row.get("method") in TARGET_METHODS else ("lora_rank", "init_rank")
    default_r0 = next((row.get(k) for k in r0_keys if _num(row.get(k))), None)
    names = list(dict.fromkeys([*first, *final, *shapes]))
    df = pd.DataFrame({
        "run": rid, "module": names,
        "init_rank": [first.get(n, default_r0) for n in names],
        "final_rank": [final.get(n) for n in names],
        "d_out": [(shapes.get(n) or [None, None])[0] for n in names],
        "d_in": [(shapes.get(n) or [None, None])[1] for n in names],
        "scaling": [(per_module or {}).get(n) for n in names],
    }, columns=["run", "module", "init_rank", "final_rank", "d_out", "d_in", "scaling"])
    for c in ("init_rank", "final_rank", "scaling"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return _with_names(df)


def _with_names(df: pd.DataFrame) -> pd.DataFrame:
    if not len(df):
        return df.reindex(columns=[*df.columns, "group", "layer", "mtype", "row"])
    return df.merge(module_table(df["module"]), on="module", how="left")


def _add_labels(row: dict) -> None:
    """`label` (method, with the ablation when there is one and the scale rule when it is not
    the method's default: `adalora`, `adalora (α/target)`, `lora[lora_on_found_ranks]`),
    `budget_label` (the knob that sets the budget, `_budget_label`), `pair_budget` (what makes an
    AdaLoRA run and a LoRA run comparable)."""
    method = row.get("method") or "unknown"
    ablation = row.get("ablation")
    row["method"] = method
    plain = ablation is None or (isinstance(ablation, float) and np.isnan(ablation)) or ablation in ("none", "")
    row["label"] = method if plain else f"{method}[{ablation}]"
    rule = row.get("scale_rule")
    if isinstance(rule, str) and rule != default_scale(method, None if plain else ablation):
        row["label"] += f" ({SCALE_NAMES.get(rule, rule)})"
    lr, tp = row.get("lora_rank"), row.get("budget.target_params")
    row["budget_label"] = _budget_label(row)
    matched = row.get("budget.matched_lora_rank")
    if _num(tp):  # both methods sized to one parameter target: compare at that target
        row["pair_budget"] = f"{int(tp)} params"
    elif method in TARGET_METHODS and _num(matched):
        row["pair_budget"] = f"r={int(matched)}"
    elif method in LORA_METHODS and method not in TARGET_METHODS and _num(lr):
        row["pair_budget"] = f"r={int(lr)}"
    else:
        row["pair_budget"] = row["budget_label"]


def _budget_label(row: dict) -> str:
    """The knob that sets the run's budget: the target rank of an allocating method, the rank of
    LoRA. When that knob is not recorded, the first budget fact the summary does record, so runs
    of different budgets are never pooled under one empty label."""
    method, tr, lr = row["method"], row.get("target_rank"), row.get("lora_rank")
    if method in TARGET_METHODS and _num(tr):
        return f"avg r={tr:g}"
    if method in LORA_METHODS and method not in TARGET_METHODS and _num(lr):
        return f"r={int(lr)}"
    if method in NO_BUDGET_METHODS:
        return ""
    fallbacks = (("budget.target_params", "{:.0f} params"), ("schedule.target_budget", "b_T={:.0f}"),
                 ("target_rank", "avg r={:g}"), ("lora_rank", "r={:.0f}"), ("init_rank", "r0={:.0f}"),
                 ("params.adapter_end", "{:.0f} adapter params"))
    return next((fmt.format(row[k]) for k, fmt in fallbacks if _num(row.get(k))), "")


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


def _num(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v)


def _py(v):
    """numpy scalar / NaN -> plain Python (None for NaN), for configs rebuilt from a table row."""
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float):  # counts come back as floats from a column that also holds NaN
        return None if np.isnan(v) else (int(v) if v.is_integer() else v)
    return v


def _read_safetensors(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        from safetensors.numpy import load_file
        return load_file(str(path))
    except (TypeError, ValueError):  # bfloat16 has no numpy dtype: go through torch
        from safetensors.torch import load_file as load_torch
        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}
