"""Parity with Hugging Face peft (the trusted reference), step for step, in float64.

AdaLoRA: the same random BERT gets peft's ``AdaLoraConfig`` on one copy and ``adalora.inject`` +
``RankAllocator`` on the other; peft's initial weights are copied into ours (``lora_A -> Q``,
``lora_E -> lam``, ``lora_B -> P``), both are trained for ``total_step`` optimizer steps in the
reference order and the losses, the weights and the masks must agree at every step.

peft divides by ``ranknum + 1e-5`` where we divide by ``r0``; the test gives our layers
``scaling = alpha / (r0 + 1e-5)`` so that both compute the same function. peft adds the
orthogonality term inside ``forward`` when labels are passed; ours is added by the test.

LoRA: peft ``LoraConfig`` against ``AdapterConfig(method="lora")``: logits after copying a
non-zero ``B``, then a few training steps.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import adalora

transformers = pytest.importorskip("transformers", reason="peft parity needs transformers (extra 'dev')")
peft = pytest.importorskip("peft", reason="peft parity needs peft (extra 'dev')")

DT = torch.float64
TARGETS = ["query", "value", "intermediate.dense"]
INIT_R, TARGET_R, ALPHA = 6, 3, 12.0
TINIT, TFINAL, DELTA_T, TOTAL = 5, 10, 2, 45
ORTH = 0.1
BATCH, SEQ, VOCAB = 8, 12, 100


def _bert() -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).to(DT)


def _batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[: BATCH // 2, SEQ - 3:] = 0                    # some padding, so the attention mask matters
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, 3, (BATCH,), generator=g)})
    return out


def _peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def _trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _adalora_pair():
    base = _bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=INIT_R, target_r=TARGET_R, tinit=TINIT, tfinal=TFINAL, deltaT=DELTA_T, total_step=TOTAL,
        beta1=0.85, beta2=0.85, orth_reg_weight=ORTH, lora_alpha=ALPHA, lora_dropout=0.0,
        target_modules=TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS")).to(DT)
    # task_type matters: without it get_peft_model returns a plain PeftModel whose forward calls the
    # transformers model directly and silently skips AdaLoraModel.forward, i.e. the orth term.
    # peft quirk: on a float64 base its dtype move re-creates ``ranknum`` with requires_grad=True
    # (a float32 base keeps it frozen). It is a constant (= init_r) in peft's design: freeze it again.
    for n, p in theirs.named_parameters():
        if ".ranknum." in n:
            p.requires_grad_(False)

    ours = copy.deepcopy(base)
    adapters = adalora.inject(ours, adalora.AdapterConfig(method="adalora", targets=TARGETS, init_rank=INIT_R,
                                                          alpha=ALPHA))
    adalora.mark_only_adapters_trainable(ours, extra=("classifier",))
    with torch.no_grad():
        for name, layer in adapters.items():
            ref = _peft_layer(theirs, name)
            layer.Q.copy_(ref.lora_A["default"])                 # (r, d_in)
            layer.lam.copy_(ref.lora_E["default"].flatten())     # (r, 1) -> (r,)
            layer.P.copy_(ref.lora_B["default"])                 # (d_out, r)
            # peft: h * alpha / (ranknum + 1e-5); ours: scaling * h.
            layer.scaling = ALPHA / (INIT_R + 1e-5)
        cls = theirs.base_model.model.classifier.modules_to_save["default"]
        assert torch.equal(cls.weight, ours.classifier.weight) and torch.equal(cls.bias, ours.classifier.bias)
    return theirs, ours, adapters


def test_adalora_setup_matches_peft():
    theirs, ours, adapters = _adalora_pair()
    assert list(adapters) == [f"bert.encoder.layer.{i}.{m}" for i in range(2)
                              for m in ("attention.self.query", "attention.self.value", "intermediate.dense")]
    for name, layer in adapters.items():
        ref = _peft_layer(theirs, name)
        assert ref.lora_A["default"].dtype == DT and layer.P.dtype == DT
        assert float(ref.ranknum["default"].detach()) == INIT_R and torch.count_nonzero(ref.lora_E["default"]) == 0
    # Same trainable set: the three adapter tensors per module and the classifier head.
    n_theirs = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert n_theirs == adalora.count_parameters(ours)
    assert {n.rsplit(".", 1)[-1] for n in _trainable_names(ours)} == {"P", "lam", "Q", "weight", "bias"}
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=TARGET_R, total_steps=TOTAL, init_warmup=TINIT, final_warmup=TFINAL, mask_interval=DELTA_T))
    ra = theirs.base_model.rankallocator
    assert (alloc.initial_budget, alloc.target_budget) == (ra.init_bgt, ra.target_bgt) == (36, 18)
    for step in range(TOTAL):
        b, _ = ra.budget_schedule(step)
        assert adalora.schedule.budget_at(step, alloc.schedule, 36, 18) == b, step


def _paired_params(theirs, ours, adapters):
    """Trainable parameters of both models in corresponding order."""
    p_theirs, p_ours = [], []
    for name, layer in adapters.items():
        ref = _peft_layer(theirs, name)
        p_theirs += [ref.lora_B["default"], ref.lora_E["default"], ref.lora_A["default"]]
        p_ours += [layer.P, layer.lam, layer.Q]
    cls = theirs.base_model.model.classifier.modules_to_save["default"]
    p_theirs += [cls.weight, cls.bias]
    p_ours += [ours.classifier.weight, ours.classifier.bias]
    assert all(a.requires_grad for a in p_theirs + p_ours)
    assert len({id(p) for p in p_theirs}) == len([p for p in theirs.parameters() if p.requires_grad])
    assert len({id(p) for p in p_ours}) == len([p for p in ours.parameters() if p.requires_grad])
    return p_theirs, p_ours


def test_adalora_training_matches_peft_step_for_step():
    theirs, ours, adapters = _adalora_pair()
    alloc = adalora.RankAllocator(
        adapters,
        adalora.ScheduleConfig(target_rank=TARGET_R, total_steps=TOTAL, init_warmup=TINIT, final_warmup=TFINAL,
                               mask_interval=DELTA_T),
        adalora.ScoreConfig(beta1=0.85, beta2=0.85))
    p_theirs, p_ours = _paired_params(theirs, ours, adapters)
    opt_theirs = torch.optim.AdamW(p_theirs, lr=2e-2, weight_decay=0.01)
    opt_ours = torch.optim.AdamW(p_ours, lr=2e-2, weight_decay=0.01)
    theirs.train(), ours.train()
    ra = theirs.base_model.rankallocator

    worst_loss, worst_param, n_mask_steps, budgets = 0.0, 0.0, 0, []
    for step, batch in enumerate(_batches(TOTAL)):
        out_t = theirs(**batch)                          # peft: task + ORTH * R, added inside forward
        task_t = F.cross_entropy(out_t.logits, batch["labels"])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits_o = ours(**inputs).logits
        task_o = F.cross_entropy(logits_o, batch["labels"])
        orth_o = adalora.orthogonality_penalty(adapters)
        loss_o = task_o + ORTH * orth_o

        assert abs(out_t.loss.item() - loss_o.item()) <= 1e-9, step
        assert abs(task_t.item() - task_o.item()) <= 1e-9, step
        worst_loss = max(worst_loss, abs(out_t.loss.item() - loss_o.item()))
        if step > 0:
            assert out_t.loss.item() - task_t.item() > 1e-6   # the orth term really is in peft's loss

        out_t.loss.backward()
        loss_o.backward()
        opt_theirs.step()
        opt_ours.step()
        theirs.base_model.update_and_allocate(step)
        alloc.update_importance(step)
        record = alloc.mask_to_budget(step)
        opt_theirs.zero_grad(set_to_none=True)
        opt_ours.zero_grad(set_to_none=True)

        # Masks: peft's last rank_pattern (booleans, True = kept) against our rank_mask, every step.
        pattern = theirs.peft_config["default"].rank_pattern
        if pattern is None:
            assert step <= TINIT and record is None
            assert all(bool(layer.rank_mask.all()) for layer in adapters.values())
        else:
            for name, layer in adapters.items():
                kept = pattern[f"{name}.lora_E.default"]
                assert layer.rank_mask.tolist() == kept, (step, name)
        if record is not None:
            n_mask_steps += 1
            budgets.append(record.budget)
            assert record.budget == ra.budget_schedule(step)[0] == sum(record.ranks.values())
        # Zeroed singular values (and everything else) agree, every step.
        for a, b in zip(p_theirs, p_ours):
            assert torch.equal(a.detach().reshape(b.shape) == 0, b.detach() == 0), step
            worst_param = max(worst_param, (a.detach().reshape(b.shape) - b.detach()).abs().max().item())
        assert worst_param <= 1e-9, step

    final_step = TOTAL - TFINAL
    expected_mask_steps = len([t for t in range(TINIT + 1, final_step) if t % DELTA_T == 0]) + 1
    assert n_mask_steps == expected_mask_steps
    assert budgets[-1] == 18 and budgets == sorted(budgets, reverse=True) and budgets[0] < 36
    assert sum(alloc.ranks().values()) == 18
    alloc.finalize()
    # The pruning did something non-trivial: ranks differ between modules.
    assert len(set(alloc.ranks().values())) > 1
    print(f"adalora parity: worst |loss diff| = {worst_loss:.2e}, worst |param diff| = {worst_param:.2e}")


# ---------------------------------------------------------------------------------------------- LoRA
LORA_R, LORA_ALPHA = 4, 8.0


def _lora_pair():
    base = _bert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
        modules_to_save=["classifier"], task_type="SEQ_CLS")).to(DT)
    ours = copy.deepcopy(base)
    adapters = adalora.inject(ours, adalora.AdapterConfig(method="lora", targets=TARGETS, init_rank=LORA_R,
                                                          alpha=LORA_ALPHA))
    adalora.mark_only_adapters_trainable(ours, extra=("classifier",))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, layer in adapters.items():
            ref = _peft_layer(theirs, name)
            assert ref.scaling["default"] == layer.scaling == LORA_ALPHA / LORA_R
            ref.lora_B["default"].weight.copy_(torch.randn(ref.lora_B["default"].weight.shape, generator=g,
                                                           dtype=DT) * 0.1)   # make ΔW non-zero
            layer.A.copy_(ref.lora_A["default"].weight)          # (r, d_in)
            layer.B.copy_(ref.lora_B["default"].weight)          # (d_out, r)
    return theirs, ours, adapters


def test_lora_logits_match_peft():
    theirs, ours, adapters = _lora_pair()
    theirs.eval(), ours.eval()
    batch = _batches(1)[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        lt, lo = theirs(**inputs).logits, ours(**inputs).logits
        with theirs.disable_adapter():
            plain = theirs(**inputs).logits
    assert (lt - plain).abs().max() > 1e-3                       # the adapters change the output
    # Not bit-identical: our forward adds s·(x Aᵀ)Bᵀ into y inside one addmm, peft adds it after the
    # product, so the last bits differ. Measured (float64, CPU): the largest difference is 0.55
    # ulp of the largest logit on this batch, under 4 ulp on 10 batches; asserted within 8.
    eps = torch.finfo(DT).eps
    assert (lt - lo).abs().max() <= 8 * eps * lt.abs().max(), (lt - lo).abs().max() / (eps * lt.abs().max())
    for name, layer in adapters.items():                         # the updates themselves are bitwise equal
        ref = _peft_layer(theirs, name)
        assert torch.equal(ref.get_delta_weight("default"), layer.delta_weight()), name


def test_lora_training_matches_peft():
    theirs, ours, adapters = _lora_pair()
    p_theirs, p_ours = [], []
    for name, layer in adapters.items():
        ref = _peft_layer(theirs, name)
        p_theirs += [ref.lora_A["default"].weight, ref.lora_B["default"].weight]
        p_ours += [layer.A, layer.B]
    cls = theirs.base_model.model.classifier.modules_to_save["default"]
    p_theirs += [cls.weight, cls.bias]
    p_ours += [ours.classifier.weight, ours.classifier.bias]
    assert len(p_theirs) == len([p for p in theirs.parameters() if p.requires_grad])
    assert len(p_ours) == len([p for p in ours.parameters() if p.requires_grad])
    opt_t = torch.optim.AdamW(p_theirs, lr=1e-2)
    opt_o = torch.optim.AdamW(p_ours, lr=1e-2)
    theirs.train(), ours.train()
    losses = []
    for step, batch in enumerate(_batches(8)):
        lt, lo = theirs(**batch).loss, ours(**batch).loss
        assert abs(lt.item() - lo.item()) <= 1e-12, step
        losses.append(lo.item())
        lt.backward(), lo.backward()
        opt_t.step(), opt_o.step()
        opt_t.zero_grad(), opt_o.zero_grad()
    for a, b in zip(p_theirs, p_ours):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    assert losses[-1] != losses[0]


# ------------------------------------------------------------------ allocation alone, on set scores
def _set_scores(theirs, alloc, adapters, gen):
    """Random EMAs ``Ī, Ū`` written into both allocators (peft keys them by parameter name)."""
    ra = theirs.base_model.rankallocator
    ibar, ubar = [], []
    for name, layer in adapters.items():
        prefix = name
        for ours_t, key in ((layer.P, "lora_B"), (layer.lam, "lora_E"), (layer.Q, "lora_A")):
            i, u = torch.rand(ours_t.shape, generator=gen, dtype=DT), torch.rand(ours_t.shape, generator=gen, dtype=DT)
            ibar.append(i)
            ubar.append(u)
            shape = (-1, 1) if key == "lora_E" else i.shape
            ra.exp_avg_ipt[f"{prefix}.{key}.default"] = i.clone().reshape(shape)
            ra.exp_avg_unc[f"{prefix}.{key}.default"] = u.clone().reshape(shape)
    alloc.scorer.load_state_dict({"ibar": ibar, "ubar": ubar, "updates": 0, "skipped": 0})


def _peft_mask(theirs, adapters, budget):
    pattern = theirs.base_model.rankallocator.mask_to_budget(theirs.base_model.model, budget)
    return {name: pattern[f"{name}.lora_E.default"] for name in adapters}


def test_allocation_matches_peft_on_random_scores():
    theirs, ours, adapters = _adalora_pair()
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=TARGET_R, total_steps=TOTAL, init_warmup=TINIT, final_warmup=TFINAL, mask_interval=DELTA_T))
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        _set_scores(theirs, alloc, adapters, gen)
        budget = int(torch.randint(1, 36, (1,), generator=gen))
        record = alloc._allocate(TINIT + 1, budget)
        assert {n: layer.rank_mask.tolist() for n, layer in adapters.items()} == _peft_mask(theirs, adapters, budget)
        assert record.budget == budget


def test_near_tied_float64_scores_are_ranked_like_peft():
    """Two triplet scores 1e-12 apart (distinct in float64, equal in float32) must be ordered by value."""
    theirs, ours, adapters = _adalora_pair()
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=TARGET_R, total_steps=TOTAL, init_warmup=TINIT, final_warmup=TFINAL, mask_interval=DELTA_T))
    _set_scores(theirs, alloc, adapters, torch.Generator().manual_seed(4))
    names = list(adapters)
    # Make every triplet score a distinct power of two except two that differ only far below float32's
    # resolution: singular value 0 of the first adapter just *below* singular value 0 of the last.
    ra = theirs.base_model.rankallocator
    state = alloc.scorer.state_dict()                   # per parameter, layer order (P, lam, Q)
    for k, name in enumerate(names):
        prefix = name
        for key in ("lora_A", "lora_B"):
            ra.exp_avg_ipt[f"{prefix}.{key}.default"].zero_()
        state["ibar"][3 * k].zero_(), state["ibar"][3 * k + 2].zero_()
        e = 2.0 ** torch.arange(INIT_R, dtype=DT) * 4.0 ** k      # distinct, well separated
        if k == 0:
            e[0] = 1.0 - 1e-12
        if k == len(names) - 1:
            e[0] = 1.0
        ra.exp_avg_ipt[f"{prefix}.lora_E.default"] = e.clone().reshape(-1, 1)
        ra.exp_avg_unc[f"{prefix}.lora_E.default"] = torch.ones(INIT_R, 1, dtype=DT)
        state["ibar"][3 * k + 1] = e.clone()
        state["ubar"][3 * k + 1] = torch.ones(INIT_R, dtype=DT)
    alloc.scorer.load_state_dict(state)
    # Scores below 1 - 1e-12: none (the smallest others are 2**1 * 4**0 = 2). So keeping all but one
    # must drop the first adapter's singular value 0, whose score is the smaller of the near-tie.
    budget = 6 * INIT_R - 1
    alloc._allocate(TINIT + 1, budget)
    expected = _peft_mask(theirs, adapters, budget)
    assert expected[names[0]][0] is False and expected[names[-1]][0] is True
    assert {n: layer.rank_mask.tolist() for n, layer in adapters.items()} == expected
