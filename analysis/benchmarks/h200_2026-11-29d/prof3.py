"""Per step: wall, GPU kernel time and a kernel breakdown, per variant, eager or graphs (inductor
reduce-overhead). A variant is NAME or NAME@RANK (init_rank for adalora*, lora_rank for lora)."""
import sys, time, re, torch, collections
from dataclasses import replace
from torch.autograd import DeviceType
from torch.profiler import profile, ProfilerActivity
from experiments import benchmark as B
mode = sys.argv[1]
import os
DEV = os.environ.get("DEV", "cuda")
base = B.BenchConfig(preset=sys.argv[2], dtype=os.environ.get("DT", "bf16"), device=DEV, alloc_layers=[])
if mode == "graphs":
    base = replace(base, compile=True, compile_mode="reduce-overhead")
dev = torch.device(DEV)
g = torch.Generator().manual_seed(0)
batch = {"input_ids": torch.randint(0, base.vocab, (base.batch, base.seq), generator=g).to(dev),
         "attention_mask": torch.ones(base.batch, base.seq, dtype=torch.long, device=dev),
         "labels": torch.randint(0, 2, (base.batch,), generator=g).to(dev)}
fr = {}
def fam(k):
    if k.startswith("nvjet"): return "gemm nvjet (sm90)"
    if "cutlass" in k or "gemm" in k.lower(): return "gemm cutlass/other"
    if k.startswith("triton"): return "triton (inductor)"
    if "Memcpy" in k or "Memset" in k: return "memcpy/memset"
    if "sdpa" in k or "flash" in k or "fmha" in k: return "attention"
    if "multi_tensor" in k or "foreach" in k.lower() or "fused_adam" in k.lower() or "FusedAdam" in k: return "optimizer/foreach"
    return "other aten"
for spec in sys.argv[3:]:
    name, _, r = spec.partition("@")
    cfg = base
    if r:
        cfg = replace(cfg, init_rank=int(r)) if name.startswith("adalora") else replace(cfg, lora_rank=int(r))
    t0 = time.perf_counter()
    v = B.build_variant(name, cfg, dev, batch, fr)
    for _ in range(6): v.step()
    B._sync(dev)
    setup = time.perf_counter() - t0
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(10): v.step()
        B._sync(dev)
        walls.append((time.perf_counter() - t) / 10 * 1e3)
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5): v.step()
        B._sync(dev)
    ka = prof.key_averages()
    cuda = [e for e in ka if e.device_type == DeviceType.CUDA]
    gpu = sum(e.self_device_time_total for e in cuda) / 5 / 1e3
    nk = sum(e.count for e in cuda) / 5
    print(f"=== {mode} {spec}: setup {setup:.0f} s, wall {min(walls):.2f} ms/step (best of 3x10), "
          f"GPU kernels {gpu:.2f} ms/step, {nk:.0f} kernels/step", flush=True)
    fams = collections.defaultdict(lambda: [0.0, 0])
    for e in cuda:
        f = fams[fam(e.key)]; f[0] += e.self_device_time_total / 5 / 1e3; f[1] += e.count / 5
    for k, (t, c) in sorted(fams.items(), key=lambda kv: -kv[1][0]):
        print(f"   fam {k:28s} {t:7.2f} ms/step {c:6.0f} kernels/step")
    for e in sorted(cuda, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"   gpu {e.key[:90]:90s} {e.self_device_time_total / 5 / 1e3:7.3f} ms {e.count / 5:5.0f}x")
    for e in sorted((e for e in ka if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)[:10]:
        print(f"   cpu {e.key[:70]:70s} {e.self_cpu_time_total / 5 / 1e3:7.2f} ms/step {e.count / 5:6.0f} calls/step")
    del v
