"""The merge path's weights ``W'_k = W0_k + s_k · U_k (g_k ⊙ D_k)`` for all of a model's adapters,
formed before its forward in one launch per weight shape.

On the merge path (adalora/fused.py) each adapter forms its ``W'`` as its forward reaches it:
one kernel per adapter, each a pass over a weight of a few MB that takes a GPU a microsecond of
traffic and several of launch and ramp-up (72 a step at BERT-base). Here the forward's
pre-hook (adalora/factor_batch.py) forms them all, from the factors it has just prepared, in one
Triton launch per weight shape: program ``(i, j, k)`` writes tile ``(i, j)`` of adapter ``k``'s
``W'``, reading its ``W0``, ``U`` and ``g ⊙ D`` through a table of addresses and strides. The
values are ``rank_update.merged_weight``'s: ``W0`` read in its dtype, ``s · U (g ⊙ D)`` summed
in fp32, rounded once to the product's dtype (the ``r`` terms may sum in another order).

The table is copied to the GPU from pinned host memory at each call. Under CUDA-graph capture
that copy is a node of the graph that reads the same host buffer at every replay, so the buffer
must outlive the graph and never change: a capture takes a spare buffer that an eager call with
the same signature made beforehand (the warm-up steps before a capture make those calls), and
keeps it for the process's life (a few hundred bytes a graph). A capture with no spare, and
every weight the kernel cannot take (not CUDA, not fp16/bf16, ``r > 64``, a ``W0`` that is not
row-major or of 2³¹ elements or more, under ``torch.compile``), gets ``merged_weight`` one by one.
"""
from __future__ import annotations

import functools
import os
import struct

import torch

from . import rank_update
from .lowrank_gemm import MAX_RANK, block_rank, have_triton

_INTERPRETED = dict(BLOCK_M=32, BLOCK_N=32)   # Triton's CPU interpreter cannot time tiles
_COLUMNS = 10   # per adapter: W0, W', U and g ⊙ D addresses; U's and g ⊙ D's strides; r; s (fp32 bits)
_SPARE: dict = {}   # signature -> a pinned table made eagerly, for the next capture of that signature
_KEPT: list = []    # pinned tables that captured graphs copy from at every replay


@functools.cache
def _kernel(autotune: bool):
    import triton
    import triton.language as tl

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=wp)
               for bm, bn, wp in ((64, 64, 4), (32, 128, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8))]

    @triton.jit
    def merged_weights(table_ptr, w_like, out_like, f_like, M, N, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # The *_like arguments are the first adapter's tensors: they type the addresses in the table.
        row = table_ptr + tl.program_id(2) * 10
        w_ptr = tl.load(row).to(tl.pointer_type(w_like.dtype.element_ty))
        out_ptr = tl.load(row + 1).to(tl.pointer_type(out_like.dtype.element_ty))
        a_ptr = tl.load(row + 2).to(tl.pointer_type(f_like.dtype.element_ty))
        b_ptr = tl.load(row + 3).to(tl.pointer_type(f_like.dtype.element_ty))
        sam, sar, sbr, sbn = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7)
        R = tl.load(row + 8)
        scale = tl.load(row + 9).to(tl.int32).to(tl.float32, bitcast=True)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rm[:, None] * sam + rr[None, :] * sar, mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rr[:, None] * sbr + rn[None, :] * sbn, mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        ab = tl.dot(a, b, input_precision=PRECISION)    # (BLOCK_M, BLOCK_N), fp32
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * N + rn[None, :]              # W0 and W' row-major
        tile = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (tile + scale * ab).to(out_like.dtype.element_ty), mask=mask)

    # Out of place: a timed trial leaves nothing to restore. The key leaves out the number of
    # adapters, which sets the grid alone.
    return triton.autotune(configs=configs, key=["M", "N", "BLOCK_R"])(merged_weights) if autotune else merged_weights


def takes(w: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernel can form ``W'`` of ``W0 = w`` with ``U = up`` in ``dtype``."""
    return (w.is_cuda and dtype in rank_update.DTYPES and 0 < up.shape[1] <= MAX_RANK and w.numel() < 2**31
            and w.is_contiguous() and not torch.compiler.is_compiling() and have_triton())


def merged_weights(items: list, dtype: torch.dtype) -> list[torch.Tensor]:
    """``[W'_k]`` for ``items = [(W0_k, U_k, (g ⊙ D)_k, s_k)]``: each a new row-major tensor in
    ``dtype``, as ``rank_update.merged_weight(W0_k, U_k, (g ⊙ D)_k, s_k, dtype)`` forms it; one
    kernel launch per shape of ``W0`` where ``takes`` and two or more share it (module docstring)."""
    out: list = [None] * len(items)
    shapes: dict = {}
    for k, (w, up, dg, s) in enumerate(items):
        if takes(w, up, dtype):
            shapes.setdefault((tuple(w.shape), w.dtype, w.device), []).append(k)
        else:
            out[k] = rank_update.merged_weight(w, up, dg, s, dtype)
    for ks in shapes.values():
        group = [items[k] for k in ks]
        made = launch(group, dtype) if len(ks) > 1 else None
        for k, item, w_new in zip(ks, group, made or [None] * len(ks)):
            out[k] = w_new if w_new is not None else rank_update.merged_weight(*item, dtype)
    return out


def launch(group: list, dtype: torch.dtype, interpreted: bool | None = None) -> list[torch.Tensor] | None:
    """The kernel over ``group`` (items of one ``W0`` shape, factors castable to ``dtype``);
    None where a capture finds no spare table. ``interpreted``: Triton's CPU interpreter
    (default: as TRITON_INTERPRET says), where the table stays on the host."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" if interpreted is None else interpreted
    w0 = group[0][0]
    (M, N), device = w0.shape, w0.device
    if any(w.shape != (M, N) or not w.is_contiguous() for w, *_ in group):
        raise ValueError("merge_batch.launch: every W0 of a launch has one shape and is row-major")
    factors = [(up.to(dtype), dg.to(dtype)) for _, up, dg, _ in group]
    outs = [torch.empty(M, N, dtype=dtype, device=device) for _ in group]
    rows = []
    for (w, *_, s), (up, dg), w_new in zip(group, factors, outs):
        if up.shape != (M, up.shape[1]) or dg.shape != (up.shape[1], N) or not 0 < up.shape[1] <= MAX_RANK:
            raise ValueError(f"merge_batch.launch: U {tuple(up.shape)} and g ⊙ D {tuple(dg.shape)} do not "
                             f"chain to W0 {(M, N)}, or r > {MAX_RANK}")
        rows.append([w.data_ptr(), w_new.data_ptr(), up.data_ptr(), dg.data_ptr(), *up.stride(), *dg.stride(),
                     up.shape[1], struct.unpack("<i", struct.pack("<f", float(s)))[0]])
    key = (M, N, w0.dtype, dtype, device, len(group))
    table = torch.tensor(rows, dtype=torch.int64) if interpreted else _device_table(key, rows, device)
    if table is None:
        return None
    r_max = max(up.shape[1] for up, _ in factors)
    grid = lambda meta: (-(-M // meta["BLOCK_M"]), -(-N // meta["BLOCK_N"]), len(group))   # noqa: E731
    _kernel(not interpreted)[grid](table, w0, outs[0], factors[0][0], M, N, BLOCK_R=block_rank(r_max),
                                   PRECISION="ieee" if dtype == torch.float32 else "tf32",
                                   **(_INTERPRETED if interpreted else {}))
    return outs


def _device_table(key, rows, device):
    """``rows`` on ``device`` through pinned memory; under capture, through a spare kept for good."""
    if torch.cuda.is_current_stream_capturing():
        host = _SPARE.pop(key, None)
        if host is None:
            return None
        _KEPT.append(host)
    else:
        host = torch.empty(len(rows), _COLUMNS, dtype=torch.int64, pin_memory=True)
        if key not in _SPARE:
            _SPARE[key] = torch.empty_like(host, pin_memory=True)
    host.copy_(torch.tensor(rows, dtype=torch.int64))
    return host.to(device, non_blocking=True)
