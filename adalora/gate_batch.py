"""The gated down factors ``lam ⊙ Q`` of a model's fused SVD adapters, formed for all of them
at once before its forward, instead of one adapter at a time.

On a fused path (adalora/fused.py) the gate is all that AdaLoRA's adapter adds to LoRA's, and it
costs three small kernels per adapter and step: ``lam ⊙ Q`` forward, ``dQ`` and ``dlam``
backward. At BERT-base's 72 adapters that is 216 kernels, each too small to fill the GPU: a
launch-bound cost LoRA does not pay. Here the adapters whose input width ``d_in`` (and dtype and
device) agree share one product:

    Q_all   = [Q_1; ...; Q_L]              (Σ r_k, d_in)    one cat
    lam_all = [lam_1; ...; lam_L]          (Σ r_k,)         one cat
    G_all   = lam_all[:, None] ⊙ Q_all     (Σ r_k, d_in)    one product (cast once under autocast)
    G_k     = G_all[rows of k]             views, handed to adapter k's fused forward

Backward, autograd joins the adapters' ``dG_k`` with one cat, forms ``dQ_all`` and ``dlam_all``
once, and hands each parameter a view of them as its gradient (no copy): a handful of kernels per
width instead of three per adapter. Ranks may differ within a width (after ``compact``).

The values are those each adapter forms alone (``dlam`` sums in another order: fp32 rounding).
``attach`` registers the two hooks on the module ``inject`` adapted: before its forward the
products are formed, after it (also when it raises) they are dropped, so no adapter called
later on its own can use a product of parameters that have changed since. Nothing else happens
in the hooks: no parameter, buffer or rank changes.

Skipped, each adapter then forming its own product: under ``torch.compile`` (the compiler fuses
the product into its neighbours) and in a model with gradient checkpointing on (a submodule whose
``gradient_checkpointing`` is True, as transformers marks it): its recomputation runs the blocks
after the hooks have dropped the products, and a recomputed forward must save what the first
one saved.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import fused
from .layers import SVDLinear, fast_param

SLOT = "_gated_down"   # where an adapter finds its G_k, in its __dict__ (no state_dict entry)


def attach(model: nn.Module) -> None:
    """Form the products before ``model``'s forward and drop them after it; once per model."""
    if model.__dict__.get("_gate_batch_hooks"):
        return
    model.__dict__["_gate_batch_hooks"] = (model.register_forward_pre_hook(_form),
                                           model.register_forward_hook(_drop, always_call=True))


def remove(model: nn.Module) -> None:
    """Undo ``attach``: every adapter forms its own product again."""
    for handle in model.__dict__.pop("_gate_batch_hooks", ()):
        handle.remove()


def _takes_product(layer: SVDLinear) -> bool:
    """Whether ``layer`` forms ``lam ⊙ Q`` inside a fused forward: ``"epilogue"`` or ``"triton"``
    (``"auto"`` on a CUDA parameter), on weights the fused paths take."""
    mode = layer.fuse
    if mode == "auto":
        mode = "epilogue" if fast_param(layer, "lam").is_cuda else "none"
    return mode in ("epilogue", "triton") and fused.weights_apply(layer)


def _form(model: nn.Module, args) -> None:
    if torch.compiler.is_compiling():
        return
    groups: dict = {}
    for layer in model.modules():
        if getattr(layer, "gradient_checkpointing", False) is True:
            return                    # transformers' flag on the blocks' container
        if isinstance(layer, SVDLinear) and _takes_product(layer):
            q = layer._parameters["Q"]
            groups.setdefault((q.shape[1], q.dtype, q.device), []).append(layer)
    for members in groups.values():
        if len(members) < 2:
            continue                  # one adapter: its own product is as cheap
        q_all = torch.cat([m._parameters["Q"] for m in members])                 # (Σr, d_in)
        lam_all = torch.cat([m._parameters["lam"] for m in members])             # (Σr,)
        g_all = q_all * lam_all.unsqueeze(1)                                     # (Σr, d_in)
        device = q_all.device.type
        if torch.is_autocast_enabled(device):
            # the cast the fused forward would make per adapter (to x's autocast dtype), made once
            g_all = g_all.to(torch.get_autocast_dtype(device))
        for m, g in zip(members, g_all.split([m.rank for m in members])):
            m.__dict__[SLOT] = g


def _drop(model: nn.Module, args, output) -> None:
    for layer in model.modules():
        if isinstance(layer, SVDLinear):
            layer.__dict__.pop(SLOT, None)
