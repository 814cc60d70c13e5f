import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small volumes: one torch thread avoids thread hand-off overhead on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
