import pytest
import torch
import torch.nn as nn

import adalora
from adalora.layers import LoRALinear, SVDLinear


def _adapters(shapes, r, seed=0):
    torch.manual_seed(seed)
    return {f"m{i}": SVDLinear(nn.Linear(d_in, d_out).double(), r, 1.0) for i, (d_out, d_in) in enumerate(shapes)}


def test_reference_form_by_hand():
    ad = _adapters([(6, 5), (6, 5), (4, 9)], r=3)
    terms = []
    for a in ad.values():
        terms.append(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(3, dtype=torch.float64)))
        terms.append(torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(3, dtype=torch.float64)))
    expected = sum(terms) / 6
    assert torch.allclose(adalora.orthogonality_penalty(ad), expected, atol=1e-12)


def test_paper_form_by_hand():
    ad = _adapters([(6, 5), (4, 9)], r=2)
    expected = sum(torch.linalg.matrix_norm(a.P.T @ a.P - torch.eye(2, dtype=torch.float64)) ** 2
                   + torch.linalg.matrix_norm(a.Q @ a.Q.T - torch.eye(2, dtype=torch.float64)) ** 2
                   for a in ad.values())
    assert torch.allclose(adalora.orthogonality_penalty(ad, form="paper"), expected, atol=1e-12)


def test_zero_for_orthonormal_factors_and_ignores_lora():
    ad = _adapters([(8, 6), (8, 6)], r=3)
    with torch.no_grad():
        for a in ad.values():
            a.P.copy_(torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))[0])
            a.Q.copy_(torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0].T)
    ad["lora"] = LoRALinear(nn.Linear(3, 3).double(), 2, 1.0)
    for form in ("reference", "paper"):
        assert adalora.orthogonality_penalty(ad, form).abs() < 1e-12


def test_gradient_flows_and_bad_form_rejected():
    ad = _adapters([(5, 4)], r=2)
    adalora.orthogonality_penalty(ad).backward()
    assert ad["m0"].P.grad is not None and ad["m0"].Q.grad is not None
    with pytest.raises(ValueError, match="form="):
        adalora.orthogonality_penalty(ad, form="frobenius")
    assert adalora.orthogonality_penalty({}) == 0
