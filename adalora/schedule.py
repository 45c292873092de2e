"""Budget schedule (paper Eq. 14 as the reference codes implement it): pure functions of the step.

Phases, with ``T`` total optimizer steps, ``t_i`` = init_warmup, ``t_f`` = final_warmup (a duration):
- ``warmup``    ``t ≤ t_i``: budget ``b0``, no masking;
- ``budgeting`` ``t_i < t < T − t_f``: ``b(t) = bT + (b0 − bT)(1 − (t − t_i)/(T − t_f − t_i))³``,
  masking when ``t % ΔT == 0``;
- ``final``     ``t ≥ T − t_f``: budget ``bT``; the allocation at ``t = T − t_f`` is forced, then frozen.
"""
from __future__ import annotations

from .config import ScheduleConfig


def target_budget(cfg: ScheduleConfig, n_adapters: int) -> int:
    """``bT``: ``target_total`` if given, else ``round(target_rank · n_adapters)``."""
    return cfg.target_total if cfg.target_total is not None else int(round(cfg.target_rank * n_adapters))


def phase(step: int, cfg: ScheduleConfig) -> str:
    if step >= cfg.final_step:
        return "final"
    return "warmup" if step <= cfg.init_warmup else "budgeting"


def budget_at(step: int, cfg: ScheduleConfig, initial_budget: int, target_budget: int) -> int:
    """``b(t)``, an integer number of singular values kept over all adapters."""
    p = phase(step, cfg)
    if p == "warmup":
        return initial_budget
    if p == "final":
        return target_budget
    # DEVIATION: (t − t_i) in the numerator as both reference codes; the paper prints (t − t_i − t_f).
    frac = 1.0 - (step - cfg.init_warmup) / (cfg.total_steps - cfg.final_warmup - cfg.init_warmup)
    decay = {"cubic": frac ** 3, "linear": frac, "constant": 0.0}[cfg.shape]
    # int() truncates as the reference codes do, so masks agree with peft step for step.
    return int(target_budget + (initial_budget - target_budget) * decay)


def is_mask_step(step: int, cfg: ScheduleConfig) -> bool:
    """Whether the allocator computes a new allocation at ``step`` (the final one is forced)."""
    p = phase(step, cfg)
    return step == cfg.final_step or (p == "budgeting" and step % cfg.mask_interval == 0)


def preview(cfg: ScheduleConfig, initial_budget: int, target_budget: int) -> list[int]:
    """``[b(0), ..., b(T)]``: the whole schedule, for plots before any training."""
    return [budget_at(t, cfg, initial_budget, target_budget) for t in range(cfg.total_steps + 1)]
