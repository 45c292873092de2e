"""Result tables over seeds and the statistics behind them.

- `summary_table`: mean ± sd and n per task × method label × budget (× epochs, × learning rate
  where runs differ in them, so runs of different training lengths or settings are never pooled).
- `paired_difference(a, b)`: one paired comparison: the mean difference with a t-interval and the
  paired t-test by default (Wilcoxon signed-rank with the Hodges–Lehmann interval, or a percentile
  bootstrap from 20 pairs on, on request).
- `holm(p)`: Holm–Bonferroni adjusted p-values over a family of comparisons.
- `paired_comparison(s)`: a − b over the seeds both have, per task and comparable budget, every
  row with its n and a Holm-adjusted p over the rows of the table.

Each table is a tidy DataFrame (numbers) and is written as CSV, Markdown and LaTeX. Only runs
with status "completed" enter: an unfinished run's last evaluation is not a result."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

# Language-model tasks add exact_match (greedy answers) and perplexity (corpus tasks: their only score).
METRICS = ("accuracy", "mcc", "macro_f1", "exact_match", "perplexity", "loss")
CI_METHODS = ("t", "wilcoxon", "bootstrap")
MIN_BOOTSTRAP_N = 20
# Run columns that change the result besides method and budget: runs that differ in them are
# kept apart (epochs: the training length axis; lr/head_lr: a tuning grid).
SETTINGS = ("lr", "head_lr")


def default_metric(sweep, split: str = "test") -> str:
    """The first of METRICS that completed runs report on this split."""
    for m in METRICS:
        col = f"final.{split}.{m}"
        if col in sweep.runs and sweep.runs.loc[sweep.runs["ok"], col].notna().any():
            return m
    raise ValueError(f"no completed run reports a metric on split {split!r}")


# --- statistics ----------------------------------------------------------------------------------

def paired_difference(a, b, ci: str = "t", level: float = 0.95, n_boot: int = 10_000,
                      seed: int = 0) -> dict:
    """The paired difference d = a − b over the pairs where both values are finite.

    Returns a dict: ``n``, ``mean`` (of d), ``sd`` (ddof 1), ``estimate`` (what the interval is
    about: the mean, or the Hodges–Lehmann estimate for ``ci="wilcoxon"``), ``lo``, ``hi``,
    ``level``, ``coverage`` (the interval's exact coverage where it differs from ``level``),
    ``p`` (two-sided), ``t`` (the t statistic) and ``method`` (a label saying which).

    - ``ci="t"``: the paired t-test (``scipy.stats.ttest_rel``) and the t-interval
      mean ± t_{n−1,(1+level)/2} · sd/√n. When the differences are equal (sd = 0 up to
      rounding, 1e-12 relative) the interval is the point and p is NaN.
    - ``ci="wilcoxon"``: the Wilcoxon signed-rank p (``scipy.stats.wilcoxon``, its defaults: zeros
      dropped, exact for small n without ties, else the normal approximation), the Hodges–Lehmann
      estimate (median of the Walsh averages (d_i + d_j)/2, i ≤ j) and its distribution-free
      interval [W_(C), W_(M+1−C)] from the exact signed-rank null distribution of all n values
      (no ties assumed). Its coverage 1 − 2 P(T ≤ C−1) is the closest attainable at or above
      ``level``; when none is (95 % needs n ≥ 6) the interval is NaN.
    - ``ci="bootstrap"``: percentile bootstrap of the mean (``bootstrap_ci``), with the paired
      t-test's p; only from ``MIN_BOOTSTRAP_N`` = 20 pairs on, since with fewer the percentile
      interval is too narrow.

    n < 2: NaN interval and p (``mean`` is the one difference, or NaN)."""
    if ci not in CI_METHODS:
        raise ValueError(f"ci={ci!r}: choose one of {', '.join(CI_METHODS)}")
    if not 0 < level < 1:
        raise ValueError(f"level={level}: give a confidence level in (0, 1), e.g. 0.95")
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    n = int(d.size)
    if ci == "bootstrap" and n < MIN_BOOTSTRAP_N:
        raise ValueError(f"ci='bootstrap' needs at least {MIN_BOOTSTRAP_N} pairs, got {n}: a percentile "
                         "bootstrap from so few is too narrow; use ci='t' (or ci='wilcoxon')")
    mean = float(d.mean()) if n else np.nan
    sd = float(d.std(ddof=1)) if n > 1 else np.nan
    label = {"t": "paired t", "wilcoxon": "Wilcoxon signed-rank, Hodges–Lehmann interval",
             "bootstrap": f"bootstrap (percentile, {n_boot} resamples), paired t p"}[ci]
    out = {"n": n, "mean": mean, "sd": sd, "estimate": mean, "lo": np.nan, "hi": np.nan,
           "level": level, "coverage": level, "p": np.nan, "t": np.nan, "method": label}
    if n < 2:
        return out
    if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):  # equal differences up to rounding: no spread
        out["sd"] = sd = 0.0
    else:
        res = stats.ttest_rel(a, b)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    if ci == "t":
        half = stats.t.ppf((1 + level) / 2, n - 1) * sd / np.sqrt(n)
        out["lo"], out["hi"] = mean - half, mean + half
    elif ci == "bootstrap":
        out["lo"], out["hi"] = bootstrap_ci(d, n_boot=n_boot, seed=seed, level=level)
    else:
        out.update(_wilcoxon(d, level))
    return out


def _wilcoxon(d: np.ndarray, level: float) -> dict:
    out = {"p": np.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            out["p"] = float(stats.wilcoxon(d).pvalue)
        except ValueError:  # every difference zero
            pass
    n = d.size
    i, j = np.triu_indices(n)
    walsh = np.sort((d[i] + d[j]) / 2)
    m = walsh.size                                   # n(n+1)/2
    counts = np.zeros(m + 1)                         # null distribution of T+ = sum of positive ranks
    counts[0] = 1.0
    for k in range(1, n + 1):
        counts[k:] = counts[k:] + counts[:-k].copy()
    cdf = np.cumsum(counts) / 2.0 ** n
    c = int(np.searchsorted(cdf, (1 - level) / 2 * (1 + 1e-12), side="right"))  # P(T <= c-1) <= alpha/2
    out["estimate"] = float(np.median(walsh))
    if c == 0:
        out.update(lo=np.nan, hi=np.nan, coverage=np.nan)
    else:
        out.update(lo=float(walsh[c - 1]), hi=float(walsh[m - c]), coverage=float(1 - 2 * cdf[c - 1]))
    return out


def holm(pvalues):
    """Holm–Bonferroni adjusted p-values, in the order given; NaN stays NaN and does not count in
    the family size m. Sorted ascending, p_(i) becomes max_{j<=i} min(1, (m − j + 1) p_(j)).
    A Series comes back as a Series with its index."""
    p = np.asarray(pvalues, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    m = idx.size
    if m:
        order = idx[np.argsort(p[idx], kind="stable")]
        out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return pd.Series(out, index=pvalues.index) if isinstance(pvalues, pd.Series) else out


def bootstrap_ci(d: np.ndarray, n_boot: int = 10_000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean paired difference (no minimum n here: `paired_difference`
    refuses it below 20 pairs). Percentile, not BCa: BCa's jackknife is undefined for few seeds."""
    d = np.asarray(d, dtype=float)
    if d.size < 2 or np.all(d == d[0]):
        return (np.nan, np.nan) if d.size < 2 else (float(d[0]), float(d[0]))
    res = stats.bootstrap((d,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# --- tables ----------------------------------------------------------------------------------

def _completed(sweep, col: str) -> pd.DataFrame:
    runs = sweep.runs
    values = pd.to_numeric(runs[col], errors="coerce") if col in runs else pd.Series(np.nan, index=runs.index)
    out = runs[runs["ok"] & values.notna()].copy()
    out[col] = values[out.index]
    out["task"] = out["task"].fillna("?") if "task" in out else "?"
    for c in ("budget_label", "pair_budget"):
        out[c] = out[c].fillna("") if c in out else ""
    for c in ("epochs", *SETTINGS):
        if c not in out:
            out[c] = np.nan
    return out


def _varies(runs: pd.DataFrame, col: str, within=None) -> bool:
    """Whether runs differ in `col` (within any group of `within`, if given)."""
    if col not in runs or runs.empty:
        return False
    if within is None:
        return runs[col].nunique(dropna=False) > 1
    return bool((runs.groupby(list(within), dropna=False)[col].nunique(dropna=False) > 1).any())


def summary_table(sweep, metric: str = "accuracy", split: str = "test") -> pd.DataFrame:
    """task, label, budget_label, [epochs], [lr, head_lr], mean, sd (ddof=1, NaN for one seed), n,
    seeds. epochs is a column when the runs differ in it, lr/head_lr when runs of one method and
    budget differ in them: such runs are never pooled."""
    col = f"final.{split}.{metric}"
    runs = _completed(sweep, col)
    keys = ["task", "label", "budget_label"]
    if _varies(runs, "epochs"):
        keys.append("epochs")
    keys += [c for c in SETTINGS if _varies(runs, c, within=keys)]
    out = (runs.groupby(keys, dropna=False)
           .agg(mean=(col, "mean"), sd=(col, lambda v: v.std(ddof=1)), n=(col, "size"),
                seeds=("seed", lambda v: ",".join(str(int(s)) for s in sorted(v.dropna()))))
           .reset_index())
    out.attrs.update(metric=metric, split=split, keys=keys)
    return out


PAIRED_COLUMNS = ["a", "b", "task", "budget", "n", "seeds", "mean_a", "mean_b", "mean_diff", "sd_diff",
                  "t", "p_value", "ci_low", "ci_high", "ci_method", "p_holm", "lr_a", "lr_b",
                  "head_lr_a", "head_lr_b"]


def paired_comparison(sweep, metric: str = "accuracy", split: str = "test", a: str = "adalora",
                      b: str = "lora", ci: str = "t", level: float = 0.95, n_boot: int = 10_000,
                      seed: int = 0) -> pd.DataFrame:
    """a − b (method labels) per task and comparable budget (`pair_budget`), and per epochs when
    runs differ in it; see `paired_comparisons`."""
    return paired_comparisons(sweep, metric, split, [(a, b)], ci=ci, level=level, n_boot=n_boot, seed=seed)


def paired_comparisons(sweep, metric: str = "accuracy", split: str = "test", pairs=(("adalora", "lora"),),
                       ci: str = "t", level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Each (a, b) of `pairs` (method labels), per task, comparable budget (`pair_budget`) and,
    when the runs differ in it, epochs: the differences a − b over the seeds present for both
    (repeats of a seed averaged first), as `paired_difference(ci, level)` computes them.

    Columns: a, b, task, [epochs], budget, n, seeds, mean_a, mean_b, mean_diff, sd_diff, t,
    p_value, ci_low, ci_high, ci_method, p_holm (Holm over every row of the table with a p-value),
    lr_a, lr_b, head_lr_a, head_lr_b. A label run at several learning rates in one group is
    split: each of its settings against the other's one setting, or equal settings against each
    other when both have several."""
    col = f"final.{split}.{metric}"
    runs = _completed(sweep, col)
    keys = ["task"] + (["epochs"] if _varies(runs, "epochs") else []) + ["pair_budget"]
    rows = []
    for a, b in pairs:
        for key, g in runs[runs["label"].isin([a, b])].groupby(keys, dropna=False):
            where = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            for (sa, ga), (sb, gb) in _setting_pairs(g[g["label"] == a], g[g["label"] == b]):
                va, vb = ga.groupby("seed")[col].mean(), gb.groupby("seed")[col].mean()
                seeds = va.index.intersection(vb.index)
                if len(seeds) == 0:
                    continue
                x, y = va.loc[seeds].to_numpy(float), vb.loc[seeds].to_numpy(float)
                r = paired_difference(x, y, ci=ci, level=level, n_boot=n_boot, seed=seed)
                rows.append({"a": a, "b": b, "task": where["task"], **({"epochs": where["epochs"]} if "epochs" in where else {}),
                             "budget": where["pair_budget"], "n": r["n"],
                             "seeds": ",".join(str(int(s)) for s in seeds), "mean_a": x.mean(), "mean_b": y.mean(),
                             "mean_diff": r["mean"], "sd_diff": r["sd"], "t": r["t"], "p_value": r["p"],
                             "ci_low": r["lo"], "ci_high": r["hi"], "ci_method": r["method"],
                             "lr_a": sa[0], "lr_b": sb[0], "head_lr_a": sa[1], "head_lr_b": sb[1]})
    cols = PAIRED_COLUMNS[:3] + (["epochs"] if "epochs" in keys else []) + PAIRED_COLUMNS[3:]
    out = pd.DataFrame(rows, columns=cols)
    out["p_holm"] = holm(out["p_value"].to_numpy(float))
    split_settings = bool(len(out)) and out.groupby(["a", "b", *[k if k != "pair_budget" else "budget" for k in keys]],
                                                    dropna=False).size().gt(1).any()
    out.attrs.update(metric=metric, split=split, a=pairs[0][0] if len(pairs) == 1 else None,
                     b=pairs[0][1] if len(pairs) == 1 else None, ci=ci, level=level,
                     k=int(out["p_value"].notna().sum()), split_settings=bool(split_settings))
    return out


def _setting_pairs(ga: pd.DataFrame, gb: pd.DataFrame):
    """[((setting_a, runs_a), (setting_b, runs_b))]: one pair when each side has one setting."""
    def by(g):
        return [(s if isinstance(s, tuple) else (s,), x) for s, x in g.groupby(list(SETTINGS), dropna=False)]
    sa, sb = by(ga), by(gb)
    if len(sa) > 1 and len(sb) > 1:
        keyed = {s: x for s, x in sb}
        return [((s, x), (s, keyed[s])) for s, x in sa if s in keyed]
    return [(x, y) for x in sa for y in sb]


def format_summary(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Wide display table: rows (method, budget[, epochs, lr...]), columns task, cells
    'mean ± sd (n=k)'."""
    if table.empty:
        return pd.DataFrame()
    cell = [f"{m:.{digits}f} ± {s:.{digits}f} (n={n})" if n > 1 else f"{m:.{digits}f} (n=1)"
            for m, s, n in zip(table["mean"], table["sd"], table["n"])]
    index = [k for k in table.attrs.get("keys", ["task", "label", "budget_label"]) if k != "task"]
    wide = table.assign(cell=cell).pivot(index=index, columns="task", values="cell")
    wide.index.names = [{"label": "method", "budget_label": "budget"}.get(k, k) for k in index]
    wide.columns.name = None
    return wide.fillna("–").reset_index()


def format_paired(table: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Display table: task, [epochs], budget, comparison, n, mean difference, the interval, p and
    the Holm-adjusted p (k = the number of comparisons in the table)."""
    if table.empty:
        return pd.DataFrame()
    f = lambda v: "–" if pd.isna(v) else f"{v:+.{digits}f}"  # noqa: E731
    g = lambda p: "–" if pd.isna(p) else f"{p:.3g}"  # noqa: E731
    level, ci = table.attrs.get("level", 0.95), table.attrs.get("ci", "t")
    interval = {"t": "t-interval", "wilcoxon": "Hodges–Lehmann interval", "bootstrap": "bootstrap CI"}[ci]
    p_name = {"t": "paired t p", "wilcoxon": "Wilcoxon p", "bootstrap": "paired t p"}[ci]
    out = {"task": table["task"]}
    if "epochs" in table:
        out["epochs"] = table["epochs"].map(lambda e: "–" if pd.isna(e) else f"{e:g}")
    out["budget"] = table["budget"]
    out["comparison"] = [f"{a} − {b}" for a, b in zip(table["a"], table["b"])]
    if table.attrs.get("split_settings"):
        out["lr a / b"] = [f"{x:g} / {y:g}" for x, y in zip(table["lr_a"], table["lr_b"])]
    out["n"] = table["n"]
    out["mean diff"] = table["mean_diff"].map(f)
    out[f"{level:.0%} {interval}"] = [f"[{f(lo)}, {f(hi)}]" for lo, hi in zip(table["ci_low"], table["ci_high"])]
    out[p_name] = table["p_value"].map(g)
    out[f"p Holm (k={table.attrs.get('k', table['p_value'].notna().sum())})"] = table["p_holm"].map(g)
    return pd.DataFrame(out)


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
