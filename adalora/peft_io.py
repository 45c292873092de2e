"""Adapters in HF peft's folder format: ``save_peft`` writes a LoRA folder that
``peft.PeftModel.from_pretrained(base, path)`` loads; ``load_peft`` reads peft LoRA and AdaLoRA
folders into this library's layers. peft itself is not imported: the format is two files.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` with, per module ``m``,
``base_model.model.<m>.lora_A.weight`` ``(r, d_in)`` and ``lora_B.weight`` ``(d_out, r)``
(AdaLoRA folders add ``lora_E`` ``(r, 1)``, the singular values). peft scales a LoRA module by
``lora_alpha / r``, both per module through ``alpha_pattern`` and ``rank_pattern``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .inject import _set_submodule, find_adapters
from .io import _atomic_write
from .layers import LoRALinear, SVDLinear, base_shape, is_adaptable, is_conv1d

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def _lora_factors(layer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, d_in), B (d_out, r), scale)`` of a LoRA with the layer's ``delta_weight()``:
    for an SVD adapter, λ folded into B over the kept singular values."""
    if isinstance(layer, LoRALinear):
        return layer.A.detach(), layer.B.detach(), float(layer.scaling)
    keep = layer.rank_mask.nonzero().flatten()
    return layer.Q.detach()[keep, :], layer.P.detach()[:, keep] * layer.lam.detach()[keep], float(layer.scaling)


@torch.no_grad()
def save_peft(path, model: nn.Module, base_model_name_or_path: str | None = None,
              modules_to_save: tuple[str, ...] = ()) -> Path:
    """Write ``model``'s adapters as a peft LoRA folder, loadable by
    ``peft.PeftModel.from_pretrained(base, path)`` where ``base`` is ``model`` without adapters.

    AdaLoRA's pruned ranks go into ``rank_pattern`` with λ folded into ``B``; modules pruned to
    rank 0 are left out; every module's scale (``α / r0`` for SVD adapters) goes into
    ``alpha_pattern`` as ``scale · r``. ``modules_to_save``: names of other trained modules (a
    classification head), saved whole as peft does.
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no adapters to save: call adalora.inject or load adapters first")
    if any(a.merged for a in adapters.values()):
        raise ValueError("adapters are merged into the base weights: call adalora.unmerge(model) before save_peft")
    tensors, ranks, alphas, dropouts = {}, {}, {}, set()
    for name, layer in adapters.items():
        A, B, scale = _lora_factors(layer)
        r = A.shape[0]
        if r == 0:
            continue                                   # peft has no rank-0 LoRA: the module is left as is
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
        ranks[name], alphas[name] = r, scale * r       # peft: scaling = lora_alpha / r
        dropouts.add(layer.drop.p if layer.drop is not None else 0.0)
    if not ranks:
        raise ValueError("every adapter has rank 0: there is nothing for peft to load")
    saved_whole = []
    for mname, module in model.named_modules():
        if mname and any(mname == m or mname.endswith("." + m) for m in modules_to_save):
            saved_whole.append(mname)
            for pname, p in module.named_parameters():
                tensors[f"{PREFIX}{mname}.{pname}"] = p.detach()
    missing = [m for m in modules_to_save if not any(s == m or s.endswith("." + m) for s in saved_whole)]
    if missing:
        raise ValueError(f"modules_to_save {missing} name no module of the model: use module names such as "
                         f"{sorted(n for n, _ in model.named_modules() if n)[:3]}")
    # One default rank and alpha; every module's own in the patterns (keys are regexes in peft).
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": r0, "lora_alpha": alphas[next(n for n in ranks if ranks[n] == r0)],
        "target_modules": sorted(ranks), "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items()},
        "lora_dropout": max(dropouts), "bias": "none", "use_rslora": False, "init_lora_weights": True,
        "fan_in_fan_out": any(is_conv1d(adapters[n].base) for n in ranks), "inference_mode": True,
        "modules_to_save": saved_whole or None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS, st_save({k: v.contiguous().cpu() for k, v in tensors.items()}))
    _atomic_write(out / CONFIG, json.dumps(config, indent=2, sort_keys=True).encode())
    return out


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(path)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} does not exist: pass a folder written by peft's save_pretrained "
                                    "or adalora.save_peft")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({e})") from None
    return config, st_load((folder / WEIGHTS).read_bytes())


def _pattern(pattern: dict, name: str, default):
    for key, value in pattern.items():                 # peft's rule: the first key matching a suffix
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@torch.no_grad()
def load_peft(path, model: nn.Module) -> dict[str, nn.Module]:
    """Inject the adapters of a peft LoRA or AdaLoRA folder into ``model`` (a base without
    adapters) and return them, ``{name: layer}``. LoRA folders become ``LoRALinear`` with peft's
    per-module rank and ``lora_alpha / r``; AdaLoRA folders become ``SVDLinear`` (``P = lora_B``,
    ``lam = lora_E``, ``Q = lora_A``) with the masks they were saved with and peft's scale
    ``lora_alpha / (init_r + 1e-5)`` (``r0 = init_r``: the initial rank, not the kept one).
    ``modules_to_save`` weights are copied in. Everything is checked before the model is touched:
    on a mismatch the error names it and the model is unchanged.
    """
    config, tensors = _read(path)
    kind = config.get("peft_type")
    if kind not in ("LORA", "ADALORA"):
        raise ValueError(f"{path}: peft_type {kind!r} is not supported: load_peft reads LORA and ADALORA folders")
    unsupported = [k for k in ("use_dora", "use_rslora") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise ValueError(f"{path}: {', '.join(unsupported)} is not supported by this library's layers")
    if find_adapters(model):
        raise ValueError("model already has adapters: load a peft folder into a base model without adapters")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.lora_([ABE])(?:\.weight)?", k)
        if m:
            factors.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            whole[k.replace(".modules_to_save.default.", ".")] = value
    params = dict(model.named_parameters())
    plans = []
    for name, f in factors.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path}: module {name!r} is not in the model: was the folder saved for another base "
                             f"model ({config.get('base_model_name_or_path')})?") from None
        if not is_adaptable(base):
            raise ValueError(f"{path}: {name!r} is a {type(base).__name__}, not a linear layer this library adapts")
        need = ("A", "B", "E") if kind == "ADALORA" else ("A", "B")
        if any(x not in f for x in need):
            raise ValueError(f"{path}: module {name!r} lacks lora_{[x for x in need if x not in f][0]}")
        d_out, d_in = base_shape(base)
        r = f["A"].shape[0]
        if f["A"].shape != (r, d_in) or f["B"].shape != (d_out, r):
            raise ValueError(f"{path}: {name}: lora_A {tuple(f['A'].shape)} / lora_B {tuple(f['B'].shape)} do not fit "
                             f"the model's ({d_out}, {d_in}) layer: load into the base model the folder was saved for")
        plans.append((name, base, f, r))
    for key, value in whole.items():
        if key not in params or params[key].shape != value.shape:
            raise ValueError(f"{path}: saved module weight {key!r} does not match the model")
    if not plans:
        raise ValueError(f"{path} holds no LoRA weights")
    # peft saves AdaLoRA factors sliced to the kept rank but scales by the initial rank (init_r).
    init_r = config.get("init_r") if kind == "ADALORA" else None
    if init_r is not None:
        if not isinstance(init_r, int) or isinstance(init_r, bool) or init_r < 1:
            raise ValueError(f"{path}: init_r {init_r!r} in {CONFIG} is not a positive integer: re-save the folder "
                             "with peft")
        over = [(name, r) for name, _, _, r in plans if r > init_r]
        if over:
            raise ValueError(f"{path}: {over[0][0]}: saved rank {over[0][1]} exceeds init_r {init_r} in {CONFIG}: "
                             "re-save the folder with peft")
    # AdaLoRA's rank_pattern: {"<prefix>.<module>.lora_E": [kept?] * r0} once peft has masked.
    masks = {}
    if kind == "ADALORA":
        for key, value in (config.get("rank_pattern") or {}).items():
            module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
            masks[module[len(PREFIX):] if module.startswith(PREFIX) else module] = value
    # Checked: now change the model.
    out = {}
    for name, base, f, r in plans:
        if kind == "LORA":
            alpha = _pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
            rank = _pattern(config.get("rank_pattern") or {}, name, config.get("r", r))
            layer = LoRALinear(base, r, float(alpha), float(config.get("lora_dropout", 0.0)))
            layer.set_factors(A=f["A"], B=f["B"])
            layer.scaling = float(alpha) / rank
        else:
            alpha = config.get("lora_alpha", 8)
            r0 = init_r if init_r is not None else r       # r0: the rank the allocation started from
            layer = SVDLinear(base, r0, float(alpha), float(config.get("lora_dropout", 0.0)))
            lam = f["E"].reshape(-1)
            layer.set_factors(P=f["B"], lam=lam, Q=f["A"])
            saved_mask = masks.get(name)
            mask = torch.tensor(saved_mask, dtype=torch.bool) if saved_mask is not None and len(saved_mask) == r \
                else lam != 0
            layer.rank_mask = mask.to(layer.lam.device)
            layer.scaling = (float(alpha) if alpha > 0 else float(r)) / (r0 + 1e-5)   # peft's own form
        _set_submodule(model, name, layer)
        out[name] = layer
    for key, value in whole.items():
        params[key].copy_(value)
    return out

