"""Across runs: metric versus trainable parameters (AdaLoRA against LoRA and the other methods,
mean ± sd over seeds) and learning curves per method. Completed runs only: an unfinished run's
last evaluation is not a result."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.ticker import EngFormatter, NullFormatter

from analysis.plots.style import LINESTYLES, method_colour, method_name, plt

PARAM_LABELS = {"params.trainable_end": "trainable parameters at the end of training",
                "params.adapter_end": "adapter parameters at the end of training",
                "params.trainable_start": "trainable parameters at the start"}


def metric_vs_params(sweep, metric: str = "accuracy", split: str = "test",
                     params: str = "params.trainable_end"):
    """One panel per task; a line per method through its budgets, error bars = sd over seeds."""
    col = f"final.{split}.{metric}"
    runs = sweep.runs[sweep.runs["ok"]]
    if col not in runs or runs[col].isna().all():
        raise ValueError(f"no completed run has {col} (metrics present: "
                         f"{sorted(c for c in sweep.runs if c.startswith('final.'))})")
    runs = runs[runs[col].notna() & runs[params].notna()]
    tasks = sorted(runs["task"].dropna().unique()) or [None]
    fig, axes = plt.subplots(1, len(tasks), squeeze=False, figsize=(5.5 * len(tasks), 4.2), layout="constrained")
    for ax, task in zip(axes[0], tasks):
        sub = runs if task is None else runs[runs["task"] == task]
        stats = (sub.groupby(["label", "budget_label"], dropna=False)
                 .agg(x=(params, "mean"), y=(col, "mean"), sd=(col, "std"), n=(col, "size")).reset_index())
        labels = sorted(stats["label"].unique())
        for k, (label, g) in enumerate(stats.groupby("label")):
            g = g.sort_values("x")
            # budget-matched methods share x exactly; a ±2% dodge keeps their error bars apart
            dodge = 1.02 ** (k - (len(labels) - 1) / 2)
            n = f"n={g['n'].min()}" if g["n"].min() == g["n"].max() else f"n={g['n'].min()}-{g['n'].max()}"
            budgets = ", ".join(b for b in g["budget_label"].astype(str) if b and b != "nan")
            ax.errorbar(g["x"] * dodge, g["y"], yerr=g["sd"].fillna(0), color=method_colour(label), marker="o",
                        capsize=3, lw=1.8, label=f"{method_name(label)} ({budgets}; {n} seeds)" if budgets
                        else f"{method_name(label)} ({n} seeds)")
        ax.set_xscale("log")
        lo, hi = sub[params].min(), sub[params].max()
        if hi / lo < 4:  # a single budget would otherwise zoom the log axis onto the ±2% dodge
            ax.set_xlim(lo / 2, hi * 2)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        # under a decade of range there is one major tick at most: label the minor ones too
        ax.xaxis.set_minor_formatter(EngFormatter(sep="") if hi / lo < 10 else NullFormatter())
        ax.set_xlabel(f"{PARAM_LABELS.get(params, params)} (count, log scale)")
        ax.set_ylabel(f"{split} {metric}")
        ax.set_title(f"{split} {metric} vs parameters" + (f": {task}" if task else ""))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, title="method (budgets; seeds), mean ± sd\nx dodged ±2% per method",
                  title_fontsize=8)
    return fig


def learning_curves(sweep, metric: str = "accuracy", runs=None):
    """Train task loss, orthogonality term and validation metric over steps. Thin lines: single
    runs; thick: mean over seeds per (method, budget)."""
    meta = sweep.runs.set_index("run")
    # completed runs by default: a crashed run's partial curve would bend the mean
    pick = sweep.runs.loc[sweep.runs["ok"], "run"] if runs is None else pd.Series(list(runs))
    m = sweep.metrics[sweep.metrics["run"].isin(pick)]
    if m.empty:
        raise ValueError("no metrics.jsonl records in the selected runs")
    m = m.assign(label=m["run"].map(meta["label"]), budget=m["run"].map(meta["budget_label"]).fillna(""))
    panels = [("train", "loss", "train task loss (no orth term)"), ("train", "orth", "orthogonality term R"),
              ("val", metric, f"val {metric}")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    for ax, (split, key, ylabel) in zip(axes, panels):
        part = m[(m["split"] == split)]
        if key not in part or part[key].isna().all():
            ax.text(0.5, 0.5, f"no '{key}' logged on split '{split}'", ha="center", va="center",
                    transform=ax.transAxes)
        for (label, budget), g in part.groupby(["label", "budget"]) if key in part else ():
            style = LINESTYLES[sorted(part.loc[part["label"] == label, "budget"].unique()).index(budget)
                               % len(LINESTYLES)]
            colour = method_colour(label)
            for _, r in g.groupby("run"):
                ax.plot(r["step"], r[key], color=colour, ls=style, lw=0.7, alpha=0.35)
            mean = g.groupby("step")[key].mean()
            n = g["run"].nunique()
            ax.plot(mean.index, mean.to_numpy(), color=colour, ls=style, lw=2,
                    label=f"{method_name(label)}{' ' + budget if budget else ''} (n={n})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel[0].upper() + ylabel[1:])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Learning curves (thick: mean over seeds, thin: single runs)")
    return fig
