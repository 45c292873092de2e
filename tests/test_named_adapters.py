"""Several named adapter sets on one frozen base: each active set gives the outputs of a model
that holds only that set, switching never touches the base weights, merge/unmerge act per set."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import adalora


def _base(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _fill(adapters, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.values():
            for attr in ("P", "lam", "Q") if isinstance(layer, adalora.SVDLinear) else ("A", "B"):
                p = getattr(layer, attr)
                p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_each_active_set_equals_a_model_holding_only_that_set(tmp_path, method):
    cfg = adalora.AdapterConfig(method=method, targets=["0", "2"], init_rank=3, alpha=6.0)
    x = torch.randn(5, 8)
    singles = {}
    for name, seed in (("task_a", 1), ("task_b", 2)):
        m = _base()
        _fill(adalora.inject(m, cfg), seed)
        if method == "adalora" and name == "task_b":       # a pruned set: its own ranks
            adalora.find_adapters(m)["0"].rank_mask[1] = False
            adalora.find_adapters(m)["0"].lam.data[1] = 0.0
        adalora.save_adapters(tmp_path / f"{name}.safetensors", m)
        singles[name] = m(x)

    shared = _base()
    adalora.inject(shared, cfg)
    base_before = {k: v.clone() for k, v in shared.state_dict().items() if ".base." in k}
    adalora.load_adapters(tmp_path / "task_a.safetensors", shared)
    adalora.set_adapter(shared, "default")                 # a no-op: the active set
    adalora.add_adapter(shared, "task_b", tmp_path / "task_b.safetensors")
    assert adalora.adapter_names(shared) == ["default", "task_b"]
    with pytest.raises(FileNotFoundError):
        adalora.add_adapter(shared, "task_c", tmp_path / "missing.safetensors")
    assert adalora.adapter_names(shared) == ["default", "task_b"]          # nothing half-made
    assert torch.equal(shared(x), singles["task_a"])
    adalora.set_adapter(shared, "task_b")
    assert torch.equal(shared(x), singles["task_b"])
    with adalora.use_adapter(shared, "default"):
        assert torch.equal(shared(x), singles["task_a"])
    assert adalora.active_adapter(shared) == "task_b"
    assert all(torch.equal(base_before[k], v) for k, v in shared.state_dict().items() if k in base_before)

    adalora.merge(shared, name="default")                  # per set: switch, then fold into W0
    assert torch.allclose(shared(x), singles["task_a"], atol=1e-5)
    with pytest.raises(ValueError, match="is merged into the base .*unmerge"):
        adalora.set_adapter(shared, "task_b")
    with pytest.raises(ValueError, match="'task_b' is not the active one"):
        adalora.unmerge(shared, name="task_b")
    adalora.unmerge(shared, name="default")
    adalora.set_adapter(shared, "task_b")
    assert torch.allclose(shared(x), singles["task_b"], atol=1e-5)


def test_a_fresh_set_starts_at_zero_update_and_names_are_checked():
    m = _base()
    _fill(adalora.inject(m, adalora.AdapterConfig(targets=["0"], init_rank=2)), 3)
    plain = copy.deepcopy(m)
    for layer in adalora.find_adapters(plain).values():
        layer.lam.data.zero_()
    adalora.add_adapter(m, "new")
    x = torch.randn(4, 8)
    with adalora.use_adapter(m, "new"):
        assert torch.equal(m(x), plain(x))                 # ΔW = 0 at init, as inject
        assert all(p.requires_grad for p in adalora.adapter_parameters(adalora.find_adapters(m)))
    with pytest.raises(ValueError, match="no adapter set 'nope'"):
        adalora.set_adapter(m, "nope")
    with pytest.raises(ValueError, match="exists already"):
        adalora.add_adapter(m, "new")
    with pytest.raises(ValueError, match="is active"):
        adalora.delete_adapter(m, "default")
    adalora.delete_adapter(m, "new")
    assert adalora.adapter_names(m) == ["default"]
    with pytest.raises(ValueError, match="call adalora.inject first"):
        adalora.add_adapter(_base(), "x")


def test_a_set_name_must_be_a_string_and_a_refused_merge_keeps_the_active_set():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64))
    adalora.quantize_model(m, targets=["0"], compute_dtype=torch.float32)
    adalora.inject(m, adalora.AdapterConfig(targets=["0"], init_rank=4, alpha=8.0))
    with pytest.raises(ValueError, match=r"adapter set name 3: use a non-empty string"):
        adalora.add_adapter(m, 3)
    adalora.add_adapter(m, "b")
    assert sorted(adalora.adapter_names(m)) == ["b", "default"]
    with pytest.raises(ValueError, match="cannot merge into a quantized"):
        adalora.merge(m, name="b")
    assert adalora.active_adapter(m) == "default"


def test_targets_given_as_one_string_are_refused():
    """list("12") is ["1", "2"]: a string would adapt layers 1 and 2 instead of layer 12."""
    with pytest.raises(ValueError, match=r"targets='12' is a string: pass a list .*targets=\['12'\]"):
        adalora.AdapterConfig(targets="12")
