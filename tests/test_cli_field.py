"""`napari-qsm field`: raw echoes (BIDS MEGRE, Siemens integers) -> local field and friends on the input's grid."""

import json

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main
from napari_qsm.pipeline import FIELD_MAPS as FIELD_OUTPUTS


@pytest.fixture(scope="module")
def raw_field(tmp_path_factory):
    """The head `napari-qsm phantom --raw --shape 40 48 40 --voxel-size 4 4 4 --seed 3` writes, with radian and
    with Siemens-integer phase, and `napari-qsm field` run once on the Siemens one: (phantom, roots, out, stderr)."""
    import contextlib
    import io

    from napari_qsm.core.sim.phantom import make_phantom, save_raw_bids

    tmp = tmp_path_factory.mktemp("raw_field")
    ph = make_phantom(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=3, snr=50.0, honest=True, background=True,
                      keep_echoes=True)
    roots = {}
    for u in ("rad", "siemens"):
        save_raw_bids(ph, tmp / f"raw_{u}", phase_units=u)
        roots[u] = tmp / f"raw_{u}" / "sub-phantom"
    out = tmp / "field"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["field", str(roots["siemens"]), "-o", str(out), "--device", "cpu",
                     "--background", "vsharp", "--param", "background.radius_max=12"]) == 0
    return ph, roots, out, err.getvalue()


def test_raw_bids_to_local_field_and_chi(raw_field, tmp_path, capsys):
    _, roots, out, _ = raw_field
    raw = roots["siemens"]   # the BIDS subject folder
    echo1 = nib.load(str(raw / "anat" / "sub-phantom_echo-1_part-mag_MEGRE.nii.gz"))
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
    assert main(["field", str(raw), "-o", str(out), "-q"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_step_parameter_fails_before_reading(tmp_path, capsys):
    assert main(["field", str(tmp_path / "nothing-here"), "-o", str(tmp_path / "o"), "--param", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "napari-qsm: error: --param bogus" in err and not (tmp_path / "o").exists()


def test_facts_travel_with_the_field_and_units_do_not_change_it(raw_field, tmp_path):
    """Radian and Siemens-integer phase of the same raw phantom give the same phase (so the same local field); the
    outputs carry B0, TE/ΔTE, units, B0 direction, phase units and noise in JSON sidecars that recon reads (χ's
    provenance then has b0_tesla and te; explicit arguments still win)."""
    from napari_qsm.core.field.load import load_echoes
    from napari_qsm.core.io import load_scan

    ph, roots, out, err = raw_field
    ech = {u: load_echoes(r) for u, r in roots.items()}
    # detected as before (radians, signed Siemens integers) and the same phase up to the integers' step
    assert [ech[u].vendor["phase_units"] for u in roots] == ["rad", "siemens"]
    assert np.abs(np.angle(np.exp(1j * (ech["rad"].phase - ech["siemens"].phase)))).max() <= np.pi / 4096 + 1e-5
    assert np.abs(np.angle(np.exp(1j * (ech["rad"].phase - np.angle(ph.echoes))))).max() < 1e-5
    # the console says what was detected, with B0 and TE
    assert "phase units: siemens (auto:" in err and "B0 3 T" in err and "TE 4, 8, 12" in err
    assert "noise σ" in err and "FOV corners" in err
    side = json.loads((out / "local_field.json").read_text())
    prov = json.loads((out / "field.json").read_text())
    assert side["Units"] == "ppm" and side["MagneticFieldStrength"] == prov["b0_tesla"]
    assert side["EchoTimes"] == prov["te"] and side["DeltaTE"] == prov["delta_te"]
    assert side["PhaseUnits"] == "siemens" and "Siemens integers" in side["PhaseUnitsReason"]
    assert side["NoiseSigma"] > 0 and side["NoiseSigmaSource"].startswith("FOV corners")
    assert prov["phase_units"]["phase_units"] == "siemens" and prov["noise"]["noise_sigma"] == side["NoiseSigma"]
    for k in FIELD_OUTPUTS:
        assert (out / f"{k}.json").is_file(), k
    scan = load_scan(out / "local_field.nii.gz", out / "mask.nii.gz")
    assert scan.b0_tesla == pytest.approx(prov["b0_tesla"]) and scan.te == pytest.approx(prov["delta_te"])
    assert np.allclose(scan.b0_direction, prov["b0_direction"], atol=1e-6)
    assert scan.source["b0_direction_source"] == "sidecar B0Direction"
    assert scan.source["field_facts"]["PhaseUnits"] == "siemens"
    assert load_scan(out / "local_field.nii.gz", out / "mask.nii.gz", b0=7.0, te=0.003).b0_tesla == 7.0
    chi = tmp_path / "chi.nii.gz"
    assert main(["recon", str(out / "local_field.nii.gz"), "--mask", str(out / "mask.nii.gz"), "--method", "tkd",
                 "-q", "-o", str(chi)]) == 0
    cprov = json.loads((tmp_path / "chi.json").read_text())
    assert cprov["scan"]["b0_tesla"] == pytest.approx(prov["b0_tesla"])
    assert cprov["scan"]["te"] == pytest.approx(prov["delta_te"])
