import copy

import pytest
import torch
import torch.nn as nn

import adalora
from adalora import AdapterConfig, RankAllocator, ScheduleConfig, ScoreConfig


def _model(seed=0, dims=((12, 10), (10, 12), (12, 10))):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(d_in, d_out) for d_out, d_in in dims]).double()


def _setup(seed=0, kind="sensitivity_uncertainty", **sched):
    m = _model(seed)
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=4, alpha=4.0))
    adalora.mark_only_adapters_trainable(m)
    cfg = ScheduleConfig(**{**dict(target_rank=2, total_steps=40, init_warmup=4, final_warmup=10,
                                   mask_interval=3), **sched})
    return m, ad, RankAllocator(ad, cfg, ScoreConfig(kind=kind, seed=1))


def _train(m, ad, alloc, steps, start=0, opt=None, seed=123, compact_at=None, orth=0.1):
    opt = opt or torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2)
    losses, records = [], []
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(seed * 1000 + step)     # batch depends on the step only
        x = torch.randn(8, 10, generator=g, dtype=torch.float64)
        loss = m(x).pow(2).mean() + orth * adalora.orthogonality_penalty(ad)
        loss.backward()
        opt.step()
        alloc.update_importance(step)
        rec = alloc.mask_to_budget(step)
        if rec:
            records.append(rec)
        opt.zero_grad(set_to_none=True)
        if compact_at is not None and step == compact_at:
            alloc.compact(opt)
        losses.append(loss.item())
    return losses, records, opt


def test_keeps_exactly_budget_with_ties_and_global_order():
    m, ad, alloc = _setup(kind="magnitude")
    with torch.no_grad():
        vals = [[3.0, 1.0, 1.0, 0.5], [1.0, 1.0, 2.0, 0.0], [1.0, 4.0, 1.0, 1.0]]
        for a, v in zip(ad.values(), vals):
            a.lam.copy_(torch.tensor(v))
    rec = alloc._allocate(step=5, budget=5)
    # brute force: sort by (-score, global index) and keep the first 5
    flat = [(v, i) for i, v in enumerate(sum(vals, []))]
    kept = {i for _, i in sorted(flat, key=lambda t: (-t[0], t[1]))[:5]}
    got = {k * 4 + j for k, a in enumerate(ad.values()) for j in range(4) if a.rank_mask[j]}
    assert got == kept and rec.budget == 5 and sum(rec.ranks.values()) == 5
    # 4, 3, 2 and then the tie at 1.0 goes to the earliest adapter and index: one global order.
    # (The reference "score <= kth value" rule would prune all seven 1.0s and keep only 3.)
    assert rec.ranks == {"0": 3, "1": 1, "2": 1}
    assert rec.threshold == 1.0
    assert rec.params_kept == 3 * 23 + 1 * 23 + 1 * 23
    for a in ad.values():
        assert torch.all(a.lam[~a.rank_mask] == 0)


def test_budget_follows_schedule_and_final_mask_is_frozen():
    m, ad, alloc = _setup()
    losses, records, _ = _train(m, ad, alloc, 40)
    cfg = alloc.schedule
    assert [r.step for r in records] == [t for t in range(40) if adalora.schedule.is_mask_step(t, cfg)]
    for r in records:
        assert r.budget == adalora.schedule.budget_at(r.step, cfg, 12, 6) == sum(r.ranks.values())
    assert records[-1].step == 30 and records[-1].budget == 6
    assert alloc.scorer.ibar is None          # EMAs freed after the final allocation
    for a in ad.values():                     # re-applied every step: Adam cannot revive a pruned lam
        assert torch.all(a.lam[~a.rank_mask] == 0)
    assert alloc.finalize().ranks == records[-1].ranks


def test_importance_stops_at_final_step():
    m, ad, alloc = _setup()
    _train(m, ad, alloc, 30)                  # steps 0..29: all update
    assert alloc.scorer.updates == 30
    assert alloc.update_importance(30) is False


def test_finalize_raises_when_never_allocated_and_bad_target():
    m, ad, alloc = _setup()
    with pytest.raises(RuntimeError, match=r"^AdaLoRA never reached its final allocation \(step 30 = total_steps - final_warmup\): call "
                       r"allocator\.update_importance\(step\) and mask_to_budget\(step\) once per optimizer step "
                       r"with step counting optimizer steps, and set ScheduleConfig\.total_steps to the number of "
                       r"optimizer steps actually run$"):
        alloc.finalize()
    with pytest.raises(ValueError, match=r"^target budget 12 >= initial budget 12 singular values: set ScheduleConfig\.target_rank below "
                       r"AdapterConfig\.init_rank \(the paper uses init ≈ 1\.5 × target\)$"):
        RankAllocator(ad, ScheduleConfig(target_rank=4, total_steps=40, init_warmup=1, final_warmup=1))
    with pytest.raises(ValueError, match=r"^RankAllocator needs SVD adapters: inject with AdapterConfig\(method='adalora'\)$"):
        lm = _model()
        RankAllocator(adalora.inject(lm, AdapterConfig(method="lora", targets=["0"])), alloc.schedule)


def test_resume_is_bit_identical():
    m1, ad1, al1 = _setup(seed=3)
    full, _, _ = _train(m1, ad1, al1, 40)

    m2, ad2, al2 = _setup(seed=3)
    first, _, opt2 = _train(m2, ad2, al2, 17)
    state = copy.deepcopy({"model": m2.state_dict(), "opt": opt2.state_dict(), "alloc": al2.state_dict()})
    m3, ad3, al3 = _setup(seed=99)
    m3.load_state_dict(state["model"])
    al3.load_state_dict(state["alloc"])
    opt3 = torch.optim.AdamW(adalora.adapter_parameters(ad3), lr=1e-2)
    opt3.load_state_dict(state["opt"])
    rest, _, _ = _train(m3, ad3, al3, 23, start=17, opt=opt3)
    assert first + rest == full
    for a, b in zip(ad1.values(), ad3.values()):
        assert torch.equal(a.P, b.P) and torch.equal(a.lam, b.lam) and torch.equal(a.rank_mask, b.rank_mask)


def test_compact_then_continue_matches_uncompacted():
    ma, ada, ala = _setup(seed=5)
    mb, adb, alb = _setup(seed=5)
    # Without the orthogonality term: with it, the compacted penalty covers only the kept
    # singular vectors, a different (smaller) objective than the full-size one (see compact()).
    la, _, _ = _train(ma, ada, ala, 40, seed=7, orth=0.0)
    lb, _, _ = _train(mb, adb, alb, 40, seed=7, compact_at=31, orth=0.0)
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-6
    assert [a.rank for a in adb.values()] == [int(a.rank_mask.sum()) for a in ada.values()]
    x = torch.randn(3, 10, dtype=torch.float64)
    assert torch.allclose(ma(x), mb(x), atol=1e-9)


def test_state_dict_round_trip_after_compact():
    m, ad, al = _setup()
    _train(m, ad, al, 35, compact_at=31)
    sd = copy.deepcopy({"m": m.state_dict(), "a": al.state_dict()})
    m2, ad2, al2 = _setup(seed=8)
    al2.load_state_dict(sd["a"])             # resizes the compacted layers first ...
    m2.load_state_dict(sd["m"])              # ... so the weights fit
    x = torch.randn(2, 10, dtype=torch.float64)
    assert torch.equal(m(x), m2(x)) and al2.ranks() == al.ranks()


def test_mask_step_syncs_nothing_until_the_record_is_read():
    """A mask step leaves ranks and threshold on the device (no host sync when the loop drops the
    record, and no value copied in from the host, which on a GPU waits too); reading the record
    gives what the materialised ranks() reports. The first step builds the cached index tables."""
    from experiments.opcount import count_ops
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "1"], init_rank=4))
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=2, total_steps=20, init_warmup=0, final_warmup=5, mask_interval=1))
    for p in adalora.adapter_parameters(adapters):
        p.grad = torch.randn_like(p)
    box = {}

    def step():
        alloc.update_importance(3, grads_finite=True)
        box["rec"] = alloc.mask_to_budget(3)
    step()
    counted = count_ops(step)
    assert counted["host_syncs"] == 0 and counted["host_values"] == 0
    rec = box["rec"]
    assert rec.ranks == alloc.ranks() and sum(rec.ranks.values()) == rec.budget
    flat = torch.cat([alloc.triplet_scores()[n] for n in alloc.names])
    assert rec.threshold == float(torch.sort(flat, descending=True, stable=True).values[rec.budget])
    assert rec.to_dict()["params_kept"] == sum(r * 17 for r in rec.ranks.values())
    assert rec == adalora.AllocationRecord.of(3, alloc.ranks(), alloc.adapters, rec.budget, rec.threshold)
    import copy
    import pickle
    for clone in (pickle.loads(pickle.dumps(rec)), copy.deepcopy(rec)):
        assert type(clone) is adalora.AllocationRecord and clone == rec
    import dataclasses
    assert dataclasses.replace(rec, step=7).to_dict() == {**rec.to_dict(), "step": 7}
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.step = 8


def test_fused_adamw_trains_alike_through_hand_written_grads_and_compact():
    """Up factors are stored column-major. The gradients and optimizer state the library writes by
    hand (orthogonality_grad_'s first gradient, compact()'s sliced AdamW moments) follow each
    parameter's layout, so fused AdamW, which on the CPU silently misreads a mismatched layout,
    trains exactly as the multi-tensor AdamW does."""
    models = []
    for fused in (False, True):
        m, ad, al = _setup(seed=5)
        opt = torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2, fused=fused, foreach=not fused)
        for step in range(40):
            x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            opt.zero_grad(set_to_none=True)
            adalora.orthogonality_grad_(ad, 0.1)       # before backward: it creates every P and Q grad
            m(x).pow(2).mean().backward()
            opt.step()
            al.update_importance(step)
            al.mask_to_budget(step)
            if step == 31:
                al.compact(opt)
        for a in ad.values():
            assert a.P.t().is_contiguous() and opt.state[a.P]["exp_avg"].t().is_contiguous()
        models.append(m)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-9)


# -- records, read-outs and the top-b rule against hand-computed references ---------------------
def _count_ops(fn) -> int:
    """aten ops that move data (not views) dispatched by ``fn()``: about the kernels launched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


DIMS = ((12, 10), (7, 12), (10, 7))          # d_in + d_out + 1 = 23, 20, 18 per singular value


def _setup_dims(kind="magnitude", init_rank=4, target_rank=2, **kw):
    m = _model(0, DIMS)
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=init_rank, alpha=4.0))
    adalora.mark_only_adapters_trainable(m)
    cfg = ScheduleConfig(target_rank=target_rank, total_steps=40, init_warmup=4, final_warmup=10, mask_interval=3)
    return m, ad, RankAllocator(ad, cfg, ScoreConfig(kind=kind, seed=1), **kw)


def _set_lams(ad, rows):
    with torch.no_grad():
        for a, v in zip(ad.values(), rows):
            a.lam.copy_(torch.as_tensor(v, dtype=a.lam.dtype))


def _kept(ad):
    return {(k, j) for k, a in enumerate(ad.values()) for j in range(a.rank) if a.rank_mask[j]}


def test_top_b_breaks_real_ties_by_adapter_then_index():
    """120 singular values taking only the scores 0, 1, 2: for every budget the kept set is the
    first ``budget`` of a brute-force sort by (-score, adapter, index), the documented tie-break.
    (An unstable sort keeps other members of the tied group at this size.)"""
    m, ad, alloc = _setup_dims(init_rank=40, target_rank=10)
    vals = torch.randint(0, 3, (3, 40), generator=torch.Generator().manual_seed(0)).tolist()
    brute = sorted(((float(v), k, j) for k in range(3) for j, v in enumerate(vals[k])),
                   key=lambda t: (-t[0], t[1], t[2]))
    for budget in (1, 17, 45, 61, 100, 119):
        _set_lams(ad, vals)                           # the previous allocation zeroed pruned lams
        rec = alloc._allocate(step=5, budget=budget)
        assert _kept(ad) == {(k, j) for _, k, j in brute[:budget]}, budget
        assert rec.threshold == brute[budget][0]
        assert rec.ranks == {str(i): sum(k == i for _, k, _ in brute[:budget]) for i in range(3)}


def test_record_fields_each_readable_first_and_a_budget_that_prunes_nothing():
    m, ad, alloc = _setup_dims()
    vals = [[3.0, 1.0, 1.0, 0.5], [1.0, 1.0, 2.0, 0.0], [1.0, 4.0, 1.0, 1.0]]
    _set_lams(ad, vals)
    rec = alloc._allocate(step=5, budget=12)             # keeps everything: no threshold
    assert rec.threshold is None
    assert rec.ranks == {"0": 4, "1": 4, "2": 4} and rec.params_kept == 4 * (23 + 20 + 18)
    _set_lams(ad, vals)
    rec = alloc._allocate(step=6, budget=5)              # 4, 3, 2, then the 1.0s of adapter 0
    assert rec.params_kept == 3 * 23 + 1 * 20 + 1 * 18   # read first: the one transfer fills it
    _set_lams(ad, vals)
    rec = alloc._allocate(step=7, budget=5)
    assert rec.threshold == 1.0                          # read first
    assert (rec.step, rec.budget, rec.ranks) == (7, 5, {"0": 3, "1": 1, "2": 1})


def test_pending_record_unknown_attribute_and_equality():
    m, ad, alloc = _setup_dims()
    _set_lams(ad, [[3.0, 1.0, 1.0, 0.5], [1.0, 1.0, 2.0, 0.0], [1.0, 4.0, 1.0, 1.0]])
    rec = alloc._allocate(step=5, budget=5)
    with pytest.raises(AttributeError, match="no_such_field"):
        rec.no_such_field
    assert "_pending" in rec.__dict__                    # an unknown name makes no device transfer
    assert rec != "a record" and rec != 5 and not (rec == None)   # noqa: E711
    same = adalora.AllocationRecord(step=5, budget=5, threshold=1.0, ranks={"0": 3, "1": 1, "2": 1},
                                    params_kept=3 * 23 + 20 + 18)
    assert rec == same and rec != dataclasses_replace(same, budget=6)


def dataclasses_replace(rec, **kw):
    import dataclasses
    return dataclasses.replace(rec, **kw)


def test_allocation_record_of_defaults_the_budget_to_the_ranks_sum():
    from types import SimpleNamespace
    layers = {"a": SimpleNamespace(in_features=3, out_features=5), "b": SimpleNamespace(in_features=2, out_features=7)}
    r = adalora.AllocationRecord.of(4, {"a": 2, "b": 1}, layers)
    assert r == adalora.AllocationRecord(step=4, budget=3, threshold=None, ranks={"a": 2, "b": 1},
                                         params_kept=2 * 9 + 1 * 10)
    r = adalora.AllocationRecord.of(4, {"a": 2, "b": 1}, layers, budget=7, threshold=0.5)
    assert (r.budget, r.threshold, r.params_kept) == (7, 0.5, 28)


def test_fresh_allocator_flags_initial_record_and_params_kept():
    m, ad, alloc = _setup_dims()
    assert alloc.score_before_step is False and alloc.final_done is False and alloc.compacted is False
    assert _setup_dims(score_before_step=True)[2].score_before_step is True
    assert (alloc.initial_budget, alloc.target_budget) == (12, 6)
    assert alloc.initial_record() == adalora.AllocationRecord(
        step=0, budget=12, threshold=None, ranks={"0": 4, "1": 4, "2": 4}, params_kept=4 * (23 + 20 + 18))
    assert alloc.params_kept() == 4 * (23 + 20 + 18)
    _set_lams(ad, [[3.0, 1.0, 1.0, 0.5], [1.0, 1.0, 2.0, 0.0], [1.0, 4.0, 1.0, 1.0]])
    alloc._allocate(step=5, budget=5)
    assert alloc.params_kept() == 3 * 23 + 1 * 20 + 1 * 18
    assert alloc.ranks() == {"0": 3, "1": 1, "2": 1}


@pytest.mark.parametrize("kind", ["random_churn", "random_fixed"])
def test_random_scores_per_step_or_once_and_reproducible(kind):
    """random_churn draws new scores at every mask step, random_fixed once; both reproduce in a
    fresh allocator (a resumed run) and the mask keeps the top of the scores drawn."""
    masks = []
    for _ in range(2):
        m, ad, alloc = _setup_dims(kind=kind)
        per_step = []
        for step in (5, 8):
            scores = alloc.scorer.flat_scores(step)
            alloc._allocate(step=step, budget=7)
            top = sorted(range(12), key=lambda i: (-float(scores[i]), i))[:7]
            assert _kept(ad) == {(i // 4, i % 4) for i in top}
            per_step.append(_kept(ad))
        masks.append(per_step)
    assert masks[0] == masks[1]
    assert (masks[0][0] != masks[0][1]) == (kind == "random_churn")


def test_final_scores_are_frozen_kept_and_restored():
    m, ad, alloc = _setup(seed=2)
    _train(m, ad, alloc, 30)                              # steps 0..29
    expected = alloc.scorer.flat_scores(30).clone()
    assert expected.abs().sum() > 0
    # step 30 = total_steps - final_warmup: the final allocation, on the scores of that moment
    x = torch.randn(8, 10, dtype=torch.float64)
    m(x).pow(2).mean().backward()
    alloc.update_importance(30)
    rec = alloc.mask_to_budget(30)
    assert rec.budget == 6 and alloc.final_done and alloc.scorer.ibar is None
    frozen = torch.cat([alloc.triplet_scores()[n] for n in alloc.names])
    assert torch.equal(frozen, expected)
    top = sorted(range(12), key=lambda i: (-float(expected[i]), i))[:6]
    assert _kept(ad) == {(i // 4, i % 4) for i in top}
    fin = alloc.finalize()
    assert fin.step == 40 and fin.ranks == rec.ranks and fin.budget == 6
    m2, ad2, al2 = _setup(seed=9)
    al2.load_state_dict(copy.deepcopy(alloc.state_dict()))
    assert al2.final_done is True and al2.compacted is False
    assert torch.equal(torch.cat([al2.triplet_scores()[n] for n in al2.names]), expected)


def test_compacted_state_survives_two_round_trips():
    m, ad, al = _setup()
    _train(m, ad, al, 35, compact_at=31)
    m2, ad2, al2 = _setup(seed=8)
    al2.load_state_dict(copy.deepcopy(al.state_dict()))
    assert al2.compacted is True and al2.final_done is True
    m3, ad3, al3 = _setup(seed=9)
    al3.load_state_dict(copy.deepcopy(al2.state_dict()))   # al2 must save itself as compacted
    m3.load_state_dict(m.state_dict())
    x = torch.randn(2, 10, dtype=torch.float64)
    assert torch.equal(m(x), m3(x)) and al3.ranks() == al.ranks()


def test_load_state_dict_refuses_other_adapters_with_the_fix():
    m, ad, al = _setup()
    sd = al.state_dict()
    other = _model(0, ((12, 10), (10, 12)))
    oal = RankAllocator(adalora.inject(other, AdapterConfig(targets=["0", "1"], init_rank=4)), al.schedule)
    with pytest.raises(ValueError, match="^allocator state is for other adapters: inject the same targets as the saved run$"):
        oal.load_state_dict(sd)
    bigger = _model(0)
    bal = RankAllocator(adalora.inject(bigger, AdapterConfig(targets=["0", "1", "2"], init_rank=5)), al.schedule)
    with pytest.raises(ValueError, match="^allocator state masks do not match the adapters' ranks: load the allocator state into a model "
                       "injected with the saved config$"):
        bal.load_state_dict(sd)


def test_compact_with_an_optimizer_that_has_no_state_yet():
    m, ad, al = _setup()
    _train(m, ad, al, 31)                                # final allocation at step 30
    opt = torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2)     # never stepped
    al.compact(opt)
    assert [a.rank for a in ad.values()] == list(al.ranks().values())
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in adalora.adapter_parameters(ad)}
    m(torch.randn(4, 10, dtype=torch.float64)).pow(2).mean().backward()
    opt.step()                                           # the new parameters train


def test_final_phase_reapplies_the_mask_in_one_kernel_and_counts_are_cached():
    """After the final allocation each step re-applies the frozen mask with one multi-tensor
    multiply (the cast masks are cached by the allocation); the adapter id of every singular
    value, used to count unequal ranks, is built once per set of ranks; equal ranks are counted
    by one row sum of the joined masks."""
    m, ad, al = _setup()
    _train(m, ad, al, 31)
    assert al.final_done
    assert _count_ops(lambda: al.mask_to_budget(31)) == 1
    fresh = _setup()[2]
    assert _count_ops(fresh.ranks) == 2
    with torch.no_grad():
        fresh.layers[0].rank_mask[1:] = False
    fresh.layers[0].resize(torch.arange(3))                  # ranks 3 and r0, as after compaction
    first, second = _count_ops(fresh.ranks), _count_ops(fresh.ranks)
    assert second < first
    assert list(fresh.ranks().values()) == [int(l.rank_mask.sum()) for l in fresh.layers]


def test_mask_step_kernels_do_not_grow_with_the_number_of_adapters():
    """Scores, top-b, masks, the cast masks and the counts are a few kernels per distinct adapter
    shape, not per adapter: a mask step over 6 adapters of one shape dispatches as many ops as
    over 3 (one cast of the kept set for all layers, one count of the ranks)."""
    def ops(n):
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n)]).double()
        ad = adalora.inject(m, AdapterConfig(targets=[str(i) for i in range(n)], init_rank=4))
        al = RankAllocator(ad, ScheduleConfig(target_rank=2, total_steps=40, init_warmup=4, final_warmup=10,
                                              mask_interval=3))
        for p in adalora.adapter_parameters(ad):
            p.grad = torch.randn_like(p)
        al.update_importance(5, grads_finite=True)
        al._allocate(5, 2 * n)              # builds the cached ids once
        return _count_ops(lambda: al._allocate(6, 2 * n))
    assert ops(3) == ops(6)


def test_allocator_protocol_defaults():
    """What a family that overrides nothing inherits: no scoring, no data, no reshaping, an empty
    budget; the calls it must provide raise NotImplementedError; params_kept counts by hand."""
    from types import SimpleNamespace
    required = {"mask_to_budget", "ranks", "finalize", "state_dict", "load_state_dict", "initial_record"}
    assert adalora.allocator.Allocator.__abstractmethods__ == required
    with pytest.raises(TypeError, match="abstract"):
        adalora.allocator.Allocator()              # a family must implement the six

    class Allocator(adalora.allocator.Allocator):  # implements each by deferring to the base
        pass
    for name in required:
        setattr(Allocator, name, lambda self, *a, _n=name: getattr(adalora.allocator.Allocator, _n)(self, *a))
    Allocator.__abstractmethods__ = frozenset()
    base = Allocator()
    assert (base.score_before_step, base.needs_data, base.reshapes, base.final_done) == (False,) * 4
    assert (base.initial_budget, base.target_budget) == (0, 0)
    assert base.update_importance(3) is False and base.update_importance(3, True) is False
    assert base.triplet_scores() == {} and base.compact() is None and base.bind_optimizer(None) is None
    for call in (lambda: base.mask_to_budget(0), base.ranks, base.finalize, base.state_dict,
                 lambda: base.load_state_dict({}), base.initial_record):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(NotImplementedError, match="^Allocator allocates during training, not from data$"):
        base.init_from_data(lambda b: None, [])

    class Fixed(Allocator):
        adapters = {"a": SimpleNamespace(in_features=3, out_features=5), "b": SimpleNamespace(in_features=2,
                                                                                            out_features=7)}

        def ranks(self):
            return {"a": 2, "b": 1}
    assert Fixed().params_kept() == 2 * 9 + 1 * 10
    m, ad, alloc = _setup_dims()
    assert isinstance(alloc, adalora.allocator.Allocator) and not alloc.reshapes and not alloc.needs_data


def test_budget_record_adds_accounting_fields():
    rec = adalora.allocator.BudgetRecord(step=1, budget=3, threshold=None, ranks={"a": 3}, params_kept=9)
    assert isinstance(rec, adalora.AllocationRecord) and (rec.unit, rec.target, rec.gap) == ("values", None, None)
    assert rec.to_dict() == {"step": 1, "budget": 3, "threshold": None, "ranks": {"a": 3}, "params_kept": 9,
                             "unit": "values", "target": None, "gap": None}


def test_final_allocation_freezes_the_scores_of_its_step_and_compact_needs_it():
    m, ad, alloc = _setup_dims(kind="random_churn")
    with pytest.raises(RuntimeError, match=r"^compact\(\) before the final allocation: call it once mask_to_budget "
                                           r"has returned the final record \(step >= total_steps - final_warmup\)$"):
        alloc.compact()
    final = alloc.schedule.final_step
    expected = alloc.scorer.flat_scores(final).clone()
    rec = alloc.mask_to_budget(final)
    assert rec.budget == 6 and alloc.final_done
    assert torch.equal(torch.cat([alloc.triplet_scores()[n] for n in alloc.names]), expected)


@pytest.mark.parametrize("on_device", [False, True])
def test_masks_apply_to_adapters_of_two_dtypes(on_device):
    """One fp32 adapter beside fp64 ones (as fp32 adapters on an NF4 base sit beside bf16 ones):
    the host and the device mask step each keep the top b(t) magnitudes over all adapters and
    zero every other λ, each λ in its own dtype."""
    from adalora import schedule
    m = _model()
    m[2].float()
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=4, alpha=4.0))
    cfg = ScheduleConfig(target_rank=2, total_steps=40, init_warmup=0, final_warmup=10, mask_interval=1)
    alloc = RankAllocator(ad, cfg, ScoreConfig(kind="magnitude"))
    vals = [[3.0, 1.0, 0.2, 0.5], [0.1, 1.5, 2.0, 0.0], [0.3, 4.0, 1.2, 0.7]]
    with torch.no_grad():
        for a, v in zip(ad.values(), vals):
            a.lam.copy_(torch.tensor(v))
    step = 5
    budget = schedule.budget_at(step, cfg, alloc.initial_budget, alloc.target_budget)
    assert 0 < budget < 12
    if on_device:
        alloc.mask_on_device(torch.tensor(step))
    else:
        alloc.mask_to_budget(step)
    kept = sorted(sum(vals, []), reverse=True)[:budget]
    for a, v, dtype in zip(ad.values(), vals, (torch.float64, torch.float64, torch.float32)):
        want = torch.tensor([x if x in kept else 0.0 for x in v], dtype=dtype)
        assert a.lam.dtype == dtype and torch.equal(a.lam.detach(), want)
        assert a.rank_mask.tolist() == [x in kept for x in v]


def test_masking_before_any_importance_update_is_refused_and_masks_nothing():
    """A loop that forgets update_importance would rank every singular value by a zero score,
    keeping the first adapters' by the tie rule: refused, with the call to add."""
    m, ad, alloc = _setup()
    step = 6                                             # a mask step: past t_i = 4, a multiple of ΔT = 3
    assert adalora.schedule.is_mask_step(step, alloc.schedule) and step < alloc.schedule.final_step
    m(torch.randn(8, 10, dtype=torch.float64)).pow(2).mean().backward()
    with pytest.raises(RuntimeError, match=r"mask_to_budget\(6\): no importance was recorded yet: call "
                       r"allocator\.update_importance\(step\) after loss\.backward\(\) at every step$"):
        alloc.mask_to_budget(step)
    assert all(bool(a.rank_mask.all()) for a in ad.values())
    assert alloc.update_importance(step)
    rec = alloc.mask_to_budget(step)
    assert rec is not None and sum(rec.ranks.values()) == rec.budget < 12


def test_masking_after_only_non_finite_gradients_goes_ahead():
    """Every update skipped (an fp16 loss scaler's first steps, say) is not a forgotten call: the
    step masks on zero scores, by the tie rule, as before."""
    m, ad, alloc = _setup()
    m(torch.randn(8, 10, dtype=torch.float64)).pow(2).mean().backward()
    next(iter(ad.values())).lam.grad[0] = float("nan")
    assert not alloc.update_importance(5) and alloc.scorer.skipped == 1
    rec = alloc.mask_to_budget(6)
    b = rec.budget                                       # the first b values in adapter order, 4 each
    assert 8 < b < 12 and rec.ranks == {"0": 4, "1": 4, "2": b - 8}


def _snapshot(ad):
    return {n: (a.rank, a.rank_mask.clone(), a.P.detach().clone(), a.lam.detach().clone(), a.Q.detach().clone())
            for n, a in ad.items()}


def _assert_unchanged(ad, before):
    for n, a in ad.items():
        rank, mask, p, lam, q = before[n]
        assert a.rank == rank and torch.equal(a.rank_mask, mask), n
        assert torch.equal(a.P, p) and torch.equal(a.lam, lam) and torch.equal(a.Q, q), n


def _setup_ranks(ranks, **sched):
    m = _model(0)
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=4, alpha=4.0, rank_pattern=ranks))
    cfg = ScheduleConfig(**{**dict(target_rank=1, total_steps=40, init_warmup=4, final_warmup=10,
                                   mask_interval=3), **sched})
    return m, ad, RankAllocator(ad, cfg)


def test_a_mask_length_mismatch_is_refused_before_any_mask_changes():
    """The first adapter's mask fits, the last's does not: refused whole, the first not copied."""
    _, _, alloc = _setup()
    sd = alloc.state_dict()
    sd["masks"][0][3] = False
    _, ad2, alloc2 = _setup_ranks({"2": 3})
    before = _snapshot(ad2)
    with pytest.raises(ValueError, match=r"^allocator state masks do not match the adapters' ranks: "
                       r"load the allocator state into a model injected with the saved config$"):
        alloc2.load_state_dict(sd)
    _assert_unchanged(ad2, before)
    assert alloc2.ranks() == {"0": 4, "1": 4, "2": 3}


def test_a_compacted_state_larger_than_the_adapters_is_refused_before_any_resize():
    m, ad, alloc = _setup()
    _train(m, ad, alloc, 40, compact_at=35)
    sd = alloc.state_dict()
    saved = alloc.ranks()
    assert alloc.compacted and max(saved.values()) > 1
    big = max(saved, key=saved.get)
    _, ad2, alloc2 = _setup_ranks({big: 1})
    before = _snapshot(ad2)
    with pytest.raises(ValueError, match=rf"^allocator state compacted ranks exceed the adapters' ranks "
                       rf"\('{big}': saved {saved[big]} vs 1\): load the allocator state"):
        alloc2.load_state_dict(sd)
    _assert_unchanged(ad2, before)
    assert not alloc2.compacted and alloc2.ranks() == {**{n: 4 for n in ad2}, big: 1}
    _, ad3, alloc3 = _setup()                  # the saved config still loads
    alloc3.load_state_dict(sd)
    assert alloc3.compacted and {n: a.rank for n, a in ad3.items()} == saved


def test_a_compacted_state_loads_where_a_saved_rank_equals_the_adapters_rank():
    """The compacted ranks only have to fit: an adapter already at its saved rank is kept as is."""
    m, ad, alloc = _setup()
    _train(m, ad, alloc, 40, compact_at=35)
    sd, saved = alloc.state_dict(), alloc.ranks()
    big = max(saved, key=saved.get)
    _, ad2, alloc2 = _setup_ranks({big: saved[big]})
    alloc2.load_state_dict(sd)
    assert alloc2.compacted and {n: a.rank for n, a in ad2.items()} == saved


def test_final_scores_or_importance_of_other_shapes_are_refused_unchanged():
    m, ad, alloc = _setup()
    _train(m, ad, alloc, 8)
    sd = alloc.state_dict()
    _, ad2, alloc2 = _setup()
    before = _snapshot(ad2)
    with pytest.raises(ValueError, match=r"^allocator state has 2 final scores for 3 adapters: "
                       r"load a state saved by this allocator$"):
        alloc2.load_state_dict({**sd, "final_scores": [torch.zeros(4), torch.zeros(4)]})
    for key in ("ibar", "ubar"):
        wrong = list(sd["scorer"][key])
        wrong[4] = torch.zeros(5)                       # adapter 1's lam
        with pytest.raises(ValueError, match=rf"^allocator state's importance {key} does not match the adapters' "
                           r"shapes: load the allocator state into a model injected with the saved config$"):
            alloc2.load_state_dict({**sd, "scorer": {**sd["scorer"], key: wrong}})
    _assert_unchanged(ad2, before)
    assert alloc2.scorer.ibar is None


def test_a_state_for_other_adapters_or_another_count_is_refused_unchanged():
    _, _, alloc = _setup()
    _, ad2, alloc2 = _setup()
    before = _snapshot(ad2)
    sd = alloc.state_dict()
    with pytest.raises(ValueError, match=r"^allocator state is for other adapters: inject the same targets"):
        alloc2.load_state_dict({**sd, "names": ["0", "1"]})
    with pytest.raises(ValueError, match=r"^allocator state has 2 masks for 3 adapters: "):
        alloc2.load_state_dict({**sd, "masks": sd["masks"][:2]})
    _assert_unchanged(ad2, before)


def test_a_mask_step_on_a_merged_model_is_refused_and_unmerge_restores_w0():
    """lam's update sits in W0 while merged: a new mask would make unmerge subtract another ΔW."""
    m, ad, alloc = _setup(kind="magnitude")
    w0 = [a.base.weight.detach().clone() for a in ad.values()]
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()
    before = _snapshot(ad)
    adalora.merge(m)
    for step in (6, alloc.schedule.final_step):                   # a budgeting and the final mask step
        with pytest.raises(ValueError, match=rf"^mask_to_budget\({step}\): adapters \['0', '1', '2'\] are merged "
                           r"into their base weights: unmerge the model before training \(adalora\.unmerge\)$"):
            alloc.mask_to_budget(step)
    assert not alloc.final_done
    adalora.unmerge(m)
    _assert_unchanged(ad, before)
    for a, w in zip(ad.values(), w0):
        torch.testing.assert_close(a.base.weight, w, rtol=0, atol=1e-12)
    assert alloc.mask_to_budget(6) is not None                    # unmerged, it masks
