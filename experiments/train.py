"""Entry point: ``python -m experiments.train [overrides]`` (Hydra; ``-m`` for sweeps).

Hydra stops here: the composed config is converted once to the RunConfig dataclass
(``OmegaConf.to_object`` runs every ``__post_init__`` check) and handed to ``runner.run``.
Bad input of any kind (unknown group option, invalid value, missing dataset package, a run
folder that already holds a run) prints one line to stderr and exits with code 2.
In a multirun the failing job instead writes ``summary.json`` with status failed and the
error, and the sweep goes on (Hydra reports the failure at the end).

Under ``torchrun --nproc_per_node N -m experiments.train ...`` rank 0 lets Hydra create the
run folder and broadcasts its path; the other ranks run Hydra with ``hydra.run.dir=.``, no
``.hydra/`` and no log file, so one run has one folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from . import distributed as D
from .config import ConfigError, RunConfig
from .overrides import CONF_DIR, compose_error
GROUPS = ("method", "task", "model", "schedule", "trainer", "logger", "budget", "ablation",
          "experiment")
ADD_ON = ("rank_budget",)     # groups outside the defaults list: added with +group=option

ConfigStore.instance().store(name="run_schema", node=RunConfig)
if not OmegaConf.has_resolver("resume_or"):
    # hydra.run.dir: the resumed run's own folder when trainer.resume is set.
    OmegaConf.register_new_resolver("resume_or", lambda resume, default: resume or default)


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def to_run_config(cfg: DictConfig) -> RunConfig:
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as e:  # OmegaConf type/missing-value errors, dataclass checks
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(msg) from None


def key_error(key: str) -> str | None:
    """``trainer.lrr=1``: name the section's fields instead of Hydra's multi-line report; and a
    top-level key the config does not have (``+sead=7``, which Hydra would add)."""
    import dataclasses
    head, _, rest = key.partition(".")
    fields = {f.name: f.default_factory for f in dataclasses.fields(RunConfig)}
    if not rest and head not in fields and head not in GROUPS + ADD_ON and not head.startswith("hydra"):
        return f"unknown key '{key}'; the config has: {', '.join(fields)}"
    section = fields.get(head)
    if not rest or not dataclasses.is_dataclass(section):
        return None
    names = [f.name for f in dataclasses.fields(section)]
    if rest.split(".")[0] not in names:
        return f"unknown key '{key}'; {head} has: {', '.join(names)}"
    return None


RENAMED = {("ablation", "random"): "ablation=random_churn (new scores every mask step) or "
                                   "ablation=random_fixed (one draw)",
           ("schedule.score", "random"): "schedule.score=random_churn or schedule.score=random_fixed"}


def override_error(arg: str) -> str | None:
    """What is wrong with one override before Hydra reads it, in one line (None: nothing seen):
    a renamed option, an unknown key, an unknown group option."""
    if "=" not in arg or arg.startswith("-"):
        return None
    key, _, value = arg.lstrip("+~").partition("=")
    for v in value.split(","):
        if (key, v) in RENAMED:
            return f"{key}={v} was renamed: use {RENAMED[(key, v)]}"
    if (msg := key_error(key)) is not None:
        return msg
    if key in ADD_ON and not arg.startswith("+"):
        return f"{key} is not in the default config: add it with +{arg}"
    if key in GROUPS + ADD_ON and value not in ("null", ""):
        for v in value.split(","):
            if not (CONF_DIR / key / f"{v}.yaml").is_file():
                opts = sorted(p.stem for p in (CONF_DIR / key).glob("*.yaml"))
                return f"unknown {key} '{v}'; choose one of {', '.join(opts)}"
    return None


def check_argv(argv: list[str]) -> None:
    """Checks Hydra would only make after touching the run folder (it writes ``.hydra/`` and
    the log there first) or with a multi-line report: the overrides (``override_error``); run
    and sweep folders that already hold a run; a resume from a folder with nothing to resume."""
    from . import checkpoint as ckpt
    from .runlog import read_summary
    from .runner import held_run
    given = {}
    for arg in argv:
        if (msg := override_error(arg)) is not None:
            fail(msg)
        if "=" in arg and not arg.startswith("-"):
            key, _, value = arg.lstrip("+~").partition("=")
            given[key] = value
    run_dir, resume, sweep = (given.get(k) for k in ("hydra.run.dir", "trainer.resume", "hydra.sweep.dir"))
    if resume in ("", "null"):
        resume = None
    if resume and run_dir and Path(run_dir).resolve() != Path(resume).resolve():
        fail(f"trainer.resume continues in the run's own folder ({resume}): drop hydra.run.dir={run_dir}")
    for folder in filter(None, (resume, run_dir)):
        s = read_summary(Path(folder))
        if s is not None and s.get("status") == "completed":
            fail(f"{folder} already holds a completed run; choose a new hydra.run.dir")
        if s is not None and not resume:
            fail(held_run(Path(folder), s))
    if resume and not (Path(resume) / ckpt.NAME).is_file():
        fail(f"trainer.resume={resume}: no {ckpt.NAME} there (set trainer.checkpoint_every=N for runs "
             "you may need to resume)")
    if sweep and Path(sweep).is_dir():
        for job in sorted(Path(sweep).iterdir()):
            if (s := read_summary(job)) is not None:
                held = "a completed run" if s.get("status") == "completed" else f"a run (status {s.get('status')})"
                fail(f"{job} already holds {held}; choose a new hydra.sweep.dir")


def resume_error(argv: list[str]) -> str | None:
    """A resume whose overrides differ from the checkpointed run's, refused before Hydra writes
    the new config into the run's ``.hydra/``; the same check ``runner.run`` makes."""
    if not any(o.lstrip("+~").startswith("trainer.resume=") for o in argv):
        return None                    # no resume asked: no second composition of the config
    from hydra import compose, initialize_config_dir
    from .runner import check_resumable
    mine = [o for o in argv if "=" in o and not o.startswith("-") and not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=mine)
    if not cfg.trainer.resume:
        return None
    try:
        check_resumable(Path(cfg.trainer.resume), OmegaConf.to_container(cfg, resolve=True))
    except ConfigError as e:
        return str(e)
    return None


def record_failed_job(run_dir: Path, cfg: DictConfig, error: str) -> None:
    """A multirun job refused at start: its folder says why, unless it holds a run already."""
    from .runlog import atomic_write_json, read_summary
    if read_summary(run_dir) is not None:
        return
    pick = lambda key: OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)  # noqa: E731
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "summary.json", {
        "status": "failed", "error": f"ConfigError: {error}", "method": pick("method.name"),
        "ablation": pick("ablation"), "task": pick("task.name"), "model": pick("model.name"),
        "seed": pick("seed")})


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.types import RunMode
    from .runner import layer_table, run
    dist = D.current()
    run_dir = Path(D.broadcast_object(HydraConfig.get().runtime.output_dir, dist))
    try:
        rc = to_run_config(cfg)
        summary = run(rc, run_dir, OmegaConf.to_container(cfg, resolve=True), dist)
    except ConfigError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            record_failed_job(run_dir, cfg, str(e))
            raise                 # Hydra marks this job failed and runs the others
        fail(str(e))
    if not dist.is_main:
        return float("nan")
    final = summary.get("final", {}).get("test", {})
    metric = rc.task.metric
    print(f"\n{summary['method']} on {summary['task']} ({summary['model']}): status "
          f"{summary['status']}, {summary['steps']} steps, {summary['wall_time_s']:.0f} s")
    if final and "objective" in summary:      # a language-model task: its own scores
        print(f"test {metric} {final[metric]:.4f}  (" + ", ".join(
            f"{k} {v:.4f}" for k, v in final.items() if k != metric) + ")")
    elif final:
        print(f"test {metric} {final[metric]:.4f}  (accuracy {final['accuracy']:.4f}, macro-F1 "
              f"{final['macro_f1']:.4f}, MCC {final['mcc']:.4f})")
    p = summary["params"]
    base = "base, trained" if summary["method"] == "full" else "frozen base"
    print(f"trainable params: start {p['trainable_start']:,}  end {p['trainable_end']:,}  "
          f"(adapters {p['adapter_start']:,} -> {p['adapter_end']:,}; {base} {p['base']:,})")
    b = summary["budget"]
    if b.get("target_params") is not None:
        matched = (f"; matched LoRA rank {b['matched_lora_rank']} = {b['lora_params']:,} params"
                   if b.get("matched_lora_rank") is not None else "")
        print(f"budget: AdaLoRA target {b['target_params']:,} params{matched}")
    if summary["final_ranks"]:
        print("final ranks (layer x matrix):\n" + layer_table(summary["final_ranks"]))
    print(f"run folder: {run_dir}")
    return objective(summary, metric)


def objective(summary: dict, metric: str) -> float:
    """What ``main`` returns to a Hydra sweeper: the validation metric. Tuning on the test split
    would make every test number optimistic, so the test metric is never returned."""
    return float(summary.get("final", {}).get("val", {}).get(metric, float("nan")))


RANK_LOCAL_HYDRA = ("hydra.run.dir=", "hydra.output_subdir=", "hydra/job_logging=")


def cli() -> None:
    argv = sys.argv[1:]
    check_argv(argv)
    if not ({"-m", "--multirun"} & set(argv)):
        if (msg := compose_error("config", argv) or resume_error(argv)) is not None:
            fail(msg)             # e.g. trainer.lr=abc, which Hydra reports in many lines
    if not D.launched():
        main()
        return
    if "-m" in argv or "--multirun" in argv:
        fail("torchrun runs one job: drop -m, or launch one torchrun per sweep point")
    from torch.distributed.elastic.multiprocessing.errors import record
    try:
        dist = D.init()
    except ValueError as e:
        fail(str(e))
    if not dist.is_main:          # Hydra must not create a folder (or a log) per rank
        sys.argv = [sys.argv[0]] + [a for a in argv if not a.startswith(RANK_LOCAL_HYDRA)] + [
            "hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    try:
        record(main)()            # torchrun's error file names the failing rank's traceback
    finally:
        D.shutdown()


if __name__ == "__main__":
    cli()
