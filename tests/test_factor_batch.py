"""The fused paths' gate products formed for all adapters at once (adalora/factor_batch.py): the
same outputs and gradients as the unfused path and as each adapter alone, a number of operations
that no longer grows with the number of adapters, and products that never outlive the forward
that formed them. CPU only, no timing."""
import collections
import copy
import types

import pytest
import torch
import torch.nn as nn

import adalora
from adalora import factor_batch
from experiments.opcount import count_ops

WIDTHS = (16, 16, 16, 24, 24, 8, 16)   # d_in of each layer: two widths shared, one (8) alone


class Chain(nn.Module):
    """Linear maps of the given input widths, each followed by tanh; the last maps to 5."""

    def __init__(self, widths=WIDTHS):
        super().__init__()
        outs = list(widths[1:]) + [5]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths, outs))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _model(fuse, method="adalora", widths=WIDTHS, dtype=torch.float64, seed=0, net=Chain):
    torch.manual_seed(seed)
    m = net(widths).to(dtype)
    ad = adalora.inject(m, adalora.AdapterConfig(method=method, targets=["layers." + str(i) for i in range(len(widths))],
                                                 init_rank=4, alpha=4.0, fuse=fuse))
    adalora.mark_only_adapters_trainable(m)
    with torch.no_grad():                  # lam = 0 and B = 0 at init would zero most gradients
        for p in adalora.adapter_parameters(ad):
            p.normal_(0, 0.5)
    return m, ad


def _grads(ad):
    return {f"{n}.{k}": p.grad.clone() for n, a in ad.items() for k, p in a.named_parameters() if p.requires_grad}


def _step(m, ad, x, times=1):
    for _ in range(times):
        y = m(x)
        y.pow(2).sum().backward()
    return y.detach(), _grads(ad)


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **tol, msg=k)


def test_outputs_and_gradients_equal_the_unfused_path_also_with_ranks_that_differ():
    """Float64, two backward passes accumulated (the second adds into the first's gradients),
    and one adapter of a shared width pruned to rank 2 of 4, as ``compact`` leaves them."""
    x = torch.randn(9, 16, dtype=torch.float64)
    runs = []
    for fuse in ("none", "epilogue"):
        m, ad = _model(fuse)
        ad["layers.1"].resize(torch.tensor([0, 3]))
        runs.append(_step(m, ad, x, times=2))
    _assert_same(*runs, rtol=1e-12, atol=1e-12)


def test_the_batched_products_give_what_each_adapter_forms_alone():
    x = torch.randn(9, 16, dtype=torch.float64)
    m, ad = _model("epilogue")
    alone = copy.deepcopy(m)
    factor_batch.remove(alone)
    batched = _step(m, ad, x)
    _assert_same(batched, _step(alone, adalora.find_adapters(alone), x), rtol=1e-12, atol=1e-12)


def _ops(m, x) -> int:
    return count_ops(lambda: m(x).sum().backward())["ops"]


def test_what_adalora_adds_to_lora_no_longer_grows_with_the_adapters():
    """AdaLoRA's fused adapter is LoRA's with the gate: forward and backward, the operations it
    adds over LoRA's are the same for 4 adapters of a width as for 16. Without the batch each
    adapter adds three (``lam ⊙ Q``, ``dQ``, ``dlam``), as the count without the hooks shows."""
    def extra(widths, batched=True):
        x = torch.randn(6, widths[0], dtype=torch.float64)
        counts = []
        for method in ("lora", "adalora"):
            m, _ = _model("epilogue", method, widths)
            if not batched:
                factor_batch.remove(m)
            counts.append(_ops(m, x))
        return counts[1] - counts[0]

    assert extra((16,) * 4) == extra((16,) * 16)
    assert extra((16,) * 16, batched=False) - extra((16,) * 4, batched=False) == 3 * 12


def test_the_products_are_dropped_after_the_forward_also_when_it_raises():
    m, ad = _model("epilogue")
    seen = []
    ad["layers.2"].register_forward_pre_hook(lambda mod, args: seen.append(mod.__dict__.get(factor_batch.SLOT)))
    m(torch.randn(3, 16, dtype=torch.float64))
    assert seen[-1] is not None and seen[-1][0].shape == (4, 16)    # formed, and handed over
    assert all(factor_batch.SLOT not in a.__dict__ for a in ad.values())
    with pytest.raises(RuntimeError):
        m(torch.randn(3, 15, dtype=torch.float64))                     # the first layer raises
    assert all(factor_batch.SLOT not in a.__dict__ for a in ad.values())


def test_an_adapter_called_alone_after_a_step_uses_its_current_parameters():
    """A product formed before an optimizer step must not serve a later call of one adapter."""
    m, ad = _model("epilogue")
    opt = torch.optim.SGD(adalora.adapter_parameters(ad), lr=0.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    m(x).sum().backward()
    opt.step()
    layer = ad["layers.0"]
    ref = copy.deepcopy(layer)
    ref.fuse = "none"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-12, atol=1e-12)


def test_gradient_checkpointing_skips_the_batch_and_trains_the_same():
    """A model flagged as transformers flags one (``gradient_checkpointing = True`` on the
    blocks' container) whose blocks run under non-reentrant checkpointing: the recomputed
    forward, after the hooks, must save what the first saved, so no adapter takes a batched
    product; the gradients are those without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Chain):
        def forward(self, x):
            for layer in self.layers:
                x = checkpoint(lambda t, lay=layer: torch.tanh(lay(t)), x, use_reentrant=False)
            return x

    x = torch.randn(9, 16, dtype=torch.float64)
    plain = _step(*_model("epilogue"), x)
    m, ad = _model("epilogue", net=Checkpointed)
    m.layers.gradient_checkpointing = True
    _assert_same(_step(m, ad, x), plain, rtol=1e-12, atol=1e-12)


def _same_with_and_without_the_batch_under_autocast(**model_args):
    """fp32 adapters run under bf16 autocast with the factors prepared per width and without:
    the same output bit for bit, and fp32 gradients that agree to fp32 rounding."""
    x = torch.randn(9, 16)
    outs = []
    for batched in (True, False):
        m, ad = _model("epilogue", dtype=torch.float32, **model_args)
        if not batched:
            factor_batch.remove(m)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().pow(2).sum().backward()
        outs.append((y.detach(), _grads(ad)))
        assert all(g.dtype == torch.float32 for g in outs[-1][1].values())
    assert torch.equal(outs[0][0], outs[1][0])
    for k in outs[0][1]:
        torch.testing.assert_close(outs[0][1][k], outs[1][1][k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_under_autocast_the_output_is_each_adapter_alone_bit_for_bit(method):
    """The batch casts the factors (``lam ⊙ Q`` formed first) once for all, as each adapter would
    cast its own."""
    _same_with_and_without_the_batch_under_autocast(method=method)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_under_autocast_an_adapted_layer_casts_no_more_than_the_frozen_linear_alone(method):
    """Per layer, forward and backward, a frozen ``nn.Linear`` under bf16 autocast casts its
    weight and bias. A fused adapter on it casts those two and nothing more: its factors' casts,
    and their gradients' casts back to fp32, are made once per width."""
    def per_layer(make):
        counts = []
        for n in (4, 16):
            m = make(n)
            x = torch.randn(3, 16)

            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = m(x)
                y.float().sum().backward()
            counts.append(count_ops(step, only="aten._to_copy")["ops"])
        return (counts[1] - counts[0]) / 12

    def frozen(n):
        m = Chain((16,) * n).requires_grad_(False)
        m.layers[0].weight.requires_grad_(True)       # something to backward into
        return m

    assert per_layer(frozen) == 2
    assert per_layer(lambda n: _model("epilogue", method, (16,) * n, torch.float32)[0]) == 2


def test_unfused_models_and_lora_outside_autocast_get_no_prepared_factors():
    for fuse, method in (("none", "adalora"), ("stack", "adalora"), ("epilogue", "lora")):
        m, ad = _model(fuse, method)
        seen = []
        for a in ad.values():
            a.register_forward_pre_hook(lambda mod, args: seen.append(factor_batch.SLOT in mod.__dict__))
        m(torch.randn(3, 16, dtype=torch.float64))
        assert seen and not any(seen), (fuse, method)


def test_an_adapter_where_autocast_is_off_keeps_its_own_fp32_factors():
    """The model runs under autocast, one block of it with autocast off: that adapter must not
    multiply by the bf16 factors prepared for the others (its product is fp32). Its output and
    gradients are those without the batch."""
    class OneOff(Chain):
        def forward(self, x):
            for i, layer in enumerate(self.layers):
                with torch.autocast("cpu", enabled=i != 2):
                    x = torch.tanh(layer(x.float() if i == 2 else x))
            return x

    _same_with_and_without_the_batch_under_autocast(net=OneOff)


def test_attach_is_once_per_model_and_remove_is_safe_twice():
    m, _ = _model("epilogue")
    factor_batch.attach(m)
    assert len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1
    factor_batch.remove(m)
    factor_batch.remove(m)
    assert not m._forward_pre_hooks and not m._forward_hooks


@pytest.mark.parametrize("widths", [WIDTHS, (8, 12, 16, 16, 24, 24)])
@pytest.mark.parametrize("autocast", [False, True])
def test_every_adapter_of_a_shared_width_gets_prepared_factors_and_a_lone_one_does_not(widths, autocast):
    """Down factors are shared by ``d_in``, cast up factors by ``d_out`` (only under autocast):
    a width of one adapter prepares its own, since one product for one adapter saves nothing.
    The second chain starts with lone widths. Outside autocast the prepared down factor is
    ``lam ⊙ Q`` exactly."""
    dtype = torch.float32 if autocast else torch.float64
    m, ad = _model("epilogue", widths=widths, dtype=dtype)
    seen = {}
    for name, a in ad.items():
        a.register_forward_pre_hook(lambda mod, args, name=name: seen.update({name: mod.__dict__.get(factor_batch.SLOT)}))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        m(torch.randn(3, widths[0], dtype=dtype))
    n_in = collections.Counter(widths)
    n_out = collections.Counter(a.out_features for a in ad.values())
    for name, a in ad.items():
        down, up, _, merged = seen[name] or (None, None, None, None)
        assert merged is None, name                      # the epilogue path: no W' formed
        assert (down is not None) == (n_in[a.in_features] > 1), name
        assert (up is not None) == (autocast and n_out[a.out_features] > 1), name
        if down is not None and not autocast:
            torch.testing.assert_close(down, a.Q * a.lam[:, None], rtol=0, atol=0)


def test_auto_prepares_factors_for_cuda_parameters_only():
    """``"auto"`` resolves by the down factor's device (``is_cuda`` is all that is read, so a
    stand-in checks the choice on a machine without CUDA); ``"none"`` and ``"stack"`` never
    prepare, ``"epilogue"`` and ``"triton"`` on any device."""
    _, ad = _model("auto")
    layer = ad["layers.0"]
    assert not factor_batch._fused(layer)
    for mode, expected in (("none", False), ("stack", False), ("epilogue", True), ("triton", True)):
        layer.fuse = mode
        assert factor_batch._fused(layer) is expected, mode
    layer.fuse = "auto"
    layer._parameters["Q"] = types.SimpleNamespace(is_cuda=True)
    assert factor_batch._fused(layer)


def test_the_walk_visits_modules_in_nn_module_order_once_each():
    """The hooks' own walk against ``nn.Module.modules()``: pre-order, a module shared by two
    parents (and one registered as None) visited once, where modules() first meets it."""
    shared = nn.Linear(3, 3)
    inner = nn.Sequential(nn.Linear(3, 3), shared, nn.Sequential(nn.ReLU(), shared))
    model = nn.Sequential(nn.Linear(3, 3), inner, nn.ModuleDict({"a": shared, "b": nn.Tanh()}), inner)
    model.register_module("empty", None)
    walked = list(factor_batch._walk(model))
    assert [id(m) for m in walked] == [id(m) for m in model.modules()]
    m, ad = _model("epilogue")
    assert [id(x) for x in factor_batch._walk(m)] == [id(x) for x in m.modules()]
