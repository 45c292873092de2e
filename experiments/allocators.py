"""The rank allocator of a run, from its config: one place that maps ``method.name`` to an
``adalora.Allocator`` (adalora/README.md, "Allocation families")."""
from __future__ import annotations

import math

import adalora

from .config import ConfigError, RunConfig


def start_rank(cfg: RunConfig) -> int:
    """ElaLoRA's initial rank per module: ``method.elalora_start_rank``, else half the target."""
    m, s = cfg.method, cfg.schedule
    if m.elalora_start_rank is not None:
        return m.elalora_start_rank
    if s.target_rank is None:
        raise ConfigError("method=elalora with schedule.target_total: set method.elalora_start_rank")
    return max(1, int(math.floor(s.target_rank / 2)))


def make_allocator(cfg: RunConfig, adapters: dict, sched: adalora.ScheduleConfig) -> adalora.Allocator:
    """``method.name`` → its allocator over ``adapters`` on the schedule ``sched``."""
    m, s = cfg.method, cfg.schedule
    unit = s.budget_unit
    if m.name == "adalora":
        if unit != "values":
            raise ConfigError("schedule.budget_unit=params is for sora, elalora, eva and svd_truncate: "
                              "AdaLoRA's schedule counts singular values (budget=matched prices it in params)")
        return adalora.RankAllocator(adapters, sched, s.score_config(cfg.seed),
                                     score_before_step=s.score_before_step)
    if m.name == "sora":
        return adalora.SoRAAllocator(adapters, sched, adalora.SoRAConfig(xi=m.sora_xi, adapt=m.sora_adapt), unit)
    if m.name == "elalora":
        try:
            return adalora.ElaLoRAAllocator(adapters, sched, s.score_config(cfg.seed),
                                            adalora.ElaLoRAConfig(prune_ratio=m.elalora_prune_ratio), unit,
                                            seed=cfg.seed)
        except ValueError as e:     # the library says what to inject; here that is a setting
            if "ElaLoRA grows" not in str(e):
                raise
            raise ConfigError(str(e).replace("inject a smaller initial rank",
                                             "set a smaller method.elalora_start_rank")) from None
    if m.name == "eva":
        return adalora.EVAAllocator(adapters, sched, unit)
    if m.name == "svd_truncate":
        return adalora.TruncateAllocator(adapters, sched, unit)
    raise ConfigError(f"method={m.name} has no allocator here")
