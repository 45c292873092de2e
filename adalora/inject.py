"""Put adapters into a model, find them again by type, freeze the rest, merge and unmerge."""
from __future__ import annotations

import math
import re

import torch.nn as nn

from . import factor_batch, gate_bank
from .config import AdapterConfig
from .fused import check_fuse
from .layers import AdapterLayer, LoRALinear, SVDLinear, is_adaptable


def _matches(name: str, cfg: AdapterConfig) -> bool:
    if cfg.target_regex is not None:
        return re.fullmatch(cfg.target_regex, name) is not None
    return any(name == t or name.endswith("." + t) for t in cfg.targets)


def _rank_for(name: str, cfg: AdapterConfig) -> int:
    """``rank_pattern`` entry for ``name`` (exact name or the longest matching suffix), else ``init_rank``."""
    hits = [k for k in cfg.rank_pattern if name == k or name.endswith("." + k)]
    return cfg.rank_pattern[max(hits, key=len)] if hits else cfg.init_rank


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def inject(model: nn.Module, cfg: AdapterConfig) -> dict[str, AdapterLayer]:
    """Wrap every matching linear layer of ``model`` in place; return ``{name: adapter}`` in module order."""
    if find_adapters(model):
        raise ValueError("model already has adapters: inject once per model (use find_adapters to get them)")
    linear = [n for n, m in model.named_modules() if n and is_adaptable(m)]
    chosen = [n for n in linear if _matches(n, cfg)]
    if not chosen:
        what = f"target_regex={cfg.target_regex!r}" if cfg.target_regex else f"targets={cfg.targets}"
        shown = ", ".join(linear[:40]) + (" ..." if len(linear) > 40 else "")
        raise ValueError(f"{what} matched no linear layer; available: {shown or '(none)'}")
    if cfg.target_regex is None:
        unused = [t for t in cfg.targets if not any(n == t or n.endswith("." + t) for n in chosen)]
        if unused:
            raise ValueError(f"targets {unused} matched no linear layer; fix the names (e.g. one of "
                             f"{sorted({n.rsplit('.', 1)[-1] for n in linear})})")
    unknown = [k for k in cfg.rank_pattern if not any(n == k or n.endswith("." + k) for n in chosen)]
    if unknown:
        raise ValueError(f"rank_pattern keys {unknown} match no adapted module; use names from {chosen[:6]}...")
    adapters: dict[str, AdapterLayer] = {}
    for name in chosen:
        base = model.get_submodule(name)
        r = _rank_for(name, cfg)
        if cfg.method == "adalora":
            layer = SVDLinear(base, r, cfg.alpha, cfg.dropout, cfg.init_std, cfg.fuse)
        else:
            layer = LoRALinear(base, r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.fuse)
        layer.scaling = scaling(cfg, r)
        _set_submodule(model, name, layer)
        adapters[name] = layer
    svd = [a for a in adapters.values() if isinstance(a, SVDLinear)]
    flat = ("P", "Q") * cfg.flat_factors + ("lam",) * cfg.flat_gates
    if flat and svd:
        gate_bank.attach(model, svd, flat)  # every lam (P, Q) a view of one parameter (per width)
    lora = [a for a in adapters.values() if isinstance(a, LoRALinear)]
    if cfg.flat_factors and lora:
        gate_bank.attach(model, lora, ("A", "B"))
    factor_batch.attach(model)       # the fused paths' lam ⊙ Q and casts, once per factor width
    return adapters


def scaling(cfg: AdapterConfig, rank: int) -> float:
    """``α / r`` (``α / √r`` with rslora), ``r`` the adapter's initial rank or ``cfg.scale_rank``."""
    if rank == 0:
        return 0.0
    r = rank if cfg.scale_rank is None else cfg.scale_rank
    return cfg.alpha / (math.sqrt(r) if cfg.rslora else r)


def find_adapters(model: nn.Module) -> dict[str, AdapterLayer]:
    """Rebuild the adapter dict by type (never by parameter-name substrings)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_parameters(adapters: dict[str, AdapterLayer]) -> list[nn.Parameter]:
    """The trainable leaves of ``adapters``, each once: ``P, lam, Q`` or ``A, B`` per adapter;
    with flat gates or flat factors a bank parameter (``adalora_gates``, ``adalora_P_<d>``, ...)
    where the first adapter it holds would list its tensor, and nothing for the others."""
    out, seen = [], set()
    for layer in adapters.values():
        for attr in ("P", "lam", "Q") if isinstance(layer, SVDLinear) else ("A", "B"):
            p = gate_bank.leaf(layer, attr)
            if id(p) not in seen:
                out.append(p)
                if gate_bank.bank_of(layer, attr) is not None:
                    seen.add(id(p))
    return out


def check_extra(model: nn.Module, extra) -> None:
    """Refuse ``extra`` names (dotted-name suffixes of other modules to train or save, a head)
    that match no module: a misspelled head would otherwise be left out silently."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [e for e in extra if not any(n == e or n.endswith("." + e) for n in names)]
    if missing:
        raise ValueError(f"extra={missing} match no module; give dotted-name suffixes such as 'classifier'")


def mark_only_adapters_trainable(model: nn.Module, extra: tuple[str, ...] = (), bias: str = "none") -> None:
    """Freeze everything but the adapters and modules whose dotted names end with one of ``extra``.

    ``bias``: ``"none"`` (all biases frozen), ``"all"`` (every bias trains) or ``"adapter_only"``
    (biases of adapted layers train).
    """
    if bias not in ("none", "all", "adapter_only"):
        raise ValueError(f"bias={bias!r}: use 'none', 'all' or 'adapter_only'")
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no adapters: call adalora.inject(model, cfg) first")
    modules = dict(model.named_modules())
    check_extra(model, extra)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(adapters):
        p.requires_grad_(True)
    for n, m in modules.items():
        if n and any(n == e or n.endswith("." + e) for e in extra):
            for p in m.parameters():
                p.requires_grad_(True)
        if bias == "all" or (bias == "adapter_only" and isinstance(m, AdapterLayer)):
            b = getattr(m.base if isinstance(m, AdapterLayer) else m, "bias", None)
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)


def merge(model: nn.Module, name: str | None = None) -> None:
    """Merge every adapter into its base weight (zero added latency at inference); with
    ``name``, that named set is made active first (``adalora.set_adapter``)."""
    adapters = find_adapters(model)
    for layer in adapters.values():
        layer._check_mergeable()  # refuse before touching any weight, or switching the active set
    if name is not None:
        from .named import set_adapter
        set_adapter(model, name)
        adapters = find_adapters(model)
    for layer in adapters.values():
        layer.merge()


def unmerge(model: nn.Module, name: str | None = None) -> None:
    """Subtract the merged update again; ``name``, if given, must be the active (merged) set."""
    if name is not None:
        from .named import active_adapter
        if active_adapter(model) != name:
            raise ValueError(f"adapter set {name!r} is not the active one ({active_adapter(model)!r}): "
                             "only the active set can be merged or unmerged")
    for layer in find_adapters(model).values():
        layer.unmerge()


def set_fuse(model: nn.Module, fuse: str) -> None:
    """Set every adapter's forward path, one of ``FUSE_MODES`` (``AdapterConfig.fuse``)."""
    check_fuse(fuse)
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no adapters: call adalora.inject(model, cfg) first")
    for layer in adapters.values():
        layer.fuse = fuse


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def adapter_shapes(adapters: dict[str, AdapterLayer]) -> dict[str, tuple[int, int]]:
    return {n: (a.out_features, a.in_features) for n, a in adapters.items()}
