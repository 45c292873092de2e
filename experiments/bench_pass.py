"""One adapted linear map at a time, in CUDA graphs: can a kernel that joins the adapter's rank-r
term to the frozen product beat cuBLAS's GEMM with the epilogue path's in-place pass beside it?

    python -m experiments.bench_pass [--presets base large smollm2 llama1b] [--out FILE.json]

For each distinct weight shape of a benchmark preset (N = batch × seq tokens, bf16, rank 12), the
forward ``y = x W0ᵀ + s · (x Dᵀ) Uᵀ`` and the input gradient ``dx = G W0 + s · (G U) D`` (the
``D`` there standing for ``g ⊙ D``), each by:

  cublas     the frozen product alone: what the floor runs
  epilogue   the default path: cuBLAS's GEMM, the thin product on a side stream, rank_update's pass
  triton     adalora.lowrank_gemm, the ``triton`` path's kernel: the thin product in the GEMM's loop
  tma        the same kernel with Hopper's TMA loads (tensor descriptors), autotuned over 30 tiles
  tma_gemm   that kernel without the rank-r term: Triton's GEMM alone, against cublas
  row        cuBLAS's GEMM, then one pass per block of rows that forms the thin product from those
             rows and adds its share: the epilogue path's two adapter kernels as one, no side stream

Each is REPS calls captured in one CUDA graph, timed over replays (median, µs a call). Every
candidate's output is compared with an fp32 product (largest error over largest value). The file
records commit, machine and versions. The kernels here are candidates, not library code.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import time
from pathlib import Path

import torch

from adalora import lowrank_gemm, rank_update

from .benchmark import DECODERS, PRESETS
from .provenance import git_commit, versions
from .runlog import atomic_write_json

RANK, SCALE, REPS, REPLAYS = 12, 1.5, 20, 15
BLOCK_R = 16                               # r padded for tl.dot
CANDIDATES = ("cublas", "epilogue", "triton", "tma", "tma_gemm", "row")
_INTERPRETED = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)   # Triton's CPU interpreter: one tile


def shapes(preset: str) -> list[tuple[int, int, int]]:
    """``(N, d_in, d_out)`` of every distinct adapted map of ``preset`` (six matrix types in BERT,
    seven in Llama, as the benchmark adapts them)."""
    _, hidden, heads, inter, seq, batch = PRESETS[preset]
    kv = DECODERS[preset][1] * hidden // heads if preset in DECODERS else hidden
    maps = [(hidden, hidden), (hidden, kv), (hidden, inter), (inter, hidden)]
    return [(seq * batch, i, o) for i, o in dict.fromkeys(maps)]


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def tma_tile(a_desc, b_desc, c_desc, e_desc, o_desc, t_ptr, M, N, K, R, scale,
                 B_NK: tl.constexpr, HAS_R: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # out = a B + s · (a cᵀ) e, B = bᵀ if B_NK else b; the (BLOCK_M, r) rows of t = a cᵀ in the
        # same loop over K, as lowrank_gemm's kernel does, but every tile through TMA.
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        width = GROUP_M * num_n
        first_m = (pid // width) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        om = (first_m + (pid % width) % size_m) * BLOCK_M
        pid_n = (pid % width) // size_m
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([om, k0])
            b = b_desc.load([on, k0]).T if B_NK else b_desc.load([k0, on])
            acc = tl.dot(a, b, acc)
            if HAS_R:
                acc_t = tl.dot(a, c_desc.load([0, k0]).T, acc_t)
        if HAS_R:
            t = acc_t.to(o_desc.dtype)
            acc += scale * tl.dot(t, e_desc.load([0, on]))
            if pid_n == 0:    # t stored transposed, (r, M) row-major, as hᵀ on the library's paths
                rm, rr = om + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_R)
                tl.store(t_ptr + rr[None, :] * M + rm[:, None], t, mask=(rm[:, None] < M) & (rr[None, :] < R))
        o_desc.store([om, on], acc.to(o_desc.dtype))

    def hook(nargs):   # the descriptors' boxes follow the tile the autotuner tries
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["a_desc"].block_shape = [bm, bk]
        nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]
        nargs["c_desc"].block_shape = [BLOCK_R, bk]
        nargs["e_desc"].block_shape = [BLOCK_R, bn]
        nargs["o_desc"].block_shape = [bm, bn]

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=st,
                             num_warps=wp, pre_hook=hook)
               for bm, bn, bk, st, wp in itertools.product((64, 128), (64, 128, 256), (64, 128), (3, 4, 5), (4, 8))
               if not (bk == 128 and (st == 5 or bn == 256))
               and not (bm * bn > 128 * 128 and wp == 4 or bm * bn <= 64 * 128 and wp == 8)]
    tuned = triton.autotune(configs, key=["M", "N", "K", "R", "B_NK", "HAS_R"])(tma_tile)

    @triton.jit
    def row_pass(out_ptr, a_ptr, c_ptr, e_ptr, t_ptr, M, N, KA, R, scale, som, sam, scr, ser,
                 BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        # out[rows] += s · (a[rows] cᵀ) e: the thin product over a's whole rows, then the pass.
        # Block sizes divide M, KA and N (the caller picks such tiles), so no masks on a or out.
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rr, rk, rn = tl.arange(0, BLOCK_R), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, KA, BLOCK_K):
            a = tl.load(a_ptr + rm[:, None] * sam + (k0 + rk)[None, :])
            c = tl.load(c_ptr + rr[:, None] * scr + (k0 + rk)[None, :], mask=rr[:, None] < R, other=0.0)
            acc = tl.dot(a, c.T, acc)
        t = acc.to(out_ptr.dtype.element_ty)
        tl.store(t_ptr + rr[None, :] * M + rm[:, None], t, mask=rr[None, :] < R)
        for n0 in range(0, N, BLOCK_N):
            e = tl.load(e_ptr + rr[:, None] * ser + (n0 + rn)[None, :], mask=rr[:, None] < R, other=0.0)
            p = out_ptr + rm[:, None] * som + (n0 + rn)[None, :]
            tl.store(p, (tl.load(p).to(tl.float32) + scale * tl.dot(t, e)).to(out_ptr.dtype.element_ty))

    return tma_tile, tuned, row_pass


def tma(a, b, b_nk: bool, c, e, s: float, rank_term: bool = True):
    """``(a B + s · (a cᵀ) e, (a cᵀ)ᵀ)`` with ``B = bᵀ`` if ``b_nk`` else ``b``; ``a (M, K)``,
    ``c (r, K)`` and ``e (r, N)`` row-major. Without ``rank_term``, ``a B`` alone (and t None)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    plain, tuned, _ = _kernels()
    (M, K), N, R = a.shape, (b.shape[0] if b_nk else b.shape[1]), c.shape[0]
    out, t = a.new_empty(M, N), a.new_empty(R, M)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    tiles = _INTERPRETED if interpreted else None
    box = lambda x, rows, cols: TensorDescriptor.from_tensor(x, [rows, cols])   # noqa: E731
    if tiles:
        bm, bn, bk = tiles["BLOCK_M"], tiles["BLOCK_N"], tiles["BLOCK_K"]
        descs = (box(a, bm, bk), box(b, bn, bk) if b_nk else box(b, bk, bn), box(c, BLOCK_R, bk),
                 box(e, BLOCK_R, bn), box(out, bm, bn))
        grid = (-(-M // bm) * -(-N // bn),)
        plain[grid](*descs, t, M, N, K, R, float(s), B_NK=b_nk, HAS_R=rank_term, BLOCK_R=BLOCK_R, **tiles)
    else:
        descs = [box(x, 16, 16) for x in (a, b, c, e, out)]      # boxes set per tile by the hook
        grid = lambda m: (-(-M // m["BLOCK_M"]) * -(-N // m["BLOCK_N"]),)   # noqa: E731
        tuned[grid](*descs, t, M, N, K, R, float(s), B_NK=b_nk, HAS_R=rank_term, BLOCK_R=BLOCK_R)
    return out, (t if rank_term else None)


def row_pass_(out, a, c, e, s: float, tile: tuple[int, int, int, int, int]):
    """``out += s · (a cᵀ) e`` in place, one program per ``BLOCK_M`` rows; returns ``(out, (a cᵀ)ᵀ)``.
    ``tile`` = (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages), each block dividing its size."""
    bm, bk, bn, wp, st = tile
    (M, N), KA, R = out.shape, a.shape[1], c.shape[0]
    if M % bm or KA % bk or N % bn:
        raise ValueError(f"row pass: tile {tile} does not divide ({M}, {KA}, {N})")
    t = out.new_empty(R, M)
    _kernels()[2][(M // bm,)](out, a, c, e, t, M, N, KA, R, float(s), out.stride(0), a.stride(0), c.stride(0),
                              e.stride(0), BLOCK_R=BLOCK_R, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn,
                              num_warps=wp, num_stages=st)
    return out, t


def graph_us(fn) -> float:
    """µs a call: REPS calls captured in one CUDA graph (after three uncaptured calls on a side
    stream, which compile and tune), median over REPLAYS replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / REPS)
    return statistics.median(times)


def candidates(a, w, b_nk: bool, c, e, side) -> dict:
    """Each candidate as a function returning its output: ``a (N, K)``, frozen ``w`` (``d_out, d_in``;
    multiplied transposed if ``b_nk``), ``c (r, K)``, ``e (r, d)``."""
    wop = w.t() if b_nk else w

    def epilogue():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        with torch.cuda.stream(side):
            tt = torch.mm(c, a.t())                       # (r, N), as the library's hᵀ and (G U)ᵀ
        y = torch.mm(a, wop)
        cur.wait_stream(side)
        return rank_update.kernel_(y, tt.t(), e, SCALE)

    return {"cublas": lambda: torch.mm(a, wop), "epilogue": epilogue,
            "triton": lambda: lowrank_gemm.lowrank_gemm(a, wop, c.t(), e, SCALE)[0],
            "tma": lambda: tma(a, w, b_nk, c, e, SCALE)[0],
            "tma_gemm": lambda: tma(a, w, b_nk, c, e, SCALE, rank_term=False)[0]}


def row_tiles(M: int, KA: int, N: int):
    return [t for t in itertools.product((16, 32, 64), (64, 128), (64, 128, 256), (4, 8), (2, 3))
            if not (M % t[0] or KA % t[1] or N % t[2])]


def measure(N: int, d_in: int, d_out: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)   # noqa: E731
    x, grad = rnd(N, d_in), rnd(N, d_out)
    w, down, up_t = rnd(d_out, d_in) / d_in ** 0.5, rnd(RANK, d_in) / d_in ** 0.5, rnd(RANK, d_out) / 3
    side, rows = torch.cuda.Stream(), []
    for direction, (a, b_nk, c, e) in (("forward", (x, True, down, up_t)), ("input gradient", (grad, False, up_t, down))):
        wop = w.t() if b_nk else w
        t32 = (a.float() @ c.float().t()).bfloat16().float()
        ref = a.float() @ wop.float()
        ref_adapted = ref + SCALE * t32 @ e.float()
        fns = candidates(a, w, b_nk, c, e, side)
        best = min(row_tiles(N, a.shape[1], e.shape[1]),
                   key=lambda tile: graph_us(lambda: row_pass_(torch.mm(a, wop), a, c, e, SCALE, tile)))
        fns["row"] = lambda: row_pass_(torch.mm(a, wop), a, c, e, SCALE, best)[0]
        for name in CANDIDATES:
            out = fns[name]().float()
            want = ref if name in ("cublas", "tma_gemm") else ref_adapted
            rows.append({"n_tokens": N, "d_in": d_in, "d_out": d_out, "direction": direction, "candidate": name,
                         "us": round(graph_us(fns[name]), 2),
                         "rel_err": float((out - want).abs().max() / want.abs().max()),
                         **({"tile": list(best)} if name == "row" else {})})
        print(N, d_in, d_out, direction, {r["candidate"]: r["us"] for r in rows[-len(CANDIDATES):]}, flush=True)
    return rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench_pass", description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["base", "large", "smollm2", "llama1b"], choices=list(PRESETS))
    ap.add_argument("--out", default=None, help="results JSON (default: print only)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the candidates are CUDA-graph-timed GPU kernels)")
    import triton
    runs = []
    for preset in a.presets:
        for N, d_in, d_out in shapes(preset):
            runs += [{"preset": preset, **r} for r in measure(N, d_in, d_out)]
    result = {"kind": "pass_benchmark", "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "machine": f"1x {torch.cuda.get_device_name()}", "versions": {**versions(), "triton": triton.__version__},
              "command": ["python -m experiments.bench_pass --presets " + " ".join(a.presets)],
              "setup": f"bf16, rank {RANK}, scale {SCALE}; {REPS} calls per CUDA graph, median of {REPLAYS} replays",
              "runs": runs}
    if a.out:
        atomic_write_json(Path(a.out), result)
    return result


if __name__ == "__main__":
    main()
