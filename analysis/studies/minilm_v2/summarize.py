"""The v2 study's numbers: run folders -> runs.csv, then runs.csv (+ tuned.json) -> results.md.

    python analysis/studies/minilm_v2/summarize.py build RUN_DIRS... [--tuned TUNED_JSON] [--out DIR]
    python analysis/studies/minilm_v2/summarize.py report [--out DIR]

`build` reads the run folders (through analysis.runs) and writes DIR/runs.csv, one row per run
(failed and unfinished runs included, with their status), and copies the tuning sweep's
tuned.json to DIR. `report` reads ONLY DIR/runs.csv and DIR/tuned.json and writes DIR/results.md,
so every number in it can be recomputed from the committed CSV. DIR defaults to this folder.

Statistics: differences are paired by seed (a seed's repeats averaged first), with the mean,
the 95 % t-interval mean ± t_{n−1,0.975}·sd/√n, the paired t-test's p and, within each table
(a family of comparisons), Holm-adjusted p-values (analysis.tables.paired_difference, holm).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

# run as a script from anywhere: the repository root (which holds `analysis`) goes on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from analysis import tables as T  # noqa: E402
from analysis.names import layer_index, matrix_type, type_order
from analysis.runs import config_columns, load_sweep

HERE = Path(__file__).resolve().parent
COMMAND = "python analysis/studies/minilm_v2/summarize.py report --out analysis/studies/minilm_v2"
TASKS = ("rotten_tomatoes", "reuters_r8", "reuters_r52")
TASK_METRICS = {"rotten_tomatoes": "accuracy", "reuters_r8": "macro_f1", "reuters_r52": "macro_f1"}
ADA, ADA_T, LORA, PEFT = "adalora", "adalora (α/target)", "lora", "peft_adalora"
SCALES = (ADA, ADA_T)
ABLATIONS = ("adalora[no_orth]", "adalora[sensitivity_only]", "adalora[magnitude]", "adalora[random_fixed]",
             "adalora[random_churn]", "lora[lora_on_found_ranks]")
MID = 2.0          # the budget (target rank) of the ablations, the peft check and the 3-epoch runs
COLUMNS = ["run", "task", "method", "label", "ablation", "seed", "target_rank", "init_rank", "matched_lora_rank",
           "lora_rank", "epochs", "scale_rule", "scaling", "lr", "head_lr", "params_start", "params_end",
           "adapter_end", "final_ranks", "status", "wall_time_s", "git_commit", "metric", "val", "test", "steps"]


# --- build: run folders -> runs.csv --------------------------------------------------------------

def build(dirs, out: Path, tuned: Path | None = None) -> pd.DataFrame:
    sweep = load_sweep([str(d) for d in dirs])
    r = sweep.runs.merge(config_columns(sweep, ["schedule.target_rank", "method.init_rank"]), on="run", how="left")
    get = lambda c: r[c] if c in r else pd.Series(np.nan, index=r.index)  # noqa: E731
    svd = r["method"].isin(["adalora", "svd_lora", "peft_adalora"])
    metric = get("task_metric").fillna(r["task"].map(TASK_METRICS)).fillna("accuracy")

    def final(split):  # the task's metric on a split, NaN where missing or unreadable
        cols = [f"final.{split}.{m}" for m in metric]
        return pd.to_numeric(pd.Series([r.at[i, c] if c in r else np.nan for i, c in zip(r.index, cols)],
                                       index=r.index, dtype=object), errors="coerce")
    ranks = {}
    for run, g in sweep.modules.dropna(subset=["final_rank"]).groupby("run"):
        ranks[run] = json.dumps({m: int(v) for m, v in zip(g["module"], g["final_rank"])}, sort_keys=True)
    df = pd.DataFrame({
        "run": r["run"], "task": r["task"], "method": r["method"], "label": r["label"],
        "ablation": get("ablation").fillna("none"), "seed": get("seed"),
        "target_rank": get("target_rank").fillna(get("schedule.target_rank")),
        "init_rank": get("init_rank").where(~svd | get("init_rank").notna(), get("method.init_rank")),
        "matched_lora_rank": get("budget.matched_lora_rank"), "lora_rank": get("lora_rank"),
        "epochs": get("epochs"), "scale_rule": get("scale_rule"), "scaling": get("scaling"), "lr": get("lr"),
        "head_lr": get("head_lr"), "params_start": get("params.trainable_start"),
        "params_end": get("params.trainable_end"), "adapter_end": get("params.adapter_end"),
        "final_ranks": r["run"].map(ranks), "status": r["status"], "wall_time_s": get("wall_time_s"),
        "git_commit": get("git_commit"), "metric": metric, "val": final("val"), "test": final("test"),
        "steps": get("steps")}, columns=COLUMNS).sort_values("run", kind="stable")
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "runs.csv", index=False)
    if tuned is not None:
        if Path(tuned).resolve() != (out / "tuned.json").resolve():
            shutil.copyfile(tuned, out / "tuned.json")
    return df


# --- report: runs.csv -> results.md --------------------------------------------------------------

def load(out: Path) -> tuple[pd.DataFrame, dict | None]:
    """runs.csv and tuned.json; refuses a CSV in which one method's runs of one task, budget and
    training length differ in a learning rate (a tuning sweep): they would be pooled."""
    runs = pd.read_csv(out / "runs.csv")
    done = runs[runs["status"] == "completed"]
    for col in ("lr", "head_lr"):
        mixed = done.groupby(["task", "label", "target_rank", "epochs"], dropna=False)[col].nunique() > 1
        if mixed.any():
            task, label, budget, epochs = mixed[mixed].index[0]
            raise ValueError(f"runs.csv: {label} on {task} (budget {budget:g}, {epochs:g} epochs) ran at several "
                             f"values of {col}; build it from the study's runs at the tuned learning rates, not "
                             "from a tuning sweep")
    tuned_path = out / "tuned.json"
    return runs, (json.loads(tuned_path.read_text()) if tuned_path.exists() else None)


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[(runs["status"] == "completed") & runs["test"].notna()]


def _tasks(runs: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(runs["task"].dropna()))
    return [t for t in TASKS if t in present] + sorted(t for t in present if t not in TASKS)


def _task_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the study's task order (then the rest alphabetically), stable within a task."""
    order = {t: i for i, t in enumerate(_tasks(df))}
    return df.sort_values("task", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def _diff_row(x: pd.Series, y: pd.Series, **keys) -> dict | None:
    """Paired difference x − y over the seeds (index) both have."""
    seeds = x.index.intersection(y.index)
    if len(seeds) == 0:
        return None
    r = T.paired_difference(x.loc[seeds].to_numpy(float), y.loc[seeds].to_numpy(float))
    return {**keys, "n": r["n"], "mean_diff": r["mean"], "sd_diff": r["sd"], "ci_low": r["lo"],
            "ci_high": r["hi"], "p_value": r["p"]}


def _per_seed(runs: pd.DataFrame, label: str, col: str = "test", **where) -> pd.Series:
    sel = runs["label"] == label
    for k, v in where.items():
        sel &= runs[k] == v
    return runs[sel].groupby("seed")[col].mean()


def _family(rows: list) -> pd.DataFrame:
    df = pd.DataFrame([r for r in rows if r is not None])
    if not df.empty:
        df["p_holm"] = T.holm(df["p_value"].to_numpy(float))
    return df


def summary_by_method(runs: pd.DataFrame) -> pd.DataFrame:
    """(a): task, label, target_rank, epochs, mean, sd, n of the test metric."""
    ok = completed(runs)
    g = ok.groupby(["task", "label", "target_rank", "epochs"], dropna=False)["test"]
    return g.agg(mean="mean", sd=lambda v: v.std(ddof=1), n="size").reset_index()


def gaps(runs: pd.DataFrame) -> pd.DataFrame:
    """(b): AdaLoRA − LoRA per task × budget × epochs, both AdaLoRA scales; Holm over all rows."""
    ok, rows = completed(runs), []
    for task in _tasks(ok):
        for (budget, epochs), _ in ok[ok["task"] == task].groupby(["target_rank", "epochs"]):
            where = dict(task=task, target_rank=budget, epochs=epochs)
            lora = _per_seed(ok, LORA, **where)
            for a in SCALES:
                rows.append(_diff_row(_per_seed(ok, a, **where), lora, task=task, budget=budget, epochs=epochs,
                                      comparison=f"{a} − {LORA}"))
    return _family(rows)


def scale_effect(runs: pd.DataFrame) -> pd.DataFrame:
    """(c1): AdaLoRA α/target − AdaLoRA α/r0, paired by seed, per task × budget × epochs."""
    ok, rows = completed(runs), []
    for task in _tasks(ok):
        for (budget, epochs), _ in ok[ok["task"] == task].groupby(["target_rank", "epochs"]):
            where = dict(task=task, target_rank=budget, epochs=epochs)
            rows.append(_diff_row(_per_seed(ok, ADA_T, **where), _per_seed(ok, ADA, **where), task=task,
                                  budget=budget, epochs=epochs, comparison=f"{ADA_T} − {ADA}"))
    return _family(rows)


def length_effect(runs: pd.DataFrame) -> pd.DataFrame:
    """(c2): (AdaLoRA − LoRA at 3 epochs) − (AdaLoRA − LoRA at 1 epoch), budget 2, paired by seed."""
    ok, rows = completed(runs), []
    for task in _tasks(ok):
        for a in SCALES:
            gap = {}
            for e in (1.0, 3.0):
                where = dict(task=task, target_rank=MID, epochs=e)
                x, y = _per_seed(ok, a, **where), _per_seed(ok, LORA, **where)
                gap[e] = (x - y).dropna()
            rows.append(_diff_row(gap[3.0], gap[1.0], task=task, budget=MID,
                                  comparison=f"({a} − {LORA}) at 3 epochs − at 1 epoch"))
    return _family(rows)


def ablations(runs: pd.DataFrame) -> pd.DataFrame:
    """(d): each ablation − full AdaLoRA (α/r0), budget 2, 1 epoch; Holm over all rows."""
    ok, rows = completed(runs), []
    for task in _tasks(ok):
        where = dict(task=task, target_rank=MID, epochs=1.0)
        full = _per_seed(ok, ADA, **where)
        for label in ABLATIONS:
            v = _per_seed(ok, label, **where)
            row = _diff_row(v, full, task=task, comparison=f"{label} − {ADA}")
            if row is not None:
                row.update(mean_variant=v.mean(), sd_variant=v.std(ddof=1), n_variant=len(v))
            rows.append(row)
    return _family(rows)


def _ranks(cell) -> dict:
    """final_ranks JSON -> {(layer, matrix type): rank}: names of one module agree across
    implementations (ours, peft's wrapper prefixes) by layer and type."""
    if not isinstance(cell, str) or not cell:
        return {}
    return {(layer_index(m), matrix_type(m)): int(v) for m, v in json.loads(cell).items()}


def _l1(x: dict, y: dict) -> int:
    return sum(abs(x.get(k, 0) - y.get(k, 0)) for k in set(x) | set(y))


def peft_check(runs: pd.DataFrame) -> pd.DataFrame:
    """(e): peft's AdaLoRA − ours (α/r0) at budget 2, 1 epoch, and the L1 distance between the
    per-module final ranks of the two runs of each seed (against ours across different seeds)."""
    ok, rows = completed(runs), []
    for task in _tasks(ok):
        where = dict(task=task, target_rank=MID, epochs=1.0)
        row = _diff_row(_per_seed(ok, PEFT, **where), _per_seed(ok, ADA, **where), task=task,
                        comparison=f"{PEFT} − {ADA}")
        if row is None:
            continue
        sel = lambda label: ok[(ok["label"] == label) & (ok["task"] == task) & (ok["target_rank"] == MID)  # noqa: E731
                               & (ok["epochs"] == 1.0)].drop_duplicates("seed").set_index("seed")["final_ranks"]
        ours, peft = sel(ADA).map(_ranks), sel(PEFT).map(_ranks)
        same = [_l1(ours[s], peft[s]) for s in ours.index.intersection(peft.index) if ours[s] and peft[s]]
        cross = [_l1(ours[s], ours[t]) for s, t in combinations(ours.index, 2) if ours[s] and ours[t]]
        row.update(l1_same_seed=np.mean(same) if same else np.nan, n_l1=len(same),
                   l1_ours_across_seeds=np.mean(cross) if cross else np.nan, n_cross=len(cross))
        rows.append(row)
    return _family(rows)


def rank_shares(runs: pd.DataFrame, by: str) -> pd.DataFrame:
    """(g): AdaLoRA-like runs at budget 2: mean over seeds of the summed final rank per matrix
    type (by="mtype") or per layer (by="layer")."""
    ok, rows = completed(runs), []
    ok = ok[(ok["target_rank"] == MID) & ok["label"].isin([ADA, ADA_T, PEFT]) & ok["final_ranks"].notna()]
    for _, r in ok.iterrows():
        for (layer, mtype), rank in _ranks(r["final_ranks"]).items():
            rows.append({"task": r["task"], "label": r["label"], "epochs": r["epochs"], "run": r["run"],
                         "layer": layer, "mtype": mtype, "rank": rank})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    keys = ["task", "label", "epochs"]
    per_run = df.groupby([*keys, "run", by])["rank"].sum().unstack(by, fill_value=0)
    table = per_run.groupby(level=keys).mean()
    order = type_order(table.columns) if by == "mtype" else sorted(table.columns)
    table = table[order]
    table.columns = [str(c) if by == "mtype" else f"layer {c}" for c in order]
    table["n"] = per_run.groupby(level=keys).size()
    return _task_order(table.reset_index())


# --- formatting ----------------------------------------------------------------------------------

def _f(v, digits=4, sign=False):
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _p(v):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"


def _g(v):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:g}"


def _diff_display(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if df.empty:
        return df
    k = int(df["p_value"].notna().sum())
    out = {key: (df[key].map(_g) if key in ("budget", "epochs") else df[key]) for key in keys}
    out.update({"comparison": df["comparison"], "n": df["n"], "mean diff": df["mean_diff"].map(lambda v: _f(v, sign=True)),
                "95% t-interval": [f"[{_f(lo, sign=True)}, {_f(hi, sign=True)}]" for lo, hi in zip(df["ci_low"], df["ci_high"])],
                "p": df["p_value"].map(_p), f"p Holm (k={k})": df["p_holm"].map(_p)})
    return pd.DataFrame(out)


def _md(df: pd.DataFrame) -> str:
    return T.to_markdown(df) if not df.empty else "_(no completed runs for this table)_"


def _summary_display(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    cell = [f"{m:.4f} ± {s:.4f} (n={n})" if n > 1 else f"{m:.4f} (n=1)"
            for m, s, n in zip(table["mean"], table["sd"], table["n"])]
    wide = table.assign(cell=cell).pivot(index=["label", "target_rank", "epochs"], columns="task", values="cell")
    metric = runs.drop_duplicates("task").set_index("task")["metric"]
    wide = wide[[t for t in _tasks(table) if t in wide.columns]]
    wide.columns = [f"{t} ({metric.get(t, '?')})" for t in wide.columns]
    wide = wide.reset_index().sort_values(["target_rank", "epochs", "label"], kind="stable")
    wide["target_rank"], wide["epochs"] = wide["target_rank"].map(_g), wide["epochs"].map(_g)
    return wide.rename(columns={"label": "method", "target_rank": "budget (avg rank)"}).fillna("–")


def _params_display(runs: pd.DataFrame) -> pd.DataFrame:
    ok = completed(runs)
    ok = ok[ok["epochs"] == 1.0]
    if ok.empty:
        return ok
    t = ok.groupby(["task", "target_rank", "label"]).agg(
        adapter_end=("adapter_end", "mean"), params_end=("params_end", "mean"),
        lora_rank=("lora_rank", lambda v: ", ".join(sorted({_g(x) for x in v.dropna()}))), n=("run", "size"))
    t = _task_order(t.reset_index())
    t["target_rank"] = t["target_rank"].map(_g)
    t["adapter_end"], t["params_end"] = t["adapter_end"].map(lambda v: f"{v:,.0f}"), t["params_end"].map(lambda v: f"{v:,.0f}")
    return t.rename(columns={"target_rank": "budget (avg rank)", "label": "method",
                             "adapter_end": "adapter params at the end (mean)",
                             "params_end": "trainable params at the end (mean)", "lora_rank": "LoRA rank"})


def _tuned_display(tuned: dict | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not tuned:
        return pd.DataFrame(), pd.DataFrame()
    chosen, grid = [], []
    for task in sorted(tuned, key=lambda t: (t not in TASKS, TASKS.index(t) if t in TASKS else 0, t)):
        for label, c in sorted(tuned[task].items()):
            sd = c.get("val_sd")
            chosen.append({"task": task, "method": label,
                           "chosen": ", ".join(f"{k}={_g(v)}" for k, v in c["overrides"].items()),
                           "validation metric, mean ± sd (n)": f"{_f(c['val_mean'])}"
                           + (f" ± {_f(sd)}" if sd is not None else "") + f" (n={c['n']})"})
            for e in c.get("grid", []):
                setting = ", ".join(f"{k}={_g(e[k])}" for k in c["overrides"])
                grid.append({"task": task, "method": label, "setting": setting,
                             "val mean": _f(e["val_mean"]), "val sd": _f(e.get("val_sd")), "n": e["n"],
                             "eligible": "yes" if e.get("eligible", True) else "no (fewer seeds)"})
    return pd.DataFrame(chosen), pd.DataFrame(grid)


def build_check(dirs, out: Path) -> pd.DataFrame:
    """Runs past the tuning grid, made after the choice as a check (they change no setting):
    ``lr_check.csv``, one row per run with its validation metric."""
    sweep = load_sweep([str(d) for d in dirs])
    r = sweep.runs[sweep.runs["status"] == "completed"]
    metric = r["task"].map(TASK_METRICS).fillna("accuracy")
    val = [r.at[i, f"final.val.{m}"] for i, m in zip(r.index, metric)]
    df = pd.DataFrame({"run": r["run"], "task": r["task"], "label": r["label"], "seed": r["seed"],
                       "lr": r["lr"], "metric": metric, "val": val}).sort_values("run", kind="stable")
    df.to_csv(out / "lr_check.csv", index=False)
    return df


def _check_display(out: Path, tuned: dict | None) -> pd.DataFrame:
    path = out / "lr_check.csv"
    if not path.exists() or not tuned:
        return pd.DataFrame()
    chk = pd.read_csv(path)
    rows = []
    for (task, label, lr), g in chk.groupby(["task", "label", "lr"], sort=False):
        c = tuned.get(task, {}).get(label)
        if c is None:
            continue
        rows.append({"task": task, "method": label, "chosen": ", ".join(f"{k}={_g(v)}" for k, v in c["overrides"].items()),
                     "val mean at the chosen lr": _f(c["val_mean"]), "check": f"trainer.lr={_g(lr)}",
                     "val mean at the check": _f(g["val"].mean()), "n": len(g),
                     "check − chosen": _f(g["val"].mean() - c["val_mean"], sign=True)})
    return _task_order(pd.DataFrame(rows)) if rows else pd.DataFrame()


def report(out: Path) -> str:
    runs, tuned = load(out)
    status = runs["status"].value_counts()
    bad = runs[runs["status"] != "completed"]
    md = ["# Study v2 results: AdaLoRA vs LoRA on all-MiniLM-L6-v2, tuned learning rates, scale and training length controlled",
          "",
          f"Every number in this file is computed from [`runs.csv`](runs.csv) (and [`tuned.json`](tuned.json) for "
          f"section f) by `{COMMAND}`; nothing is typed by hand.",
          "",
          f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in status.items()) + ". "
          f"Test metric per task: " + ", ".join(f"{t} {TASK_METRICS.get(t, '?')}" for t in _tasks(runs)) + ". "
          "Differences are paired by seed: mean, 95 % t-interval (mean ± t_{n−1,0.975}·sd/√n), paired t-test p, "
          "and p Holm-adjusted over the k comparisons of each table. "
          f"Run time summed over the runs: {runs['wall_time_s'].sum() / 3600:.1f} h.", ""]
    if len(bad):
        md += ["Runs that did not complete (left out of every table):", ""]
        md += [f"- `{r.run}`: {r.status}" for r in bad.itertuples()] + [""]

    md += ["## a. Test metric, mean ± sd (n seeds), per task × budget × epochs × method", "",
           _md(_summary_display(summary_by_method(runs), runs)), "",
           "Parameters at the end (1 epoch, completed runs, mean over seeds):", "", _md(_params_display(runs)), ""]
    md += ["## b. AdaLoRA − budget-matched LoRA, paired by seed (test)", "",
           "Both AdaLoRA scales against LoRA at its default α/r; one family, Holm over all its rows.", "",
           _md(_diff_display(gaps(runs), ["task", "budget", "epochs"])), ""]
    md += ["## c. Confounds", "", "### c1. Scale: AdaLoRA α/target − AdaLoRA α/r0, paired by seed (test)", "",
           _md(_diff_display(scale_effect(runs), ["task", "budget", "epochs"])), "",
           "### c2. Training length: the AdaLoRA − LoRA gap at 3 epochs minus the gap at 1 epoch, budget 2, "
           "paired by seed (test)", "",
           _md(_diff_display(length_effect(runs), ["task", "budget"])), ""]
    abl = ablations(runs)
    abl_disp = _diff_display(abl, ["task"])
    if not abl.empty:
        abl_disp.insert(2, "variant mean ± sd (n)",
                        [f"{_f(m)} ± {_f(s)} (n={n})" for m, s, n in zip(abl["mean_variant"], abl["sd_variant"], abl["n_variant"])])
    md += ["## d. Ablations − full AdaLoRA (α/r0), budget 2, 1 epoch, paired by seed (test)", "",
           _md(abl_disp), ""]
    peft = peft_check(runs)
    peft_disp = _diff_display(peft, ["task"])
    if not peft.empty:
        peft_disp["final ranks L1, same seed (pairs)"] = [f"{_f(v, 2)} ({n})" for v, n in zip(peft["l1_same_seed"], peft["n_l1"])]
        peft_disp["ours vs ours, different seeds (pairs)"] = [f"{_f(v, 2)} ({n})" for v, n in
                                                              zip(peft["l1_ours_across_seeds"], peft["n_cross"])]
    md += ["## e. peft's AdaLoRA − ours, budget 2, 1 epoch (test), and agreement of final ranks", "",
           "L1: Σ over adapted matrices (matched by layer and matrix type) of |rank_peft − rank_ours| between the "
           "two runs of one seed, mean over seeds; for scale, the same distance between our runs of different seeds.", "",
           _md(peft_disp), ""]
    chosen, grid = _tuned_display(tuned)
    md += ["## f. Tuned learning rates (validation split only)", ""]
    if tuned is None:
        md += ["_(no tuned.json)_", ""]
    else:
        md += [_md(chosen), "", "The grid (mean validation metric over the tuning seeds):", "", _md(grid), ""]
        check = _check_display(out, tuned)
        if not check.empty:
            md += ["Past the grid's edge, run after the choice as a check (no setting was changed by it; "
                   "[`lr_check.csv`](lr_check.csv)):", "", _md(check), ""]
    md += ["## g. Where the rank goes: final rank at budget 2, summed per matrix type / per layer, mean over seeds", ""]
    for by, title in (("mtype", "Per matrix type"), ("layer", "Per layer")):
        t = rank_shares(runs, by)
        if not t.empty:
            t["epochs"] = t["epochs"].map(_g)
            t = t.assign(**{c: t[c].map(lambda v: _f(v, 2)) for c in t.columns if c not in ("task", "label", "epochs", "n")})
            t = t.rename(columns={"label": "method"})
        md += [f"{title}:", "", _md(t), ""]
    text = "\n".join(md)
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("build", help="run folders -> runs.csv (+ tuned.json)")
    b.add_argument("dirs", nargs="+", type=Path)
    b.add_argument("--tuned", type=Path, default=None, help="the tuning sweep's tuned.json, copied next to runs.csv")
    b.add_argument("--out", type=Path, default=HERE)
    b.add_argument("--check", type=Path, nargs="*", default=[],
                   help="runs past the tuning grid made after the choice, written to lr_check.csv")
    r = sub.add_parser("report", help="runs.csv (+ tuned.json) -> results.md")
    r.add_argument("--out", type=Path, default=HERE)
    a = ap.parse_args(argv)
    if a.mode == "build":
        df = build(a.dirs, a.out, a.tuned)
        if a.check:
            build_check(a.check, a.out)
        print(f"wrote {a.out / 'runs.csv'} ({len(df)} runs, {int((df['status'] == 'completed').sum())} completed)")
    else:
        if not (a.out / "runs.csv").exists():
            print(f"error: {a.out / 'runs.csv'} not found: run the build mode first", file=sys.stderr)
            return 2
        try:
            report(a.out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {a.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
