"""What the loop trains and scores, by ``task.objective``: one small object with ``loss`` (one
micro-batch, inside autocast) and ``evaluate`` (a split's batches, under no_grad, eval mode).

``Classify`` is the encoder classifier's: cross-entropy of the pooled head's logits. The causal
LM objectives are in ``lm.py``. ``for_task`` picks one.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
import torch.nn.functional as F

from .metrics import classification_metrics


class Classify:
    """Cross-entropy on the label; accuracy, macro-F1, MCC and the mean loss per example."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels

    def loss(self, fwd, b: Dict[str, torch.Tensor]) -> torch.Tensor:
        labels = b.pop("labels")
        return F.cross_entropy(fwd(**b).float(), labels)

    def evaluate(self, model, batches: Iterable[Dict[str, torch.Tensor]],
                 autocast: Callable) -> Dict[str, float]:
        preds, truth, loss_sum = [], [], 0.0
        for b in batches:
            labels = b.pop("labels")
            with autocast():
                logits = model(**b).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            preds.append(logits.argmax(-1).cpu())
            truth.append(labels.cpu())
        y = torch.cat(truth)
        m = classification_metrics(y.numpy(), torch.cat(preds).numpy(), self.num_labels)
        m["loss"] = loss_sum / y.shape[0]
        return m


def for_task(task_cfg, num_labels: int, tokenizer=None, label_words=None, capturable: bool = False):
    """The objective of ``task.objective``: Classify, or a causal LM objective (lm.py).
    ``capturable``: a training loss with no host sync (trainer.step_graph)."""
    if task_cfg.objective == "classify":
        return Classify(num_labels)
    from .lm import CausalLMObjective
    return CausalLMObjective(tokenizer, task_cfg.objective, label_words, every_position=capturable)
