"""analysis.agreement: Spearman and Kendall between final rank vectors, across seeds and methods."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pandas as pd
from scipy import stats

from analysis.agreement import agreement_table, correlations, pair_table


def _sweep(ranks: dict):
    """A sweep-like object: runs (run, label, seed, ok) and modules (run, module, final_rank)."""
    runs = pd.DataFrame([{"run": r, "label": lab, "seed": s, "ok": True} for r, (lab, s, _) in ranks.items()])
    mods = pd.DataFrame([{"run": r, "module": f"m{i}", "final_rank": v}
                         for r, (_, _, vec) in ranks.items() for i, v in enumerate(vec)])
    return SimpleNamespace(runs=runs, modules=mods)


def test_correlations_are_scipys_and_nan_for_a_constant_vector():
    a, b = pd.Series([1, 2, 3, 4, 2]), pd.Series([2, 1, 4, 3, 2])
    rho, tau, n = correlations(a, b)
    assert n == 5 and rho == stats.spearmanr(a, b).statistic and tau == stats.kendalltau(a, b).statistic
    assert all(math.isnan(v) for v in correlations(a, pd.Series([2] * 5))[:2])


def test_pairs_across_seeds_within_a_label_and_same_seed_across_labels():
    sw = _sweep({"x0": ("x", 0, [1, 2, 3]), "x1": ("x", 1, [1, 3, 2]), "y0": ("y", 0, [3, 2, 1]),
                 "y1": ("y", 1, [3, 2, 1])})
    pairs = pair_table(sw)
    across = pairs[pairs["kind"] == "methods"]
    assert sorted(zip(across["seed_a"], across["seed_b"])) == [(0, 0), (1, 1)]
    t = agreement_table(sw).set_index(["a", "b"])
    assert t.loc[("y", "y"), "spearman_mean"] == 1.0 and t.loc[("x", "y"), "spearman_mean"] == (-1.0 - 0.5) / 2
    assert t.loc[("x", "x"), "kind"] == "seeds" and t.loc[("x", "x"), "n_pairs"] == 1
