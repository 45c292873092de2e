import os

import pytest
import torch

# Triton kernels (adalora/lowrank_gemm.py) run in Triton's CPU interpreter: it must be chosen
# before triton is first imported, and the tests have no GPU to run them on otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny tensors; on 2 busy cores intra-op threads cost more than they give.
torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """Tests marked ``long`` first, the rest in file order. ``make test`` has pytest-xdist hand
    out one test at a time (``--maxschedchunk 1``), so the long ones start early on both workers
    and short ones fill in at the end; in file order, a long test starting late kept one worker
    busy for a minute or more after the other had finished."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture
def no_recompiles():
    """Dynamo raises on any recompilation inside the test. Through torch's own config patch:
    pytest's monkeypatch (9.2) deletes a torch config option on undo, breaking later tests."""
    import torch._dynamo
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()
