"""Local CSV / TSV / JSONL files with named text (and optional pair) and label columns.

``task.dataset=file:train.csv`` hash-splits one file; ``file:data/`` reads
``train``/``validation``(or ``val``/``dev``)/``test`` files of one extension from a folder.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Dict, List, Optional

from ..config import ConfigError, TaskConfig
from . import Example, TextData, encode_labels, split_by_hash

csv.field_size_limit(2 ** 31 - 1)
EXTS = (".csv", ".tsv", ".jsonl")


def read_records(path: str) -> List[Dict[str, object]]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTS:
        raise ConfigError(f"file '{path}': unsupported extension; use .csv, .tsv or .jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"file '{path}' does not exist")
    try:
        # utf-8-sig: a byte-order mark (Excel's habit) must not become part of the first column name
        with open(path, encoding="utf-8-sig", newline="") as f:
            if ext == ".jsonl":
                rows = [json.loads(line) for line in f if line.strip()]
                for i, r in enumerate(rows):
                    if not isinstance(r, dict):
                        raise ConfigError(f"file '{path}': JSON line {i + 1} is not an object; "
                                          "write one {{\"text\": ..., \"label\": ...}} per line")
                return rows
            return list(csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ","))
    except UnicodeDecodeError as e:
        raise ConfigError(f"file '{path}' is not UTF-8 text ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        raise ConfigError(f"file '{path}': invalid JSON line ({e.msg})")


def to_examples(records: List[Dict[str, object]], cfg: TaskConfig, where: str,
                names: Optional[List[str]] = None) -> tuple[List[Example], List[str]]:
    if not records:
        raise ConfigError(f"{where} has no rows")
    cols = list(records[0].keys())
    for c in (cfg.text_column, cfg.label_column, cfg.text_pair_column):
        if c is not None and c not in cols:
            raise ConfigError(f"{where} has no column '{c}' (columns: {', '.join(map(str, cols))});"
                              f" set task.text_column / task.label_column")
    needed = [c for c in (cfg.text_column, cfg.label_column, cfg.text_pair_column) if c is not None]
    for i, r in enumerate(records):
        missing = [c for c in needed if r.get(c) is None or str(r.get(c)).strip() == ""]
        if missing:
            raise ConfigError(f"{where}: row {i + 1} has no value for '{missing[0]}'; "
                              "fill or drop incomplete rows")
    raw = [str(r[cfg.label_column]).strip() for r in records]
    ids, names = encode_labels(raw, names)
    if len(names) < 2:
        raise ConfigError(f"{where}: every row has label '{raw[0]}'; a classifier needs two classes or more")
    pc = cfg.text_pair_column
    return [Example(str(r[cfg.text_column]), y, None if pc is None else str(r[pc]))
            for r, y in zip(records, ids)], names


def _find(folder: str, stems: tuple[str, ...]) -> Optional[str]:
    for stem in stems:
        for ext in EXTS:
            p = os.path.join(folder, stem + ext)
            if os.path.isfile(p):
                return p
    return None


def load_file(path: str, cfg: TaskConfig) -> TextData:
    if os.path.isdir(path):
        files = {s: _find(path, stems) for s, stems in
                 (("train", ("train",)), ("val", ("validation", "val", "dev")), ("test", ("test",)))}
        if files["train"] is None:
            raise ConfigError(f"folder '{path}' has no train.csv|tsv|jsonl")
        recs = {s: read_records(p) for s, p in files.items() if p is not None}
        all_raw = [str(r.get(cfg.label_column)).strip() for rs in recs.values() for r in rs]
        names = sorted(set(all_raw))
        out = {s: to_examples(rs, cfg, files[s], names)[0] for s, rs in recs.items()}
        if "val" not in out or "test" not in out:
            s = split_by_hash(out["train"], cfg)
            out.setdefault("val", s["val"]), out.setdefault("test", s["test"])
            out["train"] = s["train"]
        return TextData(out["train"], out["val"], out["test"], names)
    rows, names = to_examples(read_records(path), cfg, f"file '{path}'")
    s = split_by_hash(rows, cfg)
    return TextData(s["train"], s["val"], s["test"], names)
