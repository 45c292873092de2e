"""Learned singular values `lam` per module (adapters.safetensors) and the importance scores at
the final allocation (importance.safetensors): did pruning cut small, unimportant values?"""
from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from analysis.names import module_table, type_order
from analysis.plots.style import plt, run_title, type_colour
from analysis.runs import load_importance, load_spectrum


def spectra(sweep, run: str):
    """Left: |lam| sorted descending per module (alive values; a line per module, colour = type).
    Right: histogram of triplet importance scores, kept vs pruned, on a log axis."""
    path = sweep.row(run)["path"]
    lam, scores = load_spectrum(path), load_importance(path)
    if lam.empty:
        raise ValueError(f"run {run!r} has no SVD adapters in adapters.safetensors (LoRA, or not saved)")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    names = module_table(lam["module"]).set_index("module")
    types = type_order(names["mtype"])
    for module, g in lam[lam["alive"]].groupby("module", sort=False):
        values = np.sort(np.abs(g["lam"].to_numpy()))[::-1]
        left.plot(np.arange(1, values.size + 1), values, "-o", ms=2.5, lw=1, alpha=0.6,
                  color=type_colour(names.loc[module, "mtype"]))
    left.set_yscale("log")
    left.set_xlabel("singular value index (sorted, alive only)")
    left.set_ylabel("|λ| (learned singular value)")
    left.set_title("Spectra of the learned λ per module")
    left.legend([Line2D([], [], color=type_colour(t), lw=2) for t in types], types, title="matrix type",
                fontsize=8, ncols=2)

    if scores.empty:
        right.text(0.5, 0.5, "no importance.safetensors in this run\n(only AdaLoRA runs save scores)",
                   ha="center", va="center", transform=right.transAxes)
        right.set_axis_off()
    else:
        merged = scores.merge(lam[["module", "index", "alive"]], on=["module", "index"], how="left")
        positive = merged["score"] > 0
        s = merged.loc[positive, "score"]
        bins = np.logspace(np.log10(s.min()), np.log10(s.max()), 40) if len(s) else 10
        for alive, label, colour in ((True, "kept", "#2ca02c"), (False, "pruned", "#7f7f7f")):
            part = merged.loc[positive & (merged["alive"].fillna(False) == alive), "score"]
            right.hist(part, bins=bins, color=colour, alpha=0.7, label=f"{label} ({len(part)})")
        right.set_xscale("log")
        right.set_xlabel("triplet importance score S (log scale, unitless)")
        right.set_ylabel("count (singular values)")
        right.set_title("Importance at the final allocation")
        right.legend(fontsize=8)
        if (~positive).any():
            right.text(0.02, 0.95, f"{int((~positive).sum())} scores ≤ 0 not shown", fontsize=8,
                       transform=right.transAxes, va="top")
    fig.suptitle(f"Singular values and importance: {run_title(sweep.row(run))}")
    return fig
