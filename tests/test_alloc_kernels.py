"""The allocation's kernels (adalora/alloc_kernels.py), run by Triton's CPU interpreter: the EMA
step against the scorer's PyTorch ops, the triplet scores against index arithmetic, the
ranking against ``sorted`` by hand, and a banked allocator through the kernels against the same
allocator through its ops, step for step. No timing."""
import math
import types
from collections import Counter

import pytest
import torch

import adalora
from adalora import alloc_kernels, launch_gate

pytest.importorskip("triton", reason="Triton is in the dev extra (and in CUDA builds of torch)")


def _reference_ema(w, g, ibar, ubar, b1, b2):
    """The scorer's ops (adalora/importance.py ``update``), in fp32."""
    ipt = g.float().clone().mul_(w.float()).abs_()     # clone: .float() of an fp32 tensor is itself
    ibar = ibar.clone().mul_(b1).add_(ipt, alpha=1 - b1)
    if ubar is None:
        return ibar, None, ibar
    ubar = ubar.clone().mul_(b2).add_(ipt.sub_(ibar).abs_(), alpha=1 - b2)
    return ibar, ubar, ibar * ubar


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,width", [(7, 45), (3, 1), (40, 1), (5, 64)])
@pytest.mark.parametrize("uncertainty", [True, False])
def test_ema_rows_is_the_scorers_step_and_its_row_means(dtype, rows, width, uncertainty):
    """Rows and widths off the interpreter's tiles (4 x 32), λ's rows of one, fp16 factors
    with fp32 state: Ī and Ū to fp32 rounding, and each row's mean of s."""
    g = torch.Generator().manual_seed(rows * width)
    shape = (rows, width) if width > 1 else (rows,)
    w, grad = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    ibar, ubar = torch.rand(rows * width, generator=g), torch.rand(rows * width, generator=g)
    b1, b2 = 0.85, 0.95
    ref_i, ref_u, ref_s = _reference_ema(w.reshape(-1), grad.reshape(-1), ibar, ubar if uncertainty else None, b1, b2)
    means = torch.full((rows,), math.nan)
    alloc_kernels.ema_rows_(w, grad, ibar, ubar if uncertainty else None, means, b1, b2)
    torch.testing.assert_close(ibar, ref_i, rtol=2e-7, atol=0)
    if uncertainty:
        torch.testing.assert_close(ubar, ref_u, rtol=2e-7, atol=1e-12)
    # the mean by hand: a float64 sum of the reference scores over each row
    torch.testing.assert_close(means.double(), ref_s.double().view(rows, width).sum(1) / width, rtol=1e-6, atol=0)


def test_ema_rows_refuses_state_that_does_not_match():
    with pytest.raises(ValueError, match="do not match"):
        alloc_kernels.ema_rows_(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(11), None, torch.zeros(3), 0.8, 0.8)
    with pytest.raises(ValueError, match="contiguous fp32"):
        alloc_kernels.ema_rows_(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(12, dtype=torch.float64), None,
                                torch.zeros(3), 0.8, 0.8)


def test_triplets_reads_lam_then_q_plus_p():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, generator=g)
    idx = [torch.randint(0, 300, (517,), generator=g) for _ in range(3)]
    got = alloc_kernels.triplets(rows, *idx)
    want = torch.tensor([rows[a].item() + (rows[b].item() + rows[c].item()) for a, b, c in zip(*idx)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _places_by_hand(s: list[float]) -> list[int]:
    """Places in the stable descending order: NaN first, ties by index, as a Python sort."""
    order = sorted(range(len(s)), key=lambda i: (0 if math.isnan(s[i]) else 1, 0.0 if math.isnan(s[i]) else -s[i], i))
    place = [0] * len(s)
    for p, i in enumerate(order):
        place[i] = p
    return place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 37, 150])
def test_positions_are_the_stable_descending_sorts(dtype, n):
    """Ties (a quarter of the scores share four values), zeros and NaN; every budget from 0 to
    past the end: the place of each score, and the score at place min(b, n − 1)."""
    g = torch.Generator().manual_seed(n)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    s[torch.rand(n, generator=g) < 0.25] = torch.tensor([0.5, 0.0, 0.25, 1.0])[torch.randint(0, 4, (1,), generator=g)]
    if n > 5:
        s[[1, 4]] = math.nan
    s = s.to(dtype)
    want = _places_by_hand(s.tolist())
    for b in sorted({0, n // 2, n - 1, n, n + 3}):
        place, threshold = alloc_kernels.positions(s, torch.tensor([b]))
        assert place.tolist() == want
        i = want.index(min(b, n - 1))
        assert threshold.tolist() == s[i:i + 1].tolist() or math.isnan(s[i])


def test_positions_refuses_what_it_cannot_count():
    with pytest.raises(ValueError, match="1 to"):
        alloc_kernels.positions(torch.zeros(alloc_kernels.MAX_RANKED + 1), torch.tensor([1]))
    with pytest.raises(ValueError, match="1-d"):
        alloc_kernels.positions(torch.zeros(3, 2), torch.tensor([1]))


def test_kernels_run_captured_and_eagerly_only_the_first_time(monkeypatch):
    """Compiling may not happen inside a CUDA-graph capture, and an eager step is no faster with
    the kernels: eagerly a signature is taken once (to compile it) and then left to the ops; a
    capture takes only signatures launched before. A stand-in tensor on a machine without CUDA:
    only ``is_cuda`` is read."""
    cuda = types.SimpleNamespace(is_cuda=True)
    sig, other = ("never", "launched"), ("launched", "before")
    capture = [False]
    monkeypatch.setattr(alloc_kernels, "have_triton", lambda: True)
    monkeypatch.setattr(launch_gate, "capturing", lambda: capture[0])
    monkeypatch.setitem(launch_gate.__dict__, "_COMPILED", {other})
    assert alloc_kernels.ready(cuda, sig) and alloc_kernels.ready(cuda, other, sig)   # eager: compile sig
    assert not alloc_kernels.ready(cuda, other)                                        # eager, compiled: the ops
    capture[0] = True
    assert not alloc_kernels.ready(cuda, sig) and not alloc_kernels.ready(cuda, other, sig)
    assert alloc_kernels.ready(cuda, other)
    assert not alloc_kernels.ready(torch.zeros(1), other)     # CPU tensors: the ops
    launch_gate.launched(sig)                                 # inside a capture: not compiled by it
    capture[0] = False
    launch_gate.launched(sig)
    assert launch_gate._COMPILED == {other, sig}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.o = torch.nn.Linear(20, 20), torch.nn.Linear(20, 20), torch.nn.Linear(20, 33)
        self.f = torch.nn.Linear(33, 20)

    def forward(self, x):
        return self.f(torch.tanh(self.o(self.q(x) * self.k(x))))


def _allocator(kind, dtype=torch.float32, banked=True):
    torch.manual_seed(0)
    m = _Net().to(dtype)
    ad = adalora.inject(m, adalora.AdapterConfig(method="adalora", targets=["q", "k", "o", "f"], init_rank=5,
                                                 flat_gates=banked, flat_factors=banked))
    adalora.mark_only_adapters_trainable(m)
    with torch.no_grad():
        for p in adalora.adapter_parameters(ad):
            p.normal_(0, 0.3)
    sched = adalora.ScheduleConfig(target_rank=2, total_steps=40, init_warmup=1, final_warmup=10, mask_interval=2)
    return m, ad, adalora.RankAllocator(ad, sched, score_cfg=adalora.ScoreConfig(kind=kind))


@pytest.mark.parametrize("kind", ["sensitivity_uncertainty", "sensitivity"])
def test_a_banked_allocator_through_the_kernels_is_the_allocator_through_its_ops(monkeypatch, kind):
    """Two copies trained 12 steps on the same batches, one with the kernels taken (the
    interpreter stands in for CUDA): the EMAs, the scores, the masks, λ and the mask step's
    threshold agree at every step, and every kernel ran on every step."""
    from adalora import importance
    runs = {"ema_rows_": 0, "triplets": 0, "positions": 0}
    mods = {"ema_rows_": importance, "triplets": importance, "positions": adalora.allocator}
    models = [_allocator(kind) for _ in range(2)]
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    for step in range(12):
        out = []
        for on, (m, ad, alloc) in zip((False, True), models):
            with monkeypatch.context() as mp:
                if on:
                    mp.setattr(alloc_kernels, "available", lambda t: True)
                    mp.setattr(alloc_kernels, "ready", lambda *a: True)
                    for name in runs:
                        def counted(*a, _f=getattr(alloc_kernels, name), _n=name):
                            runs[_n] += 1
                            return _f(*a)
                        mp.setattr(mods[name].alloc_kernels, name, counted)
                m.zero_grad()
                m(x).pow(2).mean().backward()
                alloc.update_importance(step, grads_finite=True)
                alloc.mask_on_device(torch.tensor(step))
                out.append((alloc.scorer.ibar.clone(), alloc.scorer.flat_scores().clone(),
                            torch.cat(alloc._masks()).clone(), torch.cat([a.lam.detach() for a in ad.values()]),
                            alloc._device_threshold.clone()))
            with torch.no_grad():
                for p in adalora.adapter_parameters(ad):
                    p.sub_(0.05 * p.grad)
        (i0, s0, m0, l0, t0), (i1, s1, m1, l1, t1) = out
        torch.testing.assert_close(i1, i0, rtol=2e-7, atol=0)
        torch.testing.assert_close(s1, s0, rtol=1e-6, atol=0)
        assert torch.equal(m1, m0), step
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
        torch.testing.assert_close(t1, t0, rtol=1e-6, atol=0)
    # 4 banks (P of widths 20 and 33, Q of 20 and 33) and λ's: 5 EMA kernels a step; the scores
    # twice a step (the mask step and the read-out above)
    assert runs == {"ema_rows_": 5 * 12, "triplets": 2 * 12, "positions": 12}


def _gate(monkeypatch, capture: list) -> Counter:
    """The kernels' gate as on a CUDA machine, in the interpreter: every tensor can take them, a
    graph is being captured while ``capture[0]``, nothing compiled yet. Counts each kernel's
    launches."""
    from adalora import allocator, importance
    monkeypatch.setattr(alloc_kernels, "available", lambda t: isinstance(t, torch.Tensor))
    monkeypatch.setattr(launch_gate, "capturing", lambda: capture[0])
    monkeypatch.setitem(launch_gate.__dict__, "_COMPILED", set())
    runs = Counter()
    for name in ("ema_rows_", "triplets", "positions"):
        def counted(*a, _f=getattr(alloc_kernels, name), _n=name):
            runs[_n] += 1
            return _f(*a)
        monkeypatch.setattr(alloc_kernels, name, counted)
    assert importance.alloc_kernels is alloc_kernels is allocator.alloc_kernels
    return runs


def _states(make, x, steps, before=lambda step: None, grads=lambda ad: None):
    """Train ``make()``'s model ``steps`` steps (update, then mask_on_device), calling
    ``before(step)`` first and ``grads(adapters)`` after backward; per step: update's return
    value, the update count, Ī, Ū, the masks, λ and the threshold."""
    m, ad, alloc = make()
    out = []
    for step in range(steps):
        before(step)
        m.zero_grad()
        m(x.to(m.f.base.weight.dtype)).float().pow(2).mean().backward()
        grads(ad)
        took = alloc.update_importance(step, grads_finite=True)
        alloc.mask_on_device(torch.tensor(step))
        sc = alloc.scorer
        out.append((took, sc.updates, sc.ibar.clone(), None if sc.ubar is None else sc.ubar.clone(), torch.cat(alloc._masks()).clone(),
                    torch.cat([a.lam.detach().float() for a in ad.values()]), alloc._device_threshold.clone()))
        with torch.no_grad():
            for p in adalora.adapter_parameters(ad):
                p.sub_(0.05 * p.grad)
    return out


def _assert_same_training(got, want):
    for step, (g, w) in enumerate(zip(got, want)):
        assert g[:2] == w[:2], step
        for a, b in zip(g[2:], w[2:]):
            if a is None or b is None:
                assert a is b, step
            elif a.dtype == torch.bool:
                assert torch.equal(a, b), step
            else:
                torch.testing.assert_close(a, b, rtol=2e-7, atol=0, msg=f"step {step}")


def test_eager_calls_take_the_kernels_once_and_a_capture_only_those_taken_before(monkeypatch):
    """Step 0 eager: the kernels run, to compile. Step 1 eager: the ops. Step 2 captured: the
    kernels. Step 3 captured with nothing compiled: the ops. Step 4 eager again with nothing
    compiled: the kernels. Trained all along as the ops alone train it."""
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    make = lambda: _allocator("sensitivity_uncertainty")   # noqa: E731
    want = _states(make, x, 5)
    capture, seen = [False], []
    runs = _gate(monkeypatch, capture)

    def before(step):
        seen.append(dict(runs))
        capture[0] = step in (2, 3)
        if step in (3, 4):
            launch_gate._COMPILED.clear()
    got = _states(make, x, 5, before)
    seen.append(dict(runs))
    per_step = [{k: seen[i + 1].get(k, 0) - seen[i].get(k, 0) for k in runs} for i in range(5)]
    kernels, ops = {"ema_rows_": 5, "triplets": 1, "positions": 1}, {"ema_rows_": 0, "triplets": 0, "positions": 0}
    assert per_step == [kernels, ops, kernels, ops, kernels]
    _assert_same_training(got, want)


def test_a_first_update_inside_a_capture_takes_the_ops(monkeypatch):
    """The EMAs' first allocation stays outside a graph's memory pool: a capture that meets no
    state yet runs the ops, which make it."""
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    make = lambda: _allocator("sensitivity")   # noqa: E731
    want = _states(make, x, 2)
    runs = _gate(monkeypatch, [True])
    _assert_same_training(_states(make, x, 2), want)
    assert runs["ema_rows_"] == 0


@pytest.mark.parametrize("case", ["fp16", "fp64", "per_adapter", "strided_grad"])
def test_where_the_kernels_do_not_apply_or_must_cast_training_is_the_ops(monkeypatch, case):
    """fp16 factors take the kernels with fp32 state; fp64 state, parameters per adapter and a
    gradient of another layout keep the ops, eagerly and captured; each trains as the ops alone
    train it."""
    x = torch.randn(16, 20, generator=torch.Generator().manual_seed(1))
    dtype = {"fp16": torch.float16, "fp64": torch.float64}.get(case, torch.float32)

    make = lambda: _allocator("sensitivity_uncertainty", dtype, banked=case != "per_adapter")   # noqa: E731

    def grads(ad):
        if case == "strided_grad":      # a bank's gradient with the same values, column-major
            bank = adalora.gate_bank.bank_of(next(iter(ad.values())), "Q")
            bank.param.grad = bank.param.grad.t().contiguous().t()
    want = _states(make, x, 4, grads=grads)
    capture = [False]
    runs = _gate(monkeypatch, capture)
    got = _states(make, x, 4, lambda step: capture.__setitem__(0, step >= 2), grads)   # eager, eager, captured x2
    _assert_same_training(got, want)      # fp16: the fp32 products of fp16 values are exact either way
    assert runs["ema_rows_"] == (15 if case == "fp16" else 0)
