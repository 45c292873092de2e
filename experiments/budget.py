"""Budget matching between AdaLoRA and LoRA, counted in parameters, not ranks.

One LoRA rank of a (d_out, d_in) matrix costs d_in + d_out parameters (A row + B column); one
AdaLoRA singular value costs d_in + d_out + 1 (P column, Q row, lam). A rank of a 384x1536
matrix costs more than one of a 384x384, so equal rank counts are not equal budgets.

The AdaLoRA target is a total of singular values whose final spread is unknown before
training; we price it as ``target_rank`` per matrix (the uniform spread of the target budget),
which is exact in total when all matrices have the same shape and an estimate otherwise.
"""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

from torch import nn

import adalora

from .config import ConfigError

Shapes = Dict[str, Tuple[int, int]]  # {module: (d_out, d_in)}


def adapted_shapes(backbone: nn.Module, acfg: adalora.AdapterConfig) -> Shapes:
    """Shapes of the matrices ``acfg`` would adapt, from an inject into a throwaway copy: the
    names then match exactly as the library matches them, and a matched LoRA's rank can be
    priced before the real inject picks it."""
    return dict(adalora.adapter_shapes(adalora.inject(copy.deepcopy(backbone), acfg)))


def lora_params(shapes: Shapes, rank: int, rank_pattern: Dict[str, int] | None = None) -> int:
    rp = rank_pattern or {}
    return sum(rp.get(n, rank) * (o + i) for n, (o, i) in shapes.items())


def adalora_target_params(shapes: Shapes, target_rank: float) -> int:
    return int(round(sum(target_rank * (o + i + 1) for o, i in shapes.values())))


def matched_lora_rank(shapes: Shapes, target_params: int, max_rank: int = 4096) -> int:
    """Uniform LoRA rank whose parameter count is closest to ``target_params`` (ties: lower)."""
    if not shapes:
        raise ConfigError("budget matching needs at least one adapted matrix")
    per_rank = lora_params(shapes, 1)
    r = max(1, int(target_params // per_rank))
    return min((c for c in (r, r + 1) if 1 <= c <= max_rank),
               key=lambda c: (abs(c * per_rank - target_params), c))


def target_rank_from_lora(shapes: Shapes, lora_rank: int, init_rank: int) -> float:
    """Average AdaLoRA target rank whose parameter price equals LoRA rank ``lora_rank``."""
    t = lora_params(shapes, lora_rank) / sum(o + i + 1 for o, i in shapes.values())
    if not t < init_rank:
        raise ConfigError(f"budget=from_lora: LoRA rank {lora_rank} needs target_rank {t:.2f} "
                          f">= method.init_rank={init_rank}; raise method.init_rank")
    return t


def target_budget(shapes: Shapes, target_rank: Optional[float], target_total: Optional[int],
                  unit: str) -> Tuple[int, float]:
    """(parameters, average rank) of the target budget the allocator keeps: ``target_total``
    wins over ``target_rank``, as in ``adalora.ScheduleConfig``."""
    if target_total is None:
        if target_rank is None:
            raise ConfigError("schedule: set schedule.target_rank (average) or schedule.target_total")
        return adalora_target_params(shapes, target_rank), target_rank
    if not shapes:
        raise ConfigError("budget matching needs at least one adapted matrix")
    if unit == "params":
        # The total is already parameters (adalora/accounting.py), exact whatever the shapes.
        return target_total, target_total / sum(o + i + 1 for o, i in shapes.values())
    # In values, which matrices keep them is only learnt in training: price total / n per
    # matrix, the uniform spread target_rank is priced at, so target_total=72 over 12 matrices
    # costs what target_rank=6 does.
    rank = target_total / len(shapes)
    return adalora_target_params(shapes, rank), rank
