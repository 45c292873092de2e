"""A GEMM with a rank-r term inside it, in Triton: ``out = a b + s · (a c) e [+ bias]``.

``a (M, K)``, ``b (K, N)``, ``c (K, r)``, ``e (r, N)``. Each program computes one
``(BLOCK_M, BLOCK_N)`` tile of ``out`` and, in the same loop over ``K``, the ``(BLOCK_M, r)``
rows of ``t = a c``: ``a`` is read once for both products. ``t`` is rounded to the input dtype
(as the unfused path stores it), multiplied by ``e``'s tile and added before ``out`` is written
once. The programs of the first column of tiles also write ``t``.

The fused adapter path (``fuse="triton"``, adalora/fused.py) calls it twice per adapter:

    forward    y  = x W0ᵀ + s · (x (g ⊙ D)ᵀ) Uᵀ + b      a = x, b = W0ᵀ, c = (g ⊙ D)ᵀ, e = Uᵀ; t = h
    backward   dx = G W0  + s · (G U) (g ⊙ D)            a = G, b = W0,  c = U,        e = g ⊙ D; t = G U

so the adapter adds no pass over an ``(N, d)`` tensor to the frozen GEMMs: what remains of it is
``d(g ⊙ D) = s · (G U)ᵀ x`` and ``dU = s · Gᵀ h``, one read of x and one of G.

Triton ships with CUDA builds of torch; this module imports it only when called.
"""
from __future__ import annotations

import functools
import os

import torch

MAX_RANK = 64          # r is padded to a power of two >= 16 (tl.dot's smallest size); larger: not fused
DTYPES = (torch.float16, torch.bfloat16, torch.float32)   # what tl.dot multiplies (fp32 in IEEE mode)


@functools.cache
def have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
               for bm, bn, bk, st, wp in ((128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8),
                                          (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))]

    @triton.jit
    def lowrank_gemm(a_ptr, b_ptr, c_ptr, e_ptr, bias_ptr, out_ptr, t_ptr, M, N, K, R, scale,
                     sam, sak, sbk, sbn, sck, scr, ser, sen, som, son, stt,
                     HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # Grouped tile order: GROUP_M row blocks share the columns of b while they sit in L2.
        pid = tl.program_id(0)
        grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        size_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(a_ptr + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_ptr + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            c = tl.load(c_ptr + kk[:, None] * sck + rr[None, :] * scr, mask=(kk[:, None] < K) & (rr[None, :] < R), other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            acc_t = tl.dot(a, c, acc_t, input_precision=PRECISION)
        t = acc_t.to(out_ptr.dtype.element_ty)         # rounded as the unfused path stores h (or G U)
        e = tl.load(e_ptr + rr[:, None] * ser + rn[None, :] * sen, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc += scale * tl.dot(t, e, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))
        if pid_n == 0:   # t is stored transposed, (r, M) row-major: see lowrank_gemm
            tl.store(t_ptr + rr[None, :] * stt + rm[:, None], t, mask=(rm[:, None] < M) & (rr[None, :] < R))

    # The key leaves out M (batch x sequence): a training run whose batches vary in length
    # tunes once per layer shape, not once per batch.
    return triton.autotune(configs=configs, key=["N", "K", "R"])(lowrank_gemm) if autotune else lowrank_gemm


# Triton's CPU interpreter (TRITON_INTERPRET=1, the unit tests) cannot time configs: one small tile.
_INTERPRETED = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s · a b`` as one cuBLAS (or CPU) GEMM, ``s`` applied in its epilogue: with ``beta=0``
    addmm never reads its first argument (documented; nan or inf there do not propagate), so it
    can be empty. The fused paths' thin products backward."""
    return torch.addmm(a.new_empty(()), a, b, beta=0, alpha=s)


def block_rank(r: int) -> int:
    """``r`` padded to what ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, 1 << (r - 1).bit_length())


def lowrank_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, e: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a b + s · (a c) e + bias, (a c)ᵀ)``: shapes ``(M, N)`` and ``(r, M)``, in ``a``'s dtype.

    Any strides; ``r <= MAX_RANK``. Accumulates in fp32 (fp32 inputs multiply in IEEE fp32, not
    TF32); ``a c`` is rounded to ``a``'s dtype before it multiplies ``e``. ``a c`` comes back as
    a row-major ``(r, M)``, the layout of ``hᵀ`` on the unfused path: the products that read it
    then never have ``r`` as a leading dimension."""
    (M, K), N, R = a.shape, b.shape[1], c.shape[1]
    if not (b.shape[0] == K == c.shape[0] and e.shape == (R, N) and 0 < R <= MAX_RANK):
        raise ValueError(f"lowrank_gemm: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)}, "
                         f"e {tuple(e.shape)} do not chain, or r > {MAX_RANK}")
    out = a.new_empty(M, N)
    t = a.new_empty(R, M)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _kernel(not interpreted)
    grid = lambda meta: (-(-M // meta["BLOCK_M"]) * -(-N // meta["BLOCK_N"]),)   # noqa: E731
    kernel[grid](a, b, c, e, out if bias is None else bias, out, t, M, N, K, R, float(scale),
                 *a.stride(), *b.stride(), *c.stride(), *e.stride(), *out.stride(), t.stride(0),
                 HAS_BIAS=bias is not None, BLOCK_R=block_rank(R),
                 PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **(_INTERPRETED if interpreted else {}))
    return out, t
