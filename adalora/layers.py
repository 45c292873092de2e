"""Adapter layers: ``SVDLinear`` (AdaLoRA, Eq. 3) and ``LoRALinear`` (Hu et al., 2021).

Both wrap a frozen linear map ``W0 (d_out, d_in)``: ``nn.Linear``, ``transformers``' ``Conv1D``
(weight stored transposed, ``(d_in, d_out)``) or a quantized base such as ``adalora.quant.NF4Linear``
(class attribute ``quantized = True``). Forward adds the low-rank update; nothing in ``forward``
changes ranks or adds losses: pruning is the allocator's explicit call.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import fused, gate_bank


def is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def is_quantized(module: nn.Module) -> bool:
    return bool(getattr(module, "quantized", False))


def is_adaptable(module: nn.Module) -> bool:
    """Layers an adapter can wrap (found by type, never by name)."""
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_quantized(module)


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the wrapped map."""
    if is_conv1d(base):
        d_in, d_out = base.weight.shape
        return d_out, d_in
    return base.out_features, base.in_features


def fast_param(module: nn.Module, name: str) -> torch.Tensor:
    """``getattr(module, name)`` for a parameter without going through ``nn.Module.__getattr__``,
    whose lookup the allocator would otherwise pay per adapter per step in host time; falls back
    for views that expose a property."""
    p = module._parameters.get(name)
    return p if p is not None else getattr(module, name)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """A copy of the 2-D ``t`` stored column-major (strides ``(1, rows)``): the layout of the
    ``(d_out, r)`` up factors, whose transpose the forward multiplies by. Always a copy, also of a
    ``t`` already column-major, so a new parameter never aliases the caller's tensor."""
    return t.t().clone(memory_format=torch.contiguous_format).t()


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` copied into ``param``'s memory layout. Gradients and optimizer state written by
    hand must match their parameter's strides: fused AdamW walks gradient, state and parameter
    as if they had one layout, so with a mismatch it silently updates the wrong elements on the
    CPU (torch 2.13), and on CUDA it can raise. The up factors ``P`` and ``B`` are stored
    column-major, so a plain ``torch.zeros(d_out, r)`` does not fit them. Autograd already gives
    gradients their parameter's layout."""
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(value)


def swap_in_optimizer(opt: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, src: torch.Tensor,
                      dim: int) -> None:
    """``new`` takes ``old``'s place in ``opt``'s groups. Each state tensor of ``old``'s shape
    (Adam's moments) continues along ``dim`` at the indices ``src`` (``(new.shape[dim],)``) names,
    starts at zero where ``src`` is -1 (a grown triplet), and takes ``new``'s layout."""
    for group in opt.param_groups:
        group["params"][:] = [new if p is old else p for p in group["params"]]
    state = opt.state.pop(old, None)
    if state is None:
        return
    src = src.to(new.device)
    fresh = (src < 0).view([-1 if d == dim else 1 for d in range(new.dim())])

    def moved(v):
        if not (torch.is_tensor(v) and v.shape == old.shape):
            return v
        return like_param(v.index_select(dim, src.clamp(min=0)).masked_fill_(fresh, 0), new)
    opt.state[new] = {k: moved(v) for k, v in state.items()}


def _base_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    if is_quantized(base):
        # fp32 adapters on a 4-bit base (as peft does): small updates of lam, and the zeros the
        # allocator writes into it, would round away in bf16.
        return next(base.buffers()).device, torch.float32
    return base.weight.device, base.weight.dtype


def _factor(attr: str, doc: str) -> property:
    """An adapter's factor ``attr``: its own parameter or, with flat gates or flat factors, a
    view of its rows of one of the model's bank parameters (adalora/gate_bank.py). Assigning an
    ``nn.Parameter`` registers it as usual."""
    def get(self) -> torch.Tensor:
        p = self._parameters.get(attr)
        return p if p is not None else gate_bank.factor_view(self, attr)
    return property(get, doc=doc)


class AdapterLayer(nn.Module):
    """Common wrapper: holds ``base`` frozen, adds ``scaling * delta(x)``, merges and unmerges.

    The base's own parameters keep their names in the state dict (``query.weight``, not
    ``query.base.weight``), so a checkpoint of the plain model loads into the adapted one.
    """

    def __init__(self, base: nn.Module, dropout: float = 0.0, fuse: str = "none"):
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"cannot wrap {type(base).__name__}: adapters wrap nn.Linear, Conv1D or NF4Linear")
        self.base = base
        self.out_features, self.in_features = base_shape(base)
        # No dropout kernel, and no module call, when it is off (the common case).
        self.drop = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        # one of fused.FUSE_MODES (adalora/fused.py); a plain attribute, changed with set_fuse.
        self.fuse = fused.check_fuse(fuse)
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    # Subclasses define ``rank``, ``scaling``, ``_down_weight()`` (the ``(r, d_in)`` factor, lam
    # folded in), ``_UP`` (the name of the ``(d_out, r)`` factor, stored column-major),
    # ``_delta_unscaled()`` (``(d_out, d_in)``) and ``_adapter_dtype()``; the fused path reads
    # ``_DOWN`` (the raw ``(r, d_in)`` factor) and ``_GATE`` (the ``(r,)`` gate, or none).
    _UP = ""
    _DOWN = ""
    _GATE = ""

    def _up(self) -> torch.Tensor:
        return fast_param(self, self._UP)

    # -- shared behaviour ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "none" if self.fuse == "none" else fused.path(self, x)
        if mode != "none":
            return fused.forward(self, x, mode)
        # A bf16 step is bound by how fast Python launches kernels, so this path adds no casts,
        # copies or module calls beyond the two products.
        y = self.base(x)
        if self.merged or self.rank == 0:
            return y
        if self.drop is not None:
            x = self.drop(x)
        dtype = self._adapter_dtype()
        x2 = x.reshape(-1, x.shape[-1])                                         # (N, d_in)
        if x2.dtype != dtype and not torch.is_autocast_enabled(x2.device.type):
            # e.g. bf16 activations into fp32 adapters on an NF4 base. Not under autocast: its mm
            # casts both operands to its dtype anyway, and a round trip through the adapter
            # dtype would copy x twice more (and its gradient twice) per adapter.
            x2 = x2.to(dtype)
        # hᵀ = W_down xᵀ is (r, N), and the up factor is stored column-major, so upᵀ is a row-major
        # (r, d_out): every operand of every product, backward included, then has a leading
        # dimension of N, d_in or d_out, never r. A bf16 row of r = 12 (AdaLoRA's usual r0) is
        # 24 bytes, off the 16-byte alignment that cuBLAS's fast kernels need (adalora/README.md).
        ht = torch.mm(self._down_weight(), x2.t())
        y2 = y.reshape(-1, y.shape[-1])                                         # (N, d_out)
        if ht.dtype == y.dtype:
            # y + s·h·upᵀ as one GEMM that adds into y in its epilogue; its backward scales the
            # r-wide products, not the (N, d_out) gradient.
            return torch.addmm(y2, ht.t(), self._up().t(), alpha=self.scaling).view(y.shape)
        return torch.add(y2, torch.mm(ht.t(), self._up().t()).to(y.dtype), alpha=self.scaling).view(y.shape)

    @torch.no_grad()
    def set_factors(self, **factors: torch.Tensor) -> None:
        """Replace factors by name (``P=..., lam=..., Q=...`` or ``A=..., B=...``), possibly of
        another rank: new ``nn.Parameter`` objects in the old ones' device, dtype and
        ``requires_grad``, the up factor (``_UP``) stored column-major; a banked factor (flat gates
        or flat factors) gets a new bank parameter on the model instead. An optimizer holding the
        old parameters must be told (``RankAllocator.compact`` does that). The factors, new and
        kept, must make one rank-r update of this layer; a new rank keeps every value
        (``rank_mask`` all true). A merged layer refuses: ``unmerge`` would subtract another ΔW."""
        cls, names = type(self).__name__, [a for a in (self._UP, self._GATE, self._DOWN) if a]
        unknown = [n for n in factors if n not in self._parameters and gate_bank.bank_of(self, n) is None]
        if unknown:                                    # before any factor changes
            raise ValueError(f"{cls}.set_factors({unknown[0]}=...): no such factor; name one of {', '.join(names)}")
        if self.merged:
            raise ValueError(f"{cls}.set_factors: the layer is merged into its base; unmerge it first "
                             "(adalora.unmerge(model))")
        shapes = {n: tuple(factors[n].shape if n in factors else getattr(self, n).shape) for n in names}
        r = shapes[self._DOWN][0] if len(shapes[self._DOWN]) == 2 else -1
        want = {self._UP: (self.out_features, r), self._GATE: (r,), self._DOWN: (r, self.in_features)}
        if any(shapes[n] != want[n] for n in names):
            gate = f"{self._GATE} (r,), " if self._GATE else ""
            raise ValueError(f"{cls}.set_factors: {', '.join(f'{n} {shapes[n]}' for n in names)} do not make a "
                             f"rank-r update of this ({self.out_features}, {self.in_features}) layer: want "
                             f"{self._UP} ({self.out_features}, r), {gate}{self._DOWN} (r, {self.in_features})")
        for name, value in factors.items():
            self._replace(name, value)
        mask = self._buffers.get("rank_mask")
        if mask is not None and mask.numel() != r:
            self.rank_mask = torch.ones(r, dtype=torch.bool, device=mask.device)

    def _replace(self, name: str, value: torch.Tensor) -> None:
        """One factor replaced, unchecked (``set_factors``; a rank change replaces them in turn)."""
        if name not in self._parameters:
            self._set_banked(name, value)              # flat parameters: a new bank
            return
        old = self._parameters[name]
        value = value.to(device=old.device, dtype=old.dtype)
        value = column_major(value) if name == self._UP else value.clone()   # never the caller's memory
        setattr(self, name, nn.Parameter(value, requires_grad=old.requires_grad))

    def _set_banked(self, attr: str, value: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """A banked ``attr`` replaced by ``value`` (``src``: the old rank-one term each new one
        continues, -1 for none; see ``Bank.set``)."""
        bank, k = gate_bank.bank_entry(self, attr)
        bank.set(k, value, src)

    def delta_weight(self) -> torch.Tensor:
        """``scale * ΔW`` as a dense ``(d_out, d_in)`` matrix in the adapter dtype."""
        return self.scaling * self._delta_unscaled()

    def _check_mergeable(self) -> None:
        if is_quantized(self.base):
            raise ValueError("cannot merge into a quantized (NF4) base: dequantize the model first, "
                             "or serve the adapters unmerged")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``W0``: zero added inference latency."""
        self._check_mergeable()
        if self.merged:
            return
        w = self.base.weight
        d = self.delta_weight().to(w.dtype)
        w.add_(d.T if is_conv1d(self.base) else d)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the same update again (exact up to the weight dtype's round-off)."""
        if not self.merged:
            return
        w = self.base.weight
        d = self.delta_weight().to(w.dtype)
        w.sub_(d.T if is_conv1d(self.base) else d)
        self.merged = False

    def _apply(self, fn, recurse=True):
        # .to() and friends give base.weight new memory: drop the fused stack now rather than
        # hold the old copy until the next forward notices.
        self.__dict__.pop("_fused_stack", None)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}"


def _strip_base_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "base."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_base_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    own = {"P", "lam", "Q", "rank_mask", "A", "B"}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".")[0] not in own and not rest.startswith("base."):
            state_dict[prefix + "base." + rest] = state_dict.pop(key)


class SVDLinear(AdapterLayer):
    """AdaLoRA adapter: ``y = x W0ᵀ + b + (α / r0) · drop(x) (diag(lam) Q)ᵀ Pᵀ`` (= P Λ Q, Eq. 3).

    ``P (d_out, r)`` (stored column-major), ``lam (r,)``, ``Q (r, d_in)``; ``r`` starts at ``r0``
    and only shrinks through ``resize`` (after the final allocation, or when loading a pruned
    adapter).
    The scale divides by the *initial* rank and never changes, as in the reference code: the
    kept triplets' contribution does not jump when others are pruned or the adapter is compacted.
    """

    _UP, _DOWN, _GATE = "P", "Q", "lam"

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, init_std: float = 0.02,
                 fuse: str = "none"):
        super().__init__(base, dropout, fuse)
        device, dtype = _base_device_dtype(base)
        self.r0 = rank
        self.scaling = alpha / rank if rank > 0 else 0.0
        p = torch.randn(self.out_features, rank, device=device, dtype=dtype) * init_std
        self.P = nn.Parameter(column_major(p))           # the same draw as a row-major P
        self.lam = nn.Parameter(torch.zeros(rank, device=device, dtype=dtype))
        self.Q = nn.Parameter(torch.randn(rank, self.in_features, device=device, dtype=dtype) * init_std)
        self.register_buffer("rank_mask", torch.ones(rank, dtype=torch.bool, device=device))

    P = _factor("P", "The up factor ``(d_out, r)``, column-major.")
    lam = _factor("lam", "The gate ``(r,)``.")
    Q = _factor("Q", "The down factor ``(r, d_in)``.")

    @property
    def rank(self) -> int:
        p = self._parameters.get("lam")             # read every step by the allocator: no view
        return p.shape[0] if p is not None else gate_bank.bank_size(self, "lam")

    def _adapter_dtype(self) -> torch.dtype:
        return gate_bank.gate_param(self).dtype

    def _change_rank(self, values: dict, src: torch.Tensor, optimizer=None) -> None:
        """``P``, ``lam``, ``Q`` replaced by ``values`` whose triplets continue the old ones at
        ``src`` (-1: a new triplet); with ``optimizer``, each new leaf (own or bank) takes its old
        one's place and its state moves along the triplets (``swap_in_optimizer``)."""
        old = {attr: gate_bank.leaf(self, attr) for attr in values}
        for attr, value in values.items():
            if attr in self._parameters:
                self._replace(attr, value)
            else:
                self._set_banked(attr, value, src)
        if optimizer is None:
            return
        for attr in values:
            bank = gate_bank.bank_of(self, attr)
            if bank is not None:        # the bank's row map, not the triplets'
                swap_in_optimizer(optimizer, old[attr], bank.param, bank.src, 0)
            else:
                swap_in_optimizer(optimizer, old[attr], self._parameters[attr], src, 1 if attr == "P" else 0)

    def _down_weight(self):
        # lam scales the rows of Q (r, d_in), not the activations (r, N): the same product, with
        # the elementwise work and lam's gradient reduction on the small weight instead of on
        # batch x sequence columns.
        return self.Q * self.lam.unsqueeze(1)

    def _delta_unscaled(self):
        return (self.P * self.lam) @ self.Q

    @torch.no_grad()
    def resize(self, keep: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Keep only the singular values at indices ``keep`` (physically shrinks P, lam, Q).

        Creates new ``nn.Parameter`` objects (or banks): with ``optimizer`` they take the old ones'
        places and its state is sliced to match (``RankAllocator.compact`` passes it); without,
        an optimizer must be told. ``scaling`` stays ``α / r0``.
        """
        keep = keep.to(self.rank_mask.device)
        self._change_rank({"P": self.P[:, keep], "lam": self.lam[keep], "Q": self.Q[keep, :]}, keep.cpu(), optimizer)
        self.rank_mask = self.rank_mask[keep].clone()

    @torch.no_grad()
    def expand(self, n: int, optimizer: torch.optim.Optimizer | None = None, init_std: float = 0.02,
               generator: torch.Generator | None = None) -> None:
        """Append ``n`` singular triplets (the inverse of ``resize``/``compact``): new ``P`` columns
        and ``Q`` rows ~ N(0, init_std²), ``lam = 0`` (so ``ΔW`` is unchanged), kept in ``rank_mask``.

        With ``optimizer`` the new parameters take the old ones' places in its groups and every
        state tensor of the parameter's shape (Adam's ``exp_avg``, ``exp_avg_sq``) is zero-padded,
        so old coordinates train on as before and new ones start from fresh moments.
        ``scaling`` stays ``α / r0``.
        """
        if n <= 0:
            return
        dev, dt = self.P.device, self.P.dtype
        p_new = torch.randn(self.out_features, n, generator=generator, dtype=dt).to(dev) * init_std
        q_new = torch.randn(n, self.in_features, generator=generator, dtype=dt).to(dev) * init_std
        grown = torch.cat([torch.arange(self.rank), torch.full((n,), -1)])   # old index per element, -1 new
        self._change_rank({"P": torch.cat([self.P, p_new], 1), "lam": torch.cat([self.lam, self.lam.new_zeros(n)]),
                           "Q": torch.cat([self.Q, q_new], 0)}, grown, optimizer)
        self.rank_mask = torch.cat([self.rank_mask, self.rank_mask.new_ones(n)])


class LoRALinear(AdapterLayer):
    """LoRA adapter: ``y = x W0ᵀ + b + (α / r) · (drop(x) Aᵀ) Bᵀ``; rsLoRA uses ``α / √r``.

    ``A (r, d_in)`` Kaiming-uniform (as loralib and peft), ``B (d_out, r)`` zero (stored
    column-major), so ΔW = 0 at init.
    """

    _UP, _DOWN, _GATE = "B", "A", ""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 fuse: str = "none"):
        super().__init__(base, dropout, fuse)
        device, dtype = _base_device_dtype(base)
        self.scaling = (alpha / math.sqrt(rank) if rslora else alpha / rank) if rank > 0 else 0.0
        self.A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(column_major(torch.zeros(self.out_features, rank, device=device, dtype=dtype)))
        if rank > 0:
            nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    A = _factor("A", "The down factor ``(r, d_in)``.")
    B = _factor("B", "The up factor ``(d_out, r)``, column-major.")

    @property
    def rank(self) -> int:
        p = self._parameters.get("A")
        return p.shape[0] if p is not None else gate_bank.bank_size(self, "A")

    def _adapter_dtype(self) -> torch.dtype:
        return gate_bank.leaf(self, "A").dtype

    def _down_weight(self):
        return self.A

    def _delta_unscaled(self):
        return self.B @ self.A
