"""Rank over training: total budget scheduled (adalora.schedule) against realised (ranks.jsonl),
and the rank of every adapted matrix over steps, coloured by matrix type."""
from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from analysis.names import type_order
from analysis.plots.style import METHOD_COLOURS, plt, run_title, type_colour


def rank_timeline(sweep, run: str):
    """Two panels sharing the step axis: total budget (top), per-module rank (bottom)."""
    from analysis.schedule import scheduled_budget, shade_phases  # lazy: pulls in adalora/torch
    alloc = sweep.allocations[sweep.allocations["run"] == run].sort_values("step")
    ranks = sweep.ranks[sweep.ranks["run"] == run]
    if alloc.empty:
        raise ValueError(f"run {run!r} has no ranks.jsonl records: nothing to draw over time")
    schedule = sweep.schedule(run)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), layout="constrained",
                                      height_ratios=(1, 1.3))
    last = int(schedule["total_steps"]) if schedule else int(alloc["step"].max())
    if schedule:
        shade_phases(top, schedule)
        shade_phases(bottom, schedule, label=False)
        steps = np.arange(last + 1)
        top.plot(steps, scheduled_budget(schedule, steps), color="#555555", lw=1.5,
                 label="scheduled b(t) (adalora.schedule)")
    # The realised total holds from one mask step to the next, hence a step plot extended to the end.
    xs = np.append(alloc["step"].to_numpy(), last)
    ys = np.append(alloc["realised"].to_numpy(), alloc["realised"].iloc[-1])
    top.step(xs, ys, where="post", color=METHOD_COLOURS["adalora"], lw=2, label="realised Σ ranks (ranks.jsonl)")
    top.plot(alloc["step"], alloc["budget"], "o", ms=3, color="#222222", label="budget at mask step")
    top.set_ylabel("singular values kept\n(all adapters)")
    top.set_title(f"Rank over training: {run_title(sweep.row(run))}", pad=16)
    top.legend(fontsize=8, loc="upper right")

    types = type_order(ranks["mtype"].dropna())
    ranks = ranks.sort_values("step")
    for module, g in ranks.groupby("module", sort=False):  # thin: every module
        x = np.append(g["step"].to_numpy(), last)
        y = np.append(g["rank"].to_numpy(), g["rank"].iloc[-1])
        bottom.step(x, y, where="post", color=type_colour(g["mtype"].iloc[0]), lw=0.8, alpha=0.35)
    # thick: the mean per matrix type, because many modules share a rank and hide each other
    for t, g in ranks.groupby("mtype"):
        mean = g.groupby("step")["rank"].mean()
        bottom.step(np.append(mean.index, last), np.append(mean.to_numpy(), mean.iloc[-1]), where="post",
                    color=type_colour(t), lw=2.5)
    bottom.legend([Line2D([], [], color=type_colour(t), lw=2.5) for t in types], types,
                  title="matrix type (thick: mean over layers)", fontsize=8, ncols=min(len(types), 4),
                  loc="upper right")
    bottom.set_xlabel("optimizer step")
    bottom.set_ylabel("rank per matrix\n(thin: one line per module)")
    bottom.set_xlim(0, last)
    return fig
