import pytest

from adalora import ScheduleConfig
from adalora.schedule import budget_at, is_mask_step, phase, preview, target_budget

CFG = ScheduleConfig(target_rank=8, total_steps=1000, init_warmup=100, final_warmup=300, mask_interval=10)
B0, BT = 12 * 10, 8 * 10


def test_endpoints_and_flat_phases():
    assert [budget_at(t, CFG, B0, BT) for t in (0, 50, 100)] == [B0] * 3
    assert [budget_at(t, CFG, B0, BT) for t in (700, 701, 1000)] == [BT] * 3
    assert (phase(100, CFG), phase(101, CFG), phase(699, CFG), phase(700, CFG)) == (
        "warmup", "budgeting", "budgeting", "final")


def test_exact_cubic_midpoint():
    # t = t_i + (T - t_f - t_i)/2 = 400: bT + (b0 - bT) * (1/2)^3 = 80 + 40/8 = 85
    assert budget_at(400, CFG, B0, BT) == 85
    # truncation like the reference codes: t=101 -> 80 + 40 * (1 - 1/600)^3 = 119.8 -> 119
    assert budget_at(101, CFG, B0, BT) == 119


def test_monotone_non_increasing():
    b = preview(CFG, B0, BT)
    assert len(b) == 1001 and all(x >= y for x, y in zip(b, b[1:]))


def test_linear_and_constant_shapes():
    lin = ScheduleConfig(target_rank=8, total_steps=1000, init_warmup=100, final_warmup=300, shape="linear")
    assert budget_at(400, lin, B0, BT) == 100
    const = ScheduleConfig(target_rank=8, total_steps=1000, init_warmup=100, final_warmup=300, shape="constant")
    assert budget_at(101, const, B0, BT) == BT and budget_at(100, const, B0, BT) == B0


def test_mask_steps():
    steps = [t for t in range(1001) if is_mask_step(t, CFG)]
    assert steps[0] == 110 and steps[-1] == 700 and 100 not in steps and 701 not in steps
    odd = ScheduleConfig(target_rank=8, total_steps=1000, init_warmup=100, final_warmup=305, mask_interval=10)
    assert is_mask_step(695, odd)  # the final allocation is forced whatever mask_interval says


def test_target_budget():
    assert target_budget(CFG, 10) == 80
    assert target_budget(ScheduleConfig(target_rank=1.5, total_steps=10, init_warmup=0, final_warmup=0), 5) == 8
    assert target_budget(ScheduleConfig(target_total=7, total_steps=10, init_warmup=0, final_warmup=0), 5) == 7


@pytest.mark.parametrize("kwargs, field", [
    (dict(total_steps=100, init_warmup=50, final_warmup=50), "init_warmup \\+ final_warmup"),
    (dict(total_steps=100, init_warmup=99, final_warmup=0), "leaves no step to prune"),
    (dict(total_steps=0), "total_steps"),
    (dict(mask_interval=0), "mask_interval"),
    (dict(init_warmup=-1), "init_warmup"),
    (dict(target_rank=-1.0), "target_rank"),
    (dict(shape="exp"), "shape"),
])
def test_invalid_schedules_name_the_fix(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScheduleConfig(**{**dict(total_steps=1000, init_warmup=10, final_warmup=10), **kwargs})


def test_zero_final_warmup_finalizes_on_the_last_step():
    cfg = ScheduleConfig(target_rank=8, total_steps=50, init_warmup=10, final_warmup=0, mask_interval=5)
    assert cfg.final_step == 49 and phase(49, cfg) == "final" and is_mask_step(49, cfg)
    assert budget_at(49, cfg, B0, BT) == BT and phase(48, cfg) == "budgeting"


def test_the_preview_covers_the_steps_that_run():
    """Steps run 0 .. T-1: the preview's phase spans and mask steps stop at T-1, and with t_f = 0
    the forced final allocation is at T-1, where training takes it."""
    from analysis.schedule import describe, mask_steps, phase_spans
    sched = {"total_steps": 1000, "init_warmup": 100, "final_warmup": 300, "mask_interval": 10,
             "shape": "cubic", "initial_budget": B0, "target_budget": BT}
    assert phase_spans(sched) == [("warmup", 0, 100), ("budgeting", 101, 699), ("final", 700, 999)]
    assert all(phase(t, CFG) == p for p, lo, hi in phase_spans(sched) for t in (lo, hi))
    assert mask_steps(sched) == [t for t in range(1000) if is_mask_step(t, CFG)]
    assert "final     steps    700 .. 999" in describe(sched)
    no_tf = {**sched, "final_warmup": 0}
    assert phase_spans(no_tf)[-1] == ("final", 999, 999)
    assert mask_steps(no_tf)[-1] == 999 and "final allocation forced at step 999" in describe(no_tf)
