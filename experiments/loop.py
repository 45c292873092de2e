"""The training loop. Read it top to bottom: it is the spec of the order of AdaLoRA's calls.

Per optimizer step (``step`` counts optimizer steps, never micro-batches):

    for each of grad_accum micro-batches:               # all but the last under DDP no_sync
        (task_loss / grad_accum).backward()              # DDP all-reduces on the last one
    scaler.unscale_(opt)                               # the scorer sees unscaled gradients
    orthogonality_grad_(adapters, orth_weight)         # += γ∇R, as γR/accum in each loss would
                                                       # (step_graph: formed beside forward and backward)
    clip_grad_norm_(...)
    update(...):                                       # below; the benchmark times the same
        [paper_order ablation: allocator.update_importance(step) here]
        opt.step(); sched.step()                       # skipped if the gradient is not finite
        allocator.update_importance(step)              # skipped too (counted)
        record = allocator.mask_to_budget(step)        # written to ranks.jsonl when not None
    [DDP: all-reduce a checksum of the masks; raise if ranks differ]
    opt.zero_grad(set_to_none=True); step += 1

``trainer.step_graph=true`` runs the same calls as two CUDA graph replays a step: forward to
clipping, then the update (experiments/step_graph.py). The graphs skip a non-finite step on the
device, and the host reads the steps' values back only where it logs, evaluates or checkpoints.
``trainer.tail_graph=true`` keeps forward and backward eager (any batch shape, grad_accum > 1) and
replays the rest, from γ∇R to the allocator, as graphs on copies of the gradients.

Data parallel (experiments/distributed.py): rank r trains on the r-th slice of each global
micro-batch; gradients are the full global batch's on every rank, so the allocator's scores
and masks are the same everywhere. Only rank 0 evaluates and writes.
"""
from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import adalora

from . import checkpoint as ckpt
from . import distributed as D
from . import step_graph as SG
from .build import Built, param_groups
from .config import RunConfig
from .objective import Classify
from .runlog import RunWriter


@dataclass
class LoopResult:
    status: str                      # completed | interrupted (failures raise)
    steps: int
    final: Dict[str, Dict[str, float]]
    skipped_steps: int = 0           # non-finite gradients: update and scoring skipped


def batch_at(data: Dict[str, torch.Tensor], idx: torch.Tensor, device, trim: bool = True) -> Dict[str, torch.Tensor]:
    """Select rows and trim padding to the longest real sequence in the batch (2-3x faster on
    short texts; results do not depend on it since padded positions are masked). ``trim=False``
    keeps the padded length: a captured step has fixed shapes. ``data`` already on a CUDA device
    (a captured run's) is gathered there: only the indices travel, from pinned memory, so the
    copy does not wait for the step before it."""
    here = next(iter(data.values())).device
    if idx.device != here:
        idx = idx.pin_memory().to(here, non_blocking=True) if here.type == "cuda" else idx.to(here)
    b = {k: v[idx] for k, v in data.items()}
    L = int(b["attention_mask"].sum(1).max()) if trim else b["attention_mask"].shape[1]
    # contiguous: a trimmed slice and an untrimmed batch then have the same strides, which a
    # compiled forward (trainer.compile) would otherwise guard on and recompile for
    return {k: (v[:, :L].contiguous() if v.dim() == 2 else v).to(device) for k, v in b.items()}


def micro_batch_indices(n: int, batch: int, position: int, seed: int) -> torch.Tensor:
    """Indices of micro-batch number ``position`` of an endless stream of per-epoch
    permutations. A pure function of (seed, position): resuming needs only the position."""
    start = position * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        out.extend(_permutation(n, seed, epoch)[offset:offset + batch - len(out)])
    return torch.tensor(out)


@functools.lru_cache(maxsize=2)     # an epoch's, and the next one's at the boundary
def _permutation(n: int, seed: int, epoch: int) -> tuple:
    # Drawn once per epoch, not per micro-batch: a captured step takes about as long as the draw.
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist())


@torch.no_grad()
def evaluate(model, data, cfg: RunConfig, device, amp_dtype, objective) -> Dict[str, float]:
    """The objective's metrics on one split (experiments/objective.py, lm.py), in eval mode,
    in batches of trainer.eval_batch_size, forwards under the training precision's autocast."""
    was_training = model.training
    model.eval()
    n, size = data["labels"].shape[0], cfg.trainer.eval_batch_size
    batches = (batch_at(data, torch.arange(i, min(i + size, n)), device) for i in range(0, n, size))
    m = objective.evaluate(model, batches, lambda: torch.autocast(
        device.type, dtype=amp_dtype, enabled=amp_dtype is not None))
    model.train(was_training)
    return m


def _compiled(net: torch.nn.Module, t) -> torch.nn.Module:
    """``trainer.compile``: the training forward through torch.compile. Masking writes lam in
    place and needs no recompilation; sequence lengths vary per batch, so Dynamo turns them
    dynamic after the second length it sees."""
    if t.compile == "none":
        return net
    mode = None if t.compile == "default" or t.compile_backend != "inductor" else t.compile
    return torch.compile(net, backend=t.compile_backend, mode=mode)


def lr_lambda(cfg: RunConfig, total: int):
    t = cfg.trainer
    warm = t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * total))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if t.lr_schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - frac) if t.lr_schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def clip_grad_norm_(params: list, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_(params, max_norm)``: the same total 2-norm, returned, and
    the same scaling of every gradient, with torch's own ops in torch's order. Where the gradients
    share one device and dtype (the usual case) the norms are stacked as they come; torch's
    version moves each norm to the first device in a Python loop, a dispatch per tensor that an
    eager step, bound by the host, pays at every step (adapters bring hundreds of tensors)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or len({(g.device, g.dtype) for g in grads}) > 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total


def update(opt, sched, scaler, allocator, step: int, finite: bool):
    """The update of one optimizer step, after backward, unscaling, γ∇R and clipping:
    ``opt.step(); sched.step(); allocator.update_importance(step); allocator.mask_to_budget(step)``.
    Importance is scored after the step, as the reference implementations do (``|w_{t+1}·g_t|``);
    the paper_order ablation scores before it (``|w_t·g_t|``). A non-finite gradient skips both
    the update and the scoring. Returns the allocation record of a mask step, else None.
    ``sched``, ``scaler`` and ``allocator`` may be None (the benchmark times this same update)."""
    if allocator is not None and allocator.score_before_step:
        allocator.update_importance(step, grads_finite=finite)
    if scaler is not None and scaler.is_enabled():
        scaler.step(opt)                    # skips the update itself on inf/nan
        scaler.update()
    elif finite:
        opt.step()
    if sched is not None:
        sched.step()
    if allocator is None:
        return None
    if not allocator.score_before_step:
        allocator.update_importance(step, grads_finite=finite)
    return allocator.mask_to_budget(step)


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints and exits at the end of the step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:          # not the main thread (some launchers): no handler
                pass

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: RunConfig, built: Built, splits: Dict[str, Dict[str, torch.Tensor]],
          num_labels: int, writer: RunWriter, device: torch.device,
          resume_state: Optional[dict] = None, ckpt_extra: Optional[dict] = None,
          dist: D.Dist = D.Dist(), objective=None) -> LoopResult:
    """``objective``: the task's loss and scores (default: the classifier's, Classify)."""
    t, model, adapters, allocator = cfg.trainer, built.model, built.adapters, built.allocator
    objective = objective or Classify(num_labels)
    total = built.total_steps
    svd = [a for a in adapters.values() if isinstance(a, adalora.SVDLinear)]
    orth_weight = cfg.method.orth_weight if svd else 0.0
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")

    step, position = 0, 0
    if resume_state is not None:
        # Order matters: the allocator may resize compacted adapters before weights load.
        if allocator is not None:
            allocator.load_state_dict(resume_state["allocator"])
        ckpt.load_trainable_state(model, resume_state["model"])
        step, position = resume_state["step"], resume_state["position"]
    model.to(device)
    if allocator is not None and allocator.needs_data and resume_state is None:
        # One-shot allocation from data (EVA), before the optimizer holds the adapters it
        # resizes: the first method.eva_batches micro-batches of the training stream, whole on
        # every rank (so every rank allocates alike), without labels, in eval mode.
        n_tr, size = splits["train"]["labels"].shape[0], t.batch_size * dist.world_size
        batches = ({k: v for k, v in batch_at(splits["train"], micro_batch_indices(n_tr, size, i, cfg.seed),
                                              device).items() if k != "labels"}
                   for i in range(cfg.method.eva_batches))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            allocator.init_from_data(lambda b: model(**b), batches)
        model.train(was_training)
    # Adapters are already injected: DDP all-reduces the very tensors the allocator scores.
    net = D.wrap(model, device, dist)
    fwd = _compiled(net, t)
    # On CUDA one fused kernel (as the benchmark times); a captured step also needs AdamW's state
    # and learning rates on the device (step_graph.py). The CPU keeps the default, multi-tensor.
    cuda = device.type == "cuda"
    graphed = t.step_graph or t.tail_graph
    opt = torch.optim.AdamW(param_groups(cfg, model), fused=cuda or graphed or None,
                            capturable=cuda and graphed)
    if graphed:
        SG.place_lrs(opt, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    if resume_state is not None:
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        if graphed:
            SG.place_lrs(opt, device)
        scaler.load_state_dict(resume_state["scaler"])
        rngs = resume_state.get("rng_ranks") or [resume_state["rng"]]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world_size else rngs[0])
    elif allocator is not None:
        writer.log_ranks(allocator.initial_record().to_dict())
    if allocator is not None:
        allocator.bind_optimizer(opt)       # ElaLoRA grows and svd_truncate cuts factors in it
    params = [p for g in opt.param_groups for p in g["params"]]

    def grads_of(b) -> torch.Tensor:
        """Forward and backward of one micro-batch; the loss, detached."""
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            task_loss = objective.loss(fwd, b)     # cross-entropy, or LM loss
        scaler.scale(task_loss / t.grad_accum).backward()
        return task_loss.detach()

    def finish_grads(add_orth=None):
        """Unscale, add γ·∇R, clip: (R, the total norm), on the device. ``add_orth``: γ∇R formed
        beside forward and backward (graphed_grads), else formed here."""
        scaler.unscale_(opt)
        # R does not depend on the batch: adding γ∇R once equals adding γR/accum to every
        # micro-batch's loss, in a few batched kernels instead of a second autograd path.
        orth = None
        if add_orth is not None:
            orth = add_orth()
        elif orth_weight > 0:
            orth = adalora.orthogonality_grad_(adapters, orth_weight, cfg.method.orth_form)
        norm = clip_grad_norm_(params, t.max_grad_norm or float("inf"))
        return (torch.zeros_like(norm) if orth is None else orth), norm

    # γ∇R reads P and Q alone: in a captured step it is formed on a stream of its own, beside
    # the forward and backward, and only its adds into .grad wait for backward.
    captured = t.step_graph and device.type == "cuda"
    orth_stream = torch.cuda.Stream(device) if captured and orth_weight > 0 else None

    def graphed_grads(b):
        add_orth = (SG.orthogonality_beside(orth_stream, adapters, orth_weight, cfg.method.orth_form)
                    if orth_weight > 0 else None)
        return (grads_of(b), *finish_grads(add_orth))

    def step_graph():
        # tail_graph: forward and backward stay eager (grads_of), the rest is captured (finish_grads)
        return SG.StepGraph(graphed_grads,
                            lambda step, finite: update(opt, sched, scaler, allocator, step, finite),
                            opt, sched, allocator, device, capture=device.type == "cuda",
                            tail=(grads_of, finish_grads) if t.tail_graph else None)
    graph = step_graph() if graphed else None

    saved_step = resume_state["step"] if resume_state is not None else None

    def save_checkpoint() -> None:
        nonlocal saved_step
        saved_step = step
        rngs = D.all_gather_object(ckpt.rng_state(), dist)      # a collective: every rank
        if dist.is_main:
            ckpt.save(writer.dir, {
                "step": step, "position": position, "model": ckpt.trainable_state(model),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
                "world_size": dist.world_size,
                "allocator": allocator.state_dict() if allocator is not None else None,
                "wall_time_s": time.time() - t0, **(ckpt_extra or {})})

    train_data, n_train = splits["train"], splits["train"]["labels"].shape[0]
    if t.step_graph:
        # Gathered on the device: a copy of each batch from pageable host memory would wait for
        # the step before it, and the GPU for the host.
        train_data = {k: v.to(device) for k, v in train_data.items()}
    per_step = t.batch_size * dist.world_size          # examples per micro-batch, all ranks
    stop = StopFlag()
    bar = None
    if t.progress and dist.is_main:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, leave=False)
    t0, acc_loss, acc_orth, acc_n, nonfinite, skipped, bad = time.time(), 0.0, 0.0, 0, 0, 0, False
    unlogged = []                      # allocation records not yet written (to_dict reads the device)

    def account(s: int, loss_values, orth_value: float, norm_value: float, loss_bad: bool):
        """Step ``s``'s bookkeeping from the values read back: running means, the run of
        non-finite steps (an error at trainer.max_nonfinite_steps) and the skip count. Returns
        (finite: the update ran, bad: the step counts towards the limit)."""
        nonlocal acc_loss, acc_orth, acc_n, nonfinite, skipped
        for v in loss_values:
            acc_loss += v / t.grad_accum
        acc_orth += orth_value
        acc_n += 1
        finite = math.isfinite(norm_value) and not loss_bad   # same on every rank: grads are all-reduced
        # Without a scaler any non-finite step counts; with one, overflows are its job and
        # only a non-finite loss (which no scale fixes) counts towards the limit.
        bad = loss_bad if scaler.is_enabled() else not finite
        nonfinite = nonfinite + 1 if bad else 0
        skipped += 0 if finite else 1
        if nonfinite >= t.max_nonfinite_steps:
            kept = f"; checkpoint.pt (step {saved_step}) is kept" if saved_step is not None else ""
            raise FloatingPointError(
                f"{nonfinite} consecutive optimizer steps with a non-finite loss or gradient "
                f"(last at step {s}; trainer.max_nonfinite_steps={t.max_nonfinite_steps}): "
                f"lower trainer.lr, check the data, or use trainer.precision=fp32{kept}")
        return finite, bad

    def drain() -> None:
        """Account for the captured steps whose values wait on the device, in order; then write
        the allocation records held back."""
        nonlocal bad
        if graph is not None:
            for s, (loss_value, orth_value, norm_value) in graph.read():
                bad = account(s, [loss_value], orth_value, norm_value, not math.isfinite(loss_value))[1]
        for record in unlogged:
            writer.log_ranks(record.to_dict())
        unlogged.clear()

    def finish() -> LoopResult:
        """The final evaluation, under the loop's signal handlers: a signal there ends the run
        as interrupted, with a checkpoint after the last step, and a resume evaluates again."""
        final = {}
        if dist.is_main:      # eval on the unwrapped model: no collectives, other ranks done
            for split in ("val", "test"):
                final[split] = evaluate(model, splits[split], cfg, device, amp_dtype, objective)
                if stop.signum is not None:
                    break
        # Every rank takes rank 0's verdict: the checkpoint is a collective.
        if D.broadcast_object(dist.is_main and len(final) < 2, dist):
            save_checkpoint()
            return LoopResult("interrupted", step, {}, skipped)
        for split, m in final.items():   # logged once both are done: a resume logs no line twice
            writer.log_metrics({"step": step, "split": split, "lr": float(sched.get_last_lr()[0]),
                                **m, "epoch": position * per_step / n_train, "time_s": time.time() - t0})
        if t.checkpoint_every:
            save_checkpoint()
        return LoopResult("completed", step, final, skipped)

    net.train()
    try:
        while step < total:
            # ---- forward/backward over grad_accum micro-batches ----
            losses = []
            for i in range(t.grad_accum):
                idx = D.shard(micro_batch_indices(n_train, per_step, position, cfg.seed), dist)
                b = batch_at(train_data, idx, device, trim=not t.step_graph)
                position += 1
                # DDP: all-reduce once per optimizer step, on the last micro-batch.
                last = i == t.grad_accum - 1
                with (net.no_sync() if dist.enabled and not last else contextlib.nullcontext()):
                    if graph is not None:   # step_graph: one micro-batch and the section below
                        graph.grads(b)
                    else:
                        losses.append(grads_of(b))
            stopping = stop.signum is not None
            if graph is not None and dist.enabled:    # tail_graph under DDP: stop on the same step
                stopping, = D.any_rank([stopping], dist)
            was_final = allocator is not None and allocator.final_done
            if graph is None:
                # ---- unscale, add γ·∇R, clip; a non-finite norm skips the update and the scoring ----
                orth, norm = finish_grads()
                # The step's one host sync: the losses, R and the norm, read together.
                values = torch.stack([v.double() for v in (*losses, orth, norm)]).tolist()
                *loss_values, orth_value, norm_value = values
                # One all-reduce for the step's per-rank facts: a stop signal, a non-finite loss.
                stopping, loss_bad = D.any_rank([stopping, not all(map(math.isfinite, loss_values))], dist)
                finite, bad = account(step, loss_values, orth_value, norm_value, loss_bad)
                record = update(opt, sched, scaler, allocator, step, finite)
            else:
                # The graphs skip a non-finite step themselves; the host reads the step's values
                # later, where the bookkeeping below needs them (step_graph.py).
                record = graph.update(step)
            if allocator is not None:
                if record is not None:
                    D.check_masks(allocator, step, dist)
                    unlogged.append(record)
                if (t.compact and allocator.final_done and not was_final) or \
                        (record is not None and allocator.reshapes):
                    drain()                               # what the old graphs hold, first
                    allocator.compact(opt)
                    params = [p for g in opt.param_groups for p in g["params"]]
                    net = D.wrap(model, device, dist)     # DDP must hold the new tensors
                    fwd = _compiled(net, t)               # and the graph the new shapes
                    graph = step_graph() if graph is not None else None
            if graph is None:                             # a captured step's grads are its own
                opt.zero_grad(set_to_none=True)
            step += 1
            # ---- bookkeeping: logs, evals, checkpoints, early stop ----
            log_now = step % cfg.logger.log_every == 0 or step == total
            eval_now = t.eval_every and step % t.eval_every == 0 and step < total and dist.is_main
            checkpoint_now = t.checkpoint_every and step % t.checkpoint_every == 0
            stopping = stopping or (t.stop_at_step is not None and total > step >= t.stop_at_step)
            if graph is None or graph.full or log_now or eval_now or checkpoint_now or stopping:
                drain()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{acc_loss / max(acc_n, 1):.3f}")
            epoch = position * per_step / n_train
            if log_now:
                acc_loss, acc_orth = D.mean([acc_loss, acc_orth], dist)   # global-batch loss
                writer.log_metrics({"step": step, "split": "train", "loss": acc_loss / acc_n,
                                    "orth": acc_orth / acc_n, "lr": float(sched.get_last_lr()[0]),
                                    "epoch": epoch, "time_s": time.time() - t0})
                acc_loss, acc_orth, acc_n = 0.0, 0.0, 0
            if eval_now:
                m = evaluate(model, splits["val"], cfg, device, amp_dtype, objective)
                writer.log_metrics({"step": step, "split": "val", "lr": float(sched.get_last_lr()[0]),
                                    **m, "epoch": epoch, "time_s": time.time() - t0})
            # A checkpoint only after a good step: the last one on disk is always a good one.
            if (checkpoint_now and not bad) or stopping:
                save_checkpoint()
            if stopping:
                return LoopResult("interrupted", step, {}, skipped)
        if bar is not None:
            bar.close()
        return finish()
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
