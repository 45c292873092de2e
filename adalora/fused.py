"""The fused adapter paths: the adapter's products joined to the frozen one, backward by hand.

For a frozen ``nn.Linear`` ``W0 (d_out, d_in)``, bias ``b``, and an adapter with down factor
``D (r, d_in)`` (``Q`` or ``A``), gate ``g (r,)`` (``lam``; none for LoRA), up factor
``U (d_out, r)`` (``P`` or ``B``, stored column-major) and scale ``s``, with ``G = dL/dout``:

``"epilogue"`` keeps the products apart but adds the adapter's share into the frozen product's
output and input gradient in place, in one pass over each (adalora/rank_update.py: a Triton
kernel for fp16 and bf16 CUDA tensors in a captured CUDA graph, ``addmm_`` elsewhere):

    y   = x W0ᵀ + b,   hᵀ = (g ⊙ D) xᵀ   (r, N),   y += s · h Uᵀ       (in place into y)
    dx  = G W0,        dx += s · (G U) (g ⊙ D)                         (in place into dx)
    d(g ⊙ D) = s · (G U)ᵀ x,   dU = s · Gᵀ h

Autograd's version of the same maps (``"none"``) writes ``y + s·h Uᵀ`` to new memory (a copy of
y) and the two shares of ``dx`` apart, then adds them: three passes over ``(N, d)`` tensors
per adapter that this path does not make. In a captured CUDA graph its thin products (``hᵀ``;
``(G U)ᵀ``, ``d(g ⊙ D)``, ``dU``) run on side streams beside the frozen GEMM (adalora/side_stream.py).

``"stack"`` also shares the read of x: one GEMM against ``[W0; D]``,

    z   = x [W0; D]ᵀ + [b; 0]             one GEMM, (N, d_out + r')   x read once
    out = z[:, :d_out] + s · u (U ⊙ g)ᵀ   u = z[:, d_out:d_out + r], added in the GEMM's epilogue

and by hand, with ``t = s · G U``:

    du = t ⊙ g,   dD = duᵀ x,   dx = G W0 + du D   (one in-place addmm_ into G W0)
    dU = s · Gᵀ (u ⊙ g),   dg = Σ_N t ⊙ u

Its output is a strided view of z, which slows the elementwise kernels after it.

``"merge"`` multiplies x by the merged weight instead, formed per step from the factors:

    W' = W0 + s · U (g ⊙ D)               (d_out, d_in), one addmm: W0 read, W' written
    y  = x W'ᵀ + b,   hᵀ = (g ⊙ D) xᵀ      (hᵀ only for dU, on the side stream when captured)
    dx = G W'                             no pass over dx for the adapter's share
    d(g ⊙ D) = s · (G U)ᵀ x,   dU = s · Gᵀ h   as on the epilogue path

Forming W' reads and writes ``d_out · d_in`` elements where the epilogue path's two in-place
passes read and write ``N · (d_out + d_in)`` twice: fewer bytes whenever the tokens of a step
outnumber the widths, as they do in training. W' is kept for backward (one more weight per
adapter in memory). W' is rounded to the product's dtype, once (``rank_update.merged_weight``).

``"triton"`` computes the epilogue path's maps with the rank-r term inside the frozen GEMMs
(adalora/lowrank_gemm.py): ``y`` and ``dx`` are each written once, and ``h`` and ``G U`` come out
of the same loops, so x is read once forward and G once for ``dx``. It needs Triton (in CUDA
builds of torch), a CUDA tensor, ``r <= 64`` and eager execution; where one is missing it takes
the epilogue path.

``AdapterLayer.forward`` takes the path ``path`` names; ``"none"`` is autograd's, the reference.
On ``"epilogue"``, ``"merge"`` and ``"triton"``, ``forward`` takes ``g ⊙ D`` and the cast
factors from the layer when adalora/factor_batch.py has prepared them with the other adapters'
(``gate`` is then None, as for LoRA).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import factor_batch, gate_bank, lowrank_gemm, rank_update, shared_input, side_stream

FUSE_MODES = ("none", "epilogue", "merge", "triton", "stack", "auto")   # auto: epilogue on CUDA tensors, none elsewhere
PREPARED = ("epilogue", "merge", "triton")   # the paths through EpilogueLinear, with factors from factor_batch.py


def check_fuse(mode) -> str:
    if mode not in FUSE_MODES:
        raise ValueError(f"fuse={mode!r}: use one of {FUSE_MODES}")
    return mode


def _rows(d_out: int, r: int, t: torch.Tensor) -> int:
    """``d_out + r`` rounded up so that a row of ``z`` is a multiple of 16 bytes: with ``r = 12``
    (AdaLoRA's r0) a bf16 row of 588 is not, and cuBLAS would leave its fast kernels for the big
    GEMM. The padding rows of the stack give columns of ``z`` nobody reads."""
    align = max(1, 16 // t.element_size())
    return d_out + r + (-(d_out + r) % align)


def path(layer, x: torch.Tensor) -> str:
    """The path ``layer``'s forward takes on ``x``: its ``fuse`` mode (``"auto"`` resolved by
    the device), or ``"none"`` where a fused path does not apply."""
    mode = layer.fuse
    if mode == "auto":
        mode = "epilogue" if x.is_cuda else "none"
    if mode == "none" or not applies(layer, x):
        return "none"
    if mode == "stack" and torch.is_autocast_enabled(x.device.type):
        return "none"                  # the stack would hold W0 in two dtypes
    if mode == "triton" and not _triton_runs(layer, x):
        return "epilogue"
    return mode


def _triton_runs(layer, x: torch.Tensor) -> bool:
    """Whether the Triton kernel can take ``x``: a CUDA tensor (or Triton's CPU interpreter, set
    by TRITON_INTERPRET=1 before the first import) of a dtype it multiplies, Triton importable,
    ``r`` within its tile, x and y of fewer than 2³¹ elements (its offsets are 32-bit; so are
    the backward's G and dx, of the same sizes), and not under torch.compile, whose graphs take
    the epilogue path's ops instead."""
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or torch.compiler.is_compiling():
        return False
    if x.numel() >= 2**31 or x.numel() // x.shape[-1] * layer.out_features >= 2**31:
        return False
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return dtype in lowrank_gemm.DTYPES and layer.rank <= lowrank_gemm.MAX_RANK and lowrank_gemm.have_triton()


def applies(layer, x: torch.Tensor) -> bool:
    """Whether ``layer``'s forward on ``x`` may take a fused path. Not for: a base other than a
    plain ``nn.Linear`` (Conv1D stores W0 transposed, NF4 has no dense W0), dropout in training
    (the adapter then sees another x than the base), a merged layer, rank 0, a trainable W0 or b
    (the fused backward never returns their gradients), base and adapter dtypes that differ, or
    outside autocast an input in another dtype (under autocast ``forward`` casts, as it would)."""
    return weights_apply(layer) and (x.dtype == layer.base.weight.dtype or torch.is_autocast_enabled(x.device.type))


def weights_apply(layer) -> bool:
    """``applies`` without the input: what the layer itself allows. Called per adapter and
    step, so it reads the module dicts directly: ``nn.Module.__getattr__`` would be most of its
    host time."""
    base, drop = layer._modules["base"], layer._modules.get("drop")
    if type(base) is not nn.Linear or layer.merged or drop is not None and drop.training:
        return False
    w, b = base._parameters["weight"], base._parameters["bias"]
    if layer.rank == 0 or w.requires_grad or (b is not None and b.requires_grad):
        return False
    return w.dtype == layer._adapter_dtype()


def forward(layer, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``layer(x)`` through ``EpilogueLinear`` or ``StackedLinear`` (``mode`` from ``path``)."""
    base = layer._modules["base"]
    w, b = base._parameters["weight"], base._parameters["bias"]
    # a flat factor or gate (adalora/gate_bank.py) is a view, made below only where needed
    down = layer._parameters.get(layer._DOWN)
    gate = layer._parameters.get(layer._GATE) if layer._GATE else None
    gated = bool(layer._GATE)
    up = layer._up()
    x2 = x.reshape(-1, x.shape[-1])                                            # (N, d_in)
    if mode in PREPARED:
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        if autocast:
            # What autocast does to the unfused path's products: x, W0 and b in its dtype here
            # (none needs a gradient through the cast, bar x); the factors inside the Function,
            # which returns their gradients in their own dtype without an autograd node per cast.
            dt = torch.get_autocast_dtype(device)
            x2, b = (t if t is None else t.to(dt) for t in (x2, b))
            if mode != "merge":         # the merge path rounds W0 + s U (g ⊙ D) to dt at once instead
                w = w.to(dt)
        # Factors prepared with the other adapters' before the model's forward (factor_batch.py):
        # g ⊙ D, and under autocast both factors cast. Taken only in the dtype of this product
        # (an adapter in a region where autocast is off keeps its own).
        prepared = layer.__dict__.get(factor_batch.SLOT)
        lead = y = merged = None
        if prepared is not None:
            pd, pu, lead, pw = prepared
            if pd is not None and pd.dtype == x2.dtype:
                down, gate, gated = pd, None, False
            if pu is not None and pu.dtype == x2.dtype:
                up = pu
            if pw is not None and pw.dtype == x2.dtype:
                merged = pw            # a merge-path adapter's W', formed with the others' from these factors
        if gated and gate is None:
            gate = gate_bank.gate_view(layer)
        if down is None:
            down = gate_bank.factor_view(layer, layer._DOWN)
        side_stream.prepare(x2)
        with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():
            if mode != "triton":
                # adapters called on the same x share its down-projection (shared_input.py)
                shared_input.record(layer, x)
                y = shared_input.forward(layer, x, x2, w, b, down, up, lead, mode == "merge", merged)
            if y is None:
                y = EpilogueLinear.apply(x2, w if merged is None else merged, b, down, gate, up, layer.scaling, mode,
                                         merged is not None)
    else:
        if gated and gate is None:
            gate = gate_bank.gate_view(layer)
        if down is None:
            down = gate_bank.factor_view(layer, layer._DOWN)
        stack, bstack = _stack(layer, w, b, down)
        y = StackedLinear.apply(x2, stack, bstack, w, down, gate, up, layer.scaling)
    return y.view(*x.shape[:-1], y.shape[-1])


def _stack(layer, w, b, down):
    """``[W0; D; 0]`` ``(d_out + r', d_in)`` and ``[b; 0]`` ``(d_out + r',)``.

    Eager: a persistent buffer whose top rows *are* ``base.weight`` (its ``.data`` is a view of
    them, likewise the bias), so W0 is never copied per step; only ``D`` (``r · d_in``) is copied
    into the bottom rows at each forward. Rebuilt when ``base.weight`` no longer lives there
    (``.to()``, ``load_state_dict(assign=True)``) or the rank changed (``compact``, ``resize``,
    ``expand``, ``set_factors``, another named set); in-place writes to W0 (``merge``, loading)
    land in the buffer.
    """
    d_out, d_in = w.shape
    r = down.shape[0]
    rows = _rows(d_out, r, w)
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        # Dynamo cannot compare data pointers (a graph break per layer) and a buffer written in
        # the graph keeps CUDA graphs from replaying: the compiled graph concatenates instead.
        # Nor is the buffer made under inference_mode: W0 would become an inference tensor
        # that a later training step cannot save for backward.
        stack = torch.cat([w, down, w.new_zeros(rows - d_out - r, d_in)])
        return stack, (None if b is None else F.pad(b, (0, rows - d_out)))
    # D keeps its own memory and is copied in (r · d_in per step): a D inside W0's storage would
    # make torch.save of the trainable weights write W0 as well, safetensors refuse a state dict
    # holding both, and a switch of named sets (which rebinds D) rebuild the stack.
    cached = layer.__dict__.get("_fused_stack")
    if (cached is None or cached[0].shape[0] != rows or cached[0].data_ptr() != w.data_ptr()
            or (b is not None and cached[1].data_ptr() != b.data_ptr())):
        cached = _rebuild(w, b, rows)
        layer.__dict__["_fused_stack"] = cached
    stack, bstack = cached
    with torch.no_grad():
        stack[d_out:d_out + r].copy_(down)
    return stack, bstack


@torch.no_grad()
def _rebuild(w: nn.Parameter, b: nn.Parameter | None, rows: int):
    d_out, d_in = w.shape
    stack = w.new_zeros(rows, d_in)
    stack[:d_out].copy_(w)
    w.data = stack[:d_out]
    bstack = None
    if b is not None:
        bstack = b.new_zeros(rows)
        bstack[:d_out].copy_(b)
        b.data = bstack[:d_out]
    return stack, bstack


class EpilogueLinear(torch.autograd.Function):
    """``x W0ᵀ + b + s · (x (g ⊙ D)ᵀ) Uᵀ`` with the adapter's shares of the output and of the
    input gradient added in place, backward by hand: the ``"epilogue"``, ``"merge"`` and
    ``"triton"`` paths.

    Epilogue: the products and their layouts are those of ``AdapterLayer.forward``'s unfused
    path, so where ``rank_update`` takes ``addmm_`` (the CPU, fp32) the forward is bit for bit
    the same (its kernel may sum the r terms in another order); backward, autograd's separate
    ``dx`` share and its sum become one in-place pass. Triton: ``y`` with ``hᵀ``, and ``dx``
    with ``(G U)ᵀ``, each come from one ``lowrank_gemm``. Merge: ``y`` and ``dx`` are each one
    product with ``W'`` (``rank_update.merged_weight``), which is saved in W0's place. All fold
    ``s`` into a product where one takes it.
    Factors in another dtype than ``x`` (fp32 factors under bf16 autocast) are cast as autocast
    casts them for the unfused products: ``g ⊙ D`` is formed in their dtype, then cast; their
    gradients come back in their dtype, ``dD`` and ``dg`` formed there.
    """

    @staticmethod
    def forward(ctx, x, w, b, down, gate, up, scaling, how, merged):
        dg = down if gate is None else down * gate.unsqueeze(1)   # (r, d_in): g ⊙ D, as _down_weight
        dg, up = dg.to(x.dtype), up.to(x.dtype)                   # no-ops unless under autocast
        if how == "triton":
            y, ht = lowrank_gemm.lowrank_gemm(x, w.t(), dg.t(), up.t(), scaling, b)   # (N, d_out), hᵀ (r, N)
        else:
            if how == "merge" and not merged:                # merged: w is W' already (merge_batch.py)
                w = rank_update.merged_weight(w, up, dg, scaling, x.dtype)   # W' (d_out, d_in), saved
            side = side_stream.fork(x)                       # captured: hᵀ beside the frozen GEMM
            with side_stream.on(side):
                ht = torch.mm(dg, x.t())                     # hᵀ (r, N)
            y = F.linear(x, w, b)                            # (N, d_out)
            side_stream.join(side, ht)
            if how == "epilogue":
                rank_update.add_(y, ht.t(), up.t(), scaling)   # y += s · h Uᵀ, in place
        ctx.save_for_backward(x, w, down, gate, up, dg, ht)
        ctx.scaling, ctx.how = scaling, how
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, down, gate, up, dg, ht = ctx.saved_tensors    # w: W' on the merge path
        s, how = ctx.scaling, ctx.how
        need_x, _, _, need_d, need_g, need_u, *_ = ctx.needs_input_grad
        dx = dd = dgate = du = tt = None
        if how == "triton":                                  # one stream
            if need_x:
                dx, tt = lowrank_gemm.lowrank_gemm(grad, w, up, dg, s)   # G W0 + s (G U)(g ⊙ D), (G U)ᵀ (r, N)
            elif need_d or need_g:
                tt = torch.mm(up.t(), grad.t())
            if need_d or need_g:
                dd, dgate = _down_and_gate_grads(tt, x, down, gate, s, need_d, need_g)
            du = _up_grad(ht, grad, s) if need_u else None
            return dx, None, None, dd, dgate, du, None, None, None
        # Captured: (G U)ᵀ, then dD and dg from it, on one side stream and dU on another, beside
        # the frozen G W0; the pass over dx waits for (G U)ᵀ alone (adalora/side_stream.py).
        side, other = side_stream.forks(grad)
        with side_stream.on(side):
            if need_d or need_g or need_x and how == "epilogue":
                tt = torch.mm(up.t(), grad.t())              # (G U)ᵀ (r, N), unscaled
        with side_stream.on(other):
            du = _up_grad(ht, grad, s) if need_u else None
        if need_x:
            dx = torch.mm(grad, w)                           # G W0, or G W' whole on the merge path (N, d_in)
            if how == "epilogue":
                side_stream.join(side, tt)
                rank_update.add_(dx, tt.t(), dg, s)          # + s · (G U)(g ⊙ D), in place
        with side_stream.on(side):
            if need_d or need_g:
                dd, dgate = _down_and_gate_grads(tt, x, down, gate, s, need_d, need_g)
        side_stream.join(side, dd, dgate)
        side_stream.join(other, du)
        return dx, None, None, dd, dgate, du, None, None, None


def _up_grad(ht, grad, s):
    """``dU = s · Gᵀ h`` ``(d_out, r)``, column-major as U; autograd casts a gradient to its
    input's dtype."""
    return lowrank_gemm.scaled_mm(ht, grad, s).t()


def _down_and_gate_grads(tt, x, down, gate, s, need_d, need_g):
    """From ``(G U)ᵀ (r, N)``: ``d(g ⊙ D) = s · (G U)ᵀ x`` split into ``dD`` and ``dg``, in the
    factors' dtype."""
    ddg = lowrank_gemm.scaled_mm(tt, x, s).to(down.dtype)   # (r, d_in)
    if gate is None:
        return ddg, None
    dd = ddg * gate.unsqueeze(1) if need_d else None
    # dg_i = Σ_k d(g ⊙ D)_ik D_ik: r row-wise dot products as one batched GEMM
    dgate = torch.bmm(ddg.unsqueeze(1), down.unsqueeze(2)).view(-1) if need_g else None
    return dd, dgate


class StackedLinear(torch.autograd.Function):
    """``x W0ᵀ + b + s · ((x Dᵀ) ⊙ g) Uᵀ`` with one GEMM against the stack, backward by hand.

    Every product keeps the layouts of the unfused path (adalora/README.md): no operand has the
    rank as its leading dimension, so bf16 ranks like 12 stay on cuBLAS's aligned kernels.
    """

    @staticmethod
    def forward(ctx, x, stack, bstack, w, down, gate, up, scaling):
        d_out, r = w.shape[0], down.shape[0]
        z = F.linear(x, stack, bstack)                       # (N, d_out + r')
        y, u = z[:, :d_out], z[:, d_out:d_out + r]           # views; rows of z are 16-byte aligned
        ug = up if gate is None else up * gate               # (d_out, r) column-major: U diag(g)
        y.addmm_(u, ug.t(), alpha=scaling)                   # y += s · u (U diag(g))ᵀ, in place
        # uᵀ (r, N) copied out of z: a view of u would keep all of z alive until backward (the
        # output of an o_proj is otherwise freed after the residual add) and share y's version
        # counter (an in-place op on y would then fail the check). Row-major (r, N) is the
        # layout the backward's uᵀ G wants.
        ctx.save_for_backward(x, w, down, gate, up, u.t().contiguous())
        ctx.scaling = scaling
        # Returned detached: autograd forbids in-place ops on a view made inside a Function.
        return y.detach()

    @staticmethod
    def backward(ctx, grad):
        x, w, down, gate, up, ut = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, _, _, need_d, need_g, need_u, _ = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])                # G (N, d_out)
        dx = dd = dg = du_ = None
        if need_x or need_d:
            # duᵀ = (s · G U ⊙ g)ᵀ, (r, N) row-major: the (N, r) du it transposes has leading dim N.
            dut = torch.mm(up.t(), g2.t())
            dut.mul_(s if gate is None else (gate * s).unsqueeze(1))
            if need_x:
                dx = torch.mm(g2, w)                         # G W0 (N, d_in)
                dx.addmm_(dut.t(), down)                     # + du D, in place
            if need_d:
                dd = torch.mm(dut, x)                        # duᵀ x (r, d_in)
        if need_g or need_u:
            # m = uᵀ G (r, d_out) carries both: dU = s · mᵀ diag(g), and
            # dg = s · Σ_N (G U) ⊙ u = s · Σ_j m_ij U_ji, on (r, d_out) instead of (N, r).
            m = torch.mm(ut, g2).mul_(s)
            if need_g:
                dg = (m * up.t()).sum(1)
            if need_u:
                du_ = (m if gate is None else m * gate.unsqueeze(1)).t()   # column-major, as U
        return dx, None, None, None, dd, dg, du_, None
