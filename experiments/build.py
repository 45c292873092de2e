"""From a validated RunConfig to the objects the loop needs: model with adapters, allocator,
optimizer parameter groups, budget bookkeeping. Library ValueErrors raised here are config
errors (targets matching nothing, impossible schedules) and become one-line ConfigErrors."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import adalora
from adalora.inject import scaling

from . import budget as B
from .allocators import make_allocator, start_rank
from .config import ALLOCATING, ConfigError, RunConfig
from .model import HEAD, PooledClassifier, method_targets

@dataclass
class Built:
    model: PooledClassifier
    adapters: Dict[str, nn.Module]
    allocator: Optional[Any]                  # adalora.RankAllocator for pruning methods
    adapter_cfg: Optional[Any]
    schedule_cfg: Optional[Any]
    total_steps: int
    init_warmup: Optional[int] = None
    final_warmup: Optional[int] = None
    budget: Dict[str, Optional[int]] = field(default_factory=dict)
    lora_rank: Optional[int] = None
    target_rank: Optional[float] = None
    quantized: List[str] = field(default_factory=list)


def derive_total_steps(n_train: int, cfg: RunConfig, world_size: int = 1) -> int:
    """Optimizer steps from data size, epochs, batch, accumulation and world size."""
    per_step = cfg.trainer.batch_size * cfg.trainer.grad_accum * world_size
    total = max(1, math.ceil(cfg.trainer.epochs * n_train / per_step))
    return min(total, cfg.trainer.max_steps) if cfg.trainer.max_steps else total


def read_found_ranks(run_dir: str) -> Dict[str, int]:
    """final_ranks of a finished run of an allocating method (ablation lora_on_found_ranks)."""
    path = os.path.join(run_dir, "summary.json")
    try:
        s = json.load(open(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"method.rank_pattern_from: cannot read {path} ({type(e).__name__})")
    if s.get("status") != "completed" or not s.get("final_ranks"):
        raise ConfigError(f"method.rank_pattern_from: {run_dir} is not a completed AdaLoRA run "
                          "with final_ranks")
    # A fixed-rank run's final ranks are its own configuration, not an allocation: the ablation
    # would then train LoRA at the ranks it was given, and a sweep would label that "found".
    if s.get("method") not in ALLOCATING:
        raise ConfigError(f"method.rank_pattern_from: {run_dir} trained method={s.get('method')}, whose ranks "
                          f"are fixed; give a run of an allocating method ({', '.join(ALLOCATING)})")
    return {k: int(v) for k, v in s["final_ranks"].items()}


def check_ablation(cfg: RunConfig) -> None:
    """Refuse an ablation whose required setting is missing, before anything is built."""
    # conf/ablation/lora_on_found_ranks.yaml marks the key ???, but the schema's None survives
    # composition: without this the run trains uniform-rank LoRA labelled "found ranks".
    if cfg.ablation == "lora_on_found_ranks" and not cfg.method.rank_pattern_from:
        raise ConfigError("ablation=lora_on_found_ranks needs method.rank_pattern_from=<an AdaLoRA run folder>")


def build(cfg: RunConfig, model: PooledClassifier, n_train: int, world_size: int = 1) -> Built:
    m = cfg.method
    check_ablation(cfg)
    total = derive_total_steps(n_train, cfg, world_size)
    backbone = model.backbone
    if cfg.model.quantize == "nf4":
        try:
            from adalora.quant import quantize_model
        except ImportError:
            raise ConfigError("model.quantize=nf4 needs adalora/quant.py (adalora.quantize_model)")
        # Every linear of the encoder (adapted or not) goes to NF4; the head is outside the
        # backbone and stays full precision (skip is belt and braces for custom backbones), as
        # does a decoder's output layer (lm_head, tied to the embeddings), as QLoRA keeps it.
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        quantized = quantize_model(backbone, targets=None, skip=[HEAD, "lm_head"],
                                   compute_dtype=compute)
    else:
        quantized = []
    out = Built(model, {}, None, None, None, total, quantized=quantized)
    if m.name in ("full", "head"):
        for p in model.parameters():
            p.requires_grad_(m.name == "full")
        for p in model.classifier.parameters():
            p.requires_grad_(True)
        return out
    if m.name.startswith("peft_"):
        from .peft_methods import build_peft     # imports peft only for these methods
        return build_peft(cfg, model, out, n_train)

    rank_pattern = dict(m.rank_pattern)
    if m.rank_pattern_from:
        rank_pattern.update(read_found_ranks(m.rank_pattern_from))

    targets = method_targets(m.targets, m.target_regex, backbone)

    def adapter_cfg(init_rank: int):
        return m.adapter_config(targets, init_rank, rank_pattern)
    # Budget matching, in parameters (experiments/budget.py). Only a matched LoRA needs the
    # shapes before injecting (its rank depends on them); everything else reads them after.
    s = cfg.schedule
    target_rank, matched_r, init_rank = s.target_rank, None, m.init_rank
    matched = cfg.budget.match == "matched" and not rank_pattern
    from_lora = m.prunes and cfg.budget.match == "from_lora"
    if from_lora and s.target_total is not None:
        # target_total would win in the schedule and the LoRA budget would only be a label
        raise ConfigError("budget=from_lora sets the target from LoRA's rank; drop schedule.target_total")
    try:
        if matched and m.name == "lora":
            shapes = B.adapted_shapes(backbone, adapter_cfg(1))
            lora_target, _ = B.target_budget(shapes, target_rank, s.target_total, s.budget_unit)
            init_rank = B.matched_lora_rank(shapes, lora_target)
        if m.name == "elalora":
            init_rank = start_rank(cfg)      # ElaLoRA grows from below the target
        acfg = adapter_cfg(init_rank)
        if m.name == "elalora" and m.scale is None:
            # α / r0 as AdaLoRA's adapters, not α / start rank: the update scales alike
            acfg = dataclasses.replace(acfg, scale_rank=float(m.init_rank))
        out.adapters = adalora.inject(backbone, acfg)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0])
    out.adapter_cfg = acfg
    shapes = dict(adalora.adapter_shapes(out.adapters))
    if from_lora:
        matched_r = cfg.budget.lora_rank
        target_rank = B.target_rank_from_lora(shapes, matched_r, m.init_rank)
    # Only a pruning method or a matched run has a target to record (and a LoRA run may leave
    # the schedule's target unset).
    target_params, avg_rank = None, None
    if m.prunes or matched:
        target_params, avg_rank = B.target_budget(shapes, target_rank, s.target_total, s.budget_unit)
    if matched:
        matched_r = B.matched_lora_rank(shapes, target_params)
    if m.name == "lora":
        out.lora_rank = init_rank
        lora_p = sum(a.A.numel() + a.B.numel() for a in out.adapters.values())
    else:
        lora_p = None if matched_r is None else B.lora_params(shapes, matched_r)
    out.budget = {"target_params": target_params if (m.prunes or matched_r) else None,
                  "matched_lora_rank": matched_r, "lora_params": lora_p}
    if m.scale_rule in ("alpha_over_target", "uniform"):
        # One shared rank in every adapter's scale: AdaLoRA's target (its update then scales
        # like the budget-matched LoRA's), or a rank pattern's mean rank (its target, for ranks
        # AdaLoRA found), so the pattern changes where the rank goes and not the step size.
        n = len(out.adapters)
        shared = avg_rank if m.prunes else sum(a.rank for a in out.adapters.values()) / n
        if not shared > 0:
            raise ConfigError(f"method.scale={m.scale}: the shared rank is {shared:g}; use a "
                              "positive target or rank pattern")
        shared_cfg = dataclasses.replace(acfg, scale_rank=float(shared))
        for a in out.adapters.values():
            a.scaling = scaling(shared_cfg, a.r0 if isinstance(a, adalora.SVDLinear) else a.rank)
    for p in model.parameters():
        p.requires_grad_(False)
    adalora.mark_only_adapters_trainable(model, extra=(HEAD,))

    if m.prunes:
        ti, tf = s.warmups(total)
        try:
            out.schedule_cfg = adalora.ScheduleConfig(
                target_rank=target_rank, target_total=s.target_total, total_steps=total,
                init_warmup=ti, final_warmup=tf, mask_interval=s.mask_interval, shape=s.shape)
            out.allocator = make_allocator(cfg, out.adapters, out.schedule_cfg)
        except ConfigError:
            raise                       # already names its setting
        except ValueError as e:
            raise ConfigError(f"impossible schedule (total_steps={total} derived from "
                              f"{n_train} examples): {str(e).splitlines()[0]}")
        out.init_warmup, out.final_warmup, out.target_rank = ti, tf, avg_rank
    return out


def param_groups(cfg: RunConfig, model: PooledClassifier) -> List[dict]:
    """Adapters (or the backbone, for full fine-tuning) at trainer.lr; the fresh head at the
    larger trainer.head_lr; no weight decay on the head."""
    head = [p for p in model.classifier.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": body, "lr": cfg.trainer.lr, "weight_decay": cfg.trainer.weight_decay,
               "name": "body"}] if body else []
    groups.append({"params": head, "lr": cfg.trainer.head_lr, "weight_decay": 0.0,
                   "name": "head"})
    return groups


def count_params(model: PooledClassifier, adapters: Dict[str, nn.Module], allocator) -> dict:
    adapter = sum(p.numel() for a in adapters.values() for p in
                  ([a.P, a.lam, a.Q] if isinstance(a, adalora.SVDLinear) else [a.A, a.B]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = allocator.params_kept() if allocator is not None else adapter
    adapter_ids = {id(p) for p in adalora.adapter_parameters(adapters)}
    base = sum(p.numel() for p in model.backbone.parameters() if id(p) not in adapter_ids)
    # NF4 weights are packed buffers, not parameters: count their logical elements.
    base += sum(m.in_features * m.out_features for m in model.backbone.modules()
                if getattr(m, "quantized", False))
    return {"adapter": adapter, "adapter_kept": kept, "trainable": trainable, "base": base}
