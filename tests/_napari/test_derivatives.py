"""A finished batch (derivatives/napari-qsm) opened in Compare: one subject's χ maps side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_test_helpers import TINY_SHAPE, TINY_VS  # noqa: E402

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def bids(tmp_path_factory, tiny_phantom):
    """sub-01 from raw echoes (field maps in derivatives, TKD and TSVD), sub-02 from a local field in the dataset."""
    from napari_qsm.core.io import save_volume, write_json
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    ph = tiny_phantom
    root = tmp_path_factory.mktemp("bids")
    deriv = root / "derivatives" / "napari-qsm"
    deriv.mkdir(parents=True)
    write_json(deriv / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    scan = Scan(field=ph.field, mask=ph.mask, voxel_size=TINY_VS, b0_direction=ph.b0_direction)
    maps = {"localfield": ph.field, "mask": ph.mask.astype(np.float32), "magnitude": ph.magnitude}
    a1 = deriv / "sub-01" / "anat"
    a2 = root / "sub-02" / "anat"
    for folder, sub in ((a1, "sub-01"), (a2, "sub-02")):
        folder.mkdir(parents=True)
        for k, v in maps.items():
            save_volume(v, folder / f"{sub}_{k}.nii.gz", ph.affine)
    for sub, methods in (("sub-01", ("tkd", "tsvd")), ("sub-02", ("tkd",))):
        (deriv / sub / "anat").mkdir(parents=True, exist_ok=True)
        for m in methods:
            res = reconstruct(scan, m, device="cpu")
            save_volume(res.chi, deriv / sub / "anat" / f"{sub}_desc-{m}_Chimap.nii.gz", ph.affine,
                        provenance=res.provenance())
    assert ph.field.shape == TINY_SHAPE
    return root


def test_open_subject_in_compare(make_napari_viewer, bids):
    from napari_qsm._napari.derivatives import open_derivatives, scans, subjects

    assert subjects(bids) == ["sub-01", "sub-02"]
    assert list(scans(bids, "sub-01")) == ["sub-01"]
    v = make_napari_viewer()
    out = open_derivatives(v, bids, "01")
    assert [lyr.name for lyr in out["chi"]] == ["sub-01 tkd", "sub-01 tsvd"]
    assert all(lyr.metadata.get("role") == "chi" for lyr in out["chi"])
    assert out["field"].metadata.get("role") == "field" and out["mask"].name == "sub-01 mask"
    sel = out["compare"].selection()
    assert sorted(sel.results) == ["sub-01 tkd", "sub-01 tsvd"]
    assert sel.mask == "sub-01 mask" and sel.field == "sub-01 localfield"
    assert out["chi"][0].data.shape == out["field"].data.shape
    with pytest.raises(ValueError, match="sub-07"):
        open_derivatives(v, bids, "sub-07")


def test_widget_lists_subjects_and_opens_a_local_field_scan(make_napari_viewer, bids):
    from napari_qsm._napari.derivatives import DerivativesWidget

    v = make_napari_viewer()
    w = DerivativesWidget(v)
    w.folder.value = str(bids)
    assert list(w.subject.choices) == ["sub-01", "sub-02"]
    w.subject.value = "sub-02"
    assert list(w.scan.choices) == ["sub-02"]
    w.button.clicked.emit()
    names = [lyr.name for lyr in v.layers]
    assert "sub-02 tkd" in names and "sub-02 localfield" in names  # the field from the dataset's own anat folder
    assert "opened 1 result" in w.status.value
    side = json.loads((bids / "derivatives/napari-qsm/sub-02/anat/sub-02_desc-tkd_Chimap.json").read_text())
    assert side["method"] == "tkd"


def test_sidecar_without_method_and_one_description_read(make_napari_viewer, tmp_path, monkeypatch):
    """A χ sidecar without "method": the layer is named by the file's desc-<method> entity, else "χ" (it was
    "<scan> " with a trailing space); dataset_description.json is read once per open."""
    from pathlib import Path

    from napari_qsm.core.io import save_volume, write_json
    from napari_qsm._napari.derivatives import open_derivatives

    deriv = tmp_path / "derivatives" / "napari-qsm"
    anat = deriv / "sub-03" / "anat"
    anat.mkdir(parents=True)
    write_json(deriv / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    chi = np.zeros(TINY_SHAPE, np.float32)
    chi[2:5, 2:5, 2:5] = 0.1
    for name in ("sub-03_desc-medi_Chimap", "sub-03_Chimap"):
        save_volume(chi, anat / f"{name}.nii.gz", np.diag([*TINY_VS, 1.0]))
        write_json(anat / f"{name}.json", {"units": "ppm"})  # a sidecar, but no "method"
    reads = []
    read_text = Path.read_text

    def counting(self, *a, **k):
        text = read_text(self, *a, **k)  # only reads that succeed (the BIDS root has no description)
        if self.name == "dataset_description.json":
            reads.append(self)
        return text

    monkeypatch.setattr(Path, "read_text", counting)
    v = make_napari_viewer()
    out = open_derivatives(v, tmp_path, "03", compare=False)
    assert [lyr.name for lyr in out["chi"]] == ["sub-03 χ", "sub-03 medi"]
    assert reads == [deriv / "dataset_description.json"]


def test_method_name_from_a_sidecar_that_is_not_an_object(tmp_path):
    """A sidecar that is valid JSON but not an object (a list) names the layer by desc-<method>, no crash."""
    from napari_qsm._napari.derivatives import _method_of

    chi = tmp_path / "sub-01_desc-tkd_Chimap.nii.gz"
    (tmp_path / "sub-01_desc-tkd_Chimap.json").write_text("[1, 2]")
    assert _method_of(chi) == "tkd"
    (tmp_path / "sub-01_desc-tkd_Chimap.json").write_text('{"method": "TKD δ=0.15"}')
    assert _method_of(chi) == "TKD δ=0.15"
