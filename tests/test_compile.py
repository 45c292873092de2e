"""torch.compile over a model with adapters: same outputs as eager, and masking (an in-place
write to lam by the allocator, outside the compiled region) does not trigger a recompilation."""
import torch
import torch.nn as nn

import adalora


def build(total_steps: int, init_warmup: int, final_warmup: int, mask_interval: int, opt_cls, lr: float):
    """An MLP with SVD adapters on two layers, its allocator (4 singular values -> 2) and optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "2"], init_rank=4))
    adalora.mark_only_adapters_trainable(model, extra=("4",))
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=2, total_steps=total_steps, init_warmup=init_warmup, final_warmup=final_warmup,
        mask_interval=mask_interval))
    opt = opt_cls([p for p in model.parameters() if p.requires_grad], lr=lr)
    return model, adapters, alloc, opt


def test_compiled_model_matches_eager_and_masking_does_not_recompile(no_recompiles):
    model, adapters, alloc, opt = build(12, 2, 4, 2, torch.optim.AdamW, 1e-2)
    compiled = torch.compile(model, backend="aot_eager")
    records = []
    for step in range(12):
        x = torch.randn(8, 16)
        out = compiled(x)
        assert torch.allclose(out, model(x), atol=1e-5)
        (out.pow(2).mean() + 0.1 * adalora.orthogonality_penalty(adapters)).backward()
        opt.step()
        alloc.update_importance(step)
        rec = alloc.mask_to_budget(step)
        records.append(rec)
        opt.zero_grad(set_to_none=True)
    assert any(r is not None for r in records)
    assert sum(alloc.finalize().ranks.values()) == 4


def test_compiled_loss_with_penalty_gives_eager_gradients_without_recompiling(no_recompiles):
    """The benchmark's compiled region: forward and orthogonality penalty in one graph. Gradients
    match eager to float32 round-off, through mask steps, without a recompilation."""
    runs = []
    from torch._dynamo.utils import counters
    counters.clear()
    for compiled in (False, True):
        model, adapters, alloc, opt = build(10, 1, 3, 1, torch.optim.SGD, 0.1)

        def loss_fn(x):
            return model(x).pow(2).mean() + 0.1 * adalora.orthogonality_penalty(adapters)
        fn = torch.compile(loss_fn, backend="aot_eager") if compiled else loss_fn
        g = torch.Generator().manual_seed(1)
        grads, losses = [], []
        for step in range(10):
            loss = fn(torch.randn(8, 16, generator=g))
            loss.backward()
            losses.append(loss.item())
            grads.append(torch.cat([a.lam.grad for a in adapters.values()]).clone())
            opt.step()
            alloc.update_importance(step)
            alloc.mask_to_budget(step)
            opt.zero_grad(set_to_none=True)
        runs.append((losses, grads, alloc.ranks()))
    assert counters["stats"]["unique_graphs"] == 1              # compiled once, then reused
    (le, ge, re), (lc, gc, rc) = runs
    assert re == rc and sum(rc.values()) == 4
    assert max(abs(a - b) for a, b in zip(le, lc)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ge, gc))
