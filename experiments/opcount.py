"""What a function costs in operations: how many it dispatches and how many wait for the device
(``count_ops``, any machine), and what its kernels take on a GPU (``kernel_time``).

Used by the benchmark (the allocator's cost in kernels, independent of the machine; each
variant's kernel time against its wall time) and by tests that pin the allocator and the penalty
to a fixed number of fused operations."""
from __future__ import annotations

import torch


def count_ops(fn, views: bool = False, only: str | tuple[str, ...] | None = None) -> dict:
    """Non-view aten ops dispatched by ``fn()`` (≈ kernels), how many force a device->host sync,
    and ``host_values``: how many tensors it makes from Python values (``lift_fresh``: ``x[i] =
    True``, ``torch.tensor(...)``). On a GPU such a value is made on the host, and its copy to
    the device waits for the device as a sync does. ``views=True`` counts views in ``ops`` too:
    each is a dispatch the host pays for. ``only`` (an op name such as ``"aten._to_copy"``, or a
    tuple of them) counts those ops alone in ``ops``."""
    only = (only,) if isinstance(only, str) else only
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.syncs, self.values = 0, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if only is None:
                self.ops += views or not func.is_view     # views move no data: count ops that do
            else:
                self.ops += str(func.overloadpacket) in only
            name = func.__name__.split(".")[0]
            self.syncs += name in ("_local_scalar_dense", "nonzero", "item")
            self.values += name == "lift_fresh"
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
    return {"ops": c.ops, "host_syncs": c.syncs, "host_values": c.values}


def kernel_time(fn, steps: int, top: int = 8) -> dict:
    """What ``steps`` calls of ``fn`` run on the GPU, per call (``device_summary``). Empty on a
    machine without CUDA."""
    if not torch.cuda.is_available():
        return {}
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return device_summary([(e.name, e.time_range.elapsed_us()) for e in prof.events()
                           if e.device_type == DeviceType.CUDA], steps, top)


def device_summary(events, steps: int, top: int = 8) -> dict:
    """From device activities ``(name, microseconds)`` over ``steps`` steps, per step: the summed
    duration of kernels, memcpys and memsets (``kernel_ms``), how many there were (``kernels``)
    and the ``top`` longest names. The device is idle for the rest of a step's wall time,
    waiting for the host; CUDA-graph replays show their kernels too. Empty without activities."""
    per_name: dict = {}
    for name, us in events:
        t, k = per_name.get(name, (0.0, 0))
        per_name[name] = (t + us, k + 1)
    if not per_name:
        return {}
    longest = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {"kernel_ms": sum(t for t, _ in per_name.values()) / 1e3 / steps,
            "kernels": sum(k for _, k in per_name.values()) / steps,
            "top_kernels": [{"name": n[:120], "ms": t / 1e3 / steps, "count": k / steps} for n, (t, k) in longest]}
