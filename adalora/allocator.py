"""Rank allocator: global top-``b(t)`` pruning of singular values on the budget schedule (paper Eq. 8).

The training loop calls, once per optimizer step (``step`` counts optimizer steps, never
micro-batches) and in this order (adalora/README.md)::

    (loss + γ·R).backward()                     # or orthogonality_grad_(adapters, γ) after backward
    [scaler.unscale_(opt); clip_grad_norm_(...)]
    opt.step(); sched.step()
    allocator.update_importance(step)           # needs the .grad of P, lam, Q: before zero_grad
    record = allocator.mask_to_budget(step)     # None off mask steps
    opt.zero_grad(set_to_none=True)

and ``allocator.finalize()`` at the end, which raises if the final allocation never happened
(the silent no-op users of other libraries hit when the allocation call is forgotten).
"""
from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from . import accounting, alloc_kernels, gate_bank, schedule
from .config import ScheduleConfig, ScoreConfig
from .importance import ImportanceScorer
from .layers import SVDLinear, fast_param


@dataclass(frozen=True)
class AllocationRecord:
    step: int
    budget: int                  # singular values kept over all adapters (exactly this many)
    threshold: float | None      # highest pruned triplet score; None when nothing was pruned
    ranks: dict[str, int]        # {module name: kept singular values}
    params_kept: int             # Σ_k rank_k · (d_in + d_out + 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def of(cls, step: int, ranks: dict[str, int], layers: dict, budget: int | None = None,
           threshold: float | None = None) -> "AllocationRecord":
        """The record of ``ranks`` over ``layers`` ({name: layer with in/out_features}); the
        budget defaults to the ranks' sum, ``params_kept`` counts d_in + d_out + 1 per singular value."""
        params = sum(ranks[n] * (layer.in_features + layer.out_features + 1) for n, layer in layers.items())
        return cls(step=step, budget=sum(ranks.values()) if budget is None else budget,
                   threshold=threshold, ranks=ranks, params_kept=params)


class _PendingRecord(AllocationRecord):
    """An ``AllocationRecord`` whose ranks and threshold are still device tensors, so that a mask
    step makes no host sync (a loop that drops the record never waits on the GPU); the first
    read of ``ranks``, ``threshold`` or ``params_kept`` (``to_dict``, ``==``, ``repr``) makes the
    one transfer and fills the fields in."""

    def __init__(self, step: int, budget: int, threshold=None, ranks=None, params_kept=None, *,
                 pending: tuple | None = None):
        # pending = (counts (n,), threshold (1,) or None, layers): the device-side form. Without
        # it the fields are given, as dataclasses.replace passes them.
        if pending is None:
            super().__init__(step, budget, threshold, ranks, params_kept)
            return
        object.__setattr__(self, "step", step)
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "_pending", pending)

    def __getattr__(self, name: str):
        pending = self.__dict__.get("_pending")
        if pending is None or name not in ("ranks", "threshold", "params_kept"):
            raise AttributeError(name)
        counts, threshold, layers = pending
        done = AllocationRecord.of(self.step, dict(zip(layers, counts.tolist())), layers, self.budget,
                                   None if threshold is None else float(threshold))
        for f in ("ranks", "threshold", "params_kept"):
            object.__setattr__(self, f, getattr(done, f))
        del self.__dict__["_pending"]
        return getattr(self, name)

    def __eq__(self, other) -> bool:
        return isinstance(other, AllocationRecord) and self.to_dict() == other.to_dict()

    def __reduce__(self):
        # pickle / deepcopy give the plain record (no device tensors, no reference to the model)
        return (AllocationRecord, (self.step, self.budget, self.threshold, self.ranks, self.params_kept))


@dataclass(frozen=True)
class BudgetRecord(AllocationRecord):
    """An allocation with its budget accounting: ``target`` and ``gap = kept − target`` in ``unit``
    (``values``: singular values; ``params``: d_in + d_out + 1 each). A method that meets its budget
    exactly records gap 0; a threshold method records what it kept."""
    unit: str = "values"
    target: int | None = None
    gap: int | None = None


class Allocator(abc.ABC):
    """The allocator protocol: what the training loop, ``adalora.hf``, checkpoints and
    ``ranks.jsonl`` call, for every allocation family (``RankAllocator``, ``SoRAAllocator``,
    ``ElaLoRAAllocator``, ``EVAAllocator``, ``TruncateAllocator``).

    Per optimizer step, after ``opt.step()`` and before ``zero_grad()``: ``update_importance(step)``
    then ``mask_to_budget(step)`` (a record or None). Before training: ``bind_optimizer(opt)``
    (methods that grow or replace factors swap them, with their state, into it) and, where
    ``needs_data``, ``init_from_data(forward, batches)`` before the optimizer exists (one-shot
    methods resize adapters). After training: ``finalize()``. A loop refreshes whatever holds the
    adapter parameters (its parameter list, a DDP or compiled wrapper) after a record when
    ``reshapes`` is true. Each family implements the six abstract methods; the rest have defaults.
    """
    score_before_step: bool = False
    needs_data: bool = False         # init_from_data before training (one-shot methods)
    reshapes: bool = False           # mask_to_budget may replace adapter parameters
    final_done: bool = False
    initial_budget: int = 0          # singular values at the start, over all adapters
    target_budget: int = 0           # b_T in singular values (or the method's unit)

    def update_importance(self, step: int, grads_finite: bool | None = None) -> bool:
        return False

    @abc.abstractmethod
    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        """At a mask step, mask (or reshape) the adapters to the step's budget and return the
        record; at other steps, None."""
        raise NotImplementedError  # abstract: every family provides it

    @abc.abstractmethod
    def ranks(self) -> dict[str, int]:
        """Kept singular values per adapter name."""
        raise NotImplementedError  # abstract: every family provides it

    @abc.abstractmethod
    def finalize(self) -> AllocationRecord:
        """The final allocation's record, once the schedule has reached its last step."""
        raise NotImplementedError  # abstract: every family provides it

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume bitwise (tensors and plain values only)."""
        raise NotImplementedError  # abstract: every family provides it

    @abc.abstractmethod
    def load_state_dict(self, sd: dict) -> None:
        """Restore a ``state_dict()``, resizing adapters where the method reshapes them."""
        raise NotImplementedError  # abstract: every family provides it

    @abc.abstractmethod
    def initial_record(self) -> AllocationRecord:
        """The allocation before training (step 0), for ``ranks.jsonl``."""
        raise NotImplementedError  # abstract: every family provides it

    def params_kept(self) -> int:
        return AllocationRecord.of(0, self.ranks(), self.adapters).params_kept

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Final per-module scores where the method has them (else empty)."""
        return {}

    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically drop pruned singular values (no-op where nothing is masked)."""

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer whose parameters a growing or truncating method replaces (no-op here)."""

    def init_from_data(self, forward: Callable[[dict], object], batches: Iterable[dict]) -> AllocationRecord:
        raise NotImplementedError(f"{type(self).__name__} allocates during training, not from data")


class BudgetAllocator(Allocator):
    """The families that price their records in a budget unit (adalora/accounting.py): SoRA,
    ElaLoRA, EVA and svd_truncate. Each sets ``names``, ``layers``, ``unit``, ``schedule``, the
    two budgets and its ``name``; an adapter's rank is what it keeps, and ``unfinished`` is what
    ``finalize`` says before the method's last allocation (``{name}`` and ``{final_step}`` filled in)."""
    unfinished = ("{name} never reached its final step {final_step}: call mask_to_budget(step) once per "
                  "optimizer step up to total_steps")
    name = "the allocator"

    def ranks(self) -> dict[str, int]:
        return {n: int(layer.rank) for n, layer in zip(self.names, self.layers)}

    def initial_record(self) -> AllocationRecord:
        return accounting.budget_record(0, self.names, self.layers, self.unit, self.initial_budget)

    def finalize(self) -> AllocationRecord:
        if not self.final_done:
            raise RuntimeError(self.unfinished.format(name=self.name, final_step=self.schedule.final_step))
        return accounting.budget_record(self.schedule.total_steps, self.names, self.layers, self.unit,
                                        self.target_budget)


class RankAllocator(Allocator):
    """Scores every singular value of the SVD adapters and masks all but the global top ``b(t)``."""

    def __init__(self, adapters: dict, schedule_cfg: ScheduleConfig, score_cfg: ScoreConfig | None = None,
                 score_before_step: bool = False):
        self.names = [n for n, a in adapters.items() if isinstance(a, SVDLinear)]
        if not self.names:
            raise ValueError("RankAllocator needs SVD adapters: inject with AdapterConfig(method='adalora')")
        self.layers: list[SVDLinear] = [adapters[n] for n in self.names]
        self.adapters = {n: adapters[n] for n in self.names}     # the SVD adapters only
        self.schedule = schedule_cfg
        self.score_cfg = score_cfg or ScoreConfig()
        # Recorded for the loop and checkpoints; the ablation itself is where the loop calls us.
        # DEVIATION: the default order scores after opt.step() (|w_{t+1} · g_t|), as both reference
        # codes call their allocator, so results compare with theirs; the paper's Algorithm 1 scores
        # before the update (|w_t · g_t|). score_before_step=True marks a loop that does that.
        self.score_before_step = score_before_step
        self.initial_budget = sum(layer.r0 for layer in self.layers)
        self.target_budget = schedule.target_budget(schedule_cfg, len(self.layers))
        if self.target_budget >= self.initial_budget:
            raise ValueError(
                f"target budget {self.target_budget} >= initial budget {self.initial_budget} singular values: "
                "set ScheduleConfig.target_rank below AdapterConfig.init_rank (the paper uses init ≈ 1.5 × target)")
        self.scorer = ImportanceScorer(self.layers, self.score_cfg)
        self.final_done = False
        self.compacted = False
        self.final_scores: list[torch.Tensor] | None = None
        self._lam_masks: list[torch.Tensor] | None = None     # rank_mask cast to lam's dtype
        self._segment: tuple | None = None                    # (ranks, adapter id per singular value)
        self._tables: tuple | None = None                     # mask_on_device's (budgets, is mask step, arange)
        self._device_threshold: torch.Tensor | None = None    # mask_on_device's score at position b(t), (1,)
        self._bank_aligned: bool | None = None                # flat gates in this layer order (_lams)

    # -- the two per-step calls ------------------------------------------------------------------
    def update_importance(self, step: int, grads_finite: bool | None = None) -> bool:
        """Update the EMAs from the current gradients; a no-op from the final allocation on."""
        if step >= self.schedule.final_step or self.final_done:
            return False
        return self.scorer.update(grads_finite)

    @torch.no_grad()
    def mask_to_budget(self, step: int) -> AllocationRecord | None:
        """Allocate on mask steps (returns the record), re-apply the frozen mask in the final phase."""
        if self.final_done:
            self._apply_masks()          # Adam moments would revive a zeroed lam otherwise
            return None
        if step >= self.schedule.final_step:
            # ">=" so that a loop that never passes exactly T − t_f (a resumed run) still finalizes.
            record = self._allocate(step, self.target_budget)
            self.final_done = True
            self.final_scores = [s.detach().clone() for s in self.scorer.scores(step)]
            self.scorer.free()
            return record
        if schedule.is_mask_step(step, self.schedule):
            b = schedule.budget_at(step, self.schedule, self.initial_budget, self.target_budget)
            return self._allocate(step, b)
        return None

    def _allocate(self, step: int, budget: int) -> AllocationRecord:
        merged = [n for n, layer in zip(self.names, self.layers) if layer.merged]
        if merged:
            # lam's update sits in W0: a new mask would make unmerge subtract another ΔW
            raise ValueError(f"mask_to_budget({step}): adapters {merged} are merged into their base weights: "
                             "unmerge the model before training (adalora.unmerge)")
        if self.scorer.uses_grad and self.scorer.ibar is None and self.scorer.skipped == 0:
            # every score would be zero and the ties would keep the first adapters' singular values
            raise RuntimeError(f"mask_to_budget({step}): no importance was recorded yet: call "
                               "allocator.update_importance(step) after loss.backward() at every step")
        # (Σ r_k,) in layer order; fp64 when the model is (fp32 would tie scores it cannot tell apart).
        flat = self.scorer.flat_scores(step)
        # DEVIATION (from the reference codes, not the paper): exactly `budget` kept, the paper's
        # top-b(t); a stable descending sort breaks ties by adapter order then index. The reference
        # "score <= kth value" rule prunes every tie and so keeps fewer than b(t).
        order = torch.sort(flat, descending=True, stable=True).indices
        # index_fill_, not keep[...] = True: on CUDA that assignment copies True from the host,
        # a copy that waits for the device (the eager step would sync at every mask step)
        keep = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, order[:budget], True)
        threshold = _threshold(flat, order, budget)
        masks = self._masks()
        sizes = [m.shape[0] for m in masks]
        torch._foreach_copy_(masks, list(keep.split(sizes)))
        lams = self._lams()
        # Cached: the final phase re-applies these every step with one kernel.
        self._lam_masks = _like_lams(keep, lams)
        self._apply_masks(lams)
        return _PendingRecord(step, budget, pending=(self._counts(keep, tuple(sizes)), threshold, self.adapters))

    # -- the mask step with the step on the device (CUDA graphs) -------------------------------------------
    @torch.no_grad()
    def mask_on_device(self, step: torch.Tensor) -> None:
        """``mask_to_budget`` for the steps before the final allocation, with ``step`` a 0-d integer
        tensor on the adapters' device: no host sync and the same kernels at every step, so one
        captured CUDA graph of the whole step (forward, backward, ``opt.step()``,
        ``update_importance``, this, ``step += 1``) replays the warmup and budgeting phases.

        ``b(t)`` and "is ``t`` a mask step" are read from device tables of ``schedule.budget_at``
        and ``schedule.is_mask_step``; off mask steps the masks and ``lam`` stay as they are. The
        masks equal ``mask_to_budget``'s, step for step. No record is returned: ``mask_record(step)``
        gives it after a replay. From ``schedule.final_step`` on, call ``mask_to_budget``: the final
        allocation is a host event, and the frozen-mask step after it is itself capturable. A
        device cannot raise, so a ``step`` past the table reads its last entry: switching is the
        caller's job."""
        if self.final_done:
            raise RuntimeError("mask_on_device is for the steps before the final allocation; "
                               "call mask_to_budget(step) from schedule.final_step on")
        if self.score_cfg.kind.startswith("random"):
            raise ValueError(f"ScoreConfig.kind={self.score_cfg.kind!r} draws its scores on the host: "
                             "use mask_to_budget(step), or a gradient or magnitude score")
        flat = self.scorer.flat_scores()                                   # (n,) n = Σ r_k
        if self._tables is None or self._tables[2].numel() != flat.numel() or self._tables[0].device != flat.device:
            steps = range(self.schedule.final_step)
            budgets = [schedule.budget_at(t, self.schedule, self.initial_budget, self.target_budget) for t in steps]
            masking = [schedule.is_mask_step(t, self.schedule) for t in steps]
            self._tables = (torch.tensor(budgets, device=flat.device), torch.tensor(masking, device=flat.device),
                            torch.arange(flat.numel(), device=flat.device))
        budgets, masking, index = self._tables
        t = step.clamp(0, budgets.numel() - 1).view(1)     # (1,): indexing with a 0-d tensor would sync
        now = masking.index_select(0, t)                   # (1,)
        budget = budgets.index_select(0, t)                # (1,)
        # Position of each score in the stable descending order: "position < b" keeps exactly the
        # set mask_to_budget keeps (order[:b]), with a budget that lives on the device. And
        # mask_record's threshold: the score at position b(t), before the mask zeroes any lam
        # (magnitude scores read lam). Clamped: with nothing pruned it reads a kept score, unused.
        if alloc_kernels.ranks_by_counting(flat.numel()) and alloc_kernels.ready(
                flat, alloc_kernels.positions_signature(flat)):
            position, self._device_threshold = alloc_kernels.positions(flat, budget)   # one kernel, no sort
        else:
            order = torch.sort(flat, descending=True, stable=True).indices
            position = torch.empty_like(order).scatter_(0, order, index)
            self._device_threshold = flat.index_select(0, order.index_select(0, budget.clamp(max=flat.numel() - 1)))
        masks = self._masks()
        keep = torch.where(now, position < budget, torch.cat(masks))
        sizes = [m.shape[0] for m in masks]
        torch._foreach_copy_(masks, list(keep.split(sizes)))
        lams = self._lams()
        # all ones off mask steps: lam untouched
        torch._foreach_mul_(lams, _like_lams(keep | ~now, lams))
        self._lam_masks = None                             # the final phase recasts rank_mask

    @torch.no_grad()
    def mask_record(self, step: int) -> AllocationRecord:
        """The record ``mask_to_budget(step)`` returns, for a mask step taken by ``mask_on_device``
        (which returns none): call it after that step (after the graph's replay), before the next.
        The threshold is the one that step ranked by; the ranks are the masks it left."""
        if self._device_threshold is None:
            raise RuntimeError("mask_record(step) reads the last mask_on_device step: call that first")
        budget = schedule.budget_at(step, self.schedule, self.initial_budget, self.target_budget)
        # cloned: a replay overwrites the captured tensor in place, and a record may be read later
        threshold = self._device_threshold.clone() if budget < sum(layer.rank for layer in self.layers) else None
        return _PendingRecord(step, budget, pending=(self._counts(), threshold, self.adapters))

    def _lams(self) -> list[torch.Tensor]:
        """The gates in layer order: one tensor per adapter, or with flat gates whose bank holds
        these adapters in this order, the bank's one ``(Σ r_k,)`` parameter."""
        bank = gate_bank.bank_of(self.layers[0])
        if bank is not None:
            if self._bank_aligned is None:
                self._bank_aligned = len(bank.layers) == len(self.layers) and all(
                    a is b for a, b in zip(bank.layers, self.layers))
            if self._bank_aligned:
                return [bank.lam]
        return [fast_param(layer, "lam") for layer in self.layers]

    def _masks(self) -> list[torch.Tensor]:
        # _buffers, not getattr: per adapter and mask step, nn.Module.__getattr__ is host time
        return [layer._buffers["rank_mask"] for layer in self.layers]

    @torch.no_grad()      # in place on the lam leaves; _allocate is also called directly (tests)
    def _apply_masks(self, lams: list[torch.Tensor] | None = None) -> None:
        if self.compacted:
            return
        lams = lams or self._lams()
        if self._lam_masks is None:
            self._lam_masks = _like_lams(torch.cat(self._masks()), lams)
        torch._foreach_mul_(lams, self._lam_masks)

    # -- read-outs ---------------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        return dict(zip(self.names, self._counts().tolist()))             # one sync

    def _counts(self, masks: torch.Tensor | None = None, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
        """Kept singular values per adapter, on the device: ``(n_adapters,)``. A caller that holds
        the concatenated ``rank_mask`` and the ranks passes them."""
        if sizes is None:
            sizes = tuple(layer.rank for layer in self.layers)
        if masks is None:
            masks = torch.cat(self._masks())
        if min(sizes) == max(sizes):
            # every adapter at one rank (all of them before compaction): one row-sum kernel
            return masks.view(len(sizes), sizes[0]).sum(1)
        if self._segment is None or self._segment[0] != sizes or self._segment[1].device != masks.device:
            ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            self._segment = (sizes, ids.to(masks.device))
        counts = torch.zeros(len(sizes), dtype=torch.long, device=masks.device)
        return counts.index_add_(0, self._segment[1], masks.long())     # a few kernels, whatever N

    def params_kept(self) -> int:
        return AllocationRecord.of(0, self.ranks(), self.adapters).params_kept

    def initial_record(self) -> AllocationRecord:
        return AllocationRecord.of(0, self.ranks(), self.adapters)

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Scores ``S_k (r0_k,)`` per module: frozen at the final allocation, else the current ones."""
        scores = self.final_scores if self.final_scores is not None else self.scorer.scores()
        return dict(zip(self.names, scores))

    def finalize(self) -> AllocationRecord:
        """End-of-training check: the final allocation must have happened."""
        if not self.final_done:
            raise RuntimeError(
                f"AdaLoRA never reached its final allocation (step {self.schedule.final_step} = total_steps - "
                "final_warmup): call allocator.update_importance(step) and mask_to_budget(step) once per "
                "optimizer step with step counting optimizer steps, and set ScheduleConfig.total_steps to "
                "the number of optimizer steps actually run")
        return AllocationRecord.of(self.schedule.total_steps, self.ranks(), self.adapters)

    # -- compaction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def compact(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically shrink ``P, lam, Q`` to the kept rank after the final allocation.

        Optimizer state of those parameters (Adam/AdamW moments, SGD momentum) is sliced to
        match and the new parameters take the old ones' places in the param groups, so training
        continues exactly as with the masked full-size adapters, only cheaper.

        # DEVIATION: afterwards the orthogonality term covers only the kept singular vectors; the
        # reference keeps penalising the pruned columns of P and Q, which no longer affect the model.
        """
        if not self.final_done:
            raise RuntimeError("compact() before the final allocation: call it once mask_to_budget has "
                               "returned the final record (step >= total_steps - final_warmup)")
        if self.compacted:
            return
        for layer in self.layers:
            layer.resize(layer.rank_mask.nonzero().flatten(), optimizer)
        self.compacted = True

    # -- checkpointing ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"scorer": self.scorer.state_dict(), "final_done": self.final_done, "compacted": self.compacted,
                "masks": [layer.rank_mask.clone() for layer in self.layers],
                "final_scores": self.final_scores, "names": list(self.names)}

    def load_state_dict(self, sd: dict) -> None:
        self._check_state(sd)        # all of it first: a refused state must leave the model as it was
        if sd["compacted"] and not self.compacted:
            for layer, m in zip(self.layers, sd["masks"]):
                layer.resize(torch.arange(m.numel(), device=layer.lam.device))  # weights come from the model load
        for layer, m in zip(self.layers, sd["masks"]):
            layer.rank_mask.copy_(m)
        self._lam_masks = None
        self.scorer.load_state_dict(sd["scorer"])
        self.final_done, self.compacted = bool(sd["final_done"]), bool(sd["compacted"])
        self.final_scores = None if sd["final_scores"] is None else [s.clone() for s in sd["final_scores"]]

    def _check_state(self, sd: dict) -> None:
        """Raise if ``sd`` does not fit these adapters; changes nothing."""
        if list(sd["names"]) != self.names:
            raise ValueError("allocator state is for other adapters: inject the same targets as the saved run")
        masks = sd["masks"]
        if len(masks) != len(self.layers):
            raise ValueError(f"allocator state has {len(masks)} masks for {len(self.layers)} adapters: "
                             "load the allocator state into a model injected with the saved config")
        saved = [int(m.numel()) for m in masks]
        now = [layer.rank for layer in self.layers]
        if sd["compacted"] and not self.compacted:
            # the resize keeps each adapter's first ranks: the saved ones must fit the current ones
            bad = {n: (s, r) for n, s, r in zip(self.names, saved, now) if s > r}
            if bad:
                diff = ", ".join(f"{n!r}: saved {s} vs {r}" for n, (s, r) in bad.items())
                raise ValueError(f"allocator state compacted ranks exceed the adapters' ranks ({diff}): "
                                 "load the allocator state into a model injected with the saved config")
        elif saved != now:
            raise ValueError("allocator state masks do not match the adapters' ranks: load the allocator "
                             "state into a model injected with the saved config")
        if sd["final_scores"] is not None and len(sd["final_scores"]) != len(self.layers):
            raise ValueError(f"allocator state has {len(sd['final_scores'])} final scores for "
                             f"{len(self.layers)} adapters: load a state saved by this allocator")
        for key in ("ibar", "ubar"):
            ts = sd["scorer"][key]
            if ts is None:
                continue
            want = [shape for layer, r in zip(self.layers, saved)
                    for shape in ((layer.out_features, r), (r,), (r, layer.in_features))]
            if [tuple(t.shape) for t in ts] != want:
                raise ValueError(f"allocator state's importance {key} does not match the adapters' shapes: "
                                 "load the allocator state into a model injected with the saved config")


def _threshold(flat: torch.Tensor, order: torch.Tensor, budget: int) -> torch.Tensor | None:
    """The highest pruned score, ``(1,)`` on the device; None when nothing is pruned."""
    return flat[order[budget:budget + 1]] if budget < flat.numel() else None


def _like_lams(flat: torch.Tensor, lams: list[torch.Tensor]) -> list[torch.Tensor]:
    """A flat bool vector as factors for ``lams`` (per adapter, or the one flat bank) in each
    one's dtype: one cast for all when they share a dtype (the usual case), else one each."""
    sizes = [lam.shape[0] for lam in lams]
    dtypes = {lam.dtype for lam in lams}
    if len(dtypes) == 1:
        return list(flat.to(dtypes.pop()).split(sizes))
    return [f.to(lam.dtype) for f, lam in zip(flat.split(sizes), lams)]
