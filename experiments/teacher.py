"""Planted-rank teachers: independent frozen linear maps, each plus an update of known rank.

A student with one adapter per map regresses the teacher's noisy outputs while its allocator
distributes the budget (the planted total); the score is the L1 distance between the final
ranks and the planted ones. ``tests/test_planted_ranks.py`` and ``experiments/planted.py`` share it.

Set-up choices (measured with AdaLoRA, see the test's docstring): observation noise on the
targets, so that every triplet sees gradient noise and its score grows with its singular value;
orthogonality weight 0.3 on a loss summed over output dimensions; float64.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn as nn

import adalora

DT = torch.float64


@dataclass(frozen=True)
class Teacher:
    """One configuration: planted ranks, map shape ``(d_out, d_in)``, initial rank, training."""
    planted: tuple = (0, 1, 2, 3, 5, 7)
    d_out: int = 16
    d_in: int = 16
    init_rank: int = 8
    steps: int = 300
    init_warmup: int = 50
    final_warmup: int = 100
    mask_interval: int = 5
    batch: int = 64
    noise: float = 0.5
    orth: float = 0.3
    lr: float = 0.02


class Maps(nn.Module):
    """Independent linear maps; input ``(B, n, d_in)`` -> output ``(B, n, d_out)``."""

    def __init__(self, n: int, d_out: int, d_in: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(d_in, d_out, bias=False) for _ in range(n))

    def forward(self, x):
        return torch.stack([m(x[:, i]) for i, m in enumerate(self.maps)], dim=1)


def planted_update(d_out: int, d_in: int, rank: int, g: torch.Generator) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with orthonormal ``U (d_out, rank)``, ``V (d_in, rank)``, s in [1, 2]."""
    u = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=DT))[0][:, :rank]
    v = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=DT))[0][:, :rank]
    s = torch.empty(rank, dtype=DT).uniform_(1.0, 2.0, generator=g)
    return u @ torch.diag(s) @ v.T


def schedule_config(t: Teacher) -> adalora.ScheduleConfig:
    return adalora.ScheduleConfig(target_rank=None, target_total=sum(t.planted), total_steps=t.steps,
                                  init_warmup=t.init_warmup, final_warmup=t.final_warmup,
                                  mask_interval=t.mask_interval)


def make_allocator(name: str, adapters: dict, t: Teacher, seed: int, kind: str = "sensitivity_uncertainty"):
    """The allocator ``name`` on the teacher's schedule (the factory the benchmark scores)."""
    sched = schedule_config(t)
    score = adalora.ScoreConfig(kind=kind, seed=seed)
    if name == "adalora":
        return adalora.RankAllocator(adapters, sched, score)
    if name == "sora":
        return adalora.SoRAAllocator(adapters, sched)
    if name == "elalora":
        return adalora.ElaLoRAAllocator(adapters, sched, score, seed=seed)
    if name == "eva":
        return adalora.EVAAllocator(adapters, sched)
    if name == "svd_truncate":
        return adalora.TruncateAllocator(adapters, sched)
    raise ValueError(f"unknown allocator {name!r}: use adalora, sora, elalora, eva or svd_truncate")


START_RANK = {"elalora": 1}          # ElaLoRA starts below the target and grows


def train(t: Teacher, seed: int, allocator: str = "adalora", kind: str = "sensitivity_uncertainty",
          factory: Optional[Callable] = None) -> tuple[List[int], object]:
    """Train a student on the teacher; the final ranks (map order) and the allocator."""
    n = len(t.planted)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                                  # W0 and the adapters' initial factors
    model = Maps(n, t.d_out, t.d_in).to(DT)
    teacher = [m.weight.detach().clone() + planted_update(t.d_out, t.d_in, r, g)
               for m, r in zip(model.maps, t.planted)]
    lora = allocator == "svd_truncate"
    rank = START_RANK.get(allocator, t.init_rank)
    adapters = adalora.inject(model, adalora.AdapterConfig(
        method="lora" if lora else "adalora", targets=[f"maps.{i}" for i in range(n)], init_rank=rank,
        alpha=float(t.init_rank), scale_rank=float(t.init_rank)))
    adalora.mark_only_adapters_trainable(model)
    alloc = (factory or make_allocator)(allocator, adapters, t, seed, kind)

    def batch():
        x = torch.randn(t.batch, n, t.d_in, generator=g, dtype=DT)
        y = torch.stack([x[:, i] @ w.T for i, w in enumerate(teacher)], dim=1)
        return x, y + t.noise * torch.randn(y.shape, generator=g, dtype=DT)

    if alloc.needs_data:
        alloc.init_from_data(lambda b: model(b["x"]), [{"x": batch()[0]} for _ in range(4)])
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=t.lr, weight_decay=0.0)
    alloc.bind_optimizer(opt)
    for step in range(t.steps):
        x, y = batch()
        loss = ((model(x) - y) ** 2).sum(-1).mean()
        if not lora:
            loss = loss + t.orth * adalora.orthogonality_penalty(adapters)
        loss.backward()
        opt.step()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        opt.zero_grad(set_to_none=True)
    alloc.finalize()
    return list(alloc.ranks().values()), alloc


def l1(ranks: List[int], planted) -> int:
    return sum(abs(a - b) for a, b in zip(ranks, planted))
