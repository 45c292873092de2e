"""``transformers.Trainer`` integration (transformers is imported lazily, only here).

Usage::

    adapters = adalora.inject(model, cfg); adalora.mark_only_adapters_trainable(model, extra=("classifier",))
    allocator = adalora.RankAllocator(adapters, ScheduleConfig(total_steps=trainer_max_steps, ...))
    Trainer = adalora.hf.AdaLoRATrainer              # Trainer whose training loss adds γ·R (explicitly)
    trainer = Trainer(model=model, args=args, train_dataset=ds, adapters=adapters, orth_weight=0.1,
                      callbacks=[adalora.hf.AdaLoRACallback(allocator)])
    trainer.train()                                  # raises if the final allocation never happened

The callback runs on ``on_optimizer_step``: after ``optimizer.step()`` and before ``zero_grad()``,
once per optimizer step (never per micro-batch), with ``state.global_step`` = optimizer steps done.
"""
from __future__ import annotations

import functools

from .allocator import AllocationRecord, Allocator
from .regularizer import orthogonality_penalty


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("adalora.hf needs transformers: pip install 'adalora[hf]'") from e
    return TrainerCallback


def _make_callback_class():
    base = _callback_base()

    class AdaLoRACallback(base):
        """Calls the allocator (any ``adalora.Allocator``) once per optimizer step; ``records``
        collects every ``AllocationRecord``. The optimizer the Trainer passes at train start is
        bound to the allocator (``bind_optimizer``)."""

        def __init__(self, allocator: Allocator, check_total_steps: bool = True):
            self.allocator = allocator
            self.check_total_steps = check_total_steps
            self.records: list[AllocationRecord] = []

        def on_train_begin(self, args, state, control, **kwargs):
            total = self.allocator.schedule.total_steps
            if self.check_total_steps and state.max_steps != total:
                raise ValueError(f"Trainer will run {state.max_steps} optimizer steps but ScheduleConfig.total_steps="
                                 f"{total}: set total_steps={state.max_steps} (optimizer steps, after gradient "
                                 "accumulation and world size) or the final allocation never happens")
            if self.allocator.needs_data and not self.allocator.final_done:
                raise ValueError(f"{type(self.allocator).__name__} allocates from data before training: call "
                                 "allocator.init_from_data(forward, batches) before trainer.train()")
            if kwargs.get("optimizer") is not None:
                self.allocator.bind_optimizer(kwargs["optimizer"])    # growing/truncating methods swap into it
            if not self.records:
                self.records.append(self.allocator.initial_record())

        def on_optimizer_step(self, args, state, control, **kwargs):
            step = state.global_step        # optimizer steps completed before this one
            self.allocator.update_importance(step)
            record = self.allocator.mask_to_budget(step)
            if record is not None:
                self.records.append(record)

        def on_train_end(self, args, state, control, **kwargs):
            self.records.append(self.allocator.finalize())   # raises if nothing was ever allocated

    return AdaLoRACallback


def _make_trainer_class():
    try:
        from transformers import Trainer
    except ImportError as e:  # pragma: no cover
        raise ImportError("adalora.hf needs transformers: pip install 'adalora[hf]'") from e

    class AdaLoRATrainer(Trainer):
        """``Trainer`` whose *training* loss is ``task_loss + orth_weight · R`` (``R`` from ``orthogonality_penalty``).

        The term is added in ``compute_loss`` (so the Trainer divides it by the accumulation steps
        like the task loss) and only while ``model.training``: evaluation losses stay task losses.
        ``last_orth`` holds the latest unweighted ``R`` for logging.
        """

        def __init__(self, *args, adapters: dict, orth_weight: float = 0.1, orth_form: str = "reference", **kwargs):
            super().__init__(*args, **kwargs)
            if orth_weight < 0:
                raise ValueError(f"orth_weight={orth_weight}: use a value >= 0")
            self.adapters, self.orth_weight, self.orth_form = adapters, orth_weight, orth_form
            self.last_orth = 0.0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            if model.training and self.orth_weight > 0:
                orth = orthogonality_penalty(self.adapters, self.orth_form).to(loss.device)
                self.last_orth = float(orth.detach())
                loss = loss + self.orth_weight * orth
            return (loss, outputs) if return_outputs else loss

    return AdaLoRATrainer


@functools.cache
def _lazy(name: str):
    return {"AdaLoRACallback": _make_callback_class, "AdaLoRATrainer": _make_trainer_class}[name]()


def __getattr__(name):
    """``AdaLoRACallback`` and ``AdaLoRATrainer`` are built on first access, importing transformers then."""
    if name in ("AdaLoRACallback", "AdaLoRATrainer"):
        return _lazy(name)
    raise AttributeError(f"module 'adalora.hf' has no attribute {name!r}")
