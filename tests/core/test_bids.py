"""The one BIDS module: entities, MEGRE groups, the derivatives' names (used by loader, batch, reader, dock)."""

from pathlib import Path

import pytest

from napari_qsm.core.io import bids


def test_entities_and_labels():
    e = bids.entities("sub-01_ses-2_acq-fast_run-3_echo-10_part-phase_MEGRE.nii.gz")
    assert e == {"sub": "01", "ses": "2", "acq": "fast", "run": "3", "echo": "10", "part": "phase",
                 "suffix": "MEGRE"}
    assert bids.entities("sub-01_localfield.nii")["suffix"] == "localfield"
    assert bids.label("01", "sub-") == "sub-01" and bids.label("sub-01", "sub-") == "sub-01"
    assert bids.strip_ext("a.NII.GZ") == "a" and bids.strip_ext("a.json") == "a.json"


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    return p


def test_megre_groups_by_acquisition_in_numeric_echo_order(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    for acq in ("", "_acq-fast"):
        for e in (1, 2, 10):
            for part in ("mag", "phase"):
                _touch(anat / f"sub-01{acq}_echo-{e}_part-{part}_MEGRE.nii.gz")
    _touch(anat / "sub-01_echo-1_MEGRE.nii.gz")             # no part: not an echo of a group
    _touch(anat / "sub-01_T1w.nii.gz")
    _touch(tmp_path / "derivatives" / "x" / "sub-01_echo-1_part-mag_MEGRE.nii.gz")
    groups = bids.find_megre(tmp_path)
    assert sorted(p for _, p in groups) == ["sub-01", "sub-01_acq-fast"]
    g = groups[(anat, "sub-01")]
    assert sorted(g["mag"]) == [1, 2, 10] and g["phase"][10].name == "sub-01_echo-10_part-phase_MEGRE.nii.gz"
    assert bids.has_megre(tmp_path) and bids.has_megre(tmp_path, depth=2)
    assert not bids.has_megre(tmp_path, depth=1)            # the echoes are two levels below


def test_anat_folders_and_derivatives_names(tmp_path):
    for d in ("sub-01/anat", "sub-02/ses-a/anat", "sub-02/ses-b/anat", "sub-03/func"):
        (tmp_path / d).mkdir(parents=True)
    found = [(a.relative_to(tmp_path).as_posix(), s, ses) for a, s, ses in bids.anat_folders(tmp_path)]
    assert found == [("sub-01/anat", "sub-01", None), ("sub-02/ses-a/anat", "sub-02", "ses-a"),
                     ("sub-02/ses-b/anat", "sub-02", "ses-b")]
    assert [s for _, s, _ in bids.anat_folders(tmp_path, only=["02"])] == ["sub-02", "sub-02"]
    with pytest.raises(ValueError, match="sub-09"):
        bids.anat_folders(tmp_path, only=["sub-09"])
    d = bids.derivatives_anat(tmp_path, "sub-02", "ses-a")
    assert d == tmp_path / "derivatives" / "napari-qsm" / "sub-02" / "ses-a" / "anat"
    name = bids.chi_name("sub-02_ses-a_run-1", "medi")
    assert name == "sub-02_ses-a_run-1_desc-medi_Chimap.nii.gz"
    assert bids.chi_prefix(name) == "sub-02_ses-a_run-1" and bids.chi_method(name) == "medi"
    assert bids.chi_method("sub-01_Chimap.nii.gz") == ""
