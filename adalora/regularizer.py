"""Orthogonality regularizer on the singular vectors (paper Eq. 4).

The caller adds ``γ · orthogonality_penalty(adapters)`` to its loss explicitly: nothing here is
hidden in ``forward`` (peft's is, and is silently skipped when the model computes no loss).
"""
from __future__ import annotations

import functools
from collections import defaultdict

import torch

from .config import ORTH_FORMS
from .layers import SVDLinear


def _groups(mats: list[torch.Tensor], left: bool):
    """Batch ``mats`` by their full dimension ``d``, whatever their rank, so the cost is a few
    kernels per distinct ``d`` rather than per adapter or per rank (compacted adapters have many
    ranks). Yields ``(ms, x, mask, where)``: the group's matrices, their batch ``x`` (``(n, d, R)``
    for ``left`` (M = P ``(d_out, r)``), else ``(n, R, d)`` (M = Q ``(r, d_in)``)), and for a batch
    of unequal ranks, zero-padded to the largest ``R``: the ``(n, R, R)`` mask of each matrix's own
    block and where each element sits in the flat batch (``None, None`` when ranks are equal).
    Each matrix enters as itself (never a transposed view), so its gradient arrives in its own
    memory layout and autograd need not copy it.
    """
    groups: dict[int, tuple[list[torch.Tensor], list[int]]] = defaultdict(lambda: ([], []))
    for m in mats:
        r, d = (m.shape[1], m.shape[0]) if left else m.shape
        if r > 0:                                                   # rank 0: nothing to penalise
            groups[d][0].append(m)
            groups[d][1].append(r)
    for d, (ms, ranks) in groups.items():
        r = max(ranks)
        if min(ranks) == r:
            yield ms, torch.stack(ms), None, None                   # (n, d, r) or (n, r, d)
            continue
        # One cat and one scatter into the zero padding, however many matrices and ranks.
        where, mask = _padding(tuple(ranks), d, left, ms[0].device, ms[0].dtype)
        flat = torch.cat([m.reshape(-1) for m in ms])
        x = ms[0].new_zeros(len(ms) * d * r).index_copy(0, where, flat)
        yield ms, (x.view(len(ms), d, r) if left else x.view(len(ms), r, d)), mask, where


def _residual(x: torch.Tensor, mask, left: bool) -> torch.Tensor:
    """``C = MᵀM − I`` (``left``) or ``MMᵀ − I`` for each matrix of the batch, ``(n, R, R)``,
    zero outside each matrix's own block."""
    gram = x.transpose(1, 2) @ x if left else x @ x.transpose(1, 2)
    resid = gram - torch.eye(gram.shape[-1], device=x.device, dtype=x.dtype)
    return resid if mask is None else resid * mask


def _gram_residual_norms(mats: list[torch.Tensor], left: bool, squared: bool) -> torch.Tensor:
    """Sum over ``mats`` of ``‖MᵀM − I‖_F`` (``left``) or ``‖MMᵀ − I‖_F``, squared if asked."""
    total = mats[0].new_zeros(())
    for _, x, mask, _ in _groups(mats, left):
        sq = _residual(x, mask, left).pow(2).sum(dim=(1, 2))       # (n,) squared Frobenius norms
        total = total + (sq.sum() if squared else sq.sqrt().sum())
    return total


@torch.compiler.assume_constant_result
def _padding(ranks: tuple[int, ...], d: int, left: bool, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Under torch.compile these become constants of the graph. Dynamo ignores lru_cache and
    # would trace the index construction into the graph, an arange and a meshgrid per matrix
    # rebuilt every step; measured on the GPU as compact() running slower than before it.
    # Ranks come from static shapes, so new ranks recompile and give new constants.
    return _padding_cached(ranks, d, left, device, dtype)


@functools.lru_cache(maxsize=64)
def _padding_cached(ranks: tuple[int, ...], d: int, left: bool, device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For matrices of ``ranks`` padded to ``R = max(ranks)``: where each element of each matrix
    (flattened, concatenated) lands in the flat ``(n, d, R)`` (``left``) or ``(n, R, d)`` buffer,
    and the ``(n, R, R)`` 0/1 mask (in ``dtype``) of each matrix's own block. Cached: compacted
    ranks stay fixed, so the penalty pays no index or mask work per step."""
    big = max(ranks)
    where = []
    for k, r in enumerate(ranks):
        i, j = torch.meshgrid(torch.arange(d if left else r), torch.arange(r if left else d), indexing="ij")
        where.append((k * d * big + i * (big if left else d) + j).reshape(-1))
    valid = torch.arange(big) < torch.tensor(ranks).unsqueeze(1)                  # (n, R)
    return torch.cat(where).to(device), (valid.unsqueeze(2) & valid.unsqueeze(1)).to(device, dtype)


def _svd_adapters(adapters: dict, form: str) -> list[SVDLinear]:
    if form not in ORTH_FORMS:
        raise ValueError(f"form={form!r}: use one of {ORTH_FORMS}")
    return [a for a in adapters.values() if isinstance(a, SVDLinear)]


def orthogonality_penalty(adapters: dict, form: str = "reference") -> torch.Tensor:
    """``R`` of DESIGN section 3 over the SVD adapters in ``adapters`` (LoRA adapters are ignored).

    ``"reference"`` (default, both public implementations):
    ``Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F) / (2|S|)``.
    ``"paper"`` (Eq. 4 summed over adapters): ``Σ_k ‖P_kᵀP_k − I‖²_F + ‖Q_k Q_kᵀ − I‖²_F``.
    Returns a zero scalar when there are no SVD adapters.
    """
    svd = _svd_adapters(adapters, form)
    if not svd:
        return torch.zeros(())
    squared = form == "paper"
    total = (_gram_residual_norms([a.P for a in svd], left=True, squared=squared)
             + _gram_residual_norms([a.Q for a in svd], left=False, squared=squared))
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
    ``C = QQᵀ − I`` and ``CQ`` in place of ``PC``. At ``‖C‖_F = 0`` the gradient is 0 (autograd of
    the square root gives NaN there). Call it after ``backward()`` (after ``scaler.unscale_``
    under a gradient scaler) and before clipping and the importance update, once per optimizer
    step: ``R`` does not depend on the batch, so this equals adding ``γR / accum`` to every
    micro-batch's loss.
    """
    svd = _svd_adapters(adapters, form)
    if not svd:
        return torch.zeros(())
    squared = form == "paper"
    total = svd[0].P.new_zeros(())
    for mats, left in (([a.P for a in svd], True), ([a.Q for a in svd], False)):
        for ms, x, mask, where in _groups(mats, left):
            c = _residual(x, mask, left)                             # (n, R, R), symmetric
            sq = c.pow(2).sum(dim=(1, 2))                           # (n,)
            if squared:
                total += sq.sum()
                c.mul_(4 * weight)
            else:
                norm = sq.sqrt()
                total += norm.sum()
                c.mul_((weight / len(svd) / norm.clamp_min(torch.finfo(norm.dtype).tiny))[:, None, None])
            g = x @ c if left else c @ x                            # (n, d, R) or (n, R, d)
            _add_to_grads(ms, g, where)
    return total if squared else total / (2 * len(svd))


def _add_to_grads(ms: list[torch.Tensor], g: torch.Tensor, where) -> None:
    """``m.grad += g_m`` for each matrix of a batch (one multi-tensor kernel), ``g`` padded as
    ``_groups`` built it."""
    if where is None:
        parts = g.unbind(0)
    else:
        parts = [p.view(m.shape) for p, m in
                 zip(g.reshape(-1).index_select(0, where).split([m.numel() for m in ms]), ms)]
    grads, adds = [], []
    for m, p in zip(ms, parts):
        if not m.requires_grad:
            continue
        if m.grad is None:
            m.grad = p.clone(memory_format=torch.contiguous_format)
        else:
            grads.append(m.grad)
            adds.append(p)
    if grads:
        torch._foreach_add_(grads, adds)
