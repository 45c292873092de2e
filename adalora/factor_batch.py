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

The adapters that adalora/shared_input.py saw called on one input tensor in the previous forward
are put next to each other in their width, and the first of them (the group's leader) also gets
their rows as one view, ``Lead.down``, to multiply x by once. A width of LoRA adapters in their
own dtype, which needs neither gate nor cast, is joined only for such groups.

The values are those each adapter forms alone (``dlam`` sums in another order: fp32 rounding).
``attach`` registers the two hooks on the module ``inject`` adapted: before its forward the
factors are prepared, after it (also when it raises) they are dropped, so no adapter called
later on its own can use factors of parameters that have changed since; the hook after it also
clears the rows a leader handed on, and plans the next forward's groups from the calls it saw.
Nothing else happens in the hooks: no parameter, buffer or rank changes.

Skipped, each adapter then preparing its own: under ``torch.compile`` (the compiler fuses the
product and the casts into their neighbours) and in a model with gradient checkpointing on (a
submodule whose ``gradient_checkpointing`` is True, as transformers marks it): its recomputation
runs the blocks after the hooks have dropped the factors, and a recomputed forward must save
what the first one saved.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import gate_bank, merge_batch, shared_input

SLOT = "_batched_factors"   # an adapter's [down, up, Lead, W'] (None: its own) in its __dict__, no state_dict entry
_FILLED = "_factor_batch_filled"
_CALLS = "_factor_batch_calls"   # the forward's shared_input.Calls, replanned from after it
_VIEWED = "_factor_batch_views"  # (adapter, key) of every bank view handed out for the forward


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
    """Whether ``layer``'s forward takes ``"epilogue"``, ``"merge"`` or ``"triton"`` (``"auto"``
    on a CUDA parameter), on weights the fused paths take."""
    from . import fused
    auto_on_cuda = layer.fuse == "auto" and gate_bank.leaf(layer, layer._DOWN).is_cuda
    return (auto_on_cuda or layer.fuse in fused.PREPARED) and fused.weights_apply(layer)


def _form(model: nn.Module, args) -> None:
    from .layers import AdapterLayer
    if torch.compiler.is_compiling():
        return
    downs: dict = {}
    ups: dict = {}
    filled = model.__dict__[_FILLED] = []     # before any slot is set: _drop clears what was
    calls = model.__dict__[_CALLS] = shared_input.Calls()
    casts: dict = {}                          # (device type, dtype) -> the dtype products take
    for layer in _walk(model):
        # transformers' flag on the blocks' container, a plain attribute: read from __dict__, as
        # getattr on a module without it raises inside nn.Module.__getattr__ (half this hook's time)
        if layer.__dict__.get("gradient_checkpointing") is True:
            return
        if not isinstance(layer, AdapterLayer) or not _fused(layer):
            continue
        layer.__dict__[shared_input.CALLS] = calls    # the forward's calls, for the next plan
        filled.append(layer)
        d = gate_bank.leaf(layer, layer._DOWN)       # (r, d_in), or its bank (Σr, d_in)
        cast = casts.get((d.device.type, d.dtype))
        if cast is None:
            device = d.device.type
            cast = casts[device, d.dtype] = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                                             else d.dtype)
        downs.setdefault((d.shape[1], d.dtype, d.device, cast, layer._GATE), []).append(layer)
        if cast != d.dtype:
            u = gate_bank.leaf(layer, layer._UP)
            ups.setdefault((layer.out_features, u.dtype, u.device, cast), []).append(layer)
    groups = shared_input.plan(model)
    for (_, dtype, _, cast, gate), members in downs.items():
        units = _units(members, groups)
        if not gate and cast == dtype:
            units = [u for u in units if len(u) > 1]   # LoRA in its own dtype: only for groups
        rows = [m for u in units for m in u]
        if len(rows) < 2:
            continue                  # one adapter: its own preparation is as cheap
        d_all = _joined(rows, rows[0]._DOWN)                 # (Σr, d_in)
        if gate:
            g_all = _joined(rows, gate)
            d_all = d_all * g_all.unsqueeze(1)
        # one view per unit: a group's rows are adjacent, and its leader multiplies them as one
        # (its members' own views, for a call outside the group, are views of that view)
        unit_ranks = [tuple(m.rank for m in u) for u in units]
        for u, ranks, part in zip(units, unit_ranks, d_all.to(cast).split([sum(r) for r in unit_ranks])):
            for m, d in zip(u, part.split(ranks) if len(u) > 1 else (part,)):
                m.__dict__[SLOT] = [d, None, None, None]
            if len(u) > 1:
                u[0].__dict__[SLOT][2] = shared_input.Lead(part, u[1:], ranks)
    for (_, _, _, cast), members in ups.items():
        if len(members) < 2:
            continue
        ut_all = _joined(members, members[0]._UP).to(cast)                      # (Σr, d_out) row-major
        for m, ut in zip(members, ut_all.split([m.rank for m in members])):
            m.__dict__.setdefault(SLOT, [None, None, None, None])[1] = ut.t()          # (d_out, r) column-major
    merging = [m for m in filled if m.fuse == "merge"]
    if merging and torch.is_grad_enabled():
        _merge(merging)
    if torch.is_grad_enabled():
        # Flat parameters: every factor not prepared above is a view from one split of its bank,
        # so autograd joins its gradients once; a slice per adapter would hand the bank one
        # bank-sized gradient per adapter to sum.
        viewed = model.__dict__[_VIEWED] = []
        for bank in gate_bank.banks_of_model(model):
            wanted = {id(m) for m in bank.layers if not _prepared(m, bank.attr)}
            if wanted:
                viewed += gate_bank.views_for_forward(bank, wanted)


def _prepared(layer, attr: str) -> bool:
    """Whether this forward's ``attr`` of ``layer`` comes prepared (a joined down factor carries
    the gate too)."""
    slot = layer.__dict__.get(SLOT)
    if slot is None:
        return False
    return (slot[1] if attr == layer._UP else slot[0]) is not None


def _joined(layers: list, attr: str) -> torch.Tensor:
    """The ``attr`` of ``layers`` as rows (``Pᵀ`` for an up factor), in that order: one
    ``index_select`` (or none) where they share a bank (adalora/gate_bank.py), else one cat."""
    bank = gate_bank.bank_of(layers[0], attr)
    if bank is not None and all(gate_bank.bank_of(m, attr) is bank for m in layers):
        return bank.gather(layers)
    up = attr == layers[0]._UP
    return torch.cat([gate_bank.leaf(m, attr).t() if up else gate_bank.leaf(m, attr) for m in layers])


@torch.no_grad()
def _merge(layers: list) -> None:
    """The merge path's ``W'`` of ``layers``, formed now from the factors just prepared (or the
    adapter's own where none were), in one launch per weight shape (adalora/merge_batch.py).
    Only when gradients are on: a training forward keeps every ``W'`` for backward anyway, where
    an inference forward would hold them all at once instead of one at a time."""
    items, dtypes = [], []
    for m in layers:
        w = m._modules["base"]._parameters["weight"]
        dt = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        pd, pu, *_ = m.__dict__.setdefault(SLOT, [None, None, None, None])
        dg = pd if pd is not None and pd.dtype == dt else m._down_weight()
        up = pu if pu is not None and pu.dtype == dt else m._up()
        items.append((w, up, dg, m.scaling))
        dtypes.append(dt)
    for dt in set(dtypes):
        ks = [k for k, d in enumerate(dtypes) if d == dt]
        for k, w_new in zip(ks, merge_batch.merged_weights([items[k] for k in ks], dt)):
            layers[k].__dict__[SLOT][3] = w_new


def _units(members: list, groups: tuple) -> list:
    """``members`` (one width, module order) as lists: each group of the plan whose adapters are
    all here, in call order, and every other adapter alone."""
    here = {id(m) for m in members}
    group_of = {id(m): g for g in groups if all(id(x) in here for x in g) for m in g}
    units, done = [], set()
    for m in members:
        g = group_of.get(id(m), (m,))
        if id(g[0]) not in done:
            done.add(id(g[0]))
            units.append(list(g))
    return units


def _walk(model: nn.Module):
    """``model.modules()``, in its order, without its recursive generators: this hook walks
    every module at every forward, and the eager step waits on its host time."""
    seen, stack = set(), [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield module
        if module._modules:
            stack.extend(reversed([m for m in module._modules.values() if m is not None]))


def _drop(model: nn.Module, args, output) -> None:
    for layer in model.__dict__.pop(_FILLED, ()):
        for key in (SLOT, shared_input.CALLS, shared_input.HANDED):
            layer.__dict__.pop(key, None)
    for layer, key in model.__dict__.pop(_VIEWED, ()):
        layer.__dict__.pop(key, None)
    calls = model.__dict__.pop(_CALLS, None)
    if calls is not None:
        shared_input.replan(model, calls)
