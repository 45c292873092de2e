"""Flat adapter parameters: every SVD adapter's ``lam`` in one parameter (flat gates) and, with
flat factors, its ``P`` and ``Q`` (a LoRA adapter's ``A`` and ``B``) in one parameter per kind and
width, each adapter's tensor a view of its rows.

A separate parameter per adapter and factor costs host time at every eager step wherever
parameters are walked one by one: autograd accumulates its gradient, the optimizer lists it
and its state, the importance scorer and the penalty gather it, the mask step multiplies it,
``zero_grad`` drops its gradient. At BERT-base's 72 adapters that is 216 tensors. Here they are
one gate parameter and a ``P`` and a ``Q`` parameter per distinct width (four at BERT-base):

    lam_all = [lam_1; ...; lam_L]                 (Σ r_k,)          adalora_gates
    Q_all   = [Q_1; ...; Q_L]  (one d_in)         (Σ r_k, d_in)     adalora_Q_<d_in>
    Pt_all  = [P_1ᵀ; ...; P_Lᵀ] (one d_out)       (Σ r_k, d_out)    adalora_P_<d_out>
    layer_k.lam = lam_all[o_k : o_k + r_k]         views (SVDLinear's properties)
    layer_k.Q   = Q_all[o_k : o_k + r_k]
    layer_k.P   = Pt_all[o_k : o_k + r_k].t()      column-major (d_out, r_k), as P is stored

and LoRA's ``A`` as ``Q`` (``adalora_A_<d_in>``), ``B`` as ``P`` (``adalora_B_<d_out>``, ``Bᵀ`` rows).

Each is a parameter of the module ``inject`` adapted, so it is in that model's ``parameters()``,
``state_dict()`` and DDP's buckets; an adapter's own ``state_dict`` has none of them. Parameters,
not child modules: containers such as ``nn.Sequential`` call every child. A ``Bank``, the
bookkeeping (which adapter's rows sit where), is a plain attribute of that model. The optimizer
takes the banks (``adapter_parameters`` lists each once). adalora/factor_batch.py hands the fused
paths a width's factors with one ``index_select`` per kind (none at all where the width's
adapters are the bank, in order) and the reference path its views from one ``split`` per bank
and model forward, so autograd joins the gradients once instead of per adapter. The penalty
multiplies a bank's rows in place of a stack of its adapters' and adds its gradient with one
kernel; the importance scorer keeps its state in the banks' layout (adalora/importance.py). The
values and the training are those of separate parameters; only the order in which sums are
taken may differ (fp32 rounding).

A rank change (``resize``, ``expand``, ``set_factors``) builds a new bank with the other
adapters' rows, and ``Bank.src`` records where each new row came from, so that an optimizer can
be told (``adalora.layers.swap_in_optimizer``). Named adapter sets (adalora/named.py) swap
per-adapter parameters and so refuse flat parameters; so does the truncation family
(adalora/truncate.py), which restarts one adapter's optimizer state.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

PARAM = "adalora_gates"     # lam_all's name on the adapted model
ATTR = "_adalora_banks"     # the adapted model's __dict__: {attr: [Bank, ...]}
KINDS = ("P", "lam", "Q", "A", "B")
UPS = ("P", "B")            # up factors: stored column-major, banked as rows of their transposes


def _key(attr: str) -> str:
    return "_bank_" + attr      # an adapter's __dict__: (bank, index), no state_dict entry


def _view_key(attr: str) -> str:
    return "_view_" + attr      # an adapter's __dict__: this forward's view, set by factor_batch


def _rows(t: torch.Tensor, attr: str) -> torch.Tensor:
    """A factor in its bank's layout, one row per rank-one term: ``Pᵀ`` for ``P`` (``Bᵀ``)."""
    return t.t() if attr in UPS else t


class Bank:
    """Where the ``attr`` tensors (``"lam"``, ``"P"`` or ``"Q"``) of ``layers`` (SVD adapters, in
    that order) sit in ``owner``'s parameter ``name``: rows ``o_k : o_k + r_k`` each."""

    def __init__(self, owner: nn.Module, layers: list, attr: str, name: str):
        leaves = [layer._parameters[attr] for layer in layers]
        self.owner, self.attr, self.name = owner, attr, name
        rows = torch.cat([_rows(t.detach(), attr) for t in leaves])
        owner.register_parameter(name, nn.Parameter(rows, requires_grad=leaves[0].requires_grad))
        self.layers = list(layers)
        for k, layer in enumerate(layers):
            del layer._parameters[attr]
            layer.__dict__[_key(attr)] = (self, k)
        self.src: torch.Tensor | None = None        # after a rebuild: old row per row, -1 new
        self.version = 0                            # rebuilds so far: plans built on it check it
        self._index([_rows(t, attr).shape[0] for t in leaves])

    @property
    def param(self) -> nn.Parameter:
        """The bank's parameter: ``(Σ r_k,)`` or ``(Σ r_k, d)``."""
        return self.owner._parameters[self.name]

    lam = param                                     # a gate bank's name for it

    def _index(self, sizes: list[int]) -> None:
        self.sizes = list(sizes)                                   # r_k
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]  # o_k
        self._gathers: dict = {}                                   # layer indices -> index tensor

    def _shaped(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.t() if self.attr in UPS else rows

    def view(self, k: int) -> torch.Tensor:
        o = self.offsets[k]
        return self._shaped(self.param[o:o + self.sizes[k]])

    def rows_of(self, layers: list) -> torch.Tensor | None:
        """The bank's row indices of ``layers`` (banked here), in that order, on its device;
        None when they are all its rows in its order."""
        key = tuple(layer.__dict__[_key(self.attr)][1] for layer in layers)
        if key == tuple(range(len(self.layers))):
            return None
        idx = self._gathers.get(key)
        if idx is None or idx.device != self.param.device:
            idx = torch.cat([torch.arange(self.offsets[k], self.offsets[k] + self.sizes[k]) for k in key])
            idx = self._gathers[key] = idx.to(self.param.device)
        return idx

    def gather(self, layers: list, of: torch.Tensor | None = None) -> torch.Tensor:
        """The rows of ``layers`` (banked here) joined in that order, from the parameter or from
        ``of`` (its gradient, say): one ``index_select``, or the tensor itself where they are all
        its rows in order."""
        src = self.param if of is None else of
        idx = self.rows_of(layers)
        return src if idx is None else src.index_select(0, idx)

    @torch.no_grad()
    def set(self, k: int, value: torch.Tensor, src: torch.Tensor | None = None) -> None:
        """Make adapter ``k``'s tensor ``value`` (in the adapter's layout, any rank) in a new
        parameter; ``src``: for each row of ``value``, the row of the old tensor it continues
        (-1: none)."""
        old = self.param
        value = _rows(value, self.attr)
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
        self.owner._parameters[self.name] = nn.Parameter(torch.cat(pieces), requires_grad=old.requires_grad)
        self.src = torch.cat(srcs)
        self.version += 1
        self._index(self.sizes[:k] + [value.shape[0]] + self.sizes[k + 1:])


def bank_of(layer, attr: str = "lam") -> Bank | None:
    entry = layer.__dict__.get(_key(attr))
    return entry[0] if entry is not None else None


def factor_view(layer, attr: str) -> torch.Tensor:
    """``layer.<attr>`` of a banked adapter: this forward's view if factor_batch made one, else a
    fresh slice of the bank."""
    v = layer.__dict__.get(_view_key(attr))
    if v is not None:
        return v
    entry = layer.__dict__.get(_key(attr))
    if entry is None:
        raise AttributeError(f"'{type(layer).__name__}' object has no attribute '{attr}'")
    bank, k = entry
    return bank.view(k)


def gate_view(layer) -> torch.Tensor:
    return factor_view(layer, "lam")


def bank_entry(layer, attr: str = "lam") -> tuple[Bank, int]:
    return layer.__dict__[_key(attr)]


def bank_size(layer, attr: str) -> int:
    """``layer``'s rank, read from its ``attr`` bank without making a view."""
    entry = layer.__dict__.get(_key(attr))
    return entry[0].sizes[entry[1]] if entry is not None else getattr(layer, attr).shape[0]


def leaf(layer, attr: str) -> nn.Parameter:
    """The leaf that holds ``layer``'s ``attr``: its own parameter, or its bank's."""
    p = layer._parameters.get(attr)
    if p is not None:
        return p
    entry = layer.__dict__.get(_key(attr))
    return entry[0].param if entry is not None else getattr(layer, attr)


def gate_param(layer) -> nn.Parameter:
    """The leaf that holds ``layer``'s gate: its own ``lam``, or the bank's."""
    return leaf(layer, "lam")


def attach(model: nn.Module, layers: list, attrs: tuple[str, ...] = ("lam",)) -> list[Bank]:
    """Move the ``attrs`` of ``layers`` (SVD adapters of ``model``, each with its own parameters)
    into banks on ``model``: one for ``lam``, one per width for ``P`` and ``B`` (``d_out``) and
    ``Q`` and ``A`` (``d_in``)."""
    banks = model.__dict__.setdefault(ATTR, {})
    for attr in attrs:
        if attr in banks:
            raise ValueError(f"model already has flat {attr}: attach once per model")
        kinds = {(layer._parameters[attr].dtype, layer._parameters[attr].device) for layer in layers}
        if len(kinds) > 1:
            raise ValueError(f"flat parameters need one dtype and device for every {attr}, got "
                             f"{sorted(map(str, kinds))}: set AdapterConfig.flat_gates=False and flat_factors=False")
    for attr in attrs:
        if attr == "lam":
            banks[attr] = [Bank(model, layers, attr, PARAM)]
            continue
        by_width: dict[int, list] = defaultdict(list)
        for layer in layers:
            by_width[layer.out_features if attr in UPS else layer.in_features].append(layer)
        banks[attr] = [Bank(model, ls, attr, f"adalora_{attr}_{d}") for d, ls in by_width.items()]
    return [b for attr in attrs for b in banks[attr]]


def any_banked(layers: list) -> bool:
    """Whether any of ``layers`` keeps a factor in a bank."""
    return any(_key("P") in layer.__dict__ or _key("Q") in layer.__dict__ for layer in layers)


def banks_of_model(model: nn.Module) -> list[Bank]:
    return [b for bs in model.__dict__.get(ATTR, {}).values() for b in bs]


def bank_of_model(model: nn.Module) -> Bank | None:
    """``model``'s gate bank, if it has flat gates."""
    bs = model.__dict__.get(ATTR, {}).get("lam")
    return bs[0] if bs else None


def views_for_forward(bank: Bank, wanted: set[int]) -> list:
    """Give the adapters of ``bank`` whose ``id`` is in ``wanted`` their views for one forward,
    from one ``split``; returns ``(adapter, key)`` of each view given (factor_batch drops them
    after the forward)."""
    given, key = [], _view_key(bank.attr)
    # an up factor's views split the bank's transpose by columns: one view op in all, where a
    # transpose per row block is one per adapter (and one more autograd node each)
    views = bank.param.t().split(bank.sizes, dim=1) if bank.attr in UPS else bank.param.split(bank.sizes)
    for layer, v in zip(bank.layers, views):
        if id(layer) in wanted:
            layer.__dict__[key] = v
            given.append((layer, key))
    return given
