"""A GEMM with a rank-r term added in its epilogue, in Triton: ``out = a b + s · t e [+ bias]``.

``a (M, K)``, ``b (K, N)``, ``t (M, r)``, ``e (r, N)``, any strides. Each program accumulates
one ``(BLOCK_M, BLOCK_N)`` tile of ``a b`` in fp32, adds ``s · t e`` for its tile (one more small
``tl.dot``) and the bias, and writes ``out`` once: the rank-r term costs no pass over ``out``.

The fused adapter path (``fuse="triton"``, adalora/fused.py) calls it twice per adapter:

    forward    y  = x W0ᵀ + s · h Uᵀ + b            a = x, b = W0ᵀ, t = h = x (g ⊙ D)ᵀ, e = Uᵀ
    backward   dx = G W0  + s · (G U) (g ⊙ D)       a = G, b = W0,  t = G U,             e = g ⊙ D

``h`` and ``G U`` (thin products) stay with cuBLAS. Computing them inside this kernel's loop as
well (sharing the read of ``a``) was measured slower on an H200: the second accumulator spills
registers in the large tiles (adalora/README.md, "Fused path").

Triton ships with CUDA builds of torch; this module imports it only when called.
"""
import functools
import os

import torch

MAX_RANK = 64          # r is padded to a power of two >= 16 (tl.dot's smallest size); larger: not fused


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st, num_warps=wp)
               for bm, bn, bk, st, wp in ((128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 256, 64, 3, 8),
                                          (128, 256, 64, 4, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8))]

    @triton.jit
    def lowrank_gemm(a_ptr, b_ptr, t_ptr, e_ptr, bias_ptr, out_ptr, M, N, K, R, scale,
                     sam, sak, sbk, sbn, stm, str_, ser, sen, som, son,
                     HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
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
        rk = tl.arange(0, BLOCK_K)
        rr = tl.arange(0, BLOCK_R)
        # Rows past M and columns past N wrap around, not masked: they compute values that the
        # final store drops, and the loads in the loop stay unpredicated. The hints keep the
        # wrapped offsets known to be contiguous runs, so loads stay vectorized.
        rma = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
        rnb = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
        a_p = a_ptr + rma[:, None] * sam + rk[None, :] * sak
        b_p = b_ptr + rk[:, None] * sbk + rnb[None, :] * sbn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_p)
                b = tl.load(b_p)
            else:
                a = tl.load(a_p, mask=rk[None, :] < K - k0, other=0.0)
                b = tl.load(b_p, mask=rk[:, None] < K - k0, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_p += BLOCK_K * sak
            b_p += BLOCK_K * sbk
        t = tl.load(t_ptr + rma[:, None] * stm + rr[None, :] * str_, mask=rr[None, :] < R, other=0.0)
        e = tl.load(e_ptr + rr[:, None] * ser + rnb[None, :] * sen, mask=rr[:, None] < R, other=0.0)
        acc += scale * tl.dot(t, e, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rnb).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    # The key leaves out M (batch x sequence): a training run whose batches vary in length
    # tunes once per layer shape, not once per batch.
    return triton.autotune(configs=configs, key=["N", "K", "R"])(lowrank_gemm) if autotune else lowrank_gemm


# Triton's CPU interpreter (TRITON_INTERPRET=1, the unit tests) cannot time configs: one small tile.
_INTERPRETED = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def block_rank(r: int) -> int:
    """``r`` padded to what ``tl.dot`` takes: a power of two, at least 16."""
    return max(16, 1 << (r - 1).bit_length())


def lowrank_gemm(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, e: torch.Tensor, scale: float,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a b + s · t e + bias``, ``(M, N)`` in ``a``'s dtype, accumulated in fp32 (fp32 inputs
    multiply in IEEE fp32, not TF32). Any strides; ``r <= MAX_RANK``."""
    (M, K), N, R = a.shape, b.shape[1], t.shape[1]
    if not (b.shape[0] == K and t.shape[0] == M and e.shape == (R, N) and 0 < R <= MAX_RANK):
        raise ValueError(f"lowrank_gemm: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, t {tuple(t.shape)}, "
                         f"e {tuple(e.shape)} do not chain, or r > {MAX_RANK}")
    out = a.new_empty(M, N)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _kernel(not interpreted)
    grid = lambda meta: (-(-M // meta["BLOCK_M"]) * -(-N // meta["BLOCK_N"]),)   # noqa: E731
    # EVEN_K for every tile config: each config's BLOCK_K (64 or 128; 32 interpreted) divides it.
    kernel[grid](a, b, t, e, out if bias is None else bias, out, M, N, K, R, float(scale),
                 *a.stride(), *b.stride(), *t.stride(), *e.stride(), *out.stride(),
                 HAS_BIAS=bias is not None, BLOCK_R=block_rank(R), EVEN_K=K % 128 == 0,
                 PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **(_INTERPRETED if interpreted else {}))
    return out
