"""Post-hoc truncation: train uniform LoRA, then cut every module's ``ΔW`` by SVD to a global
top-``b`` budget of singular values across modules, and optionally fine-tune the result.

The baseline of the AdaLoRA paper's comparisons (an SVD of each trained update) made global:
at step ``T − t_f`` each ``ΔW_k = s_k B_k A_k (d_out, d_in) = U Σ Vᵀ``, all ``σ_{k,i}`` compete
for ``b_T``, and module ``k`` keeps its top ``r_k``: ``A ← V_{:r_k}ᵀ``, ``B ← U_{:r_k} Σ_{:r_k} / s_k``
(``ΔW`` is then the rank-``r_k`` truncation, the best in Frobenius norm by Eckart–Young).
The last ``t_f`` steps fine-tune the truncated factors (``t_f = 0``: truncation at the last step).
"""
from __future__ import annotations

import torch

from . import accounting as A
from . import gate_bank
from .allocator import AllocationRecord, BudgetAllocator
from .config import ScheduleConfig
from .layers import LoRALinear


def truncated_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ΔW (d_out, d_in)`` → ``U (d_out, r)``, ``σ (r,)``, ``Vᵀ (r, d_in)`` of its top ``r``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :r], s[:r], vh[:r]


class TruncateAllocator(BudgetAllocator):
    """Global top-``b_T`` truncation of trained LoRA updates at ``T − t_f``.

    # DEVIATION: the kept σ is folded into LoRA's B (the adapters stay ``LoRALinear``), yet the
    # budget prices each kept rank as a triplet (d_in + d_out + 1), as every other allocator here.
    """
    name = "svd_truncate"
    unfinished = ("svd_truncate never truncated (step {final_step}): call mask_to_budget(step) once per "
                  "optimizer step up to total_steps")
    reshapes = True

    def __init__(self, adapters: dict, schedule_cfg: ScheduleConfig, unit: str = "values"):
        A.check_unit(unit)
        self.names = [n for n, a in adapters.items() if isinstance(a, LoRALinear)]
        if not self.names:
            raise ValueError("TruncateAllocator needs LoRA adapters: inject with AdapterConfig(method='lora')")
        self.layers = [adapters[n] for n in self.names]
        self.adapters = dict(zip(self.names, self.layers))
        self.schedule, self.unit = schedule_cfg, unit
        self.initial_budget = A.spent([layer.rank for layer in self.layers], self.layers, unit)
        self.target_budget = A.target_in_unit(self.layers, unit, schedule_cfg.target_rank, schedule_cfg.target_total)
        if any(gate_bank.bank_of(layer, a) is not None for layer in self.layers for a in ("A", "B")):
            # its truncation starts each adapter's Adam state afresh, step count included, which a
            # bank shared with the other adapters cannot do for one of them
            raise ValueError("svd_truncate replaces each adapter's basis and restarts its optimizer state: "
                             "inject with AdapterConfig(flat_factors=False)")
        self.optimizer = None
        self.final_done = False
        self.sigmas: dict[str, torch.Tensor] = {}

    def bind_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    @torch.no_grad()
    def truncate(self, step: int | None = None) -> AllocationRecord:
        """Cut every module to its share of the global top ``b_T`` singular values."""
        merged = [n for n, layer in zip(self.names, self.layers) if layer.merged]
        if merged:
            # checked for all before any cut: set_factors would refuse only at the first merged one
            raise ValueError(f"svd_truncate: adapters {merged} are merged into their base weights: "
                             "unmerge the model before training (adalora.unmerge)")
        deltas = [layer.delta_weight().double() for layer in self.layers]
        svds = [truncated_factors(d, min(layer.rank, *d.shape)) for d, layer in zip(deltas, self.layers)]
        self.sigmas = {n: s.float().cpu() for n, (_, s, _) in zip(self.names, svds)}
        costs = [A.triplet_cost(layer, self.unit) for layer in self.layers]
        keep, _ = A.select([s for _, s, _ in svds], costs, self.target_budget)
        for layer, (u, s, vh), kk in zip(self.layers, svds, keep):
            r = int(kk.sum())             # a prefix: σ is sorted
            old = (layer.A, layer.B)
            scale = layer.scaling if layer.scaling != 0 else 1.0
            layer.set_factors(A=vh[:r], B=u[:, :r] * (s[:r] / scale))
            if self.optimizer is not None:
                for group in self.optimizer.param_groups:
                    group["params"] = [layer.A if p is old[0] else layer.B if p is old[1] else p
                                       for p in group["params"]]
                for p in old:                 # the old moments belong to another basis
                    self.optimizer.state.pop(p, None)
        self.final_done = True
        step = self.schedule.final_step if step is None else step
        return A.budget_record(step, self.names, self.layers, self.unit, self.target_budget)

    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        if self.final_done or step < self.schedule.final_step:
            return None
        if self.optimizer is None:
            # the cut makes new parameters: an unbound optimizer would train the old ones, i.e. nothing
            raise RuntimeError("TruncateAllocator.bind_optimizer(optimizer) first: the truncation replaces "
                               "the adapters' parameters in the optimizer")
        return self.truncate(step)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        return dict(self.sigmas)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "ranks": [layer.rank for layer in self.layers],
                "final_done": self.final_done, "sigmas": dict(self.sigmas)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Reshapes truncated adapters to the saved ranks (weights come from the model load after)."""
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: inject the same targets as the saved run")
        for layer, r in zip(self.layers, sd["ranks"]):
            if r != layer.rank:
                layer.set_factors(A=layer.A.new_zeros(r, layer.in_features), B=layer.B.new_zeros(layer.out_features, r))
        self.final_done = bool(sd["final_done"])
        self.sigmas = dict(sd["sigmas"])
