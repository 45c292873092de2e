"""Count the operations a function dispatches, and how many of them wait for the device.

Used by the benchmark (the allocator's cost in kernels, independent of the machine) and by
tests that pin the allocator and the penalty to a fixed number of fused operations."""
from __future__ import annotations

import torch


def count_ops(fn) -> dict:
    """Non-view aten ops dispatched by ``fn()`` (≈ kernels) and how many force a device->host sync."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += not func.is_view          # views move no data: count ops that do
            self.syncs += func.__name__.split(".")[0] in ("_local_scalar_dense", "nonzero", "item")
            return func(*args, **(kwargs or {}))
    # tolist() and numpy() read memory without dispatching an op: count those reads separately.
    readers = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name):
        def read(self, *args, **kwargs):
            c.syncs += 1
            return readers[name](self, *args, **kwargs)
        return read
    try:
        for name in readers:
            setattr(torch.Tensor, name, counted(name))
        with Count() as c:
            fn()
    finally:
        for name, method in readers.items():
            setattr(torch.Tensor, name, method)
    return {"ops": c.ops, "host_syncs": c.syncs}
