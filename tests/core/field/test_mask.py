"""Brain mask from the magnitude of a simulated head in air (napari_qsm.core.field.mask)."""

import numpy as np
import pytest

from napari_qsm.core.field.unwrap import voxel_quality
from napari_qsm.core.field.mask import STEPS, ThresholdMaskParams, dice, otsu_threshold, threshold_mask
from napari_qsm.core.sim.phantom import make_phantom
from napari_qsm.core.scan import ScanError

VS = (2.5, 2.5, 2.5)


@pytest.fixture(scope="module")
def head():
    # honest phantom: multi-echo complex signal with noise, skull (label 14) dark, scalp (15) bright
    return make_phantom((64, 72, 64), VS, seed=3, snr=40, honest=True, keep_echoes=True, device="cpu")


def test_mask_from_magnitude_matches_brain(head):
    assert head.magnitude[head.labels == 15].mean() > 0.8 * head.magnitude[head.mask].mean()  # bright scalp
    m = threshold_mask(head.magnitude, voxel_size=VS)
    d = dice(m, head.mask)
    # measured: Dice 0.995 (the 3 mm peel of the outer edge takes the extra-axial CSF, label 13, out); without it 0.95
    assert d >= 0.97, d
    assert not np.any(m & (head.labels == 15))            # no scalp
    assert dice(threshold_mask(head.magnitude, ThresholdMaskParams(edge_mm=0), voxel_size=VS), head.mask) < d
    # the bare Otsu threshold keeps the scalp: the morphology/component steps are what make the mask
    raw = head.magnitude > otsu_threshold(head.magnitude)
    assert dice(raw, head.mask) < 0.85


def test_mask_from_echoes_and_quality(head):
    m4 = threshold_mask(head.echoes, voxel_size=VS)       # 4-D complex echoes: root sum of squares
    assert dice(m4, head.mask) >= 0.93
    # the phase-quality map (QSMxT's route): thresholded (Otsu) when source="quality"
    q = voxel_quality(np.angle(head.echoes), np.abs(head.echoes), te=head.echo_times)
    mq = threshold_mask(head.magnitude, ThresholdMaskParams(source="quality"), quality=q, voxel_size=VS)
    assert dice(mq, head.mask) >= 0.93 and not np.any(mq & (head.labels == 15))
    q = np.where(head.mask, 0.9, 0.1).astype(np.float32)
    mq = threshold_mask(np.zeros_like(head.magnitude) + 1.0, ThresholdMaskParams(source="quality", open_mm=0, edge_mm=0),
                        quality=q, voxel_size=VS)
    assert dice(mq, head.mask) > 0.99
    with pytest.raises(ScanError, match="quality"):
        threshold_mask(head.magnitude, ThresholdMaskParams(source="quality"), voxel_size=VS)


def test_user_mask_wins(head):
    user = np.zeros(head.magnitude.shape, bool)
    user[20:40, 20:50, 20:40] = True
    m = threshold_mask(head.magnitude, ThresholdMaskParams(threshold_scale=3.0, erode_mm=5), user_mask=user,
                       voxel_size=VS)
    assert np.array_equal(m, user) and m is not user
    with pytest.raises(ScanError, match="user_mask"):
        threshold_mask(head.magnitude, user_mask=np.ones((3, 3, 3)))
    with pytest.raises(ScanError, match="user_mask"):
        threshold_mask(head.magnitude, user_mask=np.zeros(head.magnitude.shape))


def test_bad_inputs_and_step():
    with pytest.raises(ScanError, match="magnitude"):
        threshold_mask(np.full((8, 8, 8), np.nan))
    with pytest.raises(ScanError, match="magnitude"):
        threshold_mask(np.ones((8, 8, 8)))
    with pytest.raises(ScanError, match="magnitude"):
        threshold_mask(np.ones((8, 8)))
    (step,) = STEPS
    assert step.family == "mask" and step.default and step.params_cls is ThresholdMaskParams
