"""Speed and memory benchmark: our AdaLoRA and LoRA against the frozen-backbone floor, full
fine-tuning and HF peft, timed side by side in one process with interleaved rounds.

    python -m experiments.benchmark preset=base dtype=bf16 device=cuda
    python -m experiments.benchmark suite=[base:bf16,large:bf16:graphs] device=cuda
    python -m experiments.benchmark preset=small device=cpu
    python -m experiments.benchmark preset=smollm2 dtype=bf16 device=cuda variants=[lora,lora_epilogue,adalora,adalora_epilogue]

Values and their defaults: ``BenchConfig`` below (conf/benchmark.yaml only names the output
folder). A ``suite`` entry is ``preset:dtype[:compile|:graphs|:step|:compile:step]``: ``compile``
is torch.compile of the model forward and loss, orthogonality penalty included; ``graphs`` the
same in mode ``reduce-overhead``, which replays forward and backward as CUDA graphs; ``step``
(``step_graph``) captures the whole optimizer step, AdamW and allocator included, as one CUDA
graph, and checks it against the uncaptured step (``run_graph_check``). Variants on a fused
adapter path (``*_epilogue``, ``*_triton``, ``*_fused``) are also trained beside their unfused
reference (``run_fused_check``). The variants and their step: experiments/bench_variants.py. A round runs every variant for ``steps`` optimizer steps
(synchronised only at the ends, so host syncs inside a step are charged to it); the report
gives median and IQR over rounds. Peak memory is measured per variant while it is built and
warmed up (CUDA: max_memory_allocated above what was allocated before it; CPU: growth of the
resident set, coarse). ``allocator`` rows time ``update_importance + mask_to_budget`` alone on
synthetic gradients, for several depths.
"""
from __future__ import annotations

import gc
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import List, Optional

import torch

import adalora

from .bench_variants import (TARGETS, BANKED, BIG_T, FLAT, FUSE_OF, GRAPH_WARMUP, PHASES, build_model, build_variant, have_peft,
                             make_batch, nbytes, scorer_bytes)
from .config import MethodConfig, library_default
from .bench_report import markdown
from .opcount import count_ops, kernel_time
from .provenance import git_commit, versions
from .runlog import atomic_file, atomic_write_json

PRESETS = {  # layers, hidden, heads, intermediate, seq, batch
    "tiny": (2, 64, 2, 128, 16, 4),
    "small": (4, 384, 6, 1536, 64, 16),
    "base": (12, 768, 12, 3072, 128, 32),
    "large": (24, 1024, 16, 4096, 256, 32),
    # Llama-style decoders (random init, causal-LM loss): SmolLM2-135M's and Llama-3.2-1B's
    # shapes, the two ends of the hidden sizes LoRA and QLoRA are mostly used at, and a CPU one.
    "smollm2": (30, 576, 9, 1536, 256, 16),
    "llama1b": (16, 2048, 32, 8192, 256, 16),
    "tiny_llama": (2, 64, 2, 128, 16, 4),
}
# Decoder presets: (architecture, KV heads, vocabulary); the others are BERT with every head
# its own KV head and BERT's vocabulary.
DECODERS = {"smollm2": ("llama", 3, 49152), "llama1b": ("llama", 8, 128256), "tiny_llama": ("llama", 1, 256)}
ENCODER = ("bert", None, 30522)
# lora and adalora run the unfused adapter path (the reference rows), *_epilogue, *_merge,
# *_triton and *_fused the fused ones (fuse="epilogue", "merge", "triton", "stack").
VARIANTS = ["floor", "full", "lora", "lora_epilogue", "lora_merge", "lora_triton", "lora_fused", "adalora",
            "adalora_epilogue", "adalora_merge", "adalora_triton", "adalora_fused", "adalora_every10", "adalora_compact",
            "adalora_flat", "adalora_epilogue_flat", "lora_banked", "lora_epilogue_banked", "adalora_banked",
            "adalora_epilogue_banked", "lora_final",
            "peft_lora", "peft_adalora"]
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_TARGET_RANK = library_default(adalora.ScheduleConfig, "target_rank")


@dataclass
class BenchConfig:
    preset: str = "base"
    layers: Optional[int] = None          # None: the preset's value (also hidden ... batch)
    hidden: Optional[int] = None
    heads: Optional[int] = None
    intermediate: Optional[int] = None
    seq: Optional[int] = None
    batch: Optional[int] = None
    kv_heads: Optional[int] = None        # decoders: the preset's (grouped-query attention)
    vocab: Optional[int] = None           # None: the preset's (BERT 30522, SmolLM2 49152, Llama 3.2 128256)
    dtype: str = "fp32"                   # fp32 | bf16
    bf16_mode: str = "weights"            # weights: model, adapters, AdamW in bf16 | autocast: fp32 + autocast
    device: str = "auto"                  # auto | cpu | cuda
    compile: bool = False                 # torch.compile model forward + penalty (optimizer, allocator eager)
    compile_mode: str = "default"         # torch.compile mode; reduce-overhead replays CUDA graphs
    # aot_eager: trace only (fast; tests). cudagraphs replays the eager kernels but copies every
    # parameter into its static buffer at each replay, so prefer compile_mode=reduce-overhead.
    compile_backend: str = "inductor"
    # The whole optimizer step (forward, backward, AdamW, importance and mask) captured as one
    # CUDA graph and replayed: no host work per step at all. CUDA only; peft's AdaLoRA cannot be
    # captured (its mask step reads the threshold on the host), so it is left out.
    step_graph: bool = False
    # The loop's trainer.tail_graph: forward and backward eager, the rest of the step (γ∇R, AdamW,
    # importance and mask) replayed as CUDA graphs on copies of the gradients. CUDA only.
    tail_graph: bool = False
    tf32: bool = False
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    warmup: int = 3
    rounds: int = 5
    steps: int = 10
    # The library's defaults: AdaLoRA r0 -> target, against a LoRA at the target rank.
    init_rank: int = library_default(adalora.AdapterConfig, "init_rank")
    target_rank: float = _TARGET_RANK
    lora_rank: int = int(_TARGET_RANK)
    alpha: float = library_default(adalora.AdapterConfig, "alpha")
    orth_weight: float = MethodConfig.orth_weight
    lr: float = 1e-4
    alloc_layers: List[int] = field(default_factory=lambda: [12, 48, 96])  # [] skips the scaling rows
    alloc_hidden: int = 256
    alloc_steps: int = 20
    suite: List[str] = field(default_factory=list)   # ["base:bf16", "large:fp32:compile", ...]
    top_kernels: int = 8                  # CUDA: the longest kernels each variant records, by name
    seed: int = 0
    out: Optional[str] = None             # None: the Hydra run folder

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: use one of {list(PRESETS)}")
        for name, v in zip(("layers", "hidden", "heads", "intermediate", "seq", "batch"), PRESETS[self.preset]):
            if getattr(self, name) is None:
                setattr(self, name, v)
        _, kv_heads, vocab = DECODERS.get(self.preset, ENCODER)
        self.kv_heads = self.kv_heads or kv_heads or self.heads
        self.vocab = self.vocab or vocab
        if self.dtype not in ("fp32", "bf16") or self.bf16_mode not in ("weights", "autocast"):
            raise ValueError("dtype must be fp32|bf16 and bf16_mode weights|autocast")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}: choose from {VARIANTS}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode={self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.top_kernels < 0:
            raise ValueError(f"top_kernels={self.top_kernels}: give 0 or more")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        if self.heads % self.kv_heads or (self.arch == "bert" and self.kv_heads != self.heads):
            raise ValueError(f"kv_heads={self.kv_heads} must divide heads={self.heads} (BERT presets: equal it)")
        if self.step_graph and self.compile and (self.compile_mode == "reduce-overhead"
                                                 or self.compile_backend == "cudagraphs"):
            raise ValueError("step_graph=true captures the whole step itself: use compile_mode=default "
                             "(or compile=false), not a CUDA-graph compile mode inside it")
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is None:
            raise ValueError(f"device={self.device}: use auto, cpu, cuda or cuda:N")
        on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        if self.step_graph and on_cpu:
            raise ValueError("step_graph=true needs a CUDA device: CUDA graphs do not exist on the CPU")
        if self.tail_graph and (on_cpu or self.step_graph or (self.compile and self.compile_mode == "reduce-overhead")):
            raise ValueError("tail_graph=true needs a CUDA device, step_graph=false and no CUDA-graph compile mode "
                             "(use compile_mode=default)")
        for entry in self.suite:
            preset, dtype, *rest = entry.split(":")
            modes = set(rest) & {"graphs", "step", "tail"}
            if (preset not in PRESETS or dtype not in ("fp32", "bf16") or not set(rest) <= {"compile", "graphs", "step", "tail"}
                    or len(modes) > 1):
                raise ValueError(f"suite entry {entry!r}: use preset:dtype[:compile|:graphs|:step|:tail|:compile:step], "
                                 f"e.g. base:bf16:graphs")
        self.variants, self.alloc_layers, self.suite = list(self.variants), list(self.alloc_layers), list(self.suite)

    @property
    def arch(self) -> str:
        """``bert`` (sequence classification) or ``llama`` (causal LM), by preset."""
        return DECODERS.get(self.preset, ENCODER)[0]


# -- device helpers ---------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS is the best available
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _mem_now(dev) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else _rss()


def _mem_reset(dev) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _mem_peak(dev) -> int:
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _rss()


# -- timing -------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median_ms": statistics.median(xs), "q1_ms": q[0], "q3_ms": q[2], "iqr_ms": q[2] - q[0],
            "min_ms": min(xs), "rounds_ms": xs}


def run_models(cfg: BenchConfig, dev: torch.device) -> dict:
    names = [n for n in cfg.variants if (not n.startswith("peft_") or have_peft())
             and not ((cfg.step_graph or cfg.tail_graph) and n == "peft_adalora")]
    if "lora_final" in names and "adalora_compact" not in names:
        names.remove("lora_final")
    names.sort(key=lambda n: n == "lora_final")  # lora_final needs the ranks adalora_compact found
    g = torch.Generator().manual_seed(cfg.seed)
    batch = make_batch(cfg, dev, g)
    variants, out, final_ranks = [], {}, {}
    for n in names:
        _sync(dev)
        _mem_reset(dev)
        before = _mem_now(dev)
        t0 = time.perf_counter()
        v = build_variant(n, cfg, dev, batch, final_ranks)
        _mem_reset(dev)
        for _ in range(cfg.warmup):
            v.step()
        _sync(dev)
        trainable = sum(p.numel() for p in v.model.parameters() if p.requires_grad)
        out[n] = {"peak_mem_mb": (_mem_peak(dev) - before) / 2**20, "trainable_params": trainable,
                  "alloc_state_bytes": v.state_bytes(), "setup_s": time.perf_counter() - t0, **v.info}
        variants.append(v)
        print(f"[bench] built {n}: {out[n]['peak_mem_mb']:.0f} MiB, {trainable} trainable", flush=True)
    times = {v.name: [] for v in variants}
    for r in range(cfg.rounds):
        for v in rotated(variants, r):
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                v.step()
            _sync(dev)
            times[v.name].append((time.perf_counter() - t0) * 1e3 / cfg.steps)
        print(f"[bench] round {r + 1}/{cfg.rounds}: " + ", ".join(f"{n} {t[-1]:.1f}" for n, t in times.items()),
              flush=True)
    for n in times:
        out[n].update(_stats(times[n]))
    if not cfg.compile and not cfg.step_graph:
        for name, phases in host_phases({v.name: v.step for v in variants}, max(cfg.rounds, cfg.steps), dev).items():
            out[name]["host_phases_ms"] = phases
    if dev.type == "cuda":
        # after the timed rounds, so the profiler's own host cost never enters the times above
        for v in variants:
            out[v.name].update(kernel_time(v.step, cfg.steps, cfg.top_kernels))
    return out


def rotated(items: list, r: int) -> list:
    """``items`` in round ``r``'s order: rotated by ``r``, so no variant always goes first."""
    k = r % len(items)
    return items[k:] + items[:k]


def host_phases(step_of: dict, rounds: int, dev: torch.device) -> dict:
    """Per variant (``step_of``: name -> its step function), the median host milliseconds of each phase of an
    eager step (``bench_variants.PHASES``), over ``rounds`` steps that each start on an idle device.
    In an eager step the device waits for the host, so these add up to about the step's time; a
    phase that waits for the device (a host sync) counts the wait too. One step per variant a
    round, in the timed rounds' rotated order: a shared host's speed drifts over minutes, and
    variants timed one after the other would take that drift for a difference between them."""
    names = list(step_of)
    spans = {n: [] for n in names}
    for r in range(rounds):
        for n in rotated(names, r):
            _sync(dev)
            clock = [time.perf_counter()]
            step_of[n](clock)
            spans[n].append([(b - a) * 1e3 for a, b in zip(clock, clock[1:])])
    return {n: {name: statistics.median(s) for name, s in zip(PHASES, zip(*spans[n]))} for n in names}


def ratios(res: dict) -> dict:
    pairs = ["adalora/floor", "adalora_every10/floor", "adalora/lora", "adalora_every10/lora", "peft_adalora/adalora",
             "lora/peft_lora", "adalora_compact/lora_final", "lora/floor", "full/floor"]
    pairs += ["adalora_flat/adalora", "adalora_flat/lora", "adalora_epilogue_flat/adalora_epilogue",
              "adalora_epilogue_flat/lora_epilogue", "adalora_epilogue_flat/floor"]
    pairs += ["adalora_banked/adalora", "adalora_banked/lora", "adalora_epilogue_banked/adalora_epilogue",
              "adalora_epilogue_banked/adalora_epilogue_flat", "adalora_epilogue_banked/lora_epilogue",
              "adalora_epilogue_banked/floor", "lora_banked/lora", "lora_epilogue_banked/lora_epilogue",
              "adalora_banked/lora_banked", "adalora_epilogue_banked/lora_epilogue_banked"]
    for suffix in FUSE_OF:   # each fused path against its reference, the floor, and LoRA on the same path
        pairs += [f"lora_{suffix}/lora", f"adalora_{suffix}/adalora", f"lora_{suffix}/floor",
                  f"adalora_{suffix}/floor", f"adalora_{suffix}/lora_{suffix}", f"lora_{suffix}/peft_lora"]
    ratio = {}
    for k in pairs:
        a, b = k.split("/")
        if a in res and b in res:
            ratio[k] = res[a]["median_ms"] / res[b]["median_ms"]
    return ratio


# -- the captured step against the eager one ----------------------------------------------------------------
def _train(name: str, cfg: BenchConfig, dev, batch, graphed: bool, steps: int):
    """Losses per step and, for AdaLoRA, the rank masks after each step, of variant ``name``
    trained ``steps`` steps captured (``graphed``) or not. An uncaptured run first runs the
    ``GRAPH_WARMUP`` steps that a captured one runs uncaptured before its capture."""
    mode = cfg if graphed else replace(cfg, step_graph=False, tail_graph=False)
    v = build_variant(name, replace(mode, variants=[name]), dev, batch, {})
    layers = [a for a in adalora.find_adapters(v.model).values() if isinstance(a, adalora.SVDLinear)]
    # (the tail graphs' warm-up steps are steps of the run: nothing to skip)
    for _ in range(GRAPH_WARMUP if cfg.step_graph and not graphed else 0):
        v.step()
    losses, masks = [], []
    for _ in range(steps):
        losses.append(float(v.step()))
        masks.append(torch.cat([a.rank_mask for a in layers]).cpu() if layers else None)
    return losses, masks


def _agreement(a, b, keys=("eager_loss", "graph_loss")) -> dict:
    (la, ma), (lb, mb) = a, b
    diff = [abs(x - y) for x, y in zip(la, lb)]
    out = {"steps": len(la), keys[0]: la, keys[1]: lb, "max_abs_loss_diff": max(diff),
           "max_rel_loss_diff": max(d / abs(x) for d, x in zip(diff, la))}
    if ma[0] is not None:
        out["mask_equal_steps"] = sum(bool(torch.equal(x, y)) for x, y in zip(ma, mb))
        out["mask_disagreeing_values"] = max(int((x != y).sum()) for x, y in zip(ma, mb))
    return out


def _say(what: str, res: dict) -> None:
    print(f"[bench] {what}: max |loss diff| {res['max_abs_loss_diff']:.3g}"
          + (f", masks equal {res['mask_equal_steps']}/{res['steps']}" if "mask_equal_steps" in res else ""), flush=True)


def run_graph_check(cfg: BenchConfig, dev: torch.device, steps: int = 20) -> dict:
    """``lora`` and ``adalora`` trained ``steps`` steps as one replayed CUDA graph and as the
    same step uncaptured (``loop.update`` with ``mask_to_budget``), from the same weights and
    batch: both losses per step and, for AdaLoRA, whether the rank masks agree after each step.
    The graph's first call also runs ``GRAPH_WARMUP`` uncaptured warm-up steps, which the other
    run runs first and leaves out."""
    batch = make_batch(cfg, dev, torch.Generator().manual_seed(cfg.seed))
    out = {}
    for name in ("lora", "adalora"):
        out[name] = _agreement(_train(name, cfg, dev, batch, False, steps), _train(name, cfg, dev, batch, True, steps))
        _say(f"graph check {name}", out[name])
    return out


def run_fused_check(cfg: BenchConfig, dev: torch.device, steps: int = 20) -> dict:
    """Each fused variant of ``cfg.variants`` (``*_epilogue``, ``*_triton``, ``*_fused``) against its unfused
    reference (``lora`` or ``adalora``), and each ``*_flat`` and ``*_banked`` against the variant with
    parameters per adapter,
    trained ``steps`` steps from the same weights and batch, both captured under ``step_graph``
    and both eager otherwise: losses and rank masks."""
    batch = make_batch(cfg, dev, torch.Generator().manual_seed(cfg.seed))
    out = {}
    for name in cfg.variants:
        ref, _, suffix = name.rpartition("_")
        if suffix not in FUSE_OF and "_" + suffix not in (FLAT, BANKED):
            continue
        graphed = cfg.step_graph or cfg.tail_graph
        out[name] = _agreement(_train(ref, cfg, dev, batch, graphed, steps),
                               _train(name, cfg, dev, batch, graphed, steps), ("unfused_loss", "fused_loss"))
        _say(f"fused check {name} against {ref}", out[name])
    return out


# -- allocator-only scaling ------------------------------------------------------------------------------
def _time_alloc(fn, n: int, dev) -> float:
    fn(1)
    _sync(dev)
    t0 = time.perf_counter()
    for t in range(2, n + 2):
        fn(t)
    _sync(dev)
    return (time.perf_counter() - t0) * 1e3 / n


def run_allocator_scaling(cfg: BenchConfig, dev: torch.device) -> list[dict]:
    rows = []
    for layers in cfg.alloc_layers:
        small = replace(cfg, preset="tiny", kv_heads=None, layers=layers, hidden=cfg.alloc_hidden, heads=max(1, cfg.alloc_hidden // 64),
                        intermediate=4 * cfg.alloc_hidden, vocab=128, seq=8, batch=2)
        row = {"layers": layers, "hidden": cfg.alloc_hidden, "adapters": 6 * layers}
        for every in (1, 10):
            model = build_model(small, dev)
            adapters = adalora.inject(model, adalora.AdapterConfig(method="adalora", targets=TARGETS,
                                                                   init_rank=cfg.init_rank))
            params = adalora.adapter_parameters(adapters)
            for p in params:
                p.grad = torch.randn_like(p)
            alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
                target_rank=cfg.target_rank, total_steps=BIG_T, init_warmup=0, final_warmup=1000, mask_interval=every))

            def ours(t):
                alloc.update_importance(t, grads_finite=True)   # as in the timed steps above
                alloc.mask_to_budget(t)
            key = "ours_mask_every_step" if every == 1 else "ours_mask_every_10"
            row[key + "_ms"] = _time_alloc(ours, cfg.alloc_steps, dev)
            row[key + "_ops"] = count_ops(lambda: ours(every * 1000))   # a mask step
            if every == 10:
                row["ours_nonmask_step_ops"] = count_ops(lambda: ours(10 * 1000 + 1))
            row["ours_state_bytes"] = scorer_bytes(alloc)
            row["adapter_param_bytes"] = nbytes(params)
            del model, adapters, alloc, params
        if have_peft():
            import peft
            model = peft.get_peft_model(build_model(small, dev), peft.AdaLoraConfig(
                init_r=cfg.init_rank, target_r=int(cfg.target_rank), target_modules=TARGETS, tinit=0, tfinal=1000,
                deltaT=1, total_step=BIG_T), autocast_adapter_dtype=False)
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.grad = torch.randn_like(p)
            row["peft_mask_every_step_ms"] = _time_alloc(model.base_model.update_and_allocate, cfg.alloc_steps, dev)
            row["peft_mask_every_step_ops"] = count_ops(lambda: model.base_model.update_and_allocate(1000))
            ra = model.base_model.rankallocator
            row["peft_state_bytes"] = nbytes([*ra.ipt.values(), *ra.exp_avg_ipt.values(), *ra.exp_avg_unc.values()])
            del model, ra
        rows.append(row)
        print(f"[bench] allocator {layers} layers: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                  if k.endswith("_ms")), flush=True)
    return rows


# -- run -----------------------------------------------------------------------------------------------
def _env(dev) -> dict:
    env = {**versions(), "device": str(dev), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def run(cfg: BenchConfig) -> dict:
    """Run one configuration (or every entry of ``cfg.suite``), write ``results.json`` and ``results.md``."""
    out = cfg.out or os.path.join("outputs", "benchmark", time.strftime("%Y-%m-%d_%H-%M-%S"))
    os.makedirs(out, exist_ok=True)
    if cfg.suite:
        results, md = {}, []
        for i, entry in enumerate(cfg.suite):
            preset, dtype, *rest = entry.split(":")
            sub = replace(cfg, suite=[], preset=preset, dtype=dtype,
                          compile="compile" in rest or "graphs" in rest,
                          compile_mode="reduce-overhead" if "graphs" in rest else cfg.compile_mode,
                          step_graph="step" in rest, tail_graph="tail" in rest,
                          layers=None, hidden=None, heads=None, intermediate=None, seq=None, batch=None,
                          kv_heads=None, vocab=None,
                          alloc_layers=cfg.alloc_layers if i == 0 else [], out=os.path.join(out, entry.replace(":", "_")))
            results[entry] = run(sub)
            md.append(open(os.path.join(sub.out, "results.md")).read())
        with atomic_file(Path(out) / "results.md") as tmp, open(tmp, "w") as f:
            f.write("\n".join(md))
        return results
    dev = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    result = {"run": {"commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                      "command": "python -m experiments.benchmark " + " ".join(sys.argv[1:])},
              "config": asdict(cfg), "env": _env(dev)}
    result["variants"] = run_models(cfg, dev)
    if cfg.step_graph or cfg.tail_graph:
        result["graph_check"] = run_graph_check(cfg, dev)
    if any(n.rpartition("_")[2] in FUSE_OF or n.endswith((FLAT, BANKED)) for n in cfg.variants):
        result["fused_check"] = run_fused_check(cfg, dev)
    result["ratios"] = ratios(result["variants"])
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result["allocator"] = run_allocator_scaling(cfg, dev)
    atomic_write_json(Path(out) / "results.json", result)
    text = markdown(result)
    with atomic_file(Path(out) / "results.md") as tmp, open(tmp, "w") as f:
        f.write(text)
    print(text, flush=True)
    return result


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--resolve", "--info", "--multirun", "-m",
               "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p")


def main() -> None:
    flags = [a for a in sys.argv[1:] if a.startswith("-") and a.split("=")[0] not in HYDRA_FLAGS]
    if flags:
        key = flags[0].lstrip("-").split("=")[0].replace("-", "_")
        _fail(f"{flags[0]}: the benchmark takes Hydra overrides, e.g. {key}=<value> "
              "(python -m experiments.benchmark --help lists them)")
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="benchmark_schema", node=BenchConfig)
    from .overrides import field_error, first_error
    if (msg := first_error("benchmark", sys.argv[1:], lambda a: field_error(a, BenchConfig, "the benchmark"))):
        _fail(msg)

    @hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
    def entry(dcfg) -> None:
        try:
            cfg = OmegaConf.to_object(dcfg)
        except Exception as e:              # a dataclass check or an OmegaConf type error
            _fail(str(e).splitlines()[0])
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():   # else a traceback at the first .to
            _fail(f"device={cfg.device}: this torch ({torch.__version__}) sees no CUDA device; use device=cpu or auto")
        if cfg.out is None:
            cfg.out = HydraConfig.get().runtime.output_dir
        run(cfg)
    entry()


if __name__ == "__main__":
    main()
