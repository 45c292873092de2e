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
base = B.BenchConfig(preset=sys.argv[2], dtype="bf16", device=DEV, alloc_layers=[])
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
import torch.nn.functional as F
from adalora.layers import SVDLinear, LoRALinear
ORIG = {c: (c._down, c._up) for c in (SVDLinear, LoRALinear)}
def _pad_rows(w, r):   # (r, d) -> (r+p, d) zero rows, so every product's r dimension is a multiple of 8
    p = (-r) % 8
    return F.pad(w, (0, 0, 0, p)) if p else w
def _pad_cols(w, r):
    p = (-r) % 8
    return F.pad(w, (0, p)) if p else w
def set_pad(on):
    for c, (d, u) in ORIG.items():
        c._down, c._up = d, u
    if not on:
        return
    SVDLinear._down = lambda self, x: F.linear(x, _pad_rows(self.Q * self.lam.unsqueeze(1), self.rank))
    SVDLinear._up = lambda self: _pad_cols(self.P, self.rank)
    LoRALinear._down = lambda self, x: F.linear(x, _pad_rows(self.A, self.rank))
    LoRALinear._up = lambda self: _pad_cols(self.B, self.rank)
from adalora.layers import AdapterLayer
# `+T` was the prototype of fd40888. From fd40888 on the library's forward *is* this form and its
# up factors are already column-major, so `+T` changes nothing; the "before" rows of
# profiles_3ed7354 need a checkout of 3ed7354.
FWD = AdapterLayer.forward
def fwd_t(self, x):
    # Transposed low-rank path: hT = W_down x^T is (r, N), row stride N; the up factor is stored
    # column-major so up^T is row-major (r, d_out). Every product's leading dimension is then N,
    # d_in or d_out: 16-byte aligned whatever r is.
    y = self.base(x)
    if self.merged or self.rank == 0:
        return y
    if self.drop is not None:
        x = self.drop(x)
    w = self.Q * self.lam.unsqueeze(1) if isinstance(self, SVDLinear) else self.A
    x2 = x.reshape(-1, x.shape[-1])
    ht = torch.mm(w, x2.t())
    return torch.addmm(y.reshape(-1, y.shape[-1]), ht.t(), self._up().t(), alpha=self.scaling).view(y.shape)
def set_t(on, model=None):
    AdapterLayer.forward = fwd_t if on else FWD
    if on and model is not None:
        for m in model.modules():
            if isinstance(m, AdapterLayer):
                up = m.P if isinstance(m, SVDLinear) else m.B
                up.data = up.data.t().contiguous().t()
for spec in sys.argv[3:]:
    spec0, pad = spec.removesuffix("+pad"), spec.endswith("+pad")
    spec0, tr = spec0.removesuffix("+T"), spec0.endswith("+T")
    set_pad(pad)
    set_t(tr)
    name, _, r = spec0.partition("@")
    cfg = base
    if r:
        cfg = replace(cfg, init_rank=int(r)) if name.startswith("adalora") else replace(cfg, lora_rank=int(r))
    t0 = time.perf_counter()
    v = B.build_variant(name, cfg, dev, batch, fr)
    set_t(tr, v.model)
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
