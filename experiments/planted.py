"""``python -m experiments.planted allocator=<name>``: score an allocator on planted-rank teachers.

Each configuration (``experiments/teacher.py``) plants updates of known ranks in independent
frozen maps; a student with one adapter per map trains on the teacher's noisy outputs under
the allocator, with the planted total as its budget. The score is the L1 distance between the
final ranks and the planted ones, per run; the last printed line is one JSON object with the
allocator, ``l1`` (the total over configurations and seeds) and the per-configuration totals.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import List

from .teacher import Teacher, l1, train

ALLOCATORS = ("adalora", "sora", "elalora", "eva", "svd_truncate")
# Three shapes of problem: the test's six square maps; rectangular maps (ranks priced by shape);
# eight small maps with a flatter spread of ranks.
CONFIGS = {
    "square6": Teacher(),
    "rect6": Teacher(planted=(0, 2, 4, 1, 6, 3), d_out=24, d_in=12),
    "flat8": Teacher(planted=(1, 1, 2, 2, 3, 3, 4, 4), d_out=12, d_in=12, init_rank=6),
}


@dataclass
class PlantedConfig:
    allocator: str = "adalora"
    seeds: int = 3                        # seeds 0 .. seeds-1 per configuration
    configs: List[str] = field(default_factory=lambda: list(CONFIGS))
    threads: int = 1                      # 16x16 products: more threads only spin

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator={self.allocator}: use one of {', '.join(ALLOCATORS)}")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        bad = [c for c in self.configs if c not in CONFIGS]
        if bad:
            raise ValueError(f"configs: unknown {bad[0]}; use some of {', '.join(CONFIGS)}")


def run(cfg: PlantedConfig) -> dict:
    import torch
    torch.set_num_threads(cfg.threads)
    rows, per_config, t0 = [], {}, time.time()
    for name in cfg.configs:
        t = CONFIGS[name]
        errs = []
        for seed in range(cfg.seeds):
            ranks, _ = train(t, seed, cfg.allocator)
            errs.append(l1(ranks, t.planted))
            rows.append((name, seed, list(t.planted), ranks, errs[-1]))
        per_config[name] = sum(errs)
    print(f"allocator {cfg.allocator}: L1 = Σ|final rank − planted rank| per run")
    print(f"| config | seed | planted | found | L1 |\n|---|---|---|---|---|")
    for name, seed, planted, ranks, e in rows:
        print(f"| {name} | {seed} | {planted} | {ranks} | {e} |")
    result = {"allocator": cfg.allocator, "l1": sum(per_config.values()), "l1_per_config": per_config,
              "seeds": cfg.seeds, "runs": len(rows), "time_s": round(time.time() - t0, 1)}
    print(json.dumps(result))
    return result


def main() -> None:
    flags = [a for a in sys.argv[1:] if a.startswith("-") and a not in ("--help", "-h", "--cfg", "-c")]
    if flags:
        print(f"error: {flags[0]}: give Hydra overrides, e.g. allocator=sora seeds=3", file=sys.stderr)
        sys.exit(2)
    import hydra
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf
    ConfigStore.instance().store(name="planted_schema", node=PlantedConfig)
    from .overrides import field_error, first_error
    if (msg := first_error("planted", sys.argv[1:], lambda a: field_error(a, PlantedConfig, "the planted study"))):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    @hydra.main(config_path="../conf", config_name="planted", version_base="1.3")
    def entry(dcfg) -> None:
        try:
            cfg = OmegaConf.to_object(dcfg)
        except Exception as e:              # a dataclass check or an OmegaConf type error
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        run(cfg)
    entry()


if __name__ == "__main__":
    main()
