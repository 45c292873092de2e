import json

import pytest
import torch
import torch.nn as nn

import adalora
from adalora import AdapterConfig


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def _pruned(seed=0):
    m = _net(seed)
    ad = adalora.inject(m, AdapterConfig(targets=["0", "2"], init_rank=4))
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()
        ad["0"].rank_mask.copy_(torch.tensor([True, False, True, False]))
        ad["2"].rank_mask.zero_()                      # rank 0 survives a round trip
        for a in ad.values():
            a.lam.mul_(a.rank_mask)
    return m, ad


def test_save_load_identical_outputs_and_resized(tmp_path):
    m, ad = _pruned()
    path = adalora.save_adapters(tmp_path / "adapters.safetensors", m, metadata={"task": "toy"}, extra=("4",))
    meta = json.loads((tmp_path / "adapters.json").read_text())
    assert meta["ranks"] == {"0": 2, "2": 0} and meta["metadata"] == {"task": "toy"}
    assert meta["base_params"] == sum(p.numel() for p in _net().parameters())
    fresh = _net(seed=1)
    adalora.inject(fresh, AdapterConfig(targets=["0", "2"], init_rank=4))
    adalora.load_adapters(path, fresh)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        fresh[0].base.weight.copy_(m[0].base.weight); fresh[0].base.bias.copy_(m[0].base.bias)
        fresh[2].base.weight.copy_(m[2].base.weight); fresh[2].base.bias.copy_(m[2].base.bias)
    assert torch.equal(fresh(x), m(x))
    assert fresh[0].rank == 2 and fresh[2].rank == 0 and fresh[0].scaling == m[0].scaling


def test_tampered_or_truncated_file_changes_nothing(tmp_path):
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m)
    fresh = _net(seed=1)
    ad = adalora.inject(fresh, AdapterConfig(targets=["0", "2"], init_rank=4))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or was modified"):
        adalora.load_adapters(path, fresh)
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        adalora.load_adapters(path, fresh)
    after = fresh.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_mismatched_model_is_refused_unchanged(tmp_path):
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m)
    other = _net()
    adalora.inject(other, AdapterConfig(targets=["0"], init_rank=4))
    with pytest.raises(ValueError, match="'2'"):
        adalora.load_adapters(path, other)
    lora = _net()
    adalora.inject(lora, AdapterConfig(method="lora", targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match="inject with the same method"):
        adalora.load_adapters(path, lora)


def test_export_lora_has_same_delta_weight():
    m, ad = _pruned()
    state, pattern = adalora.export_lora(m)
    assert pattern == {"0": 2, "2": 0}
    alpha = ad["0"].scaling * ad["0"].r0
    lm = _net()
    lad = adalora.inject(lm, AdapterConfig(method="lora", targets=["0", "2"], init_rank=4, alpha=alpha,
                                           rank_pattern=pattern))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not unexpected
    for name in ad:
        assert torch.allclose(lad[name].delta_weight(), ad[name].delta_weight(), atol=1e-12)
