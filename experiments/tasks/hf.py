"""Hugging Face ``datasets`` (needs network or a local cache); imported lazily so the offline
default never needs the package. ``task.dataset=hf:glue/rte`` = load_dataset("glue", "rte")."""
from __future__ import annotations

from ..config import ConfigError, TaskConfig
from . import Example, TextData, split_by_hash


def load_hf(spec: str, cfg: TaskConfig) -> TextData:
    try:
        import datasets
    except ImportError:
        raise ConfigError("task.dataset=hf:... needs the 'datasets' package: pip install datasets")
    path, _, name = spec.partition("/")
    try:
        ds = datasets.load_dataset(path, name or None)
    except Exception as e:  # network, unknown name, ...: one clear line
        raise ConfigError(f"could not load hf:{spec}: {type(e).__name__}: {str(e).splitlines()[0]}")
    train = ds["train"]
    for c in (cfg.text_column, cfg.label_column, cfg.text_pair_column):
        if c is not None and c not in train.column_names:
            raise ConfigError(f"hf:{spec} has no column '{c}' (columns: {train.column_names})")
    feat = train.features[cfg.label_column]
    names = list(getattr(feat, "names", None) or sorted(set(train[cfg.label_column])))
    index = None if hasattr(feat, "names") else {v: i for i, v in enumerate(names)}

    def conv(split) -> list:
        pc = cfg.text_pair_column
        return [Example(r[cfg.text_column], r[cfg.label_column] if index is None
                        else index[r[cfg.label_column]], None if pc is None else r[pc])
                for r in split if r[cfg.label_column] != -1]  # GLUE test labels are hidden (-1)

    rows = {"train": conv(train)}
    val_key = next((k for k in ("validation", "validation_matched", "val", "dev") if k in ds), None)
    if val_key is not None:
        rows["val"] = conv(ds[val_key])
    test = conv(ds["test"]) if "test" in ds else []
    if not test:
        # GLUE hides test labels: split the official validation set in two halves by hash
        # (val/test); with no validation split either, hash-split train three ways.
        if "val" in rows:
            s = split_by_hash(rows["val"], TaskConfig(val_fraction=0.25, test_fraction=0.4999))
            rows["val"], test = s["val"] + s["train"], s["test"]
        else:
            s = split_by_hash(rows["train"], cfg)
            rows["train"], rows["val"], test = s["train"], s["val"], s["test"]
    return TextData(rows["train"], rows.get("val", []), test, names)
