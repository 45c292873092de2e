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


# -- file names, sidecar contents, atomic writes, refusals --------------------------------------------
def _pair(p):
    return p, p.with_suffix(".json")


def test_path_rules(tmp_path):
    m, _ = _pruned()
    (tmp_path / "run.v1").mkdir()
    cases = [(tmp_path / "a.safetensors", tmp_path / "a.safetensors"),          # as given
             (tmp_path / "newdir", tmp_path / "newdir" / "adapters.safetensors"),  # no suffix: a folder
             (tmp_path / "run.v1", tmp_path / "run.v1" / "adapters.safetensors"),  # an existing folder
             (tmp_path / "b.bin", tmp_path / "b.safetensors"),                  # other suffix replaced
             (tmp_path / "d.SAFETENSORS", tmp_path / "d.safetensors"),          # ... also in capitals
             (tmp_path / "x" / "y" / "c.safetensors", tmp_path / "x" / "y" / "c.safetensors")]  # parents made
    for given, st in cases:
        assert adalora.save_adapters(given, m) == st
        assert st.is_file() and st.with_suffix(".json").is_file()
        assert adalora.read_adapters(given)[0]["ranks"] == {"0": 2, "2": 0}
    assert adalora.read_adapters(str(tmp_path / "a.safetensors"))[0]["format"] == "adalora-adapters/1"


def test_sidecar_contents_and_layout(tmp_path):
    m, ad = _pruned()
    lm = _net()
    adalora.inject(lm, AdapterConfig(method="lora", targets=["2"], init_rank=3, alpha=6.0))
    m.add_module("head", nn.Module())
    m.head.proj = nn.Linear(3, 2).double()                                   # an extra, named by its suffix
    path = adalora.save_adapters(tmp_path, m, extra=("proj",))
    text = path.with_suffix(".json").read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=1, sort_keys=True)                 # stable, diffable sidecar
    assert meta["library_version"] == adalora.__version__
    assert meta["modules"] == {
        "0": {"type": "svd", "rank": 2, "r0": 4, "scaling": ad["0"].scaling, "shape": [8, 6]},
        "2": {"type": "svd", "rank": 0, "r0": 4, "scaling": ad["2"].scaling, "shape": [8, 8]}}
    _, tensors = adalora.read_adapters(path)
    assert {k for k in tensors if k.startswith("extra::")} == {"extra::head.proj.weight", "extra::head.proj.bias"}
    assert tensors["0.kept"].tolist() == [0, 2] and tensors["0.kept"].dtype == torch.int64
    ad["0"].resize(torch.tensor([0, 2]))                                      # compacted: rank 2, r0 still 4
    lpath = adalora.save_adapters(tmp_path / "lora", lm)
    assert adalora.read_adapters(lpath)[0]["modules"] == {
        "2": {"type": "lora", "rank": 3, "r0": 3, "scaling": 2.0, "shape": [8, 8]}}
    meta = adalora.read_adapters(adalora.save_adapters(tmp_path / "c", m))[0]
    assert meta["modules"]["0"]["r0"] == 4 and meta["modules"]["0"]["rank"] == 2


def test_writes_are_atomic_beside_the_target_and_clean_up_on_failure(tmp_path, monkeypatch):
    import os
    m, _ = _pruned()
    moves = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (moves.append((a, b)), real_replace(a, b))[1])
    adalora.save_adapters(tmp_path, m)
    assert [os.path.basename(b) for _, b in moves] == ["adapters.safetensors", "adapters.json"]
    for tmp, final in moves:                   # a hidden temp file in the target's own folder: an atomic rename
        assert os.path.dirname(tmp) == os.path.dirname(final) == str(tmp_path)
        assert os.path.basename(tmp).startswith("." + os.path.basename(final) + ".")

    def fail(a, b):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        adalora.save_adapters(tmp_path / "second", m)
    assert list((tmp_path / "second").iterdir()) == []                       # no temp file left behind


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"^model has no adapters to save: call adalora\.inject first$"):
        adalora.save_adapters(tmp_path, _net())
    with pytest.raises(FileNotFoundError, match=r"adapters\.safetensors does not exist: pass the path given to "
                                                r"save_adapters$"):
        adalora.read_adapters(tmp_path)
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m)
    js = path.with_suffix(".json")
    meta = json.loads(js.read_text())
    js.write_text(json.dumps({**meta, "format": "other/1"}))
    with pytest.raises(ValueError, match=r"adapters\.json is not an adalora adapter sidecar \(format 'other/1'\)$"):
        adalora.read_adapters(path)
    js.write_text("{not json")
    with pytest.raises(ValueError, match=r"adapters\.json is not valid JSON \(.*\): the file is damaged; re-save "
                                         r"the adapters$"):
        adalora.read_adapters(path)


def test_load_refusals_name_the_module_and_the_fix(tmp_path):
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m, extra=("4",))
    more = _net()
    adalora.inject(more, AdapterConfig(targets=["0", "2", "4"], init_rank=4))
    with pytest.raises(ValueError, match=r"^model adapter '4' is not in .*: inject the same targets as the saved run$"):
        adalora.load_adapters(path, more)
    other = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    adalora.inject(other, AdapterConfig(targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match=r"^0: saved shape \[8, 6\] != model shape \[9, 6\]: load into the same "
                                         r"base model$"):
        adalora.load_adapters(path, other)
    headless = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU()).double()
    adalora.inject(headless, AdapterConfig(targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match=r"^saved extra parameter '4\.(weight|bias)' does not match the model: "
                                         r"rebuild the same head$"):
        adalora.load_adapters(path, headless)


def test_loaded_svd_adapters_keep_every_saved_value_in_their_mask(tmp_path):
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m)
    fresh = _net(seed=1)
    ad = adalora.inject(fresh, AdapterConfig(targets=["0", "2"], init_rank=4))
    adalora.load_adapters(path, fresh)
    assert ad["0"].rank_mask.dtype == torch.bool and ad["0"].rank_mask.tolist() == [True, True]
    assert ad["2"].rank_mask.shape == (0,) and ad["2"].rank_mask.dtype == torch.bool


def test_export_lora_of_mixed_adapters_and_rank_one():
    """A LoRA adapter is exported as it is; an SVD adapter kept at rank 1 folds lam into B."""
    torch.manual_seed(0)
    m = _net()
    m[0] = adalora.LoRALinear(m[0], 2, 4.0)
    m[2] = adalora.SVDLinear(m[2], 3, 6.0)
    with torch.no_grad():
        m[0].B.normal_()
        m[2].lam.copy_(torch.tensor([0.0, -2.0, 0.0], dtype=torch.float64))     # masked: lam zeroed
        m[2].rank_mask.copy_(torch.tensor([False, True, False]))
    state, pattern = adalora.export_lora(m)
    assert pattern == {"0": 2, "2": 1}
    assert torch.equal(state["0.A"], m[0].A) and torch.equal(state["0.B"], m[0].B)
    # s_svd = 6/3 = 2, s_lora = α/r = 6/1: B = (2/6) · P[:, 1] · (-2)
    assert torch.allclose(state["2.B"], (2.0 / 6.0) * m[2].P[:, 1:2] * -2.0, rtol=0, atol=1e-15)
    assert torch.equal(state["2.A"], m[2].Q[1:2])
    lora = adalora.LoRALinear(nn.Linear(8, 8).double(), 1, 6.0)
    lora.set_factors(A=state["2.A"], B=state["2.B"])
    assert torch.allclose(lora.delta_weight(), m[2].delta_weight(), rtol=0, atol=1e-14)


def test_save_with_an_extra_matching_no_module_is_refused_before_writing(tmp_path):
    m, _ = _pruned()
    with pytest.raises(ValueError, match=r"extra=\['classifier'\] match no module"):
        adalora.save_adapters(tmp_path / "a", m, extra=("classifier",))
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    adalora.save_adapters(tmp_path / "b", m, extra=("4",))
    assert any(k.startswith("extra::4.") for k in adalora.read_adapters(tmp_path / "b")[1])


def test_edited_sidecar_rank_is_refused_and_the_model_unchanged(tmp_path):
    m, _ = _pruned()
    adalora.save_adapters(tmp_path, m)
    js = tmp_path / "adapters.json"
    meta = json.loads(js.read_text())
    meta["modules"]["0"]["rank"] = 3                   # the tensors hold rank 2
    js.write_text(json.dumps(meta))
    m2 = _net(1)
    adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match=r"^0: saved P \(8, 2\) does not fit rank 3 .* re-save the adapters$"):
        adalora.load_adapters(tmp_path, m2)
    after = m2.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_into_a_merged_model_is_refused_with_w0_and_factors_unchanged(tmp_path):
    m, _ = _pruned()
    adalora.save_adapters(tmp_path, m)
    m2 = _net(1)
    ad2 = adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    with torch.no_grad():
        for a in ad2.values():
            a.lam.normal_()
    w0 = m2[0].base.weight.clone()
    adalora.merge(m2)
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    with pytest.raises(ValueError, match=r"^0 is merged into its base weight: unmerge the model first "
                                         r"\(adalora\.unmerge\)$"):
        adalora.load_adapters(tmp_path, m2)
    after = m2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    adalora.unmerge(m2)
    assert torch.allclose(m2[0].base.weight, w0, atol=1e-12, rtol=0)


def test_a_file_with_lam_saved_as_a_column_still_loads(tmp_path):
    """Files written from peft's layers before lam was flattened hold it (r, 1): the same values."""
    import hashlib

    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24))   # noqa: E731
    cfg = adalora.AdapterConfig(targets=["0", "2"], init_rank=4, alpha=8.0)
    m = make()
    ad = adalora.inject(m, cfg)
    with torch.no_grad():
        for a in ad.values():
            a.lam.normal_()
    adalora.save_adapters(tmp_path / "a", m)
    t = load_file(tmp_path / "a" / "adapters.safetensors")
    assert t["0.lam"].shape == (4,)
    t["0.lam"] = t["0.lam"].reshape(-1, 1)
    save_file(t, tmp_path / "a" / "adapters.safetensors")
    meta = json.loads((tmp_path / "a" / "adapters.json").read_text())
    meta["sha256"] = hashlib.sha256((tmp_path / "a" / "adapters.safetensors").read_bytes()).hexdigest()
    (tmp_path / "a" / "adapters.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    m2 = make()
    ad2 = adalora.inject(m2, cfg)
    adalora.load_adapters(tmp_path / "a", m2)
    assert torch.equal(ad2["0"].lam, ad["0"].lam) and ad2["0"].lam.shape == (4,)


def _edit_sidecar(root, name, **info):
    js = root / "adapters.json"
    meta = json.loads(js.read_text())
    meta["modules"][name].update(info)
    js.write_text(json.dumps(meta))


def test_one_merged_adapter_is_named_and_refused(tmp_path):
    m, _ = _pruned()
    adalora.save_adapters(tmp_path, m)
    m2 = _net(1)
    ad2 = adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    ad2["2"].merge()                                   # only the second one
    with pytest.raises(ValueError, match=r"^2 is merged into its base weight"):
        adalora.load_adapters(tmp_path, m2)


@pytest.mark.parametrize("rank", [True, -1, 2.0, "2"])
def test_a_sidecar_rank_that_is_no_non_negative_integer_is_refused(tmp_path, rank):
    """True is an int to isinstance and equals 1; -1 is an int: neither is a rank."""
    m, _ = _pruned()
    adalora.save_adapters(tmp_path, m)
    _edit_sidecar(tmp_path, "0", rank=rank)
    m2 = _net(1)
    adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match=rf"^0: rank {rank!r} in .* is not a non-negative integer: re-save the "
                                         r"adapters$"):
        adalora.load_adapters(tmp_path, m2)


@pytest.mark.parametrize("scaling", ["0.5", True, None])
def test_a_sidecar_scaling_that_is_no_number_is_refused(tmp_path, scaling):
    m, _ = _pruned()
    adalora.save_adapters(tmp_path, m)
    _edit_sidecar(tmp_path, "0", scaling=scaling)
    m2 = _net(1)
    ad2 = adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match=rf"^0: scaling {scaling!r} in .* is not a number: re-save the adapters$"):
        adalora.load_adapters(tmp_path, m2)
    assert ad2["0"].rank == 4 and isinstance(ad2["0"].scaling, float)


def test_a_tensor_missing_from_the_file_is_named(tmp_path):
    """A file re-written without one factor (its checksum updated): the error says it is missing."""
    import hashlib

    from safetensors.torch import load_file, save_file
    m, _ = _pruned()
    path = adalora.save_adapters(tmp_path, m)
    t = load_file(path)
    del t["0.Q"]
    save_file(t, path)
    meta = json.loads((tmp_path / "adapters.json").read_text())
    meta["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (tmp_path / "adapters.json").write_text(json.dumps(meta))
    m2 = _net(1)
    adalora.inject(m2, AdapterConfig(targets=["0", "2"], init_rank=4))
    with pytest.raises(ValueError, match=r"^0: saved Q missing does not fit rank 2 and shape \(8, 6\) in .*: the "
                                         r"file was edited or mismatched; re-save the adapters$"):
        adalora.load_adapters(tmp_path, m2)


def test_loading_at_the_same_rank_keeps_every_saved_triplet(tmp_path):
    """The model's mask had pruned a triplet, at the rank the file holds: the loaded layer keeps
    all four saved triplets (its mask all true), and saving it again writes all four."""
    m = _net()
    ad = adalora.inject(m, AdapterConfig(targets=["0"], init_rank=4))
    with torch.no_grad():
        ad["0"].lam.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    adalora.save_adapters(tmp_path / "a", m)
    m2 = _net(1)
    ad2 = adalora.inject(m2, AdapterConfig(targets=["0"], init_rank=4))
    ad2["0"].rank_mask.copy_(torch.tensor([True, False, True, True]))
    adalora.load_adapters(tmp_path / "a", m2)
    assert ad2["0"].rank_mask.tolist() == [True, True, True, True]
    assert ad2["0"].lam.tolist() == [1.0, 2.0, 3.0, 4.0]
    adalora.save_adapters(tmp_path / "b", m2)
    meta, tensors = adalora.read_adapters(tmp_path / "b")
    assert meta["ranks"] == {"0": 4} and tensors["0.kept"].tolist() == [0, 1, 2, 3]
