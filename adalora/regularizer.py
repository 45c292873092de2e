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


def _gram_residual_norms(mats: list[torch.Tensor], left: bool, squared: bool) -> torch.Tensor:
    """Sum over ``mats`` of ``‖MᵀM − I‖_F`` (``left``, M = P (d_out, r)) or ``‖MMᵀ − I‖_F`` (M = Q (r, d_in)).

    Matrices are batched by their full dimension ``d``, whatever their rank, so the cost is a few
    kernels per distinct ``d`` rather than per adapter or per rank (compacted adapters have many
    ranks). A batch of unequal ranks is zero-padded to the largest, and the residual is masked
    to each matrix's own ``r × r`` block, so padding adds exactly nothing. Each matrix enters as
    itself (never a transposed view), so its gradient arrives in its own memory layout and
    autograd need not copy it.
    """
    groups: dict[int, tuple[list[torch.Tensor], list[int]]] = defaultdict(lambda: ([], []))
    for m in mats:
        r, d = (m.shape[1], m.shape[0]) if left else m.shape
        if r > 0:                                                   # rank 0: nothing to penalise
            groups[d][0].append(m)
            groups[d][1].append(r)
    total = mats[0].new_zeros(())
    for d, (ms, ranks) in groups.items():
        r = max(ranks)
        mask = None
        if min(ranks) == r:
            x = torch.stack(ms)                                     # (n, d, r) or (n, r, d)
        else:
            # One cat and one scatter into the zero padding, however many matrices and ranks.
            where, mask = _padding(tuple(ranks), d, left, ms[0].device, ms[0].dtype)
            n = len(ms)
            flat = torch.cat([m.reshape(-1) for m in ms])
            x = ms[0].new_zeros(n * d * r).index_copy(0, where, flat)
            x = x.view(n, d, r) if left else x.view(n, r, d)
        gram = x.transpose(1, 2) @ x if left else x @ x.transpose(1, 2)   # (n, r, r)
        resid = gram - torch.eye(r, device=x.device, dtype=x.dtype)
        if mask is not None:
            resid = resid * mask                                    # each matrix's own r x r block
        sq = resid.pow(2).sum(dim=(1, 2))                           # (n,) squared Frobenius norms
        total = total + (sq.sum() if squared else sq.sqrt().sum())
    return total


@functools.lru_cache(maxsize=64)
def _padding(ranks: tuple[int, ...], d: int, left: bool, device: torch.device,
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


def orthogonality_penalty(adapters: dict, form: str = "reference") -> torch.Tensor:
    """``R`` of DESIGN section 3 over the SVD adapters in ``adapters`` (LoRA adapters are ignored).

    ``"reference"`` (default, both public implementations):
    ``Σ_k (‖P_kᵀP_k − I‖_F + ‖Q_k Q_kᵀ − I‖_F) / (2|S|)``.
    ``"paper"`` (Eq. 4 summed over adapters): ``Σ_k ‖P_kᵀP_k − I‖²_F + ‖Q_k Q_kᵀ − I‖²_F``.
    Returns a zero scalar when there are no SVD adapters.
    """
    if form not in ORTH_FORMS:
        raise ValueError(f"form={form!r}: use one of {ORTH_FORMS}")
    svd = [a for a in adapters.values() if isinstance(a, SVDLinear)]
    if not svd:
        return torch.zeros(())
    squared = form == "paper"
    total = (_gram_residual_norms([a.P for a in svd], left=True, squared=squared)
             + _gram_residual_norms([a.Q for a in svd], left=False, squared=squared))
    # DEVIATION (reference form): unsquared norms averaged over the 2|S| matrices, as both public
    # implementations compute it and as their published numbers were obtained.
    return total if squared else total / (2 * len(svd))
