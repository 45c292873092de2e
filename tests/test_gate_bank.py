"""Flat gates (adalora/gate_bank.py) against the reference, a ``lam`` parameter per adapter:
the same training step for step (losses, masks, factors, optimizer state) through masking,
compaction and growth; each adapter's ``lam`` a view of the one bank; rank changes carry the
optimizer's state to hand-computed indices; checkpoints and adapter files round-trip."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import adalora
from adalora import gate_bank
from experiments.teacher import DT, Maps, Teacher, make_allocator, planted_update

T = Teacher(steps=60, init_warmup=10, final_warmup=20)


def _setup(family: str, flat, fuse: str = "none", dtype=DT):
    """``flat``: False (a parameter per adapter), True (flat gates), ``"all"`` (flat gates and
    factors) or ``"factors"`` (flat factors, a gate per adapter)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n = len(T.planted)
    model = Maps(n, T.d_out, T.d_in).to(dtype)
    teacher = [m.weight.detach().clone() + planted_update(T.d_out, T.d_in, r, g).to(dtype)
               for m, r in zip(model.maps, T.planted)]
    adapters = adalora.inject(model, adalora.AdapterConfig(
        targets=[f"maps.{i}" for i in range(n)], init_rank=1 if family == "elalora" else T.init_rank,
        alpha=8.0, scale_rank=8.0, fuse=fuse, flat_gates=flat in (True, "all"),
        flat_factors=flat in ("all", "factors")))
    adalora.mark_only_adapters_trainable(model)
    alloc = make_allocator(family, adapters, T, 0)
    return model, adapters, alloc, teacher, g


def _train(family: str, flat, fused_adam: bool = False, fuse: str = "none", compact_at: int | None = None):
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
    """Adam's second moment of ``layer``'s factor ``attr``; a banked one's is its rows of the
    bank's, in the adapter's layout (``P`` and ``B`` are stored as rows of their transposes there)."""
    bank = gate_bank.bank_of(layer, attr)
    if bank is not None:
        k = bank.layers.index(layer)
        rows = opt.state[bank.param]["exp_avg_sq"][bank.offsets[k]:bank.offsets[k] + bank.sizes[k]]
        return (rows.t() if attr in ("P", "B") else rows).flatten()
    return opt.state[getattr(layer, attr)]["exp_avg_sq"].flatten()


@pytest.mark.parametrize("flat", [True, "all"])
@pytest.mark.parametrize("family,fused_adam,fuse,compact_at", [
    ("adalora", False, "none", T.steps - 10),     # compaction in the final phase, then training on
    ("adalora", True, "epilogue", T.steps - 10),  # the fused path's gather, fused AdamW
    ("sora", False, "none", None),
    ("elalora", False, "none", None),             # growth: expand with optimizer state
])
def test_flat_parameters_train_as_parameters_per_adapter(family, fused_adam, fuse, compact_at, flat):
    ref = _train(family, False, fused_adam, fuse, compact_at)
    flat = _train(family, flat, fused_adam, fuse, compact_at)
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
    layers[1].resize(keep, opt)                               # the second adapter: 8 -> 3 values
    expect = torch.cat([old[:r], old[r + keep], old[2 * r:]])
    assert torch.equal(opt.state[bank.lam]["exp_avg"], expect)
    assert sum(p is bank.lam for p in opt.param_groups[0]["params"]) == 1
    layers[0].expand(2, opt)                                  # the first adapter: 8 -> 10, new moments 0
    expect = torch.cat([expect[:r], torch.zeros(2, dtype=DT), expect[r:]])
    assert torch.equal(opt.state[bank.lam]["exp_avg"], expect)
    assert [a.rank for a in layers][:2] == [r + 2, 3] and bank.lam[r:r + 2].eq(0).all()


@pytest.mark.parametrize("mode", [True, "all"])
def test_adapter_files_and_peft_folders_round_trip_between_flat_and_separate_gates(tmp_path, mode):
    ref, ref_adapters, _, _, _ = _setup("adalora", False)
    flat, flat_adapters, _, _, _ = _setup("adalora", mode)
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
    for target_flat in (False, mode):
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


PER_ADAPTER = ["method.flat_gates=false", "method.flat_factors=false"]


@pytest.mark.parametrize("method, flat", [([], ["method.flat_factors=false"]), ([], []), (["method=lora"], [])],
                         ids=["adalora_gates", "adalora_default", "lora_default"])
def test_the_app_trains_and_resumes_with_flat_gates(tmp_path, method, flat):
    """The Hydra app's default (flat gates and factors; LoRA's factors) and flat gates alone: the
    same adapters at the end as with ``method.flat_gates=false method.flat_factors=false``,
    parameters per adapter (fp32 rounding of the joined gradients' sums), and an interrupted run
    resumes bitwise."""
    from safetensors.torch import load_file

    from exp_utils import TINY, run_inproc
    base = TINY + method + ["trainer.epochs=2", "logger.tensorboard=false", "schedule.target_rank=2",
                            "method.init_rank=3"]
    ref = run_inproc(tmp_path / "ref", base + PER_ADAPTER)
    got = run_inproc(tmp_path / "flat", base + flat)
    assert ref["status"] == got["status"] == "completed" and ref["final_ranks"] == got["final_ranks"]
    a, b = (load_file(str(tmp_path / d / "adapters.safetensors")) for d in ("ref", "flat"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    d = tmp_path / "resumed"
    flat_args = base + flat + ["trainer.checkpoint_every=4"]
    assert run_inproc(d, flat_args + ["trainer.stop_at_step=6"])["status"] == "interrupted"
    from experiments.config import ConfigError       # the other layout is refused, with the override to give
    with pytest.raises(ConfigError, match=r"at method\.flat_(factors|gates) \(None -> False\); use the same "
                                          r"overrides \(method\.flat_\1=null\)"):
        run_inproc(d, base + PER_ADAPTER + ["trainer.checkpoint_every=4", f"trainer.resume={d}"])
    assert run_inproc(d, flat_args + [f"trainer.resume={d}"])["status"] == "completed"
    c = load_file(str(d / "adapters.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


@pytest.mark.parametrize("mode", [True, "all"])
def test_a_compiled_sequential_with_flat_gates_matches_eager_without_recompiling(no_recompiles, mode):
    """The gates are a parameter of the model, not a child module, so ``nn.Sequential`` (which
    calls every child) still runs; compiled, the forward equals eager and the separate gates'
    forward, and masking (an in-place write to the bank) does not recompile."""
    import torch.nn as nn

    def build(flat):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "2"], init_rank=4, flat_gates=bool(flat),
                                                               flat_factors=flat == "all"))
        adalora.mark_only_adapters_trainable(model, extra=("4",))
        with torch.no_grad():
            for a in adapters.values():
                a.lam.copy_(torch.linspace(-1, 1, a.rank))
        return model, adapters
    model, adapters = build(mode)
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
    # the app's default: flat wherever the method takes it; false keeps parameters per adapter
    acfg = C.MethodConfig().adapter_config(["q"], 3)
    assert (acfg.flat_gates, acfg.flat_factors) == (True, True)
    assert C.MethodConfig(name="lora").flat == (False, True)
    assert C.MethodConfig(name="svd_truncate").flat == (False, False)
    assert C.MethodConfig(name="eva").flat == (True, True)
    assert all(C.MethodConfig(name=n).flat == (False, False) for n in ("full", "head", "peft_adalora", "peft_lora"))
    assert C.MethodConfig(flat_gates=False, flat_factors=False).flat == (False, False)
    assert C.MethodConfig(flat_factors=False).flat == (True, False)
    for name in ("peft_lora", "full"):
        with pytest.raises(C.ConfigError, match=f"method={name} takes none: drop it"):
            C.MethodConfig(name=name, flat_factors=True)
    with pytest.raises(C.ConfigError, match="method=peft_adalora has none: drop it"):
        C.MethodConfig(name="peft_adalora", flat_gates=True)
    with pytest.raises(C.ConfigError, match="svd_truncate restarts each adapter's optimizer state"):
        C.MethodConfig(name="svd_truncate", flat_factors=True)
    assert C.MethodConfig(name="lora", flat_factors=True).adapter_config(["q"], 3).flat_factors is True
    with pytest.raises(ValueError, match="flat_factors=1: use true or false"):
        adalora.AdapterConfig(flat_factors=1)
    assert C.MethodConfig(name="adalora", flat_factors=True).adapter_config(["q"], 3).flat_factors is True
    model, _, _, _, _ = _setup("adalora", "all")
    with pytest.raises(ValueError, match="flat_factors=False"):
        adalora.add_adapter(model, "second")


@pytest.mark.parametrize("fuse", ["none", "epilogue"])
def test_flat_gates_dispatch_no_more_operations_than_separate_gates(fuse):
    """Forward and backward: the gates' gradients are joined once (one split or gather per
    forward), not sliced and accumulated per adapter, so flat gates dispatch no more non-view
    operations than a gate per adapter (counted, not timed)."""
    from experiments.opcount import count_ops
    counts = []
    for flat in (False, True, "all"):
        model, _, _, _, _ = _setup("adalora", flat, fuse)
        x = torch.randn(4, len(T.planted), T.d_in, dtype=DT)
        step = lambda: model(x).sum().backward()  # noqa: E731
        step()
        counts.append(count_ops(step)["ops"])
    # flat factors: fewer still, as each factor not joined for the fused products is a view from
    # one split per bank (a slice per adapter would give the bank one gradient per adapter to sum)
    assert counts[2] < counts[1] <= counts[0], counts


def test_each_factor_is_a_view_of_its_width_bank():
    """Flat factors: a ``P`` bank per ``d_out`` holding ``Pᵀ`` rows and a ``Q`` bank per ``d_in``;
    each adapter's ``P`` is a column-major view of its rows, writes land in the bank, and the
    model's state dict holds the banks instead of per-adapter factors."""
    model, adapters, _, _, _ = _setup("adalora", "all")
    layers, r = list(adapters.values()), T.init_rank
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(["adalora_gates", f"adalora_P_{T.d_out}", f"adalora_Q_{T.d_in}"])
    P_all, Q_all = getattr(model, f"adalora_P_{T.d_out}"), getattr(model, f"adalora_Q_{T.d_in}")
    assert P_all.shape == (r * len(layers), T.d_out) and Q_all.shape == (r * len(layers), T.d_in)
    params = adalora.adapter_parameters(adapters)
    assert len(params) == 3 and {id(p) for p in params} == {id(P_all), id(Q_all), id(model.adalora_gates)}
    a = layers[2]
    assert a.P.shape == (T.d_out, r) and a.P.stride() == (1, T.d_out)          # column-major, as stored alone
    assert a.P.data_ptr() == P_all[2 * r].data_ptr() and a.Q.data_ptr() == Q_all[2 * r].data_ptr()
    with torch.no_grad():
        a.P[5, 1] = 7.0
        a.Q[2, 3] = -7.0
    assert P_all[2 * r + 1, 5] == 7.0 and Q_all[2 * r + 2, 3] == -7.0
    sd = model.state_dict()
    assert not any(k.endswith((".P", ".Q", ".lam")) for k in sd)
    twin, twin_adapters, _, _, _ = _setup("adalora", "all")
    twin.load_state_dict(sd)
    assert all(torch.equal(x.P, y.P) and torch.equal(x.Q, y.Q) for x, y in zip(layers, twin_adapters.values()))


def test_factor_rank_changes_carry_the_optimizer_state_by_row():
    """A resize and an ``expand`` rebuild the ``P`` and ``Q`` banks; Adam's moments follow each
    row to hand-computed places, and new rows start at zero."""
    model, adapters, _, _, _ = _setup("adalora", "all")
    layers, r = list(adapters.values()), T.init_rank
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=0.1)
    model(torch.randn(4, len(layers), T.d_in, dtype=DT)).sum().backward()
    opt.step()
    P_bank, Q_bank = gate_bank.bank_of(layers[0], "P"), gate_bank.bank_of(layers[0], "Q")
    oldP, oldQ = opt.state[P_bank.param]["exp_avg"].clone(), opt.state[Q_bank.param]["exp_avg"].clone()
    keep = torch.tensor([0, 5])
    layers[1].resize(keep, opt)
    for bank, old in ((P_bank, oldP), (Q_bank, oldQ)):
        expect = torch.cat([old[:r], old[r + keep], old[2 * r:]])
        assert torch.equal(opt.state[bank.param]["exp_avg"], expect)
    layers[3].expand(1, opt)                       # rows of adapter 3 start at 2r + 2 after the resize
    at = 2 + 2 * r + r
    grownP = opt.state[P_bank.param]["exp_avg"]
    assert grownP.shape[0] == oldP.shape[0] - (r - 2) + 1 and grownP[at].eq(0).all()
    assert torch.equal(grownP[at - r:at], oldP[3 * r:4 * r])
    assert torch.equal(layers[3].P[:, :r], P_bank.param[at - r:at].t())
    assert sum(p is P_bank.param for p in opt.param_groups[0]["params"]) == 1
    assert layers[1].P.shape == (T.d_out, 2) and layers[3].Q.shape == (r + 1, T.d_in)


def _dense_penalty(layers, squared: bool):
    """The penalty from each adapter's dense Gram matrices, one at a time."""
    terms = []
    for a in layers:
        P, Q = a.P, a.Q
        for c in (P.T @ P - torch.eye(P.shape[1], dtype=P.dtype), Q @ Q.T - torch.eye(Q.shape[0], dtype=Q.dtype)):
            terms.append(c.pow(2).sum() if squared else torch.linalg.matrix_norm(c))
    total = sum(terms)
    return total if squared else total / (2 * len(layers))


@pytest.mark.parametrize("form", ["reference", "paper"])
@pytest.mark.parametrize("subset", [False, True])
@pytest.mark.parametrize("flat", ["all", "factors"])
def test_the_penalty_over_banks_matches_dense_gram_matrices(form, subset, flat):
    """The penalty and its hand-written gradient on banked factors, with equal ranks (a view of
    each bank), mixed ranks (padded) and a subset of the adapters (gathered rows, gradients added
    at those rows only), against dense Gram matrices per adapter and autograd; with the gates
    banked too or kept per adapter (the penalty reads no gate)."""
    model, adapters, _, _, _ = _setup("adalora", flat)
    layers = list(adapters.values())
    layers[1].resize(torch.tensor([0, 2, 3]))             # mixed ranks within each bank
    chosen = {k: a for i, (k, a) in enumerate(adapters.items()) if not subset or i % 2 == 0}
    squared = form == "paper"
    banks = [gate_bank.bank_of(layers[0], a) for a in ("P", "Q")]
    value = adalora.orthogonality_penalty(chosen, form)
    torch.testing.assert_close(value, _dense_penalty(list(chosen.values()), squared), rtol=1e-12, atol=0)
    value.backward()
    auto = [b.param.grad.clone() for b in banks]
    for b in banks:
        b.param.grad = None
    got = adalora.orthogonality_grad_(chosen, 1.0, form)
    torch.testing.assert_close(got, value.detach(), rtol=1e-12, atol=0)
    for b, g in zip(banks, auto):
        torch.testing.assert_close(b.param.grad, g, rtol=1e-10, atol=1e-14)
    if subset:                                                # rows of adapters left out get nothing
        Pb = banks[0]
        k = 1
        rows = Pb.param.grad[Pb.offsets[k]:Pb.offsets[k] + Pb.sizes[k]]
        assert rows.eq(0).all()


@pytest.mark.parametrize("subset", [False, True])
def test_importance_scores_from_banks_match_scores_per_adapter(subset):
    """One backward, then the scorer on banked factors and on separate ones: the same EMAs and
    triplet scores, including after a resize leaves ranks mixed. All adapters scored, the scorer
    reads each bank as stored; a subset, it gathers the subset's rows of each bank."""
    outs = []
    for flat in (False, True, "all"):       # True: the gates a bank, P and Q each adapter's own
        model, adapters, _, _, _ = _setup("adalora", flat)
        list(adapters.values())[2].resize(torch.tensor([1, 2, 4, 7]))
        layers = list(adapters.values())
        scorer = adalora.ImportanceScorer(layers[1:] if subset else layers, adalora.ScoreConfig())
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(4, len(T.planted), T.d_in, generator=g, dtype=DT)
            model(x).pow(2).sum().backward()
            # NaN in the memory the scorer's flat buffers are about to take: a row its gather
            # failed to write would read NaN, not values an earlier identical step left there
            poison = [torch.full((scorer._layout().numel,), math.nan, dtype=DT) for _ in range(2)]
            del poison
            assert scorer.update()
            model.zero_grad(set_to_none=True)
        outs.append((scorer.flat_scores(), scorer.state_dict()))
        fresh = adalora.ImportanceScorer(scorer.layers, adalora.ScoreConfig())
        fresh.load_state_dict(outs[-1][1])
        assert torch.equal(fresh.flat_scores(), outs[-1][0])
    for out in outs[1:]:
        torch.testing.assert_close(out[0], outs[0][0], rtol=1e-12, atol=0)
        for name in ("ibar", "ubar"):
            for a, b in zip(out[1][name], outs[0][1][name]):
                assert a.shape == b.shape and a.stride() == b.stride()
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


class _TwoWidths(torch.nn.Module):
    """Two maps of each of two shapes: two banks of each kind with flat factors."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.ModuleList(torch.nn.Linear(6, 5) for _ in range(2))
        self.b = torch.nn.ModuleList(torch.nn.Linear(4, 7) for _ in range(2))

    def forward(self, x6, x4):
        return sum(m(x6).pow(2).sum() for m in self.a) + sum(m(x4).pow(2).sum() for m in self.b)


def test_the_scorer_reads_whole_banks_with_as_many_ops_whatever_the_ranks():
    """With every adapter scored, a step's reads are one copy of all banks, of both widths: mixed
    ranks (a resize in the first width), which split separate parameters into more shape
    groups, add no operation."""
    from experiments.opcount import count_ops
    counts = {}
    for flat in (False, "all"):
        torch.manual_seed(0)
        model = _TwoWidths().to(DT)
        adapters = adalora.inject(model, adalora.AdapterConfig(
            targets=["a.0", "a.1", "b.0", "b.1"], init_rank=4, alpha=8.0, flat_gates=bool(flat),
            flat_factors=flat == "all"))
        x6, x4 = torch.randn(3, 6, dtype=DT), torch.randn(3, 4, dtype=DT)
        for resized in (False, True):
            if resized:
                adapters["a.0"].resize(torch.tensor([0, 2]))
            scorer = adalora.ImportanceScorer(list(adapters.values()), adalora.ScoreConfig())
            model.zero_grad(set_to_none=True)
            model(x6, x4).backward()
            scorer.update(grads_finite=True)
            counts[flat, resized] = count_ops(lambda: scorer.update(grads_finite=True))["ops"]
    assert counts["all", True] == counts["all", False]
    assert counts[False, True] > counts[False, False]          # the reference: one more group to gather


def test_the_scorer_names_the_bank_without_a_gradient_and_the_fix():
    model, adapters, _, _, _ = _setup("adalora", "all")
    scorer = adalora.ImportanceScorer(list(adapters.values()), adalora.ScoreConfig())
    with pytest.raises(RuntimeError, match=r"^no gradient for the flat parameter adalora_\w+: call update_importance "
                                           r"after loss\.backward\(\) and before optimizer\.zero_grad\(\)$"):
        scorer.update()


@pytest.mark.parametrize("fuse,fused_adam", [("none", False), ("epilogue", True)])
def test_lora_with_flat_factors_trains_as_factors_per_adapter(fuse, fused_adam):
    """LoRA's ``A`` and ``B`` in banks (``adalora_A_<d_in>``, ``adalora_B_<d_out>`` holding
    ``Bᵀ``): the same losses, factors and Adam moments as a parameter per adapter."""
    out = []
    for flat in (False, True):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        n = len(T.planted)
        model = Maps(n, T.d_out, T.d_in).to(DT)
        teacher = [m.weight.detach().clone() + planted_update(T.d_out, T.d_in, r, g).to(DT)
                   for m, r in zip(model.maps, T.planted)]
        adapters = adalora.inject(model, adalora.AdapterConfig(
            method="lora", targets=[f"maps.{i}" for i in range(n)], init_rank=4, alpha=8.0, fuse=fuse,
            flat_factors=flat))
        adalora.mark_only_adapters_trainable(model)
        params = adalora.adapter_parameters(adapters)
        assert len(params) == (2 if flat else 2 * n)
        opt = torch.optim.AdamW(params, lr=0.02, weight_decay=0.01, fused=fused_adam)
        losses = []
        for _ in range(25):
            x = torch.randn(16, n, T.d_in, generator=g, dtype=DT)
            y = torch.stack([x[:, i] @ w.T for i, w in enumerate(teacher)], dim=1)
            loss = ((model(x) - y) ** 2).sum(-1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        layers = list(adapters.values())
        assert layers[1].B.stride() == (1, T.d_out)                # column-major, banked or not
        factors = [torch.cat([a.A.detach().flatten(), a.B.detach().flatten()]) for a in layers]
        moments = [torch.cat([_moment(opt, a, "A"), _moment(opt, a, "B")]) for a in layers]
        out.append((losses, factors, moments))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=0)
    assert out[0][0][-1] < 0.5 * out[0][0][0]                      # it learned
    for a, b in zip(out[1][1] + out[1][2], out[0][1] + out[0][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_svd_truncate_refuses_flat_factors_with_the_fix():
    model = Maps(3, T.d_out, T.d_in).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(method="lora", targets=["maps.0", "maps.1"], init_rank=4,
                                                           flat_factors=True))
    with pytest.raises(ValueError, match=r"AdapterConfig\(flat_factors=False\)"):
        adalora.TruncateAllocator(adapters, adalora.ScheduleConfig(target_rank=2, total_steps=10, init_warmup=2, final_warmup=3))


@pytest.mark.parametrize("flat", [False, "all"])
def test_the_captured_penalty_marks_every_gradient_batch_for_the_main_stream(monkeypatch, flat):
    """A captured step forms γ∇R on a side stream (``step_graph.orthogonality_beside``) and must
    mark each gradient batch as read on the main stream before adding it. The fork needs CUDA, so
    here it is stood in for by a ``beside`` that records what it is told to mark: every batch
    ``orthogonality_grads`` formed, per width or per bank, and the gradients it adds are those of
    ``orthogonality_grad_``."""
    import contextlib

    from experiments import step_graph
    marked = []

    @contextlib.contextmanager
    def beside(stream):
        yield lambda made: marked.extend(made)
    monkeypatch.setattr(step_graph, "beside", beside)
    model, adapters, _, _, _ = _setup("adalora", flat)
    twin = copy.deepcopy(model)
    twin_adapters = adalora.find_adapters(twin)
    add = step_graph.orthogonality_beside(None, adapters, 0.3)
    _, pending = adalora.orthogonality_grads(adapters, 0.3)
    value = add()
    assert len(marked) == len(pending) > 0
    assert all(torch.is_tensor(t) and t.dim() == 3 for t in marked)
    torch.testing.assert_close(value, adalora.orthogonality_grad_(twin_adapters, 0.3), rtol=0, atol=0)
    for p, q in zip(adalora.adapter_parameters(adapters), adalora.adapter_parameters(twin_adapters)):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_lora_adapter_files_load_into_banked_lora_at_other_ranks(tmp_path):
    """Saved LoRA adapters (one at a lower rank, as a rank pattern gives) load into a model with
    flat factors: its banks are rebuilt at the saved ranks and the outputs equal the source's."""
    torch.manual_seed(0)
    src = Maps(3, T.d_out, T.d_in).to(DT)
    adapters = adalora.inject(src, adalora.AdapterConfig(method="lora", targets=["maps.0", "maps.1", "maps.2"],
                                                         init_rank=4, rank_pattern={"maps.1": 2}))
    with torch.no_grad():
        for a in adapters.values():
            a.B.normal_()
    adalora.save_adapters(tmp_path / "a", src)
    torch.manual_seed(0)
    dst = Maps(3, T.d_out, T.d_in).to(DT)
    got = adalora.inject(dst, adalora.AdapterConfig(method="lora", targets=["maps.0", "maps.1", "maps.2"], init_rank=4,
                                                    flat_factors=True))
    adalora.load_adapters(tmp_path / "a", dst)
    assert [a.rank for a in got.values()] == [4, 2, 4]
    assert getattr(dst, f"adalora_A_{T.d_in}").shape == (10, T.d_in)
    x = torch.randn(5, 3, T.d_in, dtype=DT)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


@pytest.mark.parametrize("family,fuse", [("adalora", "epilogue"), ("lora", "epilogue"), ("adalora", "stack")])
def test_banked_adapters_the_hooks_leave_unprepared_read_their_own_views(family, fuse):
    """With the factor hooks removed, each banked adapter on a fused path takes its gate and
    factors as views of its bank rows: the outputs and gradients of parameters per adapter."""
    from adalora import factor_batch
    out = []
    for flat in (False, "all"):
        torch.manual_seed(0)
        model = Maps(len(T.planted), T.d_out, T.d_in).to(DT)
        adapters = adalora.inject(model, adalora.AdapterConfig(
            method=family, targets=[f"maps.{i}" for i in range(len(T.planted))], init_rank=T.init_rank,
            alpha=8.0, fuse=fuse, flat_gates=bool(flat) and family == "adalora", flat_factors=bool(flat)))
        adalora.mark_only_adapters_trainable(model)          # a frozen W0: the fused path applies
        factor_batch.remove(model)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for a in adapters.values():
                for attr in (("P", "lam", "Q") if family == "adalora" else ("A", "B")):
                    t = getattr(a, attr)
                    t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
        x = torch.randn(4, len(T.planted), T.d_in, generator=torch.Generator().manual_seed(4), dtype=DT)
        y = model(x)
        y.pow(2).sum().backward()
        grads = {}
        for k, a in enumerate(adapters.values()):
            for attr in (("P", "lam", "Q") if family == "adalora" else ("A", "B")):
                bank = gate_bank.bank_of(a, attr)
                if bank is None:
                    grads[k, attr] = getattr(a, attr).grad
                else:
                    o, r = bank.offsets[bank.layers.index(a)], bank.sizes[bank.layers.index(a)]
                    rows = bank.param.grad[o:o + r]
                    grads[k, attr] = rows.t() if attr in gate_bank.UPS else rows
        out.append((y.detach(), grads))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-12, atol=1e-12)
    for key, want in out[0][1].items():
        torch.testing.assert_close(out[1][1][key], want, rtol=1e-10, atol=1e-12)


def _masked_run(flat, order, n_maps=len(T.planted), steps=30):
    """AdaLoRA with the allocator's adapters in ``order`` (indices into the injected maps): the
    losses, the masks and the gates after ``steps`` masked steps."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Maps(n_maps, T.d_out, T.d_in).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(
        targets=[f"maps.{i}" for i in range(n_maps)], init_rank=4, alpha=8.0, flat_gates=flat))
    adalora.mark_only_adapters_trainable(model)
    items = list(adapters.items())
    sched = adalora.ScheduleConfig(target_rank=2, total_steps=steps + 20, init_warmup=2, final_warmup=10,
                                   mask_interval=1)
    alloc = adalora.RankAllocator(dict(items[k] for k in order), sched)
    opt = torch.optim.AdamW(adalora.adapter_parameters(adapters), lr=0.05)
    losses = []
    for step in range(steps):
        x = torch.randn(8, n_maps, T.d_in, generator=g, dtype=DT)
        loss = model(x).sin().pow(2).sum()
        loss.backward()
        opt.step()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, [a.rank_mask.clone() for a in adapters.values()], [a.lam.detach().clone() for a in adapters.values()]


@pytest.mark.parametrize("order", ["reversed", "single"])
def test_masks_reach_the_right_gates_whatever_the_allocator_order_and_with_one_adapter(order):
    """Flat gates with an allocator that lists the adapters in another order than the bank (the
    mask step must then multiply each adapter's view, not the bank in its order), and with one
    adapter alone: the same losses, masks and gates as a gate per adapter."""
    n = 1 if order == "single" else len(T.planted)
    perm = list(range(n))[::-1]
    ref, got = _masked_run(False, perm, n), _masked_run(True, perm, n)
    assert got[0] == ref[0]
    for a, b in zip(got[1], ref[1]):
        assert torch.equal(a, b)
    assert any(not m.all() for m in ref[1])                   # something was masked
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def _two_width_adapters(n: int, flat: bool, seed: int = 0):
    """``n`` SVD adapters on 10 -> 6 maps (``P`` banked 6 wide, ``Q`` 10: a batch per width), random factors."""
    torch.manual_seed(seed)
    model = Maps(n, 6, 10).to(DT)
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=[f"maps.{i}" for i in range(n)], init_rank=4,
                                                           flat_gates=flat, flat_factors=flat))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for a in adapters.values():
            for attr in ("P", "Q"):
                t = getattr(a, attr)
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype))
    return model, adapters


def _bank_grads(adapters: dict) -> dict:
    """Each adapter's ``P`` and ``Q`` gradient, read from its bank rows or its own parameter."""
    out = {}
    for k, a in enumerate(adapters.values()):
        for attr in ("P", "Q"):
            bank = gate_bank.bank_of(a, attr)
            if bank is None:
                out[k, attr] = getattr(a, attr).grad
                continue
            i = bank.layers.index(a)
            rows = bank.param.grad[bank.offsets[i]:bank.offsets[i] + bank.sizes[i]]
            out[k, attr] = rows.t() if attr in gate_bank.UPS else rows
    return out


@pytest.mark.parametrize("form", ["reference", "paper"])
@pytest.mark.parametrize("case", ["equal", "mixed", "all_rank_0", "half_own"])
def test_the_penalty_over_banks_of_two_widths_matches_dense_gram_matrices(case, form):
    """``P`` and ``Q`` banks of different widths are batches of their own: with equal ranks (a view
    of each bank), mixed ranks (each bank padded), every adapter pruned to rank 0 (nothing to
    penalise), and half the adapters banked, half with parameters of their own (two models): the
    value and the gradients of ``orthogonality_grad_`` against dense Gram matrices per adapter and
    autograd of that dense value."""
    _, adapters = _two_width_adapters(4, True)
    layers = list(adapters.values())
    if case == "mixed":
        layers[1].resize(torch.tensor([0, 2]))
        layers[3].resize(torch.tensor([1, 2, 3]))
    if case == "all_rank_0":
        for a in layers:
            a.resize(torch.tensor([], dtype=torch.long))
    if case == "half_own":
        _, own = _two_width_adapters(3, False, seed=5)
        adapters = {**adapters, **{f"own.{k}": a for k, a in own.items()}}
        layers = list(adapters.values())
    want = _dense_penalty(layers, form == "paper")
    if case == "all_rank_0":
        assert float(adalora.orthogonality_grad_(adapters, 1.0, form)) == float(want.detach()) == 0.0
        assert float(adalora.orthogonality_penalty(adapters, form)) == 0.0
        return
    want.backward()                                          # into the banks and the own parameters
    dense = {k: g.clone() for k, g in _bank_grads(adapters).items()}
    for p in adalora.adapter_parameters(adapters):
        p.grad = None
    got = adalora.orthogonality_grad_(adapters, 1.0, form)
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(adalora.orthogonality_penalty(adapters, form), want, rtol=1e-12, atol=0)
    for key, g in _bank_grads(adapters).items():
        torch.testing.assert_close(g, dense[key], rtol=1e-10, atol=1e-14)


def test_a_frozen_bank_gets_no_penalty_gradient_and_the_other_bank_of_its_width_gets_its_own():
    """Square maps join a width's ``P`` and ``Q`` banks in one batch; with the ``P`` bank frozen
    its gradient stays unset and the ``Q`` bank still gets the dense gradient."""
    model, adapters, _, _, _ = _setup("adalora", "all")
    layers = list(adapters.values())
    p_bank, q_bank = (gate_bank.bank_of(layers[0], a) for a in ("P", "Q"))
    p_bank.param.requires_grad_(False)
    _dense_penalty(layers, False).backward()
    dense = q_bank.param.grad.clone()
    q_bank.param.grad = None
    adalora.orthogonality_grad_(adapters, 1.0)
    assert p_bank.param.grad is None
    torch.testing.assert_close(q_bank.param.grad, dense, rtol=1e-10, atol=1e-14)


def test_the_penalty_over_whole_banks_runs_no_operation_per_adapter():
    """Every adapter of its banks, equal ranks: the batches are the banks' rows as stored, so the
    penalty's operations (views included) do not grow with the number of adapters, where reading
    each adapter's ``P`` and ``Q`` as views would."""
    from experiments.opcount import count_ops
    counts = []
    for n in (2, 5):
        _, adapters = _two_width_adapters(n, True)
        adalora.orthogonality_grad_(adapters, 1.0)               # the plan, built once
        counts.append(count_ops(lambda: adalora.orthogonality_penalty(adapters), views=True)["ops"])
    assert counts[0] == counts[1]


def test_lora_adapters_injected_with_flat_gates_get_no_gate_bank():
    """``flat_gates`` is for SVD adapters: LoRA adapters injected with it are the model they are
    without it (no empty gate parameter), and with flat factors only their ``A`` and ``B`` banks."""
    keys = []
    for gates, factors in ((False, False), (True, False), (False, True), (True, True)):
        model = Maps(3, 6, 10).to(DT)
        adalora.inject(model, adalora.AdapterConfig(method="lora", targets=[f"maps.{i}" for i in range(3)],
                                                    init_rank=2, flat_gates=gates, flat_factors=factors))
        keys.append(sorted(model.state_dict()))
    assert keys[0] == keys[1] and keys[2] == keys[3]
    assert set(keys[2]) - set(keys[0]) == {"adalora_A_10", "adalora_B_6"}
