"""The allocation families (adalora/sora.py, elalora.py, eva.py, truncate.py) on planted-rank
teachers: each meets its budget or records its gap, resumes bitwise, and agrees with its
reference (a dense SVD for svd_truncate; peft's EVA in test_allocators_eva.py)."""
from __future__ import annotations

import copy

import pytest
import torch

import adalora
from adalora import accounting as A
from experiments.teacher import DT, Maps, Teacher, l1, make_allocator, planted_update, train

FAST = Teacher(steps=80, init_warmup=15, final_warmup=25)
FAMILIES = ["adalora", "sora", "elalora", "eva", "svd_truncate"]


@pytest.mark.parametrize("name", FAMILIES)
def test_reaches_its_budget_or_records_the_gap(name):
    ranks, alloc = train(FAST, 0, name)
    final = alloc.finalize()
    target = sum(FAST.planted)
    if name == "sora":           # a threshold method: whatever it kept, with the gap to b_T
        assert final.gap == sum(ranks) - target and final.target == target and final.unit == "values"
    else:
        assert sum(ranks) == target
        assert getattr(final, "gap", 0) in (0, None)
    assert final.ranks == alloc.ranks() and final.step == FAST.steps


@pytest.mark.parametrize("name, says", [
    ("sora", r"^SoRA never reached its final step 55: call mask_to_budget\(step\) once per optimizer step"),
    ("elalora", r"^ElaLoRA never reached its final step 55: call mask_to_budget\(step\) once per optimizer step"),
    ("eva", r"^EVA never allocated: call init_from_data\(forward, batches\) before training$"),
    ("svd_truncate", r"^svd_truncate never truncated \(step 55\): call mask_to_budget\(step\) once per"),
])
def test_before_training_each_family_records_its_start_and_refuses_to_finalize(name, says):
    """Step 0: every adapter at its initial rank (ElaLoRA starts below the target of 18 and
    grows, the others above it), the budget their sum, no gap; finalize names the missed call."""
    torch.manual_seed(0)
    r = 2 if name == "elalora" else 8
    model = Maps(4, 6, 5).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(
        method="lora" if name == "svd_truncate" else "adalora", targets=[f"maps.{i}" for i in range(4)],
        init_rank=r))
    alloc = make_allocator(name, adapters, FAST, 0)
    if name == "sora":          # its ranks are the gates off zero, and lam starts at zero
        assert alloc.ranks() == {f"maps.{i}": 0 for i in range(4)}
        with torch.no_grad():
            for a in adapters.values():
                a.lam.fill_(0.5)
    assert alloc.ranks() == {f"maps.{i}": r for i in range(4)}
    rec = alloc.initial_record()
    assert rec.step == 0 and rec.ranks == alloc.ranks() and rec.unit == "values"
    assert rec.target == 4 * r and rec.gap == 0
    with pytest.raises(RuntimeError, match=says):
        alloc.finalize()


def test_params_unit_fills_greedily_and_records_the_gap():
    t = Teacher(planted=(0, 2, 4, 1, 6, 3), d_out=24, d_in=12, steps=60, init_warmup=10, final_warmup=20)
    torch.manual_seed(0)
    model = Maps(6, t.d_out, t.d_in).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=[f"maps.{i}" for i in range(6)], init_rank=8))
    sched = adalora.ScheduleConfig(target_rank=2.5, total_steps=60, init_warmup=10, final_warmup=20)
    alloc = adalora.EVAAllocator(adapters, sched, unit="params")
    g = torch.Generator().manual_seed(0)
    rec = alloc.init_from_data(lambda b: model(b["x"]), [{"x": torch.randn(32, 6, 12, generator=g, dtype=DT)}])
    cost = 24 + 12 + 1
    assert alloc.target_budget == round(2.5 * 6 * cost)
    spent = A.spent(list(rec.ranks.values()), list(adapters.values()), "params")
    assert rec.gap == spent - alloc.target_budget and -cost < rec.gap <= 0


def test_select_is_top_b_in_values_and_a_greedy_fill_in_params():
    s = [torch.tensor([5.0, 1.0, 3.0]), torch.tensor([4.0, 2.0])]
    keep, used = A.select(s, [1, 1], 3)
    assert [k.tolist() for k in keep] == [[True, False, True], [True, False]] and used == 3
    keep, used = A.select(s, [10, 3], 15)        # 5 (10) fits, 4 (3) fits, 3 (10) not, 2 (3) not: 13
    assert [k.tolist() for k in keep] == [[True, False, False], [True, False]] and used == 13


def test_expand_grows_adapter_and_adam_state_like_a_dense_reference():
    """Old coordinates train on exactly as without the expansion (the new triplets have lam = 0,
    so they change neither ΔW nor the old gradients); new ones follow Adam from zero moments."""
    torch.manual_seed(0)
    base = torch.nn.Linear(10, 7).double()
    layer = adalora.SVDLinear(base, rank=3, alpha=3.0)
    opt = torch.optim.AdamW(adalora.adapter_parameters({"a": layer}), lr=0.01, weight_decay=0.0)
    x = torch.randn(16, 10, dtype=DT)
    for _ in range(3):
        layer(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    ref_layer = copy.deepcopy(layer)
    ref_opt = torch.optim.AdamW(adalora.adapter_parameters({"a": ref_layer}), lr=0.01, weight_decay=0.0)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))      # not sharing the step counters
    before = layer.delta_weight().clone()
    layer.expand(2, opt, init_std=0.1, generator=torch.Generator().manual_seed(1))
    assert layer.rank == 5 and layer.rank_mask.all() and torch.equal(layer.delta_weight(), before)
    assert layer.P.stride() == (1, 7)                       # the up factor stays column-major
    st = opt.state[layer.lam]
    assert st["exp_avg"].shape == (5,) and torch.equal(st["exp_avg"][3:], torch.zeros(2, dtype=DT))
    for net, o in ((layer, opt), (ref_layer, ref_opt)):
        net(x).pow(2).sum().backward()
        o.step()
    for attr, sl in (("P", (slice(None), slice(0, 3))), ("lam", (slice(0, 3),)), ("Q", (slice(0, 3),))):
        torch.testing.assert_close(getattr(layer, attr)[sl], getattr(ref_layer, attr), rtol=0, atol=1e-12)
    g = layer.lam.grad[3:]
    m, v = 0.1 * g, 0.001 * g * g                           # one Adam step from zero moments
    torch.testing.assert_close(opt.state[layer.lam]["exp_avg"][3:], m, rtol=1e-12, atol=0)
    torch.testing.assert_close(opt.state[layer.lam]["exp_avg_sq"][3:], v, rtol=1e-12, atol=0)


def test_svd_truncate_equals_a_dense_global_svd_truncation():
    torch.manual_seed(0)
    model = Maps(3, 9, 7).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(method="lora", targets=["maps.0", "maps.1", "maps.2"],
                                                           init_rank=5))
    for a in adapters.values():
        a.set_factors(B=torch.randn(9, 5, dtype=DT))
    deltas = [a.delta_weight().clone() for a in adapters.values()]
    sched = adalora.ScheduleConfig(target_total=7, total_steps=10, init_warmup=0, final_warmup=2)
    alloc = adalora.TruncateAllocator(adapters, sched)
    rec = alloc.truncate()
    sig = [torch.linalg.svdvals(d) for d in deltas]
    top = torch.cat(sig).sort(descending=True).values[6]
    want = [int((s >= top).sum()) for s in sig]
    assert list(rec.ranks.values()) == want and sum(want) == 7
    for d, a, r in zip(deltas, adapters.values(), want):
        u, s, vh = torch.linalg.svd(d)
        torch.testing.assert_close(a.delta_weight(), u[:, :r] @ torch.diag(s[:r]) @ vh[:r], rtol=0, atol=1e-12)


def _setup(name, seed=0):
    t = FAST
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(t.planted)
    model = Maps(n, t.d_out, t.d_in).to(DT)
    teacher = [m.weight.detach().clone() + planted_update(t.d_out, t.d_in, r, g) for m, r in zip(model.maps, t.planted)]
    rank = 1 if name == "elalora" else t.init_rank
    adapters = adalora.inject(model, adalora.AdapterConfig(
        method="lora" if name == "svd_truncate" else "adalora", targets=[f"maps.{i}" for i in range(n)],
        init_rank=rank, alpha=8.0, scale_rank=8.0))
    adalora.mark_only_adapters_trainable(model)
    return model, adapters, make_allocator(name, adapters, t, seed), teacher, g


def _steps(model, adapters, alloc, opt, teacher, g, lo, hi):
    for step in range(lo, hi):
        x = torch.randn(16, len(teacher), FAST.d_in, generator=g, dtype=DT)
        y = torch.stack([x[:, i] @ w.T for i, w in enumerate(teacher)], dim=1)
        loss = ((model(x) - y) ** 2).sum(-1).mean()
        if isinstance(next(iter(adapters.values())), adalora.SVDLinear):
            loss = loss + 0.3 * adalora.orthogonality_penalty(adapters)
        loss.backward()
        opt.step()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_and_resume_are_bitwise(name):
    stop = 42                                   # mid-budgeting (elalora has grown, sora shrinks)

    def start():
        model, adapters, alloc, teacher, g = _setup(name)
        if alloc.needs_data:
            alloc.init_from_data(lambda b: model(b["x"]), [{"x": torch.randn(16, 6, 16, generator=g, dtype=DT)}])
        opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=0.02, weight_decay=0.0)
        alloc.bind_optimizer(opt)
        return model, adapters, alloc, opt, teacher, g

    model, adapters, alloc, opt, teacher, g = start()
    _steps(model, adapters, alloc, opt, teacher, g, 0, stop)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "alloc": alloc.state_dict(),
                           "g": g.get_state()})
    _steps(model, adapters, alloc, opt, teacher, g, stop, FAST.steps)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model2, adapters2, alloc2, teacher2, g2 = _setup(name)
    alloc2.load_state_dict(saved["alloc"])       # resizes first: the weights fit afterwards
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.AdamW(adalora.adapter_parameters(adapters2), lr=0.02, weight_decay=0.0)
    opt2.load_state_dict(saved["opt"])
    alloc2.bind_optimizer(opt2)
    g2.set_state(saved["g"])
    _steps(model2, adapters2, alloc2, opt2, teacher2, g2, stop, FAST.steps)
    resumed = model2.state_dict()
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    assert alloc.ranks() == alloc2.ranks()


def test_refusals_name_the_fix():
    model = Maps(2, 8, 8).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["maps.0", "maps.1"], init_rank=2))
    sched = adalora.ScheduleConfig(target_rank=3, total_steps=20, init_warmup=2, final_warmup=5)
    with pytest.raises(ValueError, match="inject a smaller initial rank"):
        adalora.ElaLoRAAllocator(adapters, adalora.ScheduleConfig(target_rank=1, total_steps=20, init_warmup=2,
                                                                  final_warmup=5))
    with pytest.raises(ValueError, match="LoRA adapters"):
        adalora.TruncateAllocator(adapters, sched)
    with pytest.raises(ValueError, match="budget unit"):
        adalora.EVAAllocator(adapters, sched, unit="bytes")
    with pytest.raises(RuntimeError, match="bind_optimizer"):
        a = adalora.ElaLoRAAllocator(adapters, sched)
        a.mask_to_budget(sched.final_step)
    with pytest.raises(ValueError, match="SoRAConfig.xi"):
        adalora.SoRAConfig(xi=-1.0)


def test_matched_lora_prices_the_target_as_the_params_unit_does():
    """budget=matched (experiments/budget.py) and schedule.budget_unit=params count alike."""
    from types import SimpleNamespace

    from experiments import budget as B
    shapes = {"q": (384, 384), "ffn": (1536, 384), "out": (384, 1536)}
    layers = [SimpleNamespace(out_features=o, in_features=i) for o, i in shapes.values()]
    for r in (1, 2, 2.5, 4):
        assert B.adalora_target_params(shapes, r) == A.target_in_unit(layers, "params", r, None)


def _truncating(n=2):
    torch.manual_seed(0)
    model = Maps(n, 8, 8).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(method="lora", targets=[f"maps.{i}" for i in range(n)],
                                                           init_rank=4))
    with torch.no_grad():
        for a in adapters.values():
            a.B.normal_()
    sched = adalora.ScheduleConfig(target_rank=2, total_steps=20, init_warmup=2, final_warmup=5)
    return model, adapters, adalora.TruncateAllocator(adapters, sched), sched


def _factors(adapters):
    return [(a.A.detach().clone(), a.B.detach().clone()) for a in adapters.values()]


def test_svd_truncate_without_a_bound_optimizer_refuses_to_cut():
    """The cut makes new parameters: an unbound optimizer would go on training the old ones."""
    _, adapters, alloc, sched = _truncating()
    before = _factors(adapters)
    assert alloc.mask_to_budget(sched.final_step - 1) is None          # before the cut: nothing to bind yet
    with pytest.raises(RuntimeError, match=r"^TruncateAllocator\.bind_optimizer\(optimizer\) first: "):
        alloc.mask_to_budget(sched.final_step)
    assert not alloc.final_done
    assert all(torch.equal(a, a0) and torch.equal(b, b0) for (a, b), (a0, b0) in zip(_factors(adapters), before))
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=1e-2)
    alloc.bind_optimizer(opt)
    assert alloc.mask_to_budget(sched.final_step) is not None
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(a.A) in params and id(a.B) in params for a in adapters.values())


def test_svd_truncate_on_a_merged_model_refuses_before_any_cut():
    """Only the second adapter merged: the first is not cut before the refusal either."""
    model, adapters, alloc, sched = _truncating()
    w0 = [a.base.weight.detach().clone() for a in adapters.values()]
    alloc.bind_optimizer(torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=1e-2))
    before = _factors(adapters)
    adapters["maps.1"].merge()
    with pytest.raises(ValueError, match=r"^svd_truncate: adapters \['maps\.1'\] are merged into their base "
                       r"weights: unmerge the model before training \(adalora\.unmerge\)$"):
        alloc.mask_to_budget(sched.final_step)
    assert not alloc.final_done
    assert all(torch.equal(a, a0) and torch.equal(b, b0) for (a, b), (a0, b0) in zip(_factors(adapters), before))
    adalora.unmerge(model)
    for a, w in zip(adapters.values(), w0):
        torch.testing.assert_close(a.base.weight, w, rtol=0, atol=1e-12)
