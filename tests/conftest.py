import os

import numpy as np
import pytest

# Keep the suite light on a 2-core machine and deterministic.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
