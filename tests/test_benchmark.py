"""The benchmark runs end to end on a tiny CPU shape and writes every variant (no timing asserted)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import adalora
from experiments import benchmark

ROOT = Path(__file__).resolve().parents[1]


def _check_outputs(out: Path, variants: list[str], alloc_layers: list[int]) -> dict:
    result = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert list(result["variants"]) == variants
    for name, r in result["variants"].items():
        assert len(r["rounds_ms"]) == result["config"]["rounds"]
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] and r["trainable_params"] > 0
        assert f"| {name} |" in md
    assert [row["layers"] for row in result["allocator"]] == alloc_layers
    return result


@pytest.mark.long
def test_benchmark_tiny_cpu_writes_every_variant(tmp_path):
    pytest.importorskip("peft", reason="peft is in the dev extra; the peft rows need it")
    # the Triton variants run in Triton's CPU interpreter, too slow for 20-step checks: tested below
    ours = [n for n in benchmark.VARIANTS[:-3] if not n.endswith("_triton")]
    cfg = benchmark.BenchConfig(preset="tiny", device="cpu", warmup=1, rounds=2, steps=2, alloc_layers=[1, 2],
                                alloc_steps=2, variants=ours + ["lora_final", "peft_lora", "peft_adalora"],
                                out=str(tmp_path))
    benchmark.run(cfg)
    result = _check_outputs(tmp_path, ours + ["peft_lora", "peft_adalora", "lora_final"], [1, 2])
    assert set(result["ratios"]) >= {"adalora/floor", "adalora/lora", "peft_adalora/adalora", "lora/peft_lora",
                                     "adalora_compact/lora_final", "lora_fused/lora", "adalora_fused/adalora",
                                     "lora_epilogue/lora", "adalora_epilogue/adalora"}
    v = result["variants"]
    assert result["ratios"]["adalora_epilogue/lora_epilogue"] == (
        v["adalora_epilogue"]["median_ms"] / v["lora_epilogue"]["median_ms"])
    assert not any("triton" in k for k in result["ratios"])           # no triton variant ran
    from experiments.bench_variants import PHASES
    assert all(list(r["host_phases_ms"]) == list(PHASES) for r in v.values())   # eager: every variant
    for name in ("lora", "adalora"):
        for fused in ("_fused", "_epilogue", "_merge"):
            assert v[name + fused]["trainable_params"] == v[name]["trainable_params"]
            assert v[name + fused]["alloc_state_bytes"] == v[name]["alloc_state_bytes"]
    check = result["fused_check"]
    assert set(check) == {f"{m}_{f}" for m in ("lora", "adalora") for f in ("fused", "epilogue", "merge")} | {
        "adalora_flat", "adalora_epilogue_flat", "adalora_banked", "adalora_epilogue_banked", "lora_banked",
        "lora_epilogue_banked"}                         # flat against per adapter
    for name in ("lora_banked", "lora_epilogue_banked"):
        assert v[name]["trainable_params"] == v["lora"]["trainable_params"]
    for name in ("adalora_flat", "adalora_epilogue_flat", "adalora_banked", "adalora_epilogue_banked"):
        assert v[name]["trainable_params"] == v["adalora"]["trainable_params"]
    for name, r in check.items():                     # fp32 on the CPU: the paths agree to round-off
        assert r["steps"] == 20 and r["max_rel_loss_diff"] < 1e-5, name
        assert r.get("mask_equal_steps", 20) == 20 and len(set(r["unfused_loss"])) > 1, name
    assert "Each fused path against the unfused one" in (tmp_path / "results.md").read_text()
    # Structural facts, not timings: AdaLoRA keeps Ī and Ū (2 copies of the adapter parameters),
    # peft keeps ipt as well (3); compact() leaves the LoRA-of-final-ranks parameter count (+ lam).
    head = v["floor"]["trainable_params"] - 64            # the floor trains the head and the LN scale (hidden 64)
    adapter_params = v["adalora"]["trainable_params"] - head
    assert adapter_params == 2 * 12 * (4 * (64 + 64 + 1) + 2 * (128 + 64 + 1))
    assert v["adalora"]["alloc_state_bytes"] == 2 * 4 * adapter_params
    assert v["peft_adalora"]["alloc_state_bytes"] == 3 * v["adalora"]["alloc_state_bytes"] // 2
    ranks = v["adalora_compact"]["final_ranks"]
    assert sum(ranks.values()) == 8 * 6 * 2
    assert v["adalora_compact"]["trainable_params"] - v["lora_final"]["trainable_params"] == sum(ranks.values())
    row = result["allocator"][1]
    assert row["ours_state_bytes"] == 2 * row["adapter_param_bytes"]
    assert row["peft_state_bytes"] == 3 * row["adapter_param_bytes"]


def test_benchmark_config_checks_and_hydra_overrides():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="benchmark_schema", node=benchmark.BenchConfig)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        dcfg = compose(config_name="benchmark", overrides=[
            "preset=large", "dtype=bf16", "compile=true", "variants=[floor,adalora]", "alloc_layers=[]", "layers=3"])
    cfg = OmegaConf.to_object(dcfg)
    assert (cfg.layers, cfg.hidden, cfg.seq, cfg.dtype, cfg.compile) == (3, 1024, 256, "bf16", True)
    assert cfg.variants == ["floor", "adalora"] and cfg.alloc_layers == []
    fused = ["lora", "lora_fused", "adalora", "adalora_fused"]
    cfg = benchmark.BenchConfig(preset="smollm2", variants=fused)
    assert cfg.variants == fused and cfg.arch == "llama"
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.vocab, cfg.seq, cfg.batch) == \
        (30, 576, 9, 3, 1536, 49152, 256, 16)
    with pytest.raises(ValueError, match="unknown variants"):
        benchmark.BenchConfig(variants=["adalora", "qlora"])
    with pytest.raises(ValueError, match="preset:dtype"):
        benchmark.BenchConfig(suite=["base:fp16"])
    with pytest.raises(ValueError, match="top_kernels=-1"):
        benchmark.BenchConfig(top_kernels=-1)
    with pytest.raises(ValueError, match="device=gpu: use auto, cpu, cuda or cuda:N"):
        benchmark.BenchConfig(device="gpu")


def test_benchmark_bad_override_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "preset=huge", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "preset='huge': use one of" in r.stderr
    assert not (tmp_path / "results.json").exists()
    r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--preset", "base"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --preset:")
    assert "preset=<value>" in r.stderr
    import torch
    if not torch.cuda.is_available():     # torch's own error was a traceback at the first .to
        r = subprocess.run([sys.executable, "-m", "experiments.benchmark", "device=cuda:0", f"hydra.run.dir={tmp_path}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: device=cuda:0: this torch (")
        assert "sees no CUDA device; use device=cpu or auto" in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "results.json").exists()


@pytest.mark.long
def test_benchmark_hydra_entry_point(tmp_path):
    pytest.importorskip("hydra")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.benchmark", "preset=tiny", "device=cpu", "warmup=1", "rounds=1",
           "steps=1", "variants=[floor,lora,adalora]", "alloc_layers=[1]", "alloc_steps=1", f"hydra.run.dir={out}"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    _check_outputs(out, ["floor", "lora", "adalora"], [1])


@pytest.mark.long
def test_compiled_variants_each_compile_once(tmp_path, no_recompiles):
    """Every variant's loss closure has its own Dynamo cache (one compile each, no recompiles
    across variants or steps, masking included) and `graphs` in a suite entry means reduce-overhead."""
    cfg = benchmark.BenchConfig(suite=["tiny:fp32:graphs"], device="cpu", compile_backend="aot_eager",
                                variants=["lora", "adalora", "adalora_compact"], warmup=1,
                                rounds=2, steps=3, alloc_layers=[], out=str(tmp_path))
    from torch._dynamo.utils import counters
    counters.clear()
    benchmark.run(cfg)
    assert counters["stats"]["unique_graphs"] == 3          # one graph per variant, each compiled once
    result = json.loads((tmp_path / "tiny_fp32_graphs" / "results.json").read_text())
    assert result["config"]["compile"] and result["config"]["compile_mode"] == "reduce-overhead"
    assert list(result["variants"]) == ["lora", "adalora", "adalora_compact"]


def test_eager_and_compiled_steps_train_alike_with_the_penalty():
    """The eager step adds γ∇R after backward, the compiled one has γR in its graph: the same
    training either way (so the timed variants do the same work), and not the training of γ = 0."""
    import torch
    from dataclasses import replace
    from experiments.bench_variants import build_variant
    base = benchmark.BenchConfig(preset="tiny", device="cpu", compile_backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, base.vocab, (base.batch, base.seq), generator=g),
             "attention_mask": torch.ones(base.batch, base.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (base.batch,), generator=g)}
    trained = {}
    gamma = 5.0                        # large, so 4 steps move P and Q by more than the tolerance
    for name, cfg in (("eager", replace(base, orth_weight=gamma)),
                      ("compiled", replace(base, orth_weight=gamma, compile=True)),
                      ("no_penalty", replace(base, orth_weight=0.0))):
        v = build_variant("adalora", cfg, torch.device("cpu"), batch, {})
        for _ in range(4):
            v.step()
        trained[name] = {n: p.detach().clone() for n, p in v.model.named_parameters() if n.endswith((".P", ".Q"))}
    eager, compiled, none = trained["eager"], trained["compiled"], trained["no_penalty"]
    assert all(torch.allclose(eager[n], compiled[n], rtol=0, atol=1e-6) for n in eager)
    assert not all(torch.allclose(eager[n], none[n], rtol=0, atol=1e-6) for n in eager)


def test_tiny_llama_preset_runs_every_adapter_variant(tmp_path):
    """The decoder preset (causal-LM loss) with our adapters on both paths and peft's."""
    variants = ["floor", "lora_fused", "adalora_fused"] + (["peft_lora"] if _have_peft() else [])
    cfg = benchmark.BenchConfig(preset="tiny_llama", device="cpu", variants=variants, warmup=1, rounds=1, steps=1,
                                alloc_layers=[], out=str(tmp_path))
    benchmark.run(cfg)
    result = _check_outputs(tmp_path, variants, [])
    v = result["variants"]
    assert v["floor"]["trainable_params"] == 64                        # the first layer's input norm scale
    assert v["lora_fused"]["trainable_params"] == 2 * 8 * (
        2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))               # q, o; k, v (1 KV head); gate, up, down


# Triton's CPU interpreter takes 12 s a run here: AdaLoRA's (gated) adapters only.
@pytest.mark.parametrize("name,fused", [(n, f) for n in ("lora", "adalora") for f in ("_fused", "_epilogue")]
                         + [("adalora", "_triton"), ("adalora", "_merge")])
@pytest.mark.long
def test_fused_variant_trains_like_the_unfused_one_on_the_decoder(name, fused):
    import torch
    from experiments.bench_variants import build_variant, make_batch
    cfg = benchmark.BenchConfig(preset="tiny_llama", device="cpu")
    batch = make_batch(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    trained = []
    for variant in (name, name + fused):
        v = build_variant(variant, cfg, torch.device("cpu"), batch, {})
        assert {a.fuse for a in adalora.find_adapters(v.model).values()} == {
            {"": "none", "_fused": "stack", "_epilogue": "epilogue", "_merge": "merge", "_triton": "triton"}[variant[len(name):]]}
        for _ in range(3):
            v.step()
        trained.append({n: p.detach().clone() for n, p in v.model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.allclose(trained[0][n], trained[1][n], rtol=1e-4, atol=1e-6) for n in trained[0])


def _have_peft() -> bool:
    from experiments.bench_variants import have_peft
    return have_peft()


def test_device_summary_sums_per_step_by_hand():
    from experiments.opcount import device_summary
    events = [("gemm", 30.0), ("add", 2.0), ("gemm", 50.0), ("Memcpy DtoD", 5.0), ("add", 2.0), ("gemm", 10.0)]
    s = device_summary(events, steps=2, top=2)
    assert s["kernel_ms"] == pytest.approx(99.0 / 1e3 / 2)       # 99 µs over 2 steps
    assert s["kernels"] == 3.0
    assert s["top_kernels"] == [{"name": "gemm", "ms": pytest.approx(0.045), "count": 1.5},
                                {"name": "Memcpy DtoD", "ms": pytest.approx(0.0025), "count": 0.5}]
    assert device_summary([], steps=3) == {}


def test_host_phases_are_medians_of_the_clock_differences_by_hand_interleaved_by_round():
    """Each variant's phases are medians over its own steps, and the variants take turns, one
    step each a round in the timed rounds' rotated order, so a drifting host moves them alike."""
    import torch
    from experiments.bench_variants import PHASES
    durations = {"a": iter([[1, 2, 3, 4, 5], [3, 2, 1, 0, 9], [2, 2, 2, 2, 2]]),    # ms per phase, 3 steps
                 "b": iter([[7, 7, 7, 7, 7], [5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])}
    order = []

    def step_of(name):
        def step(clock):
            order.append(name)
            for ms in next(durations[name]):
                clock.append(clock[-1] + ms / 1e3)
        return step
    got = benchmark.host_phases({"a": step_of("a"), "b": step_of("b")}, 3, torch.device("cpu"))
    assert order == ["a", "b", "b", "a", "a", "b"]
    assert list(got) == ["a", "b"] and all(list(g) == list(PHASES) for g in got.values())
    assert got["a"] == pytest.approx({"forward": 2, "backward": 2, "penalty": 2, "update": 2, "zero_grad": 5})
    assert got["b"] == pytest.approx({"forward": 7, "backward": 7, "penalty": 7, "update": 7, "zero_grad": 7})


def test_the_eager_steps_clock_marks_each_phase_where_it_ends(monkeypatch):
    """AdaLoRA's step calls orthogonality_grad_ after two marks (forward, backward) and the
    update after three; the clock then holds one mark per phase, in order."""
    import torch
    from experiments import bench_variants
    cfg = benchmark.BenchConfig(preset="tiny", device="cpu")
    batch = bench_variants.make_batch(cfg, torch.device("cpu"), torch.Generator().manual_seed(0))
    v = bench_variants.build_variant("adalora", cfg, torch.device("cpu"), batch, {})
    clock, seen = [0.0], {}
    orth, update = adalora.orthogonality_grad_, bench_variants.update

    def spy(name, fn):
        def call(*args, **kwargs):
            seen[name] = len(clock)
            return fn(*args, **kwargs)
        return call
    monkeypatch.setattr(adalora, "orthogonality_grad_", spy("penalty", orth))
    monkeypatch.setattr(bench_variants, "update", spy("update", update))
    v.step(clock)
    assert seen == {"penalty": 3, "update": 4}
    assert len(clock) == 1 + len(bench_variants.PHASES) and clock[1:] == sorted(clock[1:])


def test_step_graph_config_checks():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        benchmark.BenchConfig(device="cpu", step_graph=True)
    with pytest.raises(ValueError, match="compile_mode=default"):
        benchmark.BenchConfig(device="cuda", step_graph=True, compile=True, compile_mode="reduce-overhead")
    for bad in ("base:bf16:graphs:step", "base:bf16:steps"):
        with pytest.raises(ValueError, match="preset:dtype"):
            benchmark.BenchConfig(device="cuda", suite=[bad])
    assert benchmark.BenchConfig(device="cuda", suite=["base:bf16:compile:step", "large:bf16:step"]).suite


@pytest.mark.parametrize("name,mask_steps", [("lora", 0), ("adalora", 11), ("adalora_every10", 1)])
def test_captured_step_body_trains_as_the_eager_step(name, mask_steps, monkeypatch):
    """What the GPU captures, run uncaptured on the CPU: with the step counter on the device and
    no attention mask in the batch, the same losses and rank masks as the eager step of the other
    modes, bit for bit, over a mask step of the every-10 schedule. As in the loop's captured
    step, the mask step's kernels run on mask steps only: of steps 1 to 11, every step masking
    every step, and only step 10 masking every 10."""
    import torch
    from dataclasses import replace
    from experiments.bench_variants import build_variant, make_batch
    calls, on_device = [], adalora.RankAllocator.mask_on_device
    monkeypatch.setattr(adalora.RankAllocator, "mask_on_device",
                        lambda self, step: calls.append(int(step)) or on_device(self, step))
    cpu = torch.device("cpu")
    eager = benchmark.BenchConfig(preset="tiny", device="cpu")
    graphed = replace(eager, step_graph=True, device="cuda")   # "cuda" only passes the config check
    batch = make_batch(eager, cpu, torch.Generator().manual_seed(0))
    assert "attention_mask" not in make_batch(graphed, cpu, torch.Generator().manual_seed(0))
    runs = {}
    for tag, cfg, b in (("eager", eager, batch), ("graphed", graphed, {k: v for k, v in batch.items()
                                                                         if k != "attention_mask"})):
        v = build_variant(name, cfg, cpu, b, {})
        svd = [a for a in adalora.find_adapters(v.model).values() if isinstance(a, adalora.SVDLinear)]
        runs[tag] = [(float(v.step()), torch.cat([a.rank_mask for a in svd]) if svd else None) for _ in range(11)]
    for (le, me), (lg, mg) in zip(runs["eager"], runs["graphed"]):
        assert le == lg
        assert me is None or torch.equal(me, mg)
    assert len(calls) == mask_steps and (mask_steps != 1 or calls == [10])
    if name != "lora":
        kept = [int(m.sum()) for _, m in runs["eager"]]
        total = runs["eager"][0][1].numel()                 # 12 adapters x r0 = 12
        assert total == 144 and kept[-1] < total and kept == sorted(kept, reverse=True)   # masking happened


@pytest.mark.parametrize("name", ["lora", "adalora_epilogue", "adalora_every10"])
def test_tail_graph_step_trains_as_the_eager_step(name, monkeypatch):
    """``tail_graph``, uncaptured as on the CPU: the eager forward and backward, then the loop's
    tail bodies (γ∇R, fused AdamW with its skip flag, the device-step mask) give the eager step's
    losses and rank masks bit for bit, over a mask step of the every-10 schedule and past a read
    of the graphs' value buffer (shrunk to 4 steps here)."""
    import torch
    from dataclasses import replace
    from experiments import bench_variants, step_graph
    from experiments.bench_variants import build_variant, make_batch
    monkeypatch.setattr(step_graph, "WINDOW", 4)
    reads, read = [], step_graph.StepGraph.read
    monkeypatch.setattr(step_graph.StepGraph, "read", lambda self: reads.append(len(self.unread)) or read(self))
    cpu = torch.device("cpu")
    eager = benchmark.BenchConfig(preset="tiny", device="cpu")
    tail = replace(eager, tail_graph=True, device="cuda")      # "cuda" only passes the config check
    batch = make_batch(eager, cpu, torch.Generator().manual_seed(0))
    assert "attention_mask" in make_batch(tail, cpu, torch.Generator().manual_seed(0))   # eager forward
    runs = {}
    for tag, cfg in (("eager", eager), ("tail", tail)):
        v = build_variant(name, cfg, cpu, batch, {})
        svd = [a for a in adalora.find_adapters(v.model).values() if isinstance(a, adalora.SVDLinear)]
        runs[tag] = [(float(v.step()), torch.cat([a.rank_mask for a in svd]) if svd else None) for _ in range(11)]
    assert reads == [4, 4]
    clock = [0.0]                               # the host phases' marks, in order, one per phase
    v.step(clock)
    assert len(clock) == 1 + len(bench_variants.PHASES) and clock[1:] == sorted(clock[1:])
    for (le, me), (lt, mt) in zip(runs["eager"], runs["tail"]):
        assert le == lt
        assert me is None or torch.equal(me, mt)
    if name != "lora":
        kept = [int(m.sum()) for _, m in runs["eager"]]
        assert kept[-1] < runs["eager"][0][1].numel() == 144 and kept == sorted(kept, reverse=True)   # masking happened


def test_tail_graph_config_checks():
    for bad in (dict(device="cpu"), dict(device="cuda", step_graph=True),
                dict(device="cuda", compile=True, compile_mode="reduce-overhead")):
        with pytest.raises(ValueError, match="tail_graph=true needs a CUDA device, step_graph=false"):
            benchmark.BenchConfig(tail_graph=True, **bad)
    with pytest.raises(ValueError, match="preset:dtype"):
        benchmark.BenchConfig(device="cuda", suite=["base:bf16:step:tail"])
    assert benchmark.BenchConfig(device="cuda", suite=["base:bf16:tail", "base:bf16:compile:tail"]).suite


def test_capture_keeps_the_eager_steps_mask_free_attention(monkeypatch):
    """While a stream captures (simulated here), a step given no attention mask is not counted as
    tracing, so transformers skips the mask as in eager mode; a given mask is judged as before,
    and the original test is back after the block."""
    import torch
    from transformers import masking_utils
    from experiments.bench_variants import no_mask_built_for_capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    original = masking_utils.is_tracing
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert original() is True                   # capture counts as tracing
    with no_mask_built_for_capture():
        assert masking_utils.is_tracing() is False
        assert masking_utils.is_tracing(mask) is True
        assert masking_utils._ignore_bidirectional_mask_sdpa(None, 3)
    assert masking_utils.is_tracing is original


def test_graph_check_compares_two_separate_trainings(monkeypatch):
    """run_graph_check on the CPU (the body uncaptured; no warm-up to skip): its eager losses are
    a plain eager run's, its graph losses come from the device-step path (mask_on_device runs
    once a step) and agree exactly, and only AdaLoRA has masks to compare."""
    import torch
    from dataclasses import replace
    from experiments.bench_variants import build_variant, make_batch
    monkeypatch.setattr(benchmark, "GRAPH_WARMUP", 0)
    calls = []
    original = adalora.RankAllocator.mask_on_device
    monkeypatch.setattr(adalora.RankAllocator, "mask_on_device", lambda self, t: calls.append(1) or original(self, t))
    cpu = torch.device("cpu")
    cfg = benchmark.BenchConfig(preset="tiny", device="cuda", step_graph=True)   # "cuda" only passes the check
    out = benchmark.run_graph_check(cfg, cpu, steps=4)
    assert len(calls) == 4
    batch = make_batch(cfg, cpu, torch.Generator().manual_seed(cfg.seed))
    for name in ("lora", "adalora"):
        v = build_variant(name, replace(cfg, step_graph=False), cpu, batch, {})
        assert out[name]["eager_loss"] == [float(v.step()) for _ in range(4)]
        assert out[name]["graph_loss"] == out[name]["eager_loss"] and len(set(out[name]["eager_loss"])) == 4
        assert out[name]["max_abs_loss_diff"] == out[name]["max_rel_loss_diff"] == 0
    assert out["adalora"]["mask_equal_steps"] == 4 and out["adalora"]["mask_disagreeing_values"] == 0
    assert "mask_equal_steps" not in out["lora"]


def test_llama1b_preset_has_llama_3_2_1b_parameter_count():
    """The decoder preset at hidden 2048 is Llama-3.2-1B's shape: its model card's 1,235,814,400
    parameters (tied embeddings), built on the meta device (no memory, no weights drawn)."""
    import torch
    from experiments.bench_variants import _build_llama
    cfg = benchmark.BenchConfig(preset="llama1b", device="cpu")
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.intermediate, cfg.vocab) == (
        16, 2048, 32, 8, 8192, 128256)
    model = _build_llama(cfg, torch.device("meta"))
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
