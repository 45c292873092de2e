import pytest
import torch
import torch.nn as nn

from adalora import ScoreConfig
from adalora.importance import ImportanceScorer, triplet_scores
from adalora.layers import SVDLinear


def _layer(seed=0):
    torch.manual_seed(seed)
    layer = SVDLinear(nn.Linear(3, 2).double(), 2, 1.0)
    with torch.no_grad():
        layer.lam.copy_(torch.tensor([0.5, -2.0]))
    return layer


def test_emas_against_hand_arithmetic_over_three_steps():
    layer = _layer()
    scorer = ImportanceScorer([layer], ScoreConfig(beta1=0.85, beta2=0.85))
    grads = [torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.5]), torch.tensor([4.0, -1.0])]
    ibar = torch.zeros(2, dtype=torch.float64)
    ubar = torch.zeros(2, dtype=torch.float64)
    for g in grads:
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = torch.ones_like(p)
        layer.lam.grad = g.double()
        assert scorer.update()
        i = (layer.lam.detach() * g).abs()
        ibar = 0.85 * ibar + 0.15 * i
        ubar = 0.85 * ubar + 0.15 * (i - ibar).abs()
    assert torch.allclose(scorer.state_dict()['ibar'][1], ibar, atol=1e-15)
    assert torch.allclose(scorer.state_dict()['ubar'][1], ubar, atol=1e-15)
    # hand numbers for lam_0 = 0.5: I = 0.5, 1.0, 2.0
    i0 = [0.5, 1.0, 2.0]
    ib = 0.0
    ub = 0.0
    for x in i0:
        ib = 0.85 * ib + 0.15 * x
        ub = 0.85 * ub + 0.15 * abs(x - ib)
    assert abs(scorer.state_dict()['ibar'][1][0].item() - ib) < 1e-15 and abs(scorer.state_dict()['ubar'][1][0].item() - ub) < 1e-15


def test_triplet_scores_against_loop():
    torch.manual_seed(0)
    sP, sl, sQ = torch.rand(5, 3), torch.rand(3), torch.rand(3, 4)
    expected = torch.tensor([sl[i] + sum(sP[j, i] for j in range(5)) / 5 + sum(sQ[i, j] for j in range(4)) / 4
                             for i in range(3)])
    assert torch.allclose(triplet_scores(sP, sl, sQ), expected, atol=1e-6)


def test_kinds():
    layer = _layer()
    for p in (layer.P, layer.lam, layer.Q):
        p.grad = torch.randn_like(p)
    sens = ImportanceScorer([layer], ScoreConfig(kind="sensitivity"))
    sens.update()
    assert sens.ubar is None
    assert torch.allclose(sens.scores()[0], triplet_scores(*(0.15 * (t.detach() * t.grad).abs()
                                                            for t in (layer.P, layer.lam, layer.Q))))
    assert torch.equal(ImportanceScorer([layer], ScoreConfig(kind="magnitude")).scores()[0],
                       torch.tensor([0.5, 2.0], dtype=torch.float32))
    rnd = ImportanceScorer([layer], ScoreConfig(kind="random", seed=3))
    assert torch.equal(rnd.scores(7)[0], rnd.scores(7)[0]) and not torch.equal(rnd.scores(7)[0], rnd.scores(8)[0])


def test_missing_gradient_is_a_clear_error():
    layer = _layer()
    with pytest.raises(RuntimeError, match="no gradient for P.*after loss.backward"):
        ImportanceScorer([layer], ScoreConfig()).update()


def test_non_finite_gradient_skips_and_counts():
    layer = _layer()
    scorer = ImportanceScorer([layer], ScoreConfig())
    for p in (layer.P, layer.lam, layer.Q):
        p.grad = torch.ones_like(p)
    scorer.update()
    before = scorer.ibar.clone()
    layer.Q.grad[0, 0] = float("nan")
    assert scorer.update() is False and scorer.skipped == 1 and scorer.updates == 1
    assert torch.equal(before, scorer.ibar)


def test_bf16_adapters_keep_fp32_state():
    layer = SVDLinear(nn.Linear(4, 4).to(torch.bfloat16), 2, 1.0)
    for p in (layer.P, layer.lam, layer.Q):
        p.grad = torch.ones_like(p)
    scorer = ImportanceScorer([layer], ScoreConfig())
    scorer.update()
    assert scorer.ibar.dtype == scorer.ubar.dtype == torch.float32
