"""One run, from a validated RunConfig to a finished run folder: data, model, adapters, the
loop, and the files of the run-folder contract. No Hydra here (train.py stops at main())."""
from __future__ import annotations

import json
import os
import random
import re
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

import adalora

from . import checkpoint as ckpt
from . import distributed as D
from .build import Built, build, count_params
from .config import ConfigError, RunConfig
from .provenance import git_commit, versions
from .runlog import RunWriter, read_summary
from .loop import train
from . import lm, step_graph
from .model import HEAD, load_model, load_tokenizer, tokenize
from .objective import for_task
from .tasks import load_task

# Keys that may differ between a run and its resumption without changing the result.
RESUME_FREE = ("trainer.resume", "trainer.stop_at_step", "trainer.checkpoint_every",
               "trainer.progress", "trainer.eval_every", "trainer.max_nonfinite_steps",
               "trainer.num_threads", "logger.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def held_run(run_dir: Path, summary: Dict[str, Any]) -> str:
    """Why a new run may not start in ``run_dir``, which holds an unfinished one."""
    return (f"{run_dir} already holds a run (status {summary.get('status')}); continue it with "
            f"trainer.resume={run_dir}, or choose a new run folder")


def check_resumable(run_dir: Path, config: Dict[str, Any]) -> dict:
    s = read_summary(run_dir)
    if s is not None and s.get("status") == "completed":
        raise ConfigError(f"{run_dir} holds a completed run; nothing to resume")
    if not (run_dir / ckpt.NAME).is_file():
        raise ConfigError(f"trainer.resume={run_dir}: no {ckpt.NAME} there (set "
                          "trainer.checkpoint_every=N for runs you may need to resume)")
    state = ckpt.load(run_dir)
    old, new = flatten(json.loads(state["config"])), flatten(config)
    for k in sorted(set(old) | set(new)):
        if not k.startswith(RESUME_FREE) and old.get(k) != new.get(k):
            # json.dumps spells the run's value as a Hydra override does: null, true, 3, "x"
            raise ConfigError(f"trainer.resume: config differs from the checkpointed run at "
                              f"{k} ({old.get(k)!r} -> {new.get(k)!r}); use the same overrides "
                              f"({k}={json.dumps(old.get(k))})")
    return state


def layer_table(ranks: Dict[str, int]) -> str:
    """Final ranks as a layer x matrix-type table (names like encoder.layer.3.attention.self.query)."""
    rows: Dict[str, Dict[str, int]] = {}
    types: list = []
    for name, r in ranks.items():
        m = re.search(r"\.(\d+)\.(.+)$", name)
        layer, typ = (m.group(1), m.group(2)) if m else ("-", name)
        typ = typ.replace("attention.self.", "").replace("attention.output.dense", "attn.out")
        typ = typ.replace("intermediate.dense", "ffn.in").replace("output.dense", "ffn.out")
        rows.setdefault(layer, {})[typ] = r
        if typ not in types:
            types.append(typ)
    w = max(6, *(len(t) for t in types))
    lines = ["layer " + "".join(f"{t:>{w + 1}}" for t in types)]
    for layer, d in rows.items():
        lines.append(f"{layer:<6}" + "".join(f"{d.get(t, '-'):>{w + 1}}" for t in types))
    return "\n".join(lines)


class _NoWriter:
    """What ranks other than 0 write into the run folder: nothing."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir

    def log_metrics(self, record) -> None:
        pass

    log_ranks = write_summary = log_metrics

    def close(self) -> None:
        pass


@dataclass
class Prepared:
    """What a run trains or evaluates: data, tokenizer, objective, model, adapters, token splits."""
    data: Any
    tokenizer: Any
    objective: Any
    model: Any
    built: Optional[Built]
    splits: Dict[str, Dict[str, torch.Tensor]]
    label_words: Optional[list] = None       # a causal LM's answer words, one per label


def prepare(cfg: RunConfig, world_size: int = 1, inject: bool = True) -> Prepared:
    """Load the task and the model, put the adapters in (``build``; not with ``inject=False``,
    for adapters loaded from elsewhere) and tokenize every split."""
    data = load_task(cfg.task)
    tok = load_tokenizer(cfg.model)
    decoder = cfg.task.objective != "classify"      # a causal LM (experiments/lm.py)
    if decoder and cfg.method.name == "head":
        raise ConfigError("method=head trains a classifier head; a causal LM has none: use "
                          "method=lora, adalora or full")
    words = None
    try:
        if cfg.task.objective == "answer" and data.label_names:
            words = lm.label_words(cfg.task, data.label_names)
        objective = for_task(cfg.task, data.num_labels, tok, words, capturable=cfg.trainer.step_graph)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0])
    model = load_model(cfg.model, data.num_labels, len(tok), decoder=decoder)
    built = build(cfg, model, len(data.train), world_size=world_size) if inject else None
    if built is not None and decoder and cfg.model.quantize == "nf4" and not built.quantized:
        raise ConfigError(f"model.quantize=nf4: model {cfg.model.name} has no nn.Linear to "
                          "quantize (GPT-2's Conv1D maps are not supported); use a Llama-style model")
    if decoder:
        splits = {s: lm.tokenize_lm(tok, getattr(data, s), cfg.task, words)
                  for s in ("train", "val", "test")}
    else:
        splits = {s: tokenize(tok, getattr(data, s), cfg.task.max_len) for s in ("train", "val", "test")}
    return Prepared(data, tok, objective, model, built, splits, words)


def pick_device(requested: str, dist: D.Dist) -> torch.device:
    """``trainer.device`` resolved (``distributed.device_for``), refused in one line where this
    machine has no such device: torch's own error is a traceback from deep in the first ``.to``."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={requested}: this torch ({torch.__version__}) sees no CUDA device; "
                          "use trainer.device=cpu or auto")
    device = D.device_for(requested, dist)
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ConfigError(f"trainer.device={requested}: there are {torch.cuda.device_count()} CUDA devices, "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def run(cfg: RunConfig, run_dir: Path, config: Dict[str, Any],
        dist: Optional[D.Dist] = None) -> Dict[str, Any]:
    """Train one configuration into ``run_dir``; return the summary written there.

    Under torchrun every rank calls this with the same ``run_dir`` (rank 0's); rank 0 alone
    reads the old folder and writes the new files, other ranks write only ``error.rank<r>.txt``
    when they fail."""
    run_dir = Path(run_dir)
    dist = dist or D.current()

    def resume_state_on_main() -> Optional[dict]:
        old = read_summary(run_dir)
        if old is not None and old.get("status") == "completed":
            raise ConfigError(f"{run_dir} already holds a completed run; choose a new run folder")
        if cfg.trainer.resume:
            return check_resumable(run_dir, config)
        if old is not None:
            # Its logs are appended to and its checkpoint would outlive it: two runs in one folder.
            raise ConfigError(held_run(run_dir, old))
        return None
    resume_state = D.on_main(resume_state_on_main, dist)         # broadcast to every rank
    if resume_state is not None and resume_state.get("world_size", 1) != dist.world_size:
        raise ConfigError(f"trainer.resume: the checkpoint was written by {resume_state.get('world_size', 1)}"
                          f" process(es), this run has {dist.world_size}; total_steps and the data "
                          "order depend on it: resume with the same --nproc_per_node")
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    device = pick_device(cfg.trainer.device, dist)
    if cfg.trainer.precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    step_graph.refuse(cfg, device, dist.world_size)
    seed_everything(cfg.seed)       # the same model and adapter init on every rank
    t0 = time.time()

    prep = prepare(cfg, dist.world_size)
    data, model, built, splits, objective = prep.data, prep.model, prep.built, prep.splits, prep.objective
    if dist.rank > 0:               # own dropout streams; rank 0 keeps the 1-process stream
        torch.manual_seed((cfg.seed << 16) + dist.rank)
    p0 = count_params(model, built.adapters, built.allocator)

    m, a = cfg.method, built.allocator
    summary: Dict[str, Any] = {
        "status": "running", "error": None, "method": m.name, "ablation": cfg.ablation,
        "task": cfg.task.name, "model": cfg.model.name, "seed": cfg.seed,
        # svd_truncate's LoRA adapters start at init_rank too, before the cut to the target
        "init_rank": m.init_rank if m.uses_svd or m.name == "svd_truncate" else None,
        "target_rank": built.target_rank, "lora_rank": built.lora_rank,
        "budget": built.budget or {"target_params": None, "matched_lora_rank": None,
                                   "lora_params": None},
        "scale": scale_summary(m.scale_rule, built.adapters),
        "schedule": None if a is None else {
            "total_steps": built.total_steps, "init_warmup": built.init_warmup,
            "final_warmup": built.final_warmup, "mask_interval": cfg.schedule.mask_interval,
            "shape": cfg.schedule.shape, "initial_budget": a.initial_budget,
            "target_budget": a.target_budget},
        "params": {"trainable_start": p0["trainable"], "trainable_end": None,
                   "adapter_start": p0["adapter"], "adapter_end": None, "base": p0["base"]},
        "final": {}, "final_ranks": {}, "module_shapes": {
            n: list(s) for n, s in adalora.adapter_shapes(built.adapters).items()},
        "steps": built.total_steps, "wall_time_s": None, "versions": versions(),
        "git_commit": git_commit(), "num_labels": data.num_labels,
        "label_names": data.label_names, "quantized_modules": len(built.quantized),
        "n_train": len(data.train), "n_val": len(data.val), "n_test": len(data.test),
        "world_size": dist.world_size}
    if cfg.task.objective != "classify":
        summary.update(objective=cfg.task.objective, label_words=prep.label_words)
    # Bytes of the model's weights as stored (NF4 blocks, bf16 or fp32), and on a GPU the peak
    # allocated over the run (written at the end): what a stored-precision comparison reads.
    summary["memory"] = {"weights_bytes": sum(t.numel() * t.element_size() for t in
                                              [*model.parameters(), *model.buffers()]),
                         "peak_gpu_bytes": None}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if resume_state is not None:
        summary["wall_time_s_before_resume"] = resume_state.get("wall_time_s", 0.0)
    if resume_state is not None and dist.is_main:
        # Drop lines past the checkpoint (before the writer opens the files for appending).
        # metrics.jsonl counts steps done (logged after step += 1); ranks.jsonl records carry
        # the 0-based index of the step that masked, so a record of step index k belongs to a
        # checkpoint of step > k (a kill between the record and the checkpoint must not leave
        # it twice).
        truncate_after(run_dir / "metrics.jsonl", resume_state["step"])
        truncate_after(run_dir / "ranks.jsonl", resume_state["step"] - 1)
    writer = RunWriter(run_dir, tensorboard=cfg.logger.tensorboard) if dist.is_main \
        else _NoWriter(run_dir)
    writer.write_summary(summary)
    try:
        result = train(cfg, built, splits, data.num_labels, writer, device, resume_state,
                       ckpt_extra={"config": json.dumps(config)}, dist=dist, objective=objective)
        summary["steps"], summary["skipped_steps"] = result.steps, result.skipped_steps
        if result.status == "completed" and a is not None:
            a.finalize()   # raises if the final allocation never happened
        if result.status == "completed" and dist.is_main:
            if a is not None:
                from safetensors.torch import save_file
                save_file({n: s.float().contiguous().cpu() for n, s in a.triplet_scores().items()},
                          str(run_dir / "importance.safetensors"))
            save_weights(model, built, run_dir, summary)
        summary["status"] = result.status
        summary["final"] = result.final
    except BaseException as e:
        summary["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        summary["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not dist.is_main:
            write_rank_error(run_dir, dist.rank, e)
        raise
    finally:
        p1 = count_params(model, built.adapters, a)
        summary["params"]["adapter_end"] = p1["adapter_kept"]
        summary["params"]["trainable_end"] = p1["trainable"] - p1["adapter"] + p1["adapter_kept"]
        summary["final_ranks"] = a.ranks() if a is not None else {
            n: int(ad.rank) for n, ad in built.adapters.items()}
        summary["wall_time_s"] = time.time() - t0 + summary.get("wall_time_s_before_resume", 0.0)
        if device.type == "cuda":
            summary["memory"]["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
        writer.write_summary(summary)
        writer.close()
    return summary


def scale_summary(rule: Optional[str], adapters) -> Optional[Dict[str, Any]]:
    """The rule and the α/r every adapter's update is multiplied by (``scaling``: shared or mean)."""
    if rule is None or not adapters:
        return None
    per_module = {n: float(a.scaling) for n, a in adapters.items()}
    return {"rule": rule, "scaling": sum(per_module.values()) / len(per_module),
            "per_module": per_module}


def write_rank_error(run_dir: Path, rank: int, e: BaseException) -> None:
    """A non-zero rank's only file: why it failed (rank 0's error goes to summary.json)."""
    try:
        (run_dir / f"error.rank{rank}.txt").write_text(
            "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    except OSError:
        pass                      # no shared folder on this node: stderr still has it


def save_weights(model, built, run_dir: Path, summary: Dict[str, Any]) -> None:
    from safetensors.torch import save_file
    if built.adapters:
        adalora.save_adapters(str(run_dir / "adapters.safetensors"), model.backbone,
                              metadata={"task": summary["task"], "method": summary["method"]})
    head = getattr(model, HEAD)
    if not head.state_dict():       # a causal LM: no head of its own
        return
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
              str(run_dir / "head.safetensors"))


def truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            pass                      # a torn last line from a killed run
    tmp = path.with_name(f".{path.name}.truncate.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)             # a kill here leaves the old or the new file, never half
