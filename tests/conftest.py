import os

import numpy as np
import pytest

# Keep the suite light on a 2-core machine and deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small volumes: one torch thread avoids thread hand-off overhead on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
