"""ElaLoRA (Chang et al., 2025, "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient
Model Fine-Tuning"): ranks are pruned *and* grown during training.

Adapters start below the target budget. At each mask step the lowest-scored triplets (AdaLoRA's
sensitivity-uncertainty score, ``adalora.importance``) are removed and new triplets are added to
the modules of highest importance until the budget ``b(t)`` is met; ``b(t)`` rises from the start
budget to ``b_T`` on the cubic schedule (``adalora.schedule``) and is frozen from ``T − t_f``. Pruned
triplets are removed physically (``SVDLinear.resize``) and grown ones appended with
``SVDLinear.expand``, each with its optimizer state, so the adapters always hold the kept rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import accounting as A
from . import schedule
from .allocator import AllocationRecord, BudgetAllocator
from .config import ScheduleConfig, ScoreConfig, _check, _is_number
from .importance import ImportanceScorer


@dataclass
class ElaLoRAConfig:
    """``prune_ratio``: the share of kept triplets removed (and regrown elsewhere) at a mask step;
    ``init_std``: the std of a grown triplet's ``P`` column and ``Q`` row (``lam`` starts at 0)."""

    prune_ratio: float = 0.1
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check(_is_number(self.prune_ratio) and 0 <= self.prune_ratio < 1,
               f"ElaLoRAConfig.prune_ratio={self.prune_ratio!r}: use a value in [0, 1)")
        _check(_is_number(self.init_std) and self.init_std > 0,
               f"ElaLoRAConfig.init_std={self.init_std!r}: use a positive number")


class ElaLoRAAllocator(BudgetAllocator):
    """Prune the lowest-scored, grow the most important modules, up to ``b(t)``.

    # DEVIATION: ElaLoRA's module importance for growth is the mean score of the module's
    # triplets here, grown one triplet per module in importance order (round robin); triplets
    # grown at the previous mask step are not pruned at the next one (their EMAs start at zero).
    """
    name = "ElaLoRA"
    reshapes = True

    def __init__(self, adapters: dict, schedule_cfg: ScheduleConfig, score_cfg: ScoreConfig | None = None,
                 cfg: ElaLoRAConfig | None = None, unit: str = "values", seed: int = 0):
        A.check_unit(unit)
        self.names, self.layers = A.svd_layers(adapters, "ElaLoRAAllocator")
        self.adapters = dict(zip(self.names, self.layers))
        self.schedule, self.cfg, self.unit, self.seed = schedule_cfg, cfg or ElaLoRAConfig(), unit, seed
        self.initial_budget = A.spent([layer.rank for layer in self.layers], self.layers, unit)
        self.target_budget = A.target_in_unit(self.layers, unit, schedule_cfg.target_rank, schedule_cfg.target_total)
        if self.target_budget <= self.initial_budget:
            raise ValueError(f"ElaLoRA grows: its start budget {self.initial_budget} must be below the target "
                             f"{self.target_budget} ({unit}); inject a smaller initial rank")
        self.scorer = ImportanceScorer(self.layers, score_cfg or ScoreConfig())
        self.born = [torch.full((layer.rank,), -1, dtype=torch.long) for layer in self.layers]
        self.optimizer = None
        self.final_done = False

    def bind_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    def update_importance(self, step: int, grads_finite: bool | None = None) -> bool:
        if self.final_done:
            return False
        return self.scorer.update(grads_finite)

    @torch.no_grad()
    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        if self.final_done:
            return None
        final = step >= self.schedule.final_step
        if not final and not schedule.is_mask_step(step, self.schedule):
            return None
        if self.optimizer is None:
            raise RuntimeError("ElaLoRAAllocator.bind_optimizer(optimizer) first: growing a module "
                               "grows its optimizer state")
        b = self.target_budget if final else schedule.budget_at(step, self.schedule, self.initial_budget,
                                                                   self.target_budget)
        scores = self.scorer.scores(step)
        costs = [A.triplet_cost(layer, self.unit) for layer in self.layers]
        # born is kept on the CPU (checkpoints stay device-free); the masks meet the scores on theirs
        old = [(born <= step - self.schedule.mask_interval).to(s.device) for born, s in zip(self.born, scores)]
        n_kept = sum(layer.rank for layer in self.layers)
        n_prune = 0 if final else int(self.cfg.prune_ratio * n_kept)
        # keep all but the n_prune lowest-scored old triplets; the young ones are kept as they are
        n_old = sum(int(o.sum()) for o in old)
        keep_old, _ = A.select(scores, [1] * len(self.layers), n_old - min(n_prune, n_old), old)
        keep = [k | ~o for k, o in zip(keep_old, old)]
        used = A.spent([int(k.sum()) for k in keep], self.layers, self.unit)
        if used > b:                  # over budget (params unit, or a falling target): prune on
            keep, used = A.select(scores, costs, b, keep)
        ranks = [int(k.sum()) for k in keep]
        importance = [float(s[k].mean()) if k.any() else 0.0 for s, k in zip(scores, keep)]
        grow = self._grow_counts(ranks, importance, costs, b - used)
        self._reshape(keep, grow, step)
        return A.budget_record(step, self.names, self.layers, self.unit, b)

    def _grow_counts(self, ranks: list[int], importance: list[float], costs: list[int], room: int) -> list[int]:
        """Round robin over modules by importance (ties: module order), one triplet at a time while
        it fits ``room`` and the module's rank stays <= min(d_in, d_out)."""
        order = sorted(range(len(ranks)), key=lambda k: -importance[k])
        grow = [0] * len(ranks)
        progress = True
        while progress:
            progress = False
            for k in order:
                layer = self.layers[k]
                if costs[k] <= room and ranks[k] + grow[k] < min(layer.in_features, layer.out_features):
                    grow[k] += 1
                    room -= costs[k]
                    progress = True
        return grow

    def _reshape(self, keep: list[torch.Tensor], grow: list[int], step: int) -> None:
        sd = self.scorer.state_dict()
        for k, (layer, kk, g) in enumerate(zip(self.layers, keep, grow)):
            idx = kk.nonzero().flatten()
            if idx.numel() < layer.rank:
                layer.resize(idx, self.optimizer)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + k)
            layer.expand(g, self.optimizer, self.cfg.init_std, gen)
            self.born[k] = torch.cat([self.born[k][idx.cpu()], torch.full((g,), step, dtype=torch.long)])
            for name in ("ibar", "ubar"):
                if sd[name] is not None:
                    for j, dim in ((0, 1), (1, 0), (2, 0)):        # P, lam, Q of layer k
                        t = sd[name][3 * k + j].index_select(dim, idx.to(sd[name][3 * k + j].device))
                        pad = list(t.shape)
                        pad[dim] = g
                        sd[name][3 * k + j] = torch.cat([t, t.new_zeros(pad)], dim)
        self.scorer.load_state_dict(sd)
        if step >= self.schedule.final_step:
            self.final_done = True
            self.scorer.free()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        return {} if self.final_done else dict(zip(self.names, self.scorer.scores()))

    def state_dict(self) -> dict:
        return {"names": list(self.names), "ranks": [layer.rank for layer in self.layers],
                "born": [b.clone() for b in self.born], "scorer": self.scorer.state_dict(),
                "final_done": self.final_done}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Resizes the adapters to the saved ranks (their weights come from the model load after)."""
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: inject the same targets as the saved run")
        for layer, r in zip(self.layers, sd["ranks"]):
            if r < layer.rank:
                layer.resize(torch.arange(r))
            else:
                layer.expand(r - layer.rank)
        self.born = [b.clone() for b in sd["born"]]
        self.scorer.load_state_dict(sd["scorer"])
        self.final_done = bool(sd["final_done"])
