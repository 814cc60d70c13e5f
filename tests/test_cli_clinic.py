"""`napari-qsm swi`, `dicom` and `report` end to end on a small raw head (4 mm, 5 echoes)."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main

pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def raw_head(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    assert main(["phantom", str(raw), "--raw", "--shape", "40", "48", "40", "--voxel-size", "4", "4", "4",
                 "--seed", "5"]) == 0
    return raw


def test_swi_then_dicom_then_report(raw_head, tmp_path, capsys):
    out = tmp_path / "swi"
    assert main(["swi", str(raw_head / "sub-phantom"), "-o", str(out), "--device", "cpu", "-q", "--dicom",
                 "--param", "minip_mm=12"]) == 0
    for k in ("swi", "minip", "t2star_numart", "r2star_numart"):
        img = nib.load(str(out / f"{k}.nii.gz"))
        assert img.shape == (40, 48, 40)
    side = json.loads((out / "swi.json").read_text())
    assert side["parameters"]["minip_mm"] == 12 and side["echo_times"]
    assert len(list((out / "swi_dicom").glob("*.dcm"))) == 40
    swi = nib.load(str(out / "swi.nii.gz")).get_fdata()
    minip = nib.load(str(out / "minip.nii.gz")).get_fdata()
    assert swi.max() > 0 and np.mean(minip < swi - 1e-4) > 0.01  # the 12 mm slab darkens (3 slices at 4 mm)
    mag = nib.load(str(out / "swi_magnitude.nii.gz")).get_fdata()
    assert np.all(swi <= mag + 1e-4) and np.mean(swi < mag - 1e-4) > 0.001  # the phase mask only darkens
    # again without --overwrite: refused, nothing changed
    before = (out / "swi.nii.gz").stat().st_mtime_ns
    assert main(["swi", str(raw_head / "sub-phantom"), "-o", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "swi.nii.gz").stat().st_mtime_ns == before

    chi = tmp_path / "chi.nii.gz"
    assert main(["recon", str(raw_head / "truth" / "local_field.nii.gz"), "--mask",
                 str(raw_head / "truth" / "mask.nii.gz"), "--method", "tkd", "-q", "-o", str(chi)]) == 0
    assert main(["dicom", str(chi), "-o", str(tmp_path / "chi_dicom")]) == 0
    ds = pydicom.dcmread(sorted((tmp_path / "chi_dicom").glob("*.dcm"))[0])
    assert "tkd" in ds.SeriesDescription and "DERIVED" in list(ds.ImageType)
    rep = tmp_path / "report.pdf"
    assert main(["report", str(chi), "--mask", str(raw_head / "truth" / "mask.nii.gz"), "--field",
                 str(raw_head / "truth" / "local_field.nii.gz"), "--minip", str(out / "minip.nii.gz"),
                 "--labels", str(raw_head / "truth" / "labels.nii.gz"), "--label-names",
                 str(raw_head / "truth" / "phantom.json"), "-o", str(rep)]) == 0
    assert rep.read_bytes()[:4] == b"%PDF" and rep.stat().st_size > 10_000


def test_dicom_of_a_missing_file_fails_clearly(tmp_path, capsys):
    assert main(["dicom", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "d")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_recon_dicom_writes_the_series_and_respects_overwrite(raw_head, tmp_path, capsys):
    chi = tmp_path / "chi.nii.gz"
    args = ["recon", str(raw_head / "truth" / "local_field.nii.gz"), "--mask", str(raw_head / "truth" / "mask.nii.gz"),
            "--method", "tkd", "-q", "--dicom", "-o", str(chi)]
    assert main(args) == 0
    files = sorted((tmp_path / "chi_dicom").glob("*.dcm"))
    assert len(files) == 40 and pydicom.dcmread(files[0]).RescaleType == "ppb"
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_swi_is_a_registered_step(capsys):
    from napari_qsm.core.swi import SWIParams
    from napari_qsm.methods import available_steps, get_step
    step = get_step("swi")
    assert step.name == "clear-swi" and step.params_cls is SWIParams and step in available_steps("swi")
    assert main(["methods"]) == 0
    assert "swi:clear-swi" in capsys.readouterr().out
