"""analysis/studies/allocators_rt: results.md is what the committed runs.csv, tuned.json and
agreement.csv regenerate, its paired rows agree with scipy on the same pairs, and the README quotes
only numbers results.md holds."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from exp_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "analysis" / "studies" / "allocators_rt"


S = load_script(STUDY / "summarize.py", "alloc_summarize")


def test_committed_results_are_what_the_committed_files_regenerate(tmp_path):
    for f in ("runs.csv", "tuned.json", "agreement.csv"):
        shutil.copy(STUDY / f, tmp_path / f)
    S.main(["report", "--out", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == (STUDY / "results.md").read_text()


def test_paired_rows_match_scipy_on_the_committed_runs():
    runs = pd.read_csv(STUDY / "runs.csv")
    ok = runs[runs.status == "completed"]
    rows = S.paired_rows(ok, "test")
    ref = ok[ok.method == "lora"].set_index("seed")["test"]
    ps = []
    for r in rows:
        a = ok[ok.method == r["family"]].set_index("seed")["test"].loc[ref.index]
        d = a.to_numpy() - ref.to_numpy()
        t = stats.ttest_rel(a.to_numpy(), ref.to_numpy())
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        assert np.isclose(r["mean"], d.mean()) and np.isclose(r["p"], t.pvalue)
        assert np.isclose(r["lo"], d.mean() - half) and np.isclose(r["hi"], d.mean() + half)
        ps.append(t.pvalue)
    # Holm by hand: sorted p times (m, m-1, ...), running maximum, capped at 1
    order = np.argsort(ps)
    adj = np.minimum(1, np.maximum.accumulate([(5 - i) * ps[j] for i, j in enumerate(order)]))
    for i, j in enumerate(order):
        assert np.isclose(rows[j]["p_holm"], adj[i])


def test_budget_columns_come_from_the_runs_own_records(tmp_path):
    run = tmp_path / "main" / "sora-s0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "method": "sora", "seed": 0, "params": {"adapter_end": 1234},
        "final": {"val": {"accuracy": 0.5}, "test": {"accuracy": 0.25}}, "final_ranks": {"a.query": 1}}))
    (run / "ranks.jsonl").write_text(
        json.dumps({"step": 1, "budget": 9, "unit": "values", "target": 10, "gap": -1, "params_kept": 99}) + "\n")
    df = S.build(tmp_path / "main", tmp_path)
    row = df.iloc[0]
    assert (row.budget_kept, row.budget_target, row.budget_gap, row.params_kept) == (9, 10, -1, 99)
    assert (row.val, row.test, row.adapter_params) == (0.5, 0.25, 1234)


def _numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\d.])[-+]?\d+\.\d+(?![.\dA-Za-z])", text.replace("−", "-"))


def test_every_number_the_readme_quotes_is_in_results():
    results = (STUDY / "results.md").read_text().replace("−", "-")
    findings = (STUDY / "README.md").read_text().split("## Findings", 1)[1]
    missing = [n for n in _numbers(findings) if n.lstrip("+") not in results
               and (n.startswith("-") or f"+{n.lstrip('+')}" not in results)]
    # the setup figures quoted among the confounds are the library's (α/r), not measurements
    assert set(missing) <= {"5.333"}, f"numbers in README.md that results.md does not hold: {missing}"
