"""analysis/: loaders, tables and the report, on synthetic run folders written by hand to the
run-folder contract of experiments/README.md (the same keys experiments/runlog.py writes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import save_file
from scipy import stats

from analysis import runs as R
from analysis import tables as T

TYPES = {"attention.self.query": 0, "attention.self.key": 1, "attention.self.value": 2,
         "attention.output.dense": 3, "intermediate.dense": 4, "output.dense": 5}
N_LAYERS, R0, TARGET, STEPS, TI, TF, DT = 3, 6, 4.0, 100, 10, 30, 10
SCHEDULE = {"total_steps": STEPS, "init_warmup": TI, "final_warmup": TF, "mask_interval": DT,
            "shape": "cubic", "initial_budget": R0 * N_LAYERS * 6, "target_budget": int(TARGET * N_LAYERS * 6)}
MODULES = [f"encoder.layer.{i}.{t}" for i in range(N_LAYERS) for t in TYPES]
# Jobs of the synthetic multirun: (method, seed, status); job 5 dies before writing summary.json.
JOBS = [("adalora", 0, "completed"), ("adalora", 1, "completed"), ("lora", 0, "completed"),
        ("lora", 1, "completed"), ("adalora", 2, "failed"), ("lora", 2, None)]
ACC = {("adalora", 0): 0.86, ("adalora", 1): 0.88, ("lora", 0): 0.83, ("lora", 1): 0.86}


def _cubic(t):
    b0, bt = SCHEDULE["initial_budget"], SCHEDULE["target_budget"]
    if t <= TI:
        return b0
    if t >= STEPS - TF:
        return bt
    return round(bt + (b0 - bt) * (1 - (t - TI) / (STEPS - TF - TI)) ** 3)


def _final_ranks(seed):
    """Deeper layers and FFN matrices keep more rank (the paper's finding); sums to b_T."""
    w = np.array([(1 + i) * (1 + TYPES[m.split(".", 3)[3]] % 3) for i in range(N_LAYERS) for m in
                  [f"encoder.layer.{i}.{t}" for t in TYPES]], float) + seed
    ranks = np.minimum(R0, np.floor(w / w.sum() * SCHEDULE["target_budget"])).astype(int)
    i = 0
    while ranks.sum() < SCHEDULE["target_budget"]:  # hand out the remainder, never above r0
        if ranks[i % len(ranks)] < R0:
            ranks[i % len(ranks)] += 1
        i += 1
    return dict(zip(MODULES, ranks.tolist()))


def _write_job(d: Path, method: str, seed: int, status: str | None, last_step: int = STEPS):
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"method={method}", f"seed={seed}", "task=sst2"]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "method": {"name": method}}))
    rng = np.random.default_rng(seed + 10 * (method == "lora"))
    acc = ACC.get((method, seed), 0.5)
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(0, last_step + 1, 10):
            f.write(json.dumps({"step": step, "split": "train", "loss": 0.7 * np.exp(-step / 40) + 0.05 * rng.random(),
                                "orth": (0.5 * np.exp(-step / 30)) if method == "adalora" else 0.0,
                                "lr": 1e-3, "epoch": step / 50, "time_s": step * 0.1}) + "\n")
            if step % 50 == 0 and step:
                f.write(json.dumps({"step": step, "split": "val", "loss": 0.4, "accuracy": acc - 0.02 * (step < STEPS),
                                    "macro_f1": acc - 0.01, "mcc": 2 * acc - 1, "epoch": step / 50}) + "\n")
    final = _final_ranks(seed)
    if method == "adalora":
        with open(d / "ranks.jsonl", "w") as f:
            steps = [0] + [t for t in range(TI + 1, STEPS - TF + 1) if t % DT == 0 or t == STEPS - TF]
            for t in (s for s in steps if s <= last_step):
                b = _cubic(t)
                # intermediate records shrink every module towards its final rank in proportion
                frac = (SCHEDULE["initial_budget"] - b) / (SCHEDULE["initial_budget"] - SCHEDULE["target_budget"])
                ranks = {m: int(round(R0 - frac * (R0 - final[m]))) for m in MODULES}
                f.write(json.dumps({"step": t, "budget": b, "threshold": None if t == 0 else 0.01 * frac,
                                    "ranks": ranks, "params_kept": sum(ranks.values()) * 2 * 64}) + "\n")
        # adalora.save_adapters' layout: alive values of lam and their positions; r0 in adapters.json
        tensors, scores, meta = {}, {}, {}
        for m in MODULES:
            kept = np.sort(rng.choice(R0, final[m], replace=False))
            tensors[m + ".lam"] = (np.sort(rng.random(final[m]))[::-1] + 0.1).astype(np.float32)
            tensors[m + ".kept"] = kept.astype(np.int64)
            meta[m] = {"type": "svd", "rank": final[m], "r0": R0}
            alive = np.isin(np.arange(R0), kept)
            scores[m] = np.where(alive, 10 ** rng.uniform(-2, 0, R0), 10 ** rng.uniform(-5, -2.5, R0)).astype(np.float32)
        save_file(tensors, str(d / "adapters.safetensors"))
        (d / "adapters.json").write_text(json.dumps({"format": "adalora-adapters/1", "modules": meta}))
        save_file(scores, str(d / "importance.safetensors"))
    if status is None:
        return
    adapter = sum(final.values()) * 2 * 64 if method == "adalora" else len(MODULES) * 4 * 2 * 64
    summary = {
        "status": status, "error": "RuntimeError: CUDA out of memory" if status == "failed" else None,
        "method": method, "ablation": "none", "task": "sst2", "model": "tiny-bert", "seed": seed,
        "init_rank": R0 if method == "adalora" else None, "target_rank": TARGET if method == "adalora" else None,
        "lora_rank": 4 if method == "lora" else None,
        "budget": {"target_params": None, "matched_lora_rank": 4 if method == "adalora" else None, "lora_params": None},
        "schedule": SCHEDULE if method == "adalora" else None,
        "params": {"trainable_start": (R0 * N_LAYERS * 6 * 129 if method == "adalora" else adapter) + 1538,
                   "trainable_end": adapter + 1538, "adapter_start": R0 * 129 * 18, "adapter_end": adapter,
                   "base": 4_000_000},
        "final": {} if status != "completed" else {
            "val": {"accuracy": acc, "macro_f1": acc - 0.01, "mcc": 2 * acc - 1, "loss": 0.4},
            "test": {"accuracy": acc - 0.01, "macro_f1": acc - 0.02, "mcc": 2 * acc - 1.02, "loss": 0.41}},
        "final_ranks": final if method == "adalora" else {m: 4 for m in MODULES},
        "module_shapes": {m: [64, 64] for m in MODULES}, "steps": last_step, "wall_time_s": 12.5 + seed,
        "versions": {"adalora": "0.1.0", "torch": "2.13.0", "transformers": "5.0.0", "python": "3.11.7"},
        "git_commit": "abc1234",
    }
    (d / "summary.json").write_text(json.dumps(summary))


def make_sweep(root: Path) -> Path:
    """A Hydra multirun folder: jobs 0..5 of JOBS plus multirun.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    for i, (method, seed, status) in enumerate(JOBS):
        _write_job(root / str(i), method, seed, status, last_step=STEPS if status == "completed" else 40)
    with open(root / "5" / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "split": "tra')  # the half line a killed process leaves
    return root


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("multirun") / "demo")


@pytest.fixture(scope="module")
def sweep(sweep_dir):
    return R.load_sweep(sweep_dir)


# --- loaders ----------------------------------------------------------------------------------

def test_loader_recovers_every_run_and_marks_the_unfinished(sweep):
    runs = sweep.runs.set_index("run")
    assert list(runs.index) == [str(i) for i in range(len(JOBS))]
    assert list(runs["status"]) == ["completed"] * 4 + ["failed", "no_summary"]
    assert list(runs["ok"]) == [True] * 4 + [False, False]
    assert "out of memory" in runs.loc["4", "notes"]
    assert "unreadable" in runs.loc["5", "notes"]  # the half-written line is counted, not fatal
    # the run without summary.json still says what it was, from its Hydra overrides
    assert runs.loc["5", "method"] == "lora" and runs.loc["5", "seed"] == 2
    assert list(sweep.problems()["run"]) == ["4", "5"]
    assert runs.loc["0", "final.test.accuracy"] == pytest.approx(0.85)
    assert runs.loc["2", "params.trainable_end"] == len(MODULES) * 4 * 2 * 64 + 1538


def test_ranks_and_allocations_match_ranks_jsonl(sweep, sweep_dir):
    records = [json.loads(line) for line in (sweep_dir / "0" / "ranks.jsonl").read_text().splitlines()]
    alloc = sweep.allocations[sweep.allocations["run"] == "0"]
    assert list(alloc["step"]) == [r["step"] for r in records]
    assert list(alloc["realised"]) == [sum(r["ranks"].values()) for r in records]
    ranks = sweep.ranks[(sweep.ranks["run"] == "0") & (sweep.ranks["step"] == records[-1]["step"])]
    assert dict(zip(ranks["module"], ranks["rank"])) == records[-1]["ranks"]
    assert sweep.final_ranks("0") == _final_ranks(0)
    assert sweep.schedule("0") == SCHEDULE and sweep.schedule("2") is None


def test_load_run_of_a_single_folder(sweep_dir):
    one = R.load_run(sweep_dir / "1")
    assert len(one.runs) == 1 and one.runs["run"].iloc[0] == "1" and one.runs["ok"].iloc[0]


def test_spectrum_puts_kept_values_back_at_their_positions(sweep_dir):
    spec = R.load_spectrum(sweep_dir / "0")
    final = _final_ranks(0)
    assert spec.groupby("module").size().eq(R0).all()
    assert spec.groupby("module")["alive"].sum().to_dict() == final
    assert (spec.loc[~spec["alive"], "lam"] == 0).all()
    assert R.load_spectrum(sweep_dir / "2").empty  # LoRA run: no lam saved


@pytest.mark.parametrize("name, layer, mtype", [
    ("encoder.layer.3.attention.self.query", 3, "q"), ("encoder.layer.3.attention.output.dense", 3, "o"),
    ("encoder.layer.3.intermediate.dense", 3, "ffn-in"), ("encoder.layer.3.output.dense", 3, "ffn-out"),
    ("deberta.encoder.layer.0.attention.self.value_proj", 0, "v"), ("transformer.h.7.attn.c_attn", 7, "qkv"),
    ("transformer.h.7.mlp.c_proj", 7, "ffn-out"), ("model.layers.2.self_attn.o_proj", 2, "o"),
    ("model.layers.2.mlp.gate_proj", 2, "ffn-gate"), ("model.decoder.layers.1.fc2", 1, "ffn-out"),
    ("classifier.dense", None, "dense"),
])
def test_module_names_map_to_layer_and_matrix_type(name, layer, mtype):
    from analysis.names import layer_index, matrix_type
    assert (layer_index(name), matrix_type(name)) == (layer, mtype)


# --- tables -------------------------------------------------------------------------------------

def test_summary_table_mean_and_sd_equal_numpy(sweep):
    table = T.summary_table(sweep, "accuracy", "test").set_index("label")
    for method in ("adalora", "lora"):
        values = np.array([ACC[(method, s)] - 0.01 for s in (0, 1)])
        assert table.loc[method, "mean"] == pytest.approx(values.mean())
        assert table.loc[method, "sd"] == pytest.approx(values.std(ddof=1))
        assert table.loc[method, "n"] == 2  # the failed seed 2 is not a result


def test_paired_comparison_equals_scipy(sweep):
    paired = T.paired_comparison(sweep, "accuracy", "test").iloc[0]
    a = np.array([ACC[("adalora", s)] - 0.01 for s in (0, 1)])
    b = np.array([ACC[("lora", s)] - 0.01 for s in (0, 1)])
    ref = stats.ttest_rel(a, b)
    assert paired["n"] == 2 and paired["budget"] == "r=4"
    assert paired["mean_diff"] == pytest.approx((a - b).mean())
    assert paired["p_value"] == pytest.approx(ref.pvalue) and paired["t"] == pytest.approx(ref.statistic)
    assert paired["ci_low"] <= paired["mean_diff"] <= paired["ci_high"]


def test_bootstrap_ci_brackets_the_mean_and_matches_resampling_by_hand():
    d = np.array([0.01, 0.03, -0.005, 0.02, 0.015])
    lo, hi = T.bootstrap_ci(d, n_boot=20_000, seed=1)
    rng = np.random.default_rng(2)
    means = d[rng.integers(0, d.size, (20_000, d.size))].mean(axis=1)
    assert lo == pytest.approx(np.percentile(means, 2.5), abs=2e-3)
    assert hi == pytest.approx(np.percentile(means, 97.5), abs=2e-3)


def test_tables_are_written_as_csv_markdown_latex(sweep, tmp_path):
    table = T.summary_table(sweep, "accuracy", "val")
    paths = T.write(table, T.format_summary(table), tmp_path / "t")
    assert pd.read_csv(paths["csv"])["mean"].tolist() == pytest.approx(table["mean"].tolist())
    assert "0.8700 ± 0.0141 (n=2)" in paths["md"].read_text()
    assert r"\pm" in paths["tex"].read_text() and r"\toprule" in paths["tex"].read_text()


def _write_budget_run(d: Path, method: str, seed: int, acc: float, **summary) -> Path:
    """A completed run whose summary records only the given budget facts (the rest null)."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"seed={seed}"]))
    config = {"seed": seed, "method": {"name": method}, "trainer": {"lr": 1e-3}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    base = {"status": "completed", "method": method, "ablation": "none", "task": "sst2", "seed": seed,
            "init_rank": None, "target_rank": None, "lora_rank": None,
            "budget": {"target_params": None, "matched_lora_rank": None, "lora_params": None},
            "schedule": None, "params": {"trainable_end": 1000 + seed, "adapter_end": 900 + seed},
            "final": {"val": {"accuracy": acc}, "test": {"accuracy": acc}}}
    for key, v in summary.items():      # "budget.target_params" -> base["budget"]["target_params"]
        section, _, leaf = key.partition("__")
        (base[section].__setitem__(leaf, v) if leaf else base.__setitem__(section, v))
    (d / "summary.json").write_text(json.dumps(base))
    return d


def test_svd_truncate_runs_are_labelled_by_their_target_rank(tmp_path):
    """svd_truncate records no LoRA rank (it cuts its adapters to the target): its budget is the
    target rank, so runs at targets 2 and 4 are two rows, never one mean."""
    root = tmp_path / "trunc"
    for job, (target, seed, acc) in enumerate([(2.0, 0, 0.70), (2.0, 1, 0.72), (4.0, 0, 0.80), (4.0, 1, 0.82)]):
        _write_budget_run(root / str(job), "svd_truncate", seed, acc, target_rank=target,
                          budget__target_params=int(target) * 1000,
                          schedule={**SCHEDULE, "target_budget": int(target * 18)})
    sweep = R.load_sweep(root)
    assert list(sweep.runs["budget_label"]) == ["avg r=2", "avg r=2", "avg r=4", "avg r=4"]
    assert list(sweep.runs["pair_budget"]) == ["2000 params", "2000 params", "4000 params", "4000 params"]
    table = T.summary_table(sweep, "accuracy", "test").set_index("budget_label")
    assert table["n"].to_dict() == {"avg r=2": 2, "avg r=4": 2}
    assert table["mean"].to_dict() == pytest.approx({"avg r=2": 0.71, "avg r=4": 0.81})
    from analysis import tune
    with pytest.raises(tune.TuneError, match="differ in budget_label"):
        tune.select(sweep)


@pytest.mark.parametrize("facts, labels", [
    ({"budget__target_params": (5000, 9000)}, ("5000 params", "9000 params")),
    ({"schedule": ({"target_budget": 36}, {"target_budget": 72})}, ("b_T=36", "b_T=72")),
    ({"target_rank": (2.0, 4.0)}, ("avg r=2", "avg r=4")),
    ({"init_rank": (4, 8)}, ("r0=4", "r0=8")),
    ({}, ("900 adapter params", "901 adapter params")),   # nothing else: never one pooled row
])
def test_a_run_without_its_budget_knob_falls_back_to_the_budget_facts_it_records(tmp_path, facts, labels):
    for seed in (0, 1):
        _write_budget_run(tmp_path / "new" / str(seed), "new_method", seed, 0.7,
                          **{k: v[seed] for k, v in facts.items()})
    assert tuple(R.load_sweep(tmp_path / "new").runs["budget_label"]) == labels


def test_full_fine_tuning_has_no_budget_and_pools_its_seeds(tmp_path):
    for seed in (0, 1):
        _write_budget_run(tmp_path / "full" / str(seed), "full", seed, 0.7)
    assert list(R.load_sweep(tmp_path / "full").runs["budget_label"]) == ["", ""]


# --- report and schedule CLIs ------------------------------------------------------------------

def test_report_end_to_end(sweep_dir, tmp_path):
    from analysis import report
    assert report.main([str(sweep_dir), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| sst2 |" in text and "adalora − lora" in text
    assert "`4` **failed**" in text and "`5` **no_summary**" in text
    links = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    assert {"figures/metric_vs_params.png", "figures/learning_curves.png", "figures/heatmap_0.png",
            "figures/timeline_0.png", "figures/allocation_0.png", "figures/spectra_0.png"} <= set(links)
    for link in links:
        png = (tmp_path / "rep" / link).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "rep" / "table_test_accuracy.tex").exists()


def test_an_evaluation_folder_is_neither_a_failure_nor_a_result(tmp_path):
    """experiments.evaluate's folders re-score saved adapters: counted in the tables, a trained
    run would count twice; listed as failed, they would say something went wrong."""
    from analysis import report, tables
    from analysis.runs import load_sweep
    _write_budget_run(tmp_path / "0", "lora", 0, 0.8, lora_rank=4)
    ev = _write_budget_run(tmp_path / "0-eval", "lora", 0, 0.8, lora_rank=4)    # --out beside the run
    summary = json.loads((ev / "summary.json").read_text())
    (ev / "summary.json").write_text(json.dumps({**summary, "status": "evaluated",
                                                 "evaluated_from": str(tmp_path / "0")}))
    s = load_sweep(tmp_path)
    assert s.problems().empty and list(s.evaluations()["path"]) == [str(ev)]
    assert tables.summary_table(s, "accuracy", "test")["n"].tolist() == [1]
    assert report.main([str(tmp_path), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "None: every run completed." in text
    assert f"(lora): from `{tmp_path / '0'}`" in text.split("## Evaluations")[1]


@pytest.mark.parametrize("case", ["missing", "file", "metric"])
def test_report_and_agreement_refuse_bad_input_in_one_line_and_write_nothing(sweep_dir, tmp_path, capsys, case):
    from analysis import agreement, report
    src = {"missing": tmp_path / "no_such_sweep", "file": sweep_dir / "0" / "summary.json",
           "metric": sweep_dir}[case]
    out = tmp_path / "rep"
    extra = ["--metric", "bogus"] if case == "metric" else []
    assert report.main([str(src), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert {"missing": "not a directory", "file": "not a directory",
            "metric": "metric 'bogus': no run reports it; use one of accuracy"}[case] in err
    assert not out.exists()                             # nothing made, not even the figures folder
    if case == "metric":
        assert report.main([str(src), "--out", str(out), "--metric", "accuracy"]) == 0   # a metric it has
        return
    assert agreement.main([str(src), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()


def test_a_language_model_run_has_no_head_learning_rate(tmp_path):
    d = tmp_path / "lm"
    _write_job(d, "adalora", 0, "completed")
    cfg = {"seed": 0, "method": {"name": "adalora"}, "trainer": {"lr": 2e-3, "head_lr": 1e-2},
           "task": {"objective": "answer", "metric": "accuracy"}}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    row = R.load_sweep(d).runs.iloc[0]
    assert row["lr"] == 2e-3 and pd.isna(row["head_lr"])       # nothing trained at trainer.head_lr
    cfg["task"]["objective"] = "classify"
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert R.load_sweep(d).runs.iloc[0]["head_lr"] == 1e-2


def test_agreement_needs_two_completed_runs(sweep_dir, tmp_path, capsys):
    from analysis import agreement
    out = tmp_path / "agr"
    for src in ([sweep_dir / "0"], [sweep_dir / "0", sweep_dir / "4"]):    # one completed, then with a failed one
        assert agreement.main([*map(str, src), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: 1 completed run(s) with final ranks in ") and err.count("\n") == 1
        assert "agreement compares two or more" in err and not out.exists()
    assert agreement.main([str(sweep_dir / "0"), str(sweep_dir / "1"), "--out", str(out)]) == 0
    assert (out / "agreement.csv").is_file()


def test_schedule_cli_prints_phases_and_writes_png(tmp_path):
    out = tmp_path / "schedule.png"
    res = subprocess.run([sys.executable, "-m", "analysis.schedule", "--total-steps", "1000", "--init-warmup", "100",
                          "--final-warmup", "300", "--mask-interval", "10", "--init-rank", "12", "--target-rank", "8",
                          "--n-adapters", "12", "--out", str(out)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr
    assert "b_0 = 144, target b_T = 96" in res.stdout
    assert "final allocation forced at step 700" in res.stdout
    assert "final     steps    700 .. 999" in res.stdout     # steps run 0 .. T-1
    assert out.read_bytes()[:4] == b"\x89PNG" and out.with_suffix(".pdf").exists()


def test_schedule_cli_rejects_an_invalid_schedule(capsys):
    from analysis import schedule
    assert schedule.main(["--total-steps", "100", "--init-warmup", "60", "--final-warmup", "50",
                          "--n-adapters", "4", "--out", "unused.png"]) == 2
    assert "train longer" in capsys.readouterr().err
    for flag in ("--n-adapters", "--init-rank"):     # not blamed on --target-rank
        args = {"--total-steps": "100", "--n-adapters": "4", "--init-rank": "12", flag: "0"}
        assert schedule.main([x for kv in args.items() for x in kv] + ["--out", "unused.png"]) == 2
        assert capsys.readouterr().err == f"invalid schedule: {flag}=0: give 1 or more\n"
