"""NF4 quantized frozen base weights (QLoRA, Dettmers et al. 2023), in plain PyTorch.

QLoRA stores the frozen base in 4-bit NormalFloat (NF4): each block of 64 weights is divided by
its absolute maximum and every value is replaced by the nearest of 16 code values that are
quantiles of N(0, 1). The fp32 block scales are themselves quantized ("double quantization",
8 bit, blocks of 256). Compute happens in the compute dtype (bf16 by default) after
dequantization, so only the adapters carry full-precision trainable parameters:
Y = X · doubleDequant(c1, c2, W_NF4)ᵀ + adapter(X)  (QLoRA eq. 6).

The storage format is bitsandbytes' NF4, so that its packed bytes and block scales are
reproduced exactly: the same code books, nearest-code rounding by midpoints, high nibble first
packing, mean-centred absmax quantized with the dynamic 8-bit map. No CUDA kernels: the weight
is dequantized in full for each matmul, which costs memory for one layer at a time.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The published NF4 table: bitsandbytes' `get_4bit_type("nf4")`, which equals
# `create_normal_map(offset=0.9677083, use_extra_value=True)` (QLoRA appendix E).
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_TINY = 1e-38  # bitsandbytes clamps absmax so an all-zero block maps to code 0.0, not NaN


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> Tensor:
    """Recompute the NF4 code book (QLoRA sec. 3): 8 positive and 7 negative quantiles of
    N(0, 1), an exact zero, normalised to [-1, 1]. Mirrors bitsandbytes' `create_normal_map`
    (which uses scipy); `torch.special.ndtri` is the same inverse normal CDF."""
    ppf = lambda p: torch.special.ndtri(p.double())
    if use_extra_value:  # asymmetric: one more positive value, so 0 is exactly representable
        pos = ppf(torch.linspace(offset, 0.5, 9)[:-1])
        neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    else:
        pos = ppf(torch.linspace(offset, 0.5, 8)[:-1])
        neg = -ppf(torch.linspace(offset, 0.5, 8)[:-1])
    values = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (values / values.max()).float()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """The 8-bit dynamic tree map (Dettmers 2016) that bitsandbytes uses for the second-level
    quantization of the block scales; ported from bitsandbytes' `create_dynamic_map` (256 sorted values)."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed \
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, int(items))
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10 ** (-(max_exponent_bits - 1) + i)
        data += means.tolist() + ((-means).tolist() if signed else [])
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * 10 ** (-(max_exponent_bits - 1) + i)
        data += means.tolist() + ((-means).tolist() if signed else [])
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _code(name: str, device: torch.device) -> Tensor:
    """The code table on ``device``, built once: every dequantization reads it, and a fresh
    host-to-device copy per call costs eager steps host time and cannot run in a captured CUDA
    graph. Read-only: callers index it and never write to it."""
    table = torch.tensor(NF4_TABLE) if name == "nf4" else create_dynamic_map()
    return table.to(device)


def _nearest(scaled: Tensor, code: Tensor) -> Tensor:
    """Index of the nearest code value (bucketize on the midpoints between codes); a value exactly
    on a midpoint takes the lower code."""
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _blockwise(x: Tensor, block: int, code: Tensor) -> tuple[Tensor, Tensor]:
    """Absmax quantization of a flat fp32 tensor in blocks: (codes (padded numel,), absmax (blocks,)).
    Zero padding leaves every block's absmax unchanged, so padded and cropped results agree."""
    x = F.pad(x, (0, -x.numel() % block)).view(-1, block)
    absmax = x.abs().amax(dim=1)
    scaled = (x * (1.0 / absmax.clamp(min=_TINY))[:, None]).clamp(-1, 1)
    return _nearest(scaled.reshape(-1), code), absmax


def pack_4bit(codes: Tensor) -> Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (bitsandbytes order)."""
    codes = F.pad(codes.reshape(-1), (0, codes.numel() % 2))
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: Tensor) -> Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


@dataclass
class NF4Tensor:
    """A weight in NF4. `packed` (ceil(n/2),) uint8; `absmax` (n_blocks,) fp32 scales, or uint8
    codes of (absmax - offset) when double-quantized, with `absmax2` (ceil(n_blocks/256),) fp32
    and the scalar fp32 `offset`."""
    packed: Tensor
    absmax: Tensor
    absmax2: Tensor | None
    offset: Tensor | None
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    dq_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def numel(self) -> int:
        return self.shape.numel()

    def nbytes(self) -> int:
        """Bytes of storage (code books excluded: they are constants shared by every layer)."""
        parts = (self.packed, self.absmax, self.absmax2, self.offset)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    def scales(self) -> Tensor:
        """The fp32 block scales c2, double-dequantized if needed: (n_blocks,)."""
        if not self.double_quant:
            return self.absmax
        dyn = _code("dynamic", self.absmax.device)
        scale2 = self.absmax2.repeat_interleave(self.dq_block_size)[: self.absmax.numel()]
        return dyn[self.absmax.int()] * scale2 + self.offset


def quantize_nf4(weight: Tensor, block_size: int = 64, double_quant: bool = True,
                 dq_block_size: int = 256) -> NF4Tensor:
    """Block-wise absmax NF4 quantization (QLoRA sec. 3), optionally double-quantizing the scales."""
    if block_size % 2:
        raise ValueError(f"block_size must be even so blocks fill whole bytes, got {block_size}")
    w = weight.detach().reshape(-1).float()
    codes, absmax = _blockwise(w, block_size, _code("nf4", w.device))
    absmax2 = offset = None
    if double_quant:
        # Centre first: absmax values are all positive, so the signed 8-bit map would waste its
        # negative half otherwise (QLoRA sec. 3, "Double Quantization"; bitsandbytes does the same).
        offset = absmax.mean()
        qabs, absmax2 = _blockwise(absmax - offset, dq_block_size, _code("dynamic", w.device))
        absmax = qabs[: absmax.numel()]
    # Keep the odd pad nibble as the code of 0.0, as bitsandbytes does, so packed bytes match it.
    return NF4Tensor(pack_4bit(codes[: w.numel() + w.numel() % 2]), absmax, absmax2, offset,
                     torch.Size(weight.shape), weight.dtype, block_size, dq_block_size)


def dequantize(t: NF4Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """NF4 codes * block scales, computed in fp32 (as bitsandbytes does), cast to `dtype`."""
    n = t.numel()
    codes = unpack_4bit(t.packed)[:n]
    codes = F.pad(codes, (0, -n % t.block_size)).view(-1, t.block_size)
    w = _code("nf4", codes.device)[codes.int()] * t.scales()[:, None]
    return w.reshape(-1)[:n].reshape(t.shape).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantized on the fly. Backward dequantizes again instead of saving W,
    so no full-precision weight outlives the call; the frozen W gets no gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: "NF4Linear") -> Tensor:
        ctx.layer = layer
        return F.linear(x, dequantize(layer.qweight, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = dequantize(ctx.layer.qweight, grad_out.dtype)
        return grad_out @ w, None  # dL/dx = dL/dy · W : (..., d_out) @ (d_out, d_in)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (registered buffers, so `.to()`,
    `state_dict` and device moves work). There is deliberately no `.weight`: adapters cannot
    merge into a quantized base, and code that silently reads one would get garbage."""
    quantized = True

    def __init__(self, qweight: NF4Tensor, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (d_out, d_in), got {tuple(qweight.shape)}")
        if compute_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, got {compute_dtype}")
        self.out_features, self.in_features = qweight.shape
        self.compute_dtype = compute_dtype
        self.block_size, self.dq_block_size = qweight.block_size, qweight.dq_block_size
        self.orig_dtype = qweight.dtype
        self.register_buffer("packed", qweight.packed)
        self.register_buffer("absmax", qweight.absmax)
        self.register_buffer("absmax2", qweight.absmax2)
        self.register_buffer("absmax_offset", qweight.offset)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        q = quantize_nf4(linear.weight, block_size, double_quant)
        return cls(q, linear.bias, compute_dtype)

    @property
    def qweight(self) -> NF4Tensor:
        """A view of the buffers as an NF4Tensor (no copy; follows `.to(device)`)."""
        return NF4Tensor(self.packed, self.absmax, self.absmax2, self.absmax_offset,
                         torch.Size((self.out_features, self.in_features)), self.orig_dtype,
                         self.block_size, self.dq_block_size)

    def _apply(self, fn, recurse=True):
        # `.to(torch.bfloat16)` / `.half()` would cast every floating buffer; the fp32 scales
        # are part of the format (QLoRA keeps c2 and the DQ constants in fp32), so a dtype cast
        # of the model may move them to another device but never round them.
        scales = {n: getattr(self, n) for n in ("absmax", "absmax2", "absmax_offset")}
        super()._apply(fn, recurse)
        for n, old in scales.items():
            if old is not None and getattr(self, n).dtype != old.dtype:
                setattr(self, n, old.to(getattr(self, n).device))
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """A fresh full-precision copy of W (d_out, d_in), for inspection and tests."""
        return dequantize(self.qweight, dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, "
                f"block_size={self.block_size}, double_quant={self.absmax2 is not None}")


def _matches(name: str, suffixes) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def quantize_model(model: nn.Module, targets=None, skip=(), compute_dtype: torch.dtype = torch.bfloat16,
                   block_size: int = 64, double_quant: bool = True) -> list[str]:
    """Replace `nn.Linear`s in place by NF4Linear and return the dotted names replaced.
    `targets`: name suffixes as in `adalora.inject` (None = every Linear); `skip`: suffixes to
    keep in full precision (e.g. a classifier head). Call this before `inject`."""
    if isinstance(targets, str) or isinstance(skip, str):
        raise TypeError("targets and skip are lists of name suffixes, e.g. ['query', 'value']")
    chosen = []
    for name, module in model.named_modules():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # nn.MultiheadAttention reads out_proj.weight directly, so its Linear cannot be replaced.
        if not isinstance(module, nn.Linear) or isinstance(parent, nn.MultiheadAttention):
            continue
        if (targets is None or _matches(name, targets)) and not _matches(name, skip):
            chosen.append((name, parent, child, module))
    unused = [t for t in (targets or ()) if not any(_matches(n, [t]) for n, *_ in chosen)]
    if unused:  # a typo would otherwise leave the model silently in full precision
        raise ValueError(f"quantize_model targets {unused} matched no nn.Linear; use dotted-name suffixes")
    for name, parent, child, linear in chosen:
        setattr(parent, child, NF4Linear.from_linear(linear, compute_dtype, block_size, double_quant))
        linear.weight = None  # drop the full-precision copy even if someone still holds the old module
    return [name for name, *_ in chosen]
