"""Markdown tables of the measured runs, from analysis/benchmarks/*.json only.

    python -m analysis.bench_tables                 # every table, each after a <!-- bench_tables:NAME --> line
    python -m analysis.bench_tables medians ratios  # only these, without the marker lines
    python -m analysis.bench_tables --check analysis/README.md   # exit 1 if a quoted table is stale

analysis/README.md quotes these tables between the same marker lines, so the Markdown can be
regenerated from the results files and compared with what the README says. Standard library, and
scipy for one t quantile: the numbers are read or reduced from the files, never from a run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "benchmarks"

# Medians table columns: (header, variants); two variants share a cell as "first / second".
MEDIAN_COLUMNS = (
    ("floor", ("floor",)), ("full FT", ("full",)), ("our LoRA", ("lora",)), ("peft LoRA", ("peft_lora",)),
    ("our AdaLoRA every step / every 10", ("adalora", "adalora_every10")),
    ("after `compact()` / LoRA at final ranks", ("adalora_compact", "lora_final")),
    ("peft AdaLoRA", ("peft_adalora",)),
)
RATIOS = ("adalora_every10/floor", "adalora/floor", "lora/floor", "full/floor", "adalora/lora",
          "adalora_every10/lora", "peft_adalora/adalora", "lora/peft_lora", "adalora_compact/lora_final")


def load(folder: Path = HERE) -> dict[str, dict]:
    """file name -> parsed results file, in name order. A file's ``supersedes`` (file name ->
    variant names) names what a later run measured again: those variants are left out of the
    older file, so every table quotes the latest measurement of each."""
    files = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    for name, d in files.items():
        for old, variants in d.get("supersedes", {}).items():
            if old not in files:
                raise ValueError(f"{name} supersedes {old}, which is not in {folder}: remove the entry or the file")
            for v in variants:
                files[old]["variants"].pop(v, None)
    return files


def benchmarks(files: dict[str, dict]) -> list[tuple[str, dict]]:
    """Benchmark files in table order: CUDA graphs, then eager, then CPU; base before large."""
    presets = ("tiny", "small", "base", "large")

    def key(item):
        c = item[1]["config"]
        return (c["device"] != "cuda", c["compile_mode"] != "reduce-overhead",
                presets.index(c["preset"]) if c["preset"] in presets else len(presets))
    return sorted(((n, d) for n, d in files.items() if d.get("kind") == "benchmark"), key=key)


def label(d: dict) -> str:
    c = d["config"]
    mode = "graphs" if c["compile"] and c["compile_mode"] == "reduce-overhead" else ("compiled" if c["compile"] else "eager")
    return f"{c['preset']}, {mode}" + ("" if c["device"] == "cuda" else f", {c['dtype']}, CPU")


def short_machine(d: dict) -> str:
    m = d.get("machine", "")
    return next((f"1x {gpu}" for gpu in ("H200", "H100") if gpu in m), "2-core CPU" if "2-core" in m else m)


def step_mode(c: dict) -> str:
    """How a file's uncompiled step ran: eager, or eager with the tail after backward as graphs."""
    return "tail graphs" if c.get("tail_graph") else "eager"


def shape_mode(c: dict) -> str:
    """Preset, step mode and, under bf16 autocast (fp32 weights), that."""
    return f"{c['preset']}, {step_mode(c)}" + (", autocast" if c.get("bf16_mode") == "autocast" else "")


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    """Pipe table; `align` has one letter per column, l or r (numbers are right-aligned)."""
    align = ["---:" if a == "r" else "---" for a in align]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _ms(d: dict, variant: str) -> str | None:
    v = d["variants"].get(variant)
    return None if v is None else f"{v['median_ms']:.1f}"


def medians(files) -> str:
    rows = []
    for name, d in benchmarks(files):
        cells = []
        for _, variants in MEDIAN_COLUMNS:
            values = [_ms(d, v) for v in variants]
            cells.append("" if all(v is None for v in values) else " / ".join(v or "–" for v in values))
        rows.append([label(d), short_machine(d), *cells, f"`{name}`"])
    return table(["shape, mode", "machine", *(c for c, _ in MEDIAN_COLUMNS), "results file"], rows,
                 "ll" + "r" * len(MEDIAN_COLUMNS) + "l")


def files_table(files) -> str:
    rows = []
    for name, d in benchmarks(files) + [(n, d) for n, d in files.items() if d.get("kind") != "benchmark"]:
        v = d["versions"]
        commit = d.get("commit") or "/".join(c[:7] for c in d.get("commits", []))
        rows.append([f"`{name}`", d["machine"], v.get("torch") or "–", v.get("transformers") or "–",
                     v.get("peft") or "not used", v.get("python") or "–", d["date"], commit if "/" in commit else commit[:7]])
    return table(["results file", "machine", "torch", "transformers", "peft", "python", "date", "commit"], rows,
                 "l" * 8)


def commands(files) -> str:
    lines = ["```bash"]
    for name, d in benchmarks(files) + [(n, d) for n, d in files.items() if d.get("kind") != "benchmark"]:
        lines.append(f"# {name}")
        lines += d["command"] if isinstance(d["command"], list) else [d["command"]]
    return "\n".join(lines + ["```"])


def ratios(files) -> str:
    runs = benchmarks(files)
    rows = []
    for r in RATIOS:
        cells = [f"{d['ratios'][r]:.2f}" if r in d["ratios"] else "" for _, d in runs]
        if any(cells):
            rows.append([f"`{r}`", *cells])
    return table(["median ÷ median", *(f"{label(d)} ({short_machine(d)})" for _, d in runs)], rows,
                 "l" + "r" * len(runs))


def memory(files) -> str:
    def cell(d, variant, key):
        v = d["variants"].get(variant)
        if v is None:
            return ""
        return f"{v[key] / 2**20:.1f}" if key.endswith("bytes") else f"{v[key]:.0f}"
    rows = [[label(d), short_machine(d), cell(d, "floor", "peak_mem_mb"), cell(d, "lora", "peak_mem_mb"),
             cell(d, "adalora_every10", "peak_mem_mb"), cell(d, "peft_adalora", "peak_mem_mb"),
             cell(d, "adalora_every10", "alloc_state_bytes"), cell(d, "peft_adalora", "alloc_state_bytes")]
            for _, d in benchmarks(files)]
    return table(["shape, mode", "machine", "peak MiB floor", "peak MiB our LoRA", "peak MiB our AdaLoRA (every 10)",
                  "peak MiB peft AdaLoRA", "our allocator state MiB", "peft allocator state MiB"], rows, "llrrrrrr")


def allocator(files) -> str:
    rows = []
    for name, d in benchmarks(files):
        for r in d.get("allocator") or []:
            ours, plain, peft = r["ours_mask_every_step_ops"], r["ours_nonmask_step_ops"], r.get("peft_mask_every_step_ops", {})
            rows.append([short_machine(d), str(r["layers"]), str(r["adapters"]), f"{r['ours_mask_every_step_ms']:.2f}",
                         f"{r['ours_mask_every_10_ms']:.2f}", f"{r.get('peft_mask_every_step_ms', float('nan')):.2f}",
                         f"{ours['ops']} / {plain['ops']}", f"{ours['host_syncs']} / {plain['host_syncs']}",
                         f"{peft.get('ops', '–'):,}", str(peft.get("host_syncs", "–")), f"`{name}`"])
    return table(["machine", "layers", "adapters", "ours ms, mask every step", "ours ms, mask every 10",
                  "peft ms, every step", "ours ops mask / plain step", "ours host syncs mask / plain",
                  "peft ops a step", "peft host syncs a step", "results file"], rows, "lrrrrrrrrrl")


def training(files) -> str:
    rows = []
    for name, d in files.items():
        if d.get("kind") != "training":
            continue
        for r in d["runs"]:
            acc = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "–"
            first = r["time_s_at_first_train_log"]
            rows.append([r["run"], r["status"], str(r["last_logged_train_step"]), f"{first['time_s']:.1f}",
                         f"{r['time_s_at_last_train_log']:.1f}", acc, f"`{name}`"])
    return table(["run", "status", "last logged step", "time s at first logged step", "time s at last logged step",
                  "test accuracy", "results file"], rows, "llrrrrl")


def ddp_runs(files) -> str:
    rows = []
    for name, d in files.items():
        if d.get("kind") != "ddp_one_gpu":
            continue
        for r in d["runs"]:
            rows.append([f"`{r['run']}`", f"{r['processes']} × {r['batch_per_process']}", r["precision"],
                         "yes" if r["dropout"] else "no", str(r["seed"]), r["status"], f"{r['test_accuracy']:.4f}"])
    return table(["run", "processes × batch", "precision", "dropout", "seed", "status", "test accuracy"], rows,
                 "llllrlr")


def ddp_compare(files) -> str:
    rows = []
    for name, d in files.items():
        if d.get("kind") != "ddp_one_gpu":
            continue
        for c in d["comparisons"]:
            first = c["first_differing_record_step"]
            rows.append([c["what"], str(c["final_ranks_l1"]), "yes" if c["records_ranks_identical"] else "no",
                         "–" if first is None else str(first), f"{c['test_accuracy_a']:.4f} / {c['test_accuracy_b']:.4f}"])
    return table(["comparison", "final ranks, L1 distance", "all allocation records' ranks identical",
                  "first differing record (step)", "test accuracy a / b"], rows, "lrlrr")


def switch(files) -> str:
    rows = []
    for name, d in files.items():
        if d.get("kind") != "adapter_switch":
            continue
        for r in d["runs"]:
            rows.append([r["what"], f"{r['median_ms']:.2f}", str(r["repeats"]), d["setup"], f"`{name}`"])
    return table(["operation", "median ms", "repeats", "setup", "results file"], rows, "lrrll")


def fused(files) -> str:
    """Unfused (the reference) against fused adapter paths: median ms per step with the IQR, and
    the GPU's busy time per step (kernel ms) where the file has it."""
    pairs = (("lora", "lora_fused"), ("adalora", "adalora_fused"))
    rows = []
    for name, d in files.items():
        if d.get("kind") != "fused_benchmark":
            continue
        c, v = d["config"], d["variants"]
        mode = "graphs" if c["compile"] and c["compile_mode"] == "reduce-overhead" else "eager"
        floor = v.get("floor", {}).get("median_ms")
        for ref, fu in pairs:
            a, b = v.get(ref), v.get(fu)
            if a is None or b is None:
                continue
            kernel = (f"{a['kernel_ms']:.1f} / {b['kernel_ms']:.1f}" if "kernel_ms" in a and "kernel_ms" in b else "–")
            rows.append([f"{c['preset']}, {mode}, {c['dtype']}", short_machine(d), ref,
                         "–" if floor is None else f"{floor:.1f}",
                         f"{a['median_ms']:.1f} ({a['iqr_ms']:.1f})", f"{b['median_ms']:.1f} ({b['iqr_ms']:.1f})",
                         f"{b['median_ms'] / a['median_ms']:.2f}", kernel,
                         f"{a['peak_mem_mb']:.0f} / {b['peak_mem_mb']:.0f}", f"`{name}`"])
    return table(["shape, mode", "machine", "adapter", "floor ms", "unfused ms (IQR)", "fused ms (IQR)", "fused ÷ unfused",
                  "kernel ms unfused / fused", "peak MiB unfused / fused", "results file"], rows, "lllrrrrrrl")


def step_graph(files) -> str:
    """The whole optimizer step captured as one CUDA graph: median ms per step, the ratios the
    speed goals name, AdaLoRA's kernel and idle ms, and the captured step against the same step
    run uncaptured (largest loss difference over its steps, steps whose rank masks agree)."""
    rows = []
    for name, d in files.items():
        if d.get("kind") != "step_graph_benchmark":
            continue
        v, check = d["variants"], d["graph_check"]
        ada = v["adalora"]
        every10 = v.get("adalora_every10")
        both = f"{ada['median_ms']:.1f}" + ("" if every10 is None else f" / {every10['median_ms']:.1f}")
        agree = (f"{max(check['lora']['max_abs_loss_diff'], check['adalora']['max_abs_loss_diff']):.3g}; "
                 f"{check['adalora']['mask_equal_steps']}/{check['adalora']['steps']}")
        kernels = "compiled" if d["config"]["compile"] else "eager"
        rows.append([f"{d['config']['preset']}, {kernels} kernels", short_machine(d), f"{v['floor']['median_ms']:.1f}", f"{v['lora']['median_ms']:.1f}",
                     _ms(d, "peft_lora") or "–", both, f"{d['ratios']['adalora/floor']:.2f}",
                     f"{d['ratios']['adalora/lora']:.2f}", f"{ada['kernel_ms']:.1f} / {ada['median_ms'] - ada['kernel_ms']:.1f}",
                     agree, f"`{name}`"])
    return table(["shape, kernels", "machine", "floor ms", "our LoRA ms", "peft LoRA ms", "our AdaLoRA ms (every step / every 10)",
                  "AdaLoRA ÷ floor", "AdaLoRA ÷ LoRA", "AdaLoRA kernel / idle ms", "captured vs uncaptured: max loss diff; equal masks",
                  "results file"], rows, "llrrrrrrrll")


def paths(files) -> str:
    """The adapter paths side by side (``fuse`` none, epilogue, triton): median ms per step, the
    ratios the speed goals name, AdaLoRA's kernel and idle ms, and each fused path's training
    against the unfused one from the same weights (largest loss difference; steps whose AdaLoRA
    rank masks agree)."""
    rows = []
    for name, d in files.items():
        if d.get("kind") != "paths_benchmark":
            continue
        c, v, check = d["config"], d["variants"], d.get("fused_check", {})
        mode = "step captured" if c.get("step_graph") else ("compiled" if c["compile"] else "eager")
        if c["dtype"] == "bf16" and c.get("bf16_mode") == "autocast":
            mode += ", autocast"             # fp32 weights, bf16 products: what trainer=gpu trains
        if c["lora_rank"] != int(c["target_rank"]):
            mode += f", LoRA r={c['lora_rank']}"      # not the default pairing (LoRA at AdaLoRA's target)
        floor, peft = v["floor"]["median_ms"], v.get("peft_lora", {}).get("median_ms")
        for path, suffix in (("none", ""), ("epilogue", "_epilogue"), ("merge", "_merge"), ("triton", "_triton"),
                             ("epilogue, banked", "_epilogue_banked")):
            lora, ada = v.get("lora" + suffix), v.get("adalora" + suffix)
            if lora is None or ada is None:
                continue
            if suffix:
                lc, ac = check["lora" + suffix], check["adalora" + suffix]
                agree = (f"{max(lc['max_abs_loss_diff'], ac['max_abs_loss_diff']):.3g}; "
                         f"{ac['mask_equal_steps']}/{ac['steps']}")
            else:
                agree = "(reference)"
            rows.append([f"{c['preset']}, {mode}", short_machine(d), path, f"{floor:.1f}", f"{lora['median_ms']:.1f}",
                         f"{ada['median_ms']:.1f}", f"{lora['median_ms'] / floor:.2f}", f"{ada['median_ms'] / floor:.2f}",
                         f"{ada['median_ms'] / lora['median_ms']:.2f}",
                         "–" if peft is None else f"{lora['median_ms'] / peft:.2f}",
                         f"{ada['kernel_ms']:.1f} / {ada['median_ms'] - ada['kernel_ms']:.1f}", agree, f"`{name}`"])
    return table(["shape, mode", "machine", "path", "floor ms", "LoRA ms", "AdaLoRA ms", "LoRA ÷ floor", "AdaLoRA ÷ floor",
                  "AdaLoRA ÷ LoRA", "LoRA ÷ peft LoRA", "AdaLoRA kernel / idle ms",
                  "vs unfused: max loss diff; equal masks", "results file"], rows, "lllrrrrrrrrll")


def kernels(files) -> str:
    """Per ``kernel_breakdown`` file, the kernels that the epilogue path's AdaLoRA step runs beyond
    the floor's: for each kernel name among its longest, the extra time and launches a step
    against the floor's same name, largest first; then the rows' sum, and the whole step's extra
    kernel time for AdaLoRA and for LoRA (the names outside the longest make the difference;
    LoRA's thin GEMMs get other cuBLAS kernels, so it is compared as a whole)."""
    rows = []
    for name, d in files.items():
        if d.get("kind") != "kernel_breakdown":
            continue
        v = d["variants"]
        floor = {t["name"]: t for t in v["floor"]["top_kernels"]}
        extra = {t["name"]: (t["ms"] - floor.get(t["name"], {}).get("ms", 0.0),
                             t["count"] - floor.get(t["name"], {}).get("count", 0.0))
                 for t in v["adalora_epilogue"]["top_kernels"]}
        listed = sorted((k for k in extra if extra[k][0] >= 0.01), key=lambda k: -extra[k][0])
        rows += [[f"`{k[:60]}`", f"{extra[k][0]:.3f}", f"{extra[k][1]:.0f}", f"`{name}`"] for k in listed]
        rows.append(["(these rows)", f"{sum(extra[k][0] for k in listed):.3f}", "", f"`{name}`"])
        for variant, what in (("adalora_epilogue", "AdaLoRA"), ("lora_epilogue", "LoRA")):
            rows.append([f"(whole step, {what})", f"{v[variant]['kernel_ms'] - v['floor']['kernel_ms']:.3f}",
                         f"{v[variant]['kernels'] - v['floor']['kernels']:.0f}", f"`{name}`"])
    return table(["kernel (name cut at 60 characters)", "extra ms a step", "extra launches a step", "results file"],
                 rows, "lrrl")


def host_phases(files) -> str:
    """``phases_benchmark`` files: per variant the host milliseconds of each phase of an eager
    step (medians over steps that each start on an idle device; the phases as the files name
    them, which must agree), their sum, and the timed median with its IQR; then AdaLoRA's phases
    less LoRA's, phase by phase."""
    rows, names = [], None
    for name, d in files.items():
        if d.get("kind") != "phases_benchmark":
            continue
        c, v = d["config"], d["variants"]
        shape = shape_mode(c)
        for variant, r in v.items():
            p = r["host_phases_ms"]
            if names is None:
                names = list(p)
            if list(p) != names:
                raise ValueError(f"{name}: {variant}'s phases {list(p)} are not the table's {names}")
            rows.append([shape, short_machine(d), variant] + [f"{p[k]:.2f}" for k in names]
                        + [f"{sum(p.values()):.1f}", f"{r['median_ms']:.1f} ({r['iqr_ms']:.1f})", f"`{name}`"])
        lora = v["lora_epilogue"]["host_phases_ms"]
        for variant, what in (("adalora_epilogue", "AdaLoRA − LoRA"), ("adalora_epilogue_flat", "flat gates − LoRA"),
                              ("adalora_epilogue_banked", "banked − LoRA")):
            if variant in v:
                ada = v[variant]["host_phases_ms"]
                rows.append([shape, short_machine(d), what] + [f"{ada[k] - lora[k]:+.2f}" for k in names]
                            + [f"{sum(ada.values()) - sum(lora.values()):+.1f}", "", f"`{name}`"])
    names = names or []
    return table(["shape, mode", "machine", "variant"] + [f"{k} ms" for k in names]
                 + ["sum ms", "timed ms (IQR)", "results file"], rows, "lll" + "r" * (len(names) + 2) + "l")


def ab_pairs(files) -> str:
    """``ab_pair`` files, two runs of one command on one machine start that differ in one change:
    per variant, median ms per step of each, b over a, each over its own run's floor, and the
    kernels' summed ms and number a step (summed: kernels on two streams can overlap)."""
    rows = []
    for name, d in files.items():
        if d.get("kind") != "ab_pair":
            continue
        a, b = d["a"]["variants"], d["b"]["variants"]
        for variant in a:
            x, y = a[variant], b[variant]
            rows.append([f"`{variant}`", f"{x['median_ms']:.2f} / {y['median_ms']:.2f}",
                         f"{y['median_ms'] / x['median_ms']:.3f}",
                         f"{x['median_ms'] / a['floor']['median_ms']:.2f} / {y['median_ms'] / b['floor']['median_ms']:.2f}",
                         f"{x['kernel_ms']:.2f} / {y['kernel_ms']:.2f}", f"{x['kernels']:.0f} / {y['kernels']:.0f}",
                         f"`{name}`"])
    return table(["variant", "ms a / b", "b ÷ a", "÷ floor a / b", "summed kernel ms a / b", "kernels a / b",
                  "results file"], rows, "lrrrrrl")


# (AdaLoRA variant suffix, LoRA variant suffix, the path's name in the table)
EAGER_PATHS = (("", "", "none"), ("_epilogue", "_epilogue", "epilogue"), ("_merge", "_merge", "merge"),
               ("_epilogue_flat", "_epilogue", "epilogue, flat gates"),
               ("_epilogue_banked", "_epilogue", "epilogue, AdaLoRA banked"),
               ("_epilogue_banked", "_epilogue_banked", "epilogue, both banked"))


def _t_rows(pairs: list[tuple[list[float], list[float]]]) -> list[str]:
    """For each ``(a, b)`` pair of per-round times, the mean of the per-round ratios a/b with a
    two-sided t-interval, simultaneous over the pairs (Bonferroni: each at 1 − 0.05/pairs)."""
    import statistics
    from scipy import stats
    out = []
    for a, b in pairs:
        per = [x / y for x, y in zip(a, b)]
        n = len(per)
        mean = statistics.mean(per)
        half = stats.t.ppf(1 - 0.025 / len(pairs), n - 1) * statistics.stdev(per) / n ** 0.5
        out.append(f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]")
    return out


def eager_pairs(files) -> str:
    """AdaLoRA over LoRA in the eager steps of one GPU (and with ``tail_graph``), round by round. The benchmark times every
    variant once per round, the rounds' order rotated, so a round's two medians were taken
    minutes apart at most: for each file and path, the ratio of the medians the file reports, and
    the mean of the per-round ratios with a two-sided t-interval. The intervals are simultaneous
    over the table's rows (Bonferroni: each at 1 − 0.05/rows), so the rows can be read together."""
    found = []
    for name, d in files.items():
        c, v = d.get("config") or {}, d.get("variants")
        if (d.get("kind") not in ("benchmark", "paths_benchmark", "phases_benchmark") or c.get("device") != "cuda"
                or c.get("step_graph") or c.get("compile") or not isinstance(v, dict)):
            continue
        for suffix, lora_suffix, path in EAGER_PATHS:
            a, lo = v.get(f"adalora{suffix}"), v.get(f"lora{lora_suffix}")
            if a and lo and len(a.get("rounds_ms", ())) == len(lo.get("rounds_ms", ())) > 1:
                found.append((name, d, c, path, a, lo))
    rows = []
    for (name, d, c, path, a, lo), ci in zip(found, _t_rows([(a["rounds_ms"], lo["rounds_ms"]) for *_, a, lo in found])):
        shape = shape_mode(c)
        rows.append([shape, short_machine(d), path, str(len(a["rounds_ms"])), f"{a['median_ms'] / lo['median_ms']:.2f}",
                     ci, f"`{name}`"])
    return table(["shape, mode", "machine", "path", "rounds", "median ÷ median", "per-round ratio, mean [simultaneous 95% t]",
                  "results file"], rows, "lllrrrl")


def flat_gates(files) -> str:
    """Flat parameters against parameters per adapter in the eager steps of one GPU, round by
    round as in ``eager_pairs``: AdaLoRA with flat gates (``adalora_epilogue_flat``) and banked,
    flat gates and factors (``adalora_epilogue_banked``), each over ``adalora_epilogue``, the
    intervals simultaneous over this table's rows; and the host milliseconds of the update phase
    (AdamW, the scorer, the mask step), of the penalty and of backward, each variant's median
    over steps."""
    found = [(name, d, flat, what) for name, d in files.items() if d.get("kind") == "phases_benchmark"
             for flat, what in (("adalora_epilogue_flat", "gates"), ("adalora_epilogue_banked", "gates and factors"))
             if {"adalora_epilogue", flat} <= set(d["variants"])]
    cis = _t_rows([(d["variants"][flat]["rounds_ms"], d["variants"]["adalora_epilogue"]["rounds_ms"])
                   for _, d, flat, _ in found])
    rows = []
    for (name, d, flat, what), ci in zip(found, cis):
        c, v = d["config"], d["variants"]
        sep, got = v["adalora_epilogue"], v[flat]
        phase = lambda k: f"{sep['host_phases_ms'][k]:.2f} / {got['host_phases_ms'][k]:.2f}"  # noqa: E731
        rows.append([shape_mode(c), short_machine(d), what, str(len(got["rounds_ms"])),
                     f"{sep['median_ms']:.1f} / {got['median_ms']:.1f}", ci, phase("update"), phase("penalty"),
                     phase("backward"), f"`{name}`"])
    return table(["shape, mode", "machine", "flat", "rounds", "median ms, per adapter / flat",
                  "flat ÷ per adapter, per round [simultaneous 95% t]", "update host ms", "penalty host ms",
                  "backward host ms", "results file"], rows, "lllrrrrrrl")


def step_ms(run: dict) -> list[float]:
    """ms per optimizer step over each 10-step span of a run's train log that holds no evaluation,
    from step 20 on (the first steps compile, tune and, with ``step_graph``, capture)."""
    log, evals = run["train_log"], set(run["eval_steps"])
    return [(b[1] - a[1]) / (b[0] - a[0]) * 1e3 for a, b in zip(log, log[1:])
            if a[0] >= 20 and b[0] - a[0] == 10 and a[0] not in evals]


def loop_runs(files) -> str:
    """``loop_step_graph`` files: each run's median ms per step (IQR over its 10-step spans), the
    eager run's median over that of the captured run (``step_graph``, or only its tail:
    ``tail_graph``) of the same method, seed and settings, and accuracy."""
    import statistics
    rows = []
    for name, d in files.items():
        if d.get("kind") != "loop_step_graph":
            continue
        key = lambda r: (r["method"], r["seed"], r["precision"], r["dropout"])  # noqa: E731
        spans = {r["run"]: step_ms(r) for r in d["runs"]}
        med = {run: statistics.median(ms) for run, ms in spans.items()}
        loop = lambda r: "step_graph" if r["step_graph"] else "tail_graph" if r.get("tail_graph") else "eager"  # noqa: E731
        eager = {key(r): r["run"] for r in d["runs"] if loop(r) == "eager"}
        for r in d["runs"]:
            q = statistics.quantiles(spans[r["run"]], n=4, method="inclusive")
            speed = (f"{med[eager[key(r)]] / med[r['run']]:.2f}×" if loop(r) != "eager" and key(r) in eager
                     else "–")
            rows.append([f"`{r['run']}`", r["method"], loop(r), r["precision"],
                         "yes" if r["dropout"] else "no", str(r["seed"]), f"{med[r['run']]:.2f} ({q[2] - q[0]:.2f})",
                         speed, f"{r['test_accuracy']:.4f}", f"{r['peak_gpu_bytes'] / 2**20:.0f}", f"`{name}`"])
    return table(["run", "method", "loop", "precision", "dropout", "seed", "ms per step (IQR)", "eager ÷ this",
                  "test accuracy", "peak GPU MiB", "results file"], rows, "llllllrrrrl")


def loop_compare(files) -> str:
    """``loop_step_graph`` files: pairs of runs (allocation records, losses, accuracy), and over
    the seeds where an eager run and a captured one differ only in the loop, the paired
    test-accuracy difference with its two-sided 95% t-interval."""
    import statistics
    from scipy import stats
    rows = []
    for name, d in files.items():
        if d.get("kind") != "loop_step_graph":
            continue
        run = {r["run"]: r for r in d["runs"]}
        yes_no = lambda v: "–" if v is None else ("yes" if v else "no")  # noqa: E731
        by = {}
        for c in d["comparisons"]:
            a, b, first = run[c["a"]], run[c["b"]], c["first_differing_record_step"]
            diff = b["test_accuracy"] - a["test_accuracy"]
            rows.append([f"`{c['a']}` / `{c['b']}`", yes_no(c["steps_and_budgets_identical"]),
                         yes_no(c["records_ranks_identical"]), "–" if first is None else str(first),
                         "–" if c["final_ranks_l1"] is None else str(c["final_ranks_l1"]),
                         f"{c['max_abs_train_loss_diff']:.2g}", f"{diff:+.4f}"])
            if not a["step_graph"] and b["step_graph"]:
                by.setdefault((a["method"], a["precision"], a["dropout"]), []).append(diff)
        for (method, precision, dropout), diffs in by.items():
            if len(diffs) < 2:
                continue
            mean, half = statistics.mean(diffs), stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
            rows.append([f"{method}, {len(diffs)} seeds, {precision}, dropout {'on' if dropout else 'off'}: "
                         "step_graph − eager", "", "", "", "", "", f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]"])
    return table(["runs a / b", "record steps and budgets equal", "every record's ranks equal",
                  "first differing record (step)", "final ranks, L1 distance", "largest train-loss difference",
                  "test accuracy, b − a"], rows, "lllrrrr")


def loop_layouts(files) -> str:
    """``loop_layout`` files: whole training runs with the app's flat parameters and with parameters
    per adapter, taking turns. Per setting and method: each run's median ms per step (its spans
    after the first, the warm-up), flat ÷ per adapter as the median of one layout's run medians
    over the other's, and the largest train-loss difference between runs of one repeat."""
    import statistics
    rows = []
    for name, d in files.items():
        if d.get("kind") != "loop_layout":
            continue
        groups = {}
        for r in d["runs"]:
            groups.setdefault((r["setting"], r["method"]), {}).setdefault(r["layout"], []).append(r)
        for (setting, method), by in groups.items():
            (flat,), (per,) = ([v for k, v in by.items() if k.startswith(w)] for w in ("flat", "per"))
            med = {id(r): statistics.median(r["ms_per_step"][1:]) for r in flat + per}
            mid = [statistics.median(med[id(r)] for r in runs) for runs in (flat, per)]
            pairs = [(a, b) for a in flat for b in per if a["repeat"] == b["repeat"]]
            diff = max(abs(x[1] - y[1]) for a, b in pairs for x, y in zip(a["train_loss"], b["train_loss"]))
            rows.append([setting, method, short_machine(d), str(len(flat)),
                         ", ".join(f"{med[id(r)]:.1f}" for r in flat), ", ".join(f"{med[id(r)]:.1f}" for r in per),
                         f"{mid[0] / mid[1]:.2f}", f"{diff:.2g}", f"`{name}`"])
    return table(["setting", "method", "machine", "pairs", "flat: ms per step, each run",
                  "per adapter: ms per step, each run", "flat ÷ per adapter", "largest train-loss difference",
                  "results file"], rows, "lllrllrrl")


def passes(files) -> str:
    """``pass_benchmark`` files: µs a call of each candidate for one adapted map's forward and input
    gradient, and the fastest of those that add the rank-r term."""
    names = ("cublas", "epilogue", "triton", "tma", "tma_gemm", "row")
    adapted = ("epilogue", "triton", "tma", "row")
    rows = []
    for name, d in files.items():
        if d.get("kind") != "pass_benchmark":
            continue
        cells: dict = {}
        for r in d["runs"]:
            key = (r["preset"], r["n_tokens"], r["d_in"], r["d_out"], r["direction"])
            cells.setdefault(key, {})[r["candidate"]] = r["us"]
        for (preset, n, d_in, d_out, direction), us in cells.items():
            best = min(adapted, key=us.__getitem__)
            rows.append([f"{preset}, {n} × {d_in} → {d_out}", direction, *(f"{us[c]:.1f}" for c in names),
                         f"{best} ({us['epilogue'] / us[best]:.2f})", f"`{name}`"])
    return table(["map (tokens × d_in → d_out)", "pass", "cuBLAS alone", "epilogue", "triton", "TMA", "TMA GEMM alone",
                  "row pass", "fastest with the rank-r term (epilogue ÷ it)", "results file"], rows, "llrrrrrrll")


TABLES = {"medians": medians, "fused": fused, "step_graph": step_graph, "paths": paths, "kernels": kernels, "passes": passes, "host_phases": host_phases, "ab_pairs": ab_pairs,
          "eager_pairs": eager_pairs, "flat_gates": flat_gates, "files": files_table, "commands": commands, "ratios": ratios, "memory": memory,
          "allocator": allocator, "training": training, "ddp_runs": ddp_runs, "ddp_compare": ddp_compare, "switch": switch,
          "loop_runs": loop_runs, "loop_compare": loop_compare, "loop_layouts": loop_layouts}


def render(names=None, folder: Path = HERE, markers: bool = True) -> str:
    files = load(folder)
    out = []
    for n in names or TABLES:
        out += ([f"<!-- bench_tables:{n} -->"] if markers else []) + [TABLES[n](files), ""]
    return "\n".join(out)


def check(doc: Path, folder: Path = HERE) -> list[str]:
    """Names of the tables whose marked copy in `doc` differs from what the files give now."""
    text, files, stale = Path(doc).read_text(), load(folder), []
    for n, make in TABLES.items():
        marker = f"<!-- bench_tables:{n} -->\n"
        if marker in text and not text.split(marker, 1)[1].startswith(make(files) + "\n"):
            stale.append(n)
    return stale


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--check"] and len(argv) == 2:
        stale = check(Path(argv[1]))
        print(f"stale tables in {argv[1]}: {', '.join(stale)}" if stale else f"{argv[1]}: tables up to date")
        return 1 if stale else 0
    unknown = [a for a in argv if a not in TABLES]
    if unknown:
        print(f"unknown table(s) {', '.join(unknown)}; choose from {', '.join(TABLES)}", file=sys.stderr)
        return 2
    print(render(argv or None, markers=not argv), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
