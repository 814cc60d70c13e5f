"""`napari-qsm field`: raw echoes (BIDS MEGRE, Siemens integers) -> local field and friends on the input's grid."""

import json

import nibabel as nib
import numpy as np

from napari_qsm.cli import main
from napari_qsm.pipeline import FIELD_MAPS as FIELD_OUTPUTS


def test_raw_bids_to_local_field_and_chi(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["phantom", str(raw), "--raw", "--shape", "40", "48", "40", "--voxel-size", "4", "4", "4",
                 "--phase-units", "siemens", "--seed", "3"]) == 0
    out = tmp_path / "field"
    assert main(["field", str(raw / "sub-phantom"), "-o", str(out), "--device", "cpu", "-q",
                 "--param", "background.radius_max=12"]) == 0
    echo1 = nib.load(str(raw / "sub-phantom" / "anat" / "sub-phantom_echo-1_part-mag_MEGRE.nii.gz"))
    for k in FIELD_OUTPUTS:
        img = nib.load(str(out / f"{k}.nii.gz"))
        assert img.shape == echo1.shape and np.allclose(img.affine, echo1.affine, atol=1e-4), k
    prov = json.loads((out / "field.json").read_text())
    assert [s["family"] for s in prov["steps"]] == ["fit", "mask", "unwrap", "background"]
    assert prov["steps"][3]["parameters"]["radius_max"] == 12
    assert prov["echoes"]["vendor"]["phase_units"] == "siemens"
    local = nib.load(str(out / "local_field.nii.gz")).get_fdata()
    total = nib.load(str(out / "total_field.nii.gz")).get_fdata()
    mask = nib.load(str(out / "mask.nii.gz")).get_fdata() > 0.5
    assert mask.sum() > 1000
    assert np.std(local[mask]) < 0.3 * np.std(total[mask])  # the background field is removed
    capsys.readouterr()
    chi = tmp_path / "chi.nii.gz"
    assert main(["recon", str(out / "local_field.nii.gz"), "--mask", str(out / "mask.nii.gz"), "--method", "tkd",
                 "-q", "-o", str(chi)]) == 0
    # a second run into the same folder refuses and writes nothing
    before = sorted(p.name for p in out.iterdir())
    assert main(["field", str(raw / "sub-phantom"), "-o", str(out), "-q"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_step_parameter_fails_before_reading(tmp_path, capsys):
    assert main(["field", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "o"), "--param", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "napari-qsm: error: --param bogus" in err and not (tmp_path / "o").exists()
