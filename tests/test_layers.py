"""Layer outputs and merged weights against dense references."""
import math

import pytest
import torch
import torch.nn as nn

import adalora
from adalora.layers import LoRALinear, SVDLinear



class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, re-declared so the test runs without transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(nf, dtype=torch.float64))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def _dense_w0(base):
    return base.weight.T if isinstance(base, Conv1D) else base.weight


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(7, 5).double(), lambda: Conv1D(5, 7)])
def test_svd_forward_equals_dense(make_base):
    torch.manual_seed(0)
    layer = SVDLinear(make_base(), rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    w = _dense_w0(layer.base) + (6.0 / 3) * layer.P @ torch.diag(layer.lam) @ layer.Q
    ref = x @ w.T + layer.base.bias
    assert torch.allclose(layer(x), ref, atol=1e-12)
    assert torch.allclose(layer.delta_weight(), 2.0 * layer.P @ torch.diag(layer.lam) @ layer.Q, atol=1e-12)


def test_svd_init_matches_design():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(300, 200).double(), rank=12, alpha=16.0)
    assert layer.P.shape == (200, 12) and layer.lam.shape == (12,) and layer.Q.shape == (12, 300)
    assert torch.all(layer.lam == 0) and layer.rank_mask.all()
    assert abs(layer.P.std().item() - 0.02) < 2e-3 and abs(layer.Q.std().item() - 0.02) < 2e-3
    assert layer.scaling == 16.0 / 12
    x = torch.randn(3, 300, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))      # ΔW = 0 at init


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_equals_dense(rslora):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4).double(), rank=4, alpha=8.0, rslora=rslora)
    assert torch.all(layer.B == 0)
    with torch.no_grad():
        layer.B.normal_()
    s = 8.0 / math.sqrt(4) if rslora else 8.0 / 4
    assert layer.scaling == s
    x = torch.randn(5, 6, dtype=torch.float64)
    ref = x @ (layer.base.weight + s * layer.B @ layer.A).T + layer.base.bias
    assert torch.allclose(layer(x), ref, atol=1e-12)


@pytest.mark.parametrize("cls", ["svd", "lora"])
@pytest.mark.parametrize("make_base", [lambda: nn.Linear(7, 5).double(), lambda: Conv1D(5, 7)])
def test_merge_unmerge_round_trip(cls, make_base):
    torch.manual_seed(1)
    base = make_base()
    w_before = base.weight.detach().clone()
    layer = SVDLinear(base, 3, 4.0) if cls == "svd" else LoRALinear(base, 3, 4.0)
    with torch.no_grad():
        for p in layer.parameters():
            if p is not base.weight and p is not base.bias:
                p.normal_()
    x = torch.randn(4, 7, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    assert layer.merged and torch.allclose(layer(x), y, atol=1e-12)
    assert torch.allclose(layer(x), base(x), atol=1e-12)          # merged: the base alone computes it
    layer.unmerge()
    assert torch.allclose(base.weight, w_before, atol=1e-12)
    assert torch.allclose(layer(x), y, atol=1e-12)


def test_rank_zero_adapters_contribute_nothing():
    for layer in (SVDLinear(nn.Linear(4, 3), 0, 8.0), LoRALinear(nn.Linear(4, 3), 0, 8.0)):
        x = torch.randn(2, 4)
        assert torch.equal(layer(x), layer.base(x))
        assert layer.delta_weight().shape == (3, 4) and torch.all(layer.delta_weight() == 0)


def test_state_dict_keeps_base_names_and_loads_plain_checkpoint():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    adapted = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    adalora.inject(adapted, adalora.AdapterConfig(targets=["0"], init_rank=2))
    keys = set(adapted.state_dict())
    assert {"0.weight", "0.bias", "0.P", "0.lam", "0.Q", "0.rank_mask"} <= keys
    assert not any(".base." in k for k in keys)
    missing, unexpected = adapted.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"0.P", "0.lam", "0.Q", "0.rank_mask"}
    assert torch.equal(adapted[0].base.weight, plain[0].weight)
    adapted.load_state_dict(adapted.state_dict())                # round trip through its own keys


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8).double(), 4, 4.0, dropout=0.5)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(16, 8, dtype=torch.float64)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    assert torch.allclose(layer(x), x @ (layer.base.weight + layer.delta_weight()).T + layer.base.bias)


def test_adapter_follows_base_device_and_dtype():
    base = nn.Linear(4, 3).to(torch.float32)
    for layer in (SVDLinear(base, 2, 2.0), LoRALinear(nn.Linear(4, 3).to(torch.bfloat16), 2, 2.0)):
        dt = layer.base.weight.dtype
        assert all(p.dtype == dt for p in layer.parameters())
        assert layer(torch.randn(2, 4, dtype=dt)).dtype == dt


@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_adapter_dtype_unlike_the_base_output_adds_in_the_base_dtype(cls):
    """Adapters in another dtype than the base's output (fp32 adapters on an NF4 base computing in
    bf16) skip the fused addmm and add a cast product: the same value as the dense formula."""
    torch.manual_seed(0)
    layer = cls(nn.Linear(7, 5), rank=3, alpha=6.0)
    with torch.no_grad():
        for name, p in list(layer.named_parameters(recurse=False)):
            setattr(layer, name, nn.Parameter(torch.randn_like(p, dtype=torch.float64)))
    assert layer._adapter_dtype() == torch.float64
    x = torch.randn(4, 2, 7)
    ref = x.double() @ (layer.base.weight.double() + layer.delta_weight()).T + layer.base.bias.double()
    out = layer(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, rtol=0, atol=1e-5)


def test_up_factors_are_column_major_from_init_resize_and_load(tmp_path):
    """P and B are stored column-major, so the forward's hᵀ form multiplies by a row-major upᵀ
    (every leading dimension N, d_in or d_out, never the rank); autograd then gives their
    gradients the same layout. Init, resize (compact) and load_adapters all keep it, and the
    values are those of the row-major factors (seeded init unchanged)."""
    def up(a):
        return a.P if isinstance(a, SVDLinear) else a.B

    def build(method):
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(7, 5).double())
        return m, adalora.inject(m, adalora.AdapterConfig(method=method, init_rank=3, targets=("0",)))["0"]

    base = nn.Linear(7, 5).double()
    torch.manual_seed(0)
    row_major_p = torch.randn(5, 3, dtype=torch.float64) * 0.02     # SVDLinear's P draw, as before
    torch.manual_seed(0)
    svd = SVDLinear(base, 3, 1.0)
    assert torch.equal(svd.P, row_major_p)
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    for method in ("adalora", "lora"):
        model, a = build(method)
        with torch.no_grad():
            up(a).normal_()
            (a.lam if method == "adalora" else a.A).normal_()
        assert up(a).t().is_contiguous() and not up(a).is_contiguous()
        a(x).pow(2).sum().backward()
        assert up(a).grad.stride() == up(a).stride()
        if method == "adalora":
            a.resize(torch.tensor([0, 2]))
            assert a.P.t().is_contiguous() and a.P.shape == (5, 2)
        adalora.save_adapters(tmp_path / method, model)
        fresh, b = build(method)
        adalora.load_adapters(tmp_path / method, fresh)
        assert up(b).t().is_contiguous() and torch.equal(fresh(x), model(x))
        given = up(a).detach().clone()                        # column-major already, as P and B are
        given = given.t().contiguous().t()
        b.set_factors(**{"P" if method == "adalora" else "B": given})
        assert up(b).t().is_contiguous() and up(b).data_ptr() != given.data_ptr()


# -- what can be wrapped, constructor options and their defaults ---------------------------------
def test_conv1d_and_quantized_detection():
    from adalora.layers import is_adaptable, is_conv1d, is_quantized

    class HasNf(nn.Module):                      # nf and a weight, but not called Conv1D
        def __init__(self):
            super().__init__()
            self.nf, self.weight = 3, nn.Parameter(torch.zeros(2, 3))

    NoWeight = type("Conv1D", (nn.Module,), {"nf": 3})     # named Conv1D, no weight
    NoNf = type("Conv1D", (nn.Module,), {})
    assert is_conv1d(Conv1D(3, 2)) and not is_conv1d(HasNf()) and not is_conv1d(NoWeight())
    assert not is_conv1d(NoNf()) and not is_conv1d(nn.Linear(2, 3))
    from adalora.quant import NF4Linear
    q = NF4Linear.from_linear(nn.Linear(64, 8), compute_dtype=torch.float32)
    assert is_quantized(q) and is_adaptable(q) and not is_quantized(nn.Linear(2, 2))
    assert not is_adaptable(HasNf()) and not is_adaptable(nn.Conv2d(1, 1, 1))


def test_adapters_on_a_quantized_base_are_fp32_and_refuse_to_merge():
    from adalora.quant import NF4Linear
    torch.manual_seed(0)
    q = NF4Linear.from_linear(nn.Linear(64, 8).to(torch.bfloat16), compute_dtype=torch.bfloat16)
    for layer in (SVDLinear(q, 2, 1.0), LoRALinear(q, 2, 1.0)):
        assert {p.dtype for p in layer.parameters() if p.requires_grad} == {torch.float32}
        with pytest.raises(ValueError, match=r"^cannot merge into a quantized \(NF4\) base: dequantize the model "
                                             r"first, or serve the adapters unmerged$"):
            layer.merge()
        assert layer.merged is False


def test_wrapping_anything_else_is_refused_by_type():
    with pytest.raises(TypeError, match=r"^cannot wrap Conv2d: adapters wrap nn\.Linear, Conv1D or NF4Linear$"):
        SVDLinear(nn.Conv2d(1, 1, 1), 2, 1.0)


def test_constructor_defaults_scaling_and_dropout():
    base = nn.Linear(4, 3)
    assert adalora.layers.AdapterLayer(base).drop is None           # dropout off by default: no module
    for cls in (SVDLinear, LoRALinear):
        off, on = cls(nn.Linear(4, 3), 2, 1.0), cls(nn.Linear(4, 3), 2, 1.0, dropout=0.4)
        assert off.drop is None and off.merged is False and on.drop.p == 0.4
    assert SVDLinear(base, 1, 3.0).scaling == 3.0 and SVDLinear(base, 0, 3.0).scaling == 0.0
    assert SVDLinear(base, 4, 3.0).scaling == 0.75
    assert LoRALinear(base, 4, 8.0).scaling == 2.0                   # α / r, rslora off by default
    assert LoRALinear(base, 4, 8.0, rslora=True).scaling == 4.0
    assert LoRALinear(base, 1, 3.0).scaling == 3.0 and LoRALinear(base, 0, 3.0).scaling == 0.0
    assert LoRALinear(base, 0, 3.0, rslora=True).scaling == 0.0


def test_lora_a_is_kaiming_uniform_and_rank_0_initializes_nothing():
    """A ~ U(-1/√d_in, 1/√d_in) (kaiming_uniform_ with a = √5, as loralib and peft), for rank 1 too;
    rank 0 has nothing to initialise (and says nothing)."""
    import warnings
    torch.manual_seed(0)
    bound = 1 / math.sqrt(400)
    for r in (1, 64):
        a = LoRALinear(nn.Linear(400, 3), r, 1.0).A.detach()
        assert a.abs().max() <= bound and a.std() > 0.9 * bound / math.sqrt(3)
    a = LoRALinear(nn.Linear(400, 3), 64, 1.0).A.detach()
    assert a.abs().max() > 0.999 * bound                              # 25600 draws reach the bound
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoRALinear(nn.Linear(400, 3), 0, 1.0).A.shape == (0, 400)


def test_fast_param_falls_back_to_attributes():
    from adalora.layers import fast_param
    layer = SVDLinear(nn.Linear(4, 3), 2, 1.0)
    assert fast_param(layer, "lam") is layer.lam
    view = type("View", (nn.Module,), {"lam": property(lambda self: torch.ones(2))})()
    assert torch.equal(fast_param(view, "lam"), torch.ones(2))


def test_load_accepts_keys_already_under_base():
    """A state dict that names the base's own parameters ``<layer>.base.weight`` (the module tree)
    loads as well as the plain-checkpoint names."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3))
    adalora.inject(m, adalora.AdapterConfig(targets=["0"], init_rank=2))
    sd = {("0.base." + k[2:] if k in ("0.weight", "0.bias") else k): v.clone() + 1 for k, v in m.state_dict().items()
          if k != "0.rank_mask"}
    sd["0.rank_mask"] = m.state_dict()["0.rank_mask"]
    m.load_state_dict(sd)
    assert torch.equal(m[0].base.weight, sd["0.base.weight"]) and torch.equal(m[0].lam, sd["0.lam"])


def test_expand_appends_triplets_keeps_delta_w_and_pads_adam_state():
    """expand(n): P (d_out, r+n), lam (r+n,) with zeros appended, Q (r+n, d_in); the old columns
    and rows untouched (so ΔW is unchanged), the new ones ~ N(0, init_std²), all kept, P still
    column-major; Adam's moments zero-padded along the rank, the step count kept."""
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(300, 200).double(), 3, 6.0)
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    layer.rank_mask[1] = False
    opt = torch.optim.AdamW([layer.P, layer.lam, layer.Q], lr=1e-2)
    layer(torch.randn(4, 300, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()
    old = {a: getattr(layer, a).detach().clone() for a in ("P", "lam", "Q")}
    state = {a: {k: v.clone() for k, v in opt.state[getattr(layer, a)].items()} for a in ("P", "lam", "Q")}
    delta = layer.delta_weight().detach().clone()
    layer.expand(40, optimizer=opt, init_std=0.5, generator=torch.Generator().manual_seed(1))
    assert layer.rank == 43 and layer.r0 == 3 and layer.scaling == 2.0          # scale stays α / r0
    assert torch.equal(layer.P[:, :3], old["P"]) and torch.equal(layer.Q[:3], old["Q"])
    assert torch.equal(layer.lam, torch.cat([old["lam"], torch.zeros(40, dtype=torch.float64)]))
    assert layer.rank_mask.tolist() == [True, False, True] + [True] * 40
    assert torch.equal(layer.delta_weight(), delta) and layer.P.t().is_contiguous()
    assert 0.45 < float(layer.P[:, 3:].detach().std()) < 0.55 and 0.45 < float(layer.Q[3:].detach().std()) < 0.55
    assert layer.P.dtype == layer.Q.dtype == torch.float64
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(layer.P), id(layer.lam), id(layer.Q)]
    for a, dim in (("P", 1), ("lam", 0), ("Q", 0)):
        new = opt.state[getattr(layer, a)]
        assert torch.equal(new["step"], state[a]["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert new[k].shape == getattr(layer, a).shape
            assert torch.equal(new[k].narrow(dim, 0, 3), state[a][k])
            assert not new[k].narrow(dim, 3, 40).any()
    assert opt.state[layer.P]["exp_avg"].t().is_contiguous()                # the parameter's layout
    layer(torch.randn(4, 300, dtype=torch.float64)).pow(2).sum().backward()
    opt.step()                                                                # trains on
    same = SVDLinear(nn.Linear(3, 2), 2, 1.0)
    before = [same.P, same.lam, same.Q]
    same.expand(0)
    assert [same.P, same.lam, same.Q] == before                               # n = 0: nothing
    again = SVDLinear(nn.Linear(300, 200).double(), 1, 1.0)
    again.expand(2, generator=torch.Generator().manual_seed(1))
    twin = SVDLinear(nn.Linear(300, 200).double(), 1, 1.0)
    twin.expand(2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.Q[1:], twin.Q[1:]) and torch.equal(again.P[:, 1:], twin.P[:, 1:])   # the generator's draws


def test_expand_defaults_draws_and_a_stateless_optimizer():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(300, 200).double(), 2, 1.0)
    old_p, old_q = layer.P.detach().clone(), layer.Q.detach().clone()
    opt = torch.optim.AdamW([layer.P, layer.lam, layer.Q])                     # never stepped: no state
    layer.expand(1, optimizer=opt)                                             # n = 1 grows too
    assert layer.rank == 3 and not opt.state and opt.param_groups[0]["params"][0] is layer.P
    layer.expand(60, generator=torch.Generator().manual_seed(4))               # default init_std 0.02
    g = torch.Generator().manual_seed(4)                                       # P's columns drawn first, then Q's rows
    assert torch.equal(layer.P[:, 3:], torch.randn(200, 60, generator=g, dtype=torch.float64) * 0.02)
    assert torch.equal(layer.Q[3:], torch.randn(60, 300, generator=g, dtype=torch.float64) * 0.02)
    assert torch.equal(layer.P[:, :2], old_p) and torch.equal(layer.Q[:2], old_q)


def test_set_factors_keep_dtype_and_trainability_and_unmerge_resets_the_flag():
    layer = SVDLinear(nn.Linear(4, 3).double(), 3, 1.0)
    layer.Q.requires_grad_(False)
    layer.set_factors(P=torch.ones(3, 2, dtype=torch.float32), lam=torch.ones(2), Q=torch.ones(2, 4))
    assert {p.dtype for p in (layer.P, layer.lam, layer.Q)} == {torch.float64}
    assert layer.P.requires_grad and layer.lam.requires_grad and not layer.Q.requires_grad
    layer.resize(torch.tensor([1]))
    assert not layer.Q.requires_grad and layer.P.requires_grad
    layer.merge()
    assert layer.merged is True
    layer.unmerge()
    assert layer.merged is False


@pytest.mark.parametrize("flat", [False, True])
def test_set_factors_refuses_a_name_the_adapter_lacks_before_changing_any_factor(flat):
    """SVD adapters have P, lam and Q, LoRA's A and B; banked factors (flat) are no parameters of
    the layer, yet they are factors. An unknown name is refused first, so the call changes nothing."""
    model = nn.Sequential(nn.Linear(4, 3).double())
    cfg = adalora.AdapterConfig(targets=["0"], init_rank=2, flat_gates=flat, flat_factors=flat)
    layer = adalora.inject(model, cfg)["0"]
    p, lam = layer.P.detach().clone(), layer.lam.detach().clone()
    with pytest.raises(ValueError, match=r"^SVDLinear.set_factors\(A=...\): no such factor; name one of P, lam, Q$"):
        layer.set_factors(P=torch.ones(3, 2), A=torch.ones(2, 4))
    assert torch.equal(layer.P, p) and torch.equal(layer.lam, lam)
    layer.set_factors(P=torch.ones(3, 2), lam=torch.full((2,), 0.5))      # the names it has
    assert torch.equal(layer.P, torch.ones(3, 2, dtype=torch.float64))
    assert torch.equal(layer.lam, torch.full((2,), 0.5, dtype=torch.float64))
    lora = LoRALinear(nn.Linear(4, 3), 2, 2.0)
    with pytest.raises(ValueError, match=r"^LoRALinear.set_factors\(lam=...\): no such factor; name one of B, A$"):
        lora.set_factors(lam=torch.ones(2))


def test_to_empty_without_recursion_leaves_the_base_alone():
    """`_apply` (which drops the fused stack) passes `recurse` on: `to_empty(recurse=False)` replaces
    the adapter's own factors only, never the frozen base weight."""
    base = nn.Linear(4, 3)
    w = base.weight.detach().clone()
    layer = SVDLinear(base, 2, 1.0)
    layer.to_empty(device="cpu", recurse=False)
    assert torch.equal(layer.base.weight, w)


def test_set_factors_refuses_factors_that_do_not_chain_or_a_merged_layer_and_changes_nothing():
    """A (5, 4) P on a (24, 16) layer, or a lam of another rank alone, would fail later inside a
    product; on a merged layer, unmerge would then subtract another ΔW than it added."""
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(16, 24), 4, alpha=8.0)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for bad, shapes in (({"P": torch.randn(5, 4)}, r"P \(5, 4\), lam \(4,\), Q \(4, 16\)"),
                        ({"lam": torch.ones(3)}, r"P \(24, 4\), lam \(3,\), Q \(4, 16\)"),
                        ({"Q": torch.randn(4, 15)}, r"P \(24, 4\), lam \(4,\), Q \(4, 15\)")):
        with pytest.raises(ValueError, match=rf"^SVDLinear.set_factors: {shapes} do not make a rank-r update of "
                                             r"this \(24, 16\) layer: want P \(24, r\), lam \(r,\), Q \(r, 16\)$"):
            layer.set_factors(**bad)
    # a 0-d down factor has no rank at all: refused as the others, not an IndexError
    with pytest.raises(ValueError, match=r"Q \(\) do not make a rank-r update"):
        layer.set_factors(Q=torch.tensor(1.0))
    with torch.no_grad():
        layer.lam.normal_()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.merge()
    with pytest.raises(ValueError, match=r"^SVDLinear.set_factors: the layer is merged into its base; unmerge it "
                                         r"first \(adalora\.unmerge\(model\)\)$"):
        layer.set_factors(lam=torch.zeros(4))
    layer.unmerge()
    after = layer.state_dict()
    assert all(torch.allclose(after[k], v, atol=1e-6) for k, v in before.items())
    # all three at a new rank: accepted, and every new value kept
    layer.set_factors(P=torch.randn(24, 2), lam=torch.ones(2), Q=torch.randn(2, 16))
    assert layer.rank == 2 and layer.rank_mask.tolist() == [True, True]
    assert layer.rank_mask.dtype == torch.bool                # a mask, not float ones
    lora = LoRALinear(nn.Linear(16, 24), 4, alpha=8.0)
    with pytest.raises(ValueError, match=r"want B \(24, r\), A \(r, 16\)"):
        lora.set_factors(A=torch.randn(3, 16))
