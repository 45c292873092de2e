"""Decoders through the whole app, on tiny random Llama and GPT-2: the run-folder contract with
the language-model scores, pruning + compact + resume bitwise, saved adapters that reload and
export, matched LoRA, NF4, the corpus and prompt/response tasks, DDP, trainer.compile, and the
analysis report's heatmap rows and columns."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from exp_utils import compose, read_jsonl, run_inproc

LM = ["model=tiny_llama", "task=rotten_tomatoes_lm", "task.max_train_samples=64",
      "task.max_eval_samples=16", "task.max_len=48", "trainer.batch_size=16",
      "trainer.eval_batch_size=16", "trainer.progress=false", "logger.log_every=1",
      "trainer.eval_every=4", "logger.tensorboard=false", "trainer.epochs=2"]
LM_METRICS = {"loss", "perplexity", "exact_match", "accuracy", "macro_f1", "mcc"}


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama") / "run"
    return d, run_inproc(d, LM + ["trainer.compact=true", "trainer.checkpoint_every=8"])


def test_decoder_run_writes_the_contract_with_language_model_scores(llama_run):
    d, s = llama_run
    assert s["status"] == "completed" and s["steps"] == 8 and s["objective"] == "answer"
    assert s["label_words"] == ["negative", "positive"]
    assert set(s["final"]["test"]) == set(s["final"]["val"]) == LM_METRICS
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"] < s["schedule"]["initial_budget"]
    assert len(s["final_ranks"]) == 14 and "model.layers.1.mlp.gate_proj" in s["final_ranks"]
    evals = [m for m in read_jsonl(d / "metrics.jsonl") if m["split"] != "train"]
    assert [m["split"] for m in evals] == ["val", "val", "test"] and all(LM_METRICS <= set(m) for m in evals)
    assert not (d / "head.safetensors").exists()                  # a causal LM has no head
    assert (d / "adapters.safetensors").is_file() and (d / "importance.safetensors").is_file()


def _eval_model(d, s, load):
    """A fresh tiny Llama of the run's config with the saved adapters loaded: its test scores."""
    import adalora
    from experiments import lm
    from experiments.build import build
    from experiments.loop import evaluate
    from experiments.model import load_model, load_tokenizer
    from experiments.tasks import load_task
    rc, _ = compose(LM)
    from experiments.runner import seed_everything
    seed_everything(rc.seed)                      # the run's random base (a tiny random decoder)
    tok = load_tokenizer(rc.model)
    model = load_model(rc.model, 2, len(tok), decoder=True)
    built = build(rc, model, 64)
    if load:
        adalora.load_adapters(str(d / "adapters.safetensors"), model.backbone)
    data = load_task(rc.task)
    test = lm.tokenize_lm(tok, data.test, rc.task, s["label_words"])
    obj = lm.CausalLMObjective(tok, "answer", s["label_words"])
    return built, evaluate(model, test, rc, torch.device("cpu"), None, obj)


def test_saved_adapters_reload_to_the_same_scores_and_export_to_lora(llama_run):
    import adalora
    d, s = llama_run
    built, m = _eval_model(d, s, load=True)
    assert m == pytest.approx(s["final"]["test"], rel=1e-5)
    # Eight steps move a random decoder's loss of ~10.3 by about 1e-4: far above the 1e-7 of
    # float32 evaluation, so without the adapters the loss must differ at 1e-6.
    assert _eval_model(d, s, load=False)[1]["loss"] != pytest.approx(m["loss"], rel=1e-6)
    assert {n: a.rank for n, a in built.adapters.items()} == s["final_ranks"]
    state, ranks = adalora.export_lora(built.model.backbone)
    assert ranks == {n: r for n, r in s["final_ranks"].items() if r > 0}
    for name, a in built.adapters.items():
        if a.rank:
            delta = (state[f"{name}.B"] @ state[f"{name}.A"]) * (a.scaling * a.r0 / ranks[name])
            torch.testing.assert_close(delta, a.delta_weight(), rtol=1e-5, atol=1e-7)


def test_pruned_compacted_decoder_resumes_bitwise(llama_run, tmp_path):
    ref, _ = llama_run
    d = tmp_path / "stopped"
    extra = ["trainer.compact=true", "trainer.checkpoint_every=8"]
    s = run_inproc(d, LM + extra + ["trainer.stop_at_step=5"])
    assert s["status"] == "interrupted" and s["steps"] == 5
    s = run_inproc(d, LM + extra + [f"trainer.resume={d}"])
    assert s["status"] == "completed"
    a, b = load_file(str(ref / "adapters.safetensors")), load_file(str(d / "adapters.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(d / "ranks.jsonl") == read_jsonl(ref / "ranks.jsonl")
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]  # noqa: E731
    assert strip(read_jsonl(d / "metrics.jsonl")) == strip(read_jsonl(ref / "metrics.jsonl"))


def test_gpt2_matched_lora_takes_adaloras_budget(tmp_path):
    s = run_inproc(tmp_path / "r", LM + ["model=tiny_gpt2", "method=lora", "budget=matched",
                                         "trainer.max_steps=2"])
    assert s["status"] == "completed" and s["budget"]["matched_lora_rank"] == s["lora_rank"] >= 1
    assert sorted({n.split(".", 3)[3] for n in s["final_ranks"]}) == [
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert s["budget"]["lora_params"] == s["params"]["adapter_end"]


def test_nf4_decoder_quantizes_every_block_linear_and_keeps_the_output_layer(llama_run, tmp_path):
    s = run_inproc(tmp_path / "r", LM + ["model.quantize=nf4", "trainer.max_steps=2"])
    assert s["status"] == "completed" and s["quantized_modules"] == 14    # 2 layers x 7 maps
    b = run_inproc(tmp_path / "b", LM + ["model.dtype=bf16", "trainer.precision=bf16", "trainer.max_steps=2"])
    assert b["status"] == "completed"
    fp32 = llama_run[1]["memory"]["weights_bytes"]
    # The embedding (30,522 x 32, tied) dominates a tiny model: bf16 halves it, NF4 only packs
    # the block maps (4 bytes -> ~0.52 per weight).
    assert b["memory"]["weights_bytes"] < 0.51 * fp32 and s["memory"]["weights_bytes"] < fp32
    assert s["memory"]["peak_gpu_bytes"] is None                        # a CPU run
    from experiments.config import ConfigError
    with pytest.raises(ConfigError, match="Conv1D maps are not supported"):
        run_inproc(tmp_path / "g", LM + ["model=tiny_gpt2", "model.quantize=nf4"])


def test_corpus_and_prompt_response_tasks_train_and_score(tmp_path):
    s = run_inproc(tmp_path / "news", LM + ["model=tiny_gpt2", "task=reuters_news_lm", "task.max_len=32",
                                            "trainer.max_steps=2"])
    assert s["status"] == "completed" and set(s["final"]["test"]) == {"loss", "perplexity"}
    assert s["final"]["test"]["perplexity"] == pytest.approx(np.exp(s["final"]["test"]["loss"]))
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"what is {i} plus one ?", "response": str(i + 1)}) + "\n"
                            for i in range(80)))
    s = run_inproc(tmp_path / "qa", LM + ["task=prompt_response", f"task.dataset=file:{path}",
                                          "trainer.max_steps=2"])
    assert s["status"] == "completed" and set(s["final"]["test"]) == {"loss", "perplexity", "exact_match"}


def test_method_head_and_encoder_tasks_are_refused_on_decoders(tmp_path):
    from experiments.config import ConfigError
    with pytest.raises(ConfigError, match="method=head trains a classifier head"):
        run_inproc(tmp_path / "h", LM + ["method=head"])
    with pytest.raises(ConfigError, match="use task=rotten_tomatoes_lm"):
        run_inproc(tmp_path / "c", LM + ["task=rotten_tomatoes"])


def test_report_shows_decoder_scores_and_matrix_types(llama_run, tmp_path):
    from analysis.report import build_report
    from analysis.runs import load_sweep
    d, s = llama_run
    sweep = load_sweep([d])
    assert sorted(sweep.modules["mtype"].unique()) == sorted(["q", "k", "v", "o", "ffn-gate", "ffn-in", "ffn-out"])
    assert sorted(sweep.modules["layer"].dropna().unique().tolist()) == [0, 1]
    md = build_report([d], tmp_path / "report").read_text()
    assert "final.test.accuracy" in md and "figures/heatmap_" in md


@pytest.mark.long
def test_two_ranks_of_a_decoder_hold_identical_masks_and_adapters(tmp_path):
    from test_distributed import torchrun
    args = [a for a in LM if not a.startswith("trainer.batch_size")] + [
        "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.compact=true",
        "schedule.mask_interval=1", "trainer.num_threads=1", f"hydra.run.dir={tmp_path / 'run'}"]
    p, dump = torchrun(tmp_path, args, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["steps"] == 8   # 64 x 2 epochs / (4 x 2 ranks x 2)
    r0, r1 = (torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [st for st, _ in r0["masks"]] == [st for st, _ in r1["masks"]] and r0["masks"]
    for (_, m0), (_, m1) in zip(r0["masks"], r1["masks"]):
        assert all(torch.equal(a, b) for a, b in zip(m0, m1))
    assert r0["ranks"] == r1["ranks"] == s["final_ranks"]
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"]
    assert all(torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"])


def test_compiled_decoder_forward_trains_as_eager(tmp_path):
    """trainer.compile (aot_eager: traced, same kernels) on the decoder: same losses and masks."""
    common = LM + ["trainer.max_steps=6", "model.dropout=0", "trainer.eval_every=0",
                   "schedule.init_warmup=1", "schedule.final_warmup=2", "schedule.mask_interval=1"]
    from torch._dynamo.utils import counters
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["trainer.compile=default",
                                                    "trainer.compile_backend=aot_eager"])):
        counters.clear()
        s = run_inproc(tmp_path / name, common + extra)
        assert s["status"] == "completed"
        assert (counters["stats"]["unique_graphs"] > 0) == (name == "compiled")   # really traced
        runs[name] = ([r["ranks"] for r in read_jsonl(tmp_path / name / "ranks.jsonl")],
                      [m["loss"] for m in read_jsonl(tmp_path / name / "metrics.jsonl") if m["split"] == "train"])
    assert runs["eager"][0] == runs["compiled"][0] and len(runs["eager"][0]) > 2
    assert np.allclose(runs["eager"][1], runs["compiled"][1], rtol=0, atol=1e-5)
