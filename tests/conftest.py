import pytest
import torch

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
