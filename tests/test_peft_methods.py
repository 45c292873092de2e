"""method=peft_adalora / peft_lora: peft's adapters run through our loop and write the same run
folder as ours, with our module names; the orthogonality term the loop adds is peft's formula;
the allocator records what peft's update_and_allocate did. Tiny random BERT, a few steps."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from exp_utils import TINY, compose, read_jsonl, run_inproc
from experiments.config import ConfigError

RUN = TINY + ["trainer.epochs=2", "logger.tensorboard=false"]   # 16 steps, t_i=2, T-t_f=11
CONTRACT = ("metrics.jsonl", "ranks.jsonl", "summary.json", "adapters.safetensors",
            "adapters.json", "head.safetensors", "importance.safetensors")


def test_missing_peft_is_one_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)          # `import peft` raises ImportError
    for method in ("peft_adalora", "peft_lora"):
        with pytest.raises(ConfigError, match="pip install peft") as e:
            run_inproc(tmp_path / method, RUN + [f"method={method}"])
        assert "\n" not in str(e.value)


needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="method=peft_* needs peft (extra 'dev')")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft_runs")
    out = {}
    for method in ("adalora", "peft_adalora"):
        out[method] = d / method
        run_inproc(d / method, RUN + [f"method={method}", "trainer.checkpoint_every=8"])
    return out


@needs_peft
def test_peft_adalora_writes_the_contract_with_our_names(runs):
    ours = json.loads((runs["adalora"] / "summary.json").read_text())
    d = runs["peft_adalora"]
    for f in CONTRACT + ("checkpoint.pt",):
        assert (d / f).exists(), f
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["method"] == "peft_adalora" and s["steps"] == 16
    assert s["schedule"] == ours["schedule"]                 # same phases and budgets in triplets
    assert list(s["final_ranks"]) == list(ours["final_ranks"])
    assert s["module_shapes"] == ours["module_shapes"]
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"] == 72
    ranks = read_jsonl(d / "ranks.jsonl")
    assert [r["step"] for r in ranks] == [r["step"] for r in read_jsonl(runs["adalora"] / "ranks.jsonl")]
    assert all(list(r["ranks"]) == list(ours["final_ranks"]) for r in ranks)
    assert ranks[0]["budget"] == 144 and ranks[-1]["budget"] == 72 and ranks[-1]["ranks"] == s["final_ranks"]
    for r in ranks:
        assert sum(r["ranks"].values()) == r["budget"]
        assert r["params_kept"] == sum(k * (o + i + 1) for (n, k), (o, i)
                                       in zip(r["ranks"].items(), s["module_shapes"].values()))
    # parameters: the same adapters as ours; peft's base adds one frozen `ranknum` per matrix
    p, q = s["params"], ours["params"]
    assert p["adapter_start"] == q["adapter_start"] == 12 * 454 * 2
    assert p["trainable_start"] == q["trainable_start"] and p["base"] == q["base"] + 12
    assert p["adapter_end"] == ranks[-1]["params_kept"]
    assert p["trainable_end"] == p["adapter_end"] + (32 * 2 + 2)
    # adapters.safetensors in our format: kept singular values only, where the masks say
    t = load_file(str(d / "adapters.safetensors"))
    for n, k in s["final_ranks"].items():
        assert t[f"{n}.lam"].shape[0] == t[f"{n}.kept"].numel() == k
        assert t[f"{n}.P"].shape == (s["module_shapes"][n][0], k)
    imp = load_file(str(d / "importance.safetensors"))
    assert set(imp) == set(s["final_ranks"]) and all(v.shape == (12,) for v in imp.values())
    train = [m for m in read_jsonl(d / "metrics.jsonl") if m["split"] == "train"]
    assert all(m["orth"] > 0 for m in train)                 # the loop added the orthogonality term


@needs_peft
def test_peft_adalora_masks_agree_with_peft_and_the_threshold(tmp_path):
    """Drive the allocator by hand on a built model: after every mask step, and every step of the
    final phase, peft's lora_E is zero exactly off our rank masks, and every pruned triplet scores <= the recorded threshold <
    every kept one (peft's kthvalue rule)."""
    from experiments.build import build
    from experiments.model import load_model
    rc, _ = compose(RUN + ["method=peft_adalora"])
    torch.manual_seed(0)
    model = load_model(rc.model, 2, 100)
    built = build(rc, model, n_train=128)
    alloc, views = built.allocator, built.adapters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 100, (4, 8))
    records = []
    for step in range(built.total_steps):
        model(input_ids=x, attention_mask=torch.ones_like(x)).pow(2).sum().backward()
        opt.step()
        alloc.update_importance(step, grads_finite=True)
        rec = alloc.mask_to_budget(step)
        if rec is not None or step > alloc.final_step:   # (Adam revives lam between mask steps)
            for v in views.values():
                assert not v.lam.detach().view(-1)[~v.rank_mask].any()
        if rec is not None:
            records.append(rec)
            pattern = alloc.pcfg.rank_pattern
            assert rec.ranks == {n: sum(pattern[alloc.pnames[n][1]]) for n in views}
            scores = alloc.triplet_scores() if step == alloc.final_step else dict(zip(alloc.names, alloc._scores()))
            for n, v in views.items():
                assert (scores[n][~v.rank_mask] <= rec.threshold).all()
                assert (scores[n][v.rank_mask] > rec.threshold).all()
        opt.zero_grad(set_to_none=True)
    assert [r.step for r in records] == [5, 10, 11] and records[-1].budget == 72
    assert alloc.finalize().ranks == records[-1].ranks


@needs_peft
def test_orthogonality_term_is_peft_formula_and_reaches_peft_params():
    from experiments.build import build
    from experiments.model import load_model
    import adalora
    rc, _ = compose(RUN + ["method=peft_adalora"])
    model = load_model(rc.model, 2, 100)
    built = build(rc, model, n_train=128)
    # peft's AdaLoraModel.forward, written out: every lora_A (A Aᵀ) and lora_B (Bᵀ B)
    regu, num = 0.0, 0
    for n, p in model.backbone.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            regu, num = regu + torch.norm(cov - torch.eye(*cov.shape), p="fro"), num + 1
    ours = adalora.orthogonality_penalty(built.adapters, form="reference")
    assert num == 24 and torch.allclose(ours, regu / num, rtol=1e-6)
    ours.backward()
    v = next(iter(built.adapters.values()))
    assert v.inner.lora_A["default"].grad.abs().sum() > 0 and v.inner.lora_B["default"].grad.abs().sum() > 0


@needs_peft
def test_peft_adalora_resumes_bitwise(runs, tmp_path):
    d = tmp_path / "stopped"
    args = RUN + ["method=peft_adalora", "trainer.checkpoint_every=8"]
    assert run_inproc(d, args + ["trainer.stop_at_step=7"])["status"] == "interrupted"
    assert run_inproc(d, args + [f"trainer.resume={d}"])["status"] == "completed"
    a = load_file(str(runs["peft_adalora"] / "adapters.safetensors"))
    b = load_file(str(d / "adapters.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(d / "ranks.jsonl") == read_jsonl(runs["peft_adalora"] / "ranks.jsonl")


@needs_peft
def test_peft_lora_matched_budget_counts_like_ours(tmp_path):
    ours = run_inproc(tmp_path / "lora", TINY + ["method=lora", "budget=matched", "trainer.max_steps=2"])
    s = run_inproc(tmp_path / "peft_lora", TINY + ["method=peft_lora", "budget=matched",
                                                   "trainer.max_steps=2"])
    assert s["status"] == "completed" and s["lora_rank"] == 6 and s["schedule"] is None
    assert s["budget"] == ours["budget"] == {"target_params": 5448, "matched_lora_rank": 6,
                                             "lora_params": 6 * 896}
    assert s["params"] == ours["params"] and s["final_ranks"] == ours["final_ranks"]
    assert s["module_shapes"] == ours["module_shapes"]
    t = load_file(str(tmp_path / "peft_lora" / "adapters.safetensors"))
    assert t["encoder.layer.0.attention.self.query.A"].shape == (6, 32)


@needs_peft
def test_peft_adalora_rounds_target_rank_and_refuses_what_peft_lacks(tmp_path):
    s = run_inproc(tmp_path / "r", RUN + ["method=peft_adalora", "schedule.target_rank=2.6",
                                          "trainer.max_steps=12"])
    assert s["target_rank"] == 3.0 and s["schedule"]["target_budget"] == 36
    assert sum(s["final_ranks"].values()) == 36
    for bad, what in [("schedule.shape=linear", "shape"), ("schedule.score=random", "score"),
                      ("trainer.compact=true", "compact"), ("schedule.target_rank=12", "integer")]:
        with pytest.raises(ConfigError, match=what):
            run_inproc(tmp_path / bad, RUN + ["method=peft_adalora", bad])


@needs_peft
@pytest.mark.parametrize("method", ["peft_adalora", "peft_lora"])
def test_views_take_factors_of_another_rank_into_peft_and_convert_to_ours(method):
    """load_adapters hands a view its factors at the saved rank and then the saved scale: both
    must reach peft's forward. to_adalora_layers (for save_peft) keeps every update."""
    from experiments.build import build
    from experiments.model import load_model
    from experiments.peft_methods import to_adalora_layers
    import adalora
    rc, _ = compose(RUN + [f"method={method}"])
    torch.manual_seed(0)
    model = load_model(rc.model, 2, 100).eval()
    views = build(rc, model, n_train=128).adapters
    v = next(iter(views.values()))
    names = "P, lam, Q" if method == "peft_adalora" else "A, B"
    with pytest.raises(ValueError, match=rf"set_factors\(X=\.\.\.\): no such factor; name one of {names}$"):
        v.set_factors(X=torch.zeros(1))
    k, x = 5, torch.randn(3, v.in_features)
    if method == "peft_adalora":
        P, lam, Q = torch.randn(v.out_features, k), torch.randn(k), torch.randn(k, v.in_features)
        v.set_factors(P=P, lam=lam, Q=Q)
        assert v.rank == k and v.inner.lora_E["default"].shape == (k, 1) and v.r0 == 12
        update = (P * lam) @ Q
    else:
        A, B = torch.randn(k, v.in_features), torch.randn(v.out_features, k)
        v.set_factors(A=A, B=B)
        assert v.rank == k and v.inner.lora_A["default"].out_features == k
        update = B @ A
    with torch.no_grad():
        assert torch.allclose(v(x) - v.base(x), x @ (v.scaling * update).T, atol=1e-4)
        v.scaling = 2 * v.scaling
        assert torch.allclose(v(x) - v.base(x), x @ (v.scaling * update).T, atol=1e-4)
        deltas = {n: a.delta_weight() for n, a in views.items()}
        plain = to_adalora_layers(model.backbone)
        assert list(plain) == list(adalora.find_adapters(model.backbone)) == list(views)
        for n, a in plain.items():
            assert type(a) is (adalora.SVDLinear if method == "peft_adalora" else adalora.LoRALinear)
            assert torch.allclose(a.delta_weight(), deltas[n], atol=1e-6)
