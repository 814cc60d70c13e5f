"""Scan validation: every bad input gets an error naming it; inputs are never modified."""

import numpy as np
import pytest

from napari_qsm.core.scan import Scan, ScanError


def good(shape=(8, 8, 8)):
    f = np.zeros(shape, np.float32)
    m = np.zeros(shape, np.uint8)
    m[2:6, 2:6, 2:6] = 1
    return f, m


def test_valid_scan_copies_inputs():
    f, m = good()
    s = Scan(field=f, mask=m, voxel_size=(1, 1, 2), b0_direction=(0, 0, 2))
    s.field[0, 0, 0] = 5
    assert f[0, 0, 0] == 0
    np.testing.assert_allclose(s.b0_direction, (0, 0, 1))
    assert s.mask.dtype == bool and s.mask.sum() == 64
    assert len(s.fingerprint()) == 16


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=np.ones((8, 8, 7))), "mask: shape"),
    (dict(mask=np.zeros((8, 8, 8))), "mask: empty"),
    (dict(field=np.zeros((8, 8))), "field: expected a 3-D"),
    (dict(field=np.zeros((8, 8, 8, 3))), "4-D"),
    (dict(voxel_size=(1, 0, 1)), "voxel_size"),
    (dict(voxel_size=(1, -1, 1)), "voxel_size"),
    (dict(b0_direction=(0, 0, 0)), "b0_direction"),
    (dict(magnitude=np.ones((8, 8, 9))), "magnitude: shape"),
    (dict(field=np.zeros((8, 8, 8), np.complex64)), "complex"),
])
def test_bad_inputs(kwargs, match):
    f, m = good()
    args = dict(field=f, mask=m)
    args.update(kwargs)
    with pytest.raises(ScanError, match=match):
        Scan(**args)


def test_nan_inside_mask_is_an_error():
    f, m = good()
    f[4, 4, 4] = np.nan
    with pytest.raises(ScanError, match="field: 1 NaN/Inf voxels inside the mask"):
        Scan(field=f, mask=m)


def test_nan_outside_mask_is_zeroed_with_warning():
    f, m = good()
    f[0, 0, 0] = np.inf
    with pytest.warns(UserWarning, match="outside the mask"):
        s = Scan(field=f, mask=m)
    assert s.field[0, 0, 0] == 0 and np.isinf(f[0, 0, 0])
