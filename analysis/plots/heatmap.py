"""Rank heatmap: final rank of every adapted matrix, layers x matrix type (the AdaLoRA paper's
Figure 1, which no public implementation draws). One run, or several side by side on one scale."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.names import row_order, type_order
from analysis.plots.style import plt, run_title


def rank_grid(modules: pd.DataFrame, value: str = "final_rank") -> pd.DataFrame:
    """modules table of one run -> DataFrame rows=layer labels, columns=matrix types (NaN: not adapted)."""
    grid = modules.pivot_table(index="row", columns="mtype", values=value, aggfunc="first")
    return grid.reindex(index=row_order(modules), columns=type_order(modules["mtype"]))


def _draw(ax, grid: pd.DataFrame, vmax: float, cmap):
    data = np.ma.masked_invalid(grid.to_numpy(dtype=float))
    im = ax.imshow(data, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
        if np.isfinite(v):  # dark text on light cells, light on dark, so every number reads
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                    color="white" if v > 0.6 * vmax else "black")
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=0 if grid.shape[1] <= 8 else 45)
    ax.set_yticks(range(grid.shape[0]), grid.index)
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    return im


def _cmap():
    # matrices that were not adapted: grey, not rank 0
    return plt.get_cmap("viridis_r").with_extremes(bad="#eeeeee")


def _vmax(sweep, runs) -> float:
    m = sweep.modules[sweep.modules["run"].isin(runs)]
    return float(np.nanmax([m["final_rank"].max(), m["init_rank"].max(), 1]))


def rank_heatmap(sweep, run: str, ax=None):
    """Final rank per (layer, matrix type) of one run, the rank written in each cell."""
    modules = sweep.modules[(sweep.modules["run"] == run) & sweep.modules["final_rank"].notna()]
    if modules.empty:
        raise ValueError(f"run {run!r} has no final ranks (no summary.final_ranks, no ranks.jsonl)")
    fig = ax.figure if ax is not None else plt.figure(layout="constrained", figsize=(1.0 + 0.75 * modules["mtype"].nunique(),
                                                               1.2 + 0.32 * modules["row"].nunique()))
    ax = ax or fig.add_subplot()
    vmax = _vmax(sweep, [run])
    im = _draw(ax, rank_grid(modules), vmax, _cmap())
    row = sweep.row(run)
    total, r0 = int(modules["final_rank"].sum()), modules["init_rank"].max()
    ax.set_title(f"Final rank per matrix\n{run_title(row)}\n"
                 f"total {total} singular values" + (f", initial rank {r0:.0f}" if pd.notna(r0) else ""),
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="final rank (singular values kept)")
    return fig


def rank_heatmaps(sweep, runs, titles=None):
    """Several runs (budgets, tasks, methods) side by side on one colour scale, one colour bar."""
    runs = list(runs)
    vmax = _vmax(sweep, runs)
    first = sweep.modules[sweep.modules["run"] == runs[0]]
    fig, axes = plt.subplots(1, len(runs), squeeze=False, sharey=True, layout="constrained",
                             figsize=(1.2 + (0.5 * first["mtype"].nunique() + 0.5) * len(runs),
                                      1.8 + 0.32 * max(first["row"].nunique(), 1)))
    im = None
    for k, (ax, run) in enumerate(zip(axes[0], runs)):
        modules = sweep.modules[(sweep.modules["run"] == run) & sweep.modules["final_rank"].notna()]
        if modules.empty:
            ax.set_axis_off()
            ax.set_title(f"{run}: no final ranks", fontsize=9)
            continue
        im = _draw(ax, rank_grid(modules), vmax, _cmap())
        title = titles[k] if titles else run_title(sweep.row(run))
        ax.set_title(f"{title}\ntotal {int(modules['final_rank'].sum())}", fontsize=9)
        if k:
            ax.set_ylabel("")
    fig.suptitle("Final rank per matrix (shared colour scale)", fontsize=11)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label="final rank (singular values kept)", shrink=0.9,
                     aspect=30)
    return fig
