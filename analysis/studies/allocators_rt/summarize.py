"""The allocation-families study's numbers: run folders -> runs.csv, then runs.csv -> results.md.

    python analysis/studies/allocators_rt/summarize.py build ROOT/main [--out DIR]
    python analysis/studies/allocators_rt/summarize.py report [--out DIR]

`build` reads the run folders (files only: summary.json and the last record of ranks.jsonl) and
writes DIR/runs.csv, one row per run, failed ones included with their status. `report` reads ONLY
DIR/runs.csv, DIR/tuned.json and DIR/agreement.csv and writes DIR/results.md, so every number in
it can be recomputed from committed files. DIR defaults to this folder.

Statistics: each family minus the budget-matched LoRA, paired by seed: mean, the 95 % paired
t-interval mean ± t_{n−1,0.975}·sd/√n, the paired t-test's p and Holm-adjusted p over the five
comparisons of a table (analysis.tables.paired_difference, holm).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# run as a script from anywhere: the repository root (which holds `analysis`) goes on the path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from analysis import tables as T  # noqa: E402
from analysis.names import matrix_type, type_order

HERE = Path(__file__).resolve().parent
COMMAND = "python analysis/studies/allocators_rt/summarize.py report --out analysis/studies/allocators_rt"
FAMILIES = ("adalora", "sora", "elalora", "eva", "svd_truncate")
REFERENCE = "lora"
COLUMNS = ["run", "method", "seed", "status", "lr", "val", "test", "adapter_params", "budget_unit",
           "budget_target", "budget_kept", "budget_gap", "params_kept", "final_ranks", "wall_time_s",
           "git_commit"]


def _read_run(path: Path) -> dict:
    s = json.loads((path / "summary.json").read_text())
    cfg_lr = None
    hydra_cfg = path / ".hydra" / "config.yaml"
    if hydra_cfg.exists():
        import yaml
        cfg_lr = yaml.safe_load(hydra_cfg.read_text())["trainer"]["lr"]
    last = {}
    ranks_file = path / "ranks.jsonl"
    if ranks_file.exists():
        lines = [ln for ln in ranks_file.read_text().splitlines() if ln.strip()]
        last = json.loads(lines[-1]) if lines else {}
    final = s.get("final") or {}
    ranks = s.get("final_ranks") or last.get("ranks") or {}
    return {"run": path.name, "method": s.get("method"), "seed": s.get("seed"), "status": s.get("status"),
            "lr": cfg_lr, "val": (final.get("val") or {}).get("accuracy"),
            "test": (final.get("test") or {}).get("accuracy"),
            "adapter_params": (s.get("params") or {}).get("adapter_end"),
            "budget_unit": last.get("unit"), "budget_target": last.get("target"),
            "budget_kept": last.get("budget"), "budget_gap": last.get("gap"),
            "params_kept": last.get("params_kept"),
            "final_ranks": json.dumps(ranks, sort_keys=True) if ranks else "",
            "wall_time_s": s.get("wall_time_s"), "git_commit": s.get("git_commit")}


def build(root: Path, out: Path) -> pd.DataFrame:
    runs = sorted(p for p in root.iterdir() if (p / "summary.json").exists())
    if not runs:
        sys.exit(f"error: no run folder (with summary.json) under {root}: pass the study's ROOT/main")
    df = pd.DataFrame([_read_run(p) for p in runs], columns=COLUMNS).sort_values(["method", "seed"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "runs.csv.tmp"
    df.to_csv(tmp, index=False)
    tmp.replace(out / "runs.csv")
    return df


def _fmt(x: float, digits: int = 4, sign: bool = False) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(x: float) -> str:
    return "–" if not np.isfinite(x) else f"{x:.3f}"


def paired_rows(ok: pd.DataFrame, split: str) -> list[dict]:
    ref = ok[ok.method == REFERENCE].set_index("seed")[split]
    rows = []
    for m in FAMILIES:
        a = ok[ok.method == m].set_index("seed")[split]
        seeds = sorted(set(a.index) & set(ref.index))
        d = T.paired_difference(a.loc[seeds].to_numpy(), ref.loc[seeds].to_numpy())
        rows.append({**d, "family": m})   # d has its own "method" (the test's name)
    adj = T.holm([r["p"] for r in rows])
    for r, h in zip(rows, adj):
        r["p_holm"] = h
    return rows


def type_means(ok: pd.DataFrame) -> pd.DataFrame:
    """Mean final rank per matrix type and method (over modules of the type, then seeds)."""
    recs = []
    for _, r in ok[ok.final_ranks.fillna("") != ""].iterrows():
        for name, k in json.loads(r.final_ranks).items():
            recs.append({"method": r.method, "seed": r.seed, "type": matrix_type(name), "rank": k})
    if not recs:
        return pd.DataFrame()
    d = pd.DataFrame(recs).groupby(["method", "seed", "type"])["rank"].mean().groupby(["method", "type"]).mean()
    table = d.unstack("type")
    return table[[t for t in type_order(list(table.columns))]]


def report(out: Path) -> str:
    df = pd.read_csv(out / "runs.csv")
    tuned = json.loads((out / "tuned.json").read_text())["rotten_tomatoes"]
    ok = df[df.status == "completed"]
    lines = ["# Rank-allocation families on Rotten Tomatoes: results", "",
             f"Generated by `{COMMAND}` from `runs.csv`, `tuned.json` and `agreement.csv` (do not edit by hand).",
             f"{len(df)} runs, {len(ok)} completed; accuracy; seeds paired across methods.", "",
             "## Learning rates chosen on validation (seeds 100–101)", "",
             "| method | grid | chosen lr | val mean | val sd |", "|---|---|---|---|---|"]
    for m in (*FAMILIES, REFERENCE):
        t = tuned[m]
        grid = ", ".join(f"{g['trainer.lr']:g}" for g in t["grid"])
        lines.append(f"| {m} | {grid} | {t['overrides']['trainer.lr']:g} | {_fmt(t['val_mean'])} | {_fmt(t['val_sd'])} |")
    lines += ["", "## Scores and budgets (mean ± sd over seeds)", "",
              "Budget in singular values (`unit`): target and kept at the final allocation; `gap` = kept − "
              "target (– where the allocator's record does not carry it: AdaLoRA's records the budget it met, in "
              "values; LoRA has no allocator). Adapter parameters at the end of training (classifier head excluded).", "",
              "| method | n | val | test | adapter params | unit | target | kept | gap |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in (*FAMILIES, REFERENCE):
        g = ok[ok.method == m]
        if g.empty:
            continue
        def ms(c, digits=4):
            return f"{g[c].mean():.{digits}f} ± {g[c].std(ddof=1):.{digits}f}"
        unit = ", ".join(sorted(set(g.budget_unit.dropna()))) or "–"
        tgt = "–" if g.budget_target.isna().all() else f"{g.budget_target.mean():g}"
        kept = "–" if g.budget_kept.isna().all() else f"{g.budget_kept.mean():g} ({g.budget_kept.min():g}–{g.budget_kept.max():g})"
        gap = "–" if g.budget_gap.isna().all() else f"{g.budget_gap.mean():+g}"
        lines.append(f"| {m} | {len(g)} | {ms('val')} | {ms('test')} | {g.adapter_params.mean():.0f} "
                     f"({g.adapter_params.min():.0f}–{g.adapter_params.max():.0f}) | {unit} | {tgt} | {kept} | {gap} |")
    for split in ("test", "val"):
        rows = paired_rows(ok, split)
        lines += ["", f"## Each family − matched LoRA, {split} accuracy", "",
                  "Paired by seed; 95 % t-interval; Holm over the 5 comparisons of this table.", "",
                  "| comparison | n | mean diff | 95% t-interval | p | p Holm (k=5) |", "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['family']} − {REFERENCE} | {r['n']} | {_fmt(r['mean'], sign=True)} | "
                         f"[{_fmt(r['lo'], sign=True)}, {_fmt(r['hi'], sign=True)}] | {_p(r['p'])} | {_p(r['p_holm'])} |")
    tm = type_means(ok)
    if not tm.empty:
        lines += ["", "## Where the rank went: mean final rank per matrix type", "",
                  "| method | " + " | ".join(tm.columns) + " |", "|---|" + "---|" * len(tm.columns)]
        for m in (*FAMILIES, REFERENCE):
            if m in tm.index:
                lines.append(f"| {m} | " + " | ".join(f"{v:.2f}" for v in tm.loc[m]) + " |")
    agree = out / "agreement.csv"
    if agree.exists():
        a = pd.read_csv(agree)
        lines += ["", "## Allocation agreement (per-module final ranks)", "",
                  "Spearman ρ and Kendall τ between two runs' per-module ranks, mean ± sd over pairs: across "
                  "seeds within a method, and across methods at the same seed. LoRA's uniform ranks have no order (NaN).", "",
                  "| a | b | across | pairs | Spearman ρ | Kendall τ |", "|---|---|---|---|---|---|"]
        for _, r in a[(a.a != REFERENCE) & (a.b != REFERENCE)].iterrows():
            lines.append(f"| {r.a} | {r.b} | {r.kind} | {r.n_pairs} | {r.spearman_mean:.2f} ± {r.spearman_sd:.2f} | "
                         f"{r.kendall_mean:.2f} ± {r.kendall_sd:.2f} |")
    text = "\n".join(lines) + "\n"
    tmp = out / "results.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "results.md")
    return text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("build", "report"))
    ap.add_argument("root", nargs="?", help="build: the study's ROOT/main")
    ap.add_argument("--out", default=str(HERE))
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.stage == "build":
        if not args.root:
            sys.exit("error: build needs the run folder root: summarize.py build ROOT/main")
        build(Path(args.root), out)
    else:
        report(out)


if __name__ == "__main__":
    main()
