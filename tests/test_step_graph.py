"""``trainer.step_graph``: the loop's step as two CUDA graphs (experiments/step_graph.py).

No CUDA here, so the graphs' bodies run uncaptured, as ``StepGraph(capture=False)`` does; the GPU
side (the captured run against the eager one) is a committed results file. What the CPU checks:
the bodies and their eager fallbacks train as the loop's own ``update`` (the reference), step
for step; a run and its resumption are the same run; the bodies wait on the device nowhere (what
capture needs); and every configuration a graph cannot hold is refused with its fix."""
import math

import pytest
import torch
import torch.nn as nn

import adalora
from adalora import AdapterConfig, RankAllocator, ScheduleConfig
from exp_utils import TINY, compose, read_jsonl, run_inproc
from experiments import step_graph as SG
from experiments.config import ConfigError
from experiments.loop import update
from experiments.opcount import count_ops

SCHED = dict(target_rank=2, total_steps=30, init_warmup=3, final_warmup=8, mask_interval=2)


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    ad = adalora.inject(m, AdapterConfig(targets=["0", "2"], init_rank=4, alpha=4.0))
    adalora.mark_only_adapters_trainable(m)
    alloc = RankAllocator(ad, ScheduleConfig(**SCHED))
    opt = torch.optim.AdamW(adalora.adapter_parameters(ad), lr=torch.tensor(1e-2, dtype=torch.float64),
                            fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 40)
    return m, ad, alloc, opt, sched


def _grads(m, ad, step):
    def body(b):
        loss = m(b["x"]).pow(2).mean()
        loss.backward()
        return loss.detach(), adalora.orthogonality_grad_(ad, 0.1), torch.zeros(())
    x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    # A non-finite gradient: no update, no scoring, the mask step still runs. Step 1 is the first
    # update of the EMAs, which the skip must leave as if none had run.
    if step in (1, 7, 20):
        x[0, 0] = math.inf
    return body, {"x": x}


def test_bodies_and_fallbacks_train_as_the_loops_update_step_for_step():
    """Through warmup, budgeting (every other step a mask step), the final allocation and the
    frozen-mask phase, with three non-finite steps (the first, and a mask step) that the bodies
    skip on the device: the same losses, masks, lam, P, Q, records and skip counts as the eager
    loop's ``update``, bit for bit; the losses read back in batches, in step order."""
    ref, dev = _model(), _model()
    m, ad, alloc, opt, sched = dev
    graph = SG.StepGraph(None, lambda step, finite: update(opt, sched, None, alloc, step, finite),
                         opt, sched, alloc, torch.device("cpu"), capture=False)
    records, losses, losses_ref = {"ref": {}, "dev": {}}, [], []
    for step in range(1, 31):
        body, b = _grads(ref[0], ref[1], step)
        loss_ref = body(b)[0]
        finite = all(bool(torch.isfinite(p.grad).all()) for p in adalora.adapter_parameters(ref[1]))
        r = update(ref[3], ref[4], None, ref[2], step, finite)
        ref[3].zero_grad(set_to_none=True)
        if r is not None:
            records["ref"][step] = r.to_dict()

        body, b = _grads(m, ad, step)
        graph.grads_body = body
        graph.grads(b)
        r = graph.update(step)          # a non-finite step skipped on the device, not by the host
        if r is not None:
            records["dev"][step] = r.to_dict()
        losses.append(None)
        if step % 3 == 0 or step == 30:
            read = graph.read()         # the steps since the last read, in order, with their values
            assert [s for s, _ in read] == list(range(step - len(read) + 1, step + 1))
            losses[-len(read):] = [v[0] for _, v in read]
        losses_ref.append(float(loss_ref))
        for a, c in zip(ref[2].layers, alloc.layers):
            assert torch.equal(a.rank_mask, c.rank_mask) and torch.equal(a.lam, c.lam)
            assert torch.equal(a.P, c.P) and torch.equal(a.Q, c.Q)
        assert all(p.grad is None for p in adalora.adapter_parameters(ad))   # uncaptured: unset after each step
    assert [a == b for a, b in zip(losses, losses_ref)] == [s not in (1, 7, 20) for s in range(1, 31)]
    assert sorted(records["ref"]) == [4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
    assert records["dev"] == records["ref"] and alloc.final_done
    assert alloc.scorer.skipped == ref[2].scorer.skipped == 3
    assert float(opt.param_groups[0]["lr"]) == float(ref[3].param_groups[0]["lr"]) == 1e-2 * (1 - 30 / 40)


def test_tail_refuses_to_capture_when_a_parameter_got_no_gradient():
    """A captured update reads one gradient buffer per parameter for good: a parameter without a
    gradient when the tail would be captured stops the step with the fix, before any capture."""
    m, ad, alloc, opt, sched = _model()
    first = adalora.adapter_parameters(ad)[0]

    def grads_of(b):
        loss = m(b["x"]).pow(2).mean()
        loss.backward()
        first.grad = None                 # as if this parameter took no part in the loss
        return loss.detach()
    graph = SG.StepGraph(None, lambda step, finite: None, opt, sched, alloc, torch.device("cpu"), capture=False,
                         tail=(grads_of, lambda: (torch.zeros(()), torch.zeros(()))))
    graph.capture, graph.runs["grads"] = True, SG.WARMUP      # the next update would capture the tail
    graph.grads({"x": torch.randn(8, 10, dtype=torch.float64)})
    with pytest.raises(RuntimeError, match="no gradient.*set trainer.tail_graph=false$"):
        graph.update(1)


# -- the loop, end to end -----------------------------------------------------------------------
LOOP = TINY + ["model.dropout=0.0", "trainer.epochs=3", "schedule.init_warmup=2", "schedule.final_warmup=8",
               "schedule.mask_interval=2", "trainer.eval_every=0", "logger.tensorboard=false"]


@pytest.fixture
def cpu_graphs(monkeypatch):
    """The runner's checks as on a GPU: the CPU runs the graphs' bodies uncaptured."""
    refuse = SG.refuse
    monkeypatch.setattr(SG, "refuse", lambda cfg, device, world: refuse(cfg, torch.device("cuda"), world))


# The app's default is flat gates and factors; false keeps parameters per adapter.
PER_ADAPTER = ["method.flat_gates=false", "method.flat_factors=false"]


@pytest.mark.parametrize("extra", [[], ["trainer.compact=true"], ["trainer.compact=true", "method.flat_factors=false"],
                                   ["trainer.compact=true"] + PER_ADAPTER])
def test_loop_with_step_graph_trains_as_the_eager_loop(extra, cpu_graphs, tmp_path):
    """24 steps of AdaLoRA on real data (7 allocations, the final one at step 16, and 8 steps after
    it; with compaction, the graphs are rebuilt for the shrunk adapters there): the same ranks and
    budgets, thresholds and losses to float rounding (the graph's batches keep their padding,
    which the eager loop trims), the same learning rates."""
    runs = {}
    for mode in ("false", "true"):
        s = run_inproc(tmp_path / mode, LOOP + extra + [f"trainer.step_graph={mode}"])
        assert s["status"] == "completed" and s["steps"] == 24
        runs[mode] = read_jsonl(tmp_path / mode / "ranks.jsonl"), read_jsonl(tmp_path / mode / "metrics.jsonl")
    (ra, ma), (rb, mb) = runs["false"], runs["true"]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 4, 6, 8, 10, 12, 14, 16]
    for a, b in zip(ra, rb):
        assert (a["step"], a["budget"], a["ranks"], a["params_kept"]) == (b["step"], b["budget"], b["ranks"], b["params_kept"])
        assert (a["threshold"] is None) == (b["threshold"] is None)
        assert a["threshold"] is None or b["threshold"] == pytest.approx(a["threshold"], rel=1e-4)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for a, b in zip(ma, mb):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5) and b["lr"] == pytest.approx(a["lr"], rel=1e-6)


@pytest.mark.parametrize("extra", [[], ["trainer.grad_accum=2"], ["trainer.compact=true"],
                                   PER_ADAPTER])
def test_loop_with_tail_graph_trains_as_the_eager_loop(extra, cpu_graphs, tmp_path, monkeypatch):
    """``trainer.tail_graph``: forward and backward eager on the loop's trimmed batches (and over two
    micro-batches), the tail (γ∇R, clipping, the update) through the graphs' bodies: the same
    allocation records, losses and learning rates as the eager loop, and the tail body runs once
    per step, not per micro-batch."""
    finishes, finish = [], SG.StepGraph._finish
    monkeypatch.setattr(SG.StepGraph, "_finish", lambda self: finishes.append(1) or finish(self))
    runs = {}
    for mode in ("false", "true"):
        s = run_inproc(tmp_path / mode, LOOP + extra + [f"trainer.tail_graph={mode}"])
        assert s["status"] == "completed" and s["steps"] == (12 if "trainer.grad_accum=2" in extra else 24)
        runs[mode] = read_jsonl(tmp_path / mode / "ranks.jsonl"), read_jsonl(tmp_path / mode / "metrics.jsonl")
    assert len(finishes) == s["steps"]
    (ra, ma), (rb, mb) = runs["false"], runs["true"]
    assert len(ra) >= 2 and [r["step"] for r in ra] == [r["step"] for r in rb]
    for a, b in zip(ra, rb):
        assert (a["step"], a["budget"], a["ranks"], a["params_kept"]) == (b["step"], b["budget"], b["ranks"], b["params_kept"])
        assert a["threshold"] is None or b["threshold"] == pytest.approx(a["threshold"], rel=1e-5)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for a, b in zip(ma, mb):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["lr"] == pytest.approx(a["lr"], rel=1e-6)
        assert a["split"] != "train" or b["orth"] == pytest.approx(a["orth"], rel=1e-5)


def test_values_read_back_when_the_buffer_fills_between_logs(cpu_graphs, tmp_path, monkeypatch):
    """A buffer of 4 steps and a train line every 7: the loop reads back whenever the buffer is
    full, and logs the same losses and skip-free run as the eager loop."""
    monkeypatch.setattr(SG, "WINDOW", 4)
    reads, read = [], SG.StepGraph.read
    monkeypatch.setattr(SG.StepGraph, "read", lambda self: reads.append(len(self.unread)) or read(self))
    runs = {}
    for mode in ("false", "true"):
        s = run_inproc(tmp_path / mode, LOOP + ["logger.log_every=7", f"trainer.step_graph={mode}"])
        assert s["status"] == "completed" and s["steps"] == 24 and s["skipped_steps"] == 0
        runs[mode] = ([m for m in read_jsonl(tmp_path / mode / "metrics.jsonl") if m["split"] == "train"],
                      read_jsonl(tmp_path / mode / "ranks.jsonl"))
    assert max(reads) == 4 and sum(reads) == 24          # every step read once, never more than 4 at a time
    (ma, ra), (mb, rb) = runs["false"], runs["true"]
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [7, 14, 21, 24]
    for a, b in zip(ma, mb):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert [(r["step"], r["ranks"]) for r in ra] == [(r["step"], r["ranks"]) for r in rb]


def test_a_decoder_loop_with_step_graph_trains_as_the_eager_loop(cpu_graphs, tmp_path):
    """A causal LM (tiny Llama, answer task): the captured form of its loss takes every
    position's logits; the same allocation records and losses as the eager loop, to rounding."""
    lm = ["model=tiny_llama", "task=rotten_tomatoes_lm", "task.max_train_samples=64", "task.max_eval_samples=16",
          "task.max_len=48", "trainer.batch_size=16", "trainer.eval_batch_size=16", "trainer.progress=false",
          "logger.log_every=1", "trainer.eval_every=0", "logger.tensorboard=false", "trainer.epochs=6",
          "schedule.init_warmup=2", "schedule.final_warmup=8", "schedule.mask_interval=2", "model.dropout=0.0"]
    runs = {}
    for mode in ("false", "true"):
        s = run_inproc(tmp_path / mode, lm + [f"trainer.step_graph={mode}"])
        assert s["status"] == "completed" and s["steps"] == 24
        runs[mode] = read_jsonl(tmp_path / mode / "ranks.jsonl"), read_jsonl(tmp_path / mode / "metrics.jsonl")
    (ra, ma), (rb, mb) = runs["false"], runs["true"]
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [0, 4, 6, 8, 10, 12, 14, 16]
    assert [(r["budget"], r["ranks"]) for r in ra] == [(r["budget"], r["ranks"]) for r in rb]
    for a, b in zip(ma, mb):
        assert (a["step"], a["split"]) == (b["step"], b["split"]) and b["loss"] == pytest.approx(a["loss"], abs=1e-5)


@pytest.mark.parametrize("flag", ["step_graph", "tail_graph"])
def test_step_graph_resumes_to_the_uninterrupted_run(flag, cpu_graphs, tmp_path):
    """Interrupted mid-budgeting and resumed (the learning rates come back as device tensors):
    the same ranks, metrics and adapter weights as the run that never stopped."""
    from safetensors.torch import load_file
    mode = LOOP + [f"trainer.{flag}=true", "trainer.checkpoint_every=8"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_inproc(whole, mode)
    assert run_inproc(part, mode + ["trainer.stop_at_step=7"])["status"] == "interrupted"
    assert run_inproc(part, mode + [f"trainer.resume={part}"])["status"] == "completed"
    assert read_jsonl(part / "ranks.jsonl") == read_jsonl(whole / "ranks.jsonl")
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]
    assert strip(read_jsonl(part / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    a, b = load_file(str(whole / "adapters.safetensors")), load_file(str(part / "adapters.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task", [[], ["model=tiny_llama", "task=rotten_tomatoes_lm", "task.max_len=48"]])
def test_bodies_never_wait_on_the_device(task, cpu_graphs, tmp_path, monkeypatch):
    """What capture needs: no op of the grads or budgeting update body reads a device value on the
    host, for an encoder classifier and a causal LM. Transformers skips its mask inspection while
    a stream captures; here it is told so."""
    from transformers import masking_utils
    monkeypatch.setattr(masking_utils, "is_tracing", lambda tensor=None: True)
    counted, uncaptured = [], SG.StepGraph._uncaptured

    def counting(self, fn):
        out = {}
        counted.append(count_ops(lambda: out.setdefault("v", uncaptured(self, fn))))
        return out["v"]
    monkeypatch.setattr(SG.StepGraph, "_uncaptured", counting)
    run_inproc(tmp_path / "r", LOOP + task + ["trainer.step_graph=true", "trainer.epochs=1", "schedule.final_warmup=2",
                                              "schedule.init_warmup=1"])
    assert len(counted) == 2 * 8 - 1          # grads every step; update but at the final allocation
    assert all(c["host_syncs"] == 0 for c in counted) and all(c["ops"] > 0 for c in counted)


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, fix", [
    (["trainer.precision=fp16"], "trainer.precision=bf16 or fp32 (fp16's GradScaler decides its step on the host); "
                                 "or set trainer.tail_graph=false"),
    (["trainer.compile=reduce-overhead"], "trainer.compile=none or default (two kinds of CUDA graph in one step); "
                                          "or set trainer.tail_graph=false"),
    (["trainer.step_graph=true"], "and trainer.step_graph=true: pick one (step_graph captures the tail too)"),
])
def test_tail_graph_settings_it_cannot_hold_are_refused_at_compose(overrides, fix):
    with pytest.raises(ConfigError, match=r"^trainer.tail_graph=true (needs )?" + _re(fix) + "$"):
        compose(["trainer.tail_graph=true"] + overrides)
    compose(["trainer.tail_graph=true", "trainer.grad_accum=2"])     # eager backward: any number of micro-batches


@pytest.mark.parametrize("overrides, device, fix", [
    (["method=sora"], "cuda", "method one of adalora, lora, svd_lora, full, head, peft_lora (method=sora allocates on the host)"),
    ([], "cpu", "a CUDA device (this run is on cpu)"),
])
def test_runs_the_tail_graphs_cannot_hold_are_refused_with_the_fix(overrides, device, fix):
    cfg, _ = compose(TINY + ["trainer.tail_graph=true"] + overrides)
    with pytest.raises(ConfigError, match=rf"^trainer.tail_graph=true needs {_re(fix)}; or set trainer.tail_graph=false$"):
        SG.refuse(cfg, torch.device(device), 1)


def test_tail_graphs_run_under_ddp():
    # The all-reduce is in the eager backward; the graphs start after it (tests/test_distributed.py).
    cfg, _ = compose(TINY + ["trainer.tail_graph=true"])
    SG.refuse(cfg, torch.device("cuda"), 2)


@pytest.mark.parametrize("overrides, fix", [
    (["trainer.grad_accum=2"], "trainer.grad_accum=1 (one micro-batch per graph)"),
    (["trainer.precision=fp16"], "trainer.precision=bf16 or fp32 (fp16's GradScaler decides its step on the host)"),
    (["trainer.compile=reduce-overhead"], "trainer.compile=none or default (the step is already one graph)"),
])
def test_trainer_settings_a_graph_cannot_hold_are_refused_at_compose(overrides, fix):
    with pytest.raises(ConfigError, match=rf"^trainer.step_graph=true needs {_re(fix)}; or set "
                                          r"trainer.step_graph=false$"):
        compose(["trainer.step_graph=true"] + overrides)


@pytest.mark.parametrize("overrides, device, world, fix", [
    (["method=sora"], "cuda", 1, "method one of adalora, lora, svd_lora, full, head, peft_lora "
                                 "(method=sora allocates on the host)"),
    (["ablation=random_churn"], "cuda", 1, "a gradient or magnitude schedule.score (schedule.score=random_churn "
                                           "draws on the host)"),
    ([], "cuda", 2, "one process (DDP's all-reduce is not captured here)"),
    ([], "cpu", 1, "a CUDA device (this run is on cpu)"),
])
def test_runs_a_graph_cannot_hold_are_refused_with_the_fix(overrides, device, world, fix):
    cfg, _ = compose(TINY + ["trainer.step_graph=true"] + overrides)
    with pytest.raises(ConfigError, match=rf"^trainer.step_graph=true needs {_re(fix)}; or set trainer.step_graph=false$"):
        SG.refuse(cfg, torch.device(device), world)
    cfg, _ = compose(TINY + overrides)
    SG.refuse(cfg, torch.device(device), world)       # without step_graph: nothing to refuse


def test_a_cpu_run_with_step_graph_stops_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match=r"needs a CUDA device \(this run is on cpu\)"):
        run_inproc(tmp_path / "r", TINY + ["trainer.step_graph=true"])
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def _re(s: str) -> str:
    import re
    return re.escape(s)


@pytest.mark.parametrize("case", ["one_dtype", "mixed_dtypes", "no_limit", "non_finite", "none_clipped"])
def test_clip_grad_norm_equals_torchs_to_the_bit(case):
    """The loop's clip against torch.nn.utils.clip_grad_norm_: the same returned norm and the
    same gradients afterwards, bit for bit, with some .grad None (skipped by both), mixed dtypes
    (torch's own path), no limit (inf), a non-finite gradient, and a limit above the norm."""
    from experiments.loop import clip_grad_norm_
    dtypes = [torch.float32, torch.bfloat16, torch.float32] if case == "mixed_dtypes" else [torch.float32] * 3
    shapes = [(5, 3), (4,), (2, 6)]

    def params():
        ps = [nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes)] + [nn.Parameter(torch.zeros(3))]
        for p in ps[:3]:
            p.grad = (torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 3).to(p.dtype)
        if case == "non_finite":
            ps[1].grad[0] = float("inf")
        return ps                                   # the last keeps .grad None
    max_norm = {"no_limit": float("inf"), "none_clipped": 1e6}.get(case, 0.5)
    ours, ref = params(), params()
    n_ours, n_ref = clip_grad_norm_(ours, max_norm), torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert torch.equal(n_ours, n_ref) or (case == "non_finite" and n_ours.isinf() and n_ref.isinf())
    for a, b in zip(ours[:3], ref[:3]):
        assert a.grad.dtype == b.grad.dtype
        assert torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num()) and torch.equal(a.grad.isnan(), b.grad.isnan())
    assert ours[3].grad is None
    if case == "one_dtype":                         # a real cut: the clipped norm is the limit
        assert abs(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in ours[:3]])).item() - 0.5) < 1e-5
