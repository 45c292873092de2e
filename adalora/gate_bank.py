"""Flat gates: every SVD adapter's ``lam`` in one parameter, each adapter's ``lam`` a view of it.

A separate ``(r,)`` parameter per adapter costs host time at every eager step wherever
parameters are walked one by one: autograd accumulates its gradient, the optimizer lists it
and its state, the importance scorer gathers it, the mask step multiplies it, ``zero_grad``
drops its gradient. At BERT-base's 72 adapters those are 72 tensors more than LoRA has. Here
they are one:

    lam_all = [lam_1; ...; lam_L]              (Σ r_k,)   one nn.Parameter
    layer_k.lam = lam_all[o_k : o_k + r_k]      a view (SVDLinear.lam, a property)

``lam_all`` is a parameter of the module ``inject`` adapted, named ``adalora_gates``, so it is in
that model's ``parameters()``, ``state_dict()`` and DDP's buckets; an adapter's own
``state_dict`` has no ``lam``. A parameter, not a child module: containers such as
``nn.Sequential`` call every child. ``GateBank``, the bookkeeping (which adapter sits where),
is a plain attribute of that model. The optimizer takes ``lam_all`` (``adapter_parameters``
lists it once). adalora/factor_batch.py hands the fused paths a width's gates with one ``index_select`` and
the reference path its views from one ``split`` per model forward, so autograd joins the
gradients once instead of per adapter. The values and the training are those of separate
gates; only the order in which autograd sums ``dlam`` may differ (fp32 rounding).

A rank change (``resize``, ``expand``, ``set_factors``) builds a new ``lam_all`` with the other
adapters' values, and ``GateBank.src`` records where each new element came from, so that an
optimizer can be told as for ``P`` and ``Q`` (``adalora.layers.swap_in_optimizer``). Named
adapter sets (adalora/named.py) swap per-adapter parameters and so refuse flat gates.
"""
from __future__ import annotations

import torch
import torch.nn as nn

PARAM = "adalora_gates"     # lam_all's name on the adapted model
ATTR = "_adalora_gate_bank"  # the adapted model's __dict__: its GateBank
_BANK = "_gate_bank"        # an adapter's __dict__: (bank, index), no state_dict entry
VIEW = "_gate_view"         # an adapter's __dict__: this forward's view, set by factor_batch


class GateBank:
    """Where the gates of ``layers`` (SVD adapters, in that order) sit in ``owner``'s
    ``adalora_gates``, ``lam (Σ r_k,)``."""

    def __init__(self, owner: nn.Module, layers: list):
        lams = [layer._parameters["lam"] for layer in layers]
        self.owner = owner
        owner.register_parameter(PARAM, nn.Parameter(torch.cat([t.detach() for t in lams]),
                                                     requires_grad=lams[0].requires_grad))
        self.layers = list(layers)
        for k, layer in enumerate(layers):
            del layer._parameters["lam"]
            layer.__dict__[_BANK] = (self, k)
        self.src: torch.Tensor | None = None        # after a rebuild: old index per element, -1 new
        self._index([t.shape[0] for t in lams])

    @property
    def lam(self) -> nn.Parameter:
        return self.owner._parameters[PARAM]

    def _index(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)                                   # r_k
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]  # o_k
        self._gathers: dict = {}                                   # layer indices -> index tensor

    def view(self, k: int) -> torch.Tensor:
        o = self.offsets[k]
        return self.lam[o:o + self.sizes[k]]

    def gather(self, layers: list) -> torch.Tensor:
        """The gates of ``layers`` (banked here) joined in that order: one ``index_select``."""
        key = tuple(layer.__dict__[_BANK][1] for layer in layers)
        idx = self._gathers.get(key)
        if idx is None or idx.device != self.lam.device:
            idx = torch.cat([torch.arange(self.offsets[k], self.offsets[k] + self.sizes[k]) for k in key])
            idx = self._gathers[key] = idx.to(self.lam.device)
        return self.lam.index_select(0, idx)

    @torch.no_grad()
    def set(self, k: int, value: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Make adapter ``k``'s gate ``value`` (any length) in a new ``lam``; ``src``: for each
        element of ``value``, the index in the old gate it continues (-1: none)."""
        old = self.lam
        pieces, srcs = [], []
        for j in range(len(self.layers)):
            o, r = self.offsets[j], self.sizes[j]
            if j == k:
                pieces.append(value.to(device=old.device, dtype=old.dtype))
                s = torch.full((value.shape[0],), -1, dtype=torch.long) if src is None else src.cpu().long()
                srcs.append(torch.where(s >= 0, s + o, s))
            else:
                pieces.append(old[o:o + r])
                srcs.append(torch.arange(o, o + r))
        self.owner._parameters[PARAM] = nn.Parameter(torch.cat(pieces), requires_grad=old.requires_grad)
        self.src = torch.cat(srcs)
        self._index(self.sizes[:k] + [value.shape[0]] + self.sizes[k + 1:])


def bank_of(layer) -> GateBank | None:
    entry = layer.__dict__.get(_BANK)
    return entry[0] if entry is not None else None


def gate_view(layer) -> torch.Tensor:
    """``layer.lam`` of a banked adapter: this forward's view if factor_batch made one, else a
    fresh slice of the bank."""
    v = layer.__dict__.get(VIEW)
    if v is not None:
        return v
    entry = layer.__dict__.get(_BANK)
    if entry is None:
        raise AttributeError(f"'{type(layer).__name__}' object has no attribute 'lam'")
    bank, k = entry
    return bank.view(k)


def bank_entry(layer) -> tuple[GateBank, int]:
    return layer.__dict__[_BANK]


def gate_size(layer) -> int:
    """``layer``'s rank, read from its bank without making a view."""
    entry = layer.__dict__.get(_BANK)
    return entry[0].sizes[entry[1]] if entry is not None else layer.lam.shape[0]


def gate_param(layer) -> nn.Parameter:
    """The leaf that holds ``layer``'s gate: its own ``lam``, or the bank's."""
    entry = layer.__dict__.get(_BANK)
    return entry[0].lam if entry is not None else layer.lam


def attach(model: nn.Module, layers: list) -> GateBank:
    """Move the gates of ``layers`` (SVD adapters of ``model``, each with its own ``lam``) into
    one bank on ``model``."""
    if ATTR in model.__dict__:
        raise ValueError("model already has flat gates: attach once per model")
    dtypes = {(layer._parameters["lam"].dtype, layer._parameters["lam"].device) for layer in layers}
    if len(dtypes) > 1:
        raise ValueError(f"flat gates need one dtype and device for every lam, got {sorted(map(str, dtypes))}: "
                         "set AdapterConfig.flat_gates=False")
    bank = model.__dict__[ATTR] = GateBank(model, layers)
    return bank


def bank_of_model(model: nn.Module) -> GateBank | None:
    return model.__dict__.get(ATTR)


def views_for_forward(bank: GateBank, wanted: set[int]) -> list:
    """Give the banked adapters whose ``id`` is in ``wanted`` their gate views for one
    forward, from one ``split``; returns them (factor_batch drops the views after the forward)."""
    given = []
    for layer, v in zip(bank.layers, bank.lam.split(bank.sizes)):
        if id(layer) in wanted:
            layer.__dict__[VIEW] = v
            given.append(layer)
    return given
