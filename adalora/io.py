"""Saving, loading and exporting adapters: safetensors tensors plus a JSON sidecar.

SVD adapters are saved at their kept rank (pruned singular values dropped) with the indices
they had in ``r0`` (``<name>.kept``), so a file holds exactly what the allocation chose. The
sidecar carries a SHA-256 of the tensor file: a truncated or edited file is refused before the
model is touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .inject import adapter_parameters, check_extra, find_adapters
from .layers import AdapterLayer, LoRALinear, SVDLinear

FORMAT = "adalora-adapters/1"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / "adapters.safetensors" if p.is_dir() or not p.suffix else p.with_suffix(".safetensors")
    return p, p.with_suffix(".json")


def _adapter_tensors(name: str, layer: AdapterLayer) -> dict[str, torch.Tensor]:
    if isinstance(layer, SVDLinear):
        keep = layer.rank_mask.nonzero().flatten()
        # lam saved (r,) whatever the layer holds (a view of peft's layer holds (r, 1))
        return {f"{name}.P": layer.P[:, keep], f"{name}.lam": layer.lam[keep].reshape(-1),
                f"{name}.Q": layer.Q[keep, :], f"{name}.kept": keep.to(torch.int64)}
    return {f"{name}.A": layer.A, f"{name}.B": layer.B}


def save_adapters(path, model: torch.nn.Module, metadata: dict | None = None, extra: tuple[str, ...] = ()) -> Path:
    """Write ``adapters.safetensors`` and ``adapters.json``; ``extra``: suffixes of other modules to keep (a head)."""
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError("model has no adapters to save: call adalora.inject first")
    check_extra(model, extra)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, layer in adapters.items():
        tensors.update(_adapter_tensors(name, layer))
        kind = "svd" if isinstance(layer, SVDLinear) else "lora"
        modules[name] = {"type": kind, "rank": int(layer.rank_mask.sum()) if kind == "svd" else layer.rank,
                         "r0": layer.r0 if kind == "svd" else layer.rank, "scaling": float(layer.scaling),
                         "shape": [layer.out_features, layer.in_features]}
    for mname, module in model.named_modules():
        if mname and any(mname == e or mname.endswith("." + e) for e in extra):
            for pname, p in module.named_parameters():
                tensors[f"extra::{mname}.{pname}"] = p
    blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    adapter_ids = {id(p) for p in adapter_parameters(adapters)}
    from . import __version__
    meta = {"format": FORMAT, "library_version": __version__, "sha256": hashlib.sha256(blob).hexdigest(),
            "modules": modules, "ranks": {n: m["rank"] for n, m in modules.items()},
            "base_params": sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids),
            "metadata": metadata or {}}
    st_path, js_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(st_path, blob)
    _atomic_write(js_path, json.dumps(meta, indent=1, sort_keys=True).encode())
    return st_path


def read_adapters(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a saved adapter file, verified against its checksum."""
    st_path, js_path = _paths(path)
    for p in (st_path, js_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: pass the path given to save_adapters")
    try:
        meta = json.loads(js_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{js_path} is not valid JSON ({e}): the file is damaged; re-save the adapters") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{js_path} is not an adalora adapter sidecar (format {meta.get('format')!r})")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError(f"{st_path} does not match the checksum in {js_path.name}: the file is truncated or "
                         "was modified; re-save the adapters")
    return meta, st_load(blob)


@torch.no_grad()
def load_adapters(path, model: torch.nn.Module) -> dict:
    """Load saved adapters into a freshly injected ``model`` (same targets), resizing to the saved ranks.

    Every module is checked before any is changed: on a mismatch the error names the first
    one and the model is left as it was. The adapter parameters are replaced by new tensors, so
    an optimizer built before loading holds the old ones: build the optimizer after loading.
    Returns the sidecar metadata.
    """
    adapters = find_adapters(model)
    # unmerge would subtract the loaded ΔW while W0 holds the old one: W0 would be corrupted.
    merged = [n for n, a in adapters.items() if a.merged]
    if merged:
        raise ValueError(f"{merged[0]} is merged into its base weight: unmerge the model first (adalora.unmerge)")
    meta, tensors = read_adapters(path)
    saved = meta["modules"]
    for name in adapters:
        if name not in saved:
            raise ValueError(f"model adapter {name!r} is not in {path}: inject the same targets as the saved run")
    for name, info in saved.items():
        layer = adapters.get(name)
        if layer is None:
            raise ValueError(f"saved adapter {name!r} has no adapter in the model: inject the same targets first")
        kind = "svd" if isinstance(layer, SVDLinear) else "lora"
        if kind != info["type"]:
            raise ValueError(f"{name}: saved a {info['type']} adapter but the model has {kind}: inject with the "
                             "same method")
        if [layer.out_features, layer.in_features] != info["shape"]:
            raise ValueError(f"{name}: saved shape {info['shape']} != model shape "
                             f"{[layer.out_features, layer.in_features]}: load into the same base model")
        # The sidecar is not under the checksum: its rank must agree with the tensors themselves.
        rank, d_out, d_in = info.get("rank"), layer.out_features, layer.in_features
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"{name}: rank {rank!r} in {path} is not a non-negative integer: re-save the adapters")
        lam = tensors.get(f"{name}.lam")
        if lam is not None and tuple(lam.shape) == (rank, 1):      # files of peft's layers before lam was flattened
            tensors[f"{name}.lam"] = lam.reshape(-1)
        want = ({"P": (d_out, rank), "lam": (rank,), "Q": (rank, d_in)} if kind == "svd"
                else {"A": (rank, d_in), "B": (d_out, rank)})
        bad = [a for a, shape in want.items() if f"{name}.{a}" not in tensors
               or tuple(tensors[f"{name}.{a}"].shape) != shape]
        if bad:
            got = tuple(tensors[f"{name}.{bad[0]}"].shape) if f"{name}.{bad[0]}" in tensors else "missing"
            raise ValueError(f"{name}: saved {bad[0]} {got} does not fit rank {rank} and shape ({d_out}, {d_in}) "
                             f"in {path}: the file was edited or mismatched; re-save the adapters")
        if not isinstance(info.get("scaling"), (int, float)) or isinstance(info.get("scaling"), bool):
            raise ValueError(f"{name}: scaling {info.get('scaling')!r} in {path} is not a number: re-save the adapters")
    extras = {k[len("extra::"):]: v for k, v in tensors.items() if k.startswith("extra::")}
    params = dict(model.named_parameters())
    for key, value in extras.items():
        if key not in params or params[key].shape != value.shape:
            raise ValueError(f"saved extra parameter {key!r} does not match the model: rebuild the same head")
    for name, info in saved.items():
        layer = adapters[name]
        names = ("P", "lam", "Q") if info["type"] == "svd" else ("A", "B")
        layer.set_factors(**{attr: tensors[f"{name}.{attr}"] for attr in names})
        if info["type"] == "svd":
            layer.rank_mask = torch.ones(info["rank"], dtype=torch.bool, device=layer.lam.device)
        layer.scaling = info["scaling"]
    for key, value in extras.items():
        params[key].copy_(value)
    return meta


@torch.no_grad()
def export_lora(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Fold ``lam`` into the factors: an equivalent plain LoRA ``(state_dict, rank_pattern)``.

    ``B = (s_svd / s_lora) · P_kept · diag(lam_kept)``, ``A = Q_kept`` with ``s_lora = α / r_k`` and
    ``α = s_svd · r0`` the AdaLoRA alpha, so that a ``LoRALinear`` injected with
    ``AdapterConfig(method="lora", alpha=α, rank_pattern=rank_pattern)`` has the same ``delta_weight()``.
    """
    state, pattern = {}, {}
    for name, layer in find_adapters(model).items():
        if isinstance(layer, LoRALinear):
            state[f"{name}.A"], state[f"{name}.B"] = layer.A.detach().clone(), layer.B.detach().clone()
            pattern[name] = layer.rank
            continue
        keep = layer.rank_mask.nonzero().flatten()
        r = keep.numel()
        s_lora = (layer.scaling * layer.r0) / r if r > 0 else 0.0
        ratio = layer.scaling / s_lora if r > 0 else 0.0
        state[f"{name}.A"] = layer.Q[keep, :].detach().clone()
        state[f"{name}.B"] = (layer.P[:, keep] * layer.lam[keep]).detach() * ratio
        pattern[name] = r
    return state, pattern
