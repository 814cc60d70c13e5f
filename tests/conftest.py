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


@pytest.fixture(scope="session")
def raw_bids_head(tmp_path_factory):
    """A small raw multi-echo head (32x40x32 at 4 mm, in air with a background field) as BIDS MEGRE:
    the ``anat`` folder of ``sub-01`` (read only: copy it to change it)."""
    from napari_qsm.core.sim.phantom import make_phantom, save_raw_bids

    root = tmp_path_factory.mktemp("raw_bids_head")
    ph = make_phantom(shape=(32, 40, 32), voxel_size=(4, 4, 4), seed=2, snr=50.0, honest=True, background=True,
                      keep_echoes=True, device="cpu")
    save_raw_bids(ph, root, subject="01")
    return root / "sub-01" / "anat"
