"""Evaluating a saved adapter without training, and exporting a run to a peft folder."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exp_utils import REPO, TINY, read_jsonl, run_cli, snapshot

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "adalora"
    r = run_cli(TINY + ["trainer.max_steps=8", "logger.tensorboard=false", "schedule.init_warmup=1",
                        "schedule.final_warmup=2", "schedule.mask_interval=1", f"hydra.run.dir={d}"])
    assert r.returncode == 0, r.stderr
    return d


class _Result:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def _evaluate(*args, capsys=None):
    """``python -m experiments.evaluate ARGS`` in this process (its main returns the exit code)."""
    from experiments.evaluate import main
    code = main([str(a) for a in args])
    return _Result(code, capsys.readouterr().err if capsys else "")


@pytest.mark.long
def test_a_run_folder_evaluates_to_its_own_final_metrics(run_dir, tmp_path):
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "experiments.evaluate", str(run_dir), "--out", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    trained = json.loads((run_dir / "summary.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "evaluated" and s["evaluated_from"] == str(run_dir)
    for split in ("val", "test"):
        assert s["final"][split] == pytest.approx(trained["final"][split], abs=1e-6)
    assert s["final_ranks"] == trained["final_ranks"]
    assert {line["split"] for line in read_jsonl(out / "metrics.jsonl")} == {"val", "test"}
    from analysis.runs import load_sweep                 # the analysis reads it as a run
    assert len(load_sweep(str(out)).runs) == 1


def test_export_to_peft_and_evaluate_the_peft_folder(run_dir, tmp_path, capsys):
    folder = tmp_path / "peft"
    r = _evaluate(run_dir, "--export-peft", folder, capsys=capsys)
    assert r.returncode == 0, r.stderr
    assert (folder / "adapter_config.json").is_file() and (folder / "head.safetensors").is_file()
    out = tmp_path / "eval"
    r = _evaluate(folder, *TINY, "--out", out, capsys=capsys)
    assert r.returncode == 0, r.stderr
    trained = json.loads((run_dir / "summary.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    for split in ("val", "test"):
        assert s["final"][split]["accuracy"] == pytest.approx(trained["final"][split]["accuracy"], abs=1e-6)
        assert s["final"][split]["loss"] == pytest.approx(trained["final"][split]["loss"], abs=1e-5)


def test_bad_sources_are_one_line_and_touch_nothing(run_dir, tmp_path, capsys):
    before = snapshot(run_dir)
    r = _evaluate(tmp_path / "missing", capsys=capsys)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "is not a folder" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _evaluate(empty, *TINY, capsys=capsys)
    assert r.returncode == 2 and "holds no adapters.safetensors" in r.stderr
    (tmp_path / "taken").mkdir()
    r = _evaluate(run_dir, "--out", tmp_path / "taken", capsys=capsys)
    assert r.returncode == 2 and "exists" in r.stderr
    # overrides get the training command's one-line checks, and a mistyped value Hydra's reason
    for override, says in (("task=bogus", "unknown task 'bogus'; choose one of csv, glue_cola"),
                           ("trainer.lrr=1", "unknown key 'trainer.lrr'; trainer has: epochs"),
                           ("trainer.lr=abc", "trainer.lr=abc: Value 'abc' of type 'str' could not be converted"),
                           # a head trained on 2 labels, on a task of 8 (torch's error was a traceback)
                           ("task=reuters_r8", "head.safetensors holds {'bias': (2,), 'weight': (2, 32)} but "
                                               "task=reuters_r8 on tiny-random needs {'bias': (8,), 'weight': (8, 32)}")):
        r = _evaluate(run_dir, override, "--out", tmp_path / "never", capsys=capsys)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and says in r.stderr
        assert r.stderr.count("\n") == 1 and not (tmp_path / "never").exists()
    assert snapshot(run_dir) == before


# ---- runs of other methods: peft's adapters, a frozen backbone, full fine-tuning ----------------
SHORT = TINY + ["trainer.max_steps=8", "logger.tensorboard=false"]
# peft_adalora masks at steps 1..6 (t_i=1, T-t_f=6), so the saved ranks are below r0
PEFT_ADALORA = SHORT + ["method=peft_adalora", "schedule.init_warmup=1", "schedule.final_warmup=2",
                        "schedule.mask_interval=1"]


def _train_inproc(d, overrides):
    """A run in this process, with the ``.hydra/config.yaml`` the training command writes."""
    from omegaconf import OmegaConf
    from exp_utils import compose
    from experiments.runner import run
    rc, plain = compose(overrides)
    summary = run(rc, d, plain)
    (d / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(plain), d / ".hydra" / "config.yaml")
    return summary


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("other_runs")
    runs = {}
    for name, overrides in (("peft_adalora", PEFT_ADALORA), ("peft_lora", SHORT + ["method=peft_lora"]),
                            ("head", SHORT + ["method=head"]), ("full", TINY + ["method=full", "trainer.max_steps=2",
                                                                                   "logger.tensorboard=false"])):
        assert _train_inproc(d / name, overrides)["status"] == "completed"
        runs[name] = d / name
    return runs


@pytest.mark.parametrize("method", ["peft_adalora", "peft_lora", "head"])
def test_peft_and_head_runs_evaluate_to_their_own_final_metrics(other_runs, method, tmp_path, capsys):
    run_dir, out = other_runs[method], tmp_path / "eval"
    r = _evaluate(run_dir, "--out", out, capsys=capsys)
    assert r.returncode == 0, r.stderr
    trained = json.loads((run_dir / "summary.json").read_text())
    s = json.loads((out / "summary.json").read_text())
    for split in ("val", "test"):
        # the kept triplets alone sum in another order than all r0 with zeros: not bitwise
        assert s["final"][split] == pytest.approx(trained["final"][split], abs=1e-6)
    assert s["final_ranks"] == trained["final_ranks"]
    if method == "peft_adalora":
        assert sum(trained["final_ranks"].values()) < trained["schedule"]["initial_budget"]


def test_peft_adalora_run_exports_a_folder_peft_loads(other_runs, tmp_path, capsys):
    """The export of a peft run holds our layers' update: peft's own loader on a fresh base gives
    the logits of the restored run, and evaluate scores the folder as the run."""
    import torch
    from peft import PeftModel
    from experiments.evaluate import compose, restore
    from experiments.runner import prepare, seed_everything
    run_dir, folder = other_runs["peft_adalora"], tmp_path / "peft"
    r = _evaluate(run_dir, "--export-peft", folder, capsys=capsys)
    assert r.returncode == 0, r.stderr
    config = json.loads((folder / "adapter_config.json").read_text())
    trained = json.loads((run_dir / "summary.json").read_text())
    assert config["peft_type"] == "LORA"
    assert {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()} == \
        {n: k for n, k in trained["final_ranks"].items() if k > 0}
    cfg, _ = compose(run_dir, [])
    ours = restore(run_dir, cfg).model.eval()
    seed_everything(cfg.seed)                  # the same random tiny base the run was trained on
    theirs = prepare(cfg, inject=False).model
    from safetensors.torch import load_file
    theirs.classifier.load_state_dict(load_file(str(folder / "head.safetensors")))
    theirs.eval()
    x = torch.randint(0, 100, (2, 8))
    logits = lambda m: m(input_ids=x, attention_mask=torch.ones_like(x))
    theirs.backbone = PeftModel.from_pretrained(theirs.backbone, str(folder)).base_model.model
    with torch.no_grad():
        assert torch.allclose(logits(ours), logits(theirs), atol=1e-5)
        # a few steps move the logits little: compare every module's update itself
        from adalora import find_adapters
        for name, view in find_adapters(ours.backbone).items():
            mod = theirs.backbone.get_submodule(name)
            if trained["final_ranks"][name] == 0:          # left out of the export
                assert not hasattr(mod, "lora_A") and not view.delta_weight().any()
                continue
            d = view.delta_weight()
            assert d.abs().max() > 0 and torch.allclose(mod.get_delta_weight("default"), d,
                                                        rtol=1e-4, atol=1e-6 * d.abs().max().item())
    out = tmp_path / "eval"
    r = _evaluate(folder, *TINY, "--out", out, capsys=capsys)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    for split in ("val", "test"):
        assert s["final"][split]["accuracy"] == pytest.approx(trained["final"][split]["accuracy"], abs=1e-6)
        assert s["final"][split]["loss"] == pytest.approx(trained["final"][split]["loss"], abs=1e-5)


def test_full_run_is_refused_in_one_line_saying_why(other_runs, tmp_path, capsys):
    run_dir = other_runs["full"]
    before = snapshot(run_dir)
    for args in (("--out", tmp_path / "never"), ("--export-peft", tmp_path / "never"),
                 ("method=lora", "--out", tmp_path / "never")):       # the run's own method counts
        r = _evaluate(run_dir, *args, capsys=capsys)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"error: {run_dir} is a method=full run: full fine-tuning saves no weights")
        assert not (tmp_path / "never").exists()
    assert snapshot(run_dir) == before
