"""``trainer.step_graph=true``: the loop's optimizer step as CUDA graphs, captured once and
replayed every step, so that the host launches two graphs instead of thousands of kernels. An
eager step of a small model is bound by the host (analysis/README.md, eager rows), and a captured
one by the GPU.

    grads graph:    the batch into static buffers; forward; backward; += γ∇R; clip
                    (γ∇R reads P and Q alone: formed on a stream of its own beside forward and backward)
                    -> (loss, R, total norm) into a device buffer; finite or not, on the device
    update graphs:  opt.step(); update_importance; mask_on_device(step)     mask steps before the final allocation
                    opt.step(); update_importance                           the other steps before it
                    opt.step(); mask_to_budget(step), the frozen mask       after it
                    opt.step()                                              without an allocator

The host reads nothing back between the replays. The grads graph also writes whether the
step's loss and norm are finite, and the update graphs skip a step that is not on the device:
fused AdamW leaves it out (``found_inf``, as under a GradScaler) and the importance EMAs keep their
values, as the eager loop's skip does. The loss, R and the norm of each step wait in a device
buffer until the loop reads them, in one host sync, where it logs, evaluates or checkpoints
(``read``); its bookkeeping (means, the run of non-finite steps, the skip count) then runs on them
step by step as in eager mode, only later. So the host runs ahead of the GPU, which waits for it
only after those reads. The final allocation (a host event) runs the loop's own ``update``
eagerly on the same tensors, after reading that step's verdict. The grads graph is captured after
``WARMUP`` uncaptured runs of its body, which initialise what capture cannot (cuBLAS workspaces,
AdamW's state, the kernels' tuning); each update graph after one uncaptured run of its own (the
mask step builds its device tables then).
The host knows which steps are mask steps, so the others skip the scoring and the mask step's
kernels; ``mask_on_device`` would leave the masks and ``lam`` untouched on them anyway.

A captured graph fixes its shapes and addresses, and reads nothing back to the host: the batches
keep their padded length (``batch_at`` does not trim them; the loop gathers them on the device
from a copy of the training split there, so no step waits on a host-to-device copy), a causal
LM's loss runs the output layer on every position instead of selecting the scored ones
(``lm.lm_loss_every_position``), the learning rates are device tensors that the scheduler fills
in place, and the gradients are the grads graph's own outputs. Captured with ``.grad`` unset,
each replay writes them afresh, so no ``zero_grad`` runs between replays. Compaction replaces the
adapters' tensors: the loop then builds a new ``StepGraph``.

``trainer.tail_graph=true`` captures only what follows backward. Forward and backward run eagerly,
on batches of any length and over any number of micro-batches; then one multi-tensor copy puts
the gradients where the graphs read them, and two replays run the rest:

    finish graph:   += γ∇R; clip -> (loss, R, total norm) and the verdict, as above
    update graphs:  as above

Eagerly, that tail is a few hundred small kernels, each a host launch (AdaLoRA's penalty, importance
and mask step among them); replayed, it is two launches. The loop unsets ``.grad`` after each step,
so the next backward hands over fresh gradients instead of adding into the copies. Under DDP the
all-reduce is part of that eager backward, so the graphs read the averaged gradients.

Where no graph can be captured (``capture=False``: the CPU tests) the same bodies run uncaptured,
every step.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Optional

import torch

import adalora
from adalora import schedule
from adalora.regularizer import pending_tensors

from .config import ConfigError, RunConfig

WARMUP = 3      # uncaptured runs of a body before it is captured, on a side stream as CUDA asks
WINDOW = 64     # steps whose values may wait on the device before the loop must read them

# Methods whose step a graph can hold: no allocator, or AdaLoRA's (mask_on_device).
METHODS = ("adalora", "lora", "svd_lora", "full", "head", "peft_lora")


def refuse(cfg: RunConfig, device: torch.device, world_size: int) -> None:
    """A one-line ConfigError naming the fix where ``trainer.step_graph=true`` (or
    ``trainer.tail_graph=true``) cannot capture what the rest of the config asks (TrainerConfig
    checks its own fields)."""
    flag = "step_graph" if cfg.trainer.step_graph else "tail_graph" if cfg.trainer.tail_graph else None
    if flag is None:
        return
    reasons = [
        (cfg.method.name not in METHODS, f"method one of {', '.join(METHODS)} (method={cfg.method.name} "
                                         "allocates on the host)"),
        (cfg.schedule.score.startswith("random"), f"a gradient or magnitude schedule.score (schedule.score="
                                                  f"{cfg.schedule.score} draws on the host)"),
        # tail_graph: DDP's all-reduce runs in the eager backward, before anything is captured.
        (world_size > 1 and flag == "step_graph", "one process (DDP's all-reduce is not captured here)"),
        (device.type != "cuda", f"a CUDA device (this run is on {device.type})"),
    ]
    for bad, fix in reasons:
        if bad:
            raise ConfigError(f"trainer.{flag}=true needs {fix}; or set trainer.{flag}=false")


def place_lrs(opt: torch.optim.Optimizer, device: torch.device) -> None:
    """Each group's learning rate as a 0-d tensor on ``device``: a captured float would stay the
    value at capture, a tensor the scheduler fills in place is read by every replay. Also after a
    checkpoint load, which restores the saved value."""
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), device=device)


@contextlib.contextmanager
def beside(stream):
    """Run the block on ``stream``, after the current stream's work so far, while a CUDA graph is
    captured (elsewhere on the current stream). Yields ``join(tensors)``: the current stream waits
    for the block, and the block's ``tensors`` are marked as read there."""
    fork = stream is not None and torch.cuda.is_current_stream_capturing()
    if not fork:
        yield lambda made: None
        return
    main = torch.cuda.current_stream()
    stream.wait_stream(main)

    def join(made):
        main.wait_stream(stream)
        for t in made:
            t.record_stream(main)
    with torch.cuda.stream(stream):
        yield join


def orthogonality_beside(stream, adapters: dict, weight: float, form: str = "reference") -> Callable:
    """γ∇R formed on ``stream`` beside what the current stream runs next (``beside``): it reads
    ``P`` and ``Q`` alone, so a captured step can start it before its forward. Returns ``add()``,
    which waits for it, adds the gradients into ``.grad`` (after backward) and returns R."""
    with beside(stream) as join:
        value, pending = adalora.orthogonality_grads(adapters, weight, form)

    def add() -> torch.Tensor:
        join(pending_tensors(pending))
        adalora.add_orthogonality_grads_(pending)
        return value
    return add


class StepGraph:
    """The graphs of one run (module docstring), their warm-up and their eager fallbacks.

    ``grads_body(batch) -> (loss, R, norm)``: the loop's forward, backward, γ∇R and clipping of one
    batch. ``eager_update(step, finite) -> record``: the loop's ``update``. ``capture=False`` runs
    the bodies uncaptured (CPU). Sets ``opt.found_inf``, which fused AdamW reads at every step.

    ``tail=(grads_of, finish)`` (``trainer.tail_graph``): ``grads`` runs ``grads_of(batch) -> loss``,
    forward and backward, eagerly, on batches of any shape, once per micro-batch; ``update`` first
    copies the gradients into the buffers the graphs read (one multi-tensor copy) and replays
    ``finish() -> (R, norm)`` (γ∇R and clipping) with the step's verdict as a graph of its own."""

    def __init__(self, grads_body: Callable, eager_update: Callable, opt: torch.optim.Optimizer, sched,
                 allocator, device: torch.device, capture: bool, tail: Optional[tuple] = None):
        self.grads_body, self.eager_update, self.tail = grads_body, eager_update, tail
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.loss: Optional[torch.Tensor] = None       # tail: the step's micro-batch losses, summed
        self.finish_graph: Optional[tuple] = None      # tail: (graph, static loss, static gradients)
        self.opt, self.sched, self.allocator, self.capture = opt, sched, allocator, capture
        # mask_on_device's step, filled from the host before each mask step's update
        self.device_step = torch.zeros((), dtype=torch.long, device=device)
        self.runs = {"grads": 0}                   # uncaptured runs of each body so far, by graph
        self.grads_graph: Optional[tuple] = None   # (graph, static batch, outputs)
        self.update_graphs: Dict[str, torch.cuda.CUDAGraph] = {}
        self.side = torch.cuda.Stream(device) if capture else None
        # The step's verdict, written by the grads graph: loss and norm finite (found_inf 1.0 where not).
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        opt.found_inf = torch.zeros((), device=device)
        # (loss, R, norm) of the steps not yet read, in order; the next one goes to row `slot`.
        self.values = torch.zeros(WINDOW, 3, dtype=torch.float64, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        self.unread: list = []                     # (step, phase) of those steps

    # -- the two calls the loop makes ----------------------------------------------------------
    def grads(self, batch: Dict[str, torch.Tensor]) -> None:
        """The gradients of ``batch`` in ``.grad``, its values and verdict on the device: a replay
        once captured. Tail: the eager forward and backward, accumulating, and the loss summed."""
        if self.tail is not None:
            loss = self.tail[0](batch)
            self.loss = loss if self.loss is None else self.loss + loss
            return
        if self.grads_graph is None and self.capture and self.runs["grads"] >= WARMUP:
            static = {k: v.clone() for k, v in batch.items()}
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._grads_body(dict(static))          # the objective pops the labels from its copy
            self.grads_graph = (graph, static)
        if self.grads_graph is None:
            self.runs["grads"] += 1
            self._uncaptured(lambda: self._grads_body(dict(batch)))
            return
        graph, static = self.grads_graph
        for k, v in batch.items():
            if v.shape != static[k].shape:
                raise RuntimeError(f"trainer.step_graph: batch '{k}' has shape {tuple(v.shape)}, the graph "
                                   f"{tuple(static[k].shape)}; every batch must keep the padded length")
            static[k].copy_(v)
        graph.replay()

    def update(self, step: int):
        """The loop's ``update`` for ``step``, after ``grads``: a replay of this phase's graph where
        one can hold it, else the loop's own calls. Returns the allocation record of a mask step,
        else None."""
        if self.tail is not None:
            self._finish()
        phase = self._phase(step)
        self.unread.append((step, phase))
        if phase is None:
            self._grads_at_static()
            record = self.eager_update(step, bool(self.finite))   # the final allocation: one sync
        else:
            if phase == "mask":
                self.device_step.fill_(step)
            graph = self.update_graphs.get(phase)
            # Captured once the gradients are the grads graph's (uncaptured ones are unset after
            # the step) and its body has run uncaptured.
            if graph is None and self._static and self.runs.get(phase, 0) >= 1:
                if phase == "final":
                    self.update_graphs.clear()      # the budgeting graphs are never replayed again
                self._grads_at_static()
                graph = self.update_graphs[phase] = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._update_body(step, phase)
            if graph is None:
                self.runs[phase] = self.runs.get(phase, 0) + 1
                self._grads_at_static()
                self._uncaptured(lambda: self._update_body(step, phase))
            else:
                graph.replay()
                if phase in ("mask", "plain") and self.allocator.scorer.uses_grad:
                    self.allocator.scorer.updates += 1   # the checkpointed count (read corrects a skip)
            self.sched.step()
            record = self.allocator.mask_record(step) if phase == "mask" else None
        if self.grads_graph is None:
            # Uncaptured (and in tail mode always), backward accumulates into .grad: unset it, as
            # the eager loop does, so the next backward hands over fresh gradients without a copy.
            self.opt.zero_grad(set_to_none=True)
        return record

    @property
    def _static(self) -> bool:
        """Whether the gradients sit where a captured update graph can read them every step."""
        return self.grads_graph is not None or self.finish_graph is not None

    @property
    def full(self) -> bool:
        """Whether the buffer holds ``WINDOW`` unread steps: the loop must ``read`` before the next."""
        return len(self.unread) >= WINDOW

    def read(self) -> list:
        """``[(step, [loss, R, norm]), ...]`` of the steps since the last read, in order: one host
        sync. A skipped scoring step counted as an update is counted as a skip, as ``update_importance``
        counts it eagerly."""
        values = self.values[:len(self.unread)].tolist()
        self.slot.zero_()
        scorer = self.allocator.scorer if self.allocator is not None else None
        for (step, phase), (loss, _, norm) in zip(self.unread, values):
            skipped = not (math.isfinite(loss) and math.isfinite(norm))
            if skipped and phase in ("mask", "plain") and scorer.uses_grad:
                scorer.updates, scorer.skipped = scorer.updates - 1, scorer.skipped + 1
        out = [(step, v) for (step, _), v in zip(self.unread, values)]
        self.unread = []
        return out

    # -- internals ----------------------------------------------------------------------------
    def _grads_body(self, batch: Dict[str, torch.Tensor]) -> None:
        self._verdict(*self.grads_body(batch))

    def _finish(self) -> None:
        """Tail: γ∇R, clipping and the verdict on the gradients eager backward left in ``.grad``;
        a replay on copies of them once captured (after ``WARMUP`` uncaptured runs)."""
        loss, self.loss = self.loss, None
        capturing = self.finish_graph is None and self.capture and self.runs["grads"] >= WARMUP
        if self.finish_graph is None and not capturing:
            self.runs["grads"] += 1
            self._uncaptured(lambda: self._verdict(loss, *self.tail[1]()))
            return
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise RuntimeError("trainer.tail_graph: a trainable parameter got no gradient, and the captured "
                               "update reads one for each; set trainer.tail_graph=false")
        if capturing:
            static_loss, static = loss.clone(), [g.clone() for g in grads]
            for p, g in zip(self.params, static):
                p.grad = g
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._verdict(static_loss, *self.tail[1]())
            self.finish_graph = (graph, static_loss, static)
        graph, static_loss, static = self.finish_graph
        torch._foreach_copy_(static, grads)
        static_loss.copy_(loss)
        graph.replay()

    def _grads_at_static(self) -> None:
        """Tail, once captured: point ``.grad`` at the gradients the finish graph wrote, for
        whatever runs uncaptured or is captured after it (``update``'s eager paths)."""
        if self.finish_graph is not None:
            for p, g in zip(self.params, self.finish_graph[2]):
                p.grad = g

    def _verdict(self, loss: torch.Tensor, orth: torch.Tensor, norm: torch.Tensor) -> None:
        """The step's values into the buffer, and whether it is finite into ``finite`` and AdamW's
        ``found_inf``."""
        finite = torch.isfinite(loss) & torch.isfinite(norm)
        self.finite.copy_(finite)
        self.opt.found_inf.copy_(~finite)
        row = torch.stack([v.double() for v in (loss, orth, norm)]).view(1, 3)
        self.values.index_copy_(0, self.slot.view(1), row)
        self.slot.add_(1)

    def _phase(self, step: int) -> Optional[str]:
        """Which update graph holds ``step``: none, mask, plain, final; None for the final allocation."""
        a = self.allocator
        if a is None:
            return "none"
        if a.final_done:
            return "final"
        if step >= a.schedule.final_step:
            return None
        return "mask" if schedule.is_mask_step(step, a.schedule) else "plain"

    def _update_body(self, step: int, phase: str) -> None:
        """``loop.update``'s calls with the allocator's device form (step from ``device_step``),
        skipped on the device where the gradient is not finite: AdamW by ``found_inf``, the EMAs
        put back."""
        a = self.allocator
        scoring = phase in ("mask", "plain")
        emas = [(t, t.clone()) for t in (a.scorer.ibar, a.scorer.ubar) if t is not None] if scoring else []
        if scoring and a.score_before_step:
            a.update_importance(step, grads_finite=True)
        self.opt.step()
        if scoring and not a.score_before_step:
            a.update_importance(step, grads_finite=True)
        if scoring and not emas and a.scorer.ibar is not None:
            # made by this first update: the skip's state is zeros (scoring alike as no EMAs)
            emas = [(t, torch.zeros_like(t)) for t in (a.scorer.ibar, a.scorer.ubar) if t is not None]
        for t, before in emas:
            t.copy_(torch.where(self.finite, t, before))
        if phase == "mask":
            a.mask_on_device(self.device_step)
        elif phase == "final":
            a.mask_to_budget(step)

    def _uncaptured(self, fn):
        if self.side is None:
            return fn()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            out = fn()
        torch.cuda.current_stream().wait_stream(self.side)
        return out

