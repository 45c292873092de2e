"""EVA's allocation against peft's ``init_lora_weights="eva"`` (``get_eva_state_dict``) on the same
random BERT and the same batches (padding masked in both): every module gets peft's rank, and
Q's rows are peft's components up to sign (peft: incremental low-rank PCA stopped at tau; here an
exact PCA of the same rows). Measured with tau=0.99: 12/12 ranks equal, |cos| 0.92 to 0.998."""
from __future__ import annotations

import copy

import pytest
import torch

import adalora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _model_and_batches():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    model = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 100, (16, 12), generator=g)
        mask = torch.ones(16, 12, dtype=torch.long)
        mask[:, 9:] = (torch.rand(16, 3, generator=g) > 0.5).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return model, batches


def test_eva_allocation_agrees_with_peft():
    from peft import LoraConfig
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import get_eva_state_dict
    model, batches = _model_and_batches()
    pc = LoraConfig(r=2, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(rho=1.5, tau=0.99))
    theirs = get_eva_state_dict(copy.deepcopy(model), batches, pc, show_progress_bar=False)
    ours_model = copy.deepcopy(model)
    adapters = adalora.inject(ours_model, adalora.AdapterConfig(targets=TARGETS, init_rank=3))   # r0 = rho · r
    alloc = adalora.EVAAllocator(adapters, adalora.ScheduleConfig(target_rank=2, total_steps=10, init_warmup=0,
                                                                  final_warmup=2))
    rec = alloc.init_from_data(lambda b: ours_model(**b), batches)
    assert set(rec.ranks) == set(theirs)
    assert rec.ranks == {k: v.shape[0] for k, v in theirs.items()}
    for name, comps in theirs.items():
        cos = (adapters[name].Q.detach().double() * comps.double()).sum(1).abs()
        assert cos.min() > 0.9, (name, cos)
