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


# -- messages name what is available; options reach the layers --------------------------------------
def test_no_match_lists_only_linear_layers_first_40_then_dots():
    with pytest.raises(ValueError) as e:
        adalora.inject(Net(), adalora.AdapterConfig(targets=["norm"]))       # a LayerNorm: not adaptable
    assert str(e.value) == ("targets=['norm'] matched no linear layer; available: layers.0.query, layers.0.key, "
                            "layers.0.value, layers.0.ffn, layers.1.query, layers.1.key, layers.1.value, "
                            "layers.1.ffn, classifier")
    with pytest.raises(ValueError, match=r"^target_regex='nothing_\.\*' matched no linear layer; available: "
                                         r"layers\.0\.query, "):
        adalora.inject(Net(), adalora.AdapterConfig(targets=[], target_regex="nothing_.*"))
    for n, tail in ((40, "38, 39"), (41, "38, 39 ..."), (45, "38, 39 ...")):
        with pytest.raises(ValueError) as e:
            adalora.inject(nn.Sequential(*[nn.Linear(2, 2) for _ in range(n)]), adalora.AdapterConfig(targets=["x"]))
        assert str(e.value) == "targets=['x'] matched no linear layer; available: " + \
            ", ".join(str(i) for i in range(38)) + ", " + tail, n
    with pytest.raises(ValueError) as e:
        adalora.inject(nn.Sequential(nn.ReLU()), adalora.AdapterConfig(targets=["x"]))
    assert str(e.value) == "targets=['x'] matched no linear layer; available: (none)"


def test_unused_target_and_rank_pattern_messages_suggest_names():
    with pytest.raises(ValueError) as e:
        adalora.inject(Net(), adalora.AdapterConfig(targets=["query", "nope"]))
    assert str(e.value) == ("targets ['nope'] matched no linear layer; fix the names (e.g. one of "
                            "['classifier', 'ffn', 'key', 'query', 'value'])")
    with pytest.raises(ValueError) as e:
        adalora.inject(Net(), adalora.AdapterConfig(targets=["query", "key", "value", "ffn"], rank_pattern={"nope": 2}))
    assert str(e.value) == ("rank_pattern keys ['nope'] match no adapted module; use names from ['layers.0.query', "
                            "'layers.0.key', 'layers.0.value', 'layers.0.ffn', 'layers.1.query', 'layers.1.key']...")
    m = Net()
    adalora.inject(m, adalora.AdapterConfig(targets=["query"]))
    with pytest.raises(ValueError, match=r"^model already has adapters: inject once per model \(use find_adapters "
                                         r"to get them\)$"):
        adalora.inject(m, adalora.AdapterConfig(targets=["key"]))


def test_top_level_targets_are_replaced_in_place():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    ad = adalora.inject(m, adalora.AdapterConfig(targets=["0", "2"], init_rank=2))
    assert m[0] is ad["0"] and m[2] is ad["2"] and isinstance(m[1], nn.ReLU)


def test_options_reach_the_layers():
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(200, 300))
    ad = adalora.inject(big, adalora.AdapterConfig(targets=["0"], init_rank=8, alpha=4.0, init_std=0.5,
                                                   dropout=0.25))
    a = ad["0"]
    assert 0.45 < float(a.P.detach().std()) < 0.55 and 0.45 < float(a.Q.detach().std()) < 0.55
    assert a.drop.p == 0.25 and a.scaling == 4.0 / 8
    for rslora, dropout in ((True, 0.0), (False, 0.3)):
        lad = adalora.inject(Net(), adalora.AdapterConfig(method="lora", targets=["query"], init_rank=4, alpha=8.0,
                                                          rslora=rslora, dropout=dropout))
        layer = lad["layers.0.query"]
        assert layer.scaling == (8.0 / 2.0 if rslora else 8.0 / 4.0)
        assert (layer.drop is None) if dropout == 0 else (layer.drop.p == dropout)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_scaling_by_hand(method):
    from adalora.inject import scaling
    cfg = lambda **kw: adalora.AdapterConfig(method=method, targets=["query"], alpha=6.0, **kw)   # noqa: E731
    assert scaling(cfg(), 3) == 2.0 and scaling(cfg(), 0) == 0.0
    assert scaling(cfg(rslora=True), 4) == 3.0
    assert scaling(cfg(scale_rank=2.0), 3) == 3.0 and scaling(cfg(scale_rank=2.0), 0) == 0.0
    assert scaling(cfg(rslora=True, scale_rank=9.0), 4) == 2.0
    ad = adalora.inject(Net(), adalora.AdapterConfig(method=method, targets=["query"], init_rank=4, alpha=6.0,
                                                     rank_pattern={"layers.1.query": 0}, scale_rank=2.0))
    assert [a.scaling for a in ad.values()] == [3.0, 0.0]


def test_bias_options_and_suffix_extras():
    m = Net()
    adalora.inject(m, adalora.AdapterConfig(targets=["query"], init_rank=2))
    adalora.mark_only_adapters_trainable(m, extra=("ffn",), bias="all")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    biases = {n for n, _ in m.named_parameters() if n.endswith("bias")}
    assert trainable == biases | {f"layers.{i}.query.{p}" for i in (0, 1) for p in ("P", "lam", "Q")} | {
        f"layers.{i}.ffn.weight" for i in (0, 1)}
    assert "norm.bias" in trainable and "norm.weight" not in trainable
    with pytest.raises(ValueError, match=r"^bias='some': use 'none', 'all' or 'adapter_only'$"):
        adalora.mark_only_adapters_trainable(m, bias="some")
    with pytest.raises(ValueError, match=r"^model has no adapters: call adalora\.inject\(model, cfg\) first$"):
        adalora.mark_only_adapters_trainable(Net())


def test_merge_and_unmerge_a_named_set():
    torch.manual_seed(0)
    m = Net().double()
    ad = adalora.inject(m, adalora.AdapterConfig(targets=["query"], init_rank=2))
    x = torch.randn(3, 8, dtype=torch.float64)
    plain = m(x)
    adalora.add_adapter(m, "b")
    with adalora.use_adapter(m, "b"):
        with torch.no_grad():
            for a in adalora.find_adapters(m).values():
                a.lam.normal_()
        with_b = m(x)
    assert not torch.allclose(with_b, plain)
    adalora.merge(m, "b")                                  # activates b, then merges it
    assert adalora.active_adapter(m) == "b" and all(a.merged for a in adalora.find_adapters(m).values())
    assert torch.allclose(m(x), with_b, atol=1e-12)
    with pytest.raises(ValueError, match=r"^adapter set 'default' is not the active one \('b'\): only the active "
                                         r"set can be merged or unmerged$"):
        adalora.unmerge(m, "default")
    assert all(a.merged for a in adalora.find_adapters(m).values())       # refused before touching
    adalora.unmerge(m, "b")
    assert not any(a.merged for a in adalora.find_adapters(m).values())
    adalora.set_adapter(m, "default")
    assert torch.allclose(m(x), plain, atol=1e-12)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_fuse_reaches_every_adapter_from_the_config_and_set_fuse_changes_it(method):
    from adalora.layers import LoRALinear, SVDLinear
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    adalora.inject(model, adalora.AdapterConfig(method=method, targets=["0", "2"], init_rank=2, fuse="stack"))
    layers = adalora.find_adapters(model)
    assert len(layers) == 2 and all(a.fuse == "stack" for a in layers.values())
    adalora.set_fuse(model, "auto")
    assert all(a.fuse == "auto" for a in layers.values())
    cls = SVDLinear if method == "adalora" else LoRALinear
    assert cls(nn.Linear(3, 3), 2, 1.0, fuse="stack").fuse == "stack"
    assert cls(nn.Linear(3, 3), 2, 1.0).fuse == "none"                 # the reference path by default
    with pytest.raises(ValueError, match=r"^model has no adapters: call adalora.inject\(model, cfg\) first$"):
        adalora.set_fuse(nn.Linear(3, 3), "stack")
    with pytest.raises(ValueError, match="fuse='fast'"):
        adalora.set_fuse(model, "fast")
