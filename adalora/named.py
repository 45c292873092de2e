"""Several named adapter sets on one frozen base: one set is active in the layers, the others
wait in each layer's bank, so a switch rebinds parameters and never touches the base weights.

    adalora.inject(model, cfg)                    # the set "default", active
    adalora.add_adapter(model, "task_b")          # a second set: same modules, fresh init
    with adalora.use_adapter(model, "task_b"):
        adalora.load_adapters("task_b.safetensors", model)   # loads into the active set
    adalora.set_adapter(model, "task_b")          # or switch for good; merge/unmerge act on it

All sets share the modules, the method (SVD or LoRA) and the base; their ranks may differ (a
pruned or compacted set keeps its own shapes). Inactive sets follow the base's device when
activated. A merged set must be unmerged before a switch: merging is the one operation that
writes the base weights.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import gate_bank
from .inject import find_adapters
from .layers import AdapterLayer, LoRALinear, SVDLinear, column_major

DEFAULT = "default"


def _factors(layer: AdapterLayer) -> tuple[str, ...]:
    if any(gate_bank.bank_of(layer, a) is not None for a in gate_bank.KINDS):
        # a set swaps each adapter's own parameters; a flat one is a view of the model's bank
        raise ValueError("named adapter sets need parameters per adapter: inject with "
                         "AdapterConfig(flat_gates=False, flat_factors=False)")
    return ("P", "lam", "Q") if isinstance(layer, SVDLinear) else ("A", "B")


def _bank(layer: AdapterLayer) -> dict:
    if "_bank" not in layer.__dict__:
        layer.__dict__["_bank"] = {}
        layer.__dict__["active_adapter"] = DEFAULT
    return layer.__dict__["_bank"]


def _capture(layer: AdapterLayer) -> dict:
    state = {a: layer._parameters[a] for a in _factors(layer)}
    state["scaling"] = layer.scaling
    if isinstance(layer, SVDLinear):
        state["rank_mask"] = layer.rank_mask
        state["r0"] = layer.r0
    return state


def _install(layer: AdapterLayer, state: dict) -> None:
    device = _device(layer)
    for a in _factors(layer):
        p = state[a]
        layer._parameters[a] = p if p.device == device else nn.Parameter(p.data.to(device),
                                                                          requires_grad=p.requires_grad)
    layer.scaling = state["scaling"]
    if isinstance(layer, SVDLinear):
        layer.rank_mask = state["rank_mask"].to(device)
        layer.r0 = state["r0"]


def _device(layer: AdapterLayer) -> torch.device:
    return next(t.device for t in list(layer.base.parameters()) + list(layer.base.buffers()))


def _fresh(layer: AdapterLayer) -> dict:
    """A new set for ``layer``'s module at its initial rank, initialised as ``inject`` does with
    the default ``init_std`` (ΔW = 0)."""
    state = {}
    ref = {a: layer._parameters[a] for a in _factors(layer)}
    if isinstance(layer, SVDLinear):
        r0 = layer.r0
        std = 0.02
        state["P"] = nn.Parameter(column_major(torch.randn(layer.out_features, r0, dtype=ref["P"].dtype,
                                                           device=ref["P"].device) * std), ref["P"].requires_grad)
        state["lam"] = nn.Parameter(torch.zeros(r0, dtype=ref["lam"].dtype, device=ref["lam"].device),
                                    ref["lam"].requires_grad)
        state["Q"] = nn.Parameter(torch.randn(r0, layer.in_features, dtype=ref["Q"].dtype, device=ref["Q"].device)
                                  * std, ref["Q"].requires_grad)
        state["rank_mask"] = torch.ones(r0, dtype=torch.bool, device=layer.rank_mask.device)
        state["r0"] = r0
        state["scaling"] = layer.scaling
    else:
        r = layer.rank
        A = torch.empty(r, layer.in_features, dtype=ref["A"].dtype, device=ref["A"].device)
        if r > 0:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        state["A"] = nn.Parameter(A, ref["A"].requires_grad)
        state["B"] = nn.Parameter(column_major(torch.zeros(layer.out_features, r, dtype=ref["B"].dtype,
                                                           device=ref["B"].device)), ref["B"].requires_grad)
        state["scaling"] = layer.scaling
    return state


def adapter_names(model: nn.Module) -> list[str]:
    """The named sets of ``model``, the active one first."""
    layers = list(find_adapters(model).values())
    if not layers:
        return []
    first = layers[0]
    return [first.__dict__.get("active_adapter", DEFAULT)] + sorted(_bank(first))


def active_adapter(model: nn.Module) -> str:
    return adapter_names(model)[0]


def add_adapter(model: nn.Module, name: str, path=None) -> None:
    """A new named set on every adapted module, not active: initialised as ``inject`` does
    (ΔW = 0), or loaded from ``path`` (a file of ``save_adapters``; checked before anything
    changes). Train a fresh set by activating it and building the optimizer afterwards."""
    layers = find_adapters(model)
    if not layers:
        raise ValueError("model has no adapters: call adalora.inject first, then add further named sets")
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter set name {name!r}: use a non-empty string")   # names are sorted and saved
    if name in adapter_names(model):
        raise ValueError(f"adapter set {name!r} exists already: choose another name or delete_adapter it")
    for layer in layers.values():
        _bank(layer)[name] = _fresh(layer)
    if path is not None:
        from .io import load_adapters
        try:
            with use_adapter(model, name):
                load_adapters(path, model)
        except BaseException:
            delete_adapter(model, name)          # a refused file leaves no half-made set
            raise


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active set: the layers' parameters are rebound to its tensors (no copy
    on the same device); the base weights are not touched."""
    layers = find_adapters(model)
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter set {name!r}: the model has {names}")
    if name == names[0]:
        return
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"adapter set {names[0]!r} is merged into the base ({merged[0]}, ...): call "
                         "adalora.unmerge(model) before switching")
    for layer in layers.values():
        bank = _bank(layer)
        bank[layer.__dict__["active_adapter"]] = _capture(layer)
        _install(layer, bank.pop(name))
        layer.__dict__["active_adapter"] = name


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str):
    """``with use_adapter(model, name): ...`` runs the block with ``name`` active, then restores."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield
    finally:
        set_adapter(model, previous)


def delete_adapter(model: nn.Module, name: str) -> None:
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter set {name!r}: the model has {names}")
    if name == names[0]:
        raise ValueError(f"{name!r} is active: set_adapter(model, <another>) before deleting it")
    for layer in find_adapters(model).values():
        _bank(layer).pop(name)
