"""Task switching on one frozen base: ``adalora.set_adapter`` against reloading the model.

    python -m experiments.bench_switch [--out FILE.json]

all-MiniLM-L6-v2 (offline) with AdaLoRA adapters (r0 12) on every linear map of each block.
"reload" is what serving a second task costs without named sets: load the base, inject, and load
that task's saved adapters. "switch" rebinds the layers' parameters to another named set. Both
are medians over repeats on this machine; the file records commit, machine and versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import adalora

from .config import ModelConfig
from .model import block_linears, load_model, load_tokenizer
from .provenance import git_commit, versions
from .runlog import atomic_write_json


def _reload(cfg: ModelConfig, vocab: int, path: Path):
    model = load_model(cfg, 2, vocab).backbone
    adalora.inject(model, adalora.AdapterConfig(targets=block_linears(model)))
    adalora.load_adapters(path, model)
    return model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_switch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    ap.add_argument("--reloads", type=int, default=5)
    ap.add_argument("--switches", type=int, default=200)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = ModelConfig()
    vocab = len(load_tokenizer(cfg))
    tmp = Path(tempfile.mkdtemp())
    model = load_model(cfg, 2, vocab).backbone
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=block_linears(model)))
    for name in ("task_a", "task_b"):
        with torch.no_grad():
            for layer in adapters.values():
                layer.lam.normal_()
        adalora.save_adapters(tmp / f"{name}.safetensors", model)
    reload_s = []
    for _ in range(a.reloads):
        t0 = time.perf_counter()
        _reload(cfg, vocab, tmp / "task_b.safetensors")
        reload_s.append(time.perf_counter() - t0)
    shared = _reload(cfg, vocab, tmp / "task_a.safetensors")
    adalora.add_adapter(shared, "task_b")
    with adalora.use_adapter(shared, "task_b"):
        adalora.load_adapters(tmp / "task_b.safetensors", shared)
    switch_s = []
    for i in range(a.switches):
        t0 = time.perf_counter()
        adalora.set_adapter(shared, "task_b" if i % 2 == 0 else "default")
        switch_s.append(time.perf_counter() - t0)
    result = {
        "kind": "adapter_switch", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
        "versions": versions(), "command": ["python -m experiments.bench_switch"],
        "setup": f"all-MiniLM-L6-v2, AdaLoRA r0 12 on {len(adapters)} matrices, CPU, {torch.get_num_threads()} threads",
        "runs": [{"what": "reload the model and load the task's adapters", "repeats": a.reloads,
                  "median_ms": statistics.median(reload_s) * 1e3},
                 {"what": "adalora.set_adapter to another named set", "repeats": a.switches,
                  "median_ms": statistics.median(switch_s) * 1e3}]}
    result["speedup"] = result["runs"][0]["median_ms"] / result["runs"][1]["median_ms"]
    if a.out:
        atomic_write_json(Path(a.out), result)
    for r in result["runs"]:
        print(f"{r['what']}: {r['median_ms']:.3f} ms (median of {r['repeats']})")
    return result


if __name__ == "__main__":
    main()
