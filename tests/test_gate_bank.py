"""Flat gates (adalora/gate_bank.py) against the reference, a ``lam`` parameter per adapter:
the same training step for step (losses, masks, factors, optimizer state) through masking,
compaction and growth; each adapter's ``lam`` a view of the one bank; rank changes carry the
optimizer's state to hand-computed indices; checkpoints and adapter files round-trip."""
from __future__ import annotations

import copy

import pytest
import torch

import adalora
from adalora import gate_bank
from experiments.teacher import DT, Maps, Teacher, make_allocator, planted_update

T = Teacher(steps=60, init_warmup=10, final_warmup=20)


def _setup(family: str, flat: bool, fuse: str = "none", dtype=DT):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = len(T.planted)
    model = Maps(n, T.d_out, T.d_in).to(dtype)
    teacher = [m.weight.detach().clone() + planted_update(T.d_out, T.d_in, r, g).to(dtype)
               for m, r in zip(model.maps, T.planted)]
    adapters = adalora.inject(model, adalora.AdapterConfig(
        targets=[f"maps.{i}" for i in range(n)], init_rank=1 if family == "elalora" else T.init_rank,
        alpha=8.0, scale_rank=8.0, fuse=fuse, flat_gates=flat))
    adalora.mark_only_adapters_trainable(model)
    alloc = make_allocator(family, adapters, T, 0)
    return model, adapters, alloc, teacher, g


def _train(family: str, flat: bool, fused_adam: bool = False, fuse: str = "none", compact_at: int | None = None):
    model, adapters, alloc, teacher, g = _setup(family, flat, fuse)
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=0.02, weight_decay=0.01, fused=fused_adam)
    alloc.bind_optimizer(opt)
    losses, masks = [], []
    for step in range(T.steps):
        x = torch.randn(16, len(teacher), T.d_in, generator=g, dtype=DT)
        y = torch.stack([x[:, i] @ w.T for i, w in enumerate(teacher)], dim=1)
        loss = ((model(x) - y) ** 2).sum(-1).mean()
        loss.backward()
        adalora.orthogonality_grad_(adapters, 0.3)
        opt.step()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        opt.zero_grad(set_to_none=True)
        if step == compact_at:
            alloc.compact(opt)
        losses.append(loss.item())
        masks.append(torch.cat([a.rank_mask for a in adapters.values()]).clone())
    factors = [torch.cat([a.P.detach().flatten(), a.lam.detach(), a.Q.detach().flatten()]) for a in adapters.values()]
    moments = [torch.cat([_moment(opt, a, attr) for attr in ("P", "lam", "Q")]) for a in adapters.values()]
    return losses, masks, alloc.ranks(), factors, moments, model


def _moment(opt, layer, attr):
    """Adam's second moment of ``layer``'s factor ``attr``; a flat gate's is its slice of the bank's."""
    bank = gate_bank.bank_of(layer)
    if attr == "lam" and bank is not None:
        k = bank.layers.index(layer)
        return opt.state[bank.lam]["exp_avg_sq"][bank.offsets[k]:bank.offsets[k] + bank.sizes[k]]
    return opt.state[getattr(layer, attr)]["exp_avg_sq"].flatten()


@pytest.mark.parametrize("family,fused_adam,fuse,compact_at", [
    ("adalora", False, "none", T.steps - 10),     # compaction in the final phase, then training on
    ("adalora", True, "epilogue", T.steps - 10),  # the fused path's gather, fused AdamW
    ("sora", False, "none", None),
    ("elalora", False, "none", None),             # growth: expand with optimizer state
])
def test_flat_gates_train_as_a_gate_per_adapter(family, fused_adam, fuse, compact_at):
    ref = _train(family, False, fused_adam, fuse, compact_at)
    flat = _train(family, True, fused_adam, fuse, compact_at)
    # dlam is summed by autograd in another order: equal to fp64 rounding
    torch.testing.assert_close(flat[0], ref[0], rtol=1e-12, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(flat[1], ref[1]))
    assert flat[2] == ref[2]
    for a, b in zip(flat[3] + flat[4], ref[3] + ref[4]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    if family == "adalora":
        assert set(flat[2].values()) != {T.init_rank}          # something was pruned (and compacted)


def test_each_lam_is_a_view_of_the_one_parameter():
    model, adapters, _, _, _ = _setup("adalora", True)
    bank = gate_bank.bank_of_model(model)
    layers = list(adapters.values())
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "adalora_gates" in names and not any(n.endswith(".lam") for n in names)
    assert bank.lam is model.adalora_gates
    params = adalora.adapter_parameters(adapters)
    assert sum(p is bank.lam for p in params) == 1 and len(params) == 2 * len(layers) + 1
    with torch.no_grad():
        bank.lam.copy_(torch.arange(bank.lam.numel(), dtype=DT))
        layers[2].lam[3] = -1.0                               # a write through a view lands in the bank
    r = T.init_rank
    assert bank.lam.numel() == r * len(layers)
    assert torch.equal(layers[1].lam, torch.arange(r, 2 * r, dtype=DT))
    assert bank.lam[2 * r + 3] == -1.0
    assert [a.rank for a in layers] == [r] * len(layers)
    sd = model.state_dict()
    assert "adalora_gates" in sd and "maps.0.lam" not in sd
    twin, _, _, _, _ = _setup("adalora", True)
    twin.load_state_dict(sd)
    assert torch.equal(twin.adalora_gates, bank.lam)
    with pytest.raises(ValueError, match="flat_gates=False"):
        adalora.add_adapter(model, "second")


def test_rank_changes_carry_the_optimizer_state_by_index():
    model, adapters, _, _, _ = _setup("adalora", True)
    layers = list(adapters.values())
    bank = gate_bank.bank_of_model(model)
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=0.1)
    model(torch.randn(4, len(layers), T.d_in, dtype=DT)).sum().backward()
    opt.step()
    old = opt.state[bank.lam]["exp_avg"].clone()
    r = T.init_rank
    keep = torch.tensor([1, 4, 6])
    from adalora.allocator import resize_in_optimizer
    resize_in_optimizer(layers[1], keep, opt)                 # the second adapter: 8 -> 3 values
    expect = torch.cat([old[:r], old[r + keep], old[2 * r:]])
    assert torch.equal(opt.state[bank.lam]["exp_avg"], expect)
    assert sum(p is bank.lam for p in opt.param_groups[0]["params"]) == 1
    layers[0].expand(2, opt)                                  # the first adapter: 8 -> 10, new moments 0
    expect = torch.cat([expect[:r], torch.zeros(2, dtype=DT), expect[r:]])
    assert torch.equal(opt.state[bank.lam]["exp_avg"], expect)
    assert [a.rank for a in layers][:2] == [r + 2, 3] and bank.lam[r:r + 2].eq(0).all()


def test_adapter_files_and_peft_folders_round_trip_between_flat_and_separate_gates(tmp_path):
    ref, ref_adapters, _, _, _ = _setup("adalora", False)
    flat, flat_adapters, _, _, _ = _setup("adalora", True)
    with torch.no_grad():
        for a, b in zip(ref_adapters.values(), flat_adapters.values()):
            a.lam.normal_()
            b.lam.copy_(a.lam)
            a.rank_mask[::3] = False
            a.lam.mul_(a.rank_mask)                           # as the allocator leaves a pruned gate
            b.rank_mask.copy_(a.rank_mask)
            b.lam.copy_(a.lam)
    adalora.save_adapters(tmp_path / "flat", flat)
    adalora.save_adapters(tmp_path / "ref", ref)
    x = torch.randn(4, len(T.planted), T.d_in, dtype=DT)
    for target_flat in (False, True):
        fresh, _, _, _, _ = _setup("adalora", target_flat)
        adalora.load_adapters(tmp_path / "flat", fresh)       # pruned ranks: the bank is rebuilt
        fresh2, _, _, _, _ = _setup("adalora", target_flat)
        adalora.load_adapters(tmp_path / "ref", fresh2)
        torch.testing.assert_close(fresh(x), fresh2(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh(x), ref(x), rtol=1e-12, atol=1e-12)
    # a peft folder written from flat gates holds what one written from separate gates holds
    outs = []
    for model, name in ((flat, "pf"), (ref, "pr")):
        adalora.save_peft(tmp_path / name, model)
        torch.manual_seed(0)
        base = Maps(len(T.planted), T.d_out, T.d_in).to(DT)
        adalora.load_peft(tmp_path / name, base)
        outs.append(base(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], ref(x), rtol=1e-12, atol=1e-12)


def test_the_app_trains_and_resumes_with_flat_gates(tmp_path):
    """``method.flat_gates=true`` through the Hydra app: the same adapters at the end as a gate
    per adapter (fp32 rounding of dlam's sum), and an interrupted run resumes bitwise."""
    from safetensors.torch import load_file

    from exp_utils import TINY, run_inproc
    base = TINY + ["trainer.epochs=2", "logger.tensorboard=false", "schedule.target_rank=2", "method.init_rank=3"]
    ref = run_inproc(tmp_path / "ref", base)
    flat = run_inproc(tmp_path / "flat", base + ["method.flat_gates=true"])
    assert ref["status"] == flat["status"] == "completed" and ref["final_ranks"] == flat["final_ranks"]
    a, b = (load_file(str(tmp_path / d / "adapters.safetensors")) for d in ("ref", "flat"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    d = tmp_path / "resumed"
    flat_args = base + ["method.flat_gates=true", "trainer.checkpoint_every=4"]
    assert run_inproc(d, flat_args + ["trainer.stop_at_step=6"])["status"] == "interrupted"
    assert run_inproc(d, flat_args + [f"trainer.resume={d}"])["status"] == "completed"
    c = load_file(str(d / "adapters.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_a_compiled_sequential_with_flat_gates_matches_eager_without_recompiling(no_recompiles):
    """The gates are a parameter of the model, not a child module, so ``nn.Sequential`` (which
    calls every child) still runs; compiled, the forward equals eager and the separate gates'
    forward, and masking (an in-place write to the bank) does not recompile."""
    import torch.nn as nn

    def build(flat):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "2"], init_rank=4, flat_gates=flat))
        adalora.mark_only_adapters_trainable(model, extra=("4",))
        with torch.no_grad():
            for a in adapters.values():
                a.lam.copy_(torch.linspace(-1, 1, a.rank))
        return model, adapters
    model, adapters = build(True)
    ref, _ = build(False)
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=2, total_steps=8, init_warmup=1, final_warmup=2, mask_interval=1))
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(8):
        x = torch.randn(8, 16)
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=1e-6)
        if step == 0:
            torch.testing.assert_close(out, ref(x), rtol=0, atol=1e-6)
        out.pow(2).mean().backward()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        model.zero_grad(set_to_none=True)
    assert sum(alloc.finalize().ranks.values()) == 4
    assert int((model.adalora_gates != 0).sum()) <= 4


def test_settings_flat_gates_cannot_hold_are_refused_with_the_fix():
    from experiments import config as C
    with pytest.raises(C.ConfigError, match="method=lora has none: drop it"):
        C.MethodConfig(name="lora", flat_gates=True)
    with pytest.raises(ValueError, match="flat_gates='yes': use true or false"):
        adalora.AdapterConfig(flat_gates="yes")
    assert C.MethodConfig(name="sora", flat_gates=True).adapter_config(["q"], 3).flat_gates is True


@pytest.mark.parametrize("fuse", ["none", "epilogue"])
def test_flat_gates_dispatch_no_more_operations_than_separate_gates(fuse):
    """Forward and backward: the gates' gradients are joined once (one split or gather per
    forward), not sliced and accumulated per adapter, so flat gates dispatch no more non-view
    operations than a gate per adapter (counted, not timed)."""
    from experiments.opcount import count_ops
    counts = []
    for flat in (False, True):
        model, _, _, _, _ = _setup("adalora", flat, fuse)
        x = torch.randn(4, len(T.planted), T.d_in, dtype=DT)
        step = lambda: model(x).sum().backward()  # noqa: E731
        step()
        counts.append(count_ops(step)["ops"])
    assert counts[1] <= counts[0], counts
