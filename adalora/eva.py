"""EVA (Paischer et al., 2024, "One Initialization to Rule Them All: Fine-tuning via Explained
Variance Adaptation"): a one-shot allocation from data, before training.

For each adapted module, the inputs ``x (N, d_in)`` seen over a few batches give a PCA
(centred, as peft's ``IncrementalPCA``): right-singular vectors ``v_i`` and explained-variance
ratios ``ρ_i = σ_i² / Σ_j σ_j²``. ``Q`` (the down projection) starts from the top ``v_i``; ranks
are the global top ``b_T`` of all ``ρ_i`` (at most ``r0`` per module; peft's ``rho · r``). Then
the adapters train at those ranks: no further allocation.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from . import accounting as A
from .allocator import AllocationRecord, BudgetAllocator
from .config import ScheduleConfig


def pca(n: int, total: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From ``n`` rows, their sum ``(d,)`` and ``XᵀX (d, d)``: components ``(d, d)`` (rows, by
    decreasing variance) and explained-variance ratios ``(d,)``."""
    mean = total / n
    cov = (gram - n * torch.outer(mean, mean)) / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)                 # ascending
    evals = evals.flip(0).clamp(min=0)
    comps = evecs.flip(1).T
    return comps, evals / evals.sum().clamp(min=torch.finfo(evals.dtype).tiny)


class EVAAllocator(BudgetAllocator):
    """``init_from_data(forward, batches)`` runs ``forward(batch)`` on each batch without gradients,
    collects the inputs of every SVD adapter (rows where ``batch[mask_key]`` is true when the
    input's leading shape is the mask's: no padding tokens), allocates and initialises.

    # DEVIATION: peft runs an incremental low-rank PCA over batches until the components' cosine
    # similarity reaches tau; here an exact PCA of all rows of the given batches (float64
    # moments), so the result depends only on the batches. Q's rows are the unit-norm components
    # and P keeps its random init (lam = 0, so ΔW = 0), where peft sets LoRA's A and zeroes B.
    """
    name = "EVA"
    unfinished = "EVA never allocated: call init_from_data(forward, batches) before training"
    needs_data = True

    def __init__(self, adapters: dict, schedule_cfg: ScheduleConfig, unit: str = "values",
                 mask_key: str | None = "attention_mask"):
        A.check_unit(unit)
        self.names, self.layers = A.svd_layers(adapters, "EVAAllocator")
        self.adapters = dict(zip(self.names, self.layers))
        self.schedule, self.unit, self.mask_key = schedule_cfg, unit, mask_key
        self.initial_budget = A.spent([layer.r0 for layer in self.layers], self.layers, unit)
        self.target_budget = A.target_in_unit(self.layers, unit, schedule_cfg.target_rank, schedule_cfg.target_total)
        self.final_done = False
        self.explained: dict[str, torch.Tensor] = {}      # ρ_i of the first r0 components per module

    @torch.no_grad()
    def init_from_data(self, forward: Callable[[dict], object], batches: Iterable[dict]) -> AllocationRecord:
        stats = [[0, None, None] for _ in self.layers]    # n, Σx (d_in,), XᵀX (d_in, d_in), float64
        current: dict = {}

        def hook(k):
            def pre(module, args):
                x = args[0]
                mask = current.get("mask")
                if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                    x = x[mask.to(x.device).bool()]
                x = x.reshape(-1, x.shape[-1]).double()
                s = stats[k]
                s[0] += x.shape[0]
                s[1] = x.sum(0) if s[1] is None else s[1] + x.sum(0)
                s[2] = x.T @ x if s[2] is None else s[2] + x.T @ x
            return pre
        handles = [layer.register_forward_pre_hook(hook(k)) for k, layer in enumerate(self.layers)]
        try:
            for batch in batches:
                current["mask"] = batch.get(self.mask_key) if self.mask_key and isinstance(batch, dict) else None
                forward(batch)
        finally:
            for h in handles:
                h.remove()
        if any(s[0] < 2 for s in stats):
            raise ValueError("EVA saw fewer than 2 input rows of an adapted module: give more batches")
        comps, ratios = zip(*[pca(n, t, g) for n, t, g in stats])
        ratios = [r[:layer.r0] for r, layer in zip(ratios, self.layers)]
        self.explained = {n: r.float().cpu() for n, r in zip(self.names, ratios)}
        costs = [A.triplet_cost(layer, self.unit) for layer in self.layers]
        keep, _ = A.select(list(ratios), costs, self.target_budget)
        for layer, c, kk in zip(self.layers, comps, keep):
            r = int(kk.sum())               # the top-r components of a module are kept (ratios sorted)
            layer.resize(torch.arange(r))
            layer.set_factors(Q=c[:r].to(layer.Q.dtype))
        self.final_done = True
        return A.budget_record(0, self.names, self.layers, self.unit, self.target_budget)

    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        return None

    def initial_record(self) -> AllocationRecord:
        # allocated from data before step 0: once done, the start is the target
        return A.budget_record(0, self.names, self.layers, self.unit,
                               self.target_budget if self.final_done else self.initial_budget)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        return dict(self.explained)

    def state_dict(self) -> dict:
        return {"names": list(self.names), "ranks": [layer.rank for layer in self.layers],
                "final_done": self.final_done, "explained": dict(self.explained)}

    @torch.no_grad()
    def load_state_dict(self, sd: dict) -> None:
        """Resizes the adapters to the saved ranks (their weights come from the model load after)."""
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: inject the same targets as the saved run")
        for layer, r in zip(self.layers, sd["ranks"]):
            layer.resize(torch.arange(r))
        self.final_done = bool(sd["final_done"])
        self.explained = dict(sd["explained"])
