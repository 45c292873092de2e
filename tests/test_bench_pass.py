"""experiments.bench_pass: the candidate kernels, run by Triton's CPU interpreter against float64
dense products, and the weight shapes it takes from the benchmark's presets. No timing."""
import os

import pytest
import torch

from experiments import bench_pass

pytest.importorskip("triton", reason="Triton is in the dev extra (and in CUDA builds of torch)")


def test_shapes_are_the_adapted_maps_of_each_preset():
    # BERT-base: q, k, v and the attention output are 768 -> 768; the MLP 768 -> 3072 -> 768;
    # 32 sequences of 128 tokens.
    assert bench_pass.shapes("base") == [(4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768)]
    # SmolLM2-135M: 9 heads of 64, 3 KV heads (k and v 576 -> 192), MLP 1536; 16 x 256 tokens.
    assert bench_pass.shapes("smollm2") == [(4096, 576, 576), (4096, 576, 192), (4096, 576, 1536), (4096, 1536, 576)]


@pytest.mark.parametrize("b_nk", [True, False], ids=["forward", "input_gradient"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_tma_kernel_equals_dense_products(b_nk, dtype, tol):
    """M and K off the interpreter's 32-element tiles (TMA fills the boxes past the edge with
    zeros); the forward takes W (N, K) transposed, the input gradient W (K, N) as it is."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    M, K, N, r, s = 70, 48, 40, 5, 0.75
    a = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) if b_nk else torch.randn(K, N, generator=g)).to(dtype)
    c, e = torch.randn(r, K, generator=g).to(dtype), torch.randn(r, N, generator=g).to(dtype)
    wop = w.double().t() if b_nk else w.double()
    t64 = a.double() @ c.double().t()
    out, t = bench_pass.tma(a, w, b_nk, c, e, s)
    ref = a.double() @ wop + s * (t64.to(dtype).double() @ e.double())
    assert out.shape == (M, N) and t.shape == (r, M)
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (t.t().double() - t64).abs().max() <= tol * t64.abs().max()
    plain, none = bench_pass.tma(a, w, b_nk, c, e, s, rank_term=False)
    gemm = a.double() @ wop
    assert none is None and (plain.double() - gemm).abs().max() <= tol * gemm.abs().max()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_row_pass_adds_the_rank_term_in_place(dtype, tol):
    g = torch.Generator().manual_seed(1)
    M, KA, N, r, s = 64, 64, 128, 12, 1.5
    a, c = torch.randn(M, KA, generator=g).to(dtype), torch.randn(r, KA, generator=g).to(dtype)
    e, out = torch.randn(r, N, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    t64 = a.double() @ c.double().t()
    ref = out.double() + s * (t64.to(dtype).double() @ e.double())
    same, t = bench_pass.row_pass_(out, a, c, e, s, (16, 32, 64, 4, 2))
    assert same is out and t.shape == (r, M)
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (t.t().double() - t64).abs().max() <= tol * t64.abs().max()


def test_row_pass_refuses_tiles_that_do_not_divide():
    z = torch.zeros(48, 64)
    with pytest.raises(ValueError, match="does not divide"):
        bench_pass.row_pass_(z, torch.zeros(48, 64), torch.zeros(2, 64), torch.zeros(2, 64), 1.0, (32, 64, 64, 4, 2))
    assert all(48 % t[0] == 0 and 64 % t[1] == 0 and 64 % t[2] == 0 for t in bench_pass.row_tiles(48, 64, 64))


def test_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as e:
        bench_pass.main([])
    assert e.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
