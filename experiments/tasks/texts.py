"""Local files for language-model tasks: ``task.objective=answer`` reads ``task.prompt_column``
and ``task.response_column`` (one answer per prompt, open-ended: scored by exact match);
``task.objective=corpus`` reads ``task.text_column`` only. One file is hash-split; a folder
gives its train/validation/test files, as for classification files.
"""
from __future__ import annotations

import os
from typing import List

from ..config import ConfigError, TaskConfig
from . import Example, TextData, split_by_hash
from .files import _find, read_records


def to_examples(records, cfg: TaskConfig, where: str) -> List[Example]:
    if not records:
        raise ConfigError(f"{where} has no rows")
    cols = [cfg.prompt_column, cfg.response_column] if cfg.objective == "answer" else [cfg.text_column]
    have = list(records[0].keys())
    for c in cols:
        if c not in have:
            key = "task.prompt_column / task.response_column" if cfg.objective == "answer" \
                else "task.text_column"
            raise ConfigError(f"{where} has no column '{c}' (columns: {', '.join(map(str, have))});"
                              f" set {key}")
    out = []
    for i, r in enumerate(records):
        missing = [c for c in cols if r.get(c) is None or str(r.get(c)).strip() == ""]
        if missing:
            raise ConfigError(f"{where}: row {i + 1} has no value for '{missing[0]}'; "
                              "fill or drop incomplete rows")
        out.append(Example(str(r[cols[0]]), -1, None, str(r[cols[1]]) if len(cols) > 1 else None))
    return out


def load_texts(path: str, cfg: TaskConfig) -> TextData:
    if os.path.isdir(path):
        files = {s: _find(path, stems) for s, stems in
                 (("train", ("train",)), ("val", ("validation", "val", "dev")), ("test", ("test",)))}
        if files["train"] is None:
            raise ConfigError(f"folder '{path}' has no train.csv|tsv|jsonl")
        out = {s: to_examples(read_records(p), cfg, p) for s, p in files.items() if p is not None}
        if "val" not in out or "test" not in out:
            s = split_by_hash(out["train"], cfg)
            out.setdefault("val", s["val"]), out.setdefault("test", s["test"])
            out["train"] = s["train"]
        return TextData(out["train"], out["val"], out["test"], [])
    s = split_by_hash(to_examples(read_records(path), cfg, f"file '{path}'"), cfg)
    return TextData(s["train"], s["val"], s["test"], [])
