import pytest
import torch
import torch.nn as nn

import adalora
from adalora.layers import LoRALinear, SVDLinear


def _adapters(shapes, r, seed=0):
    torch.manual_seed(seed)
    return {f"m{i}": SVDLinear(nn.Linear(d_in, d_out).double(), r, 1.0) for i, (d_out, d_in) in enumerate(shapes)}


def test_reference_form_by_hand():
    ad = _adapters([(6, 5), (6, 5), (4, 9)], r=3)
    terms = []
    for a in ad.values():
        terms.append(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(3, dtype=torch.float64)))
        terms.append(torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(3, dtype=torch.float64)))
    expected = sum(terms) / 6
    assert torch.allclose(adalora.orthogonality_penalty(ad), expected, atol=1e-12)


def test_paper_form_by_hand():
    ad = _adapters([(6, 5), (4, 9)], r=2)
    expected = sum(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(2, dtype=torch.float64)) ** 2
                   + torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(2, dtype=torch.float64)) ** 2
                   for a in ad.values())
    assert torch.allclose(adalora.orthogonality_penalty(ad, form="paper"), expected, atol=1e-12)


def test_zero_for_orthonormal_factors_and_ignores_lora():
    ad = _adapters([(8, 6), (8, 6)], r=3)
    with torch.no_grad():
        for a in ad.values():
            a.P.copy_(torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0])
            a.Q.copy_(torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0].T)
    ad["lora"] = LoRALinear(nn.Linear(3, 3).double(), 2, 1.0)
    for form in ("reference", "paper"):
        assert adalora.orthogonality_penalty(ad, form).abs() < 1e-12


def test_gradient_flows_and_bad_form_rejected():
    ad = _adapters([(5, 4)], r=2)
    adalora.orthogonality_penalty(ad).backward()
    assert ad["m0"].P.grad is not None and ad["m0"].Q.grad is not None
    with pytest.raises(ValueError, match="form="):
        adalora.orthogonality_penalty(ad, form="frobenius")
    assert adalora.orthogonality_penalty({}) == 0


def test_mixed_ranks_after_compaction_match_dense_reference_values_and_gradients():
    """Adapters of one shape but different ranks (as after compact(), rank 0 included) are batched
    with zero padding and a mask: value and gradients equal the per-matrix dense formula, and the
    number of operations does not grow with the number of distinct ranks."""
    from experiments.opcount import count_ops

    def build(ranks):
        ad = _adapters([(6, 5)] * len(ranks) + [(4, 9)] * len(ranks), r=4, seed=1)
        for a, r in zip(ad.values(), ranks + ranks[::-1]):
            a.resize(torch.arange(r))
        return ad

    def dense(ad, form):
        terms = []
        for a in ad.values():
            r = a.rank
            if r == 0:
                continue
            for res in (a.P.T @ a.P - torch.eye(r, dtype=a.P.dtype), a.Q @ a.Q.T - torch.eye(r, dtype=a.Q.dtype)):
                sq = res.pow(2).sum()
                terms.append(sq if form == "paper" else sq.sqrt())
        total = sum(terms)
        return total if form == "paper" else total / (2 * len(ad))

    ranks = [4, 3, 0, 1, 3, 2]
    for form in ("reference", "paper"):
        ad = build(ranks)
        params = [p for a in ad.values() for p in (a.P, a.Q)]
        got = adalora.orthogonality_penalty(ad, form)
        g_got = torch.autograd.grad(got, params, allow_unused=True)   # rank-0 factors: unused
        want = dense(ad, form)
        g_want = torch.autograd.grad(want, params, allow_unused=True)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
        for p, a, b in zip(params, g_got, g_want):
            zero = torch.zeros_like(p)
            assert torch.allclose(zero if a is None else a, zero if b is None else b, rtol=0, atol=1e-12)
    few, many = build(ranks), build([4, 3, 2, 1, 4, 1, 3, 2, 2, 1, 4, 3, 1, 1, 2])
    adalora.orthogonality_penalty(many)        # builds the cached padding indices once
    assert count_ops(lambda: adalora.orthogonality_penalty(few))["ops"] == \
        count_ops(lambda: adalora.orthogonality_penalty(many))["ops"]     # per distinct d, not per rank


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_fused_gradient_equals_autograd_of_the_penalty(form):
    """orthogonality_grad_ adds exactly what (γ·R).backward() adds, for equal ranks (one stacked
    batch per dimension), mixed ranks after compaction (padded batch) and rank 0; creates a
    missing .grad, adds to an existing one, leaves frozen factors alone, and returns R."""
    torch.manual_seed(3)
    shapes = [(6, 5)] * 3 + [(4, 9)] * 2 + [(6, 9), (7, 3)]
    ad = {f"m{i}": SVDLinear(nn.Linear(d_in, d_out).double(), 4, 1.0) for i, (d_out, d_in) in enumerate(shapes)}
    for a, r in zip(ad.values(), [4, 2, 0, 3, 4, 1, 4]):
        if r < 4:
            a.resize(torch.arange(r))
    ad["lora"] = LoRALinear(nn.Linear(3, 3).double(), 2, 1.0)
    ad["m6"].Q.requires_grad_(False)
    weight = 0.3
    params = [p for a in ad.values() if isinstance(a, SVDLinear) for p in (a.P, a.Q) if p.requires_grad]
    want = torch.autograd.grad(weight * adalora.orthogonality_penalty(ad, form), params, allow_unused=True)
    prior = {p: (None if k % 3 == 0 else torch.randn_like(p)) for k, p in enumerate(params)}
    for p in params:
        p.grad = None if prior[p] is None else prior[p].clone()
    value = adalora.orthogonality_grad_(ad, weight, form)
    assert torch.allclose(value, adalora.orthogonality_penalty(ad, form).detach(), rtol=0, atol=1e-12)
    for p, w in zip(params, want):
        w = torch.zeros_like(p) if w is None else w                 # rank 0: no gradient to add
        expected = w if prior[p] is None else prior[p] + w
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, expected, rtol=0, atol=1e-12)
    assert ad["m6"].Q.grad is None and ad["lora"].A.grad is None


def test_the_batching_follows_compaction_and_growth_and_keeps_no_factor_alive():
    """The grouping of factors is kept between steps; a compaction, a growth or a second model
    changes the factors, and the penalty and its gradient still equal the dense formula of each
    matrix. Old factors are not kept alive by it."""
    import gc
    import weakref

    def dense(ad):
        eye = lambda r: torch.eye(r, dtype=torch.float64)
        return sum(torch.linalg.matrix_norm(a.P.T @ a.P - eye(a.rank)) + torch.linalg.matrix_norm(a.Q @ a.Q.T - eye(a.rank))
                   for a in ad.values()) / (2 * len(ad))

    def check(ad):
        params = [p for a in ad.values() for p in (a.P, a.Q)]
        want = torch.autograd.grad(dense(ad), params)
        for p in params:
            p.grad = None
        value = adalora.orthogonality_grad_(ad, 1.0)
        assert torch.allclose(value, dense(ad).detach(), rtol=0, atol=1e-12)
        assert all(torch.allclose(p.grad, w, rtol=0, atol=1e-12) for p, w in zip(params, want))

    ad = _adapters([(6, 5)] * 3 + [(4, 9)], r=3, seed=2)
    other = _adapters([(6, 5), (5, 6)], r=2, seed=4)
    check(ad)
    check(other)
    old = weakref.ref(ad["m0"].P)
    ad["m0"].resize(torch.tensor([0, 2]))                       # new parameters of rank 2
    check(ad)
    ad["m1"].expand(2, generator=torch.Generator().manual_seed(0))   # rank 5
    check(ad)
    check(other)
    gc.collect()
    assert old() is None


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_gradients_formed_before_backward_and_added_after_equal_autograd_of_the_penalty(form):
    """orthogonality_grads reads P and Q alone and leaves .grad untouched, so a step can form it
    before its backward (beside it, on another stream) and add it after: the sum then equals the
    backward's gradient plus autograd's of γ·R, and R is the penalty's value."""
    torch.manual_seed(5)
    shapes = [(6, 5)] * 2 + [(4, 9), (6, 9)]
    ad = {f"m{i}": SVDLinear(nn.Linear(d_in, d_out).double(), 3, 1.0) for i, (d_out, d_in) in enumerate(shapes)}
    ad["m3"].resize(torch.arange(2))                                # a padded batch too
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()                                         # so the task reaches P and Q
    params = [p for a in ad.values() for p in (a.P, a.Q)]
    weight = 0.7
    want = torch.autograd.grad(weight * adalora.orthogonality_penalty(ad, form), params)
    value, pending = adalora.orthogonality_grads(ad, weight, form)
    assert all(p.grad is None for p in params)
    x = torch.randn(8, 5, dtype=torch.float64)
    loss = sum(a(x).sum() for a in list(ad.values())[:2])            # a backward in between
    task = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    loss.backward()
    adalora.add_orthogonality_grads_(pending)
    assert torch.allclose(value, adalora.orthogonality_penalty(ad, form).detach(), rtol=0, atol=1e-12)
    for p, w, g in zip(params, want, task):
        expected = w if g is None else g + w
        assert torch.allclose(p.grad, expected, rtol=0, atol=1e-12)
    value, pending = adalora.orthogonality_grads({}, 1.0)
    assert value == 0 and pending == []


def test_fused_gradient_is_zero_not_nan_at_orthonormal_factors():
    """At PᵀP = I the unsquared norm has a kink: its subgradient 0 is what we add, and what
    autograd of the penalty gives (a square root of the summed squares would give NaN there)."""
    ad = _adapters([(8, 6)], r=3)
    with torch.no_grad():
        ad["m0"].P.copy_(torch.eye(8, 3, dtype=torch.float64))     # PᵀP − I exactly 0
    assert torch.equal(torch.autograd.grad(adalora.orthogonality_penalty(ad), ad["m0"].P)[0],
                       torch.zeros(8, 3, dtype=torch.float64))
    value = adalora.orthogonality_grad_(ad, 1.0)
    assert torch.equal(ad["m0"].P.grad, torch.zeros(8, 3, dtype=torch.float64))
    assert ad["m0"].Q.grad.abs().sum() > 0 and value > 0
    with pytest.raises(ValueError, match="form="):
        adalora.orthogonality_grad_(ad, 1.0, form="frobenius")
    assert adalora.orthogonality_grad_({}, 1.0) == 0


def test_compiled_penalty_on_mixed_ranks_takes_the_padding_as_constants(no_recompiles):
    """Under torch.compile the padding indices of compacted (mixed-rank) adapters are constants of
    the graph, not rebuilt in it every step: Dynamo ignores lru_cache and would otherwise trace
    the index construction (an arange per matrix; a meshgrid before fd40888). Value and gradients equal eager."""
    ad = _adapters([(6, 5)] * 4 + [(4, 9)] * 4, r=4, seed=2)
    for a, r in zip(ad.values(), [4, 3, 1, 2, 2, 4, 3, 1]):
        a.resize(torch.arange(r))
    params = [p for a in ad.values() for p in (a.P, a.Q)]
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm

    compiled = torch.compile(lambda: adalora.orthogonality_penalty(ad), backend=backend)
    for _ in range(2):                                    # the second call reuses the graph
        got = compiled()
        want = adalora.orthogonality_penalty(ad)
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert traced and not [t for t in traced if "arange" in t or "meshgrid" in t]


def test_fused_gradient_skips_a_frozen_factor_but_not_the_ones_after_it_and_leaves_rank_0_alone():
    """In one batch (same width): a frozen Q first, trainable Qs after it still get their
    gradient; a rank-0 adapter gets no .grad at all, as backward() of the penalty leaves it."""
    torch.manual_seed(4)
    ad = {f"m{i}": SVDLinear(nn.Linear(5, 6).double(), 3, 1.0) for i in range(4)}
    ad["m2"].resize(torch.arange(2))                     # mixed ranks: the padded batch
    ad["m3"].resize(torch.arange(0))                     # rank 0
    ad["m0"].Q.requires_grad_(False)
    params = [p for a in list(ad.values())[1:3] for p in (a.P, a.Q)]
    want = torch.autograd.grad(0.5 * adalora.orthogonality_penalty(ad), params)
    adalora.orthogonality_grad_(ad, 0.5)
    assert ad["m0"].Q.grad is None and ad["m0"].P.grad is not None
    for p, w in zip(params, want):
        assert torch.allclose(p.grad, w, rtol=0, atol=1e-12)
    assert ad["m3"].P.grad is None and ad["m3"].Q.grad is None


@pytest.mark.parametrize("ranks", [(3, 3), (3, 2)])          # stacked and padded batches
def test_bf16_penalty_and_fused_gradient_stay_in_bf16(ranks):
    torch.manual_seed(5)
    ad = {f"m{i}": SVDLinear(nn.Linear(5, 6).to(torch.bfloat16), 3, 1.0) for i in range(2)}
    for a, r in zip(ad.values(), ranks):
        a.resize(torch.arange(r))
        with torch.no_grad():
            a.P.mul_(20)
            a.Q.mul_(20)
    value = adalora.orthogonality_penalty(ad)
    assert value.dtype == torch.bfloat16
    dense = sum(torch.linalg.matrix_norm(m - torch.eye(m.shape[0], dtype=torch.float64))
                for a in ad.values() for m in (a.P.double().T @ a.P.double(), a.Q.double() @ a.Q.double().T)) / 4
    assert torch.allclose(value.double(), dense, rtol=2e-2)
    fused = adalora.orthogonality_grad_(ad, 1.0)
    assert fused.dtype == torch.bfloat16 and torch.allclose(fused.double(), dense, rtol=2e-2)
    for a in ad.values():
        assert a.P.grad.dtype == a.Q.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_same_width_adapters_of_two_dtypes_and_ranks_match_the_dense_formula(form):
    """fp32 adapters (as on an NF4 base) beside fp64 ones of the same width and other ranks: each
    dtype is batched on its own; value and the in-place gradient equal the per-matrix formula."""
    torch.manual_seed(3)
    ad = {"a": SVDLinear(nn.Linear(5, 6).float(), 3, 1.0), "b": SVDLinear(nn.Linear(5, 6).double(), 2, 1.0),
          "c": SVDLinear(nn.Linear(5, 6).float(), 4, 1.0), "d": SVDLinear(nn.Linear(5, 6).double(), 4, 1.0)}

    def norm(m):
        c = m @ m.T - torch.eye(m.shape[0], dtype=torch.float64)
        return torch.linalg.matrix_norm(c) ** 2 if form == "paper" else torch.linalg.matrix_norm(c)

    leaves = {n: (a.P.detach().double().requires_grad_(), a.Q.detach().double().requires_grad_()) for n, a in ad.items()}
    dense = sum(norm(p.T) + norm(q) for p, q in leaves.values())
    dense = dense if form == "paper" else dense / (2 * len(ad))
    dense.backward()
    assert torch.allclose(adalora.orthogonality_penalty(ad, form).double(), dense.detach(), rtol=1e-5)
    total = adalora.orthogonality_grad_(ad, 1.0, form)
    assert torch.allclose(total.double(), dense.detach(), rtol=1e-5)
    for n, a in ad.items():
        assert a.P.grad.dtype == a.P.dtype
        assert torch.allclose(a.P.grad.double(), leaves[n][0].grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(a.Q.grad.double(), leaves[n][1].grad, rtol=1e-4, atol=1e-6)


def test_fused_gradient_dispatches_as_many_ops_for_16_adapters_as_for_4():
    """Views included: no op per adapter (a transpose of each P, say) on the host, which sets the
    pace of an eager step."""
    from experiments.opcount import count_ops
    counts = []
    for n in (4, 16):
        ad = _adapters([(8, 8)] * n, 3)
        for a in ad.values():
            a.P.grad, a.Q.grad = torch.zeros_like(a.P), torch.zeros_like(a.Q)
        counts.append(count_ops(lambda: adalora.orthogonality_grad_(ad, 0.1), views=True)["ops"])
    assert counts[0] == counts[1]


@pytest.mark.parametrize("ranks", [(3, 3, 3, 3), (3, 1, 2, 3)])         # stacked and padded batches
@pytest.mark.parametrize("form", ["reference", "paper"])
def test_p_and_q_of_one_width_share_one_batch_and_match_the_dense_formula(ranks, form):
    """A (6, 5) adapter's P and a (5, 6) adapter's Q are both (r, 6) as matrices of singular
    vectors (rows): one batch per width, two batched products each (the Gram matrix and its
    gradient), with P and Q gradients equal to the per-matrix formula's."""
    from experiments.opcount import count_ops
    ad = _adapters([(6, 5), (5, 6), (6, 5), (5, 6)], r=3, seed=6)
    for a, r in zip(ad.values(), ranks):
        a.resize(torch.arange(r))
    leaves = {n: (a.P.detach().clone().requires_grad_(), a.Q.detach().clone().requires_grad_()) for n, a in ad.items()}

    def norm(m):
        c = m @ m.T - torch.eye(m.shape[0], dtype=torch.float64)
        return torch.linalg.matrix_norm(c) ** 2 if form == "paper" else torch.linalg.matrix_norm(c)
    dense = sum(norm(p.T) + norm(q) for p, q in leaves.values())
    dense = dense if form == "paper" else dense / (2 * len(ad))
    dense.backward()
    assert count_ops(lambda: adalora.orthogonality_penalty(ad, form), only="aten.bmm")["ops"] == 2
    value = adalora.orthogonality_grad_(ad, 0.5, form)
    assert torch.allclose(value, dense.detach(), rtol=0, atol=1e-12)
    for n, a in ad.items():
        assert torch.allclose(a.P.grad, 0.5 * leaves[n][0].grad, rtol=0, atol=1e-12)
        assert torch.allclose(a.Q.grad, 0.5 * leaves[n][1].grad, rtol=0, atol=1e-12)
        assert a.P.grad.stride() == a.P.stride()              # fused AdamW reads both in one layout
    for a in ad.values():
        a.P.grad, a.Q.grad = None, None
    assert count_ops(lambda: adalora.orthogonality_grad_(ad, 0.5, form), only=("aten.bmm", "aten.baddbmm"))["ops"] == 4


def test_fused_gradient_launches_about_ten_operations_per_width():
    """Non-view operations (kernels on a GPU, each a launch the eager host pays for): two stacks,
    the Gram product, the diagonal, one norm, the scale, the gradient product and the multi-tensor
    add per width, and a few to total the norms; not the pow, sum, sqrt and separate scaling
    kernels (17 a width) the penalty launched before."""
    from experiments.opcount import count_ops
    for shapes, widths in (([(8, 8)] * 4, 1), ([(8, 6), (6, 9)] * 2, 3)):
        ad = _adapters(shapes, 3)
        for a in ad.values():
            a.P.grad, a.Q.grad = torch.zeros_like(a.P), torch.zeros_like(a.Q)
        ops = count_ops(lambda: adalora.orthogonality_grad_(ad, 0.1))["ops"]
        assert ops <= 10 * widths + 2, (shapes, ops)
