"""The adapters' thin products on a side stream (adalora/side_stream.py), checked on the CPU with a
stand-in stream: what runs on the side branch, what stays on the main stream, and what the join
hands back. The CUDA graphs themselves are run by the benchmark (its captured-against-eager
check), not here. No timing."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adalora import side_stream
from tests.test_shared_input import Net, _model

SIDE = object()          # the stand-in side stream


class Trace(TorchDispatchMode):
    """Every op that writes or makes a tensor, with its output's shape and whether it ran on the
    side branch; and each join with the shapes it was handed."""

    def __init__(self):
        super().__init__()
        self.on_side, self.ops, self.joins = False, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor):
            self.ops.append((str(func.overloadpacket), tuple(out.shape), self.on_side))
        return out


@pytest.fixture
def trace(monkeypatch):
    t = Trace()

    @contextlib.contextmanager
    def on(side):
        assert side is SIDE
        t.on_side = True
        yield
        t.on_side = False

    def join(side, *made):
        assert side is SIDE and not t.on_side
        t.joins.append(tuple(None if m is None else tuple(m.shape) for m in made))
    monkeypatch.setattr(side_stream, "fork", lambda x: SIDE)
    monkeypatch.setattr(side_stream, "on", on)
    monkeypatch.setattr(side_stream, "join", join)
    return t


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_the_side_branch_runs_only_thin_products_and_joins_their_outputs(trace, method):
    """Two forwards and backwards (the second with q, k, v and gate, up in groups): every op on
    the side branch has a rank-sized dimension (N rows never with a full width), the frozen
    products and the in-place passes stay on the main stream, and each join gets the branch's
    outputs, the gradients of the down factor, the gate and the up factor among them."""
    model, ad = _model(method=method)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    reference, _ = _model(fuse="none", method=method)
    for _ in range(2):
        with trace:
            model(x).square().sum().backward()
    want = reference(x).square().sum()
    want.backward()
    full = {16, 24, 8}                                       # the layers' widths (d_in and d_out)
    side = [op for op in trace.ops if op[2]]
    assert side and not [op for op in side if op[1][:1] == (10,) and op[1][-1] in full], side
    assert any(name == "aten.addmm" and s[0] == 10 and not on for name, s, on in trace.ops)   # frozen GEMM
    passes = [on for name, _, on in trace.ops if name == "aten.addmm_"]    # the in-place shares of y and dx
    assert passes and not any(passes)
    r = 4
    made = [s for j in trace.joins for s in j if s is not None]
    assert (r, 10) in made or (2 * r, 10) in made            # a forward's hᵀ (alone, or a group's rows)
    up_grads = {(d, r) for d in full}
    assert up_grads & set(made)                              # dU, column-major (d_out, r)
    # the same training as the unfused path: the order of independent products changed nothing
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad / 2, q.grad, rtol=1e-10, atol=1e-12), n


def test_off_capture_and_off_cuda_there_is_no_side_stream():
    """On the CPU, and on CUDA outside a capture, ``fork`` gives None and ``on``/``join`` do
    nothing: one stream, as before."""
    x = torch.zeros(2)
    side_stream.prepare(x)
    assert side_stream.fork(x) is None and x.device not in side_stream._STREAMS
    with side_stream.on(None):
        pass
    side_stream.join(None, x)
