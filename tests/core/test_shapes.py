"""The independent raw-data generator (napari_qsm.core.sim.shapes): physics and anatomy checks."""

import numpy as np
import pytest

from napari_qsm.core.dipole import forward_field, sphere_field
from napari_qsm.core.metrics import nrmse_demeaned
from napari_qsm.core.sim.shapes import make_head, random_sources


def test_random_sphere_matches_the_analytic_field():
    s = random_sources((40, 40, 40), (1.0, 1.0, 1.0), n_shapes=1, seed=4, kinds=("sphere",))
    (sh,) = s.shapes
    r = sh["size_mm"][0]
    ref = sphere_field((40, 40, 40), (1, 1, 1), sh["centre_mm"], r, sh["chi"])
    g = np.meshgrid(*[np.arange(40.0)] * 3, indexing="ij")
    dist = np.sqrt(sum((x - c) ** 2 for x, c in zip(g, sh["centre_mm"])))
    far = (dist > 1.5 * r + 1) & (dist < 3 * r + 2)
    err = np.linalg.norm(s.field[far] - ref[far]) / np.linalg.norm(ref[far])
    assert err < 0.08, err                      # fine grid + voxel mean: close to the continuous sphere
    assert s.chi.max() == pytest.approx(sh["chi"], abs=1e-4) and s.mask.sum() > 0


def test_random_sources_are_seeded_and_not_the_discrete_model():
    a = random_sources((32, 32, 32), (1.0, 1.0, 1.5), n_shapes=6, seed=1)
    b = random_sources((32, 32, 32), (1.0, 1.0, 1.5), n_shapes=6, seed=1)
    assert np.array_equal(a.chi, b.chi) and len(a.shapes) == 6
    assert len({x["kind"] for x in a.shapes}) > 1
    disc = forward_field(a.chi, (1.0, 1.0, 1.5))
    e = nrmse_demeaned(a.field, disc, np.ones(a.chi.shape, bool))
    assert 0.5 < e < 30, e                       # same physics, another grid: close but not identical (%)


@pytest.fixture(scope="module")
def head():
    return make_head((40, 40, 40), (4.0, 4.0, 4.0), seed=0, te=(0.004, 0.012, 0.02))


def test_head_layers_signal_and_truth(head):
    h = head
    L, mag = h.labels, h.magnitude
    assert set(np.unique(L)) >= {0, 1, 2, 3, 4, 5}
    brain = mag[..., 0][h.brain_mask].mean()
    assert mag[..., 0][L == 2].mean() < 0.25 * brain               # bone: little signal
    assert mag[..., 0][L == 1].mean() > 0.5 * brain                 # scalp: bright
    late = mag[..., -1]
    assert late[L == 3].mean() > late[L == 4].mean()                 # the CSF rim is brighter than WM late
    assert np.abs(h.phase).max() <= np.pi + 1e-5
    assert h.brain_mask[:, :, 0].any()                               # the FOV cuts the head at the bottom
    # truth: the local field is the field of the brain's χ (up to the fine grid); the total field also carries
    # the background of the head (tissue −9.41 ppm and bone against air), larger than the local field
    disc = forward_field(h.chi, h.voxel_size)
    assert nrmse_demeaned(h.local_field, disc, h.brain_mask) < 40
    bg = (h.total_field - h.local_field)[h.brain_mask]
    assert np.std(bg) > 2 * np.std(h.local_field[h.brain_mask])
    e = h.to_echoes()
    assert e.shape == h.labels.shape and e.n_echoes == 3


def test_head_crop_and_coils():
    c = make_head((40, 40, 40), (4.0, 4.0, 4.0), seed=0, te=(0.004, 0.012), crop=True, n_coils=4)
    assert c.brain_mask.all() and c.magnitude.shape[:3] == c.chi.shape
    assert np.all(c.labels >= 4)                                     # tissue everywhere: no air, bone, scalp
    assert c.affine[2, 3] >= 0 and c.info["n_coils"] == 4
