"""Shared helpers for the experiments tests: tiny configs, in-process and CLI runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A tiny random BERT with the real tokenizer, a small data subset, no progress bar or TB.
TINY = ["model=tiny", "task.max_train_samples=128", "task.max_eval_samples=32",
        "trainer.batch_size=16", "trainer.eval_batch_size=32", "trainer.progress=false",
        "logger.log_every=1", "trainer.eval_every=4"]


def compose(overrides):
    """Compose conf/ exactly as the CLI does; returns (RunConfig, resolved plain dict)."""
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf
    from experiments.train import to_run_config  # registers the schema and resolvers
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg), OmegaConf.to_container(cfg, resolve=True)


def run_inproc(run_dir, overrides):
    from experiments.runner import run
    rc, plain = compose(overrides)
    return run(rc, Path(run_dir), plain)


def run_cli(args, timeout=300, env_extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=env)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def snapshot(folder):
    """{relative path: bytes} of every file under folder, to prove a run was left untouched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def load_script(path, name: str):
    """A script that is not a package module (a study's summarize.py) imported by file path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
