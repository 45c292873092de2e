"""When the library's Triton kernels launch (adalora/rank_update.py, adalora/alloc_kernels.py):
in captured CUDA steps, and in an eager call only to compile a launch not compiled yet.

An eager step waits on the host, and launched from Python a Triton kernel costs it about what the
PyTorch ops it replaces cost (several ``addmm_`` for ``rank_update``; an eager BERT-base step on
one H200 was no faster with the allocation kernels): there the ops run. A captured graph pays the
launch once, so a capture takes the kernels. Compiling (and autotuning, which synchronizes) may
not happen inside a capture, so a capture takes only a launch whose signature, what Triton
compiles a variant for, an eager call launched before; the warm-up steps before a capture make
those calls. Otherwise the callers keep their ops.
"""
from __future__ import annotations

import torch

_COMPILED: set = set()      # signatures launched outside a capture


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (False in a build of torch
    without CUDA)."""
    return torch.backends.cuda.is_built() and torch.cuda.is_current_stream_capturing()


def take(*signatures) -> bool:
    """Whether to launch the kernels of ``signatures`` now: captured, if every one was launched
    before; eagerly, only if one was not (to compile it)."""
    seen = all(s in _COMPILED for s in signatures)
    return seen if capturing() else not seen


def launched(*signatures) -> None:
    """Record launches made outside a capture: they are compiled."""
    if not capturing():
        _COMPILED.update(signatures)
