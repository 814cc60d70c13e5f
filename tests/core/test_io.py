"""NIfTI I/O, geometry (affine -> voxel size and B0 direction) and unit conversion."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.core.io import (GAMMA_BAR_MHZ_PER_T, NiftiError, b0_from_affine, check_output_path, from_ppm,
                                load_scan, read_volume, save_result, save_volume, sidecar_path, to_ppm)
from napari_qsm.core.methods import reconstruct
from napari_qsm.core.scan import ScanError


def rot(axis, deg):
    t = math.radians(deg)
    c, s = math.cos(t), math.sin(t)
    return {"x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
            "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
            "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])}[axis]


def affine(R, vs, t=(0, 0, 0)):
    A = np.eye(4)
    A[:3, :3] = np.asarray(R) @ np.diag(vs)
    A[:3, 3] = t
    return A


# Columns of R are the scanner directions of voxel axes i, j, k (as stored, before reorientation).
# axial: k along scanner z. sagittal: i -> y (A-P), j -> z (S-I), k -> x (slices L-R).
# coronal: i -> x, j -> z, k -> y (slices A-P). In both, B0 (scanner z) runs along voxel axis j.
SAGITTAL = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float)
CORONAL = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]], float)


@pytest.mark.parametrize("R,expected", [
    (np.eye(3), (0, 0, 1)),
    (SAGITTAL, (0, 1, 0)),
    (CORONAL, (0, 1, 0)),
    (rot("x", 20), (0, math.sin(math.radians(20)), math.cos(math.radians(20)))),
])
def test_b0_from_affine(R, expected):
    b = b0_from_affine(affine(R, (0.7, 0.9, 2.5)))
    np.testing.assert_allclose(b, expected, atol=1e-9)


def test_b0_from_affine_is_scanner_z_in_voxel_frame():
    R = rot("x", 20) @ rot("y", -12)
    A = affine(R, (0.8, 0.8, 3.0))
    b = b0_from_affine(A)
    # moving along b (in mm, voxel frame) moves purely along scanner z
    step = A[:3, :3] @ (b / np.array([0.8, 0.8, 3.0]))
    np.testing.assert_allclose(step / np.linalg.norm(step), (0, 0, 1), atol=1e-9)


def test_units_conversion():
    b0, te = 3.0, 0.02
    ppm = np.array([0.1, -0.05], np.float32)
    hz = ppm * GAMMA_BAR_MHZ_PER_T * b0           # 1 ppm at 3 T = 127.73 Hz
    assert hz[0] == pytest.approx(12.7732434, rel=1e-6)
    rad = hz * 2 * np.pi * te
    np.testing.assert_allclose(to_ppm(hz, "hz", b0=b0), ppm, rtol=1e-6)
    np.testing.assert_allclose(to_ppm(rad, "rad", te=te, b0=b0), ppm, rtol=1e-6)
    np.testing.assert_allclose(from_ppm(ppm, "rad", te=te, b0=b0), rad, rtol=1e-6)
    with pytest.raises(ScanError, match="B0"):
        to_ppm(hz, "hz")
    with pytest.raises(ScanError, match="TE"):
        to_ppm(rad, "rad", b0=3.0)
    with pytest.raises(ScanError, match="units"):
        to_ppm(hz, "gauss")


def _write(tmp_path, name, data, A):
    p = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data), A), str(p))
    return p


def test_load_reorients_and_round_trips(tmp_path, rng):
    # LPS-like (flipped x) oblique anisotropic acquisition
    A = affine(rot("x", 15), (0.8, 0.9, 2.0), (-30, 12, 5))
    A[:3, 0] *= -1
    field = rng.standard_normal((14, 12, 9)).astype(np.float32) * 0.05
    mask = np.zeros(field.shape, np.uint8)
    mask[2:-2, 2:-2, 1:-1] = 1
    fp, mp = _write(tmp_path, "field.nii.gz", field, A), _write(tmp_path, "mask.nii.gz", mask, A)
    scan = load_scan(fp, mp)
    np.testing.assert_allclose(scan.voxel_size, (0.8, 0.9, 2.0), rtol=1e-5)
    # canonical frame: x was flipped, so the B0 direction is that of the un-flipped affine
    np.testing.assert_allclose(scan.b0_direction, b0_from_affine(nib.as_closest_canonical(nib.load(fp)).affine))
    np.testing.assert_allclose(scan.field, field[::-1], atol=0)
    res = reconstruct(scan, "tkd")
    out = tmp_path / "sub-01_Chimap.nii.gz"
    save_result(res, out, scan=scan)
    img = nib.load(out)
    np.testing.assert_allclose(img.affine, A, atol=1e-5)          # source orientation and affine kept
    np.testing.assert_allclose(img.get_fdata()[::-1], res.chi, atol=1e-7)
    assert img.get_data_dtype() == np.float32
    side = json.loads(sidecar_path(out).read_text())
    assert side["method"] == "tkd" and side["parameters"]["threshold"] == 0.15 and side["units"] == "ppm"
    assert side["scan"]["fingerprint"] == scan.fingerprint()
    # inputs untouched
    np.testing.assert_array_equal(nib.load(fp).get_fdata(), field)


def test_sidecar_names(tmp_path):
    assert sidecar_path(tmp_path / "a_Chimap.nii.gz").name == "a_Chimap.json"
    assert sidecar_path(tmp_path / "b.nii").name == "b.json"


def test_4d_needs_echo(tmp_path, rng):
    A = np.diag([1, 1, 1, 1.0])
    data = rng.standard_normal((6, 6, 6, 3)).astype(np.float32)
    fp = _write(tmp_path, "f.nii.gz", data, A)
    mp = _write(tmp_path, "m.nii.gz", np.ones((6, 6, 6), np.uint8), A)
    with pytest.raises(ScanError, match="echo"):
        load_scan(fp, mp)
    s = load_scan(fp, mp, echo=2)
    np.testing.assert_allclose(s.field, data[..., 2])
    with pytest.raises(ScanError, match="out of range"):
        load_scan(fp, mp, echo=5)


def test_unreadable_and_missing(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all" * 10)
    with pytest.raises(NiftiError, match="field: cannot read"):
        read_volume(bad, "field")
    with pytest.raises(NiftiError, match="mask: file not found"):
        read_volume(tmp_path / "nope.nii.gz", "mask")
    # truncated gzip
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.eye(4)), str(good))
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(good.read_bytes()[:200])
    with pytest.raises(NiftiError, match="cannot read"):
        read_volume(trunc, "field")


def test_mask_mismatch(tmp_path):
    A = np.eye(4)
    fp = _write(tmp_path, "f.nii.gz", np.zeros((6, 6, 6), np.float32), A)
    mp = _write(tmp_path, "m.nii.gz", np.ones((6, 6, 5), np.uint8), A)
    with pytest.raises(ScanError, match="mask: shape"):
        load_scan(fp, mp)


def test_output_path_guard(tmp_path):
    fp = tmp_path / "f.nii.gz"
    with pytest.raises(ScanError, match="also an input"):
        check_output_path(fp, [fp])
    with pytest.raises(ScanError, match=r"\.nii"):
        check_output_path(tmp_path / "out.txt", [])
    with pytest.raises(ScanError, match="does not exist"):
        check_output_path(tmp_path / "missing" / "o.nii.gz", [])


def test_save_volume_atomic_no_leftovers(tmp_path):
    save_volume(np.zeros((4, 4, 4)), tmp_path / "x.nii.gz", np.eye(4), provenance={"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.nii.gz"]
