"""Result tables over seeds: mean ± sd and n per method x task (x budget), and the paired
comparison AdaLoRA minus LoRA over matching seeds (paired t-test, bootstrap 95% CI, scipy).
Each table is a tidy DataFrame (numbers) and is written as CSV, Markdown and LaTeX. Only runs
with status "completed" enter: an unfinished run's last evaluation is not a result."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

METRICS = ("accuracy", "mcc", "macro_f1", "loss")


def default_metric(sweep, split: str = "test") -> str:
    """The first of accuracy, mcc, macro_f1 that completed runs report on this split."""
    for m in METRICS:
        col = f"final.{split}.{m}"
        if col in sweep.runs and sweep.runs.loc[sweep.runs["ok"], col].notna().any():
            return m
    raise ValueError(f"no completed run reports a metric on split {split!r}")


def summary_table(sweep, metric: str = "accuracy", split: str = "test") -> pd.DataFrame:
    """task, label, budget_label, mean, sd (ddof=1, NaN for one seed), n, seeds."""
    col = f"final.{split}.{metric}"
    runs = sweep.runs[sweep.runs["ok"] & sweep.runs.get(col, pd.Series(dtype=float)).notna()]
    out = (runs.assign(task=runs["task"].fillna("?"), budget_label=runs["budget_label"].fillna(""))
           .groupby(["task", "label", "budget_label"])
           .agg(mean=(col, "mean"), sd=(col, lambda v: v.std(ddof=1)), n=(col, "size"),
                seeds=("seed", lambda v: ",".join(str(int(s)) for s in sorted(v.dropna()))))
           .reset_index())
    out.attrs.update(metric=metric, split=split)
    return out


def paired_comparison(sweep, metric: str = "accuracy", split: str = "test", a: str = "adalora",
                      b: str = "lora", n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per task and comparable budget (`pair_budget`): diff = a - b over seeds present in both.
    Columns: task, budget, n, mean_a, mean_b, mean_diff, sd_diff, t, p_value, ci_low, ci_high."""
    col = f"final.{split}.{metric}"
    runs = sweep.runs[sweep.runs["ok"] & sweep.runs.get(col, pd.Series(dtype=float)).notna()]
    rows = []
    for (task, budget), g in runs.groupby([runs["task"].fillna("?"), runs["pair_budget"].fillna("")]):
        # one value per seed and method (duplicates of a seed, e.g. a re-run, are averaged)
        va = g[g["label"] == a].groupby("seed")[col].mean()
        vb = g[g["label"] == b].groupby("seed")[col].mean()
        seeds = va.index.intersection(vb.index)
        if len(seeds) == 0:
            continue
        x, y = va.loc[seeds].to_numpy(float), vb.loc[seeds].to_numpy(float)
        d = x - y
        t, p = stats.ttest_rel(x, y) if len(d) > 1 else (np.nan, np.nan)
        lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
        rows.append({"task": task, "budget": budget, "n": len(d), "seeds": ",".join(str(int(s)) for s in seeds),
                     "mean_a": x.mean(), "mean_b": y.mean(), "mean_diff": d.mean(),
                     "sd_diff": d.std(ddof=1) if len(d) > 1 else np.nan, "t": t, "p_value": p,
                     "ci_low": lo, "ci_high": hi})
    out = pd.DataFrame(rows, columns=["task", "budget", "n", "seeds", "mean_a", "mean_b", "mean_diff",
                                      "sd_diff", "t", "p_value", "ci_low", "ci_high"])
    out.attrs.update(metric=metric, split=split, a=a, b=b)
    return out


def bootstrap_ci(d: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean paired difference. Percentile, not BCa: BCa's jackknife
    is undefined for the 2-5 seeds typical here."""
    d = np.asarray(d, dtype=float)
    if d.size < 2 or np.all(d == d[0]):
        return (np.nan, np.nan) if d.size < 2 else (float(d[0]), float(d[0]))
    res = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def format_summary(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Wide display table: rows (method, budget), columns task, cells 'mean ± sd (n=k)'."""
    if table.empty:
        return pd.DataFrame()
    cell = [f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if n > 1 else f"{m:.{digits}f} (n=1)"
            for m, s, n in zip(table["mean"], table["sd"], table["n"])]
    wide = table.assign(cell=cell).pivot(index=["label", "budget_label"], columns="task", values="cell")
    wide.index.names, wide.columns.name = ["method", "budget"], None
    return wide.fillna("–").reset_index()


def format_paired(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    if table.empty:
        return pd.DataFrame()
    f = lambda v: "–" if pd.isna(v) else f"{v:+.{digits}f}"  # noqa: E731
    return pd.DataFrame({
        "task": table["task"], "budget": table["budget"], "n seeds": table["n"],
        f"{table.attrs.get('a', 'a')} − {table.attrs.get('b', 'b')}": table["mean_diff"].map(f),
        "95% bootstrap CI": [f"[{f(lo)}, {f(hi)}]" for lo, hi in zip(table["ci_low"], table["ci_high"])],
        "paired t p-value": table["p_value"].map(lambda p: "–" if pd.isna(p) else f"{p:.3g}"),
    })


def write(table: pd.DataFrame, display: pd.DataFrame, stem) -> dict[str, Path]:
    """stem.csv (the numbers, full precision), stem.md and stem.tex (the display table)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md"), "tex": stem.with_suffix(".tex")}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(display) + "\n")
    paths["tex"].write_text(to_latex(display))
    return paths


def to_markdown(df: pd.DataFrame) -> str:
    """A pipe table without the `tabulate` dependency pandas.to_markdown needs."""
    if df.empty:
        return "_(no completed runs)_"
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def to_latex(df: pd.DataFrame) -> str:
    """booktabs tabular; ± and − become LaTeX maths so the file compiles without unicode setup."""
    esc = lambda v: (str(v).replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")  # noqa: E731
                     .replace("&", r"\&").replace("#", r"\#").replace("±", r"$\pm$").replace("−", "$-$")
                     .replace("–", "--"))
    lines = [r"\begin{tabular}{" + "l" * df.shape[1] + "}", r"\toprule",
             " & ".join(esc(c) for c in df.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(v) for v in row) + r" \\" for row in df.itertuples(index=False)]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", ""])
