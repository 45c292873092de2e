"""method=peft_adalora / method=peft_lora: Hugging Face peft's own adapters behind our interfaces,
so a study compares the two implementations on the same task, budget, seeds and loop.

peft injects its layers into ``model.backbone``; each one is then wrapped in a thin *view* that
is an ``adalora.SVDLinear`` (``P = lora_B``, ``lam = lora_E``, ``Q = lora_A``, the same Parameter
objects) or an ``adalora.LoRALinear`` (``A = lora_A.weight``, ``B = lora_B.weight``) whose
``forward`` is peft's. So, with the loop and runner unchanged:

- ``adalora.orthogonality_penalty(adapters)`` is peft's regularizer: peft sums
  ``‖A Aᵀ − I‖_F`` and ``‖Bᵀ B − I‖_F`` over every lora_A/lora_B and divides by their count, which
  is our reference form. peft's own term is switched off (``orth_reg_weight=0``): it lives in
  ``AdaLoraModel.forward`` and only fires when the model returns a loss, which ours never does.
- the views sit at the encoder's dotted names, so ranks, shapes, parameter counts, checkpoints
  and ``adapters.safetensors`` use the names of our runs (the analysis correlates them).
- ``PeftAdaLoRAAllocator`` calls peft's ``AdaLoraModel.update_and_allocate(step)`` verbatim and
  only *observes* it to produce our AllocationRecords.

peft's parameters are named ``<module>.inner.lora_A.default`` etc. inside the backbone.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

import adalora
from adalora.allocator import AllocationRecord

from . import budget as B
from .config import ConfigError, RunConfig
from .model import HEAD, method_targets

ADAPTER = "default"          # peft's adapter name; one trainable adapter per model


def require_peft(method: str):
    try:
        import peft
    except ImportError:
        raise ConfigError(f"method={method} needs Hugging Face peft: pip install peft") from None
    return peft


# ---- views: our adapter interface over peft's layers ---------------------------------------
class _PeftView:
    """What both views share: peft's layer (``inner``) does the forward, the delta and merging."""

    base = property(lambda self: self.inner.get_base_layer())
    merged = property(lambda self: self.inner.merged)

    def forward(self, x, *args, **kwargs):
        return self.inner(x, *args, **kwargs)

    def delta_weight(self) -> torch.Tensor:
        return self.inner.get_delta_weight(ADAPTER)

    def merge(self) -> None:
        self.inner.merge()

    def unmerge(self) -> None:
        if self.inner.merged:
            self.inner.unmerge()

    # load_adapters sets the saved scale after the factors: peft's forward must use it too. Only
    # a different value is written through, so the same config reproduces peft's float exactly.
    @property
    def scaling(self) -> float:
        return self._scaling

    @scaling.setter
    def scaling(self, value: float) -> None:
        if hasattr(self, "_scaling") and float(value) != self._scaling:
            self.inner.scaling[ADAPTER] = float(value) * self._peft_divisor()
        self._scaling = float(value)

    def _peft_divisor(self) -> float:
        return 1.0

    @property
    def drop(self) -> Optional[nn.Module]:
        """peft's dropout in front of the adapter (None when off), as ``AdapterLayer.drop``."""
        d = self.inner.lora_dropout[ADAPTER]
        return d if isinstance(d, nn.Dropout) else None

    def _check_factor_names(self, factors: dict) -> None:
        unknown = [n for n in factors if n not in self._FACTORS]
        if unknown:                                    # before any factor changes
            raise ValueError(f"{type(self).__name__}.set_factors({unknown[0]}=...): no such factor; "
                             f"name one of {', '.join(self._FACTORS)}")

    @staticmethod
    def _like(value: torch.Tensor, old: torch.Tensor) -> nn.Parameter:
        """``value`` as a new Parameter in ``old``'s device, dtype and ``requires_grad``, never the
        caller's memory (as ``AdapterLayer.set_factors``)."""
        return nn.Parameter(value.detach().to(device=old.device, dtype=old.dtype).clone(),
                            requires_grad=old.requires_grad)


class PeftSVDView(_PeftView, adalora.SVDLinear):
    """One peft AdaLoRA ``SVDLinear`` seen as ours: ``P = lora_B (d_out, r0)``, ``lam = lora_E (r0, 1)``
    (peft's shape), ``Q = lora_A (r0, d_in)``. ``rank_mask`` mirrors peft's ``rank_pattern``; the
    allocator keeps it current. Forward, merge and unmerge are peft's."""

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)      # not SVDLinear.__init__: the parameters are peft's
        self.inner = inner
        self.out_features, self.in_features = inner.out_features, inner.in_features
        self.r0 = int(inner.r[ADAPTER])
        # peft's forward: ... * scaling / (ranknum + 1e-5), ranknum = r0 for the whole run
        self.scaling = float(inner.scaling[ADAPTER]) / self._peft_divisor()
        self.register_buffer("rank_mask", torch.ones(self.r0, dtype=torch.bool,
                                                     device=inner.lora_E[ADAPTER].device))

    _FACTORS = {"P": "lora_B", "lam": "lora_E", "Q": "lora_A"}
    P = property(lambda self: self.inner.lora_B[ADAPTER])
    lam = property(lambda self: self.inner.lora_E[ADAPTER])
    Q = property(lambda self: self.inner.lora_A[ADAPTER])

    @property
    def rank(self) -> int:
        return self.inner.lora_E[ADAPTER].shape[0]

    def _peft_divisor(self) -> float:
        return float(self.inner.ranknum[ADAPTER]) + 1e-5

    @torch.no_grad()
    def set_factors(self, **factors: torch.Tensor) -> None:
        """Replace ``P``, ``lam``, ``Q`` (peft's ``lora_B``, ``lora_E``, ``lora_A``) by name, possibly
        at another rank (``load_adapters`` hands the kept triplets): new Parameters in peft's own
        dicts, so peft's forward uses them. ``lam`` takes peft's ``(r, 1)`` shape; ``ranknum``
        stays ``r0``, so the scale does not change (as ours after ``resize``)."""
        self._check_factor_names(factors)
        for name, value in factors.items():
            store = getattr(self.inner, self._FACTORS[name])
            store[ADAPTER] = self._like(value.reshape(-1, 1) if name == "lam" else value, store[ADAPTER])

    def resize(self, keep, optimizer=None):
        raise RuntimeError("peft AdaLoRA adapters are masked, not resized: "
                           "compact() is refused for method=peft_adalora")


class PeftLoRAView(_PeftView, adalora.LoRALinear):
    """One peft LoRA ``Linear`` seen as ours: ``A = lora_A.weight (r, d_in)``, ``B = lora_B.weight (d_out, r)``."""

    def __init__(self, inner: nn.Module):
        nn.Module.__init__(self)
        self.inner = inner
        self.out_features, self.in_features = inner.out_features, inner.in_features
        self.scaling = float(inner.scaling[ADAPTER])

    _FACTORS = {"A": "lora_A", "B": "lora_B"}
    A = property(lambda self: self.inner.lora_A[ADAPTER].weight)
    B = property(lambda self: self.inner.lora_B[ADAPTER].weight)

    @torch.no_grad()
    def set_factors(self, **factors: torch.Tensor) -> None:
        """Replace ``A``, ``B`` (the weights of peft's ``lora_A``, ``lora_B`` Linears) by name,
        possibly at another rank (``load_adapters`` then sets the saved scale)."""
        self._check_factor_names(factors)
        for name, value in factors.items():
            lin = getattr(self.inner, self._FACTORS[name])[ADAPTER]
            lin.weight = self._like(value, lin.weight)
            lin.out_features, lin.in_features = lin.weight.shape
        self.inner.r[ADAPTER] = self.A.shape[0]


def wrap_peft_layers(backbone: nn.Module, names: List[str], view_cls) -> Dict[str, nn.Module]:
    """Put a view around the peft layer at each of ``names`` (our dotted names); refuse any
    difference between the modules peft adapted and those our inject would adapt."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    adapted = [n for n, mod in backbone.named_modules() if isinstance(mod, BaseTunerLayer)]
    if adapted != names:
        extra, missing = sorted(set(adapted) - set(names)), sorted(set(names) - set(adapted))
        raise ConfigError(f"peft adapted other modules than ours (extra {extra[:3]}, missing "
                          f"{missing[:3]}): use plain module-name suffixes in method.targets")
    views = {}
    for n in names:
        parent, _, child = n.rpartition(".")
        view = view_cls(backbone.get_submodule(n))
        setattr(backbone.get_submodule(parent) if parent else backbone, child, view)
        views[n] = view
    return views


def to_adalora_layers(backbone: nn.Module) -> Dict[str, nn.Module]:
    """Replace each view in ``backbone`` by the adalora layer with the same update on the same
    base (an ``SVDLinear`` keeps the view's mask, ``r0`` and scale) and return them: for writers
    that read our layers' factors, such as ``adalora.save_peft``, whose λ is ``(r,)`` where
    peft's ``lora_E`` is ``(r, 1)``."""
    out = {}
    for name, view in adalora.find_adapters(backbone).items():
        if not isinstance(view, _PeftView):
            continue
        p = view.drop.p if view.drop is not None else 0.0
        if isinstance(view, PeftSVDView):
            layer = adalora.SVDLinear(view.base, view.rank, alpha=1.0, dropout=p)
            layer.set_factors(P=view.P.detach(), lam=view.lam.detach().reshape(-1), Q=view.Q.detach())
            layer.rank_mask = view.rank_mask.clone()
            layer.r0 = view.r0
        else:
            layer = adalora.LoRALinear(view.base, view.rank, alpha=1.0, dropout=p)
            layer.set_factors(A=view.A.detach(), B=view.B.detach())
        layer.scaling = view.scaling
        layer.train(view.training)
        parent, _, child = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, child, layer)
        out[name] = layer
    return out


# ---- the allocator: peft's update_and_allocate behind our interface -------------------------
class PeftAdaLoRAAllocator(adalora.Allocator):
    """Adapts ``peft.AdaLoraModel.update_and_allocate(step)`` to the loop's allocator calls.

    peft updates its importance EMAs and masks in one call after ``optimizer.step()``, which is
    where the loop calls ``update_importance`` then ``mask_to_budget`` back to back: so
    ``update_importance`` only notes whether the gradients were finite and ``mask_to_budget``
    makes peft's call. Records: budget from peft's ``budget_schedule``, ranks from its
    ``rank_pattern``, threshold recomputed from its scores as its ``kthvalue`` does.
    """
    score_before_step = False

    def __init__(self, tuner, views: Dict[str, PeftSVDView]):
        self.tuner, self.views, self.names = tuner, views, list(views)
        self.layers = list(views.values())       # as RankAllocator.layers (DDP mask checksum)
        self.pcfg = tuner.peft_config[ADAPTER]
        self.ra = tuner.rankallocator
        self.initial_budget, self.target_budget = int(self.ra.init_bgt), int(self.ra.target_bgt)
        self.total_steps = self.pcfg.total_step
        self.final_step = self.pcfg.total_step - self.pcfg.tfinal
        self.final_done = False
        self.final_scores: Optional[List[torch.Tensor]] = None
        self._finite, self._moved = True, True
        # peft keys everything by parameter name: map each view to its lora_A/E/B names.
        ids = {id(p): n for n, p in tuner.model.named_parameters()}
        self.pnames = {n: (ids[id(v.Q)], ids[id(v.lam)], ids[id(v.P)]) for n, v in views.items()}

    # -- the two per-step calls ------------------------------------------------------------------
    def update_importance(self, step: int, grads_finite: Optional[bool] = None) -> bool:
        self._finite = grads_finite is not False
        return self._finite and step < self.final_step

    @torch.no_grad()
    def mask_to_budget(self, step: int) -> Optional[AllocationRecord]:
        if step > self.final_step:
            self.tuner.update_and_allocate(step)       # peft re-applies its frozen rank_pattern
            return None
        if not self._moved:
            self._to_param_devices()
        budget, mask_ind = self.ra.budget_schedule(step)
        final = step == self.final_step
        if final:                  # peft scores nothing at this step and frees its EMAs after it
            self.final_scores = [s.clone() for s in self._scores()]
        if self._finite or final:
            self.tuner.update_and_allocate(step)
        elif mask_ind:
            # DEVIATION: non-finite gradients would turn peft's EMAs into NaN; as our allocator
            # does, skip the importance update but keep the mask step.
            self.pcfg.rank_pattern = self.ra.mask_to_budget(self.tuner.model, budget)
        if not (mask_ind or final):
            return None
        scores = self.final_scores if final else self._scores()
        self._sync_masks()
        k = self.initial_budget - budget
        threshold = float(torch.kthvalue(torch.cat(scores).float().cpu(), k)[0]) if k >= 1 else None
        self.final_done = self.final_done or final
        return AllocationRecord.of(step, self.ranks(), self.views, budget=int(budget), threshold=threshold)

    def _to_param_devices(self) -> None:
        params = dict(self.tuner.model.named_parameters())
        for d in (self.ra.ipt, self.ra.exp_avg_ipt, self.ra.exp_avg_unc):
            for k, v in d.items():
                d[k] = v.to(params[k].device)
        self._moved = True

    def _scores(self) -> List[torch.Tensor]:
        """Triplet scores ``(r0,)`` per module from peft's EMAs, combined as its ``mask_to_budget``
        does: ``s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)``."""
        if not self.ra.exp_avg_ipt:
            return [torch.zeros(v.r0) for v in self.views.values()]
        el = self.ra._element_score
        return [el(e).view(-1) + el(a).mean(dim=1) + el(b).mean(dim=0)
                for a, e, b in self.pnames.values()]

    def _sync_masks(self) -> None:
        rp = self.pcfg.rank_pattern
        for n, v in self.views.items():
            v.rank_mask.copy_(torch.tensor(rp[self.pnames[n][1]], dtype=torch.bool))

    # -- read-outs --------------------------------------------------------------------------------
    def ranks(self) -> Dict[str, int]:
        return {n: int(v.rank_mask.sum()) for n, v in self.views.items()}

    def params_kept(self) -> int:
        return AllocationRecord.of(0, self.ranks(), self.views).params_kept

    def initial_record(self) -> AllocationRecord:
        return AllocationRecord.of(0, self.ranks(), self.views)

    def triplet_scores(self) -> Dict[str, torch.Tensor]:
        scores = self.final_scores if self.final_scores is not None else self._scores()
        return dict(zip(self.names, scores))

    def finalize(self) -> AllocationRecord:
        if not self.final_done:
            raise RuntimeError(f"peft AdaLoRA never reached its final allocation (step "
                               f"{self.final_step} = total_step - tfinal)")
        return AllocationRecord.of(self.total_steps, self.ranks(), self.views)

    def compact(self, optimizer=None) -> None:
        raise RuntimeError("peft AdaLoRA masks, it does not compact: set trainer.compact=false")

    # -- checkpoint -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()}
        return {"names": list(self.names), "final_done": self.final_done,
                "final_scores": self.final_scores, "rank_pattern": self.pcfg.rank_pattern,
                "ipt": clone(self.ra.ipt), "exp_avg_ipt": clone(self.ra.exp_avg_ipt),
                "exp_avg_unc": clone(self.ra.exp_avg_unc)}

    def load_state_dict(self, sd: dict) -> None:
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: use the saved run's targets")
        # The loop loads this before moving the model to its device: _to_param_devices, later.
        self.ra.ipt, self.ra.exp_avg_ipt = dict(sd["ipt"]), dict(sd["exp_avg_ipt"])
        self.ra.exp_avg_unc = dict(sd["exp_avg_unc"])
        self._moved = False
        self.pcfg.rank_pattern = sd["rank_pattern"]
        self.final_done = bool(sd["final_done"])
        self.final_scores = None if sd["final_scores"] is None else [s.clone() for s in sd["final_scores"]]


# ---- build ---------------------------------------------------------------------------------
def _refuse_unsupported(cfg: RunConfig) -> None:
    m, s, t = cfg.method, cfg.schedule, cfg.trainer
    bad = [(m.rank_pattern or m.rank_pattern_from, "method.rank_pattern / rank_pattern_from"),
           (cfg.model.quantize != "none", "model.quantize=nf4"),
           (t.compact, "trainer.compact=true"),
           (m.scale_rule not in ("alpha_over_r0", "per_module", "rslora"), f"method.scale={m.scale}")]
    if m.name == "peft_adalora":
        bad += [(s.shape != "cubic", f"schedule.shape={s.shape} (peft has the cubic schedule only)"),
                (s.score != "sensitivity_uncertainty", f"schedule.score={s.score}"),
                (s.score_before_step, "schedule.score_before_step=true"),
                (s.target_total is not None, "schedule.target_total (peft takes an average target_r)"),
                (m.rslora, "method.rslora=true")]
    for cond, what in bad:
        if cond:
            raise ConfigError(f"method={m.name} does not support {what}; use method="
                              f"{m.name[len('peft_'):]} for that")


def build_peft(cfg: RunConfig, model: nn.Module, out, n_train: int):
    """Fill ``out`` (a build.Built) for method=peft_adalora or peft_lora."""
    m, s = cfg.method, cfg.schedule
    require_peft(m.name)
    from peft import AdaLoraConfig, LoraConfig
    from peft.tuners.adalora import AdaLoraModel
    from peft.tuners.lora import LoraModel
    _refuse_unsupported(cfg)
    backbone = model.backbone
    suffixes = method_targets(m.targets, m.target_regex, backbone)
    # Our inject on a throwaway copy: the names (in module order) and shapes of our runs.
    try:
        shapes = B.adapted_shapes(backbone, adalora.AdapterConfig(
            method="lora", targets=suffixes, target_regex=m.target_regex, init_rank=1,
            alpha=m.alpha))
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0])
    names = list(shapes)
    targets = m.target_regex if m.target_regex else suffixes
    target_rank, matched_r = s.target_rank, None

    if m.name == "peft_lora":
        r, target_params = m.init_rank, None
        if cfg.budget.match == "matched":
            # the target AdaLoRA's allocator keeps, priced as build prices it
            target_params = B.target_budget(shapes, target_rank, s.target_total, s.budget_unit)[0]
            matched_r = r = B.matched_lora_rank(shapes, target_params)
        pcfg = LoraConfig(r=r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=targets,
                          use_rslora=m.rslora, bias="none")
        tuner = LoraModel(backbone, pcfg, ADAPTER)
        out.adapters = wrap_peft_layers(backbone, names, PeftLoRAView)
        out.lora_rank = r
        out.budget = {"target_params": target_params, "matched_lora_rank": matched_r,
                      "lora_params": B.lora_params(shapes, r)}
    else:
        if cfg.budget.match == "from_lora":
            matched_r = cfg.budget.lora_rank
            target_rank = B.target_rank_from_lora(shapes, matched_r, m.init_rank)
        # peft's target_r is an int (its budget is target_r x n_modules): round and record it.
        target_r = int(round(target_rank))
        if not 1 <= target_r < m.init_rank:
            raise ConfigError(f"method=peft_adalora: target_rank {target_rank:g} rounds to {target_r}; "
                              f"peft needs an integer in [1, method.init_rank={m.init_rank})")
        ti, tf = s.warmups(out.total_steps)
        try:
            pcfg = AdaLoraConfig(init_r=m.init_rank, target_r=target_r, tinit=ti, tfinal=tf,
                                 deltaT=s.mask_interval, beta1=s.beta1, beta2=s.beta2,
                                 total_step=out.total_steps, lora_alpha=m.alpha,
                                 lora_dropout=m.dropout, target_modules=targets,
                                 orth_reg_weight=0.0)   # the loop adds it: see the module docstring
        except ValueError as e:
            raise ConfigError(f"impossible schedule (total_steps={out.total_steps} derived from "
                              f"{n_train} examples): {str(e).splitlines()[0]}")
        tuner = AdaLoraModel(backbone, pcfg, ADAPTER)
        out.adapters = wrap_peft_layers(backbone, names, PeftSVDView)
        out.allocator = PeftAdaLoRAAllocator(tuner, out.adapters)
        out.init_warmup, out.final_warmup, out.target_rank = ti, tf, float(target_r)
        target_params = B.adalora_target_params(shapes, target_r)
        if cfg.budget.match == "matched":
            matched_r = B.matched_lora_rank(shapes, target_params)
        out.budget = {"target_params": target_params, "matched_lora_rank": matched_r,
                      "lora_params": None if matched_r is None else B.lora_params(shapes, matched_r)}
    for p in model.parameters():
        p.requires_grad_(False)
    for v in out.adapters.values():
        for p in ([v.P, v.lam, v.Q] if isinstance(v, PeftSVDView) else [v.A, v.B]):
            p.requires_grad_(True)
    for p in getattr(model, HEAD).parameters():
        p.requires_grad_(True)
    return out
