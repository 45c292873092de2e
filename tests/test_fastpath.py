"""The fused fast path (torch._foreach EMAs, global sort top-k, shape-batched penalty) against a
simple reference written here the way peft writes it: one Python loop per parameter, plain
tensor arithmetic, a brute-force sorted list for top-b. Everything must agree to 1e-6 in fp32.
"""
import copy

import pytest
import torch
import torch.nn as nn

import adalora

B1, B2 = 0.85, 0.85


# -- the reference -------------------------------------------------------------------------------------
class RefImportance:
    """peft's RankAllocator.update_ipt / mask_to_budget, per parameter, in fp32 state."""

    def __init__(self, layers):
        self.layers = layers
        self.ibar, self.ubar = {}, {}

    def update(self):
        with torch.no_grad():
            for k, layer in enumerate(self.layers):
                for name in ("P", "lam", "Q"):
                    p = getattr(layer, name)
                    g = p.grad if p.grad is not None else torch.zeros_like(p)   # rank 0: no grad at all
                    ipt = (p.float() * g.float()).abs()        # exact: a bf16 x bf16 product fits in fp32
                    key = (k, name)
                    if key not in self.ibar:
                        self.ibar[key] = torch.zeros_like(ipt)
                        self.ubar[key] = torch.zeros_like(ipt)
                    self.ibar[key] = B1 * self.ibar[key] + (1 - B1) * ipt
                    self.ubar[key] = B2 * self.ubar[key] + (1 - B2) * (ipt - self.ibar[key]).abs()

    def scores(self):
        out = []
        for k, layer in enumerate(self.layers):
            s = {n: self.ibar[(k, n)] * self.ubar[(k, n)] for n in ("P", "lam", "Q")}
            out.append(torch.stack([s["lam"][i] + s["P"][:, i].mean() + s["Q"][i, :].mean()
                                    for i in range(layer.rank)]) if layer.rank else torch.zeros(0))
        return out


def ref_top_b(scores, budget):
    """Keep exactly `budget` triplets: highest score first, ties to the earlier adapter, then lower index."""
    items = sorted((-float(s[i]), k, i) for k, s in enumerate(scores) for i in range(len(s)))
    keep = [torch.zeros(len(s), dtype=torch.bool) for s in scores]
    for _, k, i in items[:budget]:
        keep[k][i] = True
    return keep


def ref_penalty(layers, form):
    terms = []
    for layer in layers:
        P, Q = layer.P, layer.Q
        eye = torch.eye(layer.rank, dtype=P.dtype)
        a = torch.linalg.matrix_norm(P.T @ P - eye)      # Frobenius; 0 for an empty (0, 0) matrix
        b = torch.linalg.matrix_norm(Q @ Q.T - eye)
        terms.append(a ** 2 + b ** 2 if form == "paper" else a + b)
    total = torch.stack(terms).sum()
    return total if form == "paper" else total / (2 * len(layers))


def ref_budget(step, cfg, b0, bT):
    if step <= cfg.init_warmup:
        return b0
    if step >= cfg.total_steps - cfg.final_warmup:
        return bT
    frac = 1 - (step - cfg.init_warmup) / (cfg.total_steps - cfg.final_warmup - cfg.init_warmup)
    return int(bT + (b0 - bT) * frac ** 3)


def assert_close(actual, expected, what):
    """Max abs error within 1e-6 of the reference's largest magnitude (fp32 round-off scale)."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, what
    scale = max(float(expected.abs().max()), 1e-30) if expected.numel() else 1.0
    err = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert err <= 1e-6 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


# -- a small model with adapters of mixed shapes ------------------------------------------------------------
def make_model(dtype=torch.float32, with_rank0=True, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(),
                          nn.Linear(20, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3))
    model = model.to(dtype)
    pattern = {"4": 5}                      # a different r0 next to an adapter of the same (d_out, d_in)
    if with_rank0:
        pattern["8"] = 0
    adapters = adalora.inject(model, adalora.AdapterConfig(method="adalora", targets=["0", "2", "4", "6", "8", "10"],
                                                           init_rank=4, alpha=8.0, rank_pattern=pattern))
    adalora.mark_only_adapters_trainable(model)
    with torch.no_grad():  # away from the zero init so every part of the triplet carries importance
        for layer in adapters.values():
            layer.lam.normal_()
            layer.P.normal_(0, 0.5)
            layer.Q.normal_(0, 0.5)
    return model, adapters


def batch(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, generator=g).to(dtype), torch.randn(16, 3, generator=g).to(dtype)


def train_step(model, adapters, opt, step, orth=0.1):
    x, y = batch(step, next(model.parameters()).dtype)
    loss = (model(x) - y).pow(2).mean() + orth * adalora.orthogonality_penalty(adapters)
    loss.backward()
    opt.step()


SCHED = adalora.ScheduleConfig(target_total=9, total_steps=12, init_warmup=1, final_warmup=4, mask_interval=2)


def run_against_reference(model, adapters, steps, check_scores=True):
    layers = list(adapters.values())
    alloc = adalora.RankAllocator(adapters, SCHED)
    ref = RefImportance(layers)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks_seen = 0
    for t in range(1, steps + 1):
        train_step(model, adapters, opt, t)
        alloc.update_importance(t)
        if t < SCHED.final_step:
            ref.update()
        if check_scores:
            ours = alloc.triplet_scores() if not alloc.final_done else None
            if ours is not None:
                for k, (name, s) in enumerate(ours.items()):
                    assert_close(s, ref.scores()[k], f"triplet scores of {name} at step {t}")
                state = alloc.scorer.state_dict()        # per parameter, layer order (P, lam, Q)
                for k, layer in enumerate(layers):
                    for j, part in enumerate(("P", "lam", "Q")):
                        assert state["ibar"][3 * k + j].dtype == torch.float32
                        assert_close(state["ibar"][3 * k + j], ref.ibar[(k, part)], f"Ibar {part} {k} step {t}")
                        assert_close(state["ubar"][3 * k + j], ref.ubar[(k, part)], f"Ubar {part} {k} step {t}")
        ref_scores = ref.scores()
        rec = alloc.mask_to_budget(t)
        if rec is not None:
            masks_seen += 1
            b = ref_budget(t, SCHED, alloc.initial_budget, alloc.target_budget)
            assert rec.budget == b
            for layer, m in zip(layers, ref_top_b(ref_scores, b)):
                assert torch.equal(layer.rank_mask.cpu(), m), f"mask at step {t}"
                assert torch.all(layer.lam[~m] == 0)
            assert sum(rec.ranks.values()) == b
        opt.zero_grad(set_to_none=True)
    return alloc, opt, masks_seen


# -- tests ------------------------------------------------------------------------------------------------
def test_fused_importance_and_masks_match_reference_fp32():
    model, adapters = make_model(with_rank0=False)
    alloc, _, masks = run_against_reference(model, adapters, steps=SCHED.total_steps)
    assert masks >= 4 and alloc.final_done
    assert sum(alloc.ranks().values()) == SCHED.target_total


def test_fused_path_with_rank0_adapter_matches_reference():
    """A rank-0 adapter (rank_pattern 0) gets no gradient at all; it must score nothing and break nothing."""
    model, adapters = make_model(with_rank0=True)
    run_against_reference(model, adapters, steps=SCHED.total_steps)


def test_bf16_adapters_keep_exact_fp32_ema_state():
    """bf16 adapters, fp32 EMAs: I = |w·g| is formed exactly in fp32 (a bf16 x bf16 product fits)."""
    model, adapters = make_model(dtype=torch.bfloat16, with_rank0=False)
    run_against_reference(model, adapters, steps=6)


@pytest.mark.parametrize("form", ["reference", "paper"])
def test_batched_penalty_matches_per_adapter_loop(form):
    model, adapters = make_model(with_rank0=True)
    layers = list(adapters.values())
    ours = adalora.orthogonality_penalty(adapters, form=form)
    ref = ref_penalty(layers, form)
    assert_close(ours.detach(), ref.detach(), f"penalty ({form})")
    params = adalora.adapter_parameters(adapters)
    g_ours = torch.autograd.grad(ours, [layer.P for layer in layers if layer.rank] + [layer.Q for layer in layers if layer.rank])
    g_ref = torch.autograd.grad(ref, [layer.P for layer in layers if layer.rank] + [layer.Q for layer in layers if layer.rank])
    for a, b in zip(g_ours, g_ref):
        assert_close(a, b, f"penalty gradient ({form})")
    assert len(params) == 3 * len(layers)


def test_ties_are_broken_by_adapter_order_then_index():
    """Identical adapters score identically: the earlier adapter and lower index must win the tie."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    adapters = adalora.inject(model, adalora.AdapterConfig(method="adalora", targets=["0", "1"], init_rank=3))
    first, second = adapters.values()
    with torch.no_grad():
        for layer in (first, second):
            layer.P.copy_(torch.ones(6, 3))
            layer.lam.copy_(torch.ones(3))
            layer.Q.copy_(torch.ones(3, 6))
            for p in (layer.P, layer.lam, layer.Q):
                p.grad = torch.ones_like(p)
    cfg = adalora.ScheduleConfig(target_total=1, total_steps=10, init_warmup=0, final_warmup=2, mask_interval=1)
    alloc = adalora.RankAllocator(adapters, cfg)
    alloc.update_importance(1)
    alloc.update_importance(2)   # |I - Ī| > 0 from the second update on
    rec = alloc.mask_to_budget(2)
    scores = list(alloc.triplet_scores().values())
    assert torch.equal(scores[0], scores[1]) and bool((scores[0] == scores[0][0]).all())
    expected = ref_top_b(scores, rec.budget)
    assert torch.equal(first.rank_mask, expected[0]) and torch.equal(second.rank_mask, expected[1])
    assert rec.budget == int(1 + 5 * (1 - 2 / 8) ** 3) == 3
    assert first.rank_mask.tolist() == [True, True, True] and second.rank_mask.tolist() == [False] * 3


def test_compact_matches_masked_training_and_reference_penalty():
    """After compact(): shapes are the final ranks, the penalty equals the reference loop over the
    compacted adapters, and (with γ = 0) training continues exactly as the masked full-size twin."""
    model, adapters = make_model(with_rank0=False)
    alloc, opt, _ = run_against_reference(model, adapters, steps=SCHED.final_step)
    assert alloc.final_done
    twin, twin_opt = copy.deepcopy((model, opt))   # one deepcopy keeps the optimizer bound to the twin
    twin_adapters = adalora.find_adapters(twin)
    twin_alloc = adalora.RankAllocator(twin_adapters, SCHED)
    twin_alloc.load_state_dict(alloc.state_dict())
    alloc.compact(opt)
    ranks = alloc.ranks()
    assert {n: a.rank for n, a in adapters.items()} == ranks and all(a.rank_mask.all() for a in adapters.values())
    for form in ("reference", "paper"):
        assert_close(adalora.orthogonality_penalty(adapters, form).detach(),
                     ref_penalty(list(adapters.values()), form).detach(), f"compacted penalty ({form})")
    for t in range(SCHED.final_step + 1, SCHED.total_steps + 1):
        for m, a, o, al in ((model, adapters, opt, alloc), (twin, twin_adapters, twin_opt, twin_alloc)):
            train_step(m, a, o, t, orth=0.0)
            al.update_importance(t)
            assert al.mask_to_budget(t) is None
            o.zero_grad(set_to_none=True)
    x, _ = batch(99)
    with torch.no_grad():
        assert_close(model(x), twin(x), "compacted vs masked output")
    for (n, a), b in zip(adapters.items(), twin_adapters.values()):
        keep = b.rank_mask
        assert_close(a.P, b.P[:, keep], f"P of {n}")
        assert_close(a.Q, b.Q[keep], f"Q of {n}")
        assert_close(a.lam, b.lam[keep], f"lam of {n}")
