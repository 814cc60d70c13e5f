"""Command line geometry: user voxel size / B0 in the file's stored voxel order, COSMOS from registered
files with each orientation's B0 (sidecar, registration matrix, explicit), --csf-mask, B0/TE provenance."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main
from napari_qsm.core.dipole import forward_field
from napari_qsm.core.io import load_scan, sidecar_path, voxel_sizes
from napari_qsm.methods import reconstruct
from napari_qsm.core.metrics import nrmse_demeaned

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rotation(A):
    return A[:3, :3] / voxel_sizes(A)


def save_stored(path, data_can, A_can, axcodes):
    """Write a canonical-frame array as a file stored along ``axcodes`` (e.g. P, S, L); returns the stored affine."""
    img = nib.Nifti1Image(np.asarray(data_can), A_can)
    img = img.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(A_can),
                                                            nib.orientations.axcodes2ornt(axcodes)))
    nib.save(img, str(path))
    back = nib.as_closest_canonical(nib.load(str(path)))
    np.testing.assert_allclose(back.affine, A_can, atol=1e-6)            # the test's own bookkeeping
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(data_can))
    return img.affine


@pytest.fixture(scope="module")
def cosmos_files(tmp_path_factory):
    """Three orientations of one phantom head on one registered grid, stored P-S-L (permuted and flipped),
    all files with the common grid's header; each orientation's B0 known in the world frame."""
    from napari_qsm.core.sim.phantom import make_phantom

    d = tmp_path_factory.mktemp("cosmos")
    vs = (3.5, 3.5, 3.5)
    ph = make_phantom((40, 48, 40), vs, seed=7, snr=None, device="cpu")
    A_can = affine(rot("x", 8), vs, (-70, -84, -60))
    Rc = rotation(A_can)
    z = np.array([0.0, 0.0, 1.0])
    M2, M3 = rot("x", -25), rot("y", 28)              # head rotations of orientations 2 and 3 (registration)
    world = [z, M2 @ z, M3 @ z]                       # B0 in the common world frame (mm, RAS)
    dirs = [np.linalg.solve(Rc, w) for w in world]    # ... in the canonical voxel frame
    codes = ("P", "S", "L")
    paths = {}
    for i, dvec in enumerate(dirs, start=1):
        f = forward_field(ph.chi, vs, dvec, device="cpu")
        paths[f"f{i}"] = d / f"sub-01_acq-o{i}_field.nii.gz"
        A_st = save_stored(paths[f"f{i}"], f.astype(np.float32), A_can, codes)
    paths["mask"] = d / "mask.nii.gz"
    save_stored(paths["mask"], ph.mask.astype(np.uint8), A_can, codes)
    Rs = rotation(A_st)
    # orientation 2: B0 along the stored voxel axes; orientation 3: the rigid registration (with a shift)
    b2_file = np.linalg.solve(Rs, world[1])
    T3 = np.eye(4)
    T3[:3, :3], T3[:3, 3] = M3, (3.0, -5.0, 2.0)
    sidecar_path(paths["f2"]).write_text(json.dumps({"B0Direction": b2_file.tolist()}))
    sidecar_path(paths["f3"]).write_text(json.dumps({"RegistrationMatrix": T3.tolist(),
                                                     "MagneticFieldStrength": 2.89}))
    return ph, dirs, paths, b2_file


def test_cosmos_cli_registered_orientations_from_sidecars(cosmos_files, tmp_path):
    ph, dirs, p, _ = cosmos_files
    out = tmp_path / "cosmos_Chimap.nii.gz"
    rc = main(["recon", str(p["f1"]), "--mask", str(p["mask"]), "--method", "cosmos", "--device", "cpu", "-q",
               "--orientation", str(p["f2"]), "--orientation", str(p["f3"]), "-o", str(out)])
    assert rc == 0
    side = json.loads(sidecar_path(out).read_text())
    np.testing.assert_allclose(side["extras"]["b0_directions"], dirs, atol=1e-5)
    assert side["extras"]["b0_sources"] == ["header", "sidecar B0Direction", "sidecar RegistrationMatrix"]
    chi = np.asarray(nib.as_closest_canonical(nib.load(out)).dataobj)
    e = nrmse_demeaned(chi, ph.chi, ph.mask)
    assert e < 8.0, e                           # noise-free, three distinct B0: COSMOS recovers χ


def test_cosmos_cli_explicit_direction_wins_and_registered_headers_alone_fail(cosmos_files, tmp_path, capsys):
    ph, dirs, p, b2_file = cosmos_files
    out = tmp_path / "o.nii.gz"
    # explicit X Y Z (stored voxel order) for orientation 2, over a wrong sidecar value
    wrong = tmp_path / "f2.nii.gz"
    wrong.write_bytes(p["f2"].read_bytes())
    sidecar_path(wrong).write_text(json.dumps({"B0Direction": [1, 0, 0]}))
    rc = main(["recon", str(p["f1"]), "--mask", str(p["mask"]), "--method", "cosmos", "--device", "cpu", "-q",
               "--param", "refine=2", "--orientation", str(wrong), *map(str, b2_file),
               "--orientation", str(p["f3"]), "-o", str(out)])
    assert rc == 0
    side = json.loads(sidecar_path(out).read_text())
    np.testing.assert_allclose(side["extras"]["b0_directions"], dirs, atol=1e-5)
    assert side["extras"]["b0_sources"][1] == "argument"
    # registered files with the common grid's header and no B0 record: refused, with the remedy named
    bare = tmp_path / "bare.nii.gz"
    bare.write_bytes(p["f3"].read_bytes())
    out2 = tmp_path / "o2.nii.gz"
    capsys.readouterr()
    rc = main(["recon", str(p["f1"]), "--mask", str(p["mask"]), "--method", "cosmos", "--device", "cpu",
               "--orientation", str(bare), "-o", str(out2)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("napari-qsm: error:") and "B0Direction" in err, err
    assert not out2.exists() and not sidecar_path(out2).exists()


@pytest.mark.parametrize("geom", ["sagittal", "oblique_sagittal_lps"])
def test_voxel_size_and_b0_dir_follow_the_file_order(tmp_path, geom):
    """A file stored 1x1x3 mm with slices along stored k. Recon from a header with the right sizes must equal
    recon from a header without them plus --voxel-size / --b0-dir read off the stored axes."""
    from napari_qsm.core.sim.phantom import make_phantom

    if geom == "sagittal":        # i -> posterior, j -> superior, k -> right
        R = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float)
    else:                         # oblique sagittal, k -> left (flipped), tilted about x and y
        R = rot("x", 18) @ rot("y", -11) @ np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0]], float)
    vs_file = (1.0, 1.0, 3.0)
    A_true = affine(R, vs_file, (20, -30, 10))
    A_bare = affine(R, (1.0, 1.0, 1.0), (20, -30, 10))
    vs_can = tuple(voxel_sizes(nib.as_closest_canonical(nib.Nifti1Image(np.zeros((2, 2, 2)), A_true)).affine))
    assert vs_can != vs_file
    ph = make_phantom(tuple(int(round(60 / v)) for v in vs_can), vs_can, seed=3, snr=None, device="cpu")
    Rc = rotation(nib.as_closest_canonical(nib.Nifti1Image(np.zeros((2, 2, 2)), A_true)).affine)
    w = rot("y", 15) @ np.array([0.0, 0.0, 1.0])      # a tilted B0 (world), not the header's
    b_can = np.linalg.solve(Rc, w)
    b_file = np.linalg.solve(R, w)                    # what a user reads off the stored axes
    field = forward_field(ph.chi, vs_can, b_can, device="cpu").astype(np.float32)
    A_can_true = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((2, 2, 2)), A_true)).affine
    codes = nib.aff2axcodes(A_true)
    fp_true, mp_true = tmp_path / "true_field.nii.gz", tmp_path / "true_mask.nii.gz"
    save_stored(fp_true, field, A_can_true, codes)
    save_stored(mp_true, ph.mask.astype(np.uint8), A_can_true, codes)
    # same stored arrays, header without voxel sizes
    fp_bare, mp_bare = tmp_path / "bare_field.nii.gz", tmp_path / "bare_mask.nii.gz"
    for src, dst in ((fp_true, fp_bare), (mp_true, mp_bare)):
        nib.save(nib.Nifti1Image(np.asarray(nib.load(src).dataobj), A_bare), str(dst))
    o_true, o_user = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert main(["recon", str(fp_true), "--mask", str(mp_true), "--method", "tkd", "-q", "--device", "cpu",
                 "--b0-dir", *map(str, b_file), "-o", str(o_true)]) == 0
    assert main(["recon", str(fp_bare), "--mask", str(mp_bare), "--method", "tkd", "-q", "--device", "cpu",
                 "--voxel-size", *map(str, vs_file), "--b0-dir", *map(str, b_file), "-o", str(o_user)]) == 0
    s_user = json.loads(sidecar_path(o_user).read_text())["scan"]
    np.testing.assert_allclose(s_user["voxel_size"], vs_can, atol=1e-6)
    np.testing.assert_allclose(s_user["b0_direction"], b_can, atol=1e-5)
    a = np.asarray(nib.load(o_true).dataobj)
    b = np.asarray(nib.load(o_user).dataobj)
    np.testing.assert_allclose(b, a, atol=1e-6)
    # and the map is physically right: TKD of the field with the true geometry, not a permuted one
    chi = np.asarray(nib.as_closest_canonical(nib.load(o_user)).dataobj)
    assert nrmse_demeaned(chi, ph.chi, ph.mask) < 60


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    from napari_qsm.core.sim.phantom import make_phantom, save_phantom

    ph = make_phantom((32, 36, 32), (4.0, 4.0, 4.0), seed=5, snr=None, device="cpu")
    return ph, save_phantom(ph, tmp_path_factory.mktemp("small"))


def test_csf_mask_reaches_medi_and_bad_use_is_refused(small_phantom, tmp_path, capsys):
    ph, paths = small_phantom
    csf = np.zeros(ph.mask.shape, np.uint8)
    csf[14:18, 16:20, 14:18] = 1
    csf &= ph.mask.astype(np.uint8)
    assert csf.sum() > 10
    cp = tmp_path / "csf.nii.gz"
    nib.save(nib.Nifti1Image(csf, ph.affine), str(cp))
    params = ["--param", "max_iter=2", "--param", "cg_max_iter=15", "--param", "lambda_csf=100"]
    out = tmp_path / "medi0.nii.gz"
    rc = main(["recon", str(paths["field"]), "--mask", str(paths["mask"]), "--magnitude", str(paths["magnitude"]),
               "--method", "medi", "--csf-mask", str(cp), "-q", "--device", "cpu", *params, "-o", str(out)])
    assert rc == 0
    scan = load_scan(paths["field"], paths["mask"], paths["magnitude"])
    p = {"max_iter": 2, "cg_max_iter": 15, "lambda_csf": 100}
    with_csf = reconstruct(scan, "medi", p, device="cpu", csf_mask=csf > 0).chi
    without = reconstruct(scan, "medi", p, device="cpu").chi
    got = np.asarray(nib.as_closest_canonical(nib.load(out)).dataobj)
    np.testing.assert_allclose(got, with_csf, atol=1e-5)
    assert np.abs(with_csf - without).max() > 1e-3        # the CSF term changed the map
    # a method without a CSF term refuses it; nothing written
    out2 = tmp_path / "tkd.nii.gz"
    capsys.readouterr()
    rc = main(["recon", str(paths["field"]), "--mask", str(paths["mask"]), "--method", "tkd",
               "--csf-mask", str(cp), "-o", str(out2)])
    assert rc == 2 and "--csf-mask" in capsys.readouterr().err and not out2.exists()
    # a CSF mask on another grid is refused
    bad = tmp_path / "csf_bad.nii.gz"
    nib.save(nib.Nifti1Image(csf[:-1], ph.affine), str(bad))
    rc = main(["recon", str(paths["field"]), "--mask", str(paths["mask"]), "--method", "medi", *params,
               "--csf-mask", str(bad), "-o", str(out2)])
    assert rc == 2 and "csf-mask: shape" in capsys.readouterr().err and not out2.exists()


def test_b0_and_te_from_sidecar_convert_and_are_recorded(tmp_path):
    """A field in Hz with a BIDS sidecar (2.89 T): converted with the sidecar's B0, recorded in provenance."""
    rng = np.random.default_rng(0)
    A = affine(np.eye(3), (1.0, 1.0, 1.0))
    ppm = (rng.standard_normal((12, 12, 12)) * 0.05).astype(np.float32)
    hz = ppm * 42.577478 * 2.89
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(hz, A), str(fp))
    nib.save(nib.Nifti1Image(np.ones(ppm.shape, np.uint8), A), str(mp))
    sidecar_path(fp).write_text(json.dumps({"MagneticFieldStrength": 2.89, "EchoTime": 0.0185}))
    out = tmp_path / "chi.nii.gz"
    assert main(["recon", str(fp), "--mask", str(mp), "--method", "tkd", "--units", "hz", "-q", "-o", str(out)]) == 0
    side = json.loads(sidecar_path(out).read_text())["scan"]
    assert side["b0_tesla"] == 2.89 and side["te"] == 0.0185
    assert side["source"]["b0_tesla_source"] == "sidecar MagneticFieldStrength"
    ref = tmp_path / "ppm.nii.gz"
    nib.save(nib.Nifti1Image(ppm, A), str(ref))
    out2 = tmp_path / "chi2.nii.gz"
    assert main(["recon", str(ref), "--mask", str(mp), "--method", "tkd", "-q", "-o", str(out2)]) == 0
    np.testing.assert_allclose(nib.load(out).get_fdata(), nib.load(out2).get_fdata(), atol=1e-6)


def _scan_has_r2star():
    from napari_qsm.core.scan import Scan
    return "r2star" in getattr(Scan, "__dataclass_fields__", {})
from qsm_test_geometry import affine, rot


@pytest.mark.skipif(not _scan_has_r2star(), reason="Scan has no r2star field yet")
def test_r2star_reaches_medi_csf_auto(small_phantom, tmp_path):
    """--r2star: MEDI+0 (csf=auto) derives its CSF mask from R2* (< 5 1/s), not from the magnitude."""
    ph, paths = small_phantom
    r2 = np.full(ph.mask.shape, 25.0, np.float32)
    r2[13:19, 15:21, 13:19] = 2.0                     # a central low-R2* (CSF-like) block
    rp = tmp_path / "r2s.nii.gz"
    nib.save(nib.Nifti1Image(r2, ph.affine), str(rp))
    out = tmp_path / "medi0.nii.gz"
    rc = main(["recon", str(paths["field"]), "--mask", str(paths["mask"]), "--magnitude", str(paths["magnitude"]),
               "--r2star", str(rp), "--method", "medi", "--param", "csf=auto", "--param", "max_iter=1",
               "--param", "cg_max_iter=10", "-q", "--device", "cpu", "-o", str(out)])
    assert rc == 0
    side = json.loads(sidecar_path(out).read_text())
    assert side["extras"]["csf_source"] == "derived from R2*"
    assert side["scan"]["source"]["r2star"] == str(rp.resolve())


def test_metrics_b0_dir_follows_the_file_order(small_phantom, tmp_path, capsys):
    """metrics --field F --b0-dir: components along F's stored axes; giving the header's own stored-frame B0
    must reproduce the header-derived field residual (a sagittal file permutes and flips the axes)."""
    ph, _ = small_phantom
    R = np.array([[0, 0, 1], [-1, 0, 0], [0, 1, 0]], float)
    A_st = affine(R, ph.voxel_size)
    A_can = nib.as_closest_canonical(nib.Nifti1Image(np.zeros((2, 2, 2)), A_st)).affine
    codes = nib.aff2axcodes(A_st)
    field = forward_field(ph.chi, ph.voxel_size, np.linalg.solve(rotation(A_can), [0, 0, 1.0]), device="cpu")
    p = {k: tmp_path / f"{k}.nii.gz" for k in ("field", "chi", "mask")}
    save_stored(p["field"], field.astype(np.float32), A_can, codes)
    save_stored(p["chi"], ph.chi.astype(np.float32), A_can, codes)
    save_stored(p["mask"], ph.mask.astype(np.uint8), A_can, codes)

    def residual(*extra):
        capsys.readouterr()
        assert main(["metrics", str(p["chi"]), "--mask", str(p["mask"]), "--field", str(p["field"]), "--json",
                     *extra]) == 0
        return json.loads(capsys.readouterr().out)["field_residual"]

    r_header = residual()
    b_file = np.linalg.solve(R, [0, 0, 1.0])          # scanner z along the stored axes: (0, 1, 0)
    assert residual("--b0-dir", *map(str, b_file)) == pytest.approx(r_header, rel=1e-6, abs=1e-9)
    assert residual("--b0-dir", "0", "0", "1") > r_header + 1e-3   # another direction fits worse
