"""Orthogonality regularizer on the singular vectors (paper Eq. 4).

The caller adds ``γ · orthogonality_penalty(adapters)`` to its loss explicitly: nothing here is
hidden in ``forward`` (peft's is, and is silently skipped when the model computes no loss).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .config import ORTH_FORMS
from .layers import SVDLinear


def _gram_residual_norms(mats: list[torch.Tensor], left: bool, squared: bool) -> torch.Tensor:
    """Sum over ``mats`` of ``‖MᵀM − I‖_F`` (``left``, M = P (d_out, r)) or ``‖MMᵀ − I‖_F`` (M = Q (r, d_in)).

    Matrices of one shape are stacked and handled by one batched matmul, so the cost is a few
    kernels per distinct shape rather than per adapter.
    """
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for m in mats:
        groups[tuple(m.shape)].append(m)
    total = mats[0].new_zeros(())
    for shape, ms in groups.items():
        r = shape[1] if left else shape[0]
        if r == 0:
            continue  # a rank-0 adapter has an empty Gram matrix: nothing to penalise
        x = torch.stack(ms)                                        # (n, d_out, r) or (n, r, d_in)
        gram = x.transpose(1, 2) @ x if left else x @ x.transpose(1, 2)   # (n, r, r)
        eye = torch.eye(r, device=x.device, dtype=x.dtype)
        sq = (gram - eye).pow(2).sum(dim=(1, 2))                   # (n,) squared Frobenius norms
        total = total + (sq.sum() if squared else sq.sqrt().sum())
    return total


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
