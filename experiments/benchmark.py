"""Speed and memory benchmark (issue 5): our AdaLoRA and LoRA against the frozen-backbone floor,
full fine-tuning and HF peft, timed side by side in one process with interleaved rounds.

    python -m experiments.benchmark preset=base dtype=bf16 device=cuda        # Hydra, conf/benchmark.yaml
    python -m experiments.benchmark --preset base --dtype bf16 --out DIR      # plain flags (no Hydra needed)
    python -m experiments.benchmark --suite base:bf16,base:fp32,large:bf16:compile,base:bf16:graphs --out DIR

(``compile``: torch.compile of the model forward and loss, orthogonality penalty included;
``graphs``: the same in mode ``reduce-overhead``, which replays the forward and backward as CUDA
graphs. Eager variants add the penalty's gradient after backward with ``orthogonality_grad_``, as
the experiments loop does.)

Every variant is a random-init BERT-shaped ``BertForSequenceClassification`` (2 labels) trained
with AdamW on one fixed random batch; adapters sit on query/key/value/attention-output/ffn-in/ffn-out
of every layer. A round runs every variant for ``steps`` optimizer steps (synchronised only at the
ends, so host syncs inside a step are charged to it); the report gives median and IQR over rounds.
Peak memory is measured per variant while it is built and warmed up (CUDA: max_memory_allocated
above what was allocated before it; CPU: growth of the resident set, coarse). ``allocator`` rows
time ``update_importance + mask_to_budget`` alone on synthetic gradients, for several depths.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Callable, List, Optional

import torch

import adalora

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
PRESETS = {  # layers, hidden, heads, intermediate, seq, batch
    "tiny": (2, 64, 2, 128, 16, 4),
    "small": (4, 384, 6, 1536, 64, 16),
    "base": (12, 768, 12, 3072, 128, 32),
    "large": (24, 1024, 16, 4096, 256, 32),
}
VARIANTS = ["floor", "full", "lora", "adalora", "adalora_every10", "adalora_compact", "lora_final",
            "peft_lora", "peft_adalora"]
BIG_T = 100_000  # schedule length that keeps the timed AdaLoRA steps inside the budgeting phase


@dataclass
class BenchConfig:
    preset: str = "base"
    layers: Optional[int] = None          # None: the preset's value (also hidden ... batch)
    hidden: Optional[int] = None
    heads: Optional[int] = None
    intermediate: Optional[int] = None
    seq: Optional[int] = None
    batch: Optional[int] = None
    vocab: int = 30522
    dtype: str = "fp32"                   # fp32 | bf16
    bf16_mode: str = "weights"            # weights: model, adapters, AdamW in bf16 | autocast: fp32 + autocast
    device: str = "auto"                  # auto | cpu | cuda
    compile: bool = False                 # torch.compile model forward + penalty (optimizer, allocator eager)
    compile_mode: str = "default"         # torch.compile mode; reduce-overhead replays CUDA graphs
    # aot_eager: trace only (fast; tests). cudagraphs replays the eager kernels but copies every
    # parameter into its static buffer at each replay (measured: host-bound), so prefer graphs.
    compile_backend: str = "inductor"
    tf32: bool = False
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    warmup: int = 3
    rounds: int = 5
    steps: int = 10
    init_rank: int = 12
    target_rank: float = 8.0
    lora_rank: int = 8
    alpha: float = 16.0
    orth_weight: float = 0.1
    lr: float = 1e-4
    alloc_layers: List[int] = field(default_factory=lambda: [12, 48, 96])  # [] skips the scaling rows
    alloc_hidden: int = 256
    alloc_steps: int = 20
    suite: List[str] = field(default_factory=list)   # ["base:bf16", "large:fp32:compile", ...]
    seed: int = 0
    out: Optional[str] = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}: use one of {list(PRESETS)}")
        for name, v in zip(("layers", "hidden", "heads", "intermediate", "seq", "batch"), PRESETS[self.preset]):
            if getattr(self, name) is None:
                setattr(self, name, v)
        if self.dtype not in ("fp32", "bf16") or self.bf16_mode not in ("weights", "autocast"):
            raise ValueError("dtype must be fp32|bf16 and bf16_mode weights|autocast")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}: choose from {VARIANTS}")
        if self.compile_mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"compile_mode={self.compile_mode!r}: use default, reduce-overhead or max-autotune")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} must be divisible by heads={self.heads}")
        self.variants, self.alloc_layers, self.suite = list(self.variants), list(self.alloc_layers), list(self.suite)


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


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _scorer_bytes(alloc) -> int:
    """Bytes of Ī and Ū (the scorer's two flat buffers)."""
    return _nbytes([alloc.scorer.ibar, alloc.scorer.ubar])


# -- variants ----------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    step: Callable[[], None]               # one optimizer step, allocator calls included
    state_bytes: Callable[[], int] = lambda: 0   # allocator state (ours: Ī+Ū; peft: ipt+exp_avg_ipt+exp_avg_unc)
    info: dict = field(default_factory=dict)


def build_model(cfg: BenchConfig, dev: torch.device):
    from transformers import BertConfig, BertForSequenceClassification
    bc = BertConfig(vocab_size=cfg.vocab, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                    max_position_embeddings=max(512, cfg.seq), num_labels=2)
    # Set up front: HF fills it in on the first forward, which a compiled model would see as a
    # change of config and recompile for.
    bc.problem_type = "single_label_classification"
    torch.manual_seed(cfg.seed)  # every variant starts from the same weights
    with dev:
        model = BertForSequenceClassification(bc)
    if cfg.dtype == "bf16" and cfg.bf16_mode == "weights":
        model = model.to(torch.bfloat16)
    return model.train()


def _make_step(cfg, dev, model, batch, opt, adapters=None, alloc=None, peft_alloc=None, counter=None):
    amp = cfg.dtype == "bf16" and cfg.bf16_mode == "autocast"
    counter = counter if counter is not None else [1]
    # Each mode gets the penalty's cheaper path, both the same gradient (tests/test_benchmark.py).
    # Eager: orthogonality_grad_ after backward, a few batched kernels instead of a second autograd
    # path that autograd joins with one add per P and Q. Compiled: in the graph, where the compiler
    # fuses that join and, under CUDA graphs, the host launches nothing for it.
    orth = adapters is not None and cfg.orth_weight > 0

    def loss_fn():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(**batch).loss
            if orth and cfg.compile:
                loss = loss + cfg.orth_weight * adalora.orthogonality_penalty(adapters)
        return loss
    fn = loss_fn
    if cfg.compile:
        # Dynamo caches compiled code per code object, and every variant's closure shares loss_fn's:
        # each call would first test the other variants' guards (hundreds of tensors each), a CPU
        # cost a one-model training script never pays. A copy of the code object per variant
        # gives each its own cache.
        fn = types.FunctionType(loss_fn.__code__.replace(), loss_fn.__globals__, loss_fn.__name__,
                                loss_fn.__defaults__, loss_fn.__closure__)
        fn = torch.compile(fn, backend=cfg.compile_backend,
                           mode=None if cfg.compile_backend != "inductor" else cfg.compile_mode)
    graphs = cfg.compile and (cfg.compile_mode == "reduce-overhead" or cfg.compile_backend == "cudagraphs")

    def step():
        t = counter[0]
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        fn().backward()
        if orth and not cfg.compile:
            adalora.orthogonality_grad_(adapters, cfg.orth_weight)
        opt.step()
        if alloc is not None:
            # peft checks nothing; a real loop passes the verdict it has (the experiments loop: the
            # clipping norm's), so the benchmark charges no finite-check sync to either.
            alloc.update_importance(t, grads_finite=True)
            alloc.mask_to_budget(t)
        if peft_alloc is not None:
            peft_alloc(t)
        opt.zero_grad(set_to_none=True)
        counter[0] = t + 1
    return step


def _opt(cfg, model):
    # The fastest stock AdamW per device, the same for every variant: one fused kernel on CUDA,
    # multi-tensor (foreach) on the CPU, whose default is a Python loop over parameters.
    params = [p for p in model.parameters() if p.requires_grad]
    dev = params[0].device.type
    return torch.optim.AdamW(params, lr=cfg.lr, fused=dev == "cuda", foreach=dev != "cuda")


def build_variant(name: str, cfg: BenchConfig, dev, batch, final_ranks: dict) -> Variant:
    model = build_model(cfg, dev)
    if name in ("floor", "full"):
        for p in model.parameters():
            p.requires_grad_(name == "full")
        if name == "floor":
            # Input grads flow through every layer, but no weight of the backbone gets a gradient
            # (the embedding LayerNorm scale, hidden-size elements, is the entry point).
            model.bert.embeddings.LayerNorm.weight.requires_grad_(True)
            model.classifier.requires_grad_(True)
        opt = _opt(cfg, model)
        return Variant(name, model, _make_step(cfg, dev, model, batch, opt))
    if name.startswith("peft_"):
        return _build_peft(name, cfg, dev, model, batch)
    svd = name.startswith("adalora")
    acfg = adalora.AdapterConfig(method="adalora" if svd else "lora", targets=TARGETS,
                                 init_rank=cfg.init_rank if svd else cfg.lora_rank, alpha=cfg.alpha,
                                 rank_pattern=final_ranks if name == "lora_final" else {})
    adapters = adalora.inject(model, acfg)
    adalora.mark_only_adapters_trainable(model, extra=("classifier",))
    opt = _opt(cfg, model)
    if not svd:
        return Variant(name, model, _make_step(cfg, dev, model, batch, opt))
    compact = name == "adalora_compact"
    sched = adalora.ScheduleConfig(target_rank=cfg.target_rank, total_steps=BIG_T, init_warmup=0,
                                   final_warmup=BIG_T - 3 if compact else 1000,
                                   mask_interval=10 if name == "adalora_every10" else 1)
    alloc = adalora.RankAllocator(adapters, sched)
    counter = [1]
    v = Variant(name, model, None, lambda: _scorer_bytes(alloc))
    if compact:
        # Train through the final allocation (step 3) eagerly, shrink, and only then build the timed step.
        eager = replace(cfg, compile=False)
        step = _make_step(eager, dev, model, batch, opt, adapters, alloc, counter=counter)
        while not alloc.final_done:
            step()
        alloc.compact(opt)
        v.info["final_ranks"] = alloc.ranks()
        final_ranks.update(v.info["final_ranks"])
    v.step = _make_step(cfg, dev, model, batch, opt, adapters, alloc, counter=counter)
    return v


def _build_peft(name, cfg, dev, model, batch) -> Variant:
    import peft
    if name == "peft_lora":
        pcfg = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.alpha, target_modules=TARGETS, task_type="SEQ_CLS")
    else:
        pcfg = peft.AdaLoraConfig(init_r=cfg.init_rank, target_r=int(cfg.target_rank), lora_alpha=cfg.alpha,
                                  target_modules=TARGETS, task_type="SEQ_CLS", tinit=0, tfinal=1000, deltaT=1,
                                  total_step=BIG_T, orth_reg_weight=cfg.orth_weight)
    # Keep peft's adapters in the model dtype (ours are), not upcast to fp32.
    model = peft.get_peft_model(model, pcfg, autocast_adapter_dtype=False)
    opt = _opt(cfg, model)
    if name == "peft_lora":
        return Variant(name, model, _make_step(cfg, dev, model, batch, opt))
    ra = model.base_model.rankallocator
    step = _make_step(cfg, dev, model, batch, opt, peft_alloc=model.base_model.update_and_allocate)
    return Variant(name, model, step,
                   lambda: _nbytes([*ra.ipt.values(), *ra.exp_avg_ipt.values(), *ra.exp_avg_unc.values()]))


def _have_peft() -> bool:
    try:
        import peft  # noqa: F401
        return True
    except ImportError:
        return False


# -- timing -------------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median_ms": statistics.median(xs), "q1_ms": q[0], "q3_ms": q[2], "iqr_ms": q[2] - q[0],
            "min_ms": min(xs), "rounds_ms": xs}


def run_models(cfg: BenchConfig, dev: torch.device) -> dict:
    names = [n for n in cfg.variants if not n.startswith("peft_") or _have_peft()]
    if "lora_final" in names and "adalora_compact" not in names:
        names.remove("lora_final")
    names.sort(key=lambda n: n == "lora_final")  # lora_final needs the ranks adalora_compact found
    g = torch.Generator().manual_seed(cfg.seed)
    batch = {"input_ids": torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(dev),
             "attention_mask": torch.ones(cfg.batch, cfg.seq, dtype=torch.long, device=dev),
             "labels": torch.randint(0, 2, (cfg.batch,), generator=g).to(dev)}
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
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:       # rotate the order so no variant always goes first
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
    return out


def ratios(res: dict) -> dict:
    pairs = {"adalora/floor": ("adalora", "floor"), "adalora_every10/floor": ("adalora_every10", "floor"),
             "adalora/lora": ("adalora", "lora"), "adalora_every10/lora": ("adalora_every10", "lora"),
             "peft_adalora/adalora": ("peft_adalora", "adalora"), "lora/peft_lora": ("lora", "peft_lora"),
             "adalora_compact/lora_final": ("adalora_compact", "lora_final"),
             "lora/floor": ("lora", "floor"), "full/floor": ("full", "floor")}
    return {k: res[a]["median_ms"] / res[b]["median_ms"] for k, (a, b) in pairs.items() if a in res and b in res}


# -- allocator-only scaling ------------------------------------------------------------------------------
def count_ops(fn) -> dict:
    """Non-view aten ops dispatched by ``fn()`` (≈ kernels) and how many force a device->host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view          # views move no data: count ops that do
            self.syncs += func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "item")
            return func(*args, **(kwargs or {}))
    # tolist() and numpy() read memory without dispatching an op: count those reads separately.
    readers = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name):
        def read(self, *args, **kwargs):
            c.syncs += 1
            return readers[name](self, *args, **kwargs)
        return read
    try:
        for name in readers:
            setattr(torch.Tensor, name, counted(name))
        with Count() as c:
            fn()
    finally:
        for name, method in readers.items():
            setattr(torch.Tensor, name, method)
    return {"ops": c.ops, "host_syncs": c.syncs}


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
        small = replace(cfg, preset="tiny", layers=layers, hidden=cfg.alloc_hidden, heads=max(1, cfg.alloc_hidden // 64),
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
            row["ours_state_bytes"] = _scorer_bytes(alloc)
            row["adapter_param_bytes"] = _nbytes(params)
            del model, adapters, alloc, params
        if _have_peft():
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
            row["peft_state_bytes"] = _nbytes([*ra.ipt.values(), *ra.exp_avg_ipt.values(), *ra.exp_avg_unc.values()])
            del model, ra
        rows.append(row)
        print(f"[bench] allocator {layers} layers: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                                  if k.endswith("_ms")), flush=True)
    return rows


# -- report -----------------------------------------------------------------------------------------------
def _env(dev) -> dict:
    import platform
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "adalora": adalora.__version__}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    for mod in ("transformers", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    return env


def _mode(c: dict) -> str:
    if not c["compile"]:
        return ", eager"
    backend = c.get("compile_backend", "inductor")
    return f", torch.compile {c.get('compile_mode', 'default') if backend == 'inductor' else 'backend ' + backend}"


def markdown(result: dict) -> str:
    c, env = result["config"], result["env"]
    lines = [f"## {c['layers']} x {c['hidden']}, seq {c['seq']}, batch {c['batch']}, {c['dtype']}"
             f"{' (' + c['bf16_mode'] + ')' if c['dtype'] == 'bf16' else ''}"
             f"{_mode(c)} on {env.get('gpu') or 'CPU'} "
             f"({env['threads']} threads; torch {env['torch']}, peft {env['peft']})", "",
             f"{c['rounds']} interleaved rounds x {c['steps']} steps after {c['warmup']} warm-up steps. "
             f"Peak memory: {'CUDA max allocated' if 'gpu' in env else 'RSS growth (coarse)'} per variant.", "",
             "| variant | median ms/step | IQR ms | min ms | vs floor | peak MiB | trainable params | allocator state MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    res = result["variants"]
    floor = res.get("floor", {}).get("median_ms")
    for n, r in res.items():
        rel = f"{r['median_ms'] / floor:.2f}x" if floor else "-"
        lines.append(f"| {n} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | {r['min_ms']:.1f} | {rel} | {r['peak_mem_mb']:.0f} | "
                     f"{r['trainable_params']:,} | {r['alloc_state_bytes'] / 2**20:.2f} |")
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    rows = result.get("allocator", [])
    if rows:
        lines += ["", f"Allocator only (update_importance + mask_to_budget, synthetic grads, hidden {rows[0]['hidden']}):",
                  "", "| layers | adapters | ours ms (mask every step) | ours ms (every 10) | peft ms (every step) | "
                  "ours ops mask/non-mask step | peft ops | ours syncs mask/non-mask | ours state MiB | peft state MiB |",
                  "|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for r in rows:
            p = r.get("peft_mask_every_step_ops", {})
            lines.append(
                f"| {r['layers']} | {r['adapters']} | {r['ours_mask_every_step_ms']:.2f} | {r['ours_mask_every_10_ms']:.2f} | "
                f"{r.get('peft_mask_every_step_ms', float('nan')):.2f} | {r['ours_mask_every_step_ops']['ops']}/"
                f"{r['ours_nonmask_step_ops']['ops']} | {p.get('ops', '-')} | {r['ours_mask_every_step_ops']['host_syncs']}/"
                f"{r['ours_nonmask_step_ops']['host_syncs']} | {r['ours_state_bytes'] / 2**20:.2f} | "
                f"{r.get('peft_state_bytes', math.nan) / 2**20:.2f} |")
    return "\n".join(lines) + "\n"


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
                          layers=None, hidden=None, heads=None, intermediate=None, seq=None, batch=None,
                          alloc_layers=cfg.alloc_layers if i == 0 else [], out=os.path.join(out, entry.replace(":", "_")))
            results[entry] = run(sub)
            md.append(open(os.path.join(sub.out, "results.md")).read())
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write("\n".join(md))
        return results
    dev = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    result = {"config": asdict(cfg), "env": _env(dev)}
    result["variants"] = run_models(cfg, dev)
    result["ratios"] = ratios(result["variants"])
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    result["allocator"] = run_allocator_scaling(cfg, dev)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = markdown(result)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print(text, flush=True)
    return result


# -- entry points ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> BenchConfig:
    """``--key value``, ``--key=value``, ``--flag`` and ``key=value``; lists are comma-separated."""
    types = {f.name: f.type for f in fields(BenchConfig)}
    kv, i = {}, 0
    while i < len(argv):
        a = argv[i].lstrip("-")
        if "=" in a:
            k, v = a.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and "bool" not in types.get(a.replace("-", "_"), ""):
            k, v = a, argv[i + 1]
            i += 1
        else:
            k, v = a, "true"
        k = k.replace("-", "_")
        if k not in types:
            raise SystemExit(f"unknown option {argv[i]!r}; options: {', '.join(types)}")
        t = types[k]
        if "List" in t:
            v = [x for x in v.strip("[]").split(",") if x]
            v = [int(x) for x in v] if "int" in t else v
        elif "bool" in t:
            v = v.lower() in ("1", "true", "yes")
        elif "int" in t:
            v = None if v.lower() in ("none", "null") else int(v)
        elif "float" in t:
            v = float(v)
        elif v.lower() in ("none", "null") and "Optional" in t:
            v = None
        kv[k] = v
        i += 1
    return BenchConfig(**kv)


def _hydra_main() -> None:
    import hydra
    from hydra.core.config_store import ConfigStore
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="benchmark_schema", node=BenchConfig)

    @hydra.main(config_path="../conf", config_name="benchmark", version_base="1.3")
    def main(dcfg) -> None:
        cfg = OmegaConf.to_object(dcfg)
        if cfg.out is None:
            cfg.out = HydraConfig.get().runtime.output_dir
        run(cfg)
    main()


def main() -> None:
    argv = sys.argv[1:]
    try:
        import hydra  # noqa: F401
        use_hydra = not any(a.startswith("--") for a in argv)
    except ImportError:
        use_hydra = False
    if use_hydra:
        _hydra_main()
    else:
        run(parse_args(argv))


if __name__ == "__main__":
    main()
