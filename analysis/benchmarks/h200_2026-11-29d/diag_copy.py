"""Which tensors does the CUDA-graph replay copy each step? Profile 2 steps with shapes, per variant."""
import sys, torch
from dataclasses import replace
from torch.profiler import profile, ProfilerActivity
from experiments import benchmark as B
dev = torch.device("cuda")
cfg = replace(B.BenchConfig(preset="base", dtype="bf16", device="cuda", alloc_layers=[]), compile=True, compile_mode="reduce-overhead")
g = torch.Generator().manual_seed(0)
batch = {"input_ids": torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g).to(dev),
         "attention_mask": torch.ones(cfg.batch, cfg.seq, dtype=torch.long, device=dev),
         "labels": torch.randint(0, 2, (cfg.batch,), generator=g).to(dev)}
for name in sys.argv[1:]:
    v = B.build_variant(name, cfg, dev, batch, {})
    for _ in range(6): v.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
        for _ in range(2): v.step()
        torch.cuda.synchronize()
    print(f"=== {name}", flush=True)
    for e in prof.key_averages(group_by_input_shape=True):
        if "copy" in e.key.lower() and e.device_type.name == "CPU":
            print(f"  {e.key} x{e.count // 2}/step shapes={str(e.input_shapes)[:600]}")
    for e in prof.key_averages(group_by_stack_n=8):
        if e.key == "aten::_foreach_copy_":
            print("  stack:", " | ".join(e.stack[:8]))
    del v
