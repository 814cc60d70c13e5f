"""The mask on real-data classes (issue 24), on both generators: the project's raw phantom
(core.sim.phantom, written with save_raw_bids and read back) and the independent shapes head
(core.sim.shapes). Each case reproduces a failure of the Otsu mask on the phase-quality map:

* a tissue-only crop (no air in the FOV): ≥ 95 % kept (was 48 % / 68 %);
* a vein crossing the FOV border: kept (was dropped);
* a head with skull and a CSF rim: bone stays out (was: 1.1 % of the bone at 3 mm on the shapes head),
  the scalp is not glued to the brain, Dice ≥ 0.9.
"""

import inspect

import numpy as np
import pytest

from napari_qsm.core.field import unwrap
from napari_qsm.core.field.load import load_echoes
from napari_qsm.core.field.mask import dice
from napari_qsm.core.field.pipeline import find_step
from napari_qsm.core.field.records import Echoes
from napari_qsm.core.sim.phantom import make_phantom, save_raw_bids
from napari_qsm.core.sim.shapes import make_head


def chain_mask(e: Echoes) -> np.ndarray:
    """The default fit, then the default mask step with what the pipeline gives it."""
    total = find_step("fit").run(e, None, device="cpu")
    step = find_step("mask")
    q = unwrap.voxel_quality(e.phase[..., :2], e.magnitude[..., :2], e.te[:2])
    sig = inspect.signature(step.run).parameters
    extra = {k: getattr(total, k) for k in ("misfit", "r2star", "te") if k in sig and getattr(total, k) is not None}
    return step.run(total.magnitude, None, quality=q, voxel_size=total.voxel_size, **extra)


def border_layers(shape, n=2):
    b = np.zeros(shape, bool)
    for ax in range(3):
        idx = [slice(None)] * 3
        for sl in (slice(0, n), slice(-n, None)):
            idx[ax] = sl
            b[tuple(idx)] = True
    return b


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory):
    """The project's raw head in air (2.5 mm), through save_raw_bids and load_echoes like a user's data."""
    ph = make_phantom((64, 72, 64), (2.5, 2.5, 2.5), seed=3, snr=40, honest=True, keep_echoes=True,
                      background=True, device="cpu")
    out = tmp_path_factory.mktemp("raw")
    save_raw_bids(ph, out)
    return ph, load_echoes(out / "sub-phantom" / "anat")


def phantom_crop(ph, e):
    """A box inside the phantom's brain (tissue everywhere) with a face through a vein."""
    vein = ph.labels == 10
    h = np.array([12, 14, 12])
    c0 = np.argwhere(ph.mask).mean(0).astype(int)
    best = None
    for shift in np.ndindex(5, 5, 5):
        c = c0 + (np.array(shift) - 2) * 3
        sl = tuple(slice(a - b, a + b) for a, b in zip(c, h))
        if ph.mask[sl].mean() < 0.995:
            continue
        score = int((vein[sl] & border_layers(vein[sl].shape)).sum())
        if best is None or score > best[0]:
            best = (score, sl)
    sl = best[1]
    ec = Echoes(magnitude=e.magnitude[sl], phase=e.phase[sl], te=e.te, b0_tesla=e.b0_tesla, voxel_size=e.voxel_size)
    return ec, vein[sl]


@pytest.fixture(scope="module")
def shapes_crop():
    # an 8-coil array combined by the root sum of squares, as real crops come: its profile varies the magnitude
    return make_head((64, 64, 64), (2.5, 2.5, 2.5), seed=2, crop=True, cavity=False, n_coils=8)


@pytest.fixture(scope="module")
def shapes_air():
    return make_head((64, 64, 64), (3.0, 3.0, 3.0), seed=1)


def check_crop(m, vein):
    # measured: 99.8 % (phantom) and 100 % (shapes) kept; the Otsu mask on the quality map kept 48 % and 68 %
    assert m.mean() >= 0.95, m.mean()
    edge_vein = vein & border_layers(vein.shape)
    assert edge_vein.sum() >= 3                            # the crop's border cuts a vein
    # the vein that leaves through the FOV border is kept (it is a hole open to the border, not air)
    assert (m & edge_vein).sum() >= 0.9 * edge_vein.sum(), ((m & edge_vein).sum(), edge_vein.sum())
    assert (m & vein).sum() >= 0.9 * vein.sum()


def test_tissue_only_crop_and_vein_at_border_phantom(phantom_raw):
    ph, e = phantom_raw
    ec, vein = phantom_crop(ph, e)
    check_crop(chain_mask(ec), vein)


def test_tissue_only_crop_and_vein_at_border_shapes(shapes_crop):
    c = shapes_crop
    assert c.brain_mask.all() and not np.any(c.labels <= 3)    # no air, bone, scalp or rim in the crop
    check_crop(chain_mask(c.to_echoes()), c.labels == 8)


def check_head(m, brain, bone, rim, scalp):
    d = dice(m, brain)
    assert d >= 0.9, d
    assert not np.any(m & scalp)
    # measured: 0 bone voxels (3 mm shapes head: 159 = 1.1 % of the bone with the Otsu mask; the project phantom
    # keeps its bone out at 2–3 mm with either mask: its failure showed at 1 mm)
    assert (m & bone).sum() <= 0.002 * bone.sum(), (m & bone).sum()
    # nothing beyond the CSF rim (a source-free margin the default keeps for background removal)
    assert (m & ~brain & ~rim).sum() <= 0.01 * m.sum(), (m & ~brain & ~rim).sum()


def test_head_with_skull_and_csf_rim_phantom(phantom_raw):
    ph, e = phantom_raw
    m = chain_mask(e)
    check_head(m, ph.mask, ph.labels == 14, ph.labels == 13, ph.labels == 15)


def test_head_with_skull_and_csf_rim_shapes(shapes_air):
    h = shapes_air
    m = chain_mask(h.to_echoes())
    check_head(m, h.brain_mask, h.labels == 2, h.labels == 3, h.labels == 1)
    # the vein that leaves the head through the bottom of the FOV (with the brain) is kept there
    low = (h.labels == 8) & border_layers(h.shape if hasattr(h, "shape") else h.labels.shape)
    assert low.sum() >= 1 and np.all(m[low])
