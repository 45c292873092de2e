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
    with pytest.raises(RuntimeError, match="never reached its final allocation"):
        alloc.finalize()
    with pytest.raises(ValueError, match="target_rank below AdapterConfig.init_rank"):
        RankAllocator(ad, ScheduleConfig(target_rank=4, total_steps=40, init_warmup=1, final_warmup=1))
    with pytest.raises(ValueError, match="needs SVD adapters"):
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
    record); reading the record gives what the materialised ranks() reports."""
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
    counted = count_ops(step)
    assert counted["host_syncs"] == 0
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
