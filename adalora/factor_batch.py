"""The factors a model's fused adapters multiply by, prepared for all of them at once before its
forward, instead of one adapter at a time: AdaLoRA's gated down factor ``lam ⊙ Q``, and under
autocast every factor's cast to the autocast dtype.

On a fused path (adalora/fused.py) each adapter otherwise prepares its own: AdaLoRA's gate costs
three small kernels per adapter and step (``lam ⊙ Q`` forward, ``dQ`` and ``dlam`` backward),
and under autocast each fp32 factor costs a cast forward and one back for its gradient. At
BERT-base's 72 adapters that is 216 kernels for the gate and 288 for the casts, each too small to
fill a GPU: a launch-bound cost that grows with the number of adapters. Here adapters whose
factors share a width (and dtype and device) share the work, for the down factors ``D (r, d_in)``

    D_all = [D_1; ...; D_L]                (Σ r_k, d_in)    one cat
    G_all = lam_all[:, None] ⊙ D_all       AdaLoRA: one product, lam_all the cat of the gates
    G_all = G_all.to(autocast dtype)       under autocast: one cast
    G_k   = G_all[rows of k]               views, handed to adapter k's fused forward

and, under autocast, for the up factors ``U (d_out, r)`` by their transposes (``Uᵀ`` is a
row-major ``(r, d_out)``; the layout the forward multiplies by stays the same). Backward, autograd
joins the adapters' gradients with one cat per width, undoes the cast and the gate once, and
hands each parameter a view of the result as its gradient (no copy): a handful of kernels per
width instead of several per adapter. Ranks may differ within a width (after ``compact``).

The values are those each adapter forms alone (``dlam`` sums in another order: fp32 rounding).
``attach`` registers the two hooks on the module ``inject`` adapted: before its forward the
factors are prepared, after it (also when it raises) they are dropped, so no adapter called
later on its own can use factors of parameters that have changed since. Nothing else happens in
the hooks: no parameter, buffer or rank changes.

Skipped, each adapter then preparing its own: under ``torch.compile`` (the compiler fuses the
product and the casts into their neighbours) and in a model with gradient checkpointing on (a
submodule whose ``gradient_checkpointing`` is True, as transformers marks it): its recomputation
runs the blocks after the hooks have dropped the factors, and a recomputed forward must save
what the first one saved.
"""
from __future__ import annotations

import torch
import torch.nn as nn

SLOT = "_batched_factors"   # an adapter's (down, up) in its __dict__ (no state_dict entry); None: its own
_FILLED = "_factor_batch_filled"


def attach(model: nn.Module) -> None:
    """Prepare the factors before ``model``'s forward and drop them after it; once per model."""
    if model.__dict__.get("_factor_batch_hooks"):
        return
    model.__dict__["_factor_batch_hooks"] = (model.register_forward_pre_hook(_form),
                                             model.register_forward_hook(_drop, always_call=True))


def remove(model: nn.Module) -> None:
    """Undo ``attach``: every adapter prepares its own factors again."""
    for handle in model.__dict__.pop("_factor_batch_hooks", ()):
        handle.remove()


def _fused(layer) -> bool:
    """Whether ``layer``'s forward takes ``"epilogue"`` or ``"triton"`` (``"auto"`` on a CUDA
    parameter), on weights the fused paths take."""
    from . import fused
    auto_on_cuda = layer.fuse == "auto" and layer._parameters[layer._DOWN].is_cuda
    return (auto_on_cuda or layer.fuse in ("epilogue", "triton")) and fused.weights_apply(layer)


def _form(model: nn.Module, args) -> None:
    from .layers import AdapterLayer
    if torch.compiler.is_compiling():
        return
    downs: dict = {}
    ups: dict = {}
    filled = model.__dict__[_FILLED] = []     # before any slot is set: _drop clears what was
    for layer in model.modules():
        # transformers' flag on the blocks' container, a plain attribute: read from __dict__, as
        # getattr on a module without it raises inside nn.Module.__getattr__ (half this hook's time)
        if layer.__dict__.get("gradient_checkpointing") is True:
            return
        if not isinstance(layer, AdapterLayer) or not _fused(layer):
            continue
        d = layer._parameters[layer._DOWN]
        device = d.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else d.dtype
        if layer._GATE or cast != d.dtype:
            downs.setdefault((d.shape[1], d.dtype, d.device, cast, layer._GATE), []).append(layer)
        if cast != d.dtype:
            u = layer._parameters[layer._UP]
            ups.setdefault((u.shape[0], u.dtype, u.device, cast), []).append(layer)
    for (_, _, _, cast, gate), members in downs.items():
        if len(members) < 2:
            continue                  # one adapter: its own preparation is as cheap
        d_all = torch.cat([m._parameters[m._DOWN] for m in members])             # (Σr, d_in)
        if gate:
            d_all = d_all * torch.cat([m._parameters[gate] for m in members]).unsqueeze(1)
        for m, d in zip(members, d_all.to(cast).split([m.rank for m in members])):
            m.__dict__[SLOT] = [d, None]
            filled.append(m)
    for (_, _, _, cast), members in ups.items():
        if len(members) < 2:
            continue
        ut_all = torch.cat([m._parameters[m._UP].t() for m in members]).to(cast)  # (Σr, d_out) row-major
        for m, ut in zip(members, ut_all.split([m.rank for m in members])):
            m.__dict__.setdefault(SLOT, [None, None])[1] = ut.t()                # (d_out, r) column-major
            filled.append(m)


def _drop(model: nn.Module, args, output) -> None:
    for layer in model.__dict__.pop(_FILLED, ()):
        layer.__dict__.pop(SLOT, None)
