"""The merge path's weights formed for all adapters before the forward (adalora/merge_batch.py):
the grouped kernel, run by Triton's CPU interpreter, against float64 dense sums; the forward's
pre-hook that forms them; and the merge path through the kernel against it through
``rank_update.merged_weight`` one adapter at a time. The capture's pinned tables need CUDA: the
benchmark's captured-against-eager check covers them on the GPU. No timing."""
import pytest
import torch

from adalora import factor_batch, merge_batch, rank_update, shared_input

pytest.importorskip("triton", reason="Triton is in the dev extra (and in CUDA builds of torch)")


@pytest.mark.parametrize("dtype,w_dtype,tol", [(torch.float32, torch.float32, 2e-6), (torch.float16, torch.float16, 2e-3),
                                               (torch.float16, torch.float32, 2e-3)])
def test_kernel_forms_every_w0_plus_s_u_d_against_dense_sums(dtype, w_dtype, tol):
    """Three adapters of one shape off every tile edge, ranks 1, 12 and 17 (padded to 16 and 32),
    each its own scale; U column-major as stored and D a row slice of a taller batch, as the
    prepared factors are; an fp32 W0 into an fp16 W' (autocast) rounded once. W0 untouched."""
    assert __import__("os").environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    M, N = 45, 70
    stacked = torch.randn(40, N, generator=g).to(dtype)
    items = []
    for k, r in enumerate((1, 12, 17)):
        w = torch.randn(M, N, generator=g).to(w_dtype)
        up = torch.randn(r, M, generator=g).to(dtype).t()            # (M, r), strides (1, M)
        items.append((w, up, stacked[k:k + r], 0.25 * (k + 1)))
    before = [w.clone() for w, *_ in items]
    outs = merge_batch.launch(items, dtype, interpreted=True)
    for (w, up, dg, s), out, w0 in zip(items, outs, before):
        ref = w.double() + s * (up.double() @ dg.double())
        assert out.dtype == dtype and out.shape == (M, N) and out.is_contiguous()
        assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
        assert torch.equal(w, w0)
    if dtype != w_dtype:
        # rounded once: equal to the fp32 sum rounded, where a rounding of W0 first would differ
        for (w, up, dg, s), out in zip(items, outs):
            once = (w.double() + s * (up.double() @ dg.double())).to(dtype)
            assert (out.double() - once.double()).abs().max() <= 2 ** -10 * once.abs().max()


def test_kernel_refuses_weights_of_two_shapes_and_factors_that_do_not_chain():
    w = torch.zeros(4, 6)
    with pytest.raises(ValueError, match="one shape"):
        merge_batch.launch([(w, torch.zeros(4, 2), torch.zeros(2, 6), 1.0), (torch.zeros(6, 4), torch.zeros(6, 2),
                            torch.zeros(2, 4), 1.0)], torch.float32, interpreted=True)
    with pytest.raises(ValueError, match="do not chain"):
        merge_batch.launch([(w, torch.zeros(4, 2), torch.zeros(3, 6), 1.0)], torch.float32, interpreted=True)
    with pytest.raises(ValueError, match="r > 64"):
        merge_batch.launch([(w, torch.zeros(4, 65), torch.zeros(65, 6), 1.0)], torch.float32, interpreted=True)


def test_weights_the_kernel_cannot_take_are_formed_one_by_one_as_merged_weight_forms_them():
    """On the CPU (and for any weight ``takes`` refuses) each W' is ``merged_weight``'s, bit for bit."""
    g = torch.Generator().manual_seed(1)
    items = [(torch.randn(5, 7, generator=g), torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g), 0.5)
             for _ in range(3)]
    assert not merge_batch.takes(items[0][0], items[0][1], torch.float32)
    for (w, up, dg, s), out in zip(items, merge_batch.merged_weights(items, torch.float32)):
        assert torch.equal(out, rank_update.merged_weight(w, up, dg, s))


def _merge_model(dtype=torch.float64):
    from test_shared_input import _model
    return _model("merge", dtype=dtype)


def test_the_pre_hook_forms_each_merge_adapters_w_prime_from_its_prepared_factors_when_gradients_are_on(monkeypatch):
    """Training: every merge-path adapter gets its W' in the slot, equal to W0 + s U (lam ⊙ Q), and
    no forward forms another (one W' per adapter in all). Under no_grad the hook forms none, and
    each forward forms its own."""
    m, ad = _merge_model()
    x = torch.randn(5, 16, dtype=torch.float64)
    seen = {}
    for name, a in ad.items():
        a.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: mod.__dict__.get(factor_batch.SLOT)}))
    calls = []
    original = rank_update.merged_weight
    counted = lambda *a, **k: calls.append(1) or original(*a, **k)   # noqa: E731
    monkeypatch.setattr(rank_update, "merged_weight", counted)
    monkeypatch.setattr(shared_input, "merged_weight", counted)
    for grad in (True, False):
        calls.clear()
        with torch.set_grad_enabled(grad):
            m(x)
        for name, a in ad.items():
            merged = seen[name][3] if seen[name] is not None else None
            if grad:
                want = a.base.weight + a.scaling * a.P @ (a.lam[:, None] * a.Q)
                torch.testing.assert_close(merged, want, rtol=1e-12, atol=1e-12, msg=name)
            else:
                assert merged is None, name
        assert len(calls) == len(ad)


def test_the_merge_path_through_the_grouped_kernel_equals_it_through_merged_weight(monkeypatch):
    """The model of tests/test_shared_input.py in fp16 on the merge path (groups and single
    adapters), trained one step with every W' from the grouped kernel in the interpreter, then with
    each from ``merged_weight``: outputs and gradients to fp16 rounding, and the kernel launched once
    per weight shape."""
    from test_shared_input import _step

    x = torch.randn(6, 16, dtype=torch.float16)
    runs, launches = [], []
    launch = merge_batch.launch
    monkeypatch.setattr(merge_batch, "launch", lambda group, dtype: launches.append(len(group)) or launch(group, dtype))
    for grouped in (True, False):
        monkeypatch.setattr(merge_batch, "takes", lambda w, up, dtype: grouped)
        m, ad = _merge_model(torch.float16)
        m(x)                                              # the plan
        launches.clear()
        runs.append(_step(m, ad, x.clone().requires_grad_(True)))
        n_shapes = len({tuple(a.base.weight.shape) for a in ad.values()})
        assert len(launches) == (n_shapes if grouped else 0) and sum(launches) == (len(ad) if grouped else 0)
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-2, atol=1e-2)
    for k in runs[0][1]:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k], rtol=2e-2, atol=2e-2, msg=k)


def test_without_gradients_each_merge_forward_forms_its_own_w_prime_and_equals_the_unfused_output():
    """Under no_grad the hook forms none, so the groups' leaders and followers and the single
    adapters form their own W' in their forwards: the output equals the unfused path's (float64)."""
    from test_shared_input import _model

    x = torch.randn(5, 16, dtype=torch.float64)
    ref, _ = _model("none")
    m, ad = _merge_model()
    m(x)                                                  # the plan: groups from here on
    with torch.no_grad():
        got, want = m(x), ref(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_under_autocast_the_hook_forms_w_prime_in_the_autocast_dtype_rounded_once():
    """fp32 weights under CPU bf16 autocast: every W' in the slot is bf16, W0 + s U (lam ⊙ Q) from the
    bf16 factors rounded once (within half a bf16 place of the float64 sum), as merged_weight forms
    it also where the caller runs under autocast."""
    m, ad = _merge_model(torch.float32)
    seen = {}
    for name, a in ad.items():
        a.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: mod.__dict__.get(factor_batch.SLOT)}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m(torch.randn(5, 16))
    for name, a in ad.items():
        merged = seen[name][3]
        up, dg = a.P.bfloat16(), (a.lam[:, None] * a.Q).bfloat16()
        exact = a.base.weight.double() + a.scaling * (up.double() @ dg.double())
        assert merged.dtype == torch.bfloat16, name
        # rounded once: within half a bf16 place (2⁻⁸ relative) of the float64 sum, a little more for
        # the fp32 sum's own rounding; W0 rounded first would miss a cancelling sum by far more
        assert ((merged.double() - exact).abs() <= 2.0 ** -8 * exact.abs() * 1.01 + 1e-30).all(), name


def test_under_autocast_without_gradients_each_merge_forward_forms_its_w_prime_in_the_autocast_dtype():
    """No gradients, CPU bf16 autocast, fp32 weights: the leaders, followers and single adapters
    form their own W' in bf16 (a W' left in fp32 would not multiply the bf16 input), and the
    output is the unfused path's to bf16 rounding."""
    from test_shared_input import _model

    x = torch.randn(5, 16)
    ref, _ = _model("none", dtype=torch.float32)
    m, ad = _merge_model(torch.float32)
    m(x)                                                  # the plan: groups from here on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = m(x), ref(x)
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)
