import os

import pytest
import torch

# Triton kernels (adalora/lowrank_gemm.py) run in Triton's CPU interpreter: it must be chosen
# before triton is first imported, and the tests have no GPU to run them on otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny tensors; on 2 busy cores intra-op threads cost more than they give.
torch.set_num_threads(1)


@pytest.fixture
def no_recompiles():
    """Dynamo raises on any recompilation inside the test. Through torch's own config patch:
    pytest's monkeypatch (9.2) deletes a torch config option on undo, breaking later tests."""
    import torch._dynamo
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()
