"""Rank over training: total budget scheduled (adalora.schedule) against realised (ranks.jsonl),
in the schedule's unit (singular values, or parameters under schedule.budget_unit=params), and
the rank of every adapted matrix over steps, coloured by matrix type."""
from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from analysis.names import type_order
from analysis.plots.style import METHOD_COLOURS, plt, run_title, type_colour


UNIT_AXIS = {"values": "singular values kept\n(all adapters)", "params": "adapter parameters kept\n(all adapters)"}


def realised_budget(sweep, run: str, unit: str):
    """(realised total, budget at each mask step) per ranks.jsonl record, in the schedule's unit;
    None for what the run does not record. In parameters a kept value costs d_in + d_out + 1
    (the allocator's price): `params_kept` as recorded, else Σ rank × price from module shapes."""
    alloc = sweep.allocations[sweep.allocations["run"] == run].sort_values("step")
    if unit != "params":
        return alloc["realised"].to_numpy(), alloc["budget"].to_numpy()
    marks = alloc["target"].to_numpy(float) if alloc["target"].notna().all() else None
    if alloc["params_kept"].notna().all():
        return alloc["params_kept"].to_numpy(float), marks
    shapes = sweep.modules[sweep.modules["run"] == run].set_index("module")
    price = (shapes["d_in"] + shapes["d_out"] + 1).reindex(
        sweep.ranks.loc[sweep.ranks["run"] == run, "module"].unique())
    if price.isna().any():   # a module without a recorded shape: no parameter count
        return None, marks
    ranks = sweep.ranks[sweep.ranks["run"] == run]
    kept = (ranks["rank"] * ranks["module"].map(price)).groupby(ranks["step"]).sum()
    return kept.reindex(alloc["step"]).to_numpy(float), marks


def rank_timeline(sweep, run: str):
    """Two panels sharing the step axis: total budget (top), per-module rank (bottom)."""
    from analysis.schedule import scheduled_budget, shade_phases  # lazy: pulls in adalora/torch
    alloc = sweep.allocations[sweep.allocations["run"] == run].sort_values("step")
    ranks = sweep.ranks[sweep.ranks["run"] == run]
    if alloc.empty:
        raise ValueError(f"run {run!r} has no ranks.jsonl records: nothing to draw over time")
    schedule = sweep.schedule(run)
    unit = sweep.budget_unit(run)
    realised, marks = realised_budget(sweep, run, unit)
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6.5), layout="constrained",
                                      height_ratios=(1, 1.3))
    last = int(schedule["total_steps"]) if schedule else int(alloc["step"].max())
    if realised is None:  # nothing to put in the schedule's unit: Σ ranks here, b(t) on its own axis
        realised, unit_realised, sched_ax = alloc["realised"].to_numpy(), "values", top.twinx()
        sched_ax.set_ylabel(f"scheduled b(t)\n({UNIT_AXIS.get(unit, unit).splitlines()[0]})")
    else:
        unit_realised, sched_ax = unit, top
    if schedule:
        shade_phases(top, schedule)
        shade_phases(bottom, schedule, label=False)
        steps = np.arange(last + 1)
        sched_ax.plot(steps, scheduled_budget(schedule, steps), color="#555555", lw=1.5,
                      label="scheduled b(t) (adalora.schedule)")
    # The realised total holds from one mask step to the next, hence a step plot extended to the end.
    xs = np.append(alloc["step"].to_numpy(), last)
    ys = np.append(realised, realised[-1])
    what = "Σ ranks" if unit_realised == "values" else "parameters"
    top.step(xs, ys, where="post", color=METHOD_COLOURS["adalora"], lw=2, label=f"realised {what} (ranks.jsonl)")
    if marks is not None:
        sched_ax.plot(alloc["step"], marks, "o", ms=3, color="#222222", label="budget at mask step")
    top.set_ylabel(UNIT_AXIS.get(unit_realised, unit_realised))
    top.set_title(f"Rank over training: {run_title(sweep.row(run))}", pad=16)
    handles = [h for ax in dict.fromkeys((top, sched_ax)) for h in ax.get_legend_handles_labels()[0]]
    top.legend(handles=handles, fontsize=8, loc="upper right")

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
