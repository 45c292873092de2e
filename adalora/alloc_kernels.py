"""AdaLoRA's per-step allocation work on CUDA as three Triton kernels: the importance EMAs with
each row's mean score, the triplet scores, and each score's place in the budget's order.

Between backward and the next forward a step scores every singular value (adalora/importance.py)
and, on mask steps, keeps the ``b(t)`` best (``RankAllocator.mask_on_device``). Written as
PyTorch ops that is about 35 small kernels over a few MB, one after another: at BERT-base's
72 adapters of rank 12, a tenth of a millisecond of a captured step that LoRA does not pay.
Captured, it is one kernel per bank, one gather and one ranking:

    ema_rows_    per row of a bank (a singular value's row of Pᵀ or Q, or its λ), in fp32:
                 I = |w · g|;  Ī ← β1 Ī + (1−β1) I;  Ū ← β2 Ū + (1−β2) |I − Ī|
                 and the row's mean of s = Ī · Ū (or Ī)                       Eqs. 10-13, Eq. 9's means
    triplets     S_i = s(λ_i) + (mean_j s(Q_ij) + mean_j s(P_ji))             Eq. 9, peft's order
    positions    each S_i's place in the stable descending order, and the score at place b:
                 keep S_i iff its place < b                                    the top-b(t) mask

The arithmetic is the PyTorch path's, op for op (``tl.fma`` where ATen's ``add(alpha=)``
multiplies and adds in one step); a row mean may sum in another order (fp32 rounding). A place
counts the scores above ``S_i`` and the equal ones before it, as ``torch.sort(descending=True,
stable=True)`` orders them (NaN above every number), so the kept set is the sort's ``order[:b]``.
That count is quadratic: above ``MAX_RANKED`` singular values the sort is used.

As adalora/rank_update.py: CUDA only, outside ``torch.compile``, in captured steps; an eager call
takes a kernel only the first time for each signature (dtypes, alignment, the integers Triton
specializes on), to compile it (adalora/launch_gate.py). Otherwise the callers keep their
PyTorch ops, which are the reference the tests hold these to.
"""
from __future__ import annotations

import functools
import os

import torch

from . import launch_gate
from .lowrank_gemm import have_triton

MAX_RANKED = 16384      # singular values ranked by counting; above, a sort (n² comparisons)


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def ema_rows(w_ptr, g_ptr, ibar_ptr, ubar_ptr, mean_ptr, rows, width, b1, c1, b2, c2, inv_width,
                 HAS_U: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
        rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        rw = tl.arange(0, BLOCK_W)
        total = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for w0 in range(0, width, BLOCK_W):
            cols = w0 + rw
            m = (rr[:, None] < rows) & (cols[None, :] < width)
            at = rr[:, None] * width + cols[None, :]
            w = tl.load(w_ptr + at, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + at, mask=m, other=0.0).to(tl.float32)
            ipt = tl.abs(g * w)                                            # I
            ib = tl.fma(ipt, c1, tl.load(ibar_ptr + at, mask=m, other=0.0) * b1)   # Ī
            tl.store(ibar_ptr + at, ib, mask=m)
            if HAS_U:
                ub = tl.fma(tl.abs(ipt - ib), c2, tl.load(ubar_ptr + at, mask=m, other=0.0) * b2)   # Ū
                tl.store(ubar_ptr + at, ub, mask=m)
                s = ib * ub
            else:
                s = ib
            total += tl.sum(tl.where(m, s, 0.0), axis=1)
        tl.store(mean_ptr + rr, total * inv_width, mask=rr < rows)

    @triton.jit
    def triplets(rows_ptr, lam_ptr, q_ptr, p_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        s_lam = tl.load(rows_ptr + tl.load(lam_ptr + i, mask=m, other=0), mask=m, other=0.0)
        s_q = tl.load(rows_ptr + tl.load(q_ptr + i, mask=m, other=0), mask=m, other=0.0)
        s_p = tl.load(rows_ptr + tl.load(p_ptr + i, mask=m, other=0), mask=m, other=0.0)
        tl.store(out_ptr + i, s_lam + (s_q + s_p), mask=m)

    @triton.jit
    def positions(s_ptr, budget_ptr, pos_ptr, thr_ptr, n, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        mi = i < n
        si = tl.load(s_ptr + i, mask=mi, other=0.0)
        nan_i = si != si
        place = tl.zeros((BLOCK_I,), dtype=tl.int32)           # n <= MAX_RANKED
        for j0 in range(0, n, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            sj = tl.load(s_ptr + j, mask=j < n, other=0.0)
            nan_j = sj != sj
            above = (sj[None, :] > si[:, None]) | (nan_j[None, :] & ~nan_i[:, None])
            equal = (sj[None, :] == si[:, None]) | (nan_j[None, :] & nan_i[:, None])
            first = above | (equal & (j[None, :] < i[:, None]))
            place += tl.sum((first & (j[None, :] < n)).to(tl.int32), axis=1)
        tl.store(pos_ptr + i, place, mask=mi)
        b = tl.minimum(tl.load(budget_ptr), n - 1)          # nothing pruned: a kept score, unused
        tl.store(thr_ptr + place * 0, si, mask=mi & (place == b))

    return ema_rows, triplets, positions


def _signature(name: str, tensors: tuple, ints: tuple, consts: tuple) -> tuple:
    """What Triton compiles a variant for: dtypes, 16-byte alignment, the integers' divisibility
    by 16 and equality to 1, the constants."""
    return (name, tensors[0].device, tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors),
            tuple((v % 16 == 0, v == 1) for v in ints), consts)


def available(t: torch.Tensor) -> bool:
    """Whether the kernels can run on ``t``: CUDA, Triton present, not compiling."""
    return t.is_cuda and have_triton() and not torch.compiler.is_compiling()


def ready(t: torch.Tensor, *signatures: tuple) -> bool:
    """Whether to take the kernels for launches of ``signatures`` on ``t`` now: ``available``,
    and captured if every one was launched before, eagerly if one was not (launch_gate.take)."""
    return available(t) and launch_gate.take(*signatures)


def _launch(kernel, grid, signature, *args, **meta) -> None:
    kernel[grid](*args, **meta)
    launch_gate.launched(signature)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# -- the importance EMAs ---------------------------------------------------------------------------
def _ema_meta(rows: int, width: int) -> dict:
    """A whole row per tile (no loop to wait on), tiles of 2048 elements, fewer where that gives
    264 programs (two per multiprocessor of an H100 or H200), down to 256."""
    block_w = min(1 << (width - 1).bit_length(), 8192)
    block_r = max(1, 2048 // block_w)
    while block_r > 1 and -(-rows // block_r) < 264 and block_r * block_w > 256:
        block_r //= 2
    return dict(BLOCK_W=block_w, BLOCK_R=block_r, num_warps=8 if block_r * block_w > 2048 else 4)


def ema_signature(w: torch.Tensor, g: torch.Tensor, ibar: torch.Tensor, ubar: torch.Tensor | None,
                  means: torch.Tensor) -> tuple:
    rows, width = w.shape[0], w.numel() // max(w.shape[0], 1)
    meta = _ema_meta(rows, width)
    return _signature("ema_rows", (w, g, ibar, ibar if ubar is None else ubar, means), (rows, width),
                      (ubar is not None, *meta.values()))


def ema_rows_(w: torch.Tensor, g: torch.Tensor, ibar: torch.Tensor, ubar: torch.Tensor | None,
              means: torch.Tensor, beta1: float, beta2: float) -> None:
    """One EMA step for a block of ``rows`` singular values: ``w`` and ``g`` ``(rows, width)`` or
    ``(rows,)`` contiguous, any float dtype; ``ibar``, ``ubar`` (None: sensitivity alone) the
    block's fp32 state, contiguous, in place; ``means (rows,)`` fp32 gets each row's mean of
    ``Ī · Ū`` (or ``Ī``)."""
    rows = w.shape[0]
    width = w.numel() // max(rows, 1)
    if not (g.shape == w.shape and ibar.numel() == w.numel() and (ubar is None or ubar.numel() == w.numel())
            and means.numel() == rows and all(t.is_contiguous() for t in (w, g, ibar, means))
            and ibar.dtype == means.dtype == torch.float32):
        raise ValueError(f"ema_rows_: w {tuple(w.shape)}, g {tuple(g.shape)}, ibar {ibar.numel()}, "
                         f"means {means.numel()}: shapes do not match, or not contiguous fp32 state")
    if rows == 0 or width == 0:
        return
    meta = _ema_meta(rows, width)
    if _interpreted():
        meta = dict(BLOCK_R=min(meta["BLOCK_R"], 4), BLOCK_W=min(meta["BLOCK_W"], 32), num_warps=4)
    kernel = _kernels()[0]
    grid = (-(-rows // meta["BLOCK_R"]),)
    _launch(kernel, grid, ema_signature(w, g, ibar, ubar, means), w, g, ibar, ibar if ubar is None else ubar,
            means, rows, width, float(beta1), float(1 - beta1), float(beta2), float(1 - beta2), 1.0 / width,
            HAS_U=ubar is not None, **meta)


# -- Eq. 9 -------------------------------------------------------------------------------------------
def triplets_signature(rows: torch.Tensor, lam_row: torch.Tensor) -> tuple:
    return _signature("triplets", (rows, lam_row), (lam_row.numel(),), ())


def triplets(rows: torch.Tensor, lam_row: torch.Tensor, q_row: torch.Tensor, p_row: torch.Tensor) -> torch.Tensor:
    """``rows[lam_row] + (rows[q_row] + rows[p_row])``: ``(n,)`` in ``rows``' dtype."""
    n = lam_row.numel()
    out = rows.new_empty(n)
    if n:
        block = 256 if _interpreted() else 1024
        _launch(_kernels()[1], (-(-n // block),), triplets_signature(rows, lam_row), rows, lam_row, q_row, p_row,
                out, n, BLOCK=block)
    return out


# -- the mask's order --------------------------------------------------------------------------------
def ranks_by_counting(n: int) -> bool:
    return 0 < n <= MAX_RANKED


def positions_signature(scores: torch.Tensor) -> tuple:
    return _signature("positions", (scores,), (scores.numel(),), (min(512, 1 << (scores.numel() - 1).bit_length()),))


def positions(scores: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(place, threshold)``: each score's place in the stable descending order of ``scores``
    (``(n,)`` int64; what ``argsort`` of the sort's indices gives) and, ``(1,)``, the score at
    place ``min(budget, n − 1)`` (``budget``: a ``(1,)`` integer tensor on the device)."""
    n = scores.numel()
    if not (scores.dim() == 1 and scores.is_contiguous() and ranks_by_counting(n) and budget.numel() == 1):
        raise ValueError(f"positions: scores {tuple(scores.shape)} must be 1-d, contiguous, of 1 to {MAX_RANKED}")
    place = torch.empty(n, dtype=torch.long, device=scores.device)
    threshold = scores.new_empty(1)
    # many short programs: at a few thousand scores the time is the loop's latency, not compares
    block_i, block_j = (16, 32) if _interpreted() else (16, min(512, 1 << (n - 1).bit_length()))
    _launch(_kernels()[2], (-(-n // block_i),), positions_signature(scores), scores, budget, place, threshold, n,
            BLOCK_I=block_i, BLOCK_J=block_j)
    return place, threshold
