"""Orthogonality regularizer on the singular vectors (paper Eq. 4).

The caller adds ``γ · orthogonality_penalty(adapters)`` to its loss explicitly: nothing here is
hidden in ``forward`` (peft's is, and is silently skipped when the model computes no loss).
"""
from __future__ import annotations

import functools
import weakref
from collections import defaultdict

import torch

from . import gate_bank
from .config import ORTH_FORMS
from .layers import SVDLinear, fast_param, like_param


def _factors(svd: list[SVDLinear]) -> list[torch.Tensor]:
    """Every factor: each ``P`` (``(d, r)``, stored column-major, its singular vectors as
    columns), then each ``Q`` (``(r, d)``). Either way the matrix ``M (r, d)`` whose rows are the
    singular vectors gives ``PᵀP − I`` and ``QQᵀ − I`` as ``MMᵀ − I``."""
    return [fast_param(a, "P") for a in svd] + [fast_param(a, "Q") for a in svd]


class _BankPlan:
    """How the penalty batches the banked factors (adalora/gate_bank.py) of one list of adapters:
    per width (and dtype and device), the parts ``(bank, rows, n)``: the bank, its rows of those
    adapters (None: all, in order) and how many adapters. A width whose members all share one
    rank is one batch, the ``P`` and ``Q`` banks of that width joined (``ranks`` None); otherwise
    each bank is a batch of its own, padded (``ranks`` its members' ranks). ``own``: the
    adapters whose ``P`` and ``Q`` are their own parameters. Built once and found again while no
    bank was rebuilt (``Bank.version``) or moved, so a step pays no per-adapter Python for it."""

    def __init__(self, svd: list[SVDLinear]):
        self.own = [a for a in svd if gate_bank.bank_of(a, "P") is None or gate_bank.bank_of(a, "Q") is None]
        wanted = {id(a) for a in svd} - {id(a) for a in self.own}
        banks = {}
        for a in svd:
            if id(a) in wanted:
                for attr in ("P", "Q"):
                    b = gate_bank.bank_of(a, attr)
                    banks.setdefault(id(b), b)
        widths: dict[tuple, list] = defaultdict(list)
        for b in banks.values():
            members = [m for m, r in zip(b.layers, b.sizes) if id(m) in wanted and r > 0]
            if members:
                ranks = tuple(b.sizes[gate_bank.bank_entry(m, b.attr)[1]] for m in members)
                p = b.param
                widths[(p.shape[1], p.dtype, p.device)].append(((b, b.rows_of(members), len(members)), ranks))
        self.batches = []                       # (parts, d, ranks or None)
        for (d, _, _), found in widths.items():
            ranks = {r for _, rs in found for r in rs}
            if len(ranks) == 1:
                self.batches.append(([part for part, _ in found], d, None))
            else:
                self.batches += [([part], d, rs) for part, rs in found]
        # a rebuild makes a new parameter; a move (model.to) keeps it, so the rows' indices
        # must be made again on the new device
        self.versions = {id(b): (b.version, b.param.device) for b in banks.values()}
        self.banks = list(banks.values())

    def holds(self) -> bool:
        return all((b.version, b.param.device) == self.versions[id(b)] for b in self.banks)


_BANK_PLANS: dict[tuple, tuple] = {}    # by the adapters' ids (_cached)


def _bank_plan(svd: list[SVDLinear]) -> _BankPlan:
    return _cached(_BANK_PLANS, tuple(map(id, svd)), svd, lambda: _BankPlan(svd))


def _cached(cache: dict, key: tuple, items: list, build):
    """The plan ``build()`` makes for ``items``, kept in ``cache`` under ``key`` (their ids) and
    found again while every item is alive (an id is unique only among live objects; held weakly,
    so no factor is kept alive) and the plan still ``holds()``. A few at once: the benchmark
    holds several models. Traced afresh under ``torch.compile``, whose guards check the shapes."""
    if torch.compiler.is_compiling():
        return build()
    hit = cache.get(key)
    if hit is not None and all(r() is not None for r in hit[0]) and hit[1].holds():
        return hit[1]
    plan = build()
    cache[key] = (tuple(weakref.ref(x) for x in items), plan)
    while len(cache) > 8:
        del cache[next(iter(cache))]
    return plan


def _bank_batches(plan: _BankPlan):
    """Yields ``(parts, x, mask, where)`` per batch of ``plan``, ``x``, ``mask`` and ``where`` as
    ``_groups`` yields them: with equal ranks, a view of a bank's rows (no copy where its rows
    are all the adapters', in order) or one cat of a width's two banks."""
    for parts, d, ranks in plan.batches:
        rows = [b.param if idx is None else b.param.index_select(0, idx) for b, idx, _ in parts]
        if ranks is None:
            n = sum(k for _, _, k in parts)
            x = rows[0] if len(rows) == 1 else torch.cat(rows)
            yield parts, x.view(n, -1, d), None, None
            continue
        where, mask = _padding(ranks, d, rows[0].device, rows[0].dtype)
        x = rows[0].new_zeros(len(ranks) * max(ranks) * d).index_copy(0, where, rows[0].reshape(-1))
        yield parts, x.view(len(ranks), max(ranks), d), mask, where


class _Plan:
    """How ``_groups`` batches one list of factors (the first ``n_p`` held transposed): per group,
    its members' indices (``P`` before ``Q``), how many are ``P``, the full dimension ``d``, the
    largest rank and, for unequal ranks, the ranks (None when equal). Built once per list and found again by the
    factors' identity: the library gives a factor a new parameter whenever its shape changes
    (compaction, growth, loading, a named-adapter switch), so a step pays no per-matrix Python
    for the grouping."""

    def __init__(self, leaves: list[torch.Tensor], n_p: int):
        # Keyed by dtype and device too: a model can mix fp32 adapters (on an NF4 base) with bf16
        # ones of the same width, and one batch must hold one dtype.
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, m in enumerate(leaves):
            d, r = m.shape if i < n_p else m.shape[::-1]
            if r > 0:                                               # rank 0: nothing to penalise
                groups[(d, m.dtype, m.device)].append(i)
        self.groups = []
        for (d, _, _), idx in groups.items():
            ranks = tuple(leaves[i].shape[1 if i < n_p else 0] for i in idx)
            self.groups.append((idx, sum(i < n_p for i in idx), d, max(ranks),
                                None if min(ranks) == max(ranks) else ranks))

    def holds(self) -> bool:
        return True           # a factor of a new shape is a new parameter: the ids are the key


_PLANS: dict[tuple, tuple] = {}     # by the factors' ids (_cached)


def _plan(leaves: list[torch.Tensor], n_p: int) -> _Plan:
    return _cached(_PLANS, (n_p, *map(id, leaves)), leaves, lambda: _Plan(leaves, n_p))


def _groups(leaves: list[torch.Tensor], n_p: int):
    """Batch the matrices ``M (r, d)`` of ``leaves`` (each ``M``, or ``Mᵀ`` for the first ``n_p``)
    by their full dimension ``d``, whatever their rank and whether they are ``P`` or ``Q``, so the
    cost is a few kernels per distinct ``d`` rather than per adapter, per rank (compacted adapters
    have many ranks) or per kind (a BERT layer's P and Q share its two widths). Yields
    ``(members, k, x, mask, where)``: the group's leaves, its first ``k`` the ``P``, their batch
    ``x (n, R, d)``, and for a batch of unequal ranks, zero-padded to the largest ``R``: the
    ``(n, R, R)`` mask of each matrix's own block and where each element sits in the flat batch
    (``None, None`` when ranks are equal).
    """
    for idx, k, d, r, ranks in _plan(leaves, n_p).groups:
        members = [leaves[i] for i in idx]
        if ranks is None:
            # One stack per kind, each written straight into its rows of the batch: the P into
            # their transposed view (a column-major P is its Pᵀ rows in memory, so this copies
            # in order), with no per-matrix transpose dispatched and no second copy to join them.
            # Autograd (orthogonality_penalty) cannot go through out=: there the stacks are joined.
            ps, qs = members[:k], members[k:]
            if torch.is_grad_enabled():
                parts = ([torch.stack(ps).transpose(1, 2)] if ps else []) + ([torch.stack(qs)] if qs else [])
                x = torch.cat(parts) if len(parts) > 1 else parts[0]
            else:
                x = members[0].new_empty(len(members), r, d)
                if ps:
                    torch.stack(ps, out=x[:k].transpose(1, 2))
                if qs:
                    torch.stack(qs, out=x[k:])
            yield members, k, x, None, None
            continue
        # One cat and one scatter into the zero padding, however many matrices and ranks.
        m0 = members[0]
        where, mask = _padding(ranks, d, m0.device, m0.dtype)
        flat = torch.cat([(m.t() if j < k else m).reshape(-1) for j, m in enumerate(members)])  # (r, d) rows each
        x = m0.new_zeros(len(members) * r * d).index_copy(0, where, flat)
        yield members, k, x.view(len(members), r, d), mask, where


def _residual(x: torch.Tensor, mask) -> torch.Tensor:
    """``C = MMᵀ − I`` for each matrix of the batch, ``(n, R, R)``, zero outside each matrix's
    own block."""
    # bmm, not @: matmul's batched path dispatches five more ops around the same bmm, and the
    # identity is taken off the diagonal in place rather than built; the same values either way.
    resid = torch.bmm(x, x.transpose(1, 2))
    resid.diagonal(dim1=1, dim2=2).sub_(1)
    return resid if mask is None else resid * mask


def _norms(c: torch.Tensor, squared: bool) -> torch.Tensor:
    """``‖C‖_F`` of each matrix of the batch ``c (n, R, R)``, squared if asked: ``(n,)``."""
    # vector_norm: one kernel, where pow, sum and sqrt are three (an eager step launches every one)
    return c.pow(2).sum(dim=(1, 2)) if squared else torch.linalg.vector_norm(c, dim=(1, 2))


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """The sum of every group's norms: one cat and one sum, not a sum and an add per group."""
    if len(parts) == 1:
        return parts[0].sum()
    if len({p.dtype for p in parts}) == 1:
        return torch.cat(parts).sum()
    return sum(p.sum() for p in parts)                              # mixed dtypes: promoted


def _gram_residual_norms(svd: list[SVDLinear], squared: bool) -> torch.Tensor:
    """Sum over the ``P`` and ``Q`` of ``svd`` of ``‖MMᵀ − I‖_F``, squared if asked."""
    plan = _bank_plan(svd) if gate_bank.any_banked(svd) else None
    own = svd if plan is None else plan.own
    parts = [] if plan is None else [_norms(_residual(x, mask), squared) for _, x, mask, _ in _bank_batches(plan)]
    if own:
        parts += [_norms(_residual(x, mask), squared) for _, _, x, mask, _ in _groups(_factors(own), len(own))]
    return _total(parts)


@torch.compiler.assume_constant_result
def _padding(ranks: tuple[int, ...], d: int, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Under torch.compile these become constants of the graph: Dynamo ignores lru_cache and would
    # otherwise trace the index construction into the graph and rebuild it at every step of a
    # compacted (mixed-rank) model. Ranks come from static shapes, so new ranks recompile with
    # new constants.
    return _padding_cached(ranks, d, device, dtype)


@functools.lru_cache(maxsize=64)
def _padding_cached(ranks: tuple[int, ...], d: int, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``(r, d)`` matrices of ``ranks`` padded to ``R = max(ranks)``: where each element of
    each matrix (flattened, concatenated) lands in the flat ``(n, R, d)`` buffer, and the
    ``(n, R, R)`` 0/1 mask (in ``dtype``) of each matrix's own block. Cached: compacted ranks
    stay fixed, so the penalty pays no index or mask work per step."""
    big = max(ranks)
    where = [k * big * d + torch.arange(r * d) for k, r in enumerate(ranks)]     # rows stay whole
    valid = torch.arange(big) < torch.tensor(ranks).unsqueeze(1)                  # (n, R)
    return torch.cat(where).to(device), (valid.unsqueeze(2) & valid.unsqueeze(1)).to(device, dtype)


def _svd_adapters(adapters: dict, form: str) -> list[SVDLinear]:
    if form not in ORTH_FORMS:
        raise ValueError(f"form={form!r}: use one of {ORTH_FORMS}")
    return [a for a in adapters.values() if isinstance(a, SVDLinear)]


def orthogonality_penalty(adapters: dict, form: str = "reference") -> torch.Tensor:
    """The orthogonality penalty ``R`` over the SVD adapters in ``adapters`` (LoRA adapters are ignored).

    ``"reference"`` (default, both public implementations):
    ``Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F) / (2|S|)``.
    ``"paper"`` (Eq. 4 summed over adapters): ``Σ_k ‖P_kᵀP_k − I‖²_F + ‖Q_k Q_kᵀ − I‖²_F``.
    Returns a zero scalar when there are no SVD adapters.
    """
    svd = _svd_adapters(adapters, form)
    if not svd:
        return torch.zeros(())
    squared = form == "paper"
    total = _gram_residual_norms(svd, squared)
    # DEVIATION (reference form): unsquared norms averaged over the 2|S| matrices, as both public
    # implementations compute it and as their published numbers were obtained.
    return total if squared else total / (2 * len(svd))


@torch.no_grad()
def orthogonality_grad_(adapters: dict, weight: float, form: str = "reference") -> torch.Tensor:
    """Add ``weight · ∂R/∂P`` and ``weight · ∂R/∂Q`` to every SVD adapter's ``.grad`` in place and
    return ``R`` (detached): what ``(weight * orthogonality_penalty(adapters, form)).backward()``
    adds, in a few batched kernels per distinct dimension instead of a second autograd path into
    every ``P`` and ``Q`` (whose two gradients autograd then sums with one kernel per matrix).

    With ``C = PᵀP − I``: ``∂‖C‖_F/∂P = 2PC / ‖C‖_F`` and ``∂‖C‖²_F/∂P = 4PC``; for ``Q``,
    ``C = QQᵀ − I`` and ``CQ`` in place of ``PC``. At ``‖C‖_F = 0`` the gradient is 0, as
    autograd's of the norm. Call it after ``backward()`` (after ``scaler.unscale_``
    under a gradient scaler) and before clipping and the importance update, once per optimizer
    step: ``R`` does not depend on the batch, so this equals adding ``γR / accum`` to every
    micro-batch's loss. It is ``orthogonality_grads`` then ``add_orthogonality_grads_``.
    """
    total, pending = orthogonality_grads(adapters, weight, form)
    add_orthogonality_grads_(pending)
    return total


@torch.no_grad()
def orthogonality_grads(adapters: dict, weight: float, form: str = "reference") -> tuple[torch.Tensor, list]:
    """``(R, pending)``: ``orthogonality_grad_``'s values, its gradients held in ``pending`` for
    ``add_orthogonality_grads_`` instead of added to ``.grad``. They read ``P`` and ``Q`` alone,
    not the batch, so a step may form them before or beside its forward and backward (on another
    CUDA stream, say) and add them once backward has written ``.grad``; ``P`` and ``Q`` must not
    change in between."""
    svd = _svd_adapters(adapters, form)
    if not svd:
        return torch.zeros(()), []
    squared = form == "paper"
    # The constant rides in the gradient product's alpha (beta=0: x is not read as its addend).
    scale = 4 * weight if squared else weight / len(svd)
    norms, pending = [], []
    plan = _bank_plan(svd) if gate_bank.any_banked(svd) else None
    own = svd if plan is None else plan.own
    batches = [] if plan is None else [(parts, None, x, mask, where) for parts, x, mask, where in _bank_batches(plan)]
    if own:
        batches += [(members, k, x, mask, where) for members, k, x, mask, where in _groups(_factors(own), len(own))]
    for members, k, x, mask, where in batches:
        c = _residual(x, mask)                                      # (n, R, R), symmetric
        norm = _norms(c, squared)                                   # (n,)
        norms.append(norm)
        if not squared:
            c.div_(norm.clamp_min(torch.finfo(norm.dtype).tiny).view(-1, 1, 1))
        pending.append((members, k, torch.baddbmm(x, c, x, beta=0, alpha=scale), where))   # (n, R, d)
    total = _total(norms)
    return (total if squared else total / (2 * len(svd))), pending


def pending_tensors(pending: list) -> list[torch.Tensor]:
    """The gradient batches ``orthogonality_grads`` formed (one ``(n, R, d)`` tensor per width
    or bank): what a caller that formed them on another CUDA stream must mark as used on its own
    (``Tensor.record_stream``) before ``add_orthogonality_grads_`` reads them."""
    return [item[2] for item in pending]


@torch.no_grad()
def add_orthogonality_grads_(pending: list) -> None:
    """Add the gradients ``orthogonality_grads`` formed to their factors' ``.grad``."""
    for members, k, g, where in pending:
        if k is None:
            _add_to_bank_grads(members, g, where)
        else:
            _add_to_grads(members, k, g, where)


def _add_to_bank_grads(parts: list, g: torch.Tensor, where) -> None:
    """Each bank's gradient += its rows of ``g (n, R, d)``, a batch of ``_bank_batches``: one add
    per bank where the rows are all of it, in order (``where``: the batch's padding, or None)."""
    d = g.shape[-1]
    rows = g.reshape(-1, d) if where is None else g.reshape(-1).index_select(0, where).view(-1, d)
    sizes = [b.param.shape[0] if idx is None else idx.numel() for b, idx, _ in parts]
    for (bank, idx, _), r in zip(parts, rows.split(sizes) if len(parts) > 1 else (rows,)):
        param = bank.param
        if not param.requires_grad:
            continue
        if idx is None:
            if param.grad is None:
                param.grad = like_param(r, param)
            else:
                param.grad.add_(r)
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        param.grad.index_add_(0, idx, r)


def _add_to_grads(members: list[torch.Tensor], k: int, g: torch.Tensor, where) -> None:
    """``leaf.grad += g_m`` for each matrix of a batch (one multi-tensor kernel), ``g (n, R, d)``
    padded as ``_groups`` built it, its first ``k`` rows the ``P`` (the leaves held transposed)."""
    if where is None:
        # in the leaves' shapes: two unbinds, not a transpose per P
        parts = g[:k].transpose(1, 2).unbind(0) + g[k:].unbind(0)
    else:
        sizes = [m.numel() for m in members]
        parts = [p.view(-1, g.shape[-1]) for p in g.reshape(-1).index_select(0, where).split(sizes)]
        parts = [p.t() if j < k else p for j, p in enumerate(parts)]
    grads, adds = [], []
    for m, p in zip(members, parts):
        if not m.requires_grad:
            continue
        if m.grad is None:
            m.grad = like_param(p, m)
        else:
            grads.append(m.grad)
            adds.append(p)
    if grads:
        torch._foreach_add_(grads, adds)
