"""``adalora.hf`` with a real ``transformers.Trainer`` on a tiny random BERT, and the import boundary.

Checks: with gradient accumulation the allocator runs once per optimizer step (never per
micro-batch) with ``step`` = optimizer steps done; the records follow the schedule; the final
ranks sum to the target budget and pruned ``lam`` are zero; a ``total_steps`` that disagrees
with the Trainer raises before training; the orthogonality term is in the training loss only
(evaluation reports the plain task loss); ``import adalora`` pulls in none of transformers,
hydra, matplotlib.
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import adalora

transformers = pytest.importorskip("transformers", reason="adalora.hf needs transformers (extra 'hf')")
import adalora.hf  # noqa: E402  (after the importorskip on purpose)

VOCAB, SEQ, N_TRAIN, N_EVAL = 50, 8, 32, 8
BATCH, ACCUM, EPOCHS = 4, 2, 5
STEPS = N_TRAIN // (BATCH * ACCUM) * EPOCHS            # 20 optimizer steps, 40 micro-batches
T_INIT, T_FINAL, DELTA_T = 3, 6, 2
INIT_R, TARGET_R, ORTH = 4, 2, 0.1


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": self.labels[i]}


def _model_and_adapters():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).float()
    adapters = adalora.inject(model, adalora.AdapterConfig(method="adalora", targets=["query", "value"],
                                                           init_rank=INIT_R, alpha=8.0))
    adalora.mark_only_adapters_trainable(model, extra=("classifier",))
    return model, adapters


def _schedule(total_steps: int = STEPS) -> adalora.ScheduleConfig:
    return adalora.ScheduleConfig(target_rank=TARGET_R, total_steps=total_steps, init_warmup=T_INIT,
                                  final_warmup=T_FINAL, mask_interval=DELTA_T)


def _trainer(tmp_path, model, adapters, allocator, **cb_kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, per_device_eval_batch_size=N_EVAL,
        gradient_accumulation_steps=ACCUM, num_train_epochs=EPOCHS, learning_rate=2e-2, weight_decay=0.0,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    callback = adalora.hf.AdaLoRACallback(allocator, **cb_kwargs)
    trainer = adalora.hf.AdaLoRATrainer(model=model, args=args, train_dataset=_Data(N_TRAIN, 1),
                                        eval_dataset=_Data(N_EVAL, 2), adapters=adapters, orth_weight=ORTH,
                                        callbacks=[callback])
    return trainer, callback


def test_trainer_allocates_once_per_optimizer_step(tmp_path):
    model, adapters = _model_and_adapters()
    allocator = adalora.RankAllocator(adapters, _schedule())
    trainer, callback = _trainer(tmp_path, model, adapters, allocator)

    calls, micro_batches = [], []
    update = allocator.update_importance

    def recording_update(step, *a, **k):
        # Called after the optimizer step, before zero_grad: every scored gradient is still there.
        assert all(p.grad is not None for layer in allocator.layers for p in (layer.P, layer.lam, layer.Q))
        calls.append(step)
        return update(step, *a, **k)

    allocator.update_importance = recording_update
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **k):
        if model.training:
            micro_batches.append(inputs["input_ids"].shape[0])
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = counting_compute_loss
    trainer.train()

    assert trainer.state.global_step == STEPS
    assert micro_batches == [BATCH] * (STEPS * ACCUM)                # 40 micro-batches ...
    assert calls == list(range(STEPS))                              # ... 20 allocator calls, 0-based steps
    assert allocator.scorer.updates == STEPS - T_FINAL              # scores frozen from T - t_f on

    final_step = STEPS - T_FINAL
    mask_steps = [t for t in range(T_INIT + 1, final_step) if t % DELTA_T == 0] + [final_step]
    steps = [r.step for r in callback.records]
    assert steps == [0] + mask_steps + [STEPS]                      # initial, mask steps, finalize()
    budgets = [r.budget for r in callback.records]
    assert budgets[0] == allocator.initial_budget == INIT_R * 4
    assert budgets[1:-1] == [adalora.schedule.budget_at(t, allocator.schedule, allocator.initial_budget,
                                                        allocator.target_budget) for t in mask_steps]
    assert budgets[-1] == budgets[-2] == allocator.target_budget == TARGET_R * 4

    ranks = allocator.ranks()
    assert sum(ranks.values()) == allocator.target_budget
    assert ranks == callback.records[-1].ranks
    for layer in allocator.layers:
        lam = layer.lam.detach()
        assert torch.count_nonzero(lam[~layer.rank_mask]) == 0      # pruned triplets stay off
        assert torch.count_nonzero(lam[layer.rank_mask]) == int(layer.rank_mask.sum())


def test_mismatched_total_steps_raises_at_train_start(tmp_path):
    model, adapters = _model_and_adapters()
    allocator = adalora.RankAllocator(adapters, _schedule(total_steps=STEPS * ACCUM))   # counted micro-batches
    trainer, _ = _trainer(tmp_path, model, adapters, allocator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=f"total_steps={STEPS}"):
        trainer.train()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing trained


def test_never_reaching_final_allocation_raises(tmp_path):
    # With the check off and too many total_steps, the final allocation never happens: an error, not a no-op.
    model, adapters = _model_and_adapters()
    allocator = adalora.RankAllocator(adapters, _schedule(total_steps=10 * STEPS))
    trainer, _ = _trainer(tmp_path, model, adapters, allocator, check_total_steps=False)
    with pytest.raises(RuntimeError, match="final allocation"):
        trainer.train()


def test_orth_term_in_training_loss_only(tmp_path):
    model, adapters = _model_and_adapters()
    allocator = adalora.RankAllocator(adapters, _schedule())
    trainer, _ = _trainer(tmp_path, model, adapters, allocator)
    batch = trainer.data_collator([_Data(N_EVAL, 2)[i] for i in range(N_EVAL)])

    orth = float(adalora.orthogonality_penalty(adapters).detach())
    assert ORTH * orth > 1e-2                                       # large enough to see
    model.train()
    with torch.no_grad():
        task = F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch["labels"])
        train_loss = trainer.compute_loss(model, batch)
    assert abs(float(train_loss) - (float(task) + ORTH * orth)) < 1e-6

    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        task_eval = F.cross_entropy(model(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"]).logits, batch["labels"])
    assert abs(metrics["eval_loss"] - float(task_eval)) < 1e-6
    assert abs(metrics["eval_loss"] - (float(task_eval) + ORTH * orth)) > 1e-2


@pytest.mark.long
def test_import_adalora_pulls_in_no_optional_dependency():
    code = ("import sys, adalora, adalora.hf\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'hydra', 'matplotlib', "
            "'omegaconf', 'peft'))\n"
            "print(bad)\n"
            "assert not bad, bad\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # ... and the Trainer classes still come on first access.
    code2 = "import adalora.hf, sys; adalora.hf.AdaLoRACallback; assert 'transformers' in sys.modules"
    out = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
