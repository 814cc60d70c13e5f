"""`napari-qsm recon` from raw echoes (BIDS folder, --magnitude/--phase lists) equals `field` then `recon`."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main


@pytest.fixture(scope="module")
def raw_bids(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    assert main(["phantom", str(raw), "--raw", "--shape", "40", "48", "40", "--voxel-size", "4", "4", "4",
                 "--phase-units", "siemens", "--seed", "3"]) == 0
    return raw / "sub-phantom"


def test_recon_from_bids_equals_field_then_recon(raw_bids, tmp_path, capsys):
    fld = tmp_path / "field"
    assert main(["field", str(raw_bids), "-o", str(fld), "--device", "cpu", "-q", "--background", "resharp",
                 "--param", "background.radius=8"]) == 0
    two = tmp_path / "two.nii.gz"
    assert main(["recon", str(fld / "local_field.nii.gz"), "--mask", str(fld / "mask.nii.gz"), "--magnitude",
                 str(fld / "magnitude.nii.gz"), "--method", "tkd", "--param", "threshold=0.15", "--device", "cpu",
                 "-q", "-o", str(two)]) == 0
    one = tmp_path / "one.nii.gz"
    assert main(["recon", str(raw_bids), "--method", "tkd", "--background", "resharp", "--param",
                 "background.radius=8", "--param", "threshold=0.15", "--device", "cpu", "-o", str(one)]) == 0
    err = capsys.readouterr().err
    assert "local field:" in err and "RESHARP" in err
    a, b = nib.load(str(one)), nib.load(str(two))
    echo1 = nib.load(str(raw_bids / "anat" / "sub-phantom_echo-1_part-mag_MEGRE.nii.gz"))
    assert a.shape == echo1.shape and np.allclose(a.affine, echo1.affine, atol=1e-4)
    # the NIfTI round trip of the local field (float32) is the only difference
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=1e-5)
    assert np.abs(a.get_fdata()).max() > 0.01
    side = json.loads((tmp_path / "one.json").read_text())
    assert side["parameters"]["threshold"] == pytest.approx(0.15)
    steps = side["extras"]["field_steps"]
    assert [s["family"] for s in steps] == ["fit", "mask", "unwrap", "background"]
    assert steps[3]["name"] == "resharp" and steps[3]["parameters"]["radius"] == 8


def test_recon_from_file_lists_and_field_param(raw_bids, tmp_path):
    anat = raw_bids / "anat"
    mags = sorted(str(p) for p in anat.glob("*_part-mag_MEGRE.nii.gz"))
    phs = sorted(str(p) for p in anat.glob("*_part-phase_MEGRE.nii.gz"))
    out1, out2 = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert main(["recon", "--magnitude", *mags, "--phase", *phs, "--method", "tkd", "--field-param",
                 "background=lbv", "--field-param", "peel=1", "--device", "cpu", "-q", "-o", str(out1)]) == 0
    assert main(["recon", str(raw_bids), "--method", "tkd", "--background", "lbv", "--param", "background.peel=1",
                 "--device", "cpu", "-q", "-o", str(out2)]) == 0
    np.testing.assert_allclose(nib.load(str(out1)).get_fdata(), nib.load(str(out2)).get_fdata(), atol=1e-6)
    steps = json.loads((tmp_path / "a.json").read_text())["extras"]["field_steps"]
    assert steps[3]["name"] == "lbv" and steps[3]["parameters"]["peel"] == 1


def test_raw_recon_errors_write_nothing(raw_bids, tmp_path, capsys):
    out = tmp_path / "x.nii.gz"
    assert main(["recon", str(raw_bids), "--method", "tkd", "--param", "background.bogus=1", "-q", "-o", str(out)]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["recon", str(raw_bids), "--method", "tkd", "--noise-std", "n.nii", "-q", "-o", str(out)]) == 2
    assert "--noise-std: not used with raw echoes" in capsys.readouterr().err
    assert main(["recon", str(tmp_path), "--method", "tkd", "-q", "-o", str(out)]) == 2
    assert "neither BIDS MEGRE" in capsys.readouterr().err
    # the local-field form still needs its mask, and refuses the raw-only options
    assert main(["recon", str(raw_bids / "anat" / "sub-phantom_echo-1_part-mag_MEGRE.nii.gz"), "--method", "tkd",
                 "-q", "-o", str(out)]) == 2
    assert "--mask MASK is required" in capsys.readouterr().err
    assert not out.exists()


def test_medi_weak_harmonic_auto_follows_the_field_through_process_and_files(raw_bids, tmp_path):
    """MEDI's weak_harmonic=auto is on for a local field made by this package's background removal: in process
    (local_field's field_steps), from raw echoes on the command line, and after a `field` NIfTI round trip (the
    local field's sidecar says BackgroundRemoval); off for the total field of the same run and for a plain Scan."""
    from napari_qsm.core.inversion.medi import MEDIParams, weak_harmonic_for
    from napari_qsm.core.io import load_scan
    from napari_qsm.core.scan import Scan

    auto = MEDIParams()
    # raw echoes → χ in one command (local_field in process, its field_steps): the decision reaches χ's sidecar
    one = tmp_path / "one.nii.gz"
    assert main(["recon", str(raw_bids), "--method", "medi", "--param", "max_iter=1", "--param", "cg_max_iter=10",
                 "--device", "cpu", "-q", "-o", str(one)]) == 0
    side = json.loads((tmp_path / "one.json").read_text())
    assert side["parameters"]["weak_harmonic"] == "auto"
    assert side["extras"]["weak_harmonic"].startswith("auto → on: local field from LBV")
    assert side["extras"]["harmonic"]["harmonic_rms_ppm"] > 0
    # `field` then `recon`: the fact travels in local_field.json
    fld = tmp_path / "field"
    assert main(["field", str(raw_bids), "-o", str(fld), "--device", "cpu", "-q", "--background", "resharp"]) == 0
    assert json.loads((fld / "local_field.json").read_text())["BackgroundRemoval"] == "resharp"
    assert "BackgroundRemoval" not in json.loads((fld / "total_field.json").read_text())
    scan = load_scan(str(fld / "local_field.nii.gz"), str(fld / "mask.nii.gz"), str(fld / "magnitude.nii.gz"))
    assert scan.source["field_facts"]["BackgroundRemoval"] == "resharp"
    on, why = weak_harmonic_for(scan, auto)
    assert on and "RESHARP" in why
    total = load_scan(str(fld / "total_field.nii.gz"), str(fld / "mask.nii.gz"))
    assert weak_harmonic_for(total, auto)[0] is False
    plain = Scan(field=scan.field, mask=scan.mask, voxel_size=scan.voxel_size)
    assert weak_harmonic_for(plain, auto)[0] is False
    # lambda=auto (UPRE) with auto: off, and the reason says why
    on, why = weak_harmonic_for(scan, MEDIParams(lam="auto"))
    assert not on and "UPRE" in why
