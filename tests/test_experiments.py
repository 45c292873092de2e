"""experiments/ + conf/: maths against hand arithmetic, every experiment config, the run-folder
contract, budget matching, resume equality. Tiny random BERT and small data subsets only."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from exp_utils import REPO, TINY, compose, read_jsonl, run_inproc
from experiments import budget as B
from experiments.config import ConfigError, TaskConfig
from experiments.loop import micro_batch_indices
from experiments.metrics import classification_metrics
from experiments.tasks import hash_split, load_task


# ---- pure functions -----------------------------------------------------------------------
def test_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0, 1, 1, 1, 0, 0, 1, 1])
    m = classification_metrics(y, p, 2)
    tp, tn, fp, fn = 3, 2, 2, 1
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    f1_pos, f1_neg = 2 * tp / (2 * tp + fp + fn), 2 * tn / (2 * tn + fn + fp)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    assert m["mcc"] == pytest.approx(mcc)
    # multi-class: perfect predictions give 1, a class never seen or predicted counts F1 = 0
    m3 = classification_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2]), 4)
    assert m3["accuracy"] == 1 and m3["mcc"] == pytest.approx(1) and m3["macro_f1"] == 0.75


def test_budget_matching_counts_parameters_not_ranks():
    # tiny BERT: 2 layers x (4 matrices 32x32 + 32->64 + 64->32)
    shapes = {}
    for i in range(2):
        for t in ("q", "k", "v", "o"):
            shapes[f"{i}.{t}"] = (32, 32)
        shapes[f"{i}.fi"], shapes[f"{i}.fo"] = (64, 32), (32, 64)
    assert B.adalora_target_params(shapes, 6.0) == 6 * 2 * (4 * 65 + 2 * 97)       # 5448
    assert B.lora_params(shapes, 1) == 2 * (4 * 64 + 2 * 96)                        # 896
    assert B.matched_lora_rank(shapes, 5448) == 6          # 6*896=5376 beats 7*896=6272
    assert B.matched_lora_rank(shapes, 6000) == 7
    assert B.target_rank_from_lora(shapes, 4, 12) == pytest.approx(4 * 896 / (2 * 454))
    with pytest.raises(ConfigError, match="init_rank"):
        B.target_rank_from_lora(shapes, 13, 12)
    # a rank of a 384x1536 matrix costs 4x... not 1x one of 384x384
    assert B.lora_params({"a": (384, 1536)}, 1) == 1920 and B.lora_params({"a": (384, 384)}, 1) == 768


def test_hash_split_and_data_stream_are_deterministic():
    assert hash_split("a movie", 0.1, 0.1) == hash_split("a movie", 0.1, 0.1)
    a = micro_batch_indices(10, 4, 3, seed=1)           # crosses the epoch boundary (12 > 10)
    assert a.tolist() == micro_batch_indices(10, 4, 3, seed=1).tolist()
    epoch0 = torch.cat([micro_batch_indices(10, 5, k, 0) for k in (0, 1)])
    assert sorted(epoch0.tolist()) == list(range(10))   # each epoch is a permutation


def test_offline_datasets_load_with_the_documented_sizes():
    d = load_task(TaskConfig())
    assert len(d.train) + len(d.val) + len(d.test) == 12752 and d.label_names == ["rotten", "fresh"]
    texts = [e.text for e in d.train]
    assert len(set(texts)) == len(texts) and not set(texts) & {e.text for e in d.test}
    r8 = load_task(TaskConfig(dataset="reuters_r8", max_len=64))
    assert r8.num_labels == 8 and len(r8.test) == 2189 and len(r8.train) + len(r8.val) == 5485


# ---- configs ------------------------------------------------------------------------------
GLUE_COLS = ["sentence", "sentence1", "sentence2", "question", "question1", "question2",
             "premise", "hypothesis"]


@pytest.fixture(scope="module")
def glue_like_tsv(tmp_path_factory):
    """A small file with every GLUE column name, standing in for hf:glue/* (no network)."""
    p = tmp_path_factory.mktemp("data") / "glue.tsv"
    rows = ["\t".join(GLUE_COLS + ["label"])]
    words = "good bad fine awful great dull fun slow".split()
    for i in range(96):
        rows.append("\t".join(f"{words[(i + j) % 8]} film {i}" for j in range(len(GLUE_COLS)))
                    + f"\t{i % 2}")
    p.write_text("\n".join(rows) + "\n")
    return p


EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_experiment_files_hold_the_paper_settings():
    rc, _ = compose(["experiment=glue_rte"])
    assert (rc.method.init_rank, rc.schedule.target_rank) == (2, 1)
    assert (rc.schedule.init_warmup, rc.schedule.final_warmup, rc.schedule.mask_interval) == (600, 1800, 1)
    assert rc.method.orth_weight == 0.3 and rc.trainer.lr == 1.2e-3 and rc.seed == 6
    assert rc.task.dataset == "hf:glue/rte" and rc.model.name_or_path == "microsoft/deberta-v3-base"
    assert len(EXPERIMENTS) >= 7


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_runs_two_steps(name, tmp_path, glue_like_tsv):
    # GLUE settings run on a GLUE-shaped stand-in file with DeBERTa names; the study settings
    # on a small subset of their own offline data with BERT names.
    glue = name.startswith("glue")
    data = [f"task.dataset=file:{glue_like_tsv}", "model.tiny_arch=deberta_v2"] if glue else [
        "task.max_train_samples=64", "task.max_eval_samples=32", "model.tiny_arch=bert"]
    s = run_inproc(tmp_path / name, [
        f"experiment={name}", *data, "model.name_or_path=tiny-random",
        "model.tokenizer=minilm", "trainer.max_steps=2",
        "schedule.init_warmup=0", "schedule.final_warmup=1", "task.max_len=32",
        "trainer.eval_every=0", "trainer.progress=false", "logger.tensorboard=false"])
    assert s["status"] == "completed" and s["steps"] == 2
    assert len(s["final_ranks"]) == 2 * 6 and s["schedule"]["total_steps"] == 2


ABLATIONS = sorted(p.stem for p in (REPO / "conf" / "ablation").glob("*.yaml")
                   if p.stem not in ("none", "lora_on_found_ranks"))
# Every step of the budgeting phase masks: 8 steps, init_warmup 1, final_warmup 2 -> mask steps 2..6.
ABLATION_RUN = TINY + ["logger.tensorboard=false", "schedule.mask_interval=1", "trainer.eval_every=0"]


class Spy:
    """Records, during a real run, what the loop asks of the library: per step the order of
    opt.step and the importance update, the weight given to orthogonality_grad_, and at every
    allocation the scores the allocator ranked, |lam| before masking, the EMAs and the mask kept."""

    def __init__(self):
        self.events, self.orth, self.allocs = [], [], []

    def __enter__(self):
        import adalora
        from adalora.importance import triplet_scores
        spy = self
        self._undo = []

        def patch(owner, name, make):
            orig = getattr(owner, name)
            setattr(owner, name, make(orig))
            self._undo.append((owner, name, orig))

        def opt_step(orig):
            def step(opt, *a, **k):
                spy.events.append("opt.step")
                return orig(opt, *a, **k)
            return step

        def importance(orig):
            def update_importance(alloc, step, grads_finite=None):
                spy.events.append(f"importance {step}")
                return orig(alloc, step, grads_finite)
            return update_importance

        def orth(orig):
            def orthogonality_grad_(adapters, weight, form="reference"):
                spy.orth.append(weight)
                return orig(adapters, weight, form)
            return orthogonality_grad_

        def allocate(orig):
            def _allocate(alloc, step, budget):
                sc = alloc.scorer
                ema = None
                if sc.ibar is not None:
                    per = [sc._per_parameter(sc.ibar)]
                    if sc.ubar is not None:
                        per.append(sc._per_parameter(sc.ubar))
                    s = [a * b for a, b in zip(*per)] if len(per) == 2 else per[0]
                    ema = torch.cat([triplet_scores(*s[3 * k:3 * k + 3]) for k in range(len(alloc.layers))])
                rec = dict(step=step, budget=budget, kind=sc.cfg.kind, ubar=sc.ubar is not None,
                           scores=sc.flat_scores(step).clone(), ema=ema,
                           lam=torch.cat([layer.lam.detach().abs().float() for layer in alloc.layers]))
                out = orig(alloc, step, budget)
                rec["kept"] = torch.cat([layer.rank_mask.clone() for layer in alloc.layers])
                spy.allocs.append(rec)
                return out
            return _allocate
        patch(torch.optim.AdamW, "step", opt_step)
        patch(adalora.RankAllocator, "update_importance", importance)
        patch(adalora, "orthogonality_grad_", orth)
        patch(adalora.RankAllocator, "_allocate", allocate)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self._undo):
            setattr(owner, name, orig)


def _spied_run(run_dir, overrides):
    with Spy() as spy:
        s = run_inproc(run_dir, ABLATION_RUN + overrides)
    assert s["status"] == "completed"
    return s, spy


@pytest.fixture(scope="module")
def full_method(tmp_path_factory):
    return _spied_run(tmp_path_factory.mktemp("full") / "run", [])


def _budget_by_hand(t, sch, power):
    b0, bT, ti, tf, T = (sch[k] for k in ("initial_budget", "target_budget", "init_warmup", "final_warmup",
                                          "total_steps"))
    if t >= T - tf:
        return bT
    return int(bT + (b0 - bT) * (1 - (t - ti) / (T - tf - ti)) ** power)


def _check_common(s, spy, power):
    """What every variant shares: a record per mask step, exactly the scheduled budget kept, and
    the kept set the top of the scores it ranked (ties by position), brute force."""
    sch = s["schedule"]
    final = sch["total_steps"] - sch["final_warmup"]                 # the frozen allocation
    assert [a["step"] for a in spy.allocs] == list(range(sch["init_warmup"] + 1, final + 1))
    for a in spy.allocs:
        assert a["budget"] == _budget_by_hand(a["step"], sch, power) == int(a["kept"].sum())
        order = sorted(range(len(a["scores"])), key=lambda i: (-float(a["scores"][i]), i))
        assert set(order[:a["budget"]]) == set(a["kept"].nonzero().flatten().tolist()), a["step"]


def test_full_method_scores_after_the_step_with_uncertainty_orth_and_cubic_budget(full_method):
    s, spy = full_method
    _check_common(s, spy, power=3)
    assert spy.events[:4] == ["opt.step", "importance 0", "opt.step", "importance 1"]   # |w_{t+1} g_t|
    assert spy.orth == [0.1] * s["steps"]
    for a in spy.allocs[:-1]:
        assert a["kind"] == "sensitivity_uncertainty" and a["ubar"]
        assert torch.allclose(a["scores"].double(), a["ema"].double(), rtol=1e-6, atol=0)   # Ibar * Ubar


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablations_compose_change_what_they_name_and_run(ablation, tmp_path, full_method):
    """Each ablation composes to a config that differs from the full method's, runs, and its
    run differs from the full method's in exactly what it names, on the same seed and data."""
    rc, _ = compose([f"ablation={ablation}"])
    base, _ = compose([])
    assert rc.ablation == ablation and rc != base
    s, spy = _spied_run(tmp_path / ablation, [f"ablation={ablation}"])
    full_s, full_spy = full_method
    assert s["ablation"] == ablation and sum(s["final_ranks"].values()) == s["schedule"]["target_budget"]
    assert s["schedule"]["total_steps"] == full_s["schedule"]["total_steps"] == 8
    _check_common(s, spy, power=1 if ablation == "linear_schedule" else 3)
    allocs, full_allocs = spy.allocs, full_spy.allocs
    kinds = {a["kind"] for a in allocs}
    if ablation == "paper_order":                  # |w_t g_t|: scored before opt.step
        assert spy.events[:4] == ["importance 0", "opt.step", "importance 1", "opt.step"]
    else:
        assert spy.events[:4] == ["opt.step", "importance 0", "opt.step", "importance 1"]
    if ablation == "no_orth":                      # the penalty's gradient never added, none logged
        assert spy.orth == []
        assert all(m["orth"] == 0 for m in read_jsonl(tmp_path / ablation / "metrics.jsonl") if m["split"] == "train")
    else:
        assert spy.orth == [0.1] * s["steps"]
    if ablation == "linear_schedule":              # b(t) linear in t, not cubic: budgets differ
        assert [a["budget"] for a in allocs] != [a["budget"] for a in full_allocs]
    if ablation == "sensitivity_only":             # s = Ibar, no uncertainty EMA at all
        assert kinds == {"sensitivity"}
        for a in allocs[:-1]:
            assert not a["ubar"] and torch.allclose(a["scores"].double(), a["ema"].double(), rtol=1e-6, atol=0)
    elif ablation == "magnitude":                  # S_i = |lam_i| as it stands before masking
        assert kinds == {"magnitude"}
        assert all(torch.equal(a["scores"], a["lam"]) for a in allocs)
        assert not all(torch.equal(a["scores"], a["lam"]) for a in full_allocs)
    elif ablation in ("random_fixed", "random_churn"):
        assert kinds == {ablation}
        firsts = [a["scores"] for a in allocs]
        assert all(((0 <= x) & (x < 1)).all() for x in firsts)
        same = [torch.equal(x, y) for x, y in zip(firsts, firsts[1:])]
        assert all(same) if ablation == "random_fixed" else not any(same)
        if ablation == "random_fixed":             # a fixed order: each kept set inside the last
            kept = [a["kept"] for a in allocs]
            assert all(bool((small <= big).all()) for big, small in zip(kept, kept[1:]))
    elif ablation in ("paper_order", "no_orth", "linear_schedule"):
        assert kinds == {"sensitivity_uncertainty"}
    other_scores = any(not torch.equal(a["scores"], b["scores"]) for a, b in zip(allocs, full_allocs))
    differs = {"paper_order": spy.events != full_spy.events, "no_orth": spy.orth != full_spy.orth,
               "linear_schedule": True}
    # scoring ablations rank other scores; an ablation added later must differ in something seen here
    assert differs.get(ablation, other_scores or spy.events != full_spy.events or spy.orth != full_spy.orth
                       or [a["budget"] for a in allocs] != [a["budget"] for a in full_allocs])


# ---- one real (tiny) run: the contract ----------------------------------------------------
SUMMARY_KEYS = {"status", "error", "method", "ablation", "task", "model", "seed", "init_rank",
                "target_rank", "lora_rank", "budget", "schedule", "params", "final", "final_ranks",
                "module_shapes", "steps", "wall_time_s", "versions", "git_commit"}


@pytest.fixture(scope="module")
def adalora_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "adalora"
    run_inproc(d, TINY + ["trainer.epochs=2", "trainer.checkpoint_every=8", "budget=matched"])
    return d


def test_run_writes_every_file_of_the_contract(adalora_run):
    d = adalora_run
    for f in ("metrics.jsonl", "ranks.jsonl", "summary.json", "adapters.safetensors",
              "adapters.json", "checkpoint.pt", "importance.safetensors", "tb"):
        assert (d / f).exists(), f
    s = json.loads((d / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s) and s["status"] == "completed" and s["error"] is None
    assert set(s["budget"]) == {"target_params", "matched_lora_rank", "lora_params"}
    assert set(s["params"]) == {"trainable_start", "trainable_end", "adapter_start", "adapter_end", "base"}
    assert set(s["final"]) == {"val", "test"} and {"accuracy", "macro_f1", "mcc", "loss"} <= set(s["final"]["test"])
    assert set(s["schedule"]) == {"total_steps", "init_warmup", "final_warmup", "mask_interval",
                                  "shape", "initial_budget", "target_budget"}
    assert s["steps"] == s["schedule"]["total_steps"] == 16          # 2 epochs x 128 / 16
    assert s["budget"]["target_params"] == 5448 and s["budget"]["matched_lora_rank"] == 6
    names = list(s["final_ranks"])
    assert names[0] == "encoder.layer.0.attention.self.query" and len(names) == 12
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"] == 72
    ranks = read_jsonl(d / "ranks.jsonl")
    assert ranks[0]["step"] == 0 and ranks[0]["budget"] == s["schedule"]["initial_budget"]
    assert ranks[-1]["ranks"] == s["final_ranks"] and ranks[-1]["budget"] == 72
    assert set(ranks[1]) == {"step", "budget", "threshold", "ranks", "params_kept"}
    budgets = [r["budget"] for r in ranks]
    assert budgets == sorted(budgets, reverse=True)
    metrics = read_jsonl(d / "metrics.jsonl")
    train = [m for m in metrics if m["split"] == "train"]
    assert len(train) == 16 and {"loss", "orth", "lr", "epoch", "time_s"} <= set(train[0])
    assert {m["split"] for m in metrics} == {"train", "val", "test"}
    imp = load_file(str(d / "importance.safetensors"))
    assert set(imp) == set(names) and imp[names[0]].shape == (12,)
    assert s["params"]["adapter_end"] < s["params"]["adapter_start"]
    assert (d / "tb").is_dir() and any((d / "tb").iterdir())


def test_matched_lora_records_both_counts(tmp_path):
    s = run_inproc(tmp_path / "lora", TINY + ["method=lora", "budget=matched", "trainer.max_steps=2"])
    assert s["lora_rank"] == 6 and s["budget"] == {"target_params": 5448, "matched_lora_rank": 6,
                                                   "lora_params": 6 * 896}
    assert s["params"]["adapter_start"] == 6 * 896 and s["schedule"] is None


def test_adalora_target_from_a_lora_budget(tmp_path):
    s = run_inproc(tmp_path / "r", TINY + ["budget=from_lora", "budget.lora_rank=4",
                                           "trainer.max_steps=10"])
    assert s["target_rank"] == pytest.approx(4 * 896 / 908)
    assert s["budget"]["lora_params"] == 4 * 896
    assert abs(s["budget"]["target_params"] - 4 * 896) <= 1


def test_lora_on_found_ranks_reuses_the_adalora_allocation(adalora_run, tmp_path):
    s = run_inproc(tmp_path / "found", TINY + ["ablation=lora_on_found_ranks",
                                               f"method.rank_pattern_from={adalora_run}",
                                               "trainer.max_steps=2"])
    found = json.loads((adalora_run / "summary.json").read_text())["final_ranks"]
    assert s["method"] == "lora" and s["final_ranks"] == found


@pytest.mark.parametrize("override, error", [
    ("seed=-1", r"seed=-1 must be in \[0, 2\*\*32\)"),          # numpy's legacy seeding refused it in a traceback
    ("seed=4294967296", r"seed=4294967296 must be in"),
    ("trainer.device=gpu", "trainer.device=gpu: use auto, cpu, cuda or cuda:N"),
])
def test_seed_and_device_are_checked_with_the_config(override, error):
    with pytest.raises(ConfigError, match=error):
        compose(TINY + [override])


def test_a_cuda_device_this_machine_lacks_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    import experiments.runner as R
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.device=cuda:1: this torch \(.*\) sees no CUDA device; use "
                                          "trainer.device=cpu or auto"):
        R.pick_device("cuda:1", R.D.Dist())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match="trainer.device=cuda:2: there are 2 CUDA devices, cuda:0 to cuda:1"):
        R.pick_device("cuda:2", R.D.Dist())
    assert R.pick_device("cuda:1", R.D.Dist()) == torch.device("cuda", 1)
    assert R.pick_device("cpu", R.D.Dist()) == torch.device("cpu")


@pytest.mark.parametrize("summary, error", [
    (None, "cannot read"),
    ({"status": "interrupted", "method": "adalora", "final_ranks": {"a": 2}}, "not a completed"),
    ({"status": "completed", "method": "adalora", "final_ranks": {}}, "not a completed"),
    ({"status": "completed", "method": "lora", "final_ranks": {"a": 6, "b": 6}}, "method=lora, whose ranks are fixed"),
    ({"status": "completed", "method": "peft_lora", "final_ranks": {"a": 6}}, "method=peft_lora"),
])
def test_found_ranks_come_only_from_a_finished_allocating_run(summary, error, tmp_path):
    from experiments.build import read_found_ranks
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match=error):
        read_found_ranks(str(tmp_path))
    ranks = {"enc.q": 3, "enc.v": 0}
    for method in ("sora", "svd_truncate"):
        (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "method": method,
                                                           "final_ranks": ranks}))
        assert read_found_ranks(str(tmp_path)) == ranks


@pytest.mark.parametrize("method", ["svd_lora", "full", "head"])
def test_baseline_methods_run(method, tmp_path):
    s = run_inproc(tmp_path / method, TINY + [f"method={method}", "trainer.max_steps=2"])
    assert s["status"] == "completed" and s["method"] == method
    if method == "head":
        assert s["params"]["trainable_start"] == 32 * 2 + 2


def test_resume_after_interruption_is_bitwise_equal(adalora_run, tmp_path):
    d = tmp_path / "stopped"
    s = run_inproc(d, TINY + ["trainer.epochs=2", "trainer.checkpoint_every=8", "budget=matched",
                              "trainer.stop_at_step=5"])       # mid-budgeting (t_i=2, T-t_f=11)
    assert s["status"] == "interrupted" and s["steps"] == 5
    s = run_inproc(d, TINY + ["trainer.epochs=2", "trainer.checkpoint_every=8", "budget=matched",
                              f"trainer.resume={d}"])
    assert s["status"] == "completed"
    a, b = load_file(str(adalora_run / "adapters.safetensors")), load_file(str(d / "adapters.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(d / "ranks.jsonl") == read_jsonl(adalora_run / "ranks.jsonl")
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]
    assert strip(read_jsonl(d / "metrics.jsonl")) == strip(read_jsonl(adalora_run / "metrics.jsonl"))


@pytest.mark.parametrize("extra", [["trainer.compact=true"], ["trainer.precision=bf16"],
                                   ["trainer.grad_accum=2", "trainer.batch_size=8"],
                                   ["model.quantize=nf4"]])
def test_loop_options_reach_the_target_budget(extra, tmp_path):
    s = run_inproc(tmp_path / "r", TINY + ["trainer.epochs=1", "logger.tensorboard=false"] + extra)
    assert s["status"] == "completed" and s["steps"] == 8       # 128 / (16 per step), any accum
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"]
    assert s["params"]["base"] == 1_010_304                     # NF4 counts logical weights too
    if "model.quantize=nf4" in extra:
        assert s["quantized_modules"] == 12


def test_model_dropout_sets_every_backbone_dropout_and_null_keeps_the_checkpoints():
    from experiments.config import ModelConfig
    from experiments.model import load_model
    for value, expect in ((0.0, {0.0}), (None, {0.1})):   # BertConfig's default dropout is 0.1
        m = load_model(ModelConfig(name_or_path="tiny-random", dropout=value), num_labels=2, vocab_size=100)
        assert {d.p for d in m.backbone.modules() if isinstance(d, torch.nn.Dropout)} == expect
    with pytest.raises(ConfigError, match="model.dropout"):
        ModelConfig(dropout=1.0)


def test_ranks_share_a_gpu_only_under_gloo(monkeypatch):
    from experiments import distributed as D
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ADALORA_DIST_BACKEND", raising=False)
    assert D.gpu_index(0) == 0
    with pytest.raises(ValueError, match="--nproc_per_node 1"):
        D.gpu_index(1)
    monkeypatch.setenv("ADALORA_DIST_BACKEND", "gloo")
    assert D.gpu_index(1) == 0


@pytest.mark.long
def test_compiled_training_forward_matches_eager(tmp_path):
    """trainer.compile: the traced training forward (aot_eager: same kernels, no code generation)
    trains to the same losses, masks and final ranks as eager, masking and varying sequence
    lengths included."""
    common = TINY + ["method=adalora", "trainer.epochs=2", "trainer.max_steps=12", "model.dropout=0", "model.head_dropout=0",
                     "trainer.eval_every=0", "schedule.init_warmup=2", "schedule.final_warmup=4",
                     "schedule.mask_interval=2"]
    from torch._dynamo.utils import counters
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=default", "trainer.compile_backend=aot_eager"])):
        counters.clear()
        summary = run_inproc(tmp_path / name, common + extra)
        assert summary["status"] == "completed"
        # the option really compiles: a static graph, then one with dynamic sequence length
        assert counters["stats"]["unique_graphs"] == (0 if name == "eager" else 2)
        runs[name] = (read_jsonl(tmp_path / name / "ranks.jsonl"),
                      [m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl") if m["split"] == "train"],
                      summary["final_ranks"])
    (re, le, fe), (rc, lc, fc) = runs["eager"], runs["compiled"]
    assert [r["ranks"] for r in re] == [r["ranks"] for r in rc] and fe == fc and len(re) > 2
    assert np.allclose(le, lc, rtol=0, atol=1e-5)


def test_loop_adds_the_penalty_gradient_as_autograd_would(tmp_path, monkeypatch):
    """The loop adds γ∇R once per optimizer step with orthogonality_grad_. Put back as autograd of
    γR (the same gradient as γR/accum in each micro-batch's loss), it trains to the same adapters
    and masks; with γ = 0 the adapters differ, so the term is really there."""
    import adalora
    common = TINY + ["method=adalora", "trainer.epochs=2", "trainer.max_steps=8", "trainer.grad_accum=2", "model.dropout=0",
                     "model.head_dropout=0", "trainer.eval_every=0", "schedule.init_warmup=2",
                     "schedule.final_warmup=4", "schedule.mask_interval=2"]
    run_inproc(tmp_path / "fused", common + ["method.orth_weight=0.5"])
    run_inproc(tmp_path / "none", common + ["method.orth_weight=0"])

    def by_autograd(adapters, weight, form="reference"):
        value = adalora.orthogonality_penalty(adapters, form)
        (weight * value).backward()
        return value.detach()
    monkeypatch.setattr(adalora, "orthogonality_grad_", by_autograd)
    run_inproc(tmp_path / "autograd", common + ["method.orth_weight=0.5"])
    fused, ref, none = (load_file(str(tmp_path / d / "adapters.safetensors")) for d in ("fused", "autograd", "none"))
    assert all(torch.allclose(fused[k], ref[k], rtol=0, atol=1e-6) for k in fused)
    assert any(fused[k].shape != none[k].shape or not torch.allclose(fused[k], none[k], rtol=0, atol=1e-4)
               for k in fused if k.endswith(".P"))
    assert read_jsonl(tmp_path / "fused" / "ranks.jsonl") == read_jsonl(tmp_path / "autograd" / "ranks.jsonl")
    orth = [m["orth"] for m in read_jsonl(tmp_path / "fused" / "metrics.jsonl") if m["split"] == "train"]
    assert orth == pytest.approx([m["orth"] for m in read_jsonl(tmp_path / "autograd" / "metrics.jsonl")
                                  if m["split"] == "train"], rel=1e-6) and all(o > 0 for o in orth)


# ---- budgets given as schedule.target_total -------------------------------------------------
def _built(overrides):
    """The Built of a run (no training): the budget it records and the allocator it trains with."""
    from experiments.runner import prepare
    rc, _ = compose(TINY + ["trainer.max_steps=10"] + overrides)
    return prepare(rc).built


# Tiny BERT: 12 matrices, 8 of 32x32 and 2+2 of 64x32 / 32x64; one singular value of each
# costs d_in + d_out + 1, summed 2 * (4*65 + 2*97) = 908; one LoRA rank of each, summed 896.
@pytest.mark.parametrize("total, rank, params, lora_r", [
    (72, 6.0, 6 * 908, 6),                     # the same budget as target_rank=6 (5448)
    (30, 2.5, round(2.5 * 908), 3),            # 2270: 3*896=2688 is nearer than 2*896=1792
])
def test_matched_budget_follows_target_total(total, rank, params, lora_r):
    ada = _built(["budget=matched", f"schedule.target_total={total}"])
    assert ada.allocator.target_budget == total
    assert ada.target_rank == pytest.approx(rank)
    assert ada.budget == {"target_params": params, "matched_lora_rank": lora_r,
                          "lora_params": lora_r * 896}
    lora = _built(["method=lora", "budget=matched", f"schedule.target_total={total}"])
    assert lora.lora_rank == lora_r and lora.budget == ada.budget
    assert {a.rank for a in lora.adapters.values()} == {lora_r}


def test_peft_lora_matches_the_same_target_total():
    pytest.importorskip("peft")
    ada = _built(["budget=matched", "schedule.target_total=30"])
    peft = _built(["method=peft_lora", "budget=matched", "schedule.target_total=30"])
    assert peft.lora_rank == 3 and peft.budget == ada.budget == {
        "target_params": 2270, "matched_lora_rank": 3, "lora_params": 3 * 896}


def test_a_target_total_in_parameters_is_the_target_params():
    b = _built(["method=sora", "schedule.budget_unit=params", "schedule.target_total=2724",
                "budget=matched"])
    assert b.budget["target_params"] == 2724 and b.target_rank == pytest.approx(3.0)
    assert b.budget["matched_lora_rank"] == 3          # 2724 - 3*896 = 36


def test_from_lora_refuses_a_target_total():
    with pytest.raises(ConfigError, match=r"^budget=from_lora sets the target from LoRA's rank; "
                                          r"drop schedule.target_total$"):
        _built(["budget=from_lora", "budget.lora_rank=2", "schedule.target_total=200"])


def test_lora_on_found_ranks_without_a_run_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"^ablation=lora_on_found_ranks needs "
                                          r"method.rank_pattern_from=<an AdaLoRA run folder>$"):
        run_inproc(tmp_path / "found", TINY + ["ablation=lora_on_found_ranks", "trainer.max_steps=2"])
    assert not (tmp_path / "found" / "metrics.jsonl").exists()
