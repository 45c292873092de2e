"""Shared look of every figure: fixed colours per method and per matrix type, titles, saving.

Colours are fixed, not cycled, so AdaLoRA is the same red in the heatmap legend, the
accuracy-vs-budget plot and the learning curves of every report a team produces.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are made on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

METHOD_COLOURS = {
    "adalora": "#d62728", "lora": "#1f77b4", "svd_lora": "#ff7f0e", "full": "#2b2b2b",
    "head": "#8c8c8c", "peft_adalora": "#9467bd", "peft_lora": "#17becf",
}
# Ablations and unknown methods draw from this palette by a stable hash of their label, so a
# label keeps its colour across figures and across reports.
_EXTRA = ("#2ca02c", "#8c564b", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a",
          "#c5b0d5", "#c49c94")
TYPE_COLOURS = {"q": "#4c72b0", "k": "#55a868", "v": "#c44e52", "qkv": "#8172b2", "o": "#ccb974",
                "ffn-in": "#64b5cd", "ffn-gate": "#937860", "ffn-out": "#da8bc3"}
METHOD_NAMES = {"adalora": "AdaLoRA", "lora": "LoRA", "svd_lora": "SVD-LoRA (no pruning)",
                "full": "full fine-tuning", "head": "head only", "peft_adalora": "AdaLoRA (peft)",
                "peft_lora": "LoRA (peft)"}
LINESTYLES = ("-", "--", ":", "-.")


def method_colour(label: str) -> str:
    return METHOD_COLOURS.get(label) or _EXTRA[zlib.crc32(label.encode()) % len(_EXTRA)]


def type_colour(mtype: str) -> str:
    return TYPE_COLOURS.get(mtype) or _EXTRA[zlib.crc32(mtype.encode()) % len(_EXTRA)]


def method_name(label: str) -> str:
    """`adalora[magnitude]` -> `AdaLoRA [magnitude]`: what a legend shows."""
    method, _, ablation = label.partition("[")
    name = METHOD_NAMES.get(method, method)
    return f"{name} [{ablation}" if ablation else name


def run_title(row: pd.Series) -> str:
    """One line naming a run: method, budget, task, seed."""
    parts = [method_name(str(row.get("label", row.get("method", "?"))))]
    for key, fmt in (("budget_label", "{}"), ("task", "{}"), ("seed", "seed {:.0f}")):
        v = row.get(key)
        if v is not None and not (isinstance(v, float) and pd.isna(v)) and v != "":
            parts.append(fmt.format(v))
    return ", ".join(parts)


def save(fig, path_stem) -> list[Path]:
    """Write `<stem>.png` (for report.md) and `<stem>.pdf` (for the paper); returns both paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=130, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths
