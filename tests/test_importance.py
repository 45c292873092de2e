import pytest
import torch

import adalora
import torch.nn as nn

from adalora import ScoreConfig
from adalora import importance
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
    # batched over a leading dim of adapters, each as alone
    bP, bl, bQ = torch.rand(2, 5, 3), torch.rand(2, 3), torch.rand(2, 3, 4)
    want = torch.stack([triplet_scores(bP[k], bl[k], bQ[k]) for k in range(2)])
    assert torch.allclose(triplet_scores(bP, bl, bQ), want, atol=1e-6)


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
    rnd = ImportanceScorer([layer], ScoreConfig(kind="random_churn", seed=3))
    assert torch.equal(rnd.scores(7)[0], rnd.scores(7)[0]) and not torch.equal(rnd.scores(7)[0], rnd.scores(8)[0])
    fixed = ImportanceScorer([layer], ScoreConfig(kind="random_fixed", seed=3))
    assert torch.equal(fixed.scores(7)[0], fixed.scores(8)[0])          # one draw, every step
    assert not torch.equal(fixed.scores(7)[0], ImportanceScorer([layer], ScoreConfig(kind="random_fixed", seed=4)).scores(7)[0])


def test_random_kinds_keep_nested_sets_or_reshuffle():
    """random_fixed keeps a fixed random order, so each budget's kept set contains the next
    smaller one; random_churn redraws at every mask step, so kept sets are not nested."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
    adapters = adalora.inject(model, adalora.AdapterConfig(targets=["0", "1", "2", "3"], init_rank=8))

    def kept_sets(kind):
        for a in adapters.values():
            a.rank_mask.fill_(True)
        alloc = adalora.RankAllocator(adapters, adalora.ScheduleConfig(
            target_rank=1, total_steps=100, init_warmup=0, final_warmup=10, mask_interval=1),
            ScoreConfig(kind=kind, seed=1))
        out = []
        for t in range(1, 60, 7):
            alloc.mask_to_budget(t)
            out.append({(n, i) for n, a in adapters.items() for i in a.rank_mask.nonzero().flatten().tolist()})
        return out
    fixed = kept_sets("random_fixed")
    assert all(small <= big for big, small in zip(fixed, fixed[1:]))
    churn = kept_sets("random_churn")
    assert not all(small <= big for big, small in zip(churn, churn[1:]))


def test_random_is_renamed_with_a_message_naming_both_kinds():
    with pytest.raises(ValueError, match="random_churn.*random_fixed"):
        ScoreConfig(kind="random")


def test_missing_gradient_is_a_clear_error():
    layer = _layer()
    with pytest.raises(RuntimeError, match=r"^no gradient for P of SVD adapter #0 \(d_in=3, d_out=2, rank=2, scaling=0\.5\): call "
                       r"update_importance after loss\.backward\(\) and before optimizer\.zero_grad\(\), and keep "
                       r"adapter parameters trainable \(mark_only_adapters_trainable\)$"):
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


def test_layout_is_reused_until_ranks_change_and_scores_follow_new_ranks():
    layers = [_layer(0), _layer(1)]
    scorer = ImportanceScorer(layers, ScoreConfig())
    first = scorer._layout()
    assert scorer._layout() is first                     # built once while the ranks stay
    layers[1].resize(torch.tensor([1]))                  # a pruned adapter: rebuilt
    second = scorer._layout()
    assert second is not first and second.ranks == (2, 1) and scorer._layout() is second
    for layer in layers:
        for p in (layer.P, layer.lam, layer.Q):
            p.grad = torch.ones_like(p)
    scorer.update()
    s = scorer.scores()
    assert [t.shape[0] for t in s] == [2, 1]
    for layer, got in zip(layers, s):
        # one step with g = 1: I = |w|, Ibar = 0.15 I, Ubar = 0.15 |I - Ibar| = 0.15 * 0.85 I
        ii = [t.detach().abs() for t in (layer.P, layer.lam, layer.Q)]
        assert torch.allclose(got, triplet_scores(*(0.15 * x * 0.15 * 0.85 * x for x in ii)), atol=1e-15)


def test_scores_default_to_step_zero():
    layer = _layer()
    rnd = ImportanceScorer([layer], ScoreConfig(kind="random_churn", seed=3))
    assert torch.equal(rnd.scores()[0], rnd.scores(0)[0]) and not torch.equal(rnd.scores()[0], rnd.scores(1)[0])


def test_rank_0_adapters_alone_score_nothing():
    layers = [SVDLinear(nn.Linear(3, 2), 0, 1.0), SVDLinear(nn.Linear(4, 2), 0, 1.0)]
    scorer = ImportanceScorer(layers, ScoreConfig())
    assert scorer.update()
    assert scorer.flat_scores().shape == (0,) and [s.shape for s in scorer.scores()] == [(0,), (0,)]


def test_non_gradient_kinds_update_trivially_and_skips_accumulate():
    layer = _layer()
    for kind in ("magnitude", "random_fixed", "random_churn"):
        sc = ImportanceScorer([layer], ScoreConfig(kind=kind))
        assert sc.update() is True and sc.skipped == 0 and sc.ibar is None     # nothing to average
    sc = ImportanceScorer([layer], ScoreConfig())
    for p in (layer.P, layer.lam, layer.Q):
        p.grad = torch.full_like(p, float("inf"))
    assert sc.update() is False and sc.update() is False and sc.skipped == 2 and sc.updates == 0


def test_never_updated_scores_are_zero_and_flat_scores_default_to_step_zero():
    layers = [_layer(0), SVDLinear(nn.Linear(4, 5).double(), 3, 1.0)]
    assert torch.equal(ImportanceScorer(layers, ScoreConfig()).flat_scores(), torch.zeros(5))
    rnd = ImportanceScorer(layers, ScoreConfig(kind="random_churn", seed=3))
    assert torch.equal(rnd.flat_scores(), rnd.flat_scores(0)) and not torch.equal(rnd.flat_scores(), rnd.flat_scores(1))


def test_random_draws_are_pinned_for_reproducible_runs():
    """The random ablations' scores are torch.rand over all singular values from the generator
    seeded seed·1000003 + step (random_churn) or seed·1000003 (random_fixed): runs recorded with
    them redraw the same numbers after any refactoring."""
    layers = [_layer(0), SVDLinear(nn.Linear(4, 5).double(), 3, 1.0)]
    churn = ImportanceScorer(layers, ScoreConfig(kind="random_churn", seed=3))
    fixed = ImportanceScorer(layers, ScoreConfig(kind="random_fixed", seed=3))
    for step in (0, 7):
        want = torch.rand(5, generator=torch.Generator().manual_seed(3 * 1_000_003 + step))
        assert torch.equal(churn.flat_scores(step), want)
        assert torch.equal(fixed.flat_scores(step), torch.rand(5, generator=torch.Generator().manual_seed(3_000_009)))


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "captured"])
def test_state_per_parameter_matches_dense_emas_in_each_parameters_layout_and_round_trips(eager, monkeypatch):
    """The flat state holds P as Pᵀ (its storage order); state_dict still gives each EMA in its
    parameter's shape and strides (P column-major), equal to the EMAs computed per parameter by
    hand, and load_state_dict into a fresh scorer restores the same scores. Both ways of
    gathering P (one cat along its columns eagerly; transposes and a cat of rows when captured
    or compiled) fill the buffer alike."""
    monkeypatch.setattr(importance, "_eager", lambda t: eager)
    torch.manual_seed(1)
    layers = [SVDLinear(nn.Linear(d_in, d_out).double(), 3, 1.0) for d_out, d_in in ((5, 4), (5, 4), (6, 2))]
    scorer = ImportanceScorer(layers, ScoreConfig(beta1=0.8, beta2=0.7))
    ref = {}
    for _ in range(3):
        for layer in layers:
            for p in layer.parameters():
                if p.requires_grad:
                    p.grad = torch.randn_like(p)
                    with torch.no_grad():
                        p.add_(0.1 * torch.randn_like(p))
        scorer.update(grads_finite=True)
        for k, layer in enumerate(layers):
            for a in ("P", "lam", "Q"):
                w = getattr(layer, a)
                i = (w * w.grad).abs()
                ib, ub = ref.get((k, a), (torch.zeros_like(i), torch.zeros_like(i)))
                ib = 0.8 * ib + 0.2 * i
                ref[(k, a)] = (ib, 0.7 * ub + 0.3 * (i - ib).abs())
    sd = scorer.state_dict()
    for k, layer in enumerate(layers):
        for j, a in enumerate(("P", "lam", "Q")):
            for name, want in zip(("ibar", "ubar"), ref[(k, a)]):
                got = sd[name][3 * k + j]
                assert got.shape == want.shape and got.stride() == getattr(layer, a).stride()
                assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    s = {key: ib * ub for key, (ib, ub) in ref.items()}
    want = torch.cat([triplet_scores(s[(k, "P")], s[(k, "lam")], s[(k, "Q")]) for k in range(len(layers))])
    assert torch.allclose(scorer.flat_scores(), want, rtol=1e-12, atol=1e-15)
    fresh = ImportanceScorer(layers, ScoreConfig(beta1=0.8, beta2=0.7))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.flat_scores(), scorer.flat_scores())


def test_eager_update_dispatches_as_many_ops_for_16_adapters_as_for_4():
    """Views included: no op per adapter (a transpose of each P, say) on the host, which sets the
    pace of an eager step."""
    from experiments.opcount import count_ops
    counts = []
    for n in (4, 16):
        torch.manual_seed(0)
        layers = [SVDLinear(nn.Linear(5, 6), 3, 1.0) for _ in range(n)]
        for layer in layers:
            for p in (layer.P, layer.lam, layer.Q):
                p.grad = torch.randn_like(p)
        scorer = ImportanceScorer(layers, ScoreConfig())
        scorer.update(grads_finite=True)                      # the state exists from here on
        counts.append(count_ops(lambda: scorer.update(grads_finite=True), views=True)["ops"])
    assert counts[0] == counts[1]
