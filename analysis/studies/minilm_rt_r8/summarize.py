"""Numbers and figures of the study, from its run folders only (through analysis.runs).

    python analysis/studies/minilm_rt_r8/summarize.py multirun/study [--peft multirun/study_cpu_peft]

Writes, next to this file: runs.csv (tidy, one row per run), results.md (every table the
report quotes) and figures/*.png|pdf. report.md is written by hand from results.md.
"""
from __future__ import annotations

import argparse
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from analysis import plots, tables
from analysis.runs import load_sweep

HERE = Path(__file__).resolve().parent
METRIC = {"rotten_tomatoes": "accuracy", "reuters_r8": "macro_f1"}
FFN = {"ffn-in", "ffn-out"}


def md(df: pd.DataFrame, digits: int = 4) -> str:
    return tables.to_markdown(df.round(digits))


def q1(sweep) -> str:
    out = ["## Q1. AdaLoRA vs parameter-matched LoRA (test split, mean ± sd over 5 seeds)\n"]
    for task, metric in METRIC.items():
        runs = sweep.runs[(sweep.runs.task == task) & (sweep.runs.ablation == "none")]
        sub = sweep.select(runs.run)
        pc = tables.paired_comparison(sub, metric=metric, split="test")
        params = runs.groupby(["label", "pair_budget"])["params.adapter_end"].mean().unstack(0)
        out.append(f"### {task} ({metric})\n")
        out.append(md(tables.format_paired(pc)))
        out.append("\nAdapter parameters at the end (mean over seeds; AdaLoRA's depends on where ranks land):\n")
        out.append(md(params.reset_index(), 0))
        # accuracy on R8 too, since it is the paper-style headline metric
        if metric != "accuracy":
            pa = tables.paired_comparison(sub, metric="accuracy", split="test")
            out.append(f"\n{task}, accuracy:\n")
            out.append(md(tables.format_paired(pa)))
        out.append("")
    return "\n".join(out)


def q2(sweep) -> str:
    mods = sweep.modules.merge(sweep.runs[["run", "method", "ablation", "task", "seed", "target_rank"]], on="run")
    ada = mods[(mods.method == "adalora") & (mods.ablation == "none")]
    out = ["## Q2. Where the rank goes (AdaLoRA, final ranks, mean over seeds)\n"]
    by_type = ada.groupby(["task", "target_rank", "mtype"])["final_rank"].sum().unstack("mtype")
    by_type = by_type.div(ada.groupby(["task", "target_rank"]).seed.nunique(), axis=0)
    share = by_type.div(by_type.sum(axis=1), axis=0)
    out.append("Share of the final budget by matrix type (uniform = 0.167 each):\n")
    out.append(md(share.reset_index(), 3))
    by_layer = ada.groupby(["task", "target_rank", "layer"])["final_rank"].sum().unstack("layer")
    by_layer = by_layer.div(by_layer.sum(axis=1), axis=0)
    out.append("\nShare of the final budget by layer (uniform = 0.167 each):\n")
    out.append(md(by_layer.reset_index(), 3))
    # agreement of allocations across seeds: is the pattern a property of the task or noise?
    rows = []
    for (task, tr), g in ada.groupby(["task", "target_rank"]):
        piv = g.pivot_table(index="module", columns="seed", values="final_rank")
        rhos = [stats.spearmanr(piv[a], piv[b]).statistic for a, b in combinations(piv.columns, 2)]
        rows.append({"task": task, "target_rank": tr, "mean Spearman across seed pairs": np.nanmean(rhos),
                     "ffn share": share.loc[(task, tr)][[c for c in share.columns if c in FFN]].sum()})
    out.append("\nSeed-to-seed agreement of per-module final ranks, and the feed-forward share:\n")
    out.append(md(pd.DataFrame(rows), 3))
    return "\n".join(out)


def q3(sweep) -> str:
    runs = sweep.runs[(sweep.runs.task == "rotten_tomatoes") & (sweep.runs.pair_budget.astype(str) != "")]
    base = runs[(runs.method == "adalora") & (runs.ablation == "none") & (runs.target_rank == 2.0)]
    abl = runs[(runs.ablation != "none")]
    col = "final.test.accuracy"
    ref = base.groupby("seed")[col].mean()
    rows = [{"variant": "adalora (full method)", "mean": ref.mean(), "sd": ref.std(ddof=1), "n": len(ref),
             "diff vs full": 0.0, "95% CI of diff": "", "paired p": np.nan}]
    lora = runs[(runs.method == "lora") & (runs.ablation == "none") & (runs.lora_rank == 2)].groupby("seed")[col].mean()
    for name, v in [("lora r=2 (matched)", lora)] + [(a, g.groupby("seed")[col].mean()) for a, g in abl.groupby("ablation")]:
        seeds = v.index.intersection(ref.index)
        d = (v.loc[seeds] - ref.loc[seeds]).to_numpy()
        lo, hi = tables.bootstrap_ci(d)
        rows.append({"variant": name, "mean": v.mean(), "sd": v.std(ddof=1), "n": len(v),
                     "diff vs full": d.mean(), "95% CI of diff": f"[{lo:+.4f}, {hi:+.4f}]",
                     "paired p": stats.ttest_rel(v.loc[seeds], ref.loc[seeds]).pvalue})
    out = ["## Q3. Ablations at the middle budget (Rotten Tomatoes, target rank 2 from 3, test accuracy)\n",
           md(pd.DataFrame(rows))]
    return "\n".join(out)


def q4(peft_dir: Path | None) -> str:
    if peft_dir is None or not peft_dir.exists():
        return "## Q4. peft comparison\n\nNot run.\n"
    sw = load_sweep([str(peft_dir)])
    runs = sw.runs[sw.runs.ok]
    out = ["## Q4. Ours vs peft's AdaLoRA (CPU, reduced setting: 3,000 training reviews, 1 epoch)\n"]
    acc = runs.groupby(["method"])["final.test.accuracy"].agg(["mean", "std", "size"]).reset_index()
    out.append(md(acc))
    mods = sw.modules.merge(runs[["run", "method", "seed"]], on="run")
    piv = mods.pivot_table(index="module", columns=["method", "seed"], values="final_rank")
    rows = []
    for s in sorted(runs.seed.unique()):
        if ("adalora", s) in piv and ("peft_adalora", s) in piv:
            rho = stats.spearmanr(piv[("adalora", s)], piv[("peft_adalora", s)]).statistic
            same = float((piv[("adalora", s)] == piv[("peft_adalora", s)]).mean())
            rows.append({"seed": s, "Spearman(ours, peft)": rho, "modules with equal rank": same})
    ours = [c for c in piv.columns if c[0] == "adalora"]
    cross = [stats.spearmanr(piv[a], piv[b]).statistic for a, b in combinations(ours, 2)]
    out.append("\nPer-module final ranks, same seed:\n")
    out.append(md(pd.DataFrame(rows), 3))
    out.append(f"\nFor scale: ours against ours across different seeds, mean Spearman {np.nanmean(cross):.3f}.\n")
    return "\n".join(out)


def figures(sweep) -> None:
    fig_dir = HERE / "figures"
    fig_dir.mkdir(exist_ok=True)
    main = sweep.runs[sweep.runs.ablation == "none"]
    sub = sweep.select(main.run)
    for task, metric in METRIC.items():
        t = sweep.select(main[main.task == task].run)
        plots.save(plots.metric_vs_params(t, metric=metric, split="test"), fig_dir / f"metric_vs_params_{task}")
        seed0 = main[(main.task == task) & (main.method == "adalora") & (main.seed == 0)].sort_values("target_rank")
        plots.save(plots.rank_heatmaps(sweep, list(seed0.run)), fig_dir / f"rank_heatmaps_{task}_seed0")
    r2 = main[(main.task == "rotten_tomatoes") & (main.method == "adalora") & (main.target_rank == 2.0)
              & (main.seed == 0)].run.iloc[0]
    plots.save(plots.rank_timeline(sweep, r2), fig_dir / "rank_timeline_rt_r2_seed0")
    plots.save(plots.allocation_summary(sweep, r2), fig_dir / "allocation_rt_r2_seed0")
    plots.save(plots.spectra(sweep, r2), fig_dir / "spectra_rt_r2_seed0")
    plots.save(plots.learning_curves(sub), fig_dir / "learning_curves")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--peft", type=Path, default=None)
    a = ap.parse_args()
    dirs = [str(a.root / d) for d in ("budgets", "ablations", "ablations2", "found") if (a.root / d).exists()]
    sweep = load_sweep(dirs)
    sweep.runs.drop(columns=["path"]).to_csv(HERE / "runs.csv", index=False)
    (HERE / "results.md").write_text("\n\n".join([q1(sweep), q2(sweep), q3(sweep), q4(a.peft)]) + "\n")
    figures(sweep)
    print(f"wrote {HERE / 'results.md'}, runs.csv and figures/ from {len(sweep.runs)} runs")


if __name__ == "__main__":
    main()
