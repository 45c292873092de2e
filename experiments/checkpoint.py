"""checkpoint.pt: everything needed to continue a run bitwise-identically on CPU.

Written atomically (temp file in the same folder, fsync, os.replace), so a kill during the
write leaves the previous complete checkpoint. Holds only tensors and primitive containers, so
it loads with ``torch.load(weights_only=True)``: no code runs from a file someone hands you.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from torch import nn

import adalora

from .config import ConfigError
from .runlog import atomic_file

NAME = "checkpoint.pt"


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Trainable parameters plus adapter buffers (rank masks), by type, not by name."""
    sd = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, mod in model.named_modules():
        if isinstance(mod, adalora.AdapterLayer):
            for bn, b in mod.named_buffers(recurse=False):
                sd[f"{name}.{bn}"] = b.detach().clone()
    return sd


def load_trainable_state(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    missing = [k for k in sd if k not in own]
    if missing:
        raise ValueError(f"checkpoint tensor '{missing[0]}' has no place in this model: resume "
                         "with the config of the checkpointed run")
    with torch.no_grad():
        for k, v in sd.items():
            if own[k].shape != v.shape:
                raise ValueError(f"checkpoint tensor '{k}' has shape {tuple(v.shape)}, model has "
                                 f"{tuple(own[k].shape)}")
            own[k].copy_(v)


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                     int(np_state[2]), int(np_state[3]), float(np_state[4]))}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: Dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    version, key, gauss_next = s["python"]
    random.setstate((version, tuple(key), gauss_next))
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(run_dir: Path, state: Dict[str, Any]) -> Path:
    """Write ``state`` atomically: a SIGKILL at any moment leaves the previous complete file."""
    path = Path(run_dir) / NAME
    for stale in Path(run_dir).glob(f".{NAME}.*.tmp"):   # left by a writer killed mid-save
        stale.unlink(missing_ok=True)                    # (one writer per folder: rank 0)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    _fsync_dir(Path(run_dir))                            # the rename itself survives power loss
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                                           # not supported (e.g. Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(run_dir: Path) -> Dict[str, Any]:
    """Tensors and plain containers only (``weights_only=True``): a file carrying pickled
    objects is refused before any of its code can run."""
    path = Path(run_dir) / NAME
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path} holds pickled objects other than tensors and plain "
                          "containers; refused (torch.load weights_only=True). Resume only "
                          f"from checkpoints this toolkit wrote ({_first_line(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                          f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__
