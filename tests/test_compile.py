"""torch.compile over a model with adapters: same outputs as eager, and masking (an in-place
write to lam by the allocator, outside the compiled region) does not trigger a recompilation."""
import torch
import torch._dynamo
import torch.nn as nn

import adalora


def test_compiled_model_matches_eager_and_masking_does_not_recompile(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "2"], init_rank=4))
    adalora.mark_only_adapters_trainable(model, extra=("4",))
    alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
        target_rank=2, total_steps=12, init_warmup=2, final_warmup=4, mask_interval=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
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
