"""Data parallelism: ``torchrun --nproc_per_node N -m experiments.train ...`` (DDP).

The contract, in the words of the loop:

* Every rank builds the same model (same seed) and the adapters are injected *before* the
  model is wrapped in ``DistributedDataParallel``, so the parameters DDP all-reduces are the
  very tensors the allocator scores.
* A global micro-batch of ``world_size * batch_size`` examples is drawn from the seeded
  stream; rank ``r`` takes the ``r``-th contiguous slice (a deterministic DistributedSampler).
* DDP averages gradients, so after the last micro-batch of an optimizer step (earlier ones run
  under ``no_sync``) every rank holds the gradient of the full global batch: importance scores
  and masks are identical on every rank by construction. ``check_masks`` verifies it with one
  all-reduce per mask step and raises if they ever diverge.
* Rank 0 owns the run folder; other ranks write nothing but their errors.

No Hydra here; ``train.py`` calls ``init()`` before Hydra runs (torchrun sets the env vars).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def gpu_index(local_rank: int) -> int:
    """This rank's GPU. Ranks share GPUs only under ``ADALORA_DIST_BACKEND=gloo`` (NCCL refuses two
    ranks on one device): a way to run the distributed path on a one-GPU machine, not a speed-up."""
    n = torch.cuda.device_count()
    if local_rank >= n and os.environ.get("ADALORA_DIST_BACKEND") != "gloo":
        raise ValueError(f"local rank {local_rank} but {n} GPU(s): use torchrun --nproc_per_node {n} "
                         "(or ADALORA_DIST_BACKEND=gloo to share GPUs, for testing)")
    return local_rank % n


def init(timeout_s: float = 1800.0) -> Dist:
    """Join the process group torchrun describes: gloo for CPU tensors, NCCL for CUDA ones
    (``ADALORA_DIST_BACKEND`` overrides, e.g. ``gloo``)."""
    if not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = os.environ.get("ADALORA_DIST_BACKEND")
        if torch.cuda.is_available():
            torch.cuda.set_device(gpu_index(local))
            backend = backend or "cpu:gloo,cuda:nccl"     # small control tensors stay on the CPU
        else:
            backend = backend or "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current()


def current() -> Dist:
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return Dist(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    return Dist()


def device_for(requested: str, d: Dist) -> torch.device:
    """``trainer.device``: auto -> this rank's GPU if there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", gpu_index(d.local_rank) if d.enabled else torch.cuda.current_device())
    return dev


def wrap(model: torch.nn.Module, device: torch.device, d: Dist) -> torch.nn.Module:
    """The module the loop runs forward/backward through: DDP under torchrun, else the model.

    No buffer sync in forward: the only buffers that change are the rank masks, which the
    allocator computes identically on every rank; broadcasting them from rank 0 every forward
    would hide exactly the divergence ``check_masks`` exists to catch.
    """
    if not d.enabled:
        return model
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in \
        inspect.signature(DDP.__init__).parameters else {"broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def shard(global_idx: torch.Tensor, d: Dist) -> torch.Tensor:
    """Rank ``r``'s contiguous slice of a global micro-batch of ``world_size * B`` indices."""
    b = global_idx.numel() // d.world_size
    return global_idx[d.rank * b:(d.rank + 1) * b]


# ---- collectives (CPU tensors: gloo, also under "cpu:gloo,cuda:nccl") -----------------------
def broadcast_object(obj: T, d: Dist) -> T:
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], d: Dist) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result or raises its error (so a
    refused resume on rank 0 never leaves the other ranks waiting in a collective)."""
    if not d.enabled:
        return fn()
    err, out = None, None
    if d.is_main:
        try:
            out = fn()
        except Exception as e:       # re-raised below on every rank
            err = e
    ok, payload = broadcast_object((err is None, out if err is None else err), d)
    if d.is_main and err is not None:
        raise err
    if not ok:
        raise payload
    return payload


def any_rank(flags: List[bool], d: Dist) -> List[bool]:
    """Element-wise OR over ranks: one all-reduce for all the step's decisions."""
    if not d.enabled:
        return list(flags)
    t = torch.tensor([float(f) for f in flags])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean(values: List[float], d: Dist) -> List[float]:
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / d.world_size).tolist()


def all_gather_object(obj: Any, d: Dist) -> List[Any]:
    if not d.enabled:
        return [obj]
    out: List[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def mask_checksum(masks: List[torch.Tensor]) -> float:
    """Σ mask_i · w_i with fixed pseudo-random fp64 weights: two different masks collide with
    probability ~0, unlike a plain count or a position-weighted sum (swaps cancel there)."""
    flat = torch.cat([m.detach().reshape(-1).to("cpu", torch.float64) for m in masks])
    w = torch.rand(flat.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return float((flat * w).sum()) + flat.numel()


def check_masks(allocator, step: int, d: Dist) -> None:
    """Raise if the rank masks differ between ranks (one all-reduce of two numbers)."""
    if not d.enabled:
        return
    c = mask_checksum([layer.rank_mask for layer in allocator.layers])
    t = torch.tensor([c, -c], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = float(t[0]), -float(t[1])
    if hi != lo:
        raise RuntimeError(f"rank masks diverged across ranks at step {step} (checksum "
                           f"min {lo!r} != max {hi!r}): every rank must score the same "
                           "all-reduced gradients; was a rank's allocator or model changed?")


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
