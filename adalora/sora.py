"""SoRA (Ding et al., EMNLP 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models").

SoRA puts a gate ``g (r,)`` between LoRA's down and up projections and trains it with a proximal
L1 step after every optimizer step: ``g ← sign(g) · max(|g| − η·ξ, 0)`` (soft-thresholding). The
gate here is the SVD adapter's ``lam``; a gate at zero is a pruned singular value. The budget is
reached by the threshold schedule, not by a top-b cut, so every record carries the kept budget
and its gap to the target (``BudgetRecord``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import accounting as A
from . import gate_bank, schedule
from .allocator import AllocationRecord, BudgetAllocator
from .config import ScheduleConfig, _check, _is_number


@dataclass
class SoRAConfig:
    """``xi``: SoRA's ξ when budgeting starts; the soft threshold of a step is ``η·ξ`` with ``η``
    the learning rate of ``lam``'s parameter group. ``adapt``: at each mask step ξ is multiplied
    by ``1 + adapt`` while the kept budget is above ``b(t)`` and divided by it while below; 0
    keeps ξ fixed."""

    xi: float = 0.1
    adapt: float = 0.2

    def __post_init__(self) -> None:
        _check(_is_number(self.xi) and self.xi >= 0, f"SoRAConfig.xi={self.xi!r}: use a number >= 0")
        _check(_is_number(self.adapt) and self.adapt >= 0, f"SoRAConfig.adapt={self.adapt!r}: use a number >= 0")


class SoRAAllocator(BudgetAllocator):
    """Proximal L1 on ``lam`` after each optimizer step, from ``init_warmup`` to the final step,
    where the gates still non-zero become the final allocation (frozen, re-applied every step).

    # DEVIATION: SoRA raises ξ on a fixed schedule and accepts whatever sparsity results; here the
    # threshold follows the budget schedule b(t) (multiplied or divided by 1 + adapt at each mask
    # step) so that runs compare under one budget. adapt=0 is SoRA's fixed ξ. The gate is
    # AdaLoRA's lam, with the orthogonality penalty on P and Q, so that every family shares one adapter.
    """
    name = "SoRA"

    def __init__(self, adapters: dict, schedule_cfg: ScheduleConfig, cfg: SoRAConfig | None = None,
                 unit: str = "values"):
        A.check_unit(unit)
        self.names, self.layers = A.svd_layers(adapters, "SoRAAllocator")
        self.adapters = dict(zip(self.names, self.layers))
        self.schedule, self.cfg, self.unit = schedule_cfg, cfg or SoRAConfig(), unit
        self.initial_budget = A.spent([layer.r0 for layer in self.layers], self.layers, unit)
        self.target_budget = A.target_in_unit(self.layers, unit, schedule_cfg.target_rank, schedule_cfg.target_total)
        if self.target_budget >= self.initial_budget:
            raise ValueError(f"target budget {self.target_budget} >= initial budget {self.initial_budget} "
                             f"({unit}): set the target rank below the initial rank")
        self.level = 0                  # ξ = xi · (1 + adapt)^level
        self.final_done = False
        self.optimizer = None

    def bind_optimizer(self, optimizer) -> None:
        """The optimizer whose learning rate η scales the threshold (SoRA's η·ξ)."""
        self.optimizer = optimizer

    def xi(self) -> float:
        return self.cfg.xi * (1.0 + self.cfg.adapt) ** self.level

    def _lrs(self) -> list[float]:
        if self.optimizer is None:
            raise RuntimeError("SoRAAllocator.bind_optimizer(optimizer) first: the threshold is lr · xi")
        lr = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        return [lr[id(gate_bank.gate_param(layer))] for layer in self.layers]

    def _nonzero(self) -> list[int]:
        return [int(torch.count_nonzero(layer.lam.detach() * layer.rank_mask)) for layer in self.layers]

    @torch.no_grad()
    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        if self.final_done:
            for layer in self.layers:
                layer.lam.mul_(layer.rank_mask.to(layer.lam.dtype))
            return None
        if step <= self.schedule.init_warmup and step < self.schedule.final_step:
            return None
        xi = self.xi()
        for layer, lr in zip(self.layers, self._lrs()):   # proximal step of η·ξ·‖lam‖₁: soft-threshold
            lam = layer.lam
            lam.copy_(lam.sign() * (lam.abs() - lr * xi).clamp_(min=0))
        counts = self._nonzero()
        if step >= self.schedule.final_step:
            for layer in self.layers:
                layer.rank_mask.copy_(layer.lam.detach() != 0)
            self.final_done = True
            return A.budget_record(step, self.names, self.layers, self.unit, self.target_budget, xi)
        if not schedule.is_mask_step(step, self.schedule):
            return None
        b = schedule.budget_at(step, self.schedule, self.initial_budget, self.target_budget)
        used = A.spent(counts, self.layers, self.unit)
        self.level += (used > b) - (used < b)
        return A.budget_record(step, self.names, self.layers, self.unit, b, xi, counts=counts)

    def ranks(self) -> dict[str, int]:
        return dict(zip(self.names, A.kept_counts(self.layers) if self.final_done else self._nonzero()))

    @torch.no_grad()
    def compact(self, optimizer=None) -> None:
        if not self.final_done:
            raise RuntimeError("compact() before SoRA's final step")
        for layer in self.layers:
            keep = layer.rank_mask.nonzero().flatten()
            if keep.numel() < layer.rank:
                layer.resize(keep, optimizer)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "level": self.level, "final_done": self.final_done,
                "masks": [layer.rank_mask.clone() for layer in self.layers]}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: inject the same targets as the saved run")
        for layer, m in zip(self.layers, sd["masks"]):
            if layer.rank != m.numel():          # compacted: weights come from the model load
                layer.resize(torch.arange(m.numel(), device=layer.lam.device))
            layer.rank_mask.copy_(m)
        self.level, self.final_done = int(sd["level"]), bool(sd["final_done"])
