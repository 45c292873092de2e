"""Adapters called on the same tensor share its down-projection (adalora/shared_input.py): the
groups are those a forward shows, outputs and gradients are the unfused path's in float64 (also
when the plan has gone stale), and each group of L adapters runs 3(L - 1) fewer GEMMs, counted
by hand. CPU only, no timing."""
import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adalora
from adalora import factor_batch, fused, shared_input
from experiments.opcount import count_ops

NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class Block(nn.Module):
    """An attention-like block and a gated MLP: q, k and v read x; o reads their mix; gate and
    up read o's residual sum; down reads their product. ``skip_v`` and ``other_v`` change the
    path of one forward (v not called, or called on another tensor); ``bump`` writes x in place
    between the calls."""

    def __init__(self, d=16):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(d, d), nn.Linear(d, 8), nn.Linear(d, 8), nn.Linear(d, d)
        self.gate, self.up, self.down = nn.Linear(d, 24), nn.Linear(d, 24), nn.Linear(24, d)
        self.skip_v = self.other_v = self.bump = False

    def forward(self, x):
        q = self.q(x)
        if self.bump:
            x.add_(0.25)
        k = self.k(x)
        v = torch.zeros_like(k) if self.skip_v else self.v(x + 1 if self.other_v else x)
        h = x + self.o(q * torch.cat([k, v], -1).tanh())
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


class Net(nn.Module):
    def __init__(self, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _model(fuse="epilogue", method="adalora", dtype=torch.float64, blocks=2, std=0.2):
    torch.manual_seed(0)
    m = Net(blocks).to(dtype)
    # alpha 6 at rank 4: a scale of 1.5 for both methods, so a lost scale shows
    ad = adalora.inject(m, adalora.AdapterConfig(method=method, targets=list(NAMES), init_rank=4, alpha=6.0, fuse=fuse))
    adalora.mark_only_adapters_trainable(m)
    with torch.no_grad():                  # lam = 0 and B = 0 at init would zero most gradients
        for p in adalora.adapter_parameters(ad):
            p.normal_(0, std)
    return m, ad


def _step(m, ad, x):
    y = m(x)
    y.pow(2).sum().backward()
    # an adapter left out of a forward has no gradient, or a zero one from its group's leader
    return y.detach(), {f"{n}.{k}": torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for n, a in ad.items() for k, p in a.named_parameters() if p.requires_grad}


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **tol, msg=k)


def _handed(m) -> list:
    """Filled on each forward with the adapters whose output came from rows a leader handed
    them (``FollowLinear`` under the output's view)."""
    seen = []

    def hook(mod, args, out, name):
        fn = out.grad_fn
        while fn is not None and type(fn).__name__.startswith("View"):
            fn = fn.next_functions[0][0]
        if type(fn).__name__ == "FollowLinearBackward":
            seen.append(name)
    for name, layer in adalora.find_adapters(m).items():
        layer.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, out, name))
    return seen


def test_a_forward_shows_the_groups_called_on_one_tensor():
    m, ad = _model()
    assert shared_input.plan(m) == ()                       # nothing seen yet
    m(torch.randn(5, 16, dtype=torch.float64))
    expected = tuple(tuple(ad[f"blocks.{b}.{n}"] for n in names) for b in (0, 1) for names in (("q", "k", "v"), ("gate", "up")))
    assert shared_input.plan(m) == expected


@pytest.mark.parametrize("path", ["epilogue", "merge"])
@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_outputs_and_gradients_equal_the_unfused_path(method, path):
    """Two steps accumulated, the second grouped; for AdaLoRA one follower pruned to rank 2 of 4
    and one leader to 3, so the ranks within a group differ."""
    x = torch.randn(7, 16, dtype=torch.float64)
    runs = []
    for fuse in ("none", path):
        m, ad = _model(fuse, method)
        if method == "adalora":
            ad["blocks.0.k"].resize(torch.tensor([0, 3]))
            ad["blocks.1.gate"].resize(torch.tensor([0, 1, 3]))
        handed = _handed(m)
        first = _step(m, ad, x)
        assert handed == []
        runs.append(_step(m, ad, x))
        if fuse == path:
            assert sorted(handed) == sorted(f"blocks.{b}.{n}" for b in (0, 1) for n in ("k", "v", "up"))
    _assert_same(*runs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(runs[1][0], first[0], rtol=0, atol=0)


def _gemms(m, x) -> int:
    def step():
        m(x).pow(2).sum().backward()
    return count_ops(step, only=("aten.mm", "aten.addmm", "aten.addmm_", "aten.bmm"))["ops"]


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_each_group_of_l_adapters_runs_3_l_minus_1_fewer_gemms(method):
    """Alone, an adapter on the epilogue path runs 8 GEMMs a step: the frozen product, hᵀ and
    the in-place h Uᵀ forward; (G U)ᵀ, G W, the in-place share of dx, dD and dU backward. In a
    group the leader runs the same 8 and each follower 5: it needs no hᵀ, no share of dx and
    no dD. Two blocks, each with a group of 3 and one of 2: 2 · (2 + 1) · 3 = 18 fewer. (x needs
    a gradient, so that the first adapters compute dx too.)"""
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    m, _ = _model(method=method)
    alone = _gemms(m, x)                                   # the first forward: no plan yet
    grouped = _gemms(m, x)
    assert alone == 8 * len(NAMES) * 2
    assert alone - grouped == 18


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_merged_each_group_of_l_adapters_runs_2_l_minus_1_fewer_gemms(method):
    """Alone, an adapter on the merge path runs 7 GEMMs a step: W' = W + s U D, hᵀ and the
    product with W' forward; (G U)ᵀ, G W', dD and dU backward (no share of y or dx to add). In a
    group each follower runs 5: it needs no hᵀ and no dD. 2 · (2 + 1) · 2 = 12 fewer."""
    x = torch.randn(6, 16, dtype=torch.float64, requires_grad=True)
    m, _ = _model("merge", method)
    alone = _gemms(m, x)
    grouped = _gemms(m, x)
    assert alone == 7 * len(NAMES) * 2
    assert alone - grouped == 12


@pytest.mark.parametrize("trains,expected", [("all", 90), ("up", 79), ("down", 76)])
def test_gradients_are_formed_only_where_needed(trains, expected):
    """GEMMs of the grouped step when the input x needs no gradient, counted by hand. Forward, a
    leader or a single adapter runs 3 (frozen product, hᵀ, in-place h Uᵀ), a follower 2: 18 a
    block. Backward, per adapter, where its x needs a gradient (all but the first block's q, k
    and v): the single adapters (G U)ᵀ, G W and the in-place share; leaders the same (their T);
    followers G W alone. Where the down factors train: dD for a single adapter or a leader, and
    a follower's d hᵀ (which a leader or a single adapter computes anyway, as (G U)ᵀ). Where the
    up factors train: dU for each.
    - all train: 36 forward; backward block 0 (q: 3; k, v: 2; o, gate, down: 5; up: 3) 25,
      block 1 (q: 5; k, v: 3; o, gate, down: 5; up: 3) 29: 90;
    - only the up factors: 36 + block 0 (q, k, v: dU alone, their rows needing no gradient; o,
      gate, down: 4; up: 3) 18 + block 1 (q: 4; k, v: 3; o, gate, down: 4; up: 3) 25 = 79;
    - only the down factors: 36 + block 0 (q: 2; k, v: 1; o, gate, down: 4; up: 2) 18 + block 1
      (q: 4; k, v: 2; o, gate, down: 4; up: 2) 22 = 76."""
    x = torch.randn(6, 16, dtype=torch.float64)
    m, ad = _model(method="lora")
    m(x)                                                    # the plan
    for a in ad.values():
        a.A.requires_grad_(trains in ("all", "down"))
        a.B.requires_grad_(trains in ("all", "up"))
    assert _gemms(m, x) == expected


def test_a_stale_plan_changes_no_result():
    """The plan from one forward meets another path: v called on another tensor (its rows are
    not taken), v not called at all (the leader's rows for it get a zero gradient), or x written in
    place between q and k under no_grad (k and v must not use rows of the old x)."""
    x = torch.randn(7, 16, dtype=torch.float64)
    for change in ("other_v", "skip_v"):
        runs = []
        for fuse in ("none", "epilogue"):
            m, ad = _model(fuse)
            m(x)                                           # the plan: v in the group
            setattr(m.blocks[0], change, True)
            handed = _handed(m)
            runs.append(_step(m, ad, x))
            if fuse == "epilogue":
                assert "blocks.0.v" not in handed and "blocks.0.k" in handed and "blocks.1.v" in handed
        _assert_same(*runs, rtol=1e-12, atol=1e-12)
    outs = []
    for fuse in ("none", "epilogue"):
        m, _ = _model(fuse)
        m(x)
        m.blocks[0].bump = True
        with torch.no_grad():
            outs.append(m(x.clone()))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_under_inference_mode_nothing_is_handed_and_the_output_is_the_unfused_one():
    """Inference tensors keep no version counter, so a write between the calls could not be
    seen: no rows are handed, also when x is written in place between q and k."""
    x = torch.randn(7, 16, dtype=torch.float64)
    outs = []
    for fuse in ("none", "epilogue"):
        m, _ = _model(fuse)
        m(x)
        m.blocks[0].bump = True
        seen = []
        for a in adalora.find_adapters(m).values():
            a.register_forward_pre_hook(lambda mod, args: seen.append(shared_input.HANDED in mod.__dict__))
        with torch.inference_mode():
            outs.append(m(x.clone()))
        assert not any(seen)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


def test_nothing_is_left_on_the_adapters_after_a_forward():
    """A leader hands rows to v, which is not called: after the forward no adapter keeps handed
    rows, prepared factors or the call log (a later call of v alone, on the same tensor after an
    optimizer step, would otherwise take rows of the old parameters)."""
    m, ad = _model()
    x = torch.randn(4, 16, dtype=torch.float64)
    m(x)
    m.blocks[0].skip_v = True
    m(x)
    keys = (shared_input.HANDED, shared_input.CALLS, factor_batch.SLOT)
    assert not [(n, k) for n, a in ad.items() for k in keys if k in a.__dict__]


def test_a_group_is_prepared_once_in_its_width():
    """The down factors of a width are joined once, each group's rows adjacent: the view every
    adapter of width 16 gets has as many rows as their ranks sum to, and a leader's view is its
    group's rows, in call order."""
    m, ad = _model()
    m(torch.randn(3, 16, dtype=torch.float64))             # the plan
    seen = {}
    for name, a in ad.items():
        a.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: mod.__dict__[factor_batch.SLOT]}))
    m(torch.randn(3, 16, dtype=torch.float64))
    width16 = [n for n, a in ad.items() if a.in_features == 16]
    assert len(width16) == 12 and all(seen[n][0]._base.shape == (48, 16) for n in width16)
    lead = seen["blocks.1.q"][2]
    assert lead.down.shape == (12, 16) and lead.followers == [ad["blocks.1.k"], ad["blocks.1.v"]]
    torch.testing.assert_close(lead.down, torch.cat([ad[f"blocks.1.{n}"]._down_weight() for n in "qkv"]), rtol=0, atol=0)


def test_a_model_that_calls_an_adapter_twice_shares_nothing():
    m, _ = _model(blocks=1)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = m

        def forward(self, x):
            return self.net(self.net(x))

    twice = Twice()
    factor_batch.attach(twice)
    factor_batch.remove(m)
    twice(torch.randn(3, 16, dtype=torch.float64))
    assert shared_input.plan(twice) == ()


def test_under_autocast_the_group_is_as_accurate_as_the_unfused_path():
    """fp32 adapters under bf16 autocast against the same weights in float64 without autocast:
    the grouped step's output and gradients are as close to it as the unfused path's (bf16
    rounding; relative errors summed over the output and every gradient), and stay fp32."""
    torch.manual_seed(1)
    x = torch.randn(64, 16)

    def run(fuse, steps, autocast=True):
        m, _ = _model(fuse, dtype=torch.float32)
        if not autocast:
            m.double()
        handed = _handed(m)
        for _ in range(steps):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = m(x if autocast else x.double())
            y.float().pow(2).sum().backward()
        return handed, [y.detach(), *(p.grad for p in m.parameters() if p.requires_grad)]

    _, exact = run("none", 1, autocast=False)

    def error(fuse, steps):
        handed, got = run(fuse, steps)
        assert all(g.dtype == torch.float32 for g in got[1:])
        return handed, sum(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, exact))

    _, unfused = error("none", 1)
    for path in ("epilogue", "merge"):
        handed, grouped = error(path, 2)
        assert len(handed) == 6
        assert grouped < 1.25 * unfused, (path, grouped, unfused)


def test_checkpointing_and_the_other_paths_share_nothing():
    """A model flagged for gradient checkpointing (its recomputed forward runs after the hooks)
    and the paths other than the epilogue and merge keep no plan (the Triton path's kernel
    computes each adapter's own hᵀ)."""
    x = torch.randn(4, 16, dtype=torch.float64)
    m, ad = _model()
    m.blocks.gradient_checkpointing = True
    _step(m, ad, x)
    assert shared_input.plan(m) == ()
    for fuse in ("none", "stack"):
        m, ad = _model(fuse)
        _step(m, ad, x)
        assert shared_input.plan(m) == ()
    if importlib.util.find_spec("triton") is not None:     # the Triton path in its CPU interpreter (fp32)
        m, ad = _model("triton", dtype=torch.float32)
        _step(m, ad, x.float())
        assert shared_input.plan(m) == () and fused.path(ad["blocks.0.q"], x.float()) == "triton"


def test_the_group_is_what_the_adapters_alone_give_after_a_step():
    """A grouped forward after an optimizer step equals each adapter's own forward then."""
    x = torch.randn(5, 16, dtype=torch.float64)
    m, ad = _model(std=0.1)
    opt = torch.optim.SGD(adalora.adapter_parameters(ad), lr=1e-3)
    for _ in range(2):
        m(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    alone = copy.deepcopy(m)
    factor_batch.remove(alone)
    with torch.no_grad():
        torch.testing.assert_close(m(x), alone(x), rtol=1e-12, atol=1e-12)
