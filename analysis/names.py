"""Module names -> (layer, matrix type): the rows and columns of every rank-allocation figure.

Adapted modules are identified by their dotted names only (that is all a run folder keeps), so
the matrix type is read off the name. Known families (BERT/DeBERTa/RoBERTa, DistilBERT, GPT-2,
LLaMA/Mistral, OPT/BART, T5) map to the paper's types q, k, v, o, ffn-in, ffn-out; anything else
falls back to its last name component so an unknown architecture still gets a readable figure.
"""
from __future__ import annotations

import re

import pandas as pd

# Column order of the heatmaps: the order the AdaLoRA paper draws them in (attention, then FFN).
MATRIX_TYPES = ("q", "k", "v", "qkv", "o", "ffn-in", "ffn-gate", "ffn-out")

# Suffix rules, tried longest first. "output.dense" must not match "attention.output.dense",
# hence the attention rule is listed and matched before the bare one.
_SUFFIX_RULES: tuple[tuple[str, str], ...] = (
    ("attention.self.query", "q"), ("attention.self.key", "k"), ("attention.self.value", "v"),
    ("attention.output.dense", "o"), ("intermediate.dense", "ffn-in"), ("output.dense", "ffn-out"),
    ("attn.c_attn", "qkv"), ("attn.c_proj", "o"), ("mlp.c_fc", "ffn-in"), ("mlp.c_proj", "ffn-out"),
    ("DenseReluDense.wi", "ffn-in"), ("DenseReluDense.wo", "ffn-out"),
)
_LAST_RULES = {
    "query": "q", "key": "k", "value": "v",
    "query_proj": "q", "key_proj": "k", "value_proj": "v",
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "q_lin": "q", "k_lin": "k", "v_lin": "v", "out_lin": "o",
    "q": "q", "k": "k", "v": "v", "o": "o",
    "c_attn": "qkv", "c_proj": "o", "c_fc": "ffn-in",
    "fc1": "ffn-in", "fc2": "ffn-out", "lin1": "ffn-in", "lin2": "ffn-out",
    "up_proj": "ffn-in", "gate_proj": "ffn-gate", "down_proj": "ffn-out",
    "wi": "ffn-in", "wo": "ffn-out",
}
_INT = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def matrix_type(name: str) -> str:
    """`encoder.layer.3.attention.self.query` -> "q"; unknown names -> their last component."""
    for suffix, kind in _SUFFIX_RULES:
        if name == suffix or name.endswith("." + suffix):
            return kind
    last = name.rsplit(".", 1)[-1]
    return _LAST_RULES.get(last, last)


def layer_index(name: str) -> int | None:
    """First integer component of the name (`encoder.layer.3.output.dense` -> 3), or None."""
    m = _INT.search(name)
    return int(m.group(1)) if m else None


def layer_group(name: str) -> str:
    """Name prefix before the layer index (`encoder.layer`), so encoder and decoder stacks of an
    encoder-decoder model get separate rows instead of being summed into one."""
    m = _INT.search(name)
    return name[: m.start()] if m else ""


def module_table(names) -> pd.DataFrame:
    """One row per module: module, group, layer, mtype, row (the heatmap row label).

    When two modules of one layer map to the same type (T5's self- and cross-attention `q`),
    the type is qualified with the parent component (`EncDecAttention.q`) so no cell holds two
    matrices.
    """
    names = list(dict.fromkeys(names))
    df = pd.DataFrame({"module": names})
    df["group"] = [layer_group(n) for n in names]
    df["layer"] = pd.array([layer_index(n) for n in names], dtype="Int64")
    df["mtype"] = [matrix_type(n) for n in names]
    dup = df.duplicated(["group", "layer", "mtype"], keep=False)
    df.loc[dup, "mtype"] = [".".join(n.split(".")[-2:]) for n in df.loc[dup, "module"]]
    several_groups = df["group"].nunique() > 1
    df["row"] = [
        ("(no layer)" if pd.isna(layer) else
         (f"{g.rstrip('.').split('.')[0]} {layer}" if several_groups else str(layer)))
        for g, layer in zip(df["group"], df["layer"])
    ]
    return df


def type_order(types) -> list[str]:
    """Known types in paper order, then the rest alphabetically."""
    types = set(types)
    return [t for t in MATRIX_TYPES if t in types] + sorted(types - set(MATRIX_TYPES))


def row_order(table: pd.DataFrame) -> list[str]:
    """Heatmap rows top to bottom: by stack (first appearance), then layer, unlayered last."""
    groups = list(dict.fromkeys(table["group"]))
    keyed = table.assign(_n=table["layer"].isna(), _g=table["group"].map(groups.index),
                         _l=table["layer"].fillna(-1).astype("int64"))
    return list(dict.fromkeys(keyed.sort_values(["_n", "_g", "_l"], kind="stable")["row"]))
