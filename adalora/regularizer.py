"""Orthogonality regularizer on the singular vectors (paper Eq. 4).

The caller adds ``γ · orthogonality_penalty(adapters)`` to its loss explicitly: nothing here is
hidden in ``forward`` (peft's is, and is silently skipped when the model computes no loss).
"""
from __future__ import annotations

import functools
from collections import defaultdict

import torch

from .config import ORTH_FORMS
from .layers import SVDLinear, fast_param, like_param


def _factors(svd: list[SVDLinear]):
    """Both factor lists with whether each holds its singular vectors as columns: ``P`` (``(d, r)``,
    stored column-major) and ``Q`` (``(r, d)``). Either way the matrix ``M (r, d)`` whose rows are
    the singular vectors gives ``PᵀP − I`` and ``QQᵀ − I`` as ``MMᵀ − I``."""
    return ([fast_param(a, "P") for a in svd], True), ([fast_param(a, "Q") for a in svd], False)


def _groups(leaves: list[torch.Tensor], transposed: bool):
    """Batch the matrices ``M (r, d)`` of ``leaves`` (each ``M``, or ``Mᵀ`` when ``transposed``) by
    their full dimension ``d``, whatever their rank, so the cost is a few kernels per distinct
    ``d`` rather than per adapter or per rank (compacted adapters have many ranks). Yields
    ``(idx, x, mask, where)``: the group's indices into ``leaves``, their batch ``x (n, R, d)``,
    and for a batch of unequal ranks, zero-padded to the largest ``R``: the ``(n, R, R)`` mask of
    each matrix's own block and where each element sits in the flat batch (``None, None`` when
    ranks are equal).
    """
    # Keyed by dtype and device too: a model can mix fp32 adapters (on an NF4 base) with bf16
    # ones of the same width, and one batch must hold one dtype.
    groups: dict[tuple, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    for i, m in enumerate(leaves):
        d, r = m.shape if transposed else m.shape[::-1]
        if r > 0:                                                   # rank 0: nothing to penalise
            groups[(d, m.dtype, m.device)][0].append(i)
            groups[(d, m.dtype, m.device)][1].append(r)
    for (d, _, _), (idx, ranks) in groups.items():
        ms = [leaves[i] for i in idx]
        r = max(ranks)
        if min(ranks) == r:
            # One stack of the leaves as stored; the batch of P is its transposed view, so no
            # per-matrix transpose is dispatched (bmm takes the strides as they are).
            x = torch.stack(ms)                                     # (n, r, d) or (n, d, r)
            yield idx, (x.transpose(1, 2) if transposed else x), None, None
            continue
        # One cat and one scatter into the zero padding, however many matrices and ranks.
        where, mask = _padding(tuple(ranks), d, ms[0].device, ms[0].dtype)
        rows = [m.t() for m in ms] if transposed else ms            # (r, d) each: contiguous views
        flat = torch.cat([m.reshape(-1) for m in rows])
        x = ms[0].new_zeros(len(ms) * r * d).index_copy(0, where, flat)
        yield idx, x.view(len(ms), r, d), mask, where


def _residual(x: torch.Tensor, mask) -> torch.Tensor:
    """``C = MMᵀ − I`` for each matrix of the batch, ``(n, R, R)``, zero outside each matrix's
    own block."""
    gram = x @ x.transpose(1, 2)
    resid = gram - torch.eye(gram.shape[-1], device=x.device, dtype=x.dtype)
    return resid if mask is None else resid * mask


def _gram_residual_norms(leaves: list[torch.Tensor], transposed: bool, squared: bool) -> torch.Tensor:
    """Sum over the matrices of ``leaves`` of ``‖MMᵀ − I‖_F``, squared if asked."""
    total = leaves[0].new_zeros(())
    for _, x, mask, _ in _groups(leaves, transposed):
        sq = _residual(x, mask).pow(2).sum(dim=(1, 2))              # (n,) squared Frobenius norms
        total = total + (sq.sum() if squared else sq.sqrt().sum())
    return total


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
    p, q = (_gram_residual_norms(leaves, transposed, squared) for leaves, transposed in _factors(svd))
    total = p + q
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
    for leaves, transposed in _factors(svd):
        for idx, x, mask, where in _groups(leaves, transposed):
            c = _residual(x, mask)                                  # (n, R, R), symmetric
            sq = c.pow(2).sum(dim=(1, 2))                           # (n,)
            if squared:
                total += sq.sum()
                c.mul_(4 * weight)
            else:
                norm = sq.sqrt()
                total += norm.sum()
                c.mul_((weight / len(svd) / norm.clamp_min(torch.finfo(norm.dtype).tiny))[:, None, None])
            _add_to_grads([leaves[i] for i in idx], c @ x, where, transposed)      # (n, R, d)
    return total if squared else total / (2 * len(svd))


def _add_to_grads(leaves: list[torch.Tensor], g: torch.Tensor, where, transposed: bool) -> None:
    """``leaf.grad += g_m`` for each matrix of a batch (one multi-tensor kernel), ``g (n, R, d)``
    padded as ``_groups`` built it; ``transposed``: the matrices were the leaves transposed."""
    if where is None:
        parts = (g.transpose(1, 2) if transposed else g).unbind(0)   # in the leaves' shapes
    else:
        sizes = [m.numel() for m in leaves]
        parts = [p.view(-1, g.shape[-1]) for p in g.reshape(-1).index_select(0, where).split(sizes)]
        parts = [p.t() for p in parts] if transposed else parts
    grads, adds = [], []
    for m, p in zip(leaves, parts):
        if not m.requires_grad:
            continue
        if m.grad is None:
            m.grad = like_param(p, m)
        else:
            grads.append(m.grad)
            adds.append(p)
    if grads:
        torch._foreach_add_(grads, adds)
