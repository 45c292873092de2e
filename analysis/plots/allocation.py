"""Where the budget went: final rank per layer stacked by matrix type, and per matrix type
summed over layers, each against the initial allocation (what a uniform LoRA would keep)."""
from __future__ import annotations

import numpy as np

from analysis.names import row_order, type_order
from analysis.plots.style import plt, run_title, type_colour


def allocation_summary(sweep, run: str):
    m = sweep.modules[(sweep.modules["run"] == run) & sweep.modules["final_rank"].notna()]
    if m.empty:
        raise ValueError(f"run {run!r} has no final ranks to summarise")
    rows, types = row_order(m), type_order(m["mtype"])
    per_layer = m.pivot_table(index="row", columns="mtype", values="final_rank", aggfunc="sum").reindex(
        index=rows, columns=types).fillna(0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained",
                                      width_ratios=(len(rows) + 3, len(types) + 3))
    bottom = np.zeros(len(rows))
    for t in types:
        left.bar(range(len(rows)), per_layer[t], bottom=bottom, color=type_colour(t), label=t)
        bottom += per_layer[t].to_numpy()
    initial = m.groupby("row")["init_rank"].sum().reindex(rows)
    if initial.notna().all():
        left.plot(range(len(rows)), initial, "_", ms=18, mew=2, color="#222222", label="initial (Σ r0)")
    left.set_xticks(range(len(rows)), rows)
    left.set_xlabel("layer")
    left.set_ylabel("final rank (singular values kept)")
    left.set_title("Rank per layer, stacked by matrix type")
    left.set_ylim(0, 1.35 * max(bottom.max(), initial.max() if initial.notna().all() else 0))
    left.legend(fontsize=8, ncols=4, loc="upper left")  # headroom above the bars keeps it clear

    per_type = m.groupby("mtype")["final_rank"].sum().reindex(types)
    init_type = m.groupby("mtype")["init_rank"].sum().reindex(types)
    x = np.arange(len(types))
    right.bar(x, init_type, color="none", edgecolor="#888888", ls="--", label="initial (Σ r0)")
    right.bar(x, per_type, color=[type_colour(t) for t in types], label="final")
    for xi, v in zip(x, per_type):
        right.text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    right.set_xticks(x, types)
    right.set_xlabel("matrix type")
    right.set_ylabel("final rank summed over layers")
    right.set_title("Rank per matrix type")
    right.set_ylim(0, 1.2 * max(per_type.max(), init_type.max() if init_type.notna().all() else 0))
    right.legend(fontsize=8, loc="upper left", ncols=2)
    fig.suptitle(f"Allocation: {run_title(sweep.row(run))}, total {int(m['final_rank'].sum())} "
                 "singular values")
    return fig
