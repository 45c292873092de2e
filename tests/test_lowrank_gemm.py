"""The Triton kernel (adalora/lowrank_gemm.py) and the fuse="triton" path, run by Triton's CPU
interpreter: the kernel against float64 dense products, the path against the unfused one
(outputs, gradients, an allocator run), and its fallbacks. bf16 is checked on the GPU only
(the interpreter has no bf16); the benchmark's fused check commits that comparison. No timing."""
import contextlib
import copy
import os

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from adalora import fused, lowrank_gemm, side_stream
from adalora.layers import LoRALinear, SVDLinear
from test_fused import allocator_run, assert_same_run

pytest.importorskip("triton", reason="Triton is in the dev extra (and in CUDA builds of torch)")


@pytest.fixture
def interpreted():
    """Triton's CPU interpreter, chosen for the session in conftest.py before triton's import."""
    assert os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_equals_dense_products(interpreted, dtype, tol, bias):
    """Sizes off every tile edge (the interpreter's tiles are 32), b and c transposed views as
    the forward passes them; t = a c comes back transposed, (r, M) row-major."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r, s = 70, 45, 50, 5, 0.75
    a, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    d, u, b = torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), torch.randn(N, generator=g)
    a, w, d, u, b = (t.to(dtype) for t in (a, w, d, u, b))
    out, tt = lowrank_gemm.lowrank_gemm(a, w.t(), d.t(), u.t(), s, b if bias else None)
    t64 = a.double() @ d.double().t()
    ref = a.double() @ w.double().t() + s * (t64.to(dtype).double() @ u.double().t()) + (b.double() if bias else 0)
    assert out.shape == (M, N) and tt.shape == (r, M) and tt.stride() == (M, 1)
    assert out.dtype == tt.dtype == dtype
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= tol * scale
    assert (tt.t().double() - t64).abs().max() <= tol * t64.abs().max()


def test_kernel_refuses_shapes_that_do_not_chain():
    a = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="do not chain"):
        lowrank_gemm.lowrank_gemm(a, torch.zeros(5, 3), torch.zeros(6, 2), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="r > 64"):
        lowrank_gemm.lowrank_gemm(a, torch.zeros(6, 3), torch.zeros(6, 65), torch.zeros(65, 3), 1.0)


def test_rank_is_padded_to_a_power_of_two_of_at_least_16():
    assert [lowrank_gemm.block_rank(r) for r in (1, 8, 12, 16, 17, 33, 64)] == [16, 16, 16, 16, 32, 64, 64]


def _layer(cls, rank=5, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = cls(nn.Linear(20, 30, bias=bias).requires_grad_(False), rank, 8.0)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


@contextlib.contextmanager
def count_products():
    """The output shapes of the matrix products dispatched inside the block."""
    shapes = []

    class Products(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func.overloadpacket) in ("aten.mm", "aten.addmm", "aten.bmm"):
                shapes.append(tuple(out.shape))
            return out
    with Products():
        yield shapes


def _counting(monkeypatch):
    calls = []
    original = lowrank_gemm.lowrank_gemm
    monkeypatch.setattr(lowrank_gemm, "lowrank_gemm", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k))
    return calls


@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_path_equals_the_unfused_path(interpreted, monkeypatch, cls, bias):
    layer = _layer(cls, bias=bias)
    ref, fast = copy.deepcopy(layer), copy.deepcopy(layer)
    fast.fuse = "triton"
    calls = _counting(monkeypatch)
    forks = []
    monkeypatch.setattr(side_stream, "fork", lambda t: forks.append(t) or None)
    x = torch.randn(3, 7, 20)
    g = torch.randn(3, 7, 30)
    results = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        with count_products() as products:
            y.backward(g)
        results.append([y.detach(), xi.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    assert calls == [(21, 20), (21, 30)]              # the forward's GEMM and the backward's
    # the kernel's dx is the one returned: no GEMM beside it makes a full (N, d_in) product, and
    # nothing is forked to a side stream (the Triton path keeps one stream)
    assert products and not [shape for shape in products if shape[0] == 21] and not forks
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for p in fast.parameters():
        if p.requires_grad:
            assert p.grad.stride() == p.stride()         # P, B column-major as their parameters


@pytest.mark.parametrize("frozen", ["up", "down"])
def test_triton_path_forms_factor_gradients_only_where_needed(interpreted, frozen):
    """With the up factor frozen no ``dU (r, d_out)`` product runs; with the down factor (and
    the gate) frozen no ``d(g ⊙ D) (r, d_in)``. x needs a gradient either way, which the kernel
    gives with ``(G U)ᵀ`` beside it."""
    layer = _layer(SVDLinear)
    layer.fuse = "triton"
    for name in (("P",) if frozen == "up" else ("Q", "lam")):
        getattr(layer, name).requires_grad_(False)
    x = torch.randn(3, 7, 20, requires_grad=True)
    y = layer(x)
    with count_products() as products:
        y.backward(torch.randn(3, 7, 30))
    made = {"up": (5, 30), "down": (5, 20)}
    assert made[frozen] not in products and made["down" if frozen == "up" else "up"] in products
    assert x.grad is not None


def test_triton_allocator_run_gives_the_unfused_masks_and_losses(interpreted):
    """In fp32: the kernel multiplies in IEEE fp32 there, fp64 would take the epilogue path."""
    ref = allocator_run("none", torch.float32)
    assert_same_run(ref, allocator_run("triton", torch.float32), rtol=1e-5)


def test_triton_falls_back_to_the_epilogue_path(monkeypatch):
    """Without the interpreter a CPU tensor cannot run the kernel; nor can a rank above 64 or a
    compiled graph: each takes the epilogue path (a dropout layer in training, the unfused one)."""
    calls = _counting(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = _layer(SVDLinear)
    layer.fuse = "triton"
    x = torch.randn(4, 20)
    assert fused.path(layer, x) == "epilogue"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused.path(layer, x) == "triton"
    edge, wide = _layer(SVDLinear, rank=64), _layer(SVDLinear, rank=65)
    edge.fuse = wide.fuse = "triton"
    assert fused.path(edge, x) == "triton" and fused.path(wide, x) == "epilogue"
    # 32-bit offsets: a y (16 -> 32) or an x (32 -> 16) of 2³¹ elements takes the epilogue path,
    # one row fewer the kernel; a 3-D x counts its rows over both leading dimensions. Expanded
    # views: no memory behind them.
    wide = SVDLinear(nn.Linear(16, 32).requires_grad_(False), 5, 8.0, fuse="triton")
    narrow = SVDLinear(nn.Linear(32, 16).requires_grad_(False), 5, 8.0, fuse="triton")
    rows = 2**26                                       # rows x 32 = 2³¹
    for big_side, d_in in ((wide, 16), (narrow, 32)):
        assert fused.path(big_side, torch.zeros(1, d_in).expand(rows - 1, d_in)) == "triton"
        assert fused.path(big_side, torch.zeros(1, d_in).expand(rows, d_in)) == "epilogue"
    assert fused.path(wide, torch.zeros(1, 1, 16).expand(rows // 2 - 1, 2, 16)) == "triton"
    assert fused.path(wide, torch.zeros(1, 1, 16).expand(rows // 2, 2, 16)) == "epilogue"
    double = copy.deepcopy(layer).double()
    assert fused.path(double, x.double()) == "epilogue"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fused.path(layer, x) == "epilogue"
    dropped = SVDLinear(nn.Linear(20, 30).requires_grad_(False), 4, 8.0, dropout=0.1, fuse="triton")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert fused.path(dropped, x) == "none" and fused.path(dropped.eval(), x) == "triton"
    assert calls == []


def test_triton_path_runs_the_kernel_under_autocast(interpreted, monkeypatch):
    """fp32 factors under fp16 autocast (the interpreter has no bf16): the kernel computes both
    products in fp16, as close to the unfused path under the same autocast as fp16 allows."""
    layer = _layer(SVDLinear)
    ref, fast = copy.deepcopy(layer), copy.deepcopy(layer)
    fast.fuse = "triton"
    calls = _counting(monkeypatch)
    x = torch.randn(3, 7, 20)
    outs = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.float16):
            y = m(xi)
        y.float().pow(2).sum().backward()
        outs.append([y.float(), xi.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    assert calls == [(21, 20), (21, 30)] and outs[1][1].dtype == torch.float32
    for a, b in zip(*outs):            # relative to each tensor's norm: fp16 cancels single entries
        assert float((b.double() - a.double()).norm() / a.double().norm()) < 2e-3
