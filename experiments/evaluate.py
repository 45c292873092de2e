"""Evaluate a saved adapter on a task without training, and export a run's adapters to peft.

    python -m experiments.evaluate RUN_DIR [OVERRIDES...] [--out DIR]
    python -m experiments.evaluate PEFT_DIR model=minilm task=rotten_tomatoes [--out DIR]
    python -m experiments.evaluate RUN_DIR --export-peft PEFT_DIR

A run folder brings its own config (``.hydra/config.yaml``); overrides (Hydra syntax, e.g.
``task=reuters_r8`` to score the same adapters elsewhere, or ``trainer.device=cpu``) are
applied on top. A peft folder (``adapter_config.json``; written by ``--export-peft``,
``adalora.save_peft`` or peft itself) is evaluated under the default config plus the overrides;
a classifier head saved beside it (``head.safetensors``) is loaded too. The metrics go to
``DIR`` (default ``<source>/eval-<time>``) in the run-folder format (``summary.json`` with
``"status": "evaluated"``, ``metrics.jsonl``, ``.hydra/config.yaml``), so ``analysis`` reads them.
A ``method=full`` run is refused (full fine-tuning saves no backbone to restore); ``method=head``
and ``peft_*`` runs re-score like ours. Bad input prints one ``error:`` line and exits 2; an
existing ``DIR`` is never overwritten.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

import adalora

from .config import ConfigError, RunConfig
from .model import HEAD
from .provenance import git_commit, versions
from .runlog import RunWriter


def compose(source: Path, overrides: list[str]) -> tuple[RunConfig, dict]:
    """The run's own config (a run folder) or the defaults (a peft folder), plus overrides."""
    from hydra import compose as hcompose, initialize_config_dir
    from omegaconf import OmegaConf
    from .train import CONF_DIR, to_run_config      # registers the schema and resolvers
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = hcompose(config_name="config", overrides=[o for o in overrides if "=" in o])
    saved = source / ".hydra" / "config.yaml"
    if saved.is_file():
        run_cfg = OmegaConf.load(saved)
        run_cfg.pop("hydra", None)
        merged = OmegaConf.merge(base, run_cfg, OmegaConf.from_dotlist(
            [o.lstrip("+") for o in overrides if "=" in o and o.split("=")[0] not in _GROUPS]))
        for o in overrides:                         # a group override replaces that section
            key, _, value = o.lstrip("+").partition("=")
            if key in _GROUPS:
                merged[key] = base[key]
    else:
        merged = base
    merged.trainer.resume = None
    return to_run_config(merged), OmegaConf.to_container(merged, resolve=True)


_GROUPS = ("method", "task", "model", "schedule", "trainer", "logger", "budget")


def trained_method(source: Path) -> str | None:
    """The method a run folder was trained with (its saved config, before any override); None
    for a peft folder."""
    from omegaconf import OmegaConf
    saved = source / ".hydra" / "config.yaml"
    return OmegaConf.select(OmegaConf.load(saved), "method.name") if saved.is_file() else None


def restore(source: Path, cfg: RunConfig):
    """Model, objective and splits of ``cfg`` with the adapters (and head) saved in ``source``."""
    if trained_method(source) == "full":
        # Its backbone is not saved, so the pretrained one plus its head would score a model
        # that never existed: refuse before loading anything.
        raise ConfigError(f"{source} is a method=full run: full fine-tuning saves no weights to restore; "
                          "evaluate re-scores adapter runs (and method=head)")
    from .runner import prepare, seed_everything
    seed_everything(cfg.seed)          # a randomly initialised base (model=tiny) is rebuilt as trained
    prep = prepare(cfg, world_size=1, inject=not (source / "adapter_config.json").is_file())
    model = prep.model
    if (source / "adapter_config.json").is_file():
        adalora.load_peft(source, model.backbone)
    elif (source / "adapters.safetensors").is_file():
        adalora.load_adapters(source / "adapters.safetensors", model.backbone)
    elif cfg.method.name not in ("head",):
        raise ConfigError(f"{source} holds no adapters.safetensors or adapter_config.json: pass a finished "
                          "run folder or a peft folder")
    head = source / "head.safetensors"
    if head.is_file():
        from safetensors.torch import load_file
        saved = load_file(str(head))
        was, need = ({k: tuple(v.shape) for k, v in sorted(sd.items())}
                     for sd in (saved, getattr(model, HEAD).state_dict()))
        if was != need:
            # e.g. a head trained on 2 labels, evaluated on a task of 8: torch's own error is a traceback
            raise ConfigError(f"{head} holds {was} but task={cfg.task.name} on {cfg.model.name} needs {need}: "
                              "evaluate on the task and model the head was trained for")
        getattr(model, HEAD).load_state_dict(saved)
    elif getattr(model, HEAD).state_dict():
        raise ConfigError(f"{source} has no head.safetensors: a classifier needs the head it was trained with")
    return prep


def export_peft(source: Path, out: Path, cfg: RunConfig) -> Path:
    """A run folder's adapters as a peft LoRA folder, with the classifier head beside them."""
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new folder for the export")
    prep = restore(source, cfg)
    from .model import resolve_path
    from .peft_methods import to_adalora_layers
    to_adalora_layers(prep.model.backbone)      # a peft_* run: peft's lora_E is (r, 1), save_peft reads ours
    adalora.save_peft(out, prep.model.backbone, base_model_name_or_path=resolve_path(cfg.model.name_or_path))
    if (source / "head.safetensors").is_file():
        shutil.copyfile(source / "head.safetensors", out / "head.safetensors")
    return out


def evaluate_saved(source: Path, cfg: RunConfig, plain: dict, out: Path) -> dict:
    from .distributed import Dist
    from .loop import evaluate
    from .runner import pick_device
    if out.exists():
        raise ConfigError(f"{out} exists: choose a new --out folder")
    device = pick_device(cfg.trainer.device, Dist())
    prep = restore(source, cfg)
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.trainer.precision]
    prep.model.to(device)
    t0 = time.time()
    out.mkdir(parents=True)
    (out / ".hydra").mkdir()
    from omegaconf import OmegaConf
    OmegaConf.save(OmegaConf.create(plain), out / ".hydra" / "config.yaml")
    writer = RunWriter(out, tensorboard=False)
    final = {}
    for split in ("val", "test"):
        final[split] = evaluate(prep.model, prep.splits[split], cfg, device, amp, prep.objective)
        writer.log_metrics({"step": 0, "split": split, **final[split]})
    summary = {"status": "evaluated", "error": None, "evaluated_from": str(source), "method": cfg.method.name,
               "ablation": cfg.ablation, "task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed,
               "final": final, "final_ranks": {n: int(a.rank_mask.sum()) if isinstance(a, adalora.SVDLinear)
                                               else a.rank for n, a in adalora.find_adapters(prep.model.backbone).items()},
               "wall_time_s": time.time() - t0, "versions": versions(), "git_commit": git_commit()}
    writer.write_summary(summary)
    writer.close()
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a run folder or a peft folder")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task=reuters_r8 trainer.device=cpu")
    ap.add_argument("--out", type=Path, default=None, help="where the metrics go (default <source>/eval-<time>)")
    ap.add_argument("--export-peft", type=Path, default=None, help="write the run's adapters as a peft folder")
    a = ap.parse_args(argv)
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from .overrides import one_line
    from .train import override_error
    try:
        if not a.source.is_dir():
            raise ConfigError(f"{a.source} is not a folder: pass a run folder or a peft folder")
        for arg in a.overrides:              # the training command's checks, in its words
            if (msg := override_error(arg)) is not None:
                raise ConfigError(msg)
        try:
            cfg, plain = compose(a.source, a.overrides)
        except (HydraException, OmegaConfBaseException) as e:   # e.g. a value of the wrong type
            raise ConfigError(one_line(e)) from None
        if a.export_peft is not None:
            print(f"wrote {export_peft(a.source, a.export_peft, cfg)}")
            return 0
        out = a.out or a.source / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
        s = evaluate_saved(a.source, cfg, plain, out)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(" ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items()) for split, m in s["final"].items()))
    print(f"metrics: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
