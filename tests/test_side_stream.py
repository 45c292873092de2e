"""The adapters' thin products on a side stream (adalora/side_stream.py), checked on the CPU with a
stand-in stream: what runs on the side branch, what stays on the main stream, and what the join
hands back. The CUDA graphs themselves are run by the benchmark (its captured-against-eager
check), not here. No timing."""
import contextlib
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adalora
from adalora import factor_batch, side_stream
from tests.test_shared_input import _model

SIDES = (object(), object())   # the stand-in side streams, lanes 0 and 1


class Trace(TorchDispatchMode):
    """Every op that writes or makes a tensor, with its output's shape and the lane of the side
    stream it ran on (None: the main stream); and each join with its lane and the shapes it was
    handed."""

    def __init__(self):
        super().__init__()
        self.on_side, self.ops, self.joins = None, [], []

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
        assert side in SIDES and t.on_side is None
        t.on_side = SIDES.index(side)
        yield
        t.on_side = None

    def join(side, *made):
        assert side in SIDES and t.on_side is None
        t.joins.append((SIDES.index(side), tuple(None if m is None else tuple(m.shape) for m in made)))
    monkeypatch.setattr(side_stream, "fork", lambda x, lane=0: SIDES[lane])
    monkeypatch.setattr(side_stream, "forks", lambda x: SIDES)
    monkeypatch.setattr(side_stream, "on", on)
    monkeypatch.setattr(side_stream, "join", join)
    return t


@pytest.mark.parametrize("path", ["epilogue", "merge"])
@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_the_side_branches_run_only_thin_products_and_join_their_outputs(trace, method, path):
    """Two forwards and backwards (the second with q, k, v and gate, up in groups): every op on
    a side branch has a rank-sized dimension (N rows never with a full width), the frozen
    products, the in-place passes (epilogue) and the merged weights (merge) stay on the main
    stream, and each join gets its branch's outputs: backward, ``(G U)ᵀ`` (which the pass over
    dx reads) and the down factor's and gate's gradients on lane 0, the up factor's on lane 1."""
    model, ad = _model(fuse=path, method=method)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    reference, _ = _model(fuse="none", method=method)
    for _ in range(2):
        with trace:
            model(x).square().sum().backward()
    want = reference(x).square().sum()
    want.backward()
    full = {16, 24, 8}                                       # the layers' widths (d_in and d_out)
    side = [op for op in trace.ops if op[2] is not None]
    assert side and not [op for op in side if op[1][:1] == (10,) and op[1][-1] in full], side
    assert any(name == "aten.addmm" and s[0] == 10 and on is None for name, s, on in trace.ops)   # frozen GEMM
    passes = [on for name, _, on in trace.ops if name == "aten.addmm_"]    # the in-place shares of y and dx
    merged = [on for name, s, on in trace.ops if name == "aten.addmm" and s[0] not in (4, 10)]   # W' (d_out, d_in)
    assert (bool(passes), len(merged)) == ((True, 0) if path == "epilogue" else (False, 2 * 2 * 7))
    assert set(passes + merged) <= {None}
    # every thin (r, N) product is on a branch: (G U)ᵀ too, where the pass over dx reads it
    assert not [op for op in trace.ops if op[2] is None and op[0] in ("aten.mm", "aten.addmm") and op[1][-1] == 10]
    # What each join gets, by hand (r = 4, N = 10; q, o: 16 -> 16, k, v: 16 -> 8, gate, up: 16 -> 24,
    # down: 24 -> 16; two blocks, two passes, groups from the second). Forward, lane 0: each
    # adapter's hᵀ (r, N), a leader's group rows (3r or 2r, N). Backward, alone: (G U)ᵀ (r, N) on
    # the epilogue path, then (dD, dg) on lane 0, dg None as the factors are prepared per width
    # (g ⊙ D), and dU on lane 1; a leader: the group's T (3r or 2r, N) on the epilogue path, then
    # the group's dD on lane 0 and its own dU on lane 1; a follower: d hᵀ on lane 0, dU on lane 1.
    epilogue = path == "epilogue"
    want = Counter({(0, ((4, 10),)): 18 + 6 + 18 * epilogue, (0, ((12, 10),)): 2 + 2 * epilogue,
                    (0, ((8, 10),)): 2 + 2 * epilogue,
                    (0, ((4, 16), None)): 6 + 4 + 4, (0, ((4, 24), None)): 4, (0, ((12, 16),)): 2, (0, ((8, 16),)): 2,
                    (1, ((16, 4),)): 6 + 4 + 2, (1, ((8, 4),)): 4 + 4, (1, ((24, 4),)): 4 + 2 + 2})
    assert Counter(trace.joins) == want
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


def test_an_adapter_that_prepares_its_own_gate_joins_its_gradient_too(trace):
    """Without the factors prepared per width, each AdaLoRA adapter forms ``g ⊙ D`` itself and its
    backward's lane-0 join gets ``dg`` beside ``dD``; the gradients are the unfused path's."""
    model, _ = _model()
    factor_batch.remove(model)
    reference, _ = _model(fuse="none")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with trace:
        model(x).square().sum().backward()
    reference(x).square().sum().backward()
    # forward hᵀ, 14; backward (G U)ᵀ for the pass over dx, 11: not for q, k and v of the first
    # block, whose input needs no gradient; (dD, dg) on lane 0, dU on lane 1
    assert Counter(trace.joins) == Counter({(0, ((4, 10),)): 14 + 11, (0, ((4, 16), (4,))): 12, (0, ((4, 24), (4,))): 2,
                                            (1, ((16, 4),)): 6, (1, ((8, 4),)): 4, (1, ((24, 4),)): 4})
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), n


def test_fork_waits_for_the_current_stream_only_while_capturing_outside_compile(monkeypatch):
    """``fork`` on a stand-in CUDA tensor and streams: the side stream of the lane asked for, after
    it waits for the current stream, while a capture runs; None when none runs, under
    ``torch.compile``, or for a device without side streams. ``forks``: every lane's, or all
    None. ``join`` makes the current stream wait and marks each tensor."""
    class Stream:
        def __init__(self, device):
            self.device, self.waited, self.marked = device, [], []

        def wait_stream(self, other):
            self.waited.append(other)

    class Tensor:
        is_cuda, device = True, "cuda:7"

        def __init__(self):
            self.recorded = []

        def record_stream(self, stream):
            self.recorded.append(stream)
    side, lane1, main = Stream("cuda:7"), Stream("cuda:7"), Stream("cuda:7")
    monkeypatch.setitem(side_stream._STREAMS, "cuda:7", (side, lane1))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    capturing, compiling = [False], [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling[0])
    t = Tensor()
    assert side_stream.fork(t) is None and side_stream.forks(t) == (None, None) and side.waited == []
    capturing[0] = True
    assert side_stream.fork(t) is side and side.waited == [main]
    assert side_stream.fork(t, 1) is lane1 and lane1.waited == [main] and side.waited == [main]
    assert side_stream.forks(t) == (side, lane1) and side.waited == lane1.waited == [main, main]
    other = Tensor()
    other.device = "cuda:6"
    assert side_stream.fork(other) is None and side_stream.forks(other) == (None, None)
    compiling[0] = True
    assert side_stream.fork(t) is None and side_stream.forks(t) == (None, None) and side.waited == [main, main]
    made = Tensor()
    side_stream.join(side, made, None)
    assert main.waited == [side] and made.recorded == [main]


def test_prepare_makes_the_side_streams_only_outside_captures_and_compiles(monkeypatch):
    class Tensor:
        is_cuda, device = True, "cuda:5"
    made = []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: made.append(device) or ("stream", device))
    monkeypatch.delitem(side_stream._STREAMS, "cuda:5", raising=False)
    for capturing, compiling in ((True, False), (False, True)):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        side_stream.prepare(Tensor())
        assert made == [] and "cuda:5" not in side_stream._STREAMS
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    side_stream.prepare(Tensor())
    side_stream.prepare(Tensor())                       # once per device
    assert made == ["cuda:5"] * side_stream.LANES == ["cuda:5"] * 2
    assert side_stream._STREAMS.pop("cuda:5") == (("stream", "cuda:5"),) * 2


@pytest.mark.parametrize("path", ["epilogue", "merge"])
def test_with_the_factors_frozen_backward_forms_only_what_dx_needs(trace, path):
    """Only x needs a gradient (one forward, so no groups): the epilogue path's backward forms
    ``(G U)ᵀ (r, N)`` for its pass over dx, on a branch, and nothing else thin; the merge path's
    dx is ``G W'`` alone, so it forms no rank-sized product at all."""
    model, ad = _model(fuse=path)
    for p in adalora.adapter_parameters(ad):
        p.requires_grad_(False)
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    y = model(x)
    with trace:
        y.square().sum().backward()
    thin = [op for op in trace.ops if op[0] in ("aten.mm", "aten.addmm", "aten.bmm") and 4 in op[1]]
    assert thin == ([("aten.mm", (4, 10), 0)] * 14 if path == "epilogue" else [])
    assert x.grad is not None and not [p for p in adalora.adapter_parameters(ad) if p.grad is not None]
