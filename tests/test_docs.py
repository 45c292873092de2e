"""The repository explains itself: its docs quote files that are in it, nothing cites a document
outside it, and the packages import downward only."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN(\.md| section)|CONTRACT\.md|anchors-code|NOTES\.md|\bissue \d|/work/|shared/research")


def _tracked(*patterns):
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split() if (ROOT / p).is_file()]


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere in the file (lazy imports count)."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = mod.rsplit(".", node.level if not path.name == "__init__.py" else node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m == package or m.startswith(package + ".")}


def test_nothing_cites_a_document_outside_the_repository():
    files = [p for p in _tracked("*.py", "*.md", "*.yaml", "*.toml", "*.sh", "Makefile", ".ci/*")
             if p != Path(__file__).resolve()]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files for i, line in
            enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, hits


def test_readme_is_a_short_front_door_with_links_to_each_package():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for doc in ("adalora/README.md", "experiments/README.md", "analysis/README.md"):
        assert f"]({doc})" in text and (ROOT / doc).is_file()


def test_benchmark_tables_in_the_docs_match_the_committed_results():
    r = subprocess.run([sys.executable, "-m", "analysis.bench_tables", "--check", "analysis/README.md"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_analysis_never_imports_experiments_and_the_library_imports_neither():
    for p in (ROOT / "analysis").rglob("*.py"):
        assert not _imports(p, "experiments"), p
    for p in (ROOT / "adalora").rglob("*.py"):
        assert not (_imports(p, "experiments") | _imports(p, "analysis")), p


def test_experiments_modules_import_without_cycles_and_shadow_no_standard_module():
    files = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (ROOT / "experiments").rglob("*.py")}
    graph = {m: {i for i in _imports(p, "experiments") if i in files and i != m} for m, p in files.items()}
    seen, stack = set(), []

    def visit(m):
        assert m not in stack, " -> ".join(stack[stack.index(m):] + [m])
        if m in seen:
            return
        stack.append(m)
        for n in graph[m]:
            visit(n)
        stack.pop()
        seen.add(m)
    for m in graph:
        visit(m)
    # The application's modules are imported by relative name beside the standard library's
    # (experiments/logging.py was such a case); the library's io is only ever adalora.io.
    for pkg in ("experiments", "analysis"):
        shadow = [p.stem for p in (ROOT / pkg).rglob("*.py") if p.stem in sys.stdlib_module_names]
        assert not shadow, (pkg, shadow)


def test_fused_table_reads_its_cells_from_a_results_file(tmp_path):
    """The fused-path table: medians, IQRs, the ratio and peak memory as the file holds them."""
    import json

    from analysis import bench_tables as B

    v = lambda ms, iqr, mb: {"median_ms": ms, "iqr_ms": iqr, "peak_mem_mb": mb}  # noqa: E731
    d = {"kind": "fused_benchmark", "machine": "1x NVIDIA H200", "config": {"preset": "base", "compile": False,
         "compile_mode": "default", "dtype": "bf16"},
         "variants": {"floor": v(4.0, 0.1, 50), "lora": v(10.0, 1.0, 100), "lora_fused": v(9.0, 0.5, 90),
                      "adalora": v(20.0, 2.0, 200), "adalora_fused": v(22.0, 0.25, 210)},
         "ratios": {"lora_fused/lora": 0.9, "adalora_fused/adalora": 1.1}}
    d["variants"]["lora"]["kernel_ms"], d["variants"]["lora_fused"]["kernel_ms"] = 6.25, 5.5
    (tmp_path / "x.json").write_text(json.dumps(d))
    rows = B.fused(B.load(tmp_path)).splitlines()[2:]
    # the kernel-time cell only where both variants were profiled (CUDA runs)
    assert rows == [
        "| base, eager, bf16 | 1x H200 | lora | 4.0 | 10.0 (1.0) | 9.0 (0.5) | 0.90 | 6.2 / 5.5 | 100 / 90 | `x.json` |",
        "| base, eager, bf16 | 1x H200 | adalora | 4.0 | 20.0 (2.0) | 22.0 (0.2) | 1.10 | – | 200 / 210 | `x.json` |"]


def test_a_later_file_supersedes_the_variants_it_measured_again(tmp_path):
    """``supersedes`` drops the named variants from the older file, whose other rows stay; a
    superseded file that is not there is refused in one line."""
    import json

    from analysis import bench_tables as B

    v = lambda ms: {"median_ms": ms, "kernel_ms": ms}  # noqa: E731
    config = {"preset": "base", "compile": False, "step_graph": True, "dtype": "bf16", "bf16_mode": "weights",
              "lora_rank": 8, "target_rank": 8.0}
    check = {"max_abs_loss_diff": 0.0, "steps": 20, "mask_equal_steps": 20}
    old = {"kind": "paths_benchmark", "machine": "1x NVIDIA H200", "config": config,
           "variants": {"floor": v(5.0), "lora": v(9.0), "adalora": v(10.0), "lora_epilogue_banked": v(7.0),
                        "adalora_epilogue_banked": v(8.0)},
           "fused_check": {"lora_epilogue_banked": check, "adalora_epilogue_banked": check}}
    new = dict(old, variants={"floor": v(5.0), "lora_epilogue_banked": v(7.0), "adalora_epilogue_banked": v(7.5)},
               supersedes={"a.json": ["lora_epilogue_banked", "adalora_epilogue_banked"]})
    (tmp_path / "a.json").write_text(json.dumps(old))
    (tmp_path / "b.json").write_text(json.dumps(new))
    rows = [r.split(" | ")[2::10] for r in B.paths(B.load(tmp_path)).splitlines()[2:]]
    assert rows == [["none", "`a.json` |"], ["epilogue, banked", "`b.json` |"]]
    (tmp_path / "a.json").unlink()
    with pytest.raises(ValueError, match="supersedes a.json, which is not in"):
        B.load(tmp_path)


def test_paths_table_reads_its_cells_from_a_results_file(tmp_path):
    """The adapter-paths table: one row per path with both variants, ratios of the medians by
    hand, idle = median - kernel, and each fused path's check against the unfused one."""
    import json

    from analysis import bench_tables as B

    v = lambda ms, kernel: {"median_ms": ms, "kernel_ms": kernel}  # noqa: E731
    check = lambda diff, masks: {"max_abs_loss_diff": diff, "steps": 20, "mask_equal_steps": masks}  # noqa: E731
    config = {"preset": "large", "compile": False, "step_graph": True, "dtype": "bf16", "bf16_mode": "weights",
              "lora_rank": 8, "target_rank": 8.0}
    d = {"kind": "paths_benchmark", "machine": "1x NVIDIA H200", "config": config,
         "variants": {"floor": v(20.0, 19.0), "peft_lora": v(40.0, 38.0), "lora": v(32.0, 30.0),
                      "adalora": v(36.0, 34.5), "lora_epilogue": v(30.0, 29.0), "adalora_epilogue": v(33.0, 32.0),
                      "lora_triton": v(31.0, 30.0)},       # no adalora_triton: no triton row
         "fused_check": {"lora_epilogue": check(0.004, None), "adalora_epilogue": check(0.002, 19)}}
    (tmp_path / "x.json").write_text(json.dumps(d))
    rows = B.paths(B.load(tmp_path)).splitlines()[2:]
    assert rows == [
        "| large, step captured | 1x H200 | none | 20.0 | 32.0 | 36.0 | 1.60 | 1.80 | 1.12 | 0.80 | 34.5 / 1.5 | (reference) | `x.json` |",
        "| large, step captured | 1x H200 | epilogue | 20.0 | 30.0 | 33.0 | 1.50 | 1.65 | 1.10 | 0.75 | 32.0 / 1.0 | 0.004; 19/20 | `x.json` |"]
    # fp32 weights under autocast, and LoRA at another rank than AdaLoRA's target: both named
    config.update(bf16_mode="autocast", lora_rank=12)
    (tmp_path / "x.json").write_text(json.dumps(d))
    assert B.paths(B.load(tmp_path)).splitlines()[2].startswith("| large, step captured, autocast, LoRA r=12 | 1x H200 | none |")


def test_passes_table_takes_the_fastest_candidate_with_the_rank_term_by_hand(tmp_path):
    """One row per map and pass; the fastest of the candidates that add the rank-r term (never
    cuBLAS or Triton's GEMM alone, though faster) with the epilogue path's time over its."""
    import json

    from analysis import bench_tables as B

    us = {"cublas": 5.0, "epilogue": 12.0, "triton": 13.0, "tma": 8.0, "tma_gemm": 6.0, "row": 12.5}
    runs = [{"preset": "base", "n_tokens": 64, "d_in": 8, "d_out": 16, "direction": "forward", "candidate": c,
             "us": t, "rel_err": 0.001} for c, t in us.items()]
    runs += [dict(r, direction="input gradient", us=r["us"] + (5.0 if r["candidate"] == "tma" else 0.0))
             for r in runs]
    (tmp_path / "p.json").write_text(json.dumps({"kind": "pass_benchmark", "runs": runs}))
    assert B.passes(B.load(tmp_path)).splitlines()[2:] == [
        "| base, 64 × 8 → 16 | forward | 5.0 | 12.0 | 13.0 | 8.0 | 6.0 | 12.5 | tma (1.50) | `p.json` |",
        "| base, 64 × 8 → 16 | input gradient | 5.0 | 12.0 | 13.0 | 13.0 | 6.0 | 12.5 | epilogue (1.00) | `p.json` |"]


def test_kernels_table_subtracts_the_floor_kernel_by_kernel(tmp_path):
    """The kernel breakdown: AdaLoRA's longest kernels less the floor's same names, by hand; names
    under 0.01 ms extra left out; then the rows' sum and both adapters' whole-step extras."""
    import json

    from analysis import bench_tables as B

    k = lambda name, ms, count: {"name": name, "ms": ms, "count": count}  # noqa: E731
    d = {"kind": "kernel_breakdown", "variants": {
        "floor": {"kernel_ms": 4.0, "kernels": 400.0, "top_kernels": [k("gemm", 2.0, 60.0), k("add", 0.5, 70.0)]},
        "lora_epilogue": {"kernel_ms": 5.5, "kernels": 800.0, "top_kernels": []},
        "adalora_epilogue": {"kernel_ms": 6.25, "kernels": 950.0,
                             "top_kernels": [k("gemm", 2.5, 60.0), k("rank_update", 0.75, 119.0),
                                             k("add", 0.505, 71.0)]}}}
    (tmp_path / "x.json").write_text(json.dumps(d))
    assert B.kernels(B.load(tmp_path)).splitlines()[2:] == [
        "| `rank_update` | 0.750 | 119 | `x.json` |",
        "| `gemm` | 0.500 | 0 | `x.json` |",
        "| (these rows) | 1.250 |  | `x.json` |",
        "| (whole step, AdaLoRA) | 2.250 | 550 | `x.json` |",
        "| (whole step, LoRA) | 1.500 | 400 | `x.json` |"]


def test_host_phase_and_pair_tables_read_their_cells_from_results_files(tmp_path):
    """Host phases: each variant's phases, their sum and the timed median (IQR), then AdaLoRA's
    phases less LoRA's by hand. Pairs: each variant's a and b medians, b ÷ a, kernel ms and counts."""
    import json

    from analysis import bench_tables as B

    phases = lambda *ms: dict(zip(("forward", "backward", "penalty", "update", "zero_grad"), ms))  # noqa: E731
    d = {"kind": "phases_benchmark", "machine": "1x NVIDIA H100 80GB HBM3", "config": {"preset": "base", "bf16_mode": "autocast"}, "variants": {
        "lora_epilogue": {"host_phases_ms": phases(10.0, 8.0, 0.0, 1.5, 0.25), "median_ms": 20.0, "iqr_ms": 2.0},
        "adalora_epilogue": {"host_phases_ms": phases(9.5, 8.5, 3.0, 4.0, 0.5), "median_ms": 26.0, "iqr_ms": 1.0}}}
    run = lambda ms, k, n: {"median_ms": ms, "kernel_ms": k, "kernels": n}  # noqa: E731
    pair = {"kind": "ab_pair", "a": {"variants": {"floor": run(5.0, 4.5, 477.0), "adalora_epilogue": run(8.0, 7.5, 1140.0)}},
            "b": {"variants": {"floor": run(4.0, 4.5, 477.0), "adalora_epilogue": run(7.8, 7.25, 1113.0)}}}
    (tmp_path / "p.json").write_text(json.dumps(d))
    (tmp_path / "q.json").write_text(json.dumps(pair))
    files = B.load(tmp_path)
    assert B.host_phases(files).splitlines()[2:] == [
        "| base, eager, autocast | 1x H100 | lora_epilogue | 10.00 | 8.00 | 0.00 | 1.50 | 0.25 | 19.8 | 20.0 (2.0) | `p.json` |",
        "| base, eager, autocast | 1x H100 | adalora_epilogue | 9.50 | 8.50 | 3.00 | 4.00 | 0.50 | 25.5 | 26.0 (1.0) | `p.json` |",
        "| base, eager, autocast | 1x H100 | AdaLoRA − LoRA | -0.50 | +0.50 | +3.00 | +2.50 | +0.25 | +5.8 |  | `p.json` |"]
    assert B.ab_pairs(files).splitlines()[3:] == [
        "| `adalora_epilogue` | 8.00 / 7.80 | 0.975 | 1.60 / 1.95 | 7.50 / 7.25 | 1140 / 1113 | `q.json` |"]


def test_eager_pairs_table_pairs_the_rounds_and_widens_its_intervals_by_the_number_of_rows(tmp_path):
    """AdaLoRA over LoRA round by round, by hand: rounds 2, 3, 4 against 1, 2, 2 ms give ratios 2,
    1.5, 2, mean 1.83, standard deviation 0.289; one row: t(0.975, 2) = 4.303, so ± 0.717. Two rows:
    each interval at t(1 − 0.025/2, 2) = 6.205, ± 1.034. Captured and CPU files are left out."""
    import json

    from analysis import bench_tables as B

    def run(rounds):
        return {"rounds_ms": rounds, "median_ms": sorted(rounds)[len(rounds) // 2]}
    eager = {"kind": "paths_benchmark", "machine": "1x NVIDIA H200, 16 CPU cores",
             "config": {"preset": "base", "device": "cuda", "step_graph": False},
             "variants": {"lora_epilogue": run([1.0, 2.0, 2.0]), "adalora_epilogue": run([2.0, 3.0, 4.0])}}
    (tmp_path / "e.json").write_text(json.dumps(eager))
    captured = dict(eager, config=dict(eager["config"], step_graph=True))
    (tmp_path / "s.json").write_text(json.dumps(captured))
    (tmp_path / "c.json").write_text(json.dumps(dict(eager, config=dict(eager["config"], device="cpu"))))
    assert B.eager_pairs(B.load(tmp_path)).splitlines()[2:] == [
        "| base, eager | 1x H200 | epilogue | 3 | 1.50 | 1.83 [1.12, 2.55] | `e.json` |"]
    merged = dict(eager, variants=dict(eager["variants"], lora_merge=run([1.0, 2.0, 2.0]), adalora_merge=run([2.0, 3.0, 4.0])))
    (tmp_path / "e.json").write_text(json.dumps(merged))
    assert B.eager_pairs(B.load(tmp_path)).splitlines()[2:] == [
        "| base, eager | 1x H200 | epilogue | 3 | 1.50 | 1.83 [0.80, 2.87] | `e.json` |",
        "| base, eager | 1x H200 | merge | 3 | 1.50 | 1.83 [0.80, 2.87] | `e.json` |"]
    # a tail_graph file is its own row, labelled so, and counts towards the correction (3 rows:
    # t(1 − 0.025/3, 2) = 7.649, ± 1.275)
    tail = dict(eager, config=dict(eager["config"], tail_graph=True, bf16_mode="autocast"))
    (tmp_path / "t.json").write_text(json.dumps(tail))
    assert B.eager_pairs(B.load(tmp_path)).splitlines()[4] == (
        "| base, tail graphs, autocast | 1x H200 | epilogue | 3 | 1.50 | 1.83 [0.56, 3.11] | `t.json` |")


def test_flat_gates_table_pairs_flat_with_separate_gates_round_by_round(tmp_path):
    """Flat over separate parameters by hand. Flat gates: rounds 4, 6, 6 against 4, 5, 6 ms give
    ratios 1, 1.2, 1, mean 1.0667, standard deviation 0.1155. Banked (flat gates and factors):
    4, 4, 5 against 4, 5, 6 give 1, 0.8, 0.8333, mean 0.8778, standard deviation 0.1072. Two rows,
    so each interval is at 1 − 0.05/2: t(0.9875, 2) = 6.2053, half-widths 6.2053 × s / √3 =
    0.414 and 0.384. The host phases gain "flat gates − LoRA" and "banked − LoRA" rows, and
    eager_pairs the flat and banked paths against LoRA."""
    import json

    from analysis import bench_tables as B

    phases = lambda *ms: dict(zip(("forward", "backward", "penalty", "update", "zero_grad"), ms))  # noqa: E731

    def run(rounds, p):
        return {"rounds_ms": rounds, "median_ms": sorted(rounds)[len(rounds) // 2], "iqr_ms": 1.0, "host_phases_ms": p}
    d = {"kind": "phases_benchmark", "machine": "1x NVIDIA H200, 16 CPU cores",
         "config": {"preset": "large", "device": "cuda", "step_graph": False}, "variants": {
             "lora_epilogue": run([2.0, 3.0, 3.0], phases(1.0, 1.0, 0.0, 1.0, 0.5)),
             "lora_epilogue_banked": run([2.0, 2.0, 2.0], phases(1.0, 1.0, 0.0, 0.5, 0.25)),
             "adalora_epilogue": run([4.0, 5.0, 6.0], phases(1.0, 1.5, 1.0, 3.0, 0.5)),
             "adalora_epilogue_flat": run([4.0, 6.0, 6.0], phases(1.0, 1.25, 1.0, 2.0, 0.25)),
             "adalora_epilogue_banked": run([4.0, 4.0, 5.0], phases(1.5, 1.25, 0.5, 1.5, 0.25))}}
    (tmp_path / "f.json").write_text(json.dumps(d))
    files = B.load(tmp_path)
    assert B.flat_gates(files).splitlines()[2:] == [
        "| large, eager | 1x H200 | gates | 3 | 5.0 / 6.0 | 1.07 [0.65, 1.48] | 3.00 / 2.00 | 1.00 / 1.00 | 1.50 / 1.25 | `f.json` |",
        "| large, eager | 1x H200 | gates and factors | 3 | 5.0 / 4.0 | 0.88 [0.49, 1.26] | 3.00 / 1.50 | 1.00 / 0.50 "
        "| 1.50 / 1.25 | `f.json` |"]
    assert B.host_phases(files).splitlines()[-2:] == [
        "| large, eager | 1x H200 | flat gates − LoRA | +0.00 | +0.25 | +1.00 | +1.00 | -0.25 | +2.0 |  | `f.json` |",
        "| large, eager | 1x H200 | banked − LoRA | +0.50 | +0.25 | +0.50 | +0.50 | -0.25 | +1.5 |  | `f.json` |"]
    # ratios 2, 2, 2 against LoRA: no spread, so the interval is the mean itself; banked AdaLoRA
    # over LoRA 2, 4/3, 5/3 and over banked LoRA 2, 2, 2.5 (medians 4/3 and 4/2)
    rows = B.eager_pairs(files).splitlines()[2:]
    assert rows[1] == "| large, eager | 1x H200 | epilogue, flat gates | 3 | 2.00 | 2.00 [2.00, 2.00] | `f.json` |"
    assert rows[2].startswith("| large, eager | 1x H200 | epilogue, AdaLoRA banked | 3 | 1.33 | 1.67 [")
    assert rows[3].startswith("| large, eager | 1x H200 | epilogue, both banked | 3 | 2.00 | 2.17 [")


def test_loop_tables_reduce_the_train_logs_and_pair_the_seeds_by_hand(tmp_path):
    """ms per step from the train log's 10-step spans (before step 20 and after an evaluation left
    out), eager over captured per seed, and the paired accuracy difference with its t-interval:
    differences 0.01, 0.02, 0.03 have mean 0.02, s = 0.01 and t(0.975, 2) = 4.3027, so the
    half-width is 4.3027 × 0.01 / √3 = 0.0248."""
    import json

    from analysis import bench_tables as B

    def run(name, seed, graph, ms, acc):
        # logs every 10 steps; the span 10 -> 20 is slow (left out), the one after step 30 holds
        # an evaluation (left out); the others take `ms` per step
        times = [0.0, 5.0, 5.0 + ms[0] / 100, 5.0 + (ms[0] + 999) / 100, 5.0 + (ms[0] + 999 + ms[1]) / 100]
        return {"run": name, "method": "adalora", "seed": seed, "precision": "bf16 autocast", "dropout": True, "step_graph": graph,
                "eval_steps": [30], "train_log": [[10 * (i + 1), t, 0.5] for i, t in enumerate(times)],
                "test_accuracy": acc, "peak_gpu_bytes": 3 * 2**20}
    runs = [run("e0", 0, False, (40.0, 60.0), 0.80), run("g0", 0, True, (4.0, 6.0), 0.81),
            run("e1", 1, False, (30.0, 30.0), 0.70), run("g1", 1, True, (3.0, 3.0), 0.72),
            run("e2", 2, False, (10.0, 10.0), 0.60), run("g2", 2, True, (5.0, 5.0), 0.63)]
    cmp = lambda a, b: {"a": a, "b": b, "steps_and_budgets_identical": True, "records_ranks_identical": False,  # noqa: E731
                        "first_differing_record_step": 35, "final_ranks_l1": 4, "max_abs_train_loss_diff": 0.05}
    runs.append({**run("g3", 0, True, (4.0, 4.0), 0.5), "method": "lora"})     # no eager LoRA run to pair
    runs.append({**run("t0", 0, False, (20.0, 30.0), 0.79), "tail_graph": True})  # pairs with e0, not as eager
    lora = {**cmp("g0", "g3"), "steps_and_budgets_identical": None, "records_ranks_identical": None,
            "first_differing_record_step": None, "final_ranks_l1": None}
    d = {"kind": "loop_step_graph", "runs": runs,
         "comparisons": [cmp("e0", "g0"), cmp("e1", "g1"), cmp("e2", "g2"), lora]}
    (tmp_path / "x.json").write_text(json.dumps(d))
    assert B.step_ms(runs[0]) == pytest.approx([40.0, 60.0])
    files = B.load(tmp_path)
    rows = B.loop_runs(files).splitlines()[2:]
    assert rows[0] == "| `e0` | adalora | eager | bf16 autocast | yes | 0 | 50.00 (10.00) | – | 0.8000 | 3 | `x.json` |"
    assert rows[1] == "| `g0` | adalora | step_graph | bf16 autocast | yes | 0 | 5.00 (1.00) | 10.00× | 0.8100 | 3 | `x.json` |"
    assert rows[5].split(" | ")[6:8] == ["5.00 (0.00)", "2.00×"]
    assert rows[6].split(" | ")[6:8] == ["4.00 (0.00)", "–"]
    assert rows[7].split(" | ")[2:8] == ["tail_graph", "bf16 autocast", "yes", "0", "25.00 (5.00)", "2.00×"]
    rows = B.loop_compare(files).splitlines()[2:]
    assert rows[0] == "| `e0` / `g0` | yes | no | 35 | 4 | 0.05 | +0.0100 |"
    assert rows[3] == "| `g0` / `g3` | – | – | – | – | 0.05 | -0.3100 |"
    assert rows[4] == ("| adalora, 3 seeds, bf16 autocast, dropout on: step_graph − eager |  |  |  |  |  | "
                       "+0.0200 [-0.0048, +0.0448] |")


def test_loop_layouts_table_takes_each_runs_median_after_its_first_span_by_hand(tmp_path):
    """Flat runs at 10, 20, 30 ms per step (their first spans, 99 ms, left out) and runs per
    adapter at 40 and 50: medians 20 and 45, flat ÷ per adapter 20 / 45 = 0.44; the train losses
    of repeat 1 differ by at most 0.25, repeat 2 by 0.5 (repeat 3 has no pair)."""
    import json

    from analysis import bench_tables as B

    def run(layout, repeat, ms, losses):
        return {"setting": "s", "method": "adalora", "layout": layout, "repeat": repeat, "ms_per_step": [99.0, ms, ms],
                "train_loss": [[10, losses[0]], [20, losses[1]]]}
    runs = [run("flat (default)", 1, 10.0, (1.0, 0.5)), run("per adapter", 1, 40.0, (1.25, 0.5)),
            run("flat (default)", 2, 30.0, (1.0, 0.5)), run("per adapter", 2, 50.0, (1.0, 1.0)),
            run("flat (default)", 3, 20.0, (9.0, 9.0))]
    d = {"kind": "loop_layout", "machine": "1x NVIDIA H200, 16 CPU cores", "runs": runs}
    (tmp_path / "x.json").write_text(json.dumps(d))
    rows = B.loop_layouts(B.load(tmp_path)).splitlines()[2:]
    assert rows == ["| s | adalora | 1x H200 | 3 | 10.0, 30.0, 20.0 | 40.0, 50.0 | 0.44 | 0.5 | `x.json` |"]
