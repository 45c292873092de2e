"""analysis.tables statistics (paired difference, t-interval, Wilcoxon/Hodges–Lehmann, bootstrap
refusal, Holm) against scipy and against definitions written out here; the comparison tables
built on them (never pooling scales, epochs or learning rates); the new run-folder facts in
analysis.runs; and the report's comparison settings."""
from __future__ import annotations

import json
from itertools import product

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import runs as R
from analysis import tables as T
from test_tune import write_run

RNG = np.random.default_rng(7)


# --- paired_difference ---------------------------------------------------------------------------

@pytest.mark.parametrize("n, level", [(2, 0.95), (3, 0.9), (5, 0.95), (5, 0.99), (12, 0.95)])
def test_t_interval_and_p_equal_scipy(n, level):
    a = 0.8 + 0.02 * RNG.standard_normal(n)
    b = 0.79 + 0.02 * RNG.standard_normal(n)
    r = T.paired_difference(a, b, level=level)
    d = a - b
    lo, hi = stats.t.interval(level, n - 1, loc=d.mean(), scale=stats.sem(d))
    ref = stats.ttest_rel(a, b)
    assert (r["lo"], r["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-12) and r["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert r["mean"] == pytest.approx(d.mean()) and r["sd"] == pytest.approx(d.std(ddof=1))
    assert r["n"] == n and r["method"] == "paired t"


def test_t_interval_by_hand_at_five_seeds():
    d = np.array([0.01, 0.03, -0.005, 0.02, 0.015])
    r = T.paired_difference(d, np.zeros(5))
    half = 2.7764451051977987 * d.std(ddof=1) / np.sqrt(5)   # t_{4, 0.975}
    assert (r["lo"], r["hi"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))


def test_small_n_and_missing_pairs():
    one = T.paired_difference([0.8], [0.7])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1)
    assert np.isnan(one["lo"]) and np.isnan(one["hi"]) and np.isnan(one["p"])
    none = T.paired_difference([], [])
    assert none["n"] == 0 and np.isnan(none["mean"])
    # a pair with a missing side is dropped, not imputed
    r = T.paired_difference([0.8, np.nan, 0.9, 0.85], [0.7, 0.6, np.nan, 0.8])
    assert r["n"] == 2 and r["mean"] == pytest.approx(0.075)
    # no spread: the interval is the point, p undefined
    flat = T.paired_difference([0.8, 0.9, 1.0], [0.7, 0.8, 0.9])
    assert flat["lo"] == flat["hi"] == pytest.approx(0.1) and np.isnan(flat["p"])
    with pytest.raises(ValueError, match="differ in length"):
        T.paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="choose one of"):
        T.paired_difference([1, 2], [1, 2], ci="bca")


def test_bootstrap_is_refused_below_twenty_pairs_and_labelled():
    with pytest.raises(ValueError, match=r"at least 20 pairs, got 5.*ci='t'"):
        T.paired_difference(RNG.random(5), RNG.random(5), ci="bootstrap")
    a, b = RNG.random(25), RNG.random(25)
    r = T.paired_difference(a, b, ci="bootstrap")
    assert r["method"].startswith("bootstrap") and r["n"] == 25
    assert (r["lo"], r["hi"]) == T.bootstrap_ci(a - b)
    assert r["lo"] < r["mean"] < r["hi"] and r["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


def _walsh(d):
    return sorted((d[i] + d[j]) / 2 for i in range(len(d)) for j in range(i, len(d)))


@pytest.mark.parametrize("n", [6, 8, 11])
def test_wilcoxon_p_hodges_lehmann_and_the_interval_inverts_scipys_exact_test(n):
    d = RNG.standard_normal(n) * 0.01 + 0.004
    r = T.paired_difference(d + 0.5, np.full(n, 0.5), ci="wilcoxon")
    assert r["p"] == pytest.approx(stats.wilcoxon(d).pvalue, rel=1e-9)
    assert r["estimate"] == pytest.approx(np.median(_walsh(d)))
    assert r["mean"] == pytest.approx(d.mean())
    alpha = 1 - 0.95
    eps = 1e-9
    exact = lambda theta: stats.wilcoxon(d - theta, method="exact").pvalue  # noqa: E731
    # inside the interval the exact signed-rank test of "median = θ" does not reject; outside it does
    for theta in (r["lo"] + eps, r["hi"] - eps, r["estimate"]):
        assert exact(theta) > alpha
    for theta in (r["lo"] - eps, r["hi"] + eps):
        assert exact(theta) <= alpha
    assert 0.95 <= r["coverage"] < 1


def test_wilcoxon_interval_at_the_edges_of_attainable_coverage():
    d6 = np.array([0.3, -0.1, 0.2, 0.5, 0.05, 0.15])
    r6 = T.paired_difference(d6, np.zeros(6), ci="wilcoxon")
    # n = 6: only the extreme Walsh averages give >= 95 %: coverage 1 - 2/64
    assert (r6["lo"], r6["hi"]) == (d6.min(), d6.max()) and r6["coverage"] == pytest.approx(1 - 2 / 64)
    r5 = T.paired_difference(d6[:5], np.zeros(5), ci="wilcoxon")
    assert np.isnan(r5["lo"]) and np.isnan(r5["hi"]) and np.isnan(r5["coverage"])  # 95 % needs n >= 6
    assert r5["p"] == pytest.approx(stats.wilcoxon(d6[:5]).pvalue)


# --- Holm ----------------------------------------------------------------------------------------

def _holm_by_definition(p):
    """Adjusted p_i = max over the hypotheses ranked at or before i of min(1, (m - rank + 1) p)."""
    valid = [(v, i) for i, v in enumerate(p) if not np.isnan(v)]
    m = len(valid)
    ranked = sorted(valid)
    out = [np.nan] * len(p)
    for pos, (_, i) in enumerate(ranked):
        out[i] = max(min(1.0, (m - k) * ranked[k][0]) for k in range(pos + 1))
    return out


def _holm_rejects(p, alpha):
    """Holm's step-down procedure: reject in ascending order while p_(k) <= alpha / (m - k + 1)."""
    valid = sorted((v, i) for i, v in enumerate(p) if not np.isnan(v))
    rejected = set()
    for k, (v, i) in enumerate(valid):
        if v > alpha / (len(valid) - k):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(20))
def test_holm_equals_its_definition_and_the_step_down_procedure(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 9))
    p = rng.choice([0.001, 0.01, 0.02, 0.04, 0.3], m) if seed % 3 == 0 else rng.random(m) ** 3  # ties too
    p = p.astype(float)
    if seed % 4 == 1:
        p[rng.integers(0, m)] = np.nan
    adj = T.holm(p)
    np.testing.assert_allclose(adj, _holm_by_definition(list(p)), rtol=1e-12)
    for alpha in (0.01, 0.05, 0.1, *p[~np.isnan(p)]):
        assert {i for i, v in enumerate(adj) if v <= alpha + 1e-15} >= _holm_rejects(list(p), alpha)
        assert {i for i, v in enumerate(adj) if v <= alpha * (1 - 1e-12)} <= _holm_rejects(list(p), alpha)


def test_holm_by_hand_keeps_order_nan_and_series_index():
    p = pd.Series([0.04, np.nan, 0.01, 0.03], index=list("abcd"))
    adj = T.holm(p)
    # m = 3: 0.01*3 = 0.03, then max(0.03, 0.03*2) = 0.06, then max(0.06, 0.04*1) = 0.06
    assert list(adj.index) == list("abcd")
    np.testing.assert_allclose(adj.to_numpy(), [0.06, np.nan, 0.03, 0.06])
    assert T.holm([]).size == 0 and T.holm([0.9, 0.8]).tolist() == [1.0, 1.0]


# --- tables over a sweep -------------------------------------------------------------------------

ACC = {  # (label, epochs) -> test accuracy per seed 0..3
    ("adalora", 1): [0.80, 0.82, 0.81, 0.79], ("lora", 1): [0.81, 0.83, 0.80, 0.81],
    ("adalora (α/target)", 1): [0.83, 0.84, 0.82, 0.82], ("adalora", 3): [0.84, 0.85, 0.85, 0.83],
    ("lora", 3): [0.84, 0.84, 0.84, 0.84], ("adalora (α/target)", 3): [0.85, 0.86, 0.85, 0.86],
}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for (label, epochs), values in ACC.items():
        method = label.split(" ")[0]
        scale = "alpha_over_target" if "target" in label else None
        for seed, acc in enumerate(values):
            write_run(root / f"{method}_{'t' if scale else 'r0'}_e{epochs}_s{seed}", method=method, seed=seed,
                      epochs=epochs, scale=scale, scaling=8.0 if scale else None, lr=1e-3 if method == "lora" else 2e-3,
                      steps=100 * epochs, init_warmup=10 * epochs, final_warmup=30 * epochs,
                      val={"accuracy": acc - 0.01}, test={"accuracy": acc})
    return root


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    return R.load_sweep(sweep_dir)


def test_runs_expose_scale_learning_rates_and_epochs(sweep):
    runs = sweep.runs.set_index("run")
    r = runs.loc["adalora_t_e3_s0"]
    assert r["label"] == "adalora (α/target)" and r["scale_rule"] == "alpha_over_target" and r["scaling"] == 8.0
    assert (r["lr"], r["head_lr"], r["epochs"], r["task_metric"]) == (2e-3, 1e-2, 3, "accuracy")
    assert runs.loc["adalora_r0_e1_s0", "label"] == "adalora"
    assert runs.loc["adalora_r0_e1_s0", "scaling"] == pytest.approx(16 / 3)
    assert runs.loc["lora_r0_e1_s0", "label"] == "lora" and runs.loc["lora_r0_e1_s0", "scale_rule"] == "per_module"
    assert not any(c.startswith("scale.") for c in sweep.runs.columns)  # per-module values live in `modules`
    mods = sweep.modules[sweep.modules["run"] == "adalora_r0_e1_s0"]
    assert mods["scaling"].tolist() == pytest.approx([16 / 3] * len(mods))


def test_summary_table_keeps_epochs_and_scales_apart(sweep):
    table = T.summary_table(sweep, "accuracy", "test")
    assert "epochs" in table and len(table) == len(ACC)
    row = table.set_index(["label", "epochs"]).loc[("adalora (α/target)", 3)]
    assert row["mean"] == pytest.approx(np.mean(ACC[("adalora (α/target)", 3)])) and row["n"] == 4
    wide = T.format_summary(table)
    assert list(wide.columns[:3]) == ["method", "budget", "epochs"]
    assert "(n=4)" in wide.iloc[0, -1]


def test_paired_comparisons_use_t_intervals_and_holm_over_the_table(sweep):
    pairs = [("adalora", "lora"), ("adalora (α/target)", "lora")]
    table = T.paired_comparisons(sweep, "accuracy", "test", pairs)
    assert len(table) == 4 and set(table["epochs"]) == {1, 3}   # epochs never pooled
    for _, row in table.iterrows():
        a, b = np.array(ACC[(row["a"], row["epochs"])]), np.array(ACC[(row["b"], row["epochs"])])
        lo, hi = stats.t.interval(0.95, 3, loc=(a - b).mean(), scale=stats.sem(a - b))
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert row["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue) and row["n"] == 4
    np.testing.assert_allclose(table["p_holm"], _holm_by_definition(table["p_value"].tolist()))
    shown = T.format_paired(table)
    assert "p Holm (k=4)" in shown.columns and "95% t-interval" in shown.columns
    assert shown["n"].tolist() == [4, 4, 4, 4]
    assert shown["comparison"].iloc[0] == "adalora − lora"
    one = T.paired_comparison(sweep, "accuracy", "test")  # the default pair, now with t-intervals
    assert one["ci_method"].eq("paired t").all() and len(one) == 2


def test_runs_at_several_learning_rates_are_not_pooled(tmp_path):
    for lr, seed in product((1e-3, 2e-3), range(3)):
        write_run(tmp_path / f"a_{lr}_{seed}", lr=lr, seed=seed, test={"accuracy": 0.8 + (lr > 1e-3) * 0.05 + seed / 100})
        write_run(tmp_path / f"l_{lr}_{seed}", method="lora", lr=lr, seed=seed, test={"accuracy": 0.8 + seed / 100})
    sweep = R.load_sweep(tmp_path)
    table = T.summary_table(sweep, "accuracy", "test")
    assert "lr" in table and len(table) == 4 and table["n"].eq(3).all()
    paired = T.paired_comparison(sweep, "accuracy", "test")
    assert sorted(zip(paired["lr_a"], paired["lr_b"])) == [(1e-3, 1e-3), (2e-3, 2e-3)]  # equal settings paired
    assert paired.set_index("lr_a").loc[2e-3, "mean_diff"] == pytest.approx(0.05)


def test_old_folders_still_load(tmp_path):
    """No `scale` in summary.json, no trainer section in the config, the old ablation name."""
    d = write_run(tmp_path / "old", ablation="random", test={"accuracy": 0.8})
    summary = json.loads((d / "summary.json").read_text())
    del summary["scale"]
    (d / "summary.json").write_text(json.dumps(summary))
    (d / ".hydra" / "config.yaml").write_text("seed: 0\nmethod: {name: adalora}\n")
    row = R.load_sweep(tmp_path).runs.iloc[0]
    assert row["ablation"] == "random_churn" and row["label"] == "adalora[random_churn]"
    assert pd.isna(row["scale_rule"]) and pd.isna(row["scaling"]) and pd.isna(row["epochs"])
    assert row["lr"] == 2e-3  # from the Hydra overrides


# --- report --------------------------------------------------------------------------------------

@pytest.mark.long
def test_report_shows_comparison_settings_and_what_confounds_the_comparison(sweep_dir, tmp_path):
    from analysis import report
    assert report.main([str(sweep_dir), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Comparison settings" in text
    settings = pd.read_csv(tmp_path / "rep" / "comparison_settings.csv", dtype=str).set_index("method")
    assert settings.loc["adalora", "scale rule"] == "α/r0" and settings.loc["adalora", "epochs"] == "1–3"
    assert settings.loc["lora", "lr"] == "0.001" and settings.loc["adalora", "total steps"] == "100–300"
    assert settings.loc["adalora", "final warmup"] == "30–90"
    assert "Holm-adjusted over the 4 comparisons of the table" in text
    assert ("- `adalora` − `lora` at 1 epoch: AdaLoRA pruned during steps t_i..T−t_f = 10..70 of T = 100 "
            "(10 % to 70 % of training) and trained only t_f = 30 steps (30 %) at its final ranks; its scale "
            "α/r0 = 5.333 against LoRA's α/r = 8; lr 0.002 against 0.001.") in text
    assert "- `adalora` − `lora` at 3 epochs: AdaLoRA pruned during steps t_i..T−t_f = 30..210 of T = 300" in text
    assert "- `adalora (α/target)` − `lora` at 1 epoch:" in text and "α/target = 8 against LoRA's α/r = 8" in text
    assert text.count("- `adalora` − `lora` at 1 epoch:") == 1  # said once, not per split
