"""peft-format folders: what save_peft writes, peft loads to the same outputs; what peft saves,
load_peft reads to the same outputs; bad folders are refused with the model unchanged."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import adalora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _bert(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=2 * hidden, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    return transformers.GPT2Model(cfg).eval()


def _ids():
    return torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))


def _out(model):
    with torch.no_grad():
        return model(input_ids=_ids()).last_hidden_state


def _randomise(adapters, prune=None):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in adapters.items():
            for attr in ("P", "lam", "Q") if isinstance(layer, adalora.SVDLinear) else ("A", "B"):
                p = getattr(layer, attr)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if prune is not None and isinstance(layer, adalora.SVDLinear):
                layer.rank_mask = prune(name, layer.r0)
                layer.lam.data[~layer.rank_mask] = 0.0


def test_lora_folder_loads_in_peft_with_our_outputs(tmp_path):
    base = _bert()
    model = copy.deepcopy(base)
    adapters = adalora.inject(model, adalora.AdapterConfig(method="lora", targets=ALL, init_rank=4, alpha=8.0,
                                                           rank_pattern={"layer.1.output.dense": 2,
                                                                         "layer.0.attention.self.key": 0}))
    _randomise(adapters)
    adalora.save_peft(tmp_path, model, base_model_name_or_path="tiny-bert")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "encoder.layer.0.attention.self.key" not in cfg["target_modules"]        # rank 0: left out
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_out(loaded), _out(model), atol=1e-5, rtol=0)


def test_pruned_adalora_folder_loads_in_peft_as_lora_with_our_outputs(tmp_path):
    base = _bert()
    model = copy.deepcopy(base)
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=ALL, init_rank=6, alpha=12.0))
    # mixed pruned ranks, one module at rank 0
    keep = {n: torch.tensor([i % (k % 3 + 2) == 0 for i in range(6)]) for k, n in enumerate(adapters)}
    keep["encoder.layer.0.intermediate.dense"] = torch.zeros(6, dtype=torch.bool)
    _randomise(adapters, prune=lambda n, r0: keep[n])
    adalora.save_peft(tmp_path, model)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == len(adapters) - 1
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_out(loaded), _out(model), atol=1e-5, rtol=0)
    ranks = {n: int(k.sum()) for n, k in keep.items() if k.any()}
    for name, r in ranks.items():
        layer = loaded.base_model.model.get_submodule(name)
        assert layer.lora_A["default"].weight.shape[0] == r


def test_gpt2_conv1d_folder_loads_in_peft(tmp_path):
    base = _gpt2()
    model = copy.deepcopy(base)
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["c_attn", "c_proj", "c_fc"], init_rank=3))
    _randomise(adapters)
    adalora.save_peft(tmp_path, model)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(_out(loaded), _out(model), atol=1e-5, rtol=0)


def test_peft_lora_folder_reads_into_our_layers(tmp_path):
    base = _bert()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
        rank_pattern={"encoder.layer.0.attention.self.query": 2}, alpha_pattern={"value": 3.0}))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    layers = adalora.load_peft(tmp_path, ours)
    assert layers["encoder.layer.0.attention.self.query"].rank == 2
    assert layers["encoder.layer.1.attention.self.value"].scaling == pytest.approx(3.0 / 4)
    assert torch.allclose(_out(ours), _out(pm.eval()), atol=1e-5, rtol=0)


def test_peft_adalora_folder_reads_with_its_masks(tmp_path):
    base = _bert()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=4, target_r=2, lora_alpha=8, target_modules=["query", "value"], total_step=100, tinit=0, tfinal=10))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
            if "lora_E" in n and "layer.0.attention.self.query" in n:
                p[1:3] = 0.0                               # pruned, as peft's masking leaves them
    pm.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    layers = adalora.load_peft(tmp_path, ours)
    q = layers["encoder.layer.0.attention.self.query"]
    assert isinstance(q, adalora.SVDLinear) and q.rank_mask.tolist() == [True, False, False, True]
    assert torch.allclose(_out(ours), _out(pm.eval()), atol=1e-5, rtol=0)


def test_bad_folders_name_the_problem_and_leave_the_model_unchanged(tmp_path):
    base = _bert()
    model = copy.deepcopy(base)
    adapters = adalora.inject(model, adalora.AdapterConfig(method="lora", targets=["query"], init_rank=2))
    _randomise(adapters)
    adalora.save_peft(tmp_path / "ok", model)
    before = {k: v.clone() for k, v in _bert(hidden=48).state_dict().items()}
    wider = _bert(hidden=48)
    with pytest.raises(ValueError, match="do not fit the model's"):
        adalora.load_peft(tmp_path / "ok", wider)
    assert not adalora.find_adapters(wider)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())
    gpt = _gpt2()
    with pytest.raises(ValueError, match="is not in the model: was the folder saved for another base model"):
        adalora.load_peft(tmp_path / "ok", gpt)
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_model.safetensors").write_bytes((tmp_path / "ok" / "adapter_model.safetensors").read_bytes())
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type 'IA3' is not supported"):
        adalora.load_peft(tmp_path / "ia3", _bert())
    with pytest.raises(FileNotFoundError, match="adapter_config.json does not exist"):
        adalora.load_peft(tmp_path / "nowhere", _bert())
    with pytest.raises(ValueError, match="already has adapters"):
        adalora.load_peft(tmp_path / "ok", model)


def test_pruned_peft_adalora_folder_scales_by_init_r_as_peft_reloads(tmp_path):
    # peft saves the factors sliced to the kept rank but divides by init_r: so must load_peft.
    base = _bert()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=6, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=10, lora_alpha=8,
        target_modules=["query", "value"]))
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    for step in range(10):
        pm(input_ids=_ids()).last_hidden_state.pow(2).mean().backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path)
    saved = adalora.peft_io._read(tmp_path)[1]
    kept = [v.shape[0] for k, v in saved.items() if k.endswith((".lora_A", ".lora_A.weight"))]
    assert max(kept) < 6                               # really saved pruned
    reload = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = copy.deepcopy(base)
    layers = adalora.load_peft(tmp_path, ours)
    assert all(layer.r0 == 6 and layer.scaling == pytest.approx(8 / (6 + 1e-5)) for layer in layers.values())
    assert torch.allclose(_out(ours), _out(reload), atol=1e-5, rtol=0)
