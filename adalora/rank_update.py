"""``out += s · a b`` in place for a thin ``a (M, r)`` and ``b (r, N)``: the fused paths'
rank-r shares of the output and of the input gradient, as one streaming pass in Triton.

The epilogue path (adalora/fused.py) adds ``s · h Uᵀ`` into the frozen product's ``y`` and
``s · (G U)(g ⊙ D)`` into its ``dx``, each an ``(N, d)`` tensor read and written once. cuBLAS
runs these as GEMMs with ``K = r`` and ``beta = 1``, with tiles made for a long ``K``. On one
H200, at the large benchmark shape with bf16 weights, this kernel's 239 passes a step take 3.6 ms
of kernel time, beside the thin products on the side streams (the top kernels in
analysis/benchmarks/h200_paths_step_large_bf16_3dccf96.json). Here each
program loads one ``(BLOCK_M, BLOCK_N)`` tile of ``out``, the ``(BLOCK_M, r)`` rows of ``a`` and
the ``(r, BLOCK_N)`` columns of ``b``, multiplies the two thin tiles in fp32, adds ``s`` times
the product to the tile in fp32 and stores it rounded once: what ``out.addmm_(a, b, alpha=s)``
computes (the ``r`` terms may sum in another order). The merge path's weight
``W' = W0 + s · U (g ⊙ D)`` (``merged_weight``) is the same pass, read from ``W0`` and written
to a new tensor.

``add_`` takes the kernel for fp16 and bf16 CUDA tensors of fewer than 2³¹ elements, ``r <= 64``,
outside ``torch.compile`` (whose graphs keep ``addmm_``, and fuse it themselves), and only while
a CUDA graph is being captured. Launched from Python, a Triton kernel costs the host several
times what ``addmm_`` costs, and an eager step is bound by the host: there the few microseconds
the kernel saves on the device are lost. A captured graph pays the launch once. Elsewhere it is
``addmm_``.

The first eager call with each signature (shapes, strides, dtype, device, and the 16-byte
alignment of the three tensors: what Triton compiles a variant of the kernel for) takes the
kernel, so that it is compiled, and its tile shape tuned per ``(N, r)`` with ``out`` restored
after each trial, outside any capture: tuning synchronizes, and neither may happen while a graph
is captured. The warm-up steps before a capture make those calls. A capture of a signature never
run eagerly keeps ``addmm_`` (adalora/launch_gate.py).
"""
from __future__ import annotations

import functools
import os

import torch

from . import launch_gate
from .lowrank_gemm import MAX_RANK, block_rank, have_triton

DTYPES = (torch.float16, torch.bfloat16)   # fp32 would multiply in TF32 or slowly in IEEE: addmm_
_INTERPRETED = dict(BLOCK_M=32, BLOCK_N=32)  # Triton's CPU interpreter cannot time tiles


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=wp)
               for bm, bn, wp in ((64, 64, 4), (32, 128, 8), (64, 128, 4), (64, 128, 8), (32, 64, 4))]

    @triton.jit
    def rank_update(out_ptr, src_ptr, a_ptr, b_ptr, M, N, R, scale, som, son, ssm, ssn, sam, sar, sbr, sbn,
                    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        ab = tl.dot(a, b, input_precision=PRECISION)    # (BLOCK_M, BLOCK_N), fp32
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        tile = tl.load(src_ptr + rm[:, None] * ssm + rn[None, :] * ssn, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, (tile + scale * ab).to(out_ptr.dtype.element_ty),
                 mask=mask)

    # The key leaves out M (batch x sequence), as lowrank_gemm's does; out is restored after
    # each timed trial, since the kernel writes it in place.
    return (triton.autotune(configs=configs, key=["N", "R"], restore_value=["out_ptr"])(rank_update)
            if autotune else rank_update)


def _signature(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple:
    return (out.dtype, out.device) + tuple((t.shape, t.stride(), t.data_ptr() % 16) for t in (out, a, b))


def runs(out: torch.Tensor, r: int, dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernel can write ``out`` (in ``dtype``, ``out``'s by default) with rank
    ``r``: CUDA only (on the CPU ``addmm_`` is as fast, and Triton's interpreter has no bf16),
    fewer than 2³¹ elements (the kernel's offsets are 32-bit), not compiling."""
    return (out.is_cuda and (dtype or out.dtype) in DTYPES and 0 < r <= MAX_RANK and out.numel() < 2**31
            and not torch.compiler.is_compiling() and have_triton())


def add_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``out += s · a b`` in place (``out (M, N)``, ``a (M, r)``, ``b (r, N)``, any strides, one
    dtype); returns ``out``. The kernel under CUDA-graph capture, once per signature eagerly to
    compile and tune it, ``addmm_`` otherwise (module docstring)."""
    return _update(out, out, a, b, s)


def merged_weight(w: torch.Tensor, up: torch.Tensor, dg: torch.Tensor, s: float,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The merge path's ``W' = W0 + s · U (g ⊙ D)`` ``(d_out, d_in)``, a new row-major tensor in
    ``dtype`` (the product's; W0's by default), by the same rules as ``add_`` (``addmm`` where
    that takes ``addmm_``; cuBLAS would run it as a GEMM with ``K = r`` too). ``U (d_out, r)``
    and ``g ⊙ D (r, d_in)`` are multiplied in ``dtype`` (cast where they are not, as autocast
    casts them for the unfused products); an fp32 W0 under autocast is added in fp32 and
    rounded once, as autocast's cast of W0 would round it. ``d_out · d_in · r`` multiply-adds:
    fewer than the ``N · r · (d_in + d_out)`` of the rank-r products it replaces once ``N``
    exceeds the widths' product over their sum."""
    # DEVIATION: the unfused path adds s · h Uᵀ to y; here the sum is rounded per weight, once,
    # to the product's dtype. With bf16 weights the forward so sees U (g ⊙ D) on the grid of
    # W0's values (a change under half a unit in the last place of a W0 entry is rounded away),
    # while every gradient multiplies the factors themselves.
    dtype = dtype or w.dtype
    # autocast off: it would run the addmm below in its dtype, rounding W0 before the sum
    with torch.autocast(w.device.type, enabled=False):
        return _update(None, w, up.to(dtype), dg.to(dtype), s, dtype)


def _update(out, src, a, b, s, dtype=None):
    """``out = src + s · a b``; with ``out`` None a new tensor in ``dtype``: ``add_`` and
    ``merged_weight``."""
    if runs(src, a.shape[1], dtype):
        key = ("rank_update",) + _signature(src, a, b) + (out is None, dtype)
        if launch_gate.take(key):
            launch_gate.launched(key)
            new = torch.empty(src.shape, dtype=dtype, device=src.device) if out is None else out
            return kernel_(new, a, b, s, src)
    if out is not None:
        return out.addmm_(a, b, alpha=s)
    if src.dtype == dtype:
        return torch.addmm(src, a, b, alpha=s)
    return torch.addmm(src, a.to(src.dtype), b.to(src.dtype), alpha=s).to(dtype)   # in W0's dtype, rounded once


def kernel_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float,
            src: torch.Tensor | None = None) -> torch.Tensor:
    """``add_`` through the Triton kernel (with ``src``: ``out = src + s · a b``, as
    ``merged_weight``), whatever the dtype (the tests run fp32 and fp16 in the interpreter,
    which has no bf16)."""
    (M, N), R = out.shape, a.shape[1]
    src = out if src is None else src
    if not (a.shape[0] == M and b.shape == (R, N) and src.shape == out.shape and 0 < R <= MAX_RANK):
        raise ValueError(f"rank_update: shapes out {tuple(out.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)} "
                         f"do not chain, or r > {MAX_RANK}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    grid = lambda meta: (-(-M // meta["BLOCK_M"]), -(-N // meta["BLOCK_N"]))   # noqa: E731
    _kernel(not interpreted)[grid](out, src, a, b, M, N, R, float(s), *out.stride(), *src.stride(),
                                   *a.stride(), *b.stride(), BLOCK_R=block_rank(R),
                                   PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
                                   **(_INTERPRETED if interpreted else {}))
    return out
