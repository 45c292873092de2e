import pytest
import torch
import torch.nn as nn

import adalora


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ffn = nn.Linear(8, 16)

    def forward(self, x):
        return self.ffn(self.query(x) + self.key(x) + self.value(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(16, 2)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.classifier(self.layers[1](x) + self.layers[0](x))


def test_suffix_targets_in_module_order():
    m = Net()
    ad = adalora.inject(m, adalora.AdapterConfig(targets=["query", "value"], init_rank=2))
    assert list(ad) == ["layers.0.query", "layers.0.value", "layers.1.query", "layers.1.value"]
    assert adalora.find_adapters(m) == ad


def test_regex_targets():
    m = Net()
    ad = adalora.inject(m, adalora.AdapterConfig(targets=[], target_regex=r"layers\.1\.(key|ffn)", init_rank=2))
    assert list(ad) == ["layers.1.key", "layers.1.ffn"]


def test_unknown_target_lists_available_names():
    with pytest.raises(ValueError, match="matched no linear layer.*layers.0.query"):
        adalora.inject(Net(), adalora.AdapterConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"\['nope'\] matched no linear layer"):
        adalora.inject(Net(), adalora.AdapterConfig(targets=["query", "nope"]))


def test_double_injection_raises():
    m = Net()
    adalora.inject(m, adalora.AdapterConfig(targets=["query"]))
    with pytest.raises(ValueError, match="already has adapters"):
        adalora.inject(m, adalora.AdapterConfig(targets=["key"]))


def test_rank_pattern_longest_suffix_wins():
    cfg = adalora.AdapterConfig(method="lora", targets=["query", "ffn"], init_rank=4,
                                rank_pattern={"query": 1, "layers.1.query": 0, "ffn": 3})
    ad = adalora.inject(Net(), cfg)
    assert {n: a.rank for n, a in ad.items()} == {"layers.0.query": 1, "layers.0.ffn": 3,
                                                 "layers.1.query": 0, "layers.1.ffn": 3}
    with pytest.raises(ValueError, match="rank_pattern keys"):
        adalora.inject(Net(), adalora.AdapterConfig(targets=["query"], rank_pattern={"ffn": 2}))


def test_mark_only_adapters_trainable():
    m = Net()
    ad = adalora.inject(m, adalora.AdapterConfig(targets=["query"], init_rank=2))
    adalora.mark_only_adapters_trainable(m, extra=("classifier",))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.query.{p}" for i in (0, 1) for p in ("P", "lam", "Q")} | {
        "classifier.weight", "classifier.bias"}
    adalora.mark_only_adapters_trainable(m, bias="adapter_only")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "layers.0.query.base.bias" in trainable and "classifier.bias" not in trainable
    with pytest.raises(ValueError, match="match no module"):
        adalora.mark_only_adapters_trainable(m, extra=("head",))
    assert adalora.count_parameters(m) == sum(p.numel() for a in ad.values() for p in (a.P, a.lam, a.Q)) + 16


def test_merge_model_equals_unmerged_outputs():
    torch.manual_seed(0)
    m = Net().double()
    ad = adalora.inject(m, adalora.AdapterConfig(targets=["query", "ffn"], init_rank=3))
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()
    x = torch.randn(5, 8, dtype=torch.float64)
    y = m(x)
    adalora.merge(m)
    assert torch.allclose(m(x), y, atol=1e-12)
    adalora.unmerge(m)
    assert torch.allclose(m(x), y, atol=1e-12)
