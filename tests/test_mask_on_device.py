"""The mask step with the step on the device (``RankAllocator.mask_on_device``), the form one
captured CUDA graph replays: the same training as ``mask_to_budget``, with no host sync and the
same ops at every step."""
import pytest
import torch
import torch.nn as nn

import adalora
from adalora import AdapterConfig, RankAllocator, ScheduleConfig, ScoreConfig
from experiments.opcount import count_ops

SCHED = dict(target_rank=2, total_steps=40, init_warmup=4, final_warmup=10, mask_interval=3)


def _setup(kind="sensitivity_uncertainty"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 10), nn.Linear(10, 12)).double()
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=4, alpha=4.0))
    adalora.mark_only_adapters_trainable(m)
    alloc = RankAllocator(ad, ScheduleConfig(**SCHED), ScoreConfig(kind=kind))
    return m, ad, alloc, torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2)


def _step(m, ad, alloc, opt, step, device_step=None, records=None):
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    loss = m(x).pow(2).mean() + 0.1 * adalora.orthogonality_penalty(ad)
    loss.backward()
    opt.step()
    alloc.update_importance(step, grads_finite=True)
    if device_step is None or step >= alloc.schedule.final_step:
        record = alloc.mask_to_budget(step)
    else:
        alloc.mask_on_device(device_step)
        device_step.add_(1)
        record = alloc.mask_record(step) if adalora.schedule.is_mask_step(step, alloc.schedule) else None
    if records is not None and record is not None:
        records[step] = record.to_dict()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("kind", ["sensitivity_uncertainty", "sensitivity", "magnitude"])
def test_device_step_trains_exactly_as_mask_to_budget(kind):
    """Step for step through warmup, budgeting (mask every 3rd step, lam revived in between) and
    the final phase: equal losses, rank masks and lam, bit for bit; and ``mask_record`` gives
    every mask step the record ``mask_to_budget`` returned, threshold included."""
    ref, dev = _setup(kind), _setup(kind)
    t = torch.tensor(1)
    ref_records, dev_records = {}, {}
    for step in range(1, 40):
        assert _step(*ref, step, records=ref_records) == _step(*dev, step, device_step=t, records=dev_records)
        for a, b in zip(ref[2].layers, dev[2].layers):
            assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(a.lam, b.lam)
    assert ref[2].ranks() == dev[2].ranks() and dev[2].final_done
    # mask steps t % 3 == 0 inside (4, 30), then the final allocation at 30
    assert sorted(dev_records) == sorted(ref_records) == [6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert dev_records == ref_records
    assert all(r["threshold"] is not None and sum(r["ranks"].values()) == r["budget"] for r in dev_records.values())


def test_mask_record_needs_a_device_mask_step_and_leaves_threshold_unset_when_nothing_is_pruned():
    m, ad, alloc, opt = _setup()
    with pytest.raises(RuntimeError, match=r"^mask_record\(step\) reads the last mask_on_device step: call that first$"):
        alloc.mask_record(6)
    for p in adalora.adapter_parameters(ad):
        p.grad = torch.rand_like(p)
    alloc.update_importance(1, grads_finite=True)
    alloc.mask_on_device(torch.tensor(1))          # warmup: b = b0 = 12, every value kept
    r = alloc.mask_record(1).to_dict()
    assert r["budget"] == 12 and r["threshold"] is None and r["params_kept"] == 4 * (22 + 22 + 22 + 3)
    # t = 5: b = 6 + 6 (1 − 1/26)³ = 11.33 → 11 of 12 kept, so the threshold is the lowest score
    alloc.mask_on_device(torch.tensor(5))
    r = alloc.mask_record(5).to_dict()
    assert r["budget"] == 11 and r["threshold"] == float(alloc.scorer.flat_scores().min())


def test_budget_is_the_cubic_schedule_by_hand_and_lam_is_left_alone_off_mask_steps():
    m, ad, alloc, opt = _setup()
    b0, bT, ti, T, tf = 12, 6, 4, 40, 10
    for p in adalora.adapter_parameters(ad):
        p.grad = torch.rand_like(p)
    alloc.update_importance(5, grads_finite=True)
    for t in (6, 9, 27):               # mask steps: t % 3 == 0 inside (4, 30)
        alloc.mask_on_device(torch.tensor(t))
        kept = sum(int(layer.rank_mask.sum()) for layer in alloc.layers)
        assert kept == int(bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** 3)
    masks = [layer.rank_mask.clone() for layer in alloc.layers]
    with torch.no_grad():
        for layer in alloc.layers:
            layer.lam.fill_(0.5)       # as an optimizer step would revive pruned values
    alloc.mask_on_device(torch.tensor(28))   # not a mask step
    for layer, mask in zip(alloc.layers, masks):
        assert torch.equal(layer.rank_mask, mask) and bool((layer.lam == 0.5).all())
    alloc.mask_on_device(torch.tensor(3))    # warmup: no masking either
    assert all(bool((layer.lam == 0.5).all()) for layer in alloc.layers)


def test_no_host_sync_and_the_same_ops_on_mask_and_other_steps():
    """What one captured graph needs: nothing waits on the device, and a mask step and a plain
    step dispatch the same ops (the step decides on the device, not in Python)."""
    m, ad, alloc, opt = _setup()
    for p in adalora.adapter_parameters(ad):
        p.grad = torch.rand_like(p)
    alloc.update_importance(5, grads_finite=True)
    alloc.mask_on_device(torch.tensor(5))        # builds the tables once
    counts = {}
    for t in (6, 7, 2):
        counts[t] = count_ops(lambda: alloc.mask_on_device(torch.tensor(t)))
        assert counts[t]["host_syncs"] == 0
    assert counts[6] == counts[7] == counts[2]


def test_refuses_host_scores_and_the_final_phase_with_the_fix():
    with pytest.raises(ValueError, match=r"^ScoreConfig.kind='random_churn' draws its scores on the host: "
                                         r"use mask_to_budget\(step\), or a gradient or magnitude score$"):
        _setup("random_churn")[2].mask_on_device(torch.tensor(5))
    m, ad, alloc, opt = _setup()
    for step in range(1, 31):
        _step(m, ad, alloc, opt, step)
    with pytest.raises(RuntimeError, match=r"^mask_on_device is for the steps before the final allocation; "
                                           r"call mask_to_budget\(step\) from schedule.final_step on$"):
        alloc.mask_on_device(torch.tensor(31))


def test_svd_adapter_costs_four_ops_more_than_lora_per_forward_and_backward():
    """The per-adapter price of AdaLoRA's lam in the step (analysis/README.md counts it in the
    benchmark's kernels): Q·diag(lam) forward, and its two gradients (dQ = g·lam; dlam = Σ g⊙Q as
    a multiply and a sum), on top of the LoRA adapter's products."""
    def ops(method, n):
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Linear(16, 16) for _ in range(n)])
        adalora.inject(m, AdapterConfig(method=method, targets=[str(i) for i in range(n)], init_rank=4))
        adalora.mark_only_adapters_trainable(m)
        x = torch.randn(8, 16)
        return count_ops(lambda: m(x).sum().backward())["ops"]
    assert (ops("adalora", 6) - ops("lora", 6)) - (ops("adalora", 3) - ops("lora", 3)) == 3 * 4


def _magnitudes(vals, init_rank=4, **sched):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 12), nn.Linear(12, 10), nn.Linear(10, 12)).double()
    ad = adalora.inject(m, AdapterConfig(targets=["0", "1", "2"], init_rank=init_rank, alpha=4.0))
    alloc = RankAllocator(ad, ScheduleConfig(**{**SCHED, **sched}), ScoreConfig(kind="magnitude"))
    with torch.no_grad():
        for layer, v in zip(alloc.layers, vals):
            layer.lam.copy_(torch.tensor(v, dtype=torch.float64))
    return alloc


def test_steps_outside_the_table_read_its_first_and_last_entries():
    """Step 0 is warmup, so nothing is masked even where step 1 would mask. A step past the table
    (whose final phase is mask_to_budget's) reads its last entry, here a mask step: it masks as
    that step does."""
    vals = [[4.0 * k + j + 1 for j in range(4)] for k in range(3)]           # 12 distinct magnitudes
    first = _magnitudes(vals, init_warmup=0, mask_interval=1)
    assert adalora.schedule.is_mask_step(1, first.schedule)
    first.mask_on_device(torch.tensor(0))
    assert all(bool(layer.rank_mask.all()) and bool((layer.lam > 0).all()) for layer in first.layers)
    last, past = (_magnitudes(vals, init_warmup=0, final_warmup=12) for _ in range(2))
    t = last.schedule.final_step - 1                                   # 27: a mask step, 26 is not
    assert adalora.schedule.is_mask_step(t, last.schedule) and not adalora.schedule.is_mask_step(t - 1, last.schedule)
    last.mask_on_device(torch.tensor(t))
    past.mask_on_device(torch.tensor(100))
    kept = adalora.schedule.budget_at(t, last.schedule, 12, 6)
    assert sum(int(layer.rank_mask.sum()) for layer in past.layers) == kept < 12
    for a, b in zip(last.layers, past.layers):
        assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(a.lam, b.lam)


def test_ties_go_to_the_earliest_adapter_and_index_as_on_the_host():
    """Scores 0, 1, 2, 0, 1, 2, ... over 3 adapters of rank 8, and a budget of 5 that cuts through
    the eight 2s: the five kept are the first in adapter order, then index (a stable sort; the
    CPU's unstable sort of 24 values keeps others), as mask_to_budget keeps them."""
    flat = [float(i % 3) for i in range(24)]
    vals = [flat[k * 8:(k + 1) * 8] for k in range(3)]
    sched = dict(target_rank=1, init_warmup=0, mask_interval=1)
    dev, host = _magnitudes(vals, 8, **sched), _magnitudes(vals, 8, **sched)
    assert adalora.schedule.budget_at(15, dev.schedule, 24, 3) == 5
    dev.mask_on_device(torch.tensor(15))
    host.mask_to_budget(15)
    brute = sorted(range(24), key=lambda i: (-flat[i], i))[:5]                   # by hand
    got = [k * 8 + j for k, layer in enumerate(dev.layers) for j in range(8) if layer.rank_mask[j]]
    assert got == sorted(brute) == [2, 5, 8, 11, 14]
    for a, b in zip(dev.layers, host.layers):
        assert torch.equal(a.rank_mask, b.rank_mask) and torch.equal(a.lam, b.lam)


def test_the_tables_follow_a_change_of_rank():
    """After an adapter grows (expand) the device step sizes its tables to the new ranks."""
    alloc = _magnitudes([[4.0, 3.0, 2.0, 1.0]] * 3, init_warmup=0, mask_interval=1)
    alloc.mask_on_device(torch.tensor(5))
    alloc.layers[0].expand(2)
    alloc.mask_on_device(torch.tensor(6))
    kept = adalora.schedule.budget_at(6, alloc.schedule, alloc.initial_budget, alloc.target_budget)
    assert alloc.layers[0].rank_mask.shape == (6,)
    assert sum(int(layer.rank_mask.sum()) for layer in alloc.layers) == kept
