"""The in-place rank-r update (adalora/rank_update.py), run by Triton's CPU interpreter: the
kernel against float64 dense products, when it is taken, and the fused paths through it against
the same paths through ``addmm_``. bf16 is checked on the GPU only (the interpreter has no bf16);
the benchmark's fused check commits that comparison. No timing."""
import types

import pytest
import torch

from adalora import launch_gate, rank_update

pytest.importorskip("triton", reason="Triton is in the dev extra (and in CUDA builds of torch)")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float16, 2e-3)])
@pytest.mark.parametrize("r", [1, 12, 17, 64])
def test_kernel_adds_s_a_b_in_place(dtype, tol, r):
    """Sizes off every tile edge (the interpreter's tiles are 32); ``a`` and ``b`` transposed
    views, as the fused paths pass ``hᵀ`` and ``Uᵀ``; ranks padded to 16, 32 and 64."""
    assert __import__("os").environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(r)
    M, N, s = 70, 45, 0.75
    out = torch.randn(M, N, generator=g).to(dtype)
    a = torch.randn(r, M, generator=g).to(dtype).t()          # (M, r), strides (1, M)
    b = torch.randn(N, r, generator=g).to(dtype).t()          # (r, N), strides (1, r)
    ref = out.double() + s * (a.double() @ b.double())
    got = rank_update.kernel_(out, a, b, s)
    assert got is out and out.dtype == dtype
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()


def test_kernel_refuses_shapes_that_do_not_chain():
    with pytest.raises(ValueError, match="do not chain"):
        rank_update.kernel_(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="r > 64"):
        rank_update.kernel_(torch.zeros(4, 3), torch.zeros(4, 65), torch.zeros(65, 3), 1.0)


def test_the_kernel_can_take_half_precision_cuda_tensors_of_rank_up_to_64():
    """Which tensors the kernel can take (whether it does is the capture's business, below).
    ``is_cuda``, ``dtype`` and ``numel()`` are all that is read, so a stand-in checks the choice
    on a machine without CUDA; CPU tensors always take ``addmm_``."""
    def cuda(dtype, numel=2**31 - 1):
        return types.SimpleNamespace(is_cuda=True, dtype=dtype, numel=lambda: numel)
    assert rank_update.runs(cuda(torch.bfloat16), 12) and rank_update.runs(cuda(torch.float16), 64)
    assert not rank_update.runs(cuda(torch.float32), 12)
    assert not rank_update.runs(cuda(torch.bfloat16), 65)
    assert not rank_update.runs(cuda(torch.bfloat16, 2**31), 12)      # 32-bit offsets
    assert not rank_update.runs(torch.zeros(2, 2, dtype=torch.bfloat16), 12)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_the_epilogue_path_through_the_kernel_equals_it_through_addmm(monkeypatch, method):
    """The model of tests/test_shared_input.py in fp16 (grouped and single adapters, forward and
    backward), its in-place shares added by the kernel in the interpreter against ``addmm_``:
    outputs and gradients to fp16 rounding, and the kernel called once per adapter forward and
    once per input gradient backward (the leaders' and the single adapters')."""
    from test_shared_input import _model, _step

    x = torch.randn(6, 16, dtype=torch.float16)
    runs, calls = [], []
    kernel = rank_update.kernel_
    monkeypatch.setattr(rank_update, "kernel_", lambda *a: calls.append(a[0].shape) or kernel(*a))
    _capturing(monkeypatch, True, tuned=_Everything())    # as in a captured step, every shape tuned
    for taken in (False, True):
        monkeypatch.setattr(rank_update, "runs", lambda out, r, dtype=None: taken)
        m, ad = _model(method=method, dtype=torch.float16, std=0.1)
        m(x)                                              # the plan
        calls.clear()
        runs.append(_step(m, ad, x.clone().requires_grad_(True)))
    assert len(calls) == 14 + (14 - 6)                    # 14 adapters; 6 followers add no share to dx
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-2, atol=1e-2)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k], rtol=2e-2, atol=2e-2, msg=k)


class _Everything:
    def __contains__(self, key):
        return True


def _capturing(monkeypatch, on: bool, tuned=None):
    monkeypatch.setattr(launch_gate, "capturing", lambda: on)
    if tuned is not None:
        monkeypatch.setitem(launch_gate.__dict__, "_COMPILED", tuned)


def test_the_kernel_runs_under_capture_and_once_eagerly_per_signature(monkeypatch):
    """Eager steps are bound by the host, where a Triton launch costs several ``addmm_``: eagerly
    the kernel runs once per signature (compiled and tuned then), then ``addmm_``; under capture
    it runs for the signatures seen eagerly, and ``addmm_`` takes a shape, rank or layout never
    run eagerly. Every call adds the same ``s · a b`` (float64 reference)."""
    calls = []
    kernel = rank_update.kernel_
    monkeypatch.setattr(rank_update, "kernel_", lambda *a: calls.append(tuple(a[0].shape)) or kernel(*a))
    monkeypatch.setattr(rank_update, "runs", lambda out, r, dtype=None: True)
    _capturing(monkeypatch, False, tuned=set())
    g = torch.Generator().manual_seed(0)
    expected = []

    def add(n, r, capture, a_transposed=False):
        _capturing(monkeypatch, capture)
        out, a, b = (torch.randn(*shape, generator=g) for shape in ((9, n), (9, r), (r, n)))
        if a_transposed:
            a = a.t().contiguous().t()                        # the same (9, r), strides (1, 9)
        ref = out.double() + 0.5 * (a.double() @ b.double())
        rank_update.add_(out, a, b, 0.5)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
        expected.append(len(calls))

    add(5, 3, capture=False)      # tunes: the kernel
    add(5, 3, capture=False)      # tuned, eager: addmm_
    add(5, 3, capture=True)       # tuned, captured: the kernel
    add(7, 3, capture=True)       # another N, never tuned: addmm_
    add(5, 4, capture=True)       # another r: addmm_
    add(7, 3, capture=False)      # tunes it
    add(7, 3, capture=True)
    add(5, 3, capture=True, a_transposed=True)    # another layout: a variant never compiled
    assert expected == [1, 1, 2, 2, 2, 3, 4, 4]
    assert calls == [(9, 5), (9, 5), (9, 7), (9, 7)]


def test_merged_weight_is_w0_plus_s_u_d_in_new_memory_by_the_same_rules(monkeypatch):
    """``merged_weight`` writes ``W0 + s · U (g ⊙ D)`` to a new row-major tensor and leaves W0 as
    it was, through the kernel (interpreter) or ``addmm`` alike, U column-major as adapters store
    it. The kernel runs by ``add_``'s rules, its out-of-place signature tuned apart from the
    in-place one."""
    calls = []
    kernel = rank_update.kernel_
    monkeypatch.setattr(rank_update, "kernel_", lambda *a: calls.append(len(a)) or kernel(*a))
    monkeypatch.setattr(rank_update, "runs", lambda out, r, dtype=None: True)
    _capturing(monkeypatch, False, tuned=set())
    g = torch.Generator().manual_seed(1)
    w = torch.randn(9, 7, generator=g)
    up, dg = torch.randn(3, 9, generator=g).t(), torch.randn(3, 7, generator=g)    # U (9, 3) column-major
    before = w.clone()
    ref = w.double() + 0.5 * (up.double() @ dg.double())
    for capture, kernel_calls in ((False, [5]), (False, [5]), (True, [5, 5])):
        _capturing(monkeypatch, capture)
        got = rank_update.merged_weight(w, up, dg, 0.5)
        assert calls == kernel_calls and got.is_contiguous() and got.data_ptr() != w.data_ptr()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(w, before)
    rank_update.add_(w, up, dg, 0.5)               # captured, in place: never run eagerly, so addmm_
    assert calls == [5, 5]
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-5)
