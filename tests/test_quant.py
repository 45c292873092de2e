"""NF4 (QLoRA) quantization against references: the published table, scipy, a hand-written
absmax int4 quantizer, hand byte counts, dense F.linear, and bitsandbytes where installed."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adalora.quant import (NF4_TABLE, NF4Linear, create_dynamic_map, create_normal_map, dequantize,
                           pack_4bit, quantize_model, quantize_nf4, unpack_4bit)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TABLE = torch.tensor(NF4_TABLE, dtype=torch.float64)
MAX_HALF_GAP = float((TABLE[1:] - TABLE[:-1]).max() / 2)  # worst NF4 rounding, in units of absmax


def block_absmax(w, block=64):
    """Per-element absmax of its block (zero padding leaves every block's absmax unchanged)."""
    flat = F.pad(w.reshape(-1).float(), (0, -w.numel() % block)).view(-1, block)
    return flat.abs().amax(1).repeat_interleave(block)[: w.numel()].view(w.shape)


def int4_absmax_roundtrip(w, block=64):
    """Reference: symmetric absmax int4 (levels -7..7) on the same blocks, QLoRA's Int4 baseline."""
    flat = F.pad(w.reshape(-1).float(), (0, -w.numel() % block)).view(-1, block)
    scale = flat.abs().amax(1, keepdim=True) / 7
    return (torch.round(flat / scale).clamp(-7, 7) * scale).reshape(-1)[: w.numel()].view(w.shape)


def test_code_book_equals_published_table_and_scipy():
    norm = pytest.importorskip("scipy.stats", reason="scipy (analysis extra) recomputes the quantiles").norm
    # bitsandbytes' create_normal_map, verbatim in scipy: 8 positive, 7 negative quantiles, one zero.
    pos = norm.ppf(torch.linspace(0.9677083, 0.5, 9)[:-1].numpy()).tolist()
    neg = (-norm.ppf(torch.linspace(0.9677083, 0.5, 8)[:-1].numpy())).tolist()
    ref = torch.tensor(sorted(pos + [0.0] + neg), dtype=torch.float64)
    ref /= ref.max()
    ours = create_normal_map().double()
    assert torch.allclose(ours, TABLE, rtol=0, atol=1e-7)
    assert torch.allclose(ref, TABLE, rtol=0, atol=1e-7)
    assert (TABLE < 0).sum() == 7 and (TABLE > 0).sum() == 8 and TABLE[7] == 0 and TABLE.abs().max() == 1


def test_code_book_from_normal_quantiles_outside_torch():
    """QLoRA's construction written out in float64 without torch: 8 positive quantiles
    ppf(linspace(0.9677083, 0.5, 9))[:-1], 7 negative -ppf(linspace(0.9677083, 0.5, 8))[:-1] and 0,
    divided by the largest. The inverse normal CDF comes from the standard library (always there)
    and from scipy (the analysis extra) when it is installed. The published table was computed
    from float32 probabilities and is stored in float32: measured, it differs from this float64
    construction by at most 1.08e-7 (the value 0.7229568), so the bound is 1.5e-7, not 1e-7."""
    from statistics import NormalDist
    ppfs = {"statistics": NormalDist().inv_cdf}
    try:
        from scipy.stats import norm
        ppfs["scipy"] = lambda p: float(norm.ppf(p))
    except ImportError:          # the standard library's quantiles still check the table
        pass

    def linspace(a, b, n):
        return [a + (b - a) * i / (n - 1) for i in range(n)]
    for name, ppf in ppfs.items():
        pos = [ppf(p) for p in linspace(0.9677083, 0.5, 9)[:-1]]
        neg = [-ppf(p) for p in linspace(0.9677083, 0.5, 8)[:-1]]
        values = sorted(pos + [0.0] + neg)
        ref = torch.tensor([v / values[-1] for v in values], dtype=torch.float64)
        assert len(values) == 16 and values[7] == 0.0, name
        assert torch.allclose(ref, TABLE, rtol=0, atol=1.5e-7), (name, (ref - TABLE).abs().max())
        assert torch.allclose(ref, create_normal_map().double(), rtol=0, atol=1.5e-7), name


def test_dynamic_map_shape():
    code = create_dynamic_map()
    assert code.numel() == 256 and torch.all(code[1:] >= code[:-1])
    assert code.max() == 1 and (code == 0).any() and code.min() > -1  # signed, asymmetric like bnb


@pytest.mark.parametrize("n", [2, 7, 64, 1001])
def test_pack_unpack_lossless(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_4bit(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_4bit(packed)[:n], codes)
    assert packed[0] == (codes[0] << 4) | codes[1]  # high nibble first, the bitsandbytes order


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_error_no_worse_than_int4_absmax(double_quant):
    w = torch.randn(256, 320, generator=torch.Generator().manual_seed(0))
    nf4 = dequantize(quantize_nf4(w, double_quant=double_quant), torch.float32)
    mae_nf4, mae_int4 = (nf4 - w).abs().mean(), (int4_absmax_roundtrip(w) - w).abs().mean()
    assert mae_nf4 <= mae_int4, (mae_nf4, mae_int4)


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (65, 3), (64,), (3, 5, 7)])
def test_odd_shapes_round_trip(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    t = quantize_nf4(w, double_quant=False)
    out = dequantize(t, torch.float32)
    assert out.shape == w.shape and t.shape == w.shape
    assert torch.all((out - w).abs() <= MAX_HALF_GAP * block_absmax(w) + 1e-6)
    # The element holding its block's absmax is reproduced exactly (code ±1 times the scale).
    assert torch.allclose(out.reshape(-1)[w.abs().reshape(-1).argmax()], w.reshape(-1)[w.abs().argmax()])


def test_zero_block_and_dtypes():
    w = torch.zeros(2, 64, dtype=torch.bfloat16)
    w[1] = torch.linspace(-2, 2, 64)
    t = quantize_nf4(w)
    out = dequantize(t, torch.float16)
    assert out.dtype == torch.float16 and torch.all(out[0] == 0) and torch.isfinite(out).all()
    assert t.dtype == torch.bfloat16


def test_double_quant_scales_close_to_fp32():
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(2))
    exact = quantize_nf4(w, double_quant=False).absmax
    dq = quantize_nf4(w, double_quant=True)
    assert dq.absmax.dtype == torch.uint8 and dq.absmax2.numel() == exact.numel() // 256
    # The dynamic map's finest gaps near ±1 are 0.9/64, so one rounding is <= 0.9/128 of the
    # 256-block's absmax of (absmax - mean); coarser codes only occur for smaller values.
    err = (dq.scales() - exact).abs()
    assert err.max() <= 0.9 / 128 * (exact - exact.mean()).abs().max() + 1e-6
    assert (err / exact).mean() < 2e-3


def test_bytes_per_parameter_by_hand():
    n = 1024 * 1024
    w = torch.randn(1024, 1024)
    # 4 bit codes + one uint8 scale per 64 weights + one fp32 per 256 scales + the fp32 mean.
    by_hand_dq = n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    by_hand_fp32 = n // 2 + 4 * (n // 64)
    dq, plain = quantize_nf4(w), quantize_nf4(w, double_quant=False)
    assert dq.nbytes() == by_hand_dq and plain.nbytes() == by_hand_fp32
    assert dq.nbytes() / n < 0.53 and abs(dq.nbytes() / n - (0.5 + 0.127 / 8)) < 1e-3  # QLoRA: 0.127 bit
    assert plain.nbytes() / n == 0.5625  # 0.5 bit of fp32 scale per weight without double quant


def _pair(compute_dtype, device="cpu", bias=True):
    torch.manual_seed(3)
    lin = nn.Linear(100, 37, bias=bias).to(device)
    return lin, NF4Linear.from_linear(lin, compute_dtype=compute_dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_nf4linear_forward_equals_dense(device, compute_dtype):
    lin, q = _pair(compute_dtype, device)
    x = torch.randn(4, 5, 100, device=device)
    w = q.dequantized_weight(compute_dtype)
    ref = F.linear(x.to(compute_dtype), w, lin.bias.to(compute_dtype)).to(x.dtype)
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (4, 5, 37)
    assert torch.allclose(y, ref, atol=1e-5 if compute_dtype == torch.float32 else 2e-2)
    assert next(q.buffers()).device.type == device
    # And close to the unquantized layer: NF4 error is ~0.1 of the typical weight magnitude.
    assert (y - lin(x)).abs().mean() < 0.15 * lin(x).abs().mean()


def test_nf4linear_backward_no_weight_grad_and_nothing_dense_saved():
    lin, q = _pair(torch.float32)
    assert not hasattr(q, "weight") and q.quantized and not q.bias.requires_grad
    x = torch.randn(6, 100, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = q(x)
    assert all(s != torch.Size((37, 100)) for s in saved), "a dense weight was saved for backward"
    g = torch.randn_like(y)
    y.backward(g)
    F.linear(x_ref, q.dequantized_weight(torch.float32), q.bias).backward(g)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert all(b.grad is None for b in q.buffers()) and q.bias.grad is None
    assert sum(p.numel() for p in q.parameters() if p.requires_grad) == 0


def test_state_dict_round_trip():
    _, q = _pair(torch.float32)
    other = NF4Linear.from_linear(nn.Linear(100, 37), compute_dtype=torch.float32)
    assert set(q.state_dict()) == {"packed", "absmax", "absmax2", "absmax_offset", "bias"}
    other.load_state_dict(q.state_dict())
    x = torch.randn(3, 100)
    assert torch.equal(other(x), q(x))


def test_dtype_cast_keeps_fp32_scales():
    for dq in (False, True):
        q = NF4Linear.from_linear(nn.Linear(100, 37), double_quant=dq)
        w = q.dequantized_weight(torch.float32)
        q.to(torch.float16)
        assert q.bias.dtype == torch.float16 and torch.equal(q.dequantized_weight(torch.float32), w)


def test_quantize_model_replaces_exactly_the_targets():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.value, self.dense = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2)

    model = nn.Sequential()
    model.add_module("layer", nn.ModuleList([Block(), Block()]))
    model.add_module("classifier", nn.Linear(8, 2))
    old = model.layer[0].query
    names = quantize_model(model, targets=["query", "value"], skip=["layer.1.value"])
    assert names == ["layer.0.query", "layer.0.value", "layer.1.query"]
    replaced = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert replaced == set(names) and old.weight is None  # full-precision copy freed
    rest = quantize_model(model, skip=["classifier"])
    assert rest == ["layer.0.dense", "layer.1.value", "layer.1.dense"]  # MHA out_proj left alone
    assert isinstance(model.classifier, nn.Linear)
    with pytest.raises(ValueError, match="matched no"):
        quantize_model(model, targets=["qurey"])


def test_matches_bitsandbytes_nf4():
    bnbf = pytest.importorskip("bitsandbytes.functional",
                               reason="bitsandbytes is optional; it runs on CPU since 0.45 when installed")
    w = torch.randn(65, 197, generator=torch.Generator().manual_seed(4))
    for dq in (False, True):
        ours = quantize_nf4(w, double_quant=dq)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        ref = bnbf.dequantize_4bit(packed, state).float()
        out = dequantize(ours, torch.float32)
        # Within one code step of bnb's round trip (in practice the bytes are identical).
        step = torch.tensor(NF4_TABLE).diff().max() * block_absmax(w)
        assert torch.all((out - ref).abs() <= step)
        assert torch.equal(ours.packed, packed.reshape(-1)) and torch.equal(ours.absmax, state.absmax)


def _toy(seed=5):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("query", nn.Linear(16, 16))
    model.add_module("act", nn.Tanh())
    model.add_module("out", nn.Linear(16, 1))
    quantize_model(model, targets=["query", "out"], compute_dtype=torch.float32)
    return model


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_adapters_train_on_nf4_base_and_merge_is_refused(method, tmp_path):
    import adalora

    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(6))
    y = torch.tanh(x[:, :4]).sum(1, keepdim=True)
    model = _toy()
    before = model.query.packed.clone()
    cfg = adalora.AdapterConfig(method=method, targets=["query", "out"], init_rank=4, alpha=8.0)
    adapters = adalora.inject(model, cfg)
    adalora.mark_only_adapters_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(isinstance(a.base, NF4Linear) for a in adapters.values())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])
    assert torch.equal(adapters["query"].base.packed, before)  # the NF4 base stayed frozen
    with pytest.raises(ValueError, match="quantized"):
        adalora.merge(model)
    # Adapters save and load as usual onto a freshly quantized copy of the same base.
    adalora.save_adapters(tmp_path / "adapters.safetensors", model)
    fresh = _toy()
    adalora.inject(fresh, cfg)
    adalora.load_adapters(tmp_path / "adapters.safetensors", fresh)
    assert torch.equal(fresh(x), model(x))
