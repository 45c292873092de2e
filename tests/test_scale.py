"""The adapter scale: α/r by default, one shared rank with ``scale_rank``, √r with rslora; checked
against the dense update written out by hand."""
import math

import pytest
import torch
import torch.nn as nn

import adalora


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))


def _dense_update(layer):
    if isinstance(layer, adalora.SVDLinear):
        return layer.P.detach() @ torch.diag(layer.lam.detach()) @ layer.Q.detach()       # (d_out, d_in)
    return layer.B.detach() @ layer.A.detach()


@pytest.mark.parametrize("method,rslora,scale_rank,expected", [
    ("adalora", False, None, lambda r: 8.0 / r),
    ("adalora", False, 2.0, lambda r: 8.0 / 2.0),
    ("adalora", True, None, lambda r: 8.0 / math.sqrt(r)),
    ("lora", False, None, lambda r: 8.0 / r),
    ("lora", False, 3.0, lambda r: 8.0 / 3.0),
    ("lora", True, 4.0, lambda r: 8.0 / 2.0),
])
def test_scaling_and_the_update_it_multiplies(method, rslora, scale_rank, expected):
    cfg = adalora.AdapterConfig(method=method, targets=["0", "1"], init_rank=4, alpha=8.0, rslora=rslora,
                                scale_rank=scale_rank, rank_pattern={"1": 2})
    adapters = adalora.inject(_model(), cfg)
    for layer in adapters.values():
        for p in layer.parameters():
            if p.requires_grad:
                p.data.normal_()
        r = layer.r0 if method == "adalora" else layer.rank
        assert layer.scaling == pytest.approx(expected(r))
        assert torch.allclose(layer.delta_weight(), expected(r) * _dense_update(layer), atol=1e-6)
        x = torch.randn(3, layer.in_features)
        assert torch.allclose(layer(x), layer.base(x) + x @ (expected(r) * _dense_update(layer)).T, atol=1e-5)


def test_saved_adapters_keep_their_scale(tmp_path):
    cfg = adalora.AdapterConfig(targets=["0", "1"], init_rank=4, alpha=8.0, scale_rank=2.0)
    model = _model()
    adalora.inject(model, cfg)
    adalora.save_adapters(tmp_path / "a.safetensors", model)
    other = _model()
    fresh = adalora.inject(other, adalora.AdapterConfig(targets=["0", "1"], init_rank=4, alpha=8.0))
    assert fresh["0"].scaling == 2.0
    adalora.load_adapters(tmp_path / "a.safetensors", other)
    assert fresh["0"].scaling == 4.0


def test_bad_scale_rank_names_the_fix():
    with pytest.raises(ValueError, match="scale_rank=0: use a positive number"):
        adalora.AdapterConfig(scale_rank=0)


# ---- the experiments' method.scale --------------------------------------------------------------
def test_sweepers_are_given_the_validation_metric_never_the_test_one():
    from experiments.train import objective
    summary = {"final": {"val": {"accuracy": 0.61}, "test": {"accuracy": 0.93}}}
    assert objective(summary, "accuracy") == 0.61


def test_scale_options_are_checked_per_method():
    from exp_utils import compose
    from experiments.config import ConfigError
    with pytest.raises(ConfigError, match="method.scale='alpha_over_target' for method=lora; choose one of "
                                          "per_module, uniform, rslora"):
        compose(["method=lora", "method.scale=alpha_over_target"])
    with pytest.raises(ConfigError, match="choose one of alpha_over_r0, alpha_over_target, rslora"):
        compose(["method.scale=uniform"])


def test_runs_record_the_scale_they_used(tmp_path):
    """AdaLoRA at α/target scales like the matched LoRA of the target rank; LoRA on a rank
    pattern with one shared scale uses α over the pattern's mean rank."""
    from exp_utils import TINY, run_inproc
    tiny = TINY + ["trainer.max_steps=4", "logger.tensorboard=false", "schedule.init_warmup=0",
                   "schedule.final_warmup=1"]
    s = run_inproc(tmp_path / "a", tiny + ["method.scale=alpha_over_target"])
    assert s["scale"]["rule"] == "alpha_over_target" and s["target_rank"] == 6.0
    assert set(s["scale"]["per_module"].values()) == {16.0 / 6.0}
    s = run_inproc(tmp_path / "b", tiny)
    assert s["scale"]["rule"] == "alpha_over_r0" and set(s["scale"]["per_module"].values()) == {16.0 / 12}
    pattern = {"layer.0.attention.self.query": 1, "layer.1.output.dense": 5}
    ov = ["method=lora", "method.scale=uniform",
          "+method.rank_pattern={" + ",".join(f"{k}:{v}" for k, v in pattern.items()) + "}"]
    s = run_inproc(tmp_path / "c", tiny + ov)
    n = len(s["final_ranks"])
    mean_rank = sum(s["final_ranks"].values()) / n
    assert [s["final_ranks"]["encoder." + k] for k in pattern] == [1, 5]
    assert s["scale"]["rule"] == "uniform"
    assert s["scale"]["per_module"] == {m: pytest.approx(16.0 / mean_rank) for m in s["final_ranks"]}
