"""One budget accounting for every allocator: a budget counts singular values or parameters.

``unit="values"``: one singular value (triplet) costs 1. ``unit="params"``: a triplet of a
``(d_out, d_in)`` module costs ``d_in + d_out + 1`` (a column of ``P``, ``lam_i``, a row of ``Q``).
A target is ``target_total`` in the unit, or ``target_rank`` per module priced uniformly
(``round(target_rank · Σ_k cost_k)``). ``select`` keeps the best-scored triplets that fit: exactly
the top ``b`` in values; in params the greedy fill in score order, whose leftover is the gap.
"""
from __future__ import annotations

import torch

UNITS = ("values", "params")


def check_unit(unit: str) -> None:
    if unit not in UNITS:
        raise ValueError(f"budget unit {unit!r}: use one of {UNITS}")


def triplet_cost(layer, unit: str) -> int:
    """What one singular value of ``layer`` (with ``in_features``, ``out_features``) costs."""
    return 1 if unit == "values" else layer.in_features + layer.out_features + 1


def target_in_unit(layers: list, unit: str, target_rank: float | None, target_total: int | None) -> int:
    """``b_T`` in ``unit``: ``target_total`` when given, else ``target_rank`` per module, priced."""
    check_unit(unit)
    if target_total is not None:
        return int(target_total)
    return int(round(target_rank * sum(triplet_cost(layer, unit) for layer in layers)))


def spent(ranks: list[int], layers: list, unit: str) -> int:
    """Σ_k r_k · cost_k."""
    return sum(r * triplet_cost(layer, unit) for r, layer in zip(ranks, layers))


def select(scores: list[torch.Tensor], costs: list[int], budget: int,
           eligible: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], int]:
    """Keep masks ``[(r_k,) bool]`` of the best-scored triplets whose costs fit ``budget``, and the
    amount spent. Scores ``[(r_k,)]``; ties go to the earlier module, then the lower index (a
    stable sort). Unit costs keep exactly ``min(budget, #eligible)``; otherwise each triplet, in
    score order, is kept if it still fits (a greedy fill: a dearer one skipped, cheaper ones go on)."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.detach().double().cpu() for s in scores]) if scores else torch.zeros(0)
    ok = torch.cat([e.cpu() for e in eligible]) if eligible is not None else torch.ones_like(flat, dtype=torch.bool)
    cost = torch.repeat_interleave(torch.tensor(costs, dtype=torch.long), torch.tensor(sizes, dtype=torch.long))
    flat = torch.where(ok, flat, torch.full_like(flat, -float("inf")))
    order = torch.sort(flat, descending=True, stable=True).indices
    order = order[ok[order]]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if all(c == 1 for c in costs):
        n = max(0, min(budget, order.numel()))
        keep[order[:n]] = True
        used = n
    else:
        used = 0
        for i, c in zip(order.tolist(), cost[order].tolist()):
            if used + c <= budget:
                keep[i] = True
                used += c
    devices = [s.device for s in scores]
    return [k.to(d) for k, d in zip(keep.split(sizes), devices)], used


def svd_layers(adapters: dict, who: str) -> tuple[list[str], list]:
    """The SVD adapters of ``adapters`` (names, layers), or one line naming the fix."""
    from .layers import SVDLinear
    names = [n for n, a in adapters.items() if isinstance(a, SVDLinear)]
    if not names:
        raise ValueError(f"{who} needs SVD adapters: inject with AdapterConfig(method='adalora')")
    return names, [adapters[n] for n in names]


def kept_counts(layers: list) -> list[int]:
    """Kept singular values per layer: ``rank_mask`` where the layer has one, else its rank."""
    return [int(layer.rank_mask.sum()) if hasattr(layer, "rank_mask") else int(layer.rank) for layer in layers]


def budget_record(step: int, names: list[str], layers: list, unit: str, target: int | None,
                  threshold: float | None = None, counts: list[int] | None = None):
    """A ``BudgetRecord`` of the layers' kept counts (or ``counts``), with ``gap = spent − target``
    in ``unit``."""
    from .allocator import AllocationRecord, BudgetRecord
    counts = kept_counts(layers) if counts is None else counts
    base = AllocationRecord.of(step, dict(zip(names, counts)), dict(zip(names, layers)), threshold=threshold)
    used = spent(counts, layers, unit)
    return BudgetRecord(step=base.step, budget=base.budget, threshold=threshold, ranks=base.ranks,
                        params_kept=base.params_kept, unit=unit, target=target,
                        gap=None if target is None else used - target)
