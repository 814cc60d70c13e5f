"""NIfTI I/O, geometry (affine -> voxel size and B0 direction) and unit conversion."""

import json
import math

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.core.io import (GAMMA_BAR_MHZ_PER_T, NiftiError, b0_direction_in_file, b0_from_affine,
                                check_output_path, direction_to_canonical, from_ppm, load_orientation, load_scan,
                                read_volume, save_result, save_volume, sidecar_path, sizes_to_canonical, to_ppm,
                                voxel_sizes)
from napari_qsm.methods import reconstruct
from napari_qsm.core.scan import ScanError
from qsm_test_geometry import affine, rot


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
    R = rot("x", 15) @ rot("y", 10)
    A = affine(R, (0.8, 0.9, 2.0), (-30, 12, 5))
    A[:3, 0] *= -1
    field = rng.standard_normal((14, 12, 9)).astype(np.float32) * 0.05
    mask = np.zeros(field.shape, np.uint8)
    mask[2:-2, 2:-2, 1:-1] = 1
    fp, mp = _write(tmp_path, "field.nii.gz", field, A), _write(tmp_path, "mask.nii.gz", mask, A)
    scan = load_scan(fp, mp)
    np.testing.assert_allclose(scan.voxel_size, (0.8, 0.9, 2.0), rtol=1e-5)
    # canonical frame = the un-flipped rotation R; scanner z in its voxel axes is R's third row
    # (R⁻¹ = Rᵀ). Its x component is nonzero, so the flip of axis i must flip it back.
    assert abs(R[2, 0]) > 0.1
    np.testing.assert_allclose(scan.b0_direction, R[2, :], atol=1e-6)
    np.testing.assert_allclose(b0_from_affine(A), R[2, :] * [-1, 1, 1], atol=1e-9)  # stored frame: i reversed
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


def test_4d_magnitude_without_echo_is_the_first_echo(tmp_path, rng):
    """Not a root sum of squares: MEDI's gradient mask and the edge prior see echo 1's contrast."""
    A = np.diag([1, 1, 1, 1.0])
    decay = np.exp(-np.arange(4) * 0.5).astype(np.float32)
    mag = (rng.uniform(0.5, 1.0, (6, 6, 6, 1)) * decay).astype(np.float32)
    fp = _write(tmp_path, "f.nii.gz", rng.standard_normal((6, 6, 6)).astype(np.float32), A)
    mp = _write(tmp_path, "m.nii.gz", np.ones((6, 6, 6), np.uint8), A)
    gp = _write(tmp_path, "mag.nii.gz", mag, A)
    np.testing.assert_allclose(load_scan(fp, mp, gp).magnitude, mag[..., 0], rtol=1e-6)
    np.testing.assert_allclose(load_scan(fp, mp, gp, echo=2).magnitude, mag[..., 2], rtol=1e-6)


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


# Stored (on-disk) axis orders: sagittal stored i -> -y (posterior), j -> z, k -> x; an oblique sagittal
# with a flipped axis; an LPS-like oblique axial; a coronal.
SAG_FLIP = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float)
GEOMETRIES = {
    "sagittal": SAG_FLIP,
    "oblique_sagittal": rot("x", 20) @ rot("y", -12) @ SAG_FLIP,
    "oblique_lps": rot("z", 8) @ rot("x", 15) @ np.diag([-1.0, -1.0, 1.0]),
    "coronal": CORONAL,
}


@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_file_order_to_canonical_agrees_with_world(geom):
    """A vector given along the stored voxel axes is a physical direction w = R_stored·v; in the canonical
    frame it must be R_can⁻¹·w. Sizes follow the axes. Independent of the permutation bookkeeping."""
    vs = (0.7, 1.1, 3.0)
    A = affine(GEOMETRIES[geom], vs, (10, -20, 5))
    Ac = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), A)).affine
    Rs, Rc = A[:3, :3] / voxel_sizes(A), Ac[:3, :3] / voxel_sizes(Ac)
    v = np.array([0.3, -0.5, 0.81])
    np.testing.assert_allclose(direction_to_canonical(v, A), np.linalg.solve(Rc, Rs @ v), atol=1e-9)
    np.testing.assert_allclose(sizes_to_canonical(vs, A), voxel_sizes(Ac), atol=1e-9)
    # and scanner z: stored-frame B0 maps onto the canonical-frame B0
    np.testing.assert_allclose(direction_to_canonical(b0_from_affine(A), A), b0_from_affine(Ac), atol=1e-9)


def test_user_geometry_is_in_file_order(tmp_path, rng):
    """Sagittal file stored 1x1x3 mm (slices along stored k = x): user voxel size and B0 in the stored
    order become (3, 1, 1) and the hand-derived canonical direction."""
    A = affine(SAG_FLIP, (1.0, 1.0, 1.0))       # header without the right sizes: the user gives them
    field = rng.standard_normal((10, 8, 6)).astype(np.float32) * 0.05
    mask = np.ones(field.shape, np.uint8)
    fp, mp = _write(tmp_path, "f.nii.gz", field, A), _write(tmp_path, "m.nii.gz", mask, A)
    s = load_scan(fp, mp, voxel_size=(1.0, 1.0, 3.0), b0_direction=(0.6, 0.8, 0.0))
    # canonical x <- stored k, y <- stored i reversed (i runs posterior), z <- stored j
    np.testing.assert_allclose(s.voxel_size, (3.0, 1.0, 1.0))
    np.testing.assert_allclose(s.b0_direction, (0.0, -0.6, 0.8), atol=1e-12)
    assert s.source["b0_direction_source"] == "argument"
    c = load_scan(fp, mp, voxel_size=(3.0, 1.0, 1.0), b0_direction=(0.0, -0.6, 0.8), frame="canonical")
    assert c.voxel_size == s.voxel_size
    np.testing.assert_allclose(c.b0_direction, s.b0_direction)


def test_b0_precedence_sidecar_and_registration(tmp_path, rng):
    A = affine(rot("x", 10), (1.0, 1.2, 1.5))
    A[:3, 0] *= -1
    field = rng.standard_normal((8, 8, 8)).astype(np.float32) * 0.05
    fp = _write(tmp_path, "f.nii.gz", field, A)
    mp = _write(tmp_path, "m.nii.gz", np.ones(field.shape, np.uint8), A)
    b, src = b0_direction_in_file(A, {})
    assert src == "header"
    np.testing.assert_allclose(b, b0_from_affine(A))
    b, src = b0_direction_in_file(A, {"B0Direction": [0, 2, 0]})
    assert src == "sidecar B0Direction"
    np.testing.assert_allclose(b, (0, 1, 0))
    # registration: acquisition with the head turned 30° about scanner y; world B0 in the common frame = M·z
    M = np.eye(4)
    M[:3, :3] = rot("y", 30)
    M[:3, 3] = (4, -2, 7)
    b, src = b0_direction_in_file(A, {"RegistrationMatrix": M.tolist(), "B0Direction": [1, 0, 0]})
    assert src == "sidecar B0Direction"                       # B0Direction wins
    b, src = b0_direction_in_file(A, {"RegistrationMatrix": M.tolist()})
    assert src == "sidecar RegistrationMatrix"
    Rs = A[:3, :3] / voxel_sizes(A)
    np.testing.assert_allclose(Rs @ b, (np.sin(np.radians(30)), 0, np.cos(np.radians(30))), atol=1e-9)
    b, src = b0_direction_in_file(A, {"RegistrationMatrix": M.tolist()}, explicit=(0, 0, 5))
    assert src == "argument"
    np.testing.assert_allclose(b, (0, 0, 1))
    with pytest.raises(ScanError, match="RegistrationMatrix"):
        b0_direction_in_file(A, {"AcquisitionAffine": np.eye(4).tolist()})
    with pytest.raises(ScanError, match="B0Direction"):
        b0_direction_in_file(A, {"B0Direction": [0, 0]})
    with pytest.raises(ScanError, match="4x4"):
        b0_direction_in_file(A, {"RegistrationMatrix": [[1, 0], [0, 1]]})
    # load_scan reads the sidecar next to the field, with BIDS B0 / TE
    sidecar_path(fp).write_text(json.dumps({"B0Direction": [0, 0.6, 0.8], "MagneticFieldStrength": 2.89,
                                            "EchoTime": 0.0201}))
    s = load_scan(fp, mp)
    np.testing.assert_allclose(s.b0_direction, direction_to_canonical((0, 0.6, 0.8), A))
    assert (s.b0_tesla, s.te) == (2.89, 0.0201)
    assert s.source["b0_direction_source"] == "sidecar B0Direction"
    assert s.source["b0_tesla_source"] == "sidecar MagneticFieldStrength"
    # ImagingFrequency wins over the nominal field strength: a "3 T" Siemens is 123.2 MHz / γ̄ = 2.894 T
    sidecar_path(fp).write_text(json.dumps({"MagneticFieldStrength": 3, "ImagingFrequency": 123.2, "EchoTime": 0.02}))
    s = load_scan(fp, mp)
    assert s.b0_tesla == pytest.approx(123.2 / GAMMA_BAR_MHZ_PER_T, rel=1e-12)
    assert s.source["b0_tesla_source"] == "sidecar ImagingFrequency"
    s = load_scan(fp, mp, b0=7.0, sidecar=False)
    assert s.b0_tesla == 7.0 and s.te is None and s.source["b0_direction_source"] == "header"
    sidecar_path(fp).write_text(json.dumps({"EchoTime": 20}))
    with pytest.raises(ScanError, match="milliseconds"):
        load_scan(fp, mp)


def test_load_orientation_on_common_grid(tmp_path, rng):
    """Orientations share the reference's stored grid; each keeps its own B0 (explicit, sidecar or header),
    converted with the reference's canonical transform even if its own header is rotated."""
    A = affine(SAG_FLIP, (1.0, 1.0, 2.0))
    shape = (10, 8, 6)
    f1 = rng.standard_normal(shape).astype(np.float32)
    f2 = rng.standard_normal(shape).astype(np.float32)
    fp1, mp = _write(tmp_path, "f1.nii.gz", f1, A), _write(tmp_path, "m.nii.gz", np.ones(shape, np.uint8), A)
    ref = load_scan(fp1, mp)
    fp2 = _write(tmp_path, "f2.nii.gz", f2, A)
    o = load_orientation(fp2, ref, b0_direction=(1, 0, 0))
    np.testing.assert_allclose(o.field, nib.as_closest_canonical(nib.load(fp2)).get_fdata(), atol=0)
    np.testing.assert_allclose(o.b0_direction, (0, -1, 0), atol=1e-12)   # stored i = -y
    assert o.voxel_size == ref.voxel_size and np.array_equal(o.mask, ref.mask)
    # header of the acquisition: the same grid placed in a scanner frame turned 20° about x
    A3 = affine(rot("x", 20) @ SAG_FLIP, (1.0, 1.0, 2.0))
    fp3 = _write(tmp_path, "f3.nii.gz", f2, A3)
    o3 = load_orientation(fp3, ref)
    assert o3.source["b0_direction_source"] == "header"
    np.testing.assert_allclose(o3.field, o.field, atol=0)                  # same grid as the reference
    np.testing.assert_allclose(o3.b0_direction, direction_to_canonical(b0_from_affine(A3), A), atol=1e-12)
    bad = _write(tmp_path, "f4.nii.gz", f2[:-1], A)
    with pytest.raises(ScanError, match="stored shape"):
        load_orientation(bad, ref)
    bad = _write(tmp_path, "f5.nii.gz", f2, affine(SAG_FLIP, (1.0, 1.0, 2.5)))
    with pytest.raises(ScanError, match="voxel size"):
        load_orientation(bad, ref)


def test_saved_map_drops_source_display_range_and_intent(tmp_path, rng):
    """A phase source's cal_min/cal_max (-4096/4095), intent and description must not carry over to χ."""
    A = affine(rot("x", 12), (1.0, 1.0, 2.0))
    A[:3, 0] *= -1
    shape = (10, 9, 8)
    img = nib.Nifti1Image((rng.standard_normal(shape) * 1000).astype(np.int16), A)
    img.header["cal_min"], img.header["cal_max"] = -4096, 4095
    img.header.set_intent("estimate", name="phase")
    img.header["descrip"] = b"siemens phase"
    img.header.set_xyzt_units("mm", "sec")
    fp = tmp_path / "phase.nii.gz"
    nib.save(img, str(fp))
    mp = _write(tmp_path, "m.nii.gz", np.ones(shape, np.uint8), A)
    scan = load_scan(fp, mp, units="rad", te=0.02, b0=3.0)
    res = reconstruct(scan, "tkd")
    out = tmp_path / "chi.nii.gz"
    save_result(res, out, scan=scan)
    h = nib.load(out).header
    assert (float(h["cal_min"]), float(h["cal_max"])) == (0.0, 0.0)
    assert h.get_intent()[0] == "none" and h.get_intent()[2] == ""
    assert b"chi (ppm)" in bytes(h["descrip"]) and b"phase" not in bytes(h["descrip"])
    assert h.get_xyzt_units()[0] == "mm"
    assert h.get_data_dtype() == np.float32 and h.get_slope_inter() in ((1.0, 0.0), (None, None))
    np.testing.assert_allclose(nib.load(out).affine, A, atol=1e-5)
    side = json.loads(sidecar_path(out).read_text())
    assert side["scan"]["b0_tesla"] == 3.0 and side["scan"]["te"] == 0.02


@pytest.mark.skipif("r2star" not in getattr(__import__("napari_qsm.core.scan", fromlist=["Scan"]).Scan,
                                            "__dataclass_fields__", {}), reason="Scan has no r2star field yet")
def test_noise_and_r2star_maps_on_the_field_grid(tmp_path, rng):
    A = affine(SAG_FLIP, (1.0, 1.0, 2.0))
    shape = (8, 7, 6)
    field = rng.standard_normal(shape).astype(np.float32)
    r2 = rng.uniform(1, 40, shape).astype(np.float32)
    ns = rng.uniform(0.01, 0.1, shape).astype(np.float32)
    fp, mp = _write(tmp_path, "f.nii.gz", field, A), _write(tmp_path, "m.nii.gz", np.ones(shape, np.uint8), A)
    rp, np_ = _write(tmp_path, "r2s.nii.gz", r2, A), _write(tmp_path, "n.nii.gz", ns, A)
    s = load_scan(fp, mp, r2star=rp, noise_std=np_)
    can = nib.orientations.apply_orientation
    ornt = nib.io_orientation(A)
    np.testing.assert_array_equal(s.field, can(field, ornt))
    np.testing.assert_array_equal(s.r2star, can(r2, ornt))            # same voxel order as the field
    np.testing.assert_array_equal(s.noise_std, can(ns, ornt))
    assert s.source["r2star"].endswith("r2s.nii.gz")
    other = _write(tmp_path, "r2_other.nii.gz", r2, affine(np.eye(3), (1.0, 1.0, 2.0)))
    with pytest.raises(ScanError, match="r2star: its affine differs"):
        load_scan(fp, mp, r2star=other)
    with pytest.raises(ScanError, match="noise_std: its affine differs"):
        load_scan(fp, mp, noise_std=other)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    """Atomic writes must not keep mkstemp's 0600: results get 0666 & ~umask like any new file."""
    import os
    import stat
    from napari_qsm.core.io import write_json

    old = os.umask(umask)
    try:
        save_volume(np.zeros((4, 4, 4)), tmp_path / "x.nii.gz", np.eye(4), provenance={"a": 1})
        write_json(tmp_path / "y.json", {"b": 2})
    finally:
        os.umask(old)
    for name in ("x.nii.gz", "x.json", "y.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("text,what", [("[1, 2, 3]", "JSON array"), ('"B0"', "JSON string"),
                                       ("{not json", "cannot read")])
def test_one_sidecar_policy_names_the_file(tmp_path, text, what):
    """A sidecar that is not a JSON object: SidecarError (a ScanError) naming the file, or, where the caller
    says the sidecar is optional, ignored with a warning naming the file; a missing sidecar is {}."""
    from napari_qsm.core.io import SidecarError, read_json_object, read_sidecar

    nii = tmp_path / "sub-01_echo-1_part-phase_MEGRE.nii.gz"
    side = sidecar_path(nii)
    assert read_sidecar(nii, "phase 1") == {} and read_json_object(side, "phase 1", optional=True) == {}
    side.write_text(text)
    for read in (lambda **k: read_sidecar(nii, "phase 1", **k), lambda **k: read_json_object(side, "phase 1", **k)):
        with pytest.raises(SidecarError, match=rf"phase 1: .*{what}") as err:
            read()
        assert isinstance(err.value, ScanError) and str(side) in str(err.value)
        with pytest.warns(UserWarning, match=rf"{side.name}.*ignored"):
            assert read(optional=True) == {}
    side.write_text('{"EchoTime": 0.004}')
    assert read_sidecar(nii, "phase 1") == {"EchoTime": 0.004}


def test_load_scan_refuses_a_sidecar_holding_an_array(tmp_path):
    A = np.eye(4)
    fp = _write(tmp_path, "field.nii.gz", np.zeros((8, 8, 8), np.float32), A)
    m = np.zeros((8, 8, 8), np.uint8)
    m[2:6, 2:6, 2:6] = 1
    mp = _write(tmp_path, "mask.nii.gz", m, A)
    sidecar_path(fp).write_text("[]")
    with pytest.raises(ScanError, match=r"field: JSON sidecar .*field\.json must hold an object"):
        load_scan(fp, mp)
    assert load_scan(fp, mp, sidecar=False).shape == (8, 8, 8)


def test_weights_card_that_is_not_an_object_is_ignored_with_a_warning(tmp_path):
    """read_card used to return a JSON array as it was (callers then call .get on a list)."""
    from napari_qsm.nn.infer import card_path, read_card

    w = tmp_path / "site.pt"
    card_path(w).write_text("[1, 2]")
    with pytest.warns(UserWarning, match="site.json"):
        assert read_card(w) == {}


def test_scan_nifti_info_is_a_declared_field(tmp_path):
    """load_scan / load_orientation fill Scan.nifti_info (a dataclass field, not an attribute set from outside)."""
    import dataclasses

    from napari_qsm.core.scan import Scan

    assert "nifti_info" in {f.name for f in dataclasses.fields(Scan)}
    R = rot("x", 20)
    A = affine(R, (1.0, 1.2, 2.0), (3, -4, 5))
    A[:3, 0] *= -1
    fp = _write(tmp_path, "field.nii.gz", np.zeros((8, 9, 6), np.float32), A)
    m = np.zeros((8, 9, 6), np.uint8)
    m[2:6, 2:6, 2:4] = 1
    scan = load_scan(fp, _write(tmp_path, "mask.nii.gz", m, A))
    assert scan.nifti_info["path"] == str(fp.resolve())
    np.testing.assert_allclose(scan.nifti_info["original_affine"], A)
    assert scan._nifti_info is scan.nifti_info               # old private name still reads it
    other = load_orientation(_write(tmp_path, "field2.nii.gz", np.zeros((8, 9, 6), np.float32), A), scan)
    assert other.nifti_info is scan.nifti_info
    copy = dataclasses.replace(scan, te=0.01)                # a declared field travels with the scan
    assert copy.nifti_info is scan.nifti_info
    assert Scan(field=scan.field, mask=scan.mask).nifti_info is None


@pytest.mark.parametrize("scaled", [False, True])
def test_load_image_decodes_a_nii_gz_once(tmp_path, monkeypatch, scaled):
    """load_image reads the data (a corrupt file fails there); the caller's first read of the whole array
    gets those data instead of decompressing the file again, with the same values (header scaling
    included); a later read reads the file again (a caller may have changed its array in place)."""
    import nibabel as nib
    import nibabel.arrayproxy as ap
    from napari_qsm.core.io.nifti import load_image, read_volume
    rng = np.random.default_rng(0)
    data = rng.integers(-2000, 2000, (9, 8, 7)).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.0, 2.0, 1.0]))
    if scaled:
        img.header.set_slope_inter(0.25, -3.0)
    p = tmp_path / "x.nii.gz"
    nib.save(img, str(p))
    expect = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    reads = []
    real = ap.array_from_file
    monkeypatch.setattr(ap, "array_from_file", lambda *a, **k: reads.append(1) or real(*a, **k))
    got = load_image(p)
    first = np.asarray(got.dataobj, dtype=np.float32)
    assert len(reads) == 1
    np.testing.assert_array_equal(first, expect)
    np.testing.assert_array_equal(np.asarray(got.dataobj, dtype=np.float32), expect)
    assert len(reads) == 2
    vol, _, _ = read_volume(p)
    assert len(reads) == 3                         # read_volume: one decode (it was two)
    np.testing.assert_array_equal(vol, np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj, np.float32))
