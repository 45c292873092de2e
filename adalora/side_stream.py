"""The adapters' thin products on side CUDA streams, beside the frozen GEMM, in captured graphs.

On the epilogue path (adalora/fused.py, adalora/shared_input.py) an adapter's thin products read
only what the frozen GEMM beside them reads: forward ``hᵀ = (g ⊙ D) xᵀ`` beside ``y = x W0ᵀ``;
backward ``dU = s · Gᵀ h`` and ``d(g ⊙ D) = s · (G U)ᵀ x`` beside ``dx = G W0``. Each is a small
kernel with a rank-r output, which fills a fraction of the GPU for a few microseconds. Forked
onto a side stream from the capturing stream, and joined back before its result is read, it is
a parallel branch of the CUDA graph: the GPU can run it beside the frozen GEMM, not after it.

A backward has two independent branches: ``(G U)ᵀ``, which the in-place pass over ``dx`` reads,
then ``d(g ⊙ D)`` from it; and ``dU``. One stream would run them one after the other, and at
small widths those small kernels in a row can outlast the frozen GEMM beside them. So they take
two side streams (``lane`` 0 and 1), and the main stream waits for ``(G U)ᵀ`` alone before its
pass over ``dx``, not for the factor gradients.

Only while a CUDA graph is captured, and not under ``torch.compile`` (whose graphs schedule their
own kernels). Eager, a fork and a join cost the host two stream calls each, and an eager step is
bound by the host. Every kernel is the one a single stream runs, on the same inputs, so the
results are the same bit for bit.

Memory: tensors made on the side stream and read on the main one are marked with
``record_stream``, so that the caching allocator does not give their memory to the side stream's
next tensor while the main stream may still read it (during a capture it keeps such memory to
the capture's end). Tensors made on the main stream and read on the side one are the Function's
inputs and saved tensors, freed after the join.

    side = side_stream.fork(x)          # None: not capturing, or not CUDA
    with side_stream.on(side):
        ht = torch.mm(dg, x.t())        # the side branch
    y = F.linear(x, w, b)               # the main stream, meanwhile
    side_stream.join(side, ht)          # main waits for the branch; ht marked for main
"""
from __future__ import annotations

import contextlib

import torch

LANES = 2             # side streams per device
_STREAMS: dict = {}   # device -> its side streams (one per lane), made outside any capture


def prepare(t: torch.Tensor) -> None:
    """Make the side streams of ``t``'s device if ``t`` is a CUDA tensor and none exist. Called at
    every fused forward; the warm-up steps before a capture make them, outside the capture."""
    if (t.is_cuda and t.device not in _STREAMS and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()):
        _STREAMS[t.device] = tuple(torch.cuda.Stream(t.device) for _ in range(LANES))


def fork(t: torch.Tensor, lane: int = 0):
    """Side stream ``lane`` of ``t``'s device, made to wait for the current stream's work so far,
    while a CUDA graph is captured on ``t``'s device outside ``torch.compile``; None otherwise
    (everything stays on one stream)."""
    sides = _STREAMS.get(t.device) if t.is_cuda and not torch.compiler.is_compiling() else None
    side = None if sides is None else sides[lane]
    if side is None or not torch.cuda.is_current_stream_capturing():
        return None
    side.wait_stream(torch.cuda.current_stream(t.device))
    return side


def forks(t: torch.Tensor) -> tuple:
    """``fork`` of every lane, in lane order, with one check: ``(None, None)`` where ``fork``
    gives None. A backward's two branches take them."""
    first = fork(t)
    if first is None:
        return (None,) * LANES
    return (first,) + tuple(fork(t, lane) for lane in range(1, LANES))


def on(side):
    """The context that runs on ``side`` (no change for None)."""
    return torch.cuda.stream(side) if side is not None else contextlib.nullcontext()


def join(side, *made) -> None:
    """Make the current stream wait for ``side``'s work so far and mark the tensors ``made`` there
    (None allowed) as read by the current stream. Nothing for ``side`` None. Work put on ``side``
    afterwards runs on after it, unwaited for until the next join."""
    if side is None:
        return
    main = torch.cuda.current_stream(side.device)
    main.wait_stream(side)
    for t in made:
        if t is not None:
            t.record_stream(main)
