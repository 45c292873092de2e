"""The command line as a user meets it (subprocesses): bad input gives one line on stderr and a
non-zero exit without touching finished runs; joblib and submitit sweeps; SIGTERM pre-emption
then resume; and one run with the real offline model and data (marked slow, CI runs it)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exp_utils import REPO, TINY, read_jsonl, run_cli, snapshot

FAST = TINY + ["task.max_train_samples=64", "trainer.max_steps=4", "logger.tensorboard=false"]


def assert_one_line_error(p, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("override, words", [
    ("method=foo", ["unknown method 'foo'", "adalora"]),
    ("task=nope", ["unknown task 'nope'", "rotten_tomatoes"]),
    ("model.name_or_path=/no/such/model", ["/no/such/model"]),
    ("method.targets=[nothing_here]", ["matched no linear layer"]),
    ("schedule.init_warmup=3 schedule.final_warmup=3", ["impossible schedule", "total_steps=4"]),
    ("schedule.score=bogus", ["schedule.score"]),
    ("trainer.lrr=1", ["unknown key 'trainer.lrr'", "head_lr"]),
    ("trainer.lr=abc", ["trainer.lr=abc: Value 'abc' of type 'str' could not be converted to Float"]),
    ("seed=-1", ["seed=-1 must be in [0, 2**32)"]),
    ("+sead=7", ["unknown key 'sead'", "seed"]),                  # Hydra would add it and train
    ("rank_budget=r1", ["not in the default config: add it with +rank_budget=r1"]),
    ("+rank_budget=r9", ["unknown rank_budget 'r9'", "r1, r2, r4"]),
    ("method=elalora method.elalora_start_rank=12 trainer.max_steps=10",
     ["ElaLoRA grows: its start budget 144 must be below the target 72 (values); set a smaller "
      "method.elalora_start_rank"]),
])
def test_bad_input_is_one_line_and_exit_2(override, words, tmp_path):
    p = run_cli(FAST + override.split() + [f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(p, *words)
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("command, override, words", [
    ("planted", "bogus=1", ["unknown key 'bogus'; the planted study takes: allocator, seeds, configs, threads"]),
    ("planted", "method=lora", ["unknown key 'method'"]),          # a training group, not the study's
    ("planted", "seeds=abc", ["seeds=abc: Value 'abc' of type 'str' could not be converted to Integer"]),
    ("benchmark", "rounds=abc", ["rounds=abc: Value 'abc' of type 'str' could not be converted to Integer"]),
    ("benchmark", "task=rotten_tomatoes", ["unknown key 'task'; the benchmark takes: preset, layers"]),
])
def test_the_other_commands_check_their_overrides_in_one_line(command, override, words, tmp_path):
    p = subprocess.run([sys.executable, "-m", f"experiments.{command}", override, f"hydra.run.dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(p, *words)
    assert not any(tmp_path.iterdir())


def test_missing_dataset_package_names_the_pip_package(tmp_path):
    # Shadow `datasets` with a package whose import fails, so the test holds whether or not
    # the real one is installed.
    (tmp_path / "shadow" / "datasets").mkdir(parents=True)
    (tmp_path / "shadow" / "datasets" / "__init__.py").write_text("raise ImportError('blocked')\n")
    p = run_cli(FAST + ["task.dataset=hf:glue/rte", f"hydra.run.dir={tmp_path / 'run'}"],
                env_extra={"PYTHONPATH": f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"})
    assert_one_line_error(p, "pip install datasets")


def test_missing_label_column(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,sentiment\n" + "".join(f"review {i},{i % 2}\n" for i in range(40)))
    p = run_cli(FAST + [f"task.dataset=file:{f}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_one_line_error(p, "no column 'label'", "sentiment")


def _fake_finished_run(d: Path) -> dict:
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (d / "summary.json").write_text(json.dumps({"status": "completed"}))
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    return snapshot(d)


def test_finished_run_folder_is_refused_and_untouched(tmp_path):
    d = tmp_path / "done"
    before = _fake_finished_run(d)
    p = run_cli(FAST + [f"hydra.run.dir={d}"])
    assert_one_line_error(p, "completed run")
    assert snapshot(d) == before
    sweep = tmp_path / "sweep"
    before = _fake_finished_run(sweep / "0")
    p = run_cli(["-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert_one_line_error(p, "completed run")
    assert snapshot(sweep / "0") == before and not (sweep / "1").exists()


def test_unfinished_run_folder_is_refused_and_untouched(tmp_path):
    """A new run would append to an interrupted run's logs and leave its checkpoint behind."""
    d = tmp_path / "cut"
    (d / ".hydra").mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(d)
    p = run_cli(FAST + [f"hydra.run.dir={d}"])
    assert_one_line_error(p, f"{d} already holds a run (status interrupted)", f"trainer.resume={d}")
    assert snapshot(d) == before
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "summary.json").write_text(json.dumps({"status": "failed"}))
    p = run_cli(["-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert_one_line_error(p, "already holds a run (status failed)", "new hydra.sweep.dir")
    assert sorted(p.name for p in sweep.rglob("*")) == ["0", "summary.json"]


def test_a_refused_resume_writes_nothing(tmp_path):
    """Hydra writes the command's config into the run folder before a run starts: a resume that
    is refused (another setting, another folder, nothing to resume) is refused before that."""
    d = tmp_path / "run"
    args = FAST + ["trainer.checkpoint_every=2"]
    p = run_cli(args + ["trainer.stop_at_step=2", f"hydra.run.dir={d}"])
    assert p.returncode == 0 and json.loads((d / "summary.json").read_text())["status"] == "interrupted"
    before = snapshot(d)
    p = run_cli(args + [f"trainer.resume={d}", "trainer.lr=0.5"])
    assert_one_line_error(p, "config differs from the checkpointed run at trainer.lr (0.002 -> 0.5)")
    p = run_cli(args + [f"trainer.resume={d}", f"hydra.run.dir={tmp_path / 'elsewhere'}"])
    assert_one_line_error(p, "continues in the run's own folder", "drop hydra.run.dir")
    assert snapshot(d) == before and not (tmp_path / "elsewhere").exists()
    p = run_cli(args + [f"trainer.resume={tmp_path / 'none'}"])
    assert_one_line_error(p, "no checkpoint.pt there")
    assert not (tmp_path / "none").exists()
    p = run_cli(args + [f"trainer.resume={d}"])
    assert p.returncode == 0 and json.loads((d / "summary.json").read_text())["status"] == "completed"
    budget = [line for line in p.stdout.splitlines() if line.startswith("budget:")]
    assert budget == ["budget: AdaLoRA target 5,448 params"]     # nothing matched: no LoRA rank


@pytest.mark.long
def test_joblib_multirun_two_jobs(tmp_path):
    p = run_cli(["-m", *FAST, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                 "method=adalora,lora", "budget=matched", f"hydra.sweep.dir={tmp_path}"])
    assert p.returncode == 0, p.stderr[-3000:]
    s = [json.loads((tmp_path / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [x["method"] for x in s] == ["adalora", "lora"] and all(x["status"] == "completed" for x in s)
    assert s[0]["budget"]["target_params"] == s[1]["budget"]["target_params"]
    assert s[1]["lora_rank"] == s[0]["budget"]["matched_lora_rank"]


@pytest.mark.long
def test_submitit_local_runs_one_job(tmp_path):
    p = run_cli(["-m", *FAST, "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "0" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.long
def test_sigterm_checkpoints_then_resume_completes(tmp_path):
    d = tmp_path / "pre"
    args = TINY + ["task.max_train_samples=512", "trainer.epochs=3", "logger.tensorboard=false",
                   "trainer.checkpoint_every=1000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train", *args, f"hydra.run.dir={d}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (d / "metrics.jsonl").is_file() and len(read_jsonl(d / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "interrupted" and 3 <= s["steps"] < 96 and (d / "checkpoint.pt").is_file()
    p = run_cli(args + [f"trainer.resume={d}"])
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 96
    steps = [m["step"] for m in read_jsonl(d / "metrics.jsonl") if m["split"] == "train"]
    assert steps == list(range(1, 97))                # no step logged twice, none missing


@pytest.mark.long
@pytest.mark.slow
def test_real_model_and_data_learn(tmp_path):
    """all-MiniLM-L6-v2 + Rotten Tomatoes from the offline wheels, a few AdaLoRA steps."""
    p = run_cli(["task.max_train_samples=256", "task.max_eval_samples=128", "trainer.progress=false",
                 "logger.tensorboard=false", "trainer.eval_every=0", f"hydra.run.dir={tmp_path}"],
                timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["model"] == "minilm" and s["steps"] == 8
    assert s["params"]["base"] > 22_000_000 and len(s["final_ranks"]) == 36
    assert sum(s["final_ranks"].values()) == s["schedule"]["target_budget"] == 216
    assert "final ranks (layer x matrix)" in p.stdout and "run folder:" in p.stdout
    # Chance on this binary task is ln 2 = 0.693 (a run at lr 1e-9 ends at 0.694, accuracy 0.53,
    # which the old bound 0.75 let through). Measured here, 8 steps: test loss 0.638 / 0.635 /
    # 0.635 and accuracy 0.59 / 0.64 / 0.62 for seeds 0 / 1 / 2; asserted 0.66, 0.03 below chance.
    assert s["final"]["test"]["loss"] <= 0.66
    assert s["final"]["test"]["accuracy"] >= 0.55     # 128 examples: chance is 0.5 ± 0.044
