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
