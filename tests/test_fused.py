"""The fused paths (fuse="epilogue" and "stack", adalora/fused.py) compute what the unfused one
does: outputs, gradients, training, allocation, the stack's rebuild after every operation that
moves or reshapes a factor, saved files, and the fallbacks; the epilogue path makes no (N, d)
tensor beyond the output and the input gradient. CPU only, no timing."""
import copy
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adalora
from adalora import fused
from adalora.layers import LoRALinear, SVDLinear

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def _layer(cls, dtype, bias=True, d_in=20, d_out=30, rank=5, fuse="none", seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(dtype).requires_grad_(False)
    layer = cls(base, rank, 8.0, fuse=fuse)
    with torch.no_grad():
        for p in (layer.P, layer.lam, layer.Q) if cls is SVDLinear else (layer.A, layer.B):
            p.normal_()
    return layer


def _pair(layer, mode="stack"):
    """(unfused, fused) copies of ``layer``."""
    ref, fast = copy.deepcopy(layer), copy.deepcopy(layer)
    ref.fuse, fast.fuse = "none", mode
    return ref, fast


def _nodes(y) -> set[str]:
    """Names of the autograd nodes behind ``y``, two levels down (the view, then the product)."""
    out, fns = set(), [y.grad_fn]
    for _ in range(2):
        fns = [f for f in fns if f is not None]
        out |= {type(f).__name__ for f in fns}
        fns = [n for f in fns for n, _ in f.next_functions]
    return out


def _took(layer, y, mode) -> bool:
    """Whether ``layer``'s last forward, which gave ``y``, ran the ``mode`` path."""
    if mode == "stack":
        return "_fused_stack" in layer.__dict__
    fns = [y.grad_fn, *(f for f, _ in y.grad_fn.next_functions)] if y.grad_fn is not None else []
    return any(type(f).__name__ == "EpilogueLinearBackward" and f.how == mode for f in fns if f is not None)


def _dense(layer, x):
    """x W0ᵀ + b + s · x (diag(lam) Q)ᵀ Pᵀ (or s · x Aᵀ Bᵀ), by hand."""
    w, b = layer.base.weight, layer.base.bias
    if isinstance(layer, SVDLinear):
        down, up = layer.lam[:, None] * layer.Q, layer.P
    else:
        down, up = layer.A, layer.B
    y = x @ w.T + layer.scaling * (x @ down.T) @ up.T
    return y if b is None else y + b


def _run(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(g)
    grads = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), x.grad, grads


# "masked" zeroes entries of lam, the gate only SVD adapters have
@pytest.mark.parametrize("cls,case", [(c, k) for c in (SVDLinear, LoRALinear) for k in ("2d", "3d", "no_bias")]
                         + [(SVDLinear, "masked")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_forward_and_gradients_equal_the_unfused_path_and_the_dense_map(cls, dtype, case, mode):
    layer = _layer(cls, dtype, bias=case != "no_bias")
    if case == "masked":
        with torch.no_grad():
            layer.lam[[0, 3]] = 0.0
    shape = (3, 7, 20) if case == "3d" else (11, 20)
    x = torch.randn(*shape, dtype=dtype)
    g = torch.randn(*shape[:-1], 30, dtype=dtype)
    ref, fast = _pair(layer, mode)
    y0, dx0, g0 = _run(ref, x, g)
    y1, dx1, g1 = _run(fast, x, g)
    assert _took(fast, fast(x), mode) and not _took(ref, ref(x), mode)   # the paths did differ
    if mode == "epilogue":
        assert torch.equal(y1, y0)                             # the same products, in the same layouts
    torch.testing.assert_close(y1, y0, **TOL[dtype])
    torch.testing.assert_close(y1, _dense(layer, x).detach(), **TOL[dtype])
    torch.testing.assert_close(dx1, dx0, **TOL[dtype])
    assert g1.keys() == g0.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **TOL[dtype])
        assert g1[n].stride() == getattr(fast, n).stride()        # the parameter's layout (P, B column-major)
    assert fast.base.weight.grad is None and (fast.base.bias is None or fast.base.bias.grad is None)


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_gradients_equal_autograd_of_the_dense_map_in_float64(mode, cls):
    layer = _layer(cls, torch.float64, rank=3, d_in=6, d_out=5, fuse=mode)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = (x, *(p for p in layer.parameters() if p.requires_grad))
    assert len(params) == (4 if cls is SVDLinear else 3)
    assert torch.autograd.gradcheck(lambda *_: layer(x), params)


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_inplace_ops_on_the_output_and_a_layer_used_twice(mode):
    ref, fast = _pair(_layer(SVDLinear, torch.float64, d_in=30, d_out=30), mode)
    x = torch.randn(6, 30, dtype=torch.float64)
    outs = []
    for layer in (ref, fast):
        xi = x.clone().requires_grad_(True)
        y = layer(layer(xi))
        y += 1.0                                               # in place on the adapter's output
        y.relu_()
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, layer.Q.grad, layer.lam.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def _mlp(seed=0, fuse="none", method="adalora", dtype=torch.float64):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 12)).to(dtype)
    ad = adalora.inject(m, adalora.AdapterConfig(method=method, targets=["0", "2", "4"], init_rank=4, alpha=4.0,
                                                 fuse=fuse))
    adalora.mark_only_adapters_trainable(m)
    if method == "lora":
        with torch.no_grad():
            for a in ad.values():
                a.B.normal_(0, 0.1)
    return m, ad


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_adamw_steps_give_the_same_parameters(method, mode):
    trained = []
    for fuse in ("none", mode):
        m, ad = _mlp(fuse=fuse, method=method)
        opt = torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            m(torch.randn(8, 10, generator=g, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        trained.append({n: p.detach().clone() for n, p in m.named_parameters()})
    for n in trained[0]:
        torch.testing.assert_close(trained[1][n], trained[0][n], **TOL[torch.float64])


def allocator_run(fuse, dtype=torch.float64):
    """An AdaLoRA run of 24 steps through warmup, budgeting, the final allocation and
    ``compact()`` (ranks shrink mid-run: the stack is rebuilt): losses, masks and final ranks."""
    m, ad = _mlp(fuse=fuse, dtype=dtype)
    alloc = adalora.RankAllocator(ad, adalora.ScheduleConfig(target_rank=2, total_steps=24, init_warmup=2,
                                                             final_warmup=8, mask_interval=3))
    opt = torch.optim.AdamW(adalora.adapter_parameters(ad), lr=1e-2)
    losses, masks = [], []
    for step in range(24):
        x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step), dtype=dtype)
        loss = m(x).pow(2).mean() + 0.1 * adalora.orthogonality_penalty(ad)
        loss.backward()
        opt.step()
        alloc.update_importance(step)
        alloc.mask_to_budget(step)
        opt.zero_grad(set_to_none=True)
        if alloc.final_done and "compacted" not in ad["0"].__dict__:
            alloc.compact(opt)
            ad["0"].__dict__["compacted"] = True
        losses.append(loss.item())
        masks.append([a.rank_mask.clone() for a in ad.values()])
    return losses, masks, alloc.ranks()


def assert_same_run(ref, run, rtol):
    (l0, m0, r0), (l1, m1, r1) = ref, run
    assert r0 == r1 and sum(r1.values()) == 6
    assert all(torch.equal(a, b) for s0, s1 in zip(m0, m1) for a, b in zip(s0, s1))
    assert sum(not bool(x.all()) for s in m0 for x in s) > 0           # the masks did prune
    assert max(abs(a - b) / abs(a) for a, b in zip(l0, l1)) < rtol


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_rank_allocator_run_gives_the_same_masks_ranks_and_losses(mode):
    assert_same_run(allocator_run("none"), allocator_run(mode), rtol=1e-10)


def _same_forward(ref, fast, x):
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), **TOL[x.dtype])


def test_the_stack_follows_every_change_of_w0_and_the_factors():
    ref, fast = _pair(_layer(SVDLinear, torch.float64, rank=6))
    x = torch.randn(5, 20, dtype=torch.float64)
    _same_forward(ref, fast, x)
    stack = fast.__dict__["_fused_stack"][0]
    assert fast.base.weight.data_ptr() == stack.data_ptr()     # W0 lives in the stack's top rows
    _same_forward(ref, fast, x)
    assert fast.__dict__["_fused_stack"][0] is stack           # reused while nothing changed
    keep = torch.tensor([0, 2, 5])
    for layer in (ref, fast):
        layer.resize(keep)
    _same_forward(ref, fast, x)
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    for layer, g in zip((ref, fast), gen):
        layer.expand(4, generator=g)
        with torch.no_grad():
            layer.lam.fill_(0.5)
    _same_forward(ref, fast, x)
    for layer in (ref, fast):
        layer.merge()
    assert fast.base.weight.data_ptr() == fast.__dict__["_fused_stack"][0].data_ptr()  # merged in place
    _same_forward(ref, fast, x)                                # merged: no adapter term on either path
    for layer in (ref, fast):
        layer.unmerge()
    _same_forward(ref, fast, x)
    other = _layer(SVDLinear, torch.float64, rank=7, seed=1)
    for layer in (ref, fast):
        layer.resize(torch.arange(7))
        layer.load_state_dict(other.state_dict())
    _same_forward(ref, fast, x)
    for layer in (ref, fast):
        layer.to(torch.float32)
    assert "_fused_stack" not in fast.__dict__                 # dropped with the old memory
    _same_forward(ref, fast, x.float())
    for layer in (ref, fast):
        layer.load_state_dict(_layer(SVDLinear, torch.float32, rank=7, seed=2).state_dict(), assign=True)
    _same_forward(ref, fast, x.float())


def test_inference_mode_first_then_training():
    ref, fast = _pair(_layer(SVDLinear, torch.float32))
    x = torch.randn(4, 20)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), **TOL[torch.float32])
    assert "_fused_stack" not in fast.__dict__                 # W0 stays a normal tensor
    _, _, g0 = _run(ref, x, torch.ones(4, 30))
    _, _, g1 = _run(fast, x, torch.ones(4, 30))
    with torch.inference_mode():
        fast(x)                                                # the stack built since is used as is
    torch.testing.assert_close(g1["Q"], g0["Q"], **TOL[torch.float32])


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_switching_named_sets_keeps_the_fused_forward_right(mode):
    m0, _ = _mlp()
    m1, _ = _mlp(fuse=mode)
    x = torch.randn(4, 10, dtype=torch.float64)
    for m in (m0, m1):
        torch.manual_seed(5)
        adalora.add_adapter(m, "b")
        adalora.set_adapter(m, "b")
        with torch.no_grad():
            for a in adalora.find_adapters(m).values():
                a.lam.normal_()
    _same_forward(m0, m1, x)
    for m in (m0, m1):
        adalora.set_adapter(m, "default")
    _same_forward(m0, m1, x)


def test_saved_files_and_state_dicts_are_those_of_the_unfused_model(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file, save_file
    m, ad = _mlp()
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()
    before = {n: t.clone() for n, t in m.state_dict().items()}
    adalora.save_adapters(tmp_path / "none", m)
    adalora.save_peft(tmp_path / "peft_none", m)
    adalora.set_fuse(m, "stack")
    m(torch.randn(3, 10, dtype=torch.float64))                 # builds the stacks
    assert all("_fused_stack" in a.__dict__ for a in ad.values())
    adalora.save_adapters(tmp_path / "stack", m)
    adalora.save_peft(tmp_path / "peft_stack", m)
    for a, b in (("none/adapters.safetensors", "stack/adapters.safetensors"),
                 ("peft_none/adapter_model.safetensors", "peft_stack/adapter_model.safetensors")):
        ta, tb = load_file(tmp_path / a), load_file(tmp_path / b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    save_file({k: v.contiguous() for k, v in after.items()}, tmp_path / "model.safetensors")  # no shared memory
    reloaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(reloaded[k], before[k]) for k in before)


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_fallbacks_use_the_unfused_path_exactly(mode):
    from transformers.pytorch_utils import Conv1D
    x = torch.randn(6, 8)
    torch.manual_seed(0)
    conv = Conv1D(12, 8).requires_grad_(False)
    cases = {"conv1d": SVDLinear(conv, 4, 8.0), "dropout": SVDLinear(nn.Linear(8, 12).requires_grad_(False), 4, 8.0,
                                                                      dropout=0.5)}
    nf4 = nn.Sequential(nn.Linear(8, 64))
    adalora.quantize_model(nf4, compute_dtype=torch.float32)
    cases["nf4"] = SVDLinear(nf4[0], 4, 8.0)
    trainable_bias = nn.Sequential(nn.Linear(8, 12))
    adalora.inject(trainable_bias, adalora.AdapterConfig(targets=["0"], init_rank=4))
    adalora.mark_only_adapters_trainable(trainable_bias, bias="all")
    cases["trainable_bias"] = trainable_bias[0]
    for name, layer in cases.items():
        with torch.no_grad():
            layer.lam.normal_()
        ref, fast = _pair(layer, mode)
        torch.manual_seed(1)
        y0 = ref(x)
        torch.manual_seed(1)
        y1 = fast(x)
        assert torch.equal(y0, y1) and not _took(fast, y1, mode), name
    if mode == "stack":
        fast = _pair(_layer(SVDLinear, torch.float32), mode)[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fast(torch.randn(2, 20))
        assert not _took(fast, y, mode)
    auto = _layer(SVDLinear, torch.float32, fuse="auto")
    y = auto(torch.randn(2, 20))                               # a CPU tensor: auto means none
    assert not _took(auto, y, "stack") and not _took(auto, y, "epilogue")


def test_auto_takes_the_epilogue_path_for_cuda_tensors():
    """"auto" resolves by the input's device. ``path`` reads only the input's ``is_cuda``, dtype
    and device, so a stand-in for a CUDA tensor checks the choice on a machine without one."""
    layer = _layer(SVDLinear, torch.float32, fuse="auto")
    cuda_like = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"))
    assert fused.path(layer, cuda_like) == "epilogue"
    assert fused.path(layer, torch.randn(2, 20)) == "none"


def test_fuse_values_are_checked():
    with pytest.raises(ValueError, match=r"AdapterConfig.fuse='fused': use one of \('none', 'epilogue', 'merge', 'triton', 'stack', 'auto'\)"):
        adalora.AdapterConfig(fuse="fused")
    m, ad = _mlp()
    with pytest.raises(ValueError, match="fuse='on': use one of"):
        adalora.set_fuse(m, "on")
    adalora.set_fuse(m, "stack")
    assert {a.fuse for a in ad.values()} == {"stack"}
    assert adalora.AdapterConfig().fuse == "auto"


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_compiled_fused_model_gives_eager_gradients(no_recompiles, mode):
    from torch._dynamo.testing import CompileCounterWithBackend
    m, ad = _mlp(fuse=mode)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(m, backend=backend)
    x = torch.randn(8, 10, dtype=torch.float64)
    grads = []
    for fn in (m, compiled):
        fn(x).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in adalora.adapter_parameters(ad)])
        m.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL[torch.float64])
    assert backend.frame_count == 1 and "autograd_function_apply" in backend.graphs[0].code  # one graph, fused


def test_stack_rows_are_padded_to_16_bytes():
    """A row of z is a multiple of 16 bytes: 8 bf16 or 4 fp32 values (the padding rows are never read)."""
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert fused._rows(5, 3, bf16) == 8 and fused._rows(5, 4, bf16) == 16
    assert fused._rows(5, 4, fp32) == 12 and fused._rows(6, 2, fp32) == 8


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_rank_1_takes_the_fused_path_and_rank_0_does_not(mode):
    one = _layer(SVDLinear, torch.float32, rank=1, fuse=mode)
    assert _took(one, one(torch.randn(2, 20)), mode)
    zero = _layer(SVDLinear, torch.float32, rank=0, fuse=mode)
    assert not _took(zero, zero(torch.randn(2, 20)), mode)


@pytest.mark.parametrize("mode", ["epilogue", "merge", "stack"])
def test_adapters_in_another_dtype_than_the_base_use_the_unfused_path(mode):
    """fp32 factors on a bf16 base: the unfused path computes the adapter in fp32; stacking would
    round D to bf16, and the epilogue add into the bf16 output takes one dtype."""
    layer = _layer(SVDLinear, torch.bfloat16)
    for name in ("P", "lam", "Q"):
        p = getattr(layer, name)
        p.data = p.data.float()
    ref, fast = _pair(layer, mode)
    x = torch.randn(4, 20, dtype=torch.bfloat16)
    y = fast(x)
    assert torch.equal(y, ref(x)) and not _took(fast, y, mode)


def test_no_bias_layer_twice_and_under_inference_mode():
    """bias=None through the cached stack (second call) and through the concatenating path."""
    ref, fast = _pair(_layer(LoRALinear, torch.float32, bias=False))
    x = torch.randn(3, 20)
    for _ in range(2):
        assert torch.allclose(fast(x), ref(x), **TOL[torch.float32])
    ref, fast = _pair(_layer(LoRALinear, torch.float32, bias=False))
    with torch.inference_mode():
        assert torch.allclose(fast(x), ref(x), **TOL[torch.float32])


def test_a_new_base_weight_alone_rebuilds_the_stack():
    """Only W0 replaced (the bias object kept): the stack must follow the new W0."""
    ref, fast = _pair(_layer(SVDLinear, torch.float32))
    x = torch.randn(3, 20)
    fast(x)                                                    # builds the stack
    new = torch.randn(30, 20)
    for m in (ref, fast):
        m.base.weight = nn.Parameter(new.clone(), requires_grad=False)
    assert torch.allclose(fast(x), ref(x), **TOL[torch.float32])


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the shape of every tensor an op returns as new memory (in-place ops excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        if not any(a.is_write for a in schema.arguments if a.alias_info) and torch.is_tensor(out) \
                and func.name().split("::")[1].split(".")[0] not in ("view", "t", "transpose", "_unsafe_view",
                                                                     "reshape", "detach", "alias"):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_the_epilogue_path_makes_no_full_size_tensor_beyond_y_and_dx(cls):
    """N = 64 rows, d_in = 20, d_out = 30: the unfused path writes y twice (addmm out of place)
    and dx three times (two shares and their sum); the epilogue and merge paths once each, and
    the merge path one (d_out, d_in) weight W', which the others never form."""
    counts = {}
    for mode in ("none", "epilogue", "merge"):
        layer = _layer(cls, torch.float32, fuse=mode)
        x = torch.randn(64, 20, requires_grad=True)
        g = torch.randn(64, 30)
        with _Allocations() as rec:
            layer(x).backward(g)
        counts[mode] = (rec.shapes.count((64, 30)), rec.shapes.count((64, 20)), rec.shapes.count((30, 20)))
    assert counts == {"none": (2, 3, 0), "epilogue": (1, 1, 0), "merge": (1, 1, 1)}


@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_under_autocast_no_path_copies_x_into_the_adapter_dtype(cls):
    """fp32 adapters fed bf16 activations under bf16 autocast: x is never cast to fp32 and back
    (autocast's product casts it to bf16 anyway), so the (N, d_in) tensors are only dx: on the
    unfused path its two shares and their sum, on the epilogue path one."""
    counts = {}
    for mode in ("none", "epilogue", "merge"):
        layer = _layer(cls, torch.float32, fuse=mode)
        x = torch.randn(64, 20, dtype=torch.bfloat16, requires_grad=True)
        with _Allocations() as rec, torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        counts[mode] = rec.shapes.count((64, 20))
    assert counts == {"none": 3, "epilogue": 1, "merge": 1}


@pytest.mark.parametrize("path", ["epilogue", "merge"])
@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_the_epilogue_path_under_autocast_computes_what_autocast_does(cls, path):
    """fp32 factors and base under bf16 autocast, fed an fp32 and a bf16 input (an earlier
    autocast op's output), with and without a bias: the path runs, in bf16, returns fp32
    gradients, and is as close to the float64 map as the unfused path under the same autocast,
    backward run outside autocast as training loops do. The epilogue path's output is the
    unfused path's bit for bit (g ⊙ Q formed in fp32 before the cast on both); its gradients
    round s · G U in another order. The merge path rounds W0 + s U (g ⊙ Q) to bf16 once, where
    autocast rounds W0."""
    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    for x_dtype, bias in ((torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)):
        layer = _layer(cls, torch.float32, d_in=64, d_out=48, rank=8, bias=bias)
        ref, fast = _pair(layer, path)
        x = torch.randn(5, 7, 64).to(x_dtype)
        g = torch.randn(5, 7, 48, dtype=torch.bfloat16)
        exact = _run(copy.deepcopy(layer).double(), x.double(), g.double())
        errors, outputs = [], []
        for m in (ref, fast):
            xi = x.detach().clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = m(xi)
            y.backward(g)                                  # outside autocast, as training loops do
            y, dx = y.detach(), xi.grad
            grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
            assert y.dtype == torch.bfloat16 and dx.dtype == x_dtype
            assert all(grads[n].dtype == torch.float32 for n in grads)
            errors.append([rel(y, exact[0]), rel(dx, exact[1])] + [rel(grads[n], exact[2][n]) for n in sorted(grads)])
            outputs.append(y)
        assert torch.equal(*outputs) or path == "merge"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _took(fast, fast(x), path) and not _took(ref, ref(x), path)
        unfused, epilogue = errors
        assert max(unfused) < 1e-2 and all(e <= 2 * u + 2e-3 for e, u in zip(epilogue, unfused)), (unfused, epilogue)


def test_merge_in_bf16_multiplies_by_w_prime_rounded_once_and_keeps_the_factors_gradients():
    """bf16 weights: the merge path's output is x times W' = W0 + s P (lam ⊙ Q), rounded to bf16
    from its exact sum (one ulp at most: addmm rounds an fp32 sum), and its factors' gradients
    are the epilogue path's bit for bit (both multiply the factors themselves). A change to W0
    under half its last place is rounded away in the forward but not in the gradients: the
    documented deviation."""
    layer = _layer(SVDLinear, torch.bfloat16, d_in=64, d_out=48, rank=8)
    epi, mer = copy.deepcopy(layer), copy.deepcopy(layer)
    epi.fuse, mer.fuse = "epilogue", "merge"
    x, g = torch.randn(32, 64, dtype=torch.bfloat16), torch.randn(32, 48, dtype=torch.bfloat16)
    y1, _, g1 = _run(mer, x, g)
    _, _, g0 = _run(epi, x, g)
    assert _took(mer, mer(x), "merge")
    d = layer.base.weight.double() + layer.scaling * layer.P.double() @ (layer.lam[:, None] * layer.Q).double()
    w_prime = fused.rank_update.merged_weight(layer.base.weight, layer.P, layer.lam[:, None] * layer.Q, layer.scaling)
    torch.testing.assert_close(w_prime.double(), d.to(torch.bfloat16).double(), rtol=2**-8, atol=0)
    ref = x.double() @ w_prime.double().T + layer.base.bias.double()
    torch.testing.assert_close(y1.double(), ref, rtol=2**-7, atol=2**-7)
    assert g1.keys() == g0.keys() and all(torch.equal(g1[n], g0[n]) for n in g0)

    tiny = _layer(LoRALinear, torch.bfloat16, d_in=4, d_out=3, rank=1, bias=False)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.bfloat16)
    with torch.no_grad():
        tiny.base.weight.fill_(1.0)                        # bf16's last place at 1.0 is 2⁻⁷
        tiny.A.copy_(2**-5 * signs)
        tiny.B.fill_(2**-5 / tiny.scaling)                 # s B A = ±2⁻¹⁰ per entry
    xs = signs.expand(2, 4)                                # x W0ᵀ = 0, s x (B A)ᵀ = 4 · 2⁻¹⁰
    for mode, expected in (("epilogue", 2**-8), ("merge", 0.0)):
        tiny.fuse = mode
        ys = tiny(xs)
        assert torch.equal(ys, torch.full_like(ys, expected))   # W' = W0 after rounding: the change is lost
        ys.float().sum().backward()
        assert tiny.A.grad.abs().sum() > 0 and tiny.B.grad.abs().sum() > 0
        tiny.zero_grad()


@pytest.mark.parametrize("cls", [SVDLinear, LoRALinear])
def test_merge_under_autocast_rounds_w0_plus_the_update_to_bf16_once(cls):
    """fp32 weights under bf16 autocast, an update about 1% of W0: the merge path's W' is
    ``W0 + s · U (g ⊙ D)`` summed from the fp32 W0 and the factors as autocast casts them, and
    rounded to bf16 once (all but a few ties equal the float64 sum rounded). Casting W0 to bf16
    first, as autocast does for the other paths, or leaving autocast on for the sum, rounds
    twice: a quarter of the entries then differ."""
    layer = _layer(cls, torch.float32, d_in=64, d_out=48, rank=8)
    with torch.no_grad():
        for p in (layer.P, layer.Q) if cls is SVDLinear else (layer.A, layer.B):
            p.mul_(0.02)
    layer.fuse = "merge"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(5, 64))
    node = y.grad_fn if type(y.grad_fn).__name__ == "EpilogueLinearBackward" else y.grad_fn.next_functions[0][0]
    w_prime = node.saved_tensors[1]
    down, up = (layer.lam[:, None] * layer.Q, layer.P) if cls is SVDLinear else (layer.A, layer.B)
    update = layer.scaling * up.bfloat16().double() @ down.bfloat16().double()
    once = (layer.base.weight.double() + update).bfloat16()
    twice = (layer.base.weight.bfloat16().double() + update).bfloat16()
    assert w_prime.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    assert (w_prime != once).float().mean() < 0.01 and (twice != once).float().mean() > 0.1
