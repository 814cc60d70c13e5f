"""One pipeline (napari_qsm.pipeline), one registry, one overwrite rule: what a newcomer meets first."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from napari_qsm.cli import main


@pytest.fixture(scope="module")
def field_dir(tmp_path_factory):
    """A small local-field phantom: field, mask, magnitude (NIfTI)."""
    d = tmp_path_factory.mktemp("ph")
    assert main(["phantom", str(d), "--shape", "28", "32", "28", "--voxel-size", "4", "4", "4", "--seed", "1"]) == 0
    return d


def test_a_sidecar_holding_a_json_array_fails_its_scan_not_the_batch(field_dir, tmp_path):
    from napari_qsm.batch import run_batch

    root = tmp_path / "ds"
    for sub in ("01", "02"):
        anat = root / f"sub-{sub}" / "anat"
        anat.mkdir(parents=True)
        for src, suffix in (("field", "localfield"), ("mask", "mask")):
            (anat / f"sub-{sub}_{suffix}.nii.gz").write_bytes((field_dir / f"{src}.nii.gz").read_bytes())
    (root / "sub-02" / "anat" / "sub-02_localfield.json").write_text("[1, 2]")
    (root / "dataset_description.json").write_text("[]")
    s = run_batch(root, method="tkd", dry_run=True, echo=False)
    by = {r["scan"]: r for r in s.rows}
    assert by["sub-01"]["status"] == "planned"
    assert by["sub-02"]["status"] == "failed" and by["sub-02"]["step"] == "discover"
    assert "JSON" in by["sub-02"]["error"] or "object" in by["sub-02"]["error"]


def test_recon_without_method_uses_medi_and_says_so(field_dir, tmp_path, capsys):
    d = field_dir
    base = ["recon", str(d / "field.nii.gz"), "--mask", str(d / "mask.nii.gz"), "--device", "cpu", "-q"]
    out = tmp_path / "chi.nii.gz"
    assert main(base + ["--magnitude", str(d / "magnitude.nii.gz"), "--param", "max_iter=2", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "using medi" in err and "--method" in err and len(err.splitlines()) == 1
    assert json.loads((tmp_path / "chi.json").read_text())["method"] == "medi"
    # MEDI needs a magnitude: without one the default is TKD, and the line says why
    out2 = tmp_path / "chi2.nii.gz"
    assert main(base + ["-o", str(out2)]) == 0
    err = capsys.readouterr().err
    assert "using tkd" in err and "magnitude" in err
    assert json.loads((tmp_path / "chi2.json").read_text())["method"] == "tkd"


def test_every_command_refuses_an_existing_output_unless_overwrite(field_dir, tmp_path, capsys):
    d = field_dir
    out = tmp_path / "chi.nii.gz"
    recon = ["recon", str(d / "field.nii.gz"), "--mask", str(d / "mask.nii.gz"), "--method", "tkd", "--device", "cpu",
             "-q", "-o", str(out)]
    assert main(recon) == 0
    stamp = out.stat().st_mtime_ns, out.read_bytes()
    capsys.readouterr()
    assert main(recon) == 2          # was: silently overwritten
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert (out.stat().st_mtime_ns, out.read_bytes()) == stamp
    assert main(recon + ["--overwrite"]) == 0
    # the sidecar alone counts too (a half-removed result is not silently replaced)
    out.unlink()
    assert main(recon) == 2
    ph = tmp_path / "ph"
    args = ["phantom", str(ph), "--shape", "16", "16", "16", "--voxel-size", "6", "6", "6"]
    assert main(args) == 0
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    demo_out = tmp_path / "demo"
    demo_out.mkdir()
    (demo_out / "metrics.md").write_text("old")
    assert main(["demo", str(demo_out), "--methods", "tkd"]) == 2
    assert (demo_out / "metrics.md").read_text() == "old"


def test_atomic_files_get_the_usual_mode_and_leave_nothing_on_failure(tmp_path):
    from napari_qsm.core.files import atomic_files, default_file_mode

    a, b = tmp_path / "w.pt", tmp_path / "w.json"
    with atomic_files(a, b) as (ta, tb):
        open(ta, "w").write("x")
        open(tb, "w").write("{}")
    assert a.read_text() == "x" and b.read_text() == "{}"
    for p in (a, b):
        assert os.stat(p).st_mode & 0o777 == default_file_mode()
    with pytest.raises(RuntimeError):
        with atomic_files(tmp_path / "c.pt") as (tc,):
            open(tc, "w").write("y")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.pt"]


def test_phantom_raw_says_what_it_is_doing(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "p"), "--raw", "--shape", "16", "16", "16", "--voxel-size", "6", "6",
                 "6"]) == 0
    err = capsys.readouterr().err
    assert "simulating the 16x16x16 head and its echoes" in err and "writing BIDS MEGRE" in err
    assert err.count("done in") == 2


def test_pipeline_api_equals_the_command_line(raw_bids_head, tmp_path):
    """field_from_inputs + chi_from_field is what `recon` on raw echoes writes, bit for bit."""
    from napari_qsm import pipeline

    recipe = pipeline.make_recipe(params={"background": "resharp", "background.radius": "8"})
    echoes, run = pipeline.field_from_inputs(str(raw_bids_head), recipe, device="cpu")
    res = pipeline.chi_from_field(run, "tkd", nifti_info=echoes.nifti_info, device="cpu")
    assert res.extras["field_steps"][-1]["name"] == "resharp"
    out = tmp_path / "chi.nii.gz"
    assert main(["recon", str(raw_bids_head), "--method", "tkd", "--background", "resharp", "--param",
                 "background.radius=8", "--device", "cpu", "-q", "-o", str(out)]) == 0
    from napari_qsm.core.io import save_result
    save_result(res, tmp_path / "api.nii.gz", scan=run.scan)
    a = np.asarray(nib.load(str(out)).dataobj)
    b = np.asarray(nib.load(str(tmp_path / "api.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() > 0
