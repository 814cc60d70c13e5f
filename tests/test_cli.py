"""The command line: phantom -> recon -> metrics, and every bad input exits non-zero writing nothing."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main

METRIC_NAMES = ["psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "correlation"]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ph")
    assert main(["phantom", str(d), "--shape", "48", "56", "48", "--voxel-size", "3", "3", "3", "--seed", "2",
                 "--snr", "60", "--oblique", "10"]) == 0
    return d


def test_phantom_recon_metrics(phantom_dir, tmp_path, capsys):
    d = phantom_dir
    out = tmp_path / "tkd_Chimap.nii.gz"
    rc = main(["recon", str(d / "field.nii.gz"), "--mask", str(d / "mask.nii.gz"), "--method", "tkd",
               "--param", "threshold=0.2", "-o", str(out)])
    assert rc == 0 and out.exists() and (tmp_path / "tkd_Chimap.json").exists()
    side = json.loads((tmp_path / "tkd_Chimap.json").read_text())
    assert side["parameters"]["threshold"] == 0.2
    # B0 direction read from the phantom's oblique affine
    info = json.loads((d / "phantom.json").read_text())
    np.testing.assert_allclose(side["scan"]["b0_direction"], info["b0_direction"], atol=1e-5)
    capsys.readouterr()
    rc = main(["metrics", str(out), str(d / "chi.nii.gz"), "--mask", str(d / "mask.nii.gz"),
               "--field", str(d / "field.nii.gz"), "--json"])
    assert rc == 0
    vals = json.loads(capsys.readouterr().out)
    assert list(vals) == METRIC_NAMES + ["field_residual"]
    assert 10 < vals["nrmse"] < 80 and 0 < vals["ssim"] <= 1


def test_console_script_runs(phantom_dir, tmp_path):
    d = phantom_dir
    p = subprocess.run([sys.executable, "-m", "napari_qsm.cli", "recon", str(d / "field.nii.gz"), "--mask",
                        str(d / "mask.nii.gz"), "--method", "tsvd", "-o", str(tmp_path / "x.nii.gz")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "TSVD" in p.stderr  # progress / summary on stderr


def _files(tmp_path, field, mask, affine=None):
    A = np.eye(4) if affine is None else affine
    fp, mp = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(field, np.float32), A), str(fp))
    nib.save(nib.Nifti1Image(np.asarray(mask, np.uint8), A), str(mp))
    return fp, mp


def _mask(shape=(12, 12, 12)):
    m = np.zeros(shape, np.uint8)
    m[3:9, 3:9, 3:9] = 1
    return m


@pytest.mark.parametrize("case,match", [
    ("nan", "field: 1 NaN/Inf voxels inside the mask"),
    ("shape", "mask: shape"),
    ("empty", "mask: empty"),
    ("4d", "choose one with --echo"),
    ("hz", "B0 in tesla"),
    ("rad", "TE"),
    ("corrupt", "field: cannot read"),
    ("voxel", "voxel_size"),
    ("same", "also an input"),
    ("method", "unknown method"),
    ("param", "unknown parameter"),
    ("range", "above the maximum"),
])
def test_bad_inputs_exit_nonzero_and_write_nothing(tmp_path, capsys, case, match):
    field = np.zeros((12, 12, 12), np.float32)
    mask = _mask()
    extra = []
    method = ["--method", "tkd"]
    if case == "nan":
        field[5, 5, 5] = np.nan
    if case == "shape":
        mask = np.ones((12, 12, 11))
    if case == "empty":
        mask = np.zeros_like(mask)
    if case == "4d":
        field = np.zeros((12, 12, 12, 3), np.float32)
    fp, mp = _files(tmp_path, field, mask)
    if case == "hz":
        extra = ["--units", "hz"]
    if case == "rad":
        extra = ["--units", "rad", "--b0", "3"]
    if case == "corrupt":
        fp.write_bytes(b"\x1f\x8b garbage")
    if case == "voxel":
        extra = ["--voxel-size", "1", "0", "1"]
    if case == "method":
        method = ["--method", "nope"]
    if case == "param":
        extra = ["--param", "bogus=1"]
    if case == "range":
        extra = ["--param", "threshold=5"]
    out = fp if case == "same" else tmp_path / "out.nii.gz"
    before = sorted(p.name for p in tmp_path.iterdir())
    before_bytes = fp.read_bytes()
    rc = main(["recon", str(fp), "--mask", str(mp), *method, *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc != 0
    assert match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written
    assert fp.read_bytes() == before_bytes                         # input untouched


def test_metrics_without_reference_or_field_fails(tmp_path, capsys):
    fp, mp = _files(tmp_path, np.zeros((8, 8, 8)), _mask((8, 8, 8)))
    assert main(["metrics", str(fp), "--mask", str(mp)]) == 2
    assert "REFERENCE" in capsys.readouterr().err


def test_warnings_are_the_commands_own_lines(tmp_path, capsys):
    """A NaN outside the mask is reported as 'napari-qsm: warning: ...', not '<string>:14: UserWarning: ...'."""
    import warnings

    field = np.zeros((8, 8, 8), np.float32)
    field[0, 0, 0] = np.nan
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:6, 2:6, 2:6] = 1
    fp, mp = _files(tmp_path, field, mask)
    before = warnings.showwarning
    assert main(["recon", str(fp), "--mask", str(mp), "--method", "tkd", "-o", str(tmp_path / "x.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "napari-qsm: warning: field: 1 NaN/Inf voxels outside the mask were set to 0" in err
    assert "UserWarning" not in err and "<string>" not in err
    assert warnings.showwarning is before  # restored for in-process callers
    assert "TKD δ=0.15:" in err and "-> " in err


def test_phantom_raw_writes_bids_megre_and_truth(tmp_path, capsys):
    """`phantom --raw`: a BIDS MEGRE folder the loader reads back (Siemens phase integers) and the truth."""
    from napari_qsm.core.field.load import load_echoes

    d = tmp_path / "raw"
    assert main(["phantom", str(d), "--raw", "--phase-units", "siemens", "--shape", "40", "48", "40",
                 "--voxel-size", "4", "4", "4", "--seed", "1"]) == 0
    anat = d / "sub-phantom" / "anat"
    mags = sorted(anat.glob("*_part-mag_MEGRE.nii.gz"))
    phs = sorted(anat.glob("*_part-phase_MEGRE.nii.gz"))
    assert len(mags) == len(phs) == 5
    side = json.loads((anat / "sub-phantom_echo-2_part-phase_MEGRE.json").read_text())
    assert side["EchoTime"] == pytest.approx(0.008) and side["Manufacturer"] == "Siemens"
    assert side["ImagingFrequency"] == pytest.approx(3.0 * 42.577478, rel=1e-6)
    ph2 = np.asarray(nib.load(str(phs[1])).dataobj)
    assert ph2.dtype == np.int16 and ph2.min() >= -4096 and ph2.max() <= 4095 and ph2.max() > 3000
    e = load_echoes(d / "sub-phantom")
    assert e.n_echoes == 5 and e.te == pytest.approx((0.004, 0.008, 0.012, 0.016, 0.02))
    assert e.b0_tesla == pytest.approx(3.0) and e.vendor["phase_units"] == "siemens"
    for name in ("chi", "local_field", "total_field", "mask", "labels"):
        img = nib.load(str(d / "truth" / f"{name}.nii.gz"))
        assert img.shape == e.shape, name
    info = json.loads((d / "truth" / "phantom.json").read_text())
    assert info["background"] is True and info["snr"] == 50.0
    assert "truth_local_field" in capsys.readouterr().out
