"""Where do allocation methods put the rank? Final per-module ranks compared between runs.

``rank_matrix(sweep)``: modules × runs of final ranks. ``agreement_table(sweep)``: for every pair
of labels (a method, or a method with its ablation), the Spearman ρ and Kendall τ-b
(``scipy.stats``) between the final rank vectors of two runs over their common modules, averaged
over pairs: across seeds within a label (``seeds``: every pair of distinct seeds) and across labels
(``methods``: runs of equal seed, else every pair). A constant rank vector (a uniform
allocation) has no rank correlation: NaN, left out of the means and counted in ``n_nan``.

    python -m analysis.agreement RUN_OR_SWEEP_DIR [MORE ...] --out DIR [--max-seeds 3]

writes ``DIR/agreement.{csv,md,tex}`` and ``DIR/rank_maps.{png,pdf}`` (the heatmaps of every label
for its first seeds, side by side on one colour scale).
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .runs import load_sweep


def rank_matrix(sweep, runs=None) -> pd.DataFrame:
    """Final ranks, index = module, columns = run (completed runs unless ``runs`` is given)."""
    m = sweep.modules[sweep.modules["final_rank"].notna()]
    if runs is None:
        runs = sweep.runs.loc[sweep.runs["ok"], "run"].tolist() if "ok" in sweep.runs else sweep.runs["run"].tolist()
    m = m[m["run"].isin(list(runs))]
    return m.pivot_table(index="module", columns="run", values="final_rank", aggfunc="first")


def correlations(a: pd.Series, b: pd.Series) -> tuple[float, float, int]:
    """Spearman ρ, Kendall τ-b and the number of common modules of two rank vectors."""
    both = pd.concat([a, b], axis=1).dropna()
    x, y = both.iloc[:, 0].to_numpy(float), both.iloc[:, 1].to_numpy(float)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan, len(x)
    return float(stats.spearmanr(x, y).statistic), float(stats.kendalltau(x, y).statistic), len(x)


def pair_table(sweep, by: str = "label") -> pd.DataFrame:
    """One row per compared pair of runs: labels, seeds, kind, ρ, τ, modules."""
    ranks = rank_matrix(sweep)
    runs = sweep.runs[sweep.runs["run"].isin(ranks.columns)][["run", by, "seed"]]
    groups = {k: g.sort_values("seed") for k, g in runs.groupby(by, sort=True)}
    rows = []
    for la, lb in itertools.combinations_with_replacement(sorted(groups), 2):
        ga, gb = groups[la], groups[lb]
        if la == lb:
            pairs = [(r1, r2) for r1, r2 in itertools.combinations(ga.itertuples(index=False), 2) if r1.seed != r2.seed]
            kind = "seeds"
        else:
            same = [(r1, r2) for r1 in ga.itertuples(index=False) for r2 in gb.itertuples(index=False)
                    if r1.seed == r2.seed]
            pairs = same or list(itertools.product(ga.itertuples(index=False), gb.itertuples(index=False)))
            kind = "methods"
        for r1, r2 in pairs:
            rho, tau, n = correlations(ranks[r1.run], ranks[r2.run])
            rows.append({"a": la, "b": lb, "kind": kind, "seed_a": r1.seed, "seed_b": r2.seed,
                         "spearman": rho, "kendall": tau, "modules": n})
    return pd.DataFrame(rows, columns=["a", "b", "kind", "seed_a", "seed_b", "spearman", "kendall", "modules"])


def agreement_table(sweep, by: str = "label") -> pd.DataFrame:
    """Per pair of labels: kind, pairs, NaN pairs, mean and sd of ρ and τ over the pairs."""
    pairs = pair_table(sweep, by)
    if pairs.empty:
        return pd.DataFrame(columns=["a", "b", "kind", "n_pairs", "n_nan", "spearman_mean", "spearman_sd",
                                     "kendall_mean", "kendall_sd"])
    g = pairs.groupby(["a", "b", "kind"], sort=False)
    out = g.agg(n_pairs=("spearman", "size"), n_nan=("spearman", lambda s: int(s.isna().sum())),
                spearman_mean=("spearman", "mean"), spearman_sd=("spearman", "std"),
                kendall_mean=("kendall", "mean"), kendall_sd=("kendall", "std")).reset_index()
    return out.sort_values(["kind", "a", "b"], ascending=[False, True, True]).reset_index(drop=True)


def format_agreement(table: pd.DataFrame) -> pd.DataFrame:
    def cell(m, s):
        return "–" if pd.isna(m) else (f"{m:.2f}" if pd.isna(s) else f"{m:.2f} ± {s:.2f}")
    return pd.DataFrame({"a": table["a"], "b": table["b"], "across": table["kind"],
                         "pairs (NaN)": [f"{n} ({k})" for n, k in zip(table["n_pairs"], table["n_nan"])],
                         "Spearman ρ": [cell(m, s) for m, s in zip(table["spearman_mean"], table["spearman_sd"])],
                         "Kendall τ": [cell(m, s) for m, s in zip(table["kendall_mean"], table["kendall_sd"])]})


def map_runs(sweep, by: str = "label", max_seeds: int = 3) -> list[str]:
    """The runs of the side-by-side maps: each label's first ``max_seeds`` completed seeds."""
    ok = sweep.runs[sweep.runs["ok"]] if "ok" in sweep.runs else sweep.runs
    return [r for _, g in ok.sort_values([by, "seed"]).groupby(by, sort=True) for r in g["run"].head(max_seeds)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.agreement", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-seeds", type=int, default=3)
    args = ap.parse_args(argv)
    from . import plots, tables
    try:
        sweep = load_sweep(args.dirs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = rank_matrix(sweep).shape[1]
    if n < 2:                        # no pair to compare: the tables would be empty
        print(f"error: {n} completed run(s) with final ranks in {' '.join(args.dirs)}: agreement compares two "
              "or more; add the other runs' folders", file=sys.stderr)
        return 2
    table = agreement_table(sweep)
    out = Path(args.out)
    tables.write(table, format_agreement(table), out / "agreement")
    print(tables.to_markdown(format_agreement(table)))
    runs = map_runs(sweep, max_seeds=args.max_seeds)
    if runs:
        labels = sweep.runs.set_index("run").loc[runs]
        titles = [f"{r.label} s{r.seed}" for r in labels.itertuples()]
        plots.save(plots.rank_heatmaps(sweep, runs, titles=titles), out / "rank_maps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
