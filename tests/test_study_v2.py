"""analysis/studies/minilm_v2/summarize.py: `build` (run folders -> runs.csv) on synthetic run
folders, `report` (runs.csv -> results.md) on a synthetic runs.csv checked against hand
arithmetic and scipy, and, once the study's files are committed, that results.md is what
runs.csv regenerates and that report.md quotes only numbers results.md holds."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from exp_utils import load_script
from test_tune import MODULES, write_run

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "analysis" / "studies" / "minilm_v2"


S = load_script(STUDY / "summarize.py", "v2_summarize")
SEEDS = range(5)
TYPES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")
NAMES = [f"encoder.layer.{i}.{t}" for i in range(2) for t in TYPES]


def _ranks(seed, shift=0):
    """Ranks summing to 2 per matrix on average; FFN matrices keep more."""
    base = [1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3]
    r = list(base)
    r[(seed + shift) % 12] += 1
    r[(seed + shift + 5) % 12] -= 1
    return json.dumps(dict(zip(NAMES, r)), sort_keys=True)


def value(task, label, budget, epochs, seed):
    """A deterministic test metric with a seed effect shared by every method (so pairing helps)."""
    base = {"rotten_tomatoes": 0.80, "reuters_r8": 0.90}[task] + 0.01 * np.sin(seed)
    effect = {"adalora": -0.004, "adalora (α/target)": 0.002, "lora": 0.0, "peft_adalora": -0.006,
              "adalora[no_orth]": -0.001, "adalora[sensitivity_only]": -0.003, "adalora[magnitude]": -0.002,
              "adalora[random_fixed]": -0.010, "adalora[random_churn]": -0.012,
              "lora[lora_on_found_ranks]": 0.003}[label]
    wobble = 0.003 * np.cos(3 * seed + len(label) + budget + 2 * epochs)  # differs by method: a non-zero sd
    return round(base + effect + 0.01 * budget + 0.02 * (epochs == 3) + wobble, 6)


def make_runs_csv(out: Path) -> pd.DataFrame:
    rows = []

    def add(task, label, budget, epochs, seed, status="completed", **kw):
        method = label.split("[")[0].split(" ")[0]
        ablation = label[label.index("[") + 1:-1] if "[" in label else "none"
        svd = method != "lora"
        rows.append({"run": f"{task}/{label}_{budget}_{epochs}_{seed}", "task": task, "method": method, "label": label,
                     "ablation": ablation, "seed": seed, "target_rank": budget, "init_rank": {1: 2, 2: 3, 4: 6}[budget] if svd else None,
                     "matched_lora_rank": budget, "lora_rank": None if svd else budget, "epochs": epochs,
                     "scale_rule": {"adalora (α/target)": "alpha_over_target"}.get(label, "alpha_over_r0" if svd else "per_module"),
                     "scaling": 16 / budget if "target" in label or not svd else 16 / {1: 2, 2: 3, 4: 6}[budget],
                     "lr": 1e-3, "head_lr": 1e-2, "params_start": 1000, "params_end": 800, "adapter_end": 700,
                     "final_ranks": kw.get("ranks", _ranks(seed) if svd else None), "status": status, "wall_time_s": 60.0,
                     "git_commit": "abc1234", "metric": S.TASK_METRICS[task], "val": value(task, label, budget, epochs, seed) - 0.01,
                     "test": np.nan if status != "completed" else value(task, label, budget, epochs, seed), "steps": 300 * epochs})
    for task in ("rotten_tomatoes", "reuters_r8"):
        for seed in SEEDS:
            for budget in (1, 2, 4):
                for label in ("adalora", "adalora (α/target)", "lora"):
                    add(task, label, budget, 1, seed)
            for label in ("adalora", "adalora (α/target)", "lora"):
                add(task, label, 2, 3, seed)
            add(task, "peft_adalora", 2, 1, seed, ranks=_ranks(seed, shift=1))
            for label in S.ABLATIONS:
                add(task, label, 2, 1, seed)
    add("rotten_tomatoes", "lora", 4, 1, 5, status="failed")   # a failed run: listed, never counted
    df = pd.DataFrame(rows, columns=S.COLUMNS)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "runs.csv", index=False)
    (out / "tuned.json").write_text(json.dumps({"rotten_tomatoes": {"adalora": {
        "overrides": {"trainer.lr": 0.001}, "metric": "accuracy", "val_mean": 0.81, "val_sd": 0.01, "n": 2,
        "grid": [{"trainer.lr": 0.001, "val_mean": 0.81, "val_sd": 0.01, "n": 2, "eligible": True},
                 {"trainer.lr": 0.002, "val_mean": 0.79, "val_sd": None, "n": 1, "eligible": False}]}}}))
    return df


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("v2")
    df = make_runs_csv(out)
    assert S.main(["report", "--out", str(out)]) == 0
    return out, df, (out / "results.md").read_text()


def _seeds(df, task, label, budget, epochs):
    sel = df[(df.task == task) & (df.label == label) & (df.target_rank == budget) & (df.epochs == epochs)
             & (df.status == "completed")]
    return sel.set_index("seed")["test"].sort_index()


def test_gap_table_equals_scipy_and_holm_by_hand(study):
    out, df, text = study
    gaps = S.gaps(pd.read_csv(out / "runs.csv"))
    assert len(gaps) == 2 * (3 + 1) * 2                     # tasks × (budgets at 1 epoch + 3 epochs) × scales
    row = gaps[(gaps.task == "rotten_tomatoes") & (gaps.budget == 4) & (gaps.epochs == 1)
               & (gaps.comparison == "adalora − lora")].iloc[0]
    a, b = _seeds(df, "rotten_tomatoes", "adalora", 4, 1), _seeds(df, "rotten_tomatoes", "lora", 4, 1)
    d = (a - b).to_numpy()
    assert row["n"] == 5                                    # the failed seed-5 LoRA run has no pair
    assert row["mean_diff"] == pytest.approx(d.mean())
    lo, hi = stats.t.interval(0.95, 4, loc=d.mean(), scale=stats.sem(d))
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert row["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    # Holm over the 16 rows of the family, by hand
    p = gaps["p_value"].to_numpy()
    order = np.argsort(p)
    adj = np.empty_like(p)
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - k) * p[i]))
        adj[i] = running
    np.testing.assert_allclose(gaps["p_holm"], adj)
    # and the rendered row carries these numbers
    line = next(line for line in text.splitlines() if line.startswith("| rotten_tomatoes | 4 | 1 | adalora − lora |"))
    assert f"{d.mean():+.4f}" in line and f"[{lo:+.4f}, {hi:+.4f}]" in line and f"{row['p_holm']:.3g}" in line
    assert "p Holm (k=16)" in text


def test_summary_confounds_ablations_peft_tuned_and_ranks(study):
    out, df, text = study
    runs = pd.read_csv(out / "runs.csv")
    # (a) mean ± sd (n)
    v = _seeds(df, "reuters_r8", "adalora (α/target)", 2, 3)
    assert f"{v.mean():.4f} ± {v.std(ddof=1):.4f} (n=5)" in text
    # (c2) training length: gap at 3 epochs − gap at 1 epoch, paired by seed
    ln = S.length_effect(runs)
    row = ln[(ln.task == "rotten_tomatoes") & ln.comparison.str.startswith("(adalora −")].iloc[0]
    g3 = _seeds(df, "rotten_tomatoes", "adalora", 2, 3) - _seeds(df, "rotten_tomatoes", "lora", 2, 3)
    g1 = _seeds(df, "rotten_tomatoes", "adalora", 2, 1) - _seeds(df, "rotten_tomatoes", "lora", 2, 1)
    assert row["mean_diff"] == pytest.approx((g3 - g1).mean())
    assert row["p_value"] == pytest.approx(stats.ttest_rel(g3, g1).pvalue)
    # (c1) scale
    sc = S.scale_effect(runs)
    assert len(sc) == 8 and sc["comparison"].eq("adalora (α/target) − adalora").all()
    # (d) six ablations per task, Holm over 12
    ab = S.ablations(runs)
    assert len(ab) == 12 and "p Holm (k=12)" in text
    r = ab[(ab.task == "reuters_r8") & (ab.comparison == "adalora[random_churn] − adalora")].iloc[0]
    x, y = _seeds(df, "reuters_r8", "adalora[random_churn]", 2, 1), _seeds(df, "reuters_r8", "adalora", 2, 1)
    assert r["mean_diff"] == pytest.approx((x - y).mean())
    # (e) peft: the ranks of one seed differ by a shift of one: L1 per seed counted by hand
    pe = S.peft_check(runs).set_index("task")
    same = [sum(abs(a - b) for a, b in zip(json.loads(_ranks(s)).values(), json.loads(_ranks(s, 1)).values()))
            for s in SEEDS]
    assert pe.loc["rotten_tomatoes", "l1_same_seed"] == pytest.approx(np.mean(same))
    assert pe.loc["rotten_tomatoes", "n_l1"] == 5 and pe.loc["rotten_tomatoes", "n_cross"] == 10
    # (f) the tuned learning rates
    assert "| rotten_tomatoes | adalora | trainer.lr=0.001 | 0.8100 ± 0.0100 (n=2) |" in text
    assert "no (fewer seeds)" in text
    # (g) rank per matrix type, mean over seeds: FFN-in of all layers
    types = S.rank_shares(runs, "mtype").set_index(["task", "label", "epochs"])
    ffn_in = np.mean([sum(v for k, v in json.loads(_ranks(s)).items() if k.endswith("intermediate.dense"))
                      for s in SEEDS])
    assert types.loc[("rotten_tomatoes", "adalora", 1.0), "ffn-in"] == pytest.approx(ffn_in)
    assert list(S.rank_shares(runs, "layer").columns[3:]) == ["layer 0", "layer 1", "n"]
    assert "`rotten_tomatoes/lora_4_1_5`: failed" in text
    assert S.COMMAND in text and "Every number in this file is computed from" in text


def test_report_is_deterministic_and_reads_only_the_csv(study, tmp_path):
    out, _, text = study
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("runs.csv", "tuned.json"):
        shutil.copy(out / f, copy / f)
    assert S.main(["report", "--out", str(copy)]) == 0
    assert (copy / "results.md").read_text() == text
    empty = tmp_path / "none"
    empty.mkdir()
    assert S.main(["report", "--out", str(empty)]) == 2
    # runs of one method at two learning rates would be pooled: refused
    runs = pd.read_csv(copy / "runs.csv")
    runs.loc[runs.index[0], "lr"] = 5e-4
    runs.to_csv(copy / "runs.csv", index=False)
    assert S.main(["report", "--out", str(copy)]) == 2


def test_build_writes_one_row_per_run_from_run_folders(tmp_path):
    runs = tmp_path / "main"
    ranks = {m: (1 if i % 2 else 3) for i, m in enumerate(MODULES)}
    write_run(runs / "rt_ada", seed=0, val={"accuracy": 0.8}, test={"accuracy": 0.79}, final_ranks=ranks)
    write_run(runs / "rt_lora", method="lora", seed=0, val={"accuracy": 0.81}, test={"accuracy": 0.8})
    write_run(runs / "r8_ada", task="reuters_r8", scale="alpha_over_target", scaling=8.0, epochs=3,
              val={"macro_f1": 0.7, "accuracy": 0.9}, test={"macro_f1": 0.6, "accuracy": 0.95})
    write_run(runs / "dead", seed=1, status="failed")
    (tmp_path / "tuned.json").write_text("{}")
    out = tmp_path / "out"
    assert S.main(["build", str(runs), "--tuned", str(tmp_path / "tuned.json"), "--out", str(out)]) == 0
    df = pd.read_csv(out / "runs.csv").set_index("run")
    assert list(df.reset_index().columns) == S.COLUMNS and (out / "tuned.json").exists()
    assert json.loads(df.loc["rt_ada", "final_ranks"]) == ranks
    assert (df.loc["rt_lora", "label"], df.loc["rt_lora", "target_rank"], df.loc["rt_lora", "lora_rank"]) == ("lora", 2, 2)
    r8 = df.loc["r8_ada"]
    assert (r8["label"], r8["metric"], r8["val"], r8["test"], r8["epochs"]) == ("adalora (α/target)", "macro_f1", 0.7, 0.6, 3)
    assert (r8["scale_rule"], r8["scaling"], r8["lr"], r8["init_rank"], r8["params_end"]) == ("alpha_over_target", 8.0, 2e-3, 3, 8000)
    assert df.loc["dead", "status"] == "failed" and pd.isna(df.loc["dead", "test"])


# --- the committed study ------------------------------------------------------------------------

@pytest.mark.skipif(not (STUDY / "runs.csv").exists() or not (STUDY / "results.md").exists(),
                    reason="the study's runs.csv and results.md are not committed yet")
def test_committed_results_are_what_runs_csv_regenerates(tmp_path):
    for f in ("runs.csv", "tuned.json", "lr_check.csv"):
        if (STUDY / f).exists():
            shutil.copy(STUDY / f, tmp_path / f)
    assert S.main(["report", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == (STUDY / "results.md").read_text()


def _numbers(text: str) -> list[str]:
    """Decimal numbers with their sign (− read as -); plain integers (counts, years), version
    strings (2.11.0) and sizes with a unit letter (22.7M) are left out."""
    return re.findall(r"(?<![\d.])[-+]?\d+\.\d+(?![.\dA-Za-z])", text.replace("−", "-"))


@pytest.mark.skipif(not (STUDY / "report.md").exists() or not (STUDY / "results.md").exists(),
                    reason="the study's report.md and results.md are not committed yet")
def test_every_number_the_committed_report_quotes_is_in_results():
    results = (STUDY / "results.md").read_text().replace("−", "-")
    missing = []
    for num in _numbers((STUDY / "report.md").read_text()):
        plain = num.lstrip("+")
        # a negative number must appear with its sign; a positive one with or without "+"
        if plain not in results and (plain.startswith("-") or f"+{plain}" not in results):
            missing.append(num)
    assert not missing, f"numbers in report.md that results.md does not hold: {missing}"
