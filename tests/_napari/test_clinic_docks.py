"""The clinic in napari (issue 27): SWI after a Field run, "Save as DICOM…" and "Report…" in Compare.

The docks are opened the way napari opens them (``add_plugin_dock_widget``).
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_test_helpers import add_layer_data, save_stored


def _to_canonical(layer):
    from napari_qsm._napari.layers import to_canonical
    return to_canonical(np.asarray(layer.data), layer.metadata["axes"])


def test_field_run_makes_swi_minip_and_t2star(make_napari_viewer, qtbot, raw_head):
    """Field → Run adds SWI, minIP and NumART2* T2* (ms) beside R2* (1/s), equal to the headless computation."""
    from napari_qsm._napari.reader import echoes_layer_data
    from napari_qsm.core.swi import SWIParams, swi
    from napari_qsm.pipeline import field_from_echoes

    viewer = make_napari_viewer()
    echoes = raw_head.to_echoes(name="raw")
    add_layer_data(viewer, echoes_layer_data(echoes))
    _, fld = viewer.window.add_plugin_dock_widget("napari-qsm", "Field")
    fld.device_combo.setCurrentIndex(fld.device_combo.findData("cpu"))
    assert fld.swi.check.isChecked()  # on by default
    fld.swi.form.set_values({"minip_mm": 12.0})
    assert fld.run()
    qtbot.waitUntil(lambda: not fld.runner.running, timeout=90000)
    assert "✓" in fld.status.text(), fld.status.text()
    names = [la.name for la in viewer.layers]
    for n in ("raw SWI", "raw SWI minIP 12 mm", "raw T2* (NumART2*, ms)", "raw R2* (1/s)"):
        assert n in names, names
    assert viewer.layers["raw T2* (NumART2*, ms)"].metadata["units"] == "ms"
    assert viewer.layers["raw R2* (1/s)"].metadata["units"] == "1/s"
    # the same numbers as the headless SWI on the dock's own run (the dock's echoes, total field, brain mask)
    run = fld.last_run
    ref = swi(echoes.magnitude, run.total.field, run.brain_mask, echoes.te, run.total.b0_tesla,
              run.total.voxel_size, SWIParams(minip_mm=12.0))
    np.testing.assert_allclose(_to_canonical(viewer.layers["raw SWI"]), ref.swi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_to_canonical(viewer.layers["raw SWI minIP 12 mm"]), ref.min_ip, rtol=1e-5, atol=1e-6)
    t2 = _to_canonical(viewer.layers["raw T2* (NumART2*, ms)"])
    np.testing.assert_allclose(t2, ref.t2star_ms, rtol=1e-5)
    # veins (paramagnetic) darker in SWI than in the combined magnitude; T2* of brain in a plausible range (ms)
    brain = run.brain_mask
    assert 5 < float(np.median(t2[brain])) < 200
    # SWI maps are not offered to Compare as χ results
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    offered = [cmp_.picker.results_list.item(i).text() for i in range(cmp_.picker.results_list.count())]
    assert not any("SWI" in o or "T2*" in o for o in offered), offered


def test_field_run_without_swi_adds_no_swi_layers(make_napari_viewer, qtbot, raw_head):
    from napari_qsm._napari.reader import echoes_layer_data

    viewer = make_napari_viewer()
    add_layer_data(viewer, echoes_layer_data(raw_head.to_echoes(name="raw")))
    _, fld = viewer.window.add_plugin_dock_widget("napari-qsm", "Field")
    fld.device_combo.setCurrentIndex(fld.device_combo.findData("cpu"))
    fld.swi.check.setChecked(False)
    assert not fld.swi.form.isEnabled()
    assert fld.run()
    qtbot.waitUntil(lambda: not fld.runner.running, timeout=90000)
    names = [la.name for la in viewer.layers]
    assert "raw local field" in names and not any("SWI" in n or "T2*" in n for n in names), names
    assert fld.swi.check.isEnabled() and not fld.swi.form.isEnabled()


def _chi_layer_from_file(viewer, oblique_phantom, tmp_path):
    """χ of the oblique phantom written sagittally (P-S-L) and opened with the plugin's reader, role χ."""
    p = save_stored(oblique_phantom.chi, oblique_phantom.affine, tmp_path / "sub-01_chi.nii.gz")
    layer = viewer.open(str(p), plugin="napari-qsm")[0]
    md = dict(layer.metadata)
    md.update(role="chi", units="ppm", provenance={"method": "tkd", "parameters": {"threshold": 0.19}})
    layer.metadata = md
    return layer


def test_save_as_dicom_writes_a_series_with_the_layers_geometry(make_napari_viewer, qtbot, oblique_phantom, tmp_path):
    """Every DICOM pixel, placed in the world by IPP / IOP / PixelSpacing, holds the layer's χ (ppb) there."""
    pydicom = pytest.importorskip("pydicom")
    viewer = make_napari_viewer()
    layer = _chi_layer_from_file(viewer, oblique_phantom, tmp_path)
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    viewer.layers.selection.active = layer
    assert cmp_.clinic.target().name == layer.name  # the active layer (through the dock's viewer proxy)
    out = tmp_path / "chi_dicom"
    assert cmp_.clinic.save_dicom(out)
    qtbot.waitUntil(lambda: not cmp_.clinic.runner.running, timeout=30000)
    files = sorted(out.glob("*.dcm"))
    chi = _to_canonical(layer).astype(np.float64)
    aff = np.asarray(layer.metadata["affine"], float)
    inv = np.linalg.inv(aff)
    seen = np.zeros(chi.shape, bool)
    for f in files:
        ds = pydicom.dcmread(str(f))
        assert ds.SeriesDescription.startswith("QSM tkd") and "DERIVED" in ds.ImageType
        assert ds.RescaleType.lower().startswith("ppb")
        iop = np.asarray(ds.ImageOrientationPatient, float)
        ipp = np.asarray(ds.ImagePositionPatient, float)
        ps = np.asarray(ds.PixelSpacing, float)
        r, c = np.mgrid[0:ds.Rows, 0:ds.Columns]
        lps = ipp + c[..., None] * ps[1] * iop[:3] + r[..., None] * ps[0] * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = (ras @ inv[:3, :3].T) + inv[:3, 3]
        idx = np.rint(ijk).astype(int)
        assert np.abs(ijk - idx).max() < 1e-3  # pixel centres on voxel centres
        vals = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        truth = chi[idx[..., 0], idx[..., 1], idx[..., 2]] * 1000.0  # ppm → ppb
        assert np.abs(vals - truth).max() <= 0.51 * float(ds.RescaleSlope) + 1e-6
        seen[idx[..., 0], idx[..., 1], idx[..., 2]] = True
    assert len(files) * ds.Rows * ds.Columns == chi.size and seen.all()  # every voxel written exactly where it is


def test_save_as_dicom_refuses_a_layer_without_geometry(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from napari_qsm._napari.compare import clinic

    errors = []
    monkeypatch.setattr(clinic, "notify_error", errors.append)
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.zeros((6, 7, 8), np.float32), name="numpy chi", metadata={"role": "chi"})
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    assert not cmp_.clinic.save_dicom(tmp_path / "out", layer=layer)
    assert errors and "no affine" in errors[0]
    assert not (tmp_path / "out").exists()


def test_report_writes_a_png_with_the_residual(make_napari_viewer, qtbot, phantom_viewer, tmp_path, monkeypatch):
    from napari_qsm._napari.compare import clinic
    from napari_qsm._napari.layers import derived_layer_kwargs
    import napari_qsm.core.report as report

    viewer = phantom_viewer
    calls, infos = [], []
    real = report.write_report
    monkeypatch.setattr(report, "write_report", lambda *a, **k: calls.append(k) or real(*a, **k))
    monkeypatch.setattr(clinic, "notify_info", infos.append)
    truth = next(la for la in viewer.layers if la.metadata.get("role") == "chi_true")
    field = next(la for la in viewer.layers if la.metadata.get("role") == "field")
    mask = next(la for la in viewer.layers if la.metadata.get("role") == "mask")
    kw = derived_layer_kwargs(field, name="TKD χ", role="chi", extra_metadata={
        "units": "ppm", "provenance": {"method": "tkd", "parameters": {"threshold": 0.19}}})
    chi = viewer.add_image(np.asarray(truth.data), **kw)
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    cmp_.set_results([chi.name])
    cmp_.set_mask(mask.name)
    cmp_.set_field(field.name)
    out = tmp_path / "tkd_report.png"
    assert cmp_.clinic.write_report(out)
    qtbot.waitUntil(lambda: not cmp_.clinic.runner.running, timeout=60000)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert infos and str(out) in infos[-1]
    k = calls[-1]
    assert k["method"] == "tkd" and k["parameters"] == {"threshold": 0.19} and k["min_ip"] is None
    # the true χ explains the phantom's field: the residual is computed and small, but not zero (noise)
    assert 0.0 < k["residual_percent"] < 50.0


def test_report_without_a_mask_writes_nothing(make_napari_viewer, qtbot, phantom_viewer, tmp_path, monkeypatch):
    from napari_qsm._napari.compare import clinic
    from napari_qsm._napari.layers import derived_layer_kwargs

    errors = []
    monkeypatch.setattr(clinic, "notify_error", errors.append)
    viewer = phantom_viewer
    truth = next(la for la in viewer.layers if la.metadata.get("role") == "chi_true")
    chi = viewer.add_image(np.asarray(truth.data), **derived_layer_kwargs(truth, name="χ", role="chi"))
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    cmp_.set_mask(None)
    assert not cmp_.clinic.write_report(tmp_path / "r.png", layer=chi)
    assert errors and "mask" in errors[0]
    assert not (tmp_path / "r.png").exists()


def test_compare_shows_the_chi_reference_of_each_result(make_napari_viewer, qtbot, phantom_viewer):
    """Results whose provenance records their χ reference (core.method.apply_reference) show it under their title."""
    from napari_qsm._napari.compare.clinic import reference_note
    from napari_qsm._napari.layers import result_layer_data, scan_from_layers
    from napari_qsm.methods import reconstruct

    assert reference_note({"extras": {"reference": "csf", "reference_ppm": 0.0123}}) == "ref csf (+0.012 ppm)"
    assert reference_note({"extras": {"reference": "mean", "reference_ppm": -1e-5}}) == "ref mean (+0.000 ppm)"
    assert reference_note({"method": "tkd", "extras": {}}) == ""  # older results: nothing shown
    viewer = phantom_viewer
    field = next(la for la in viewer.layers if la.metadata.get("role") == "field")
    mask = next(la for la in viewer.layers if la.metadata.get("role") == "mask")
    scan = scan_from_layers(field, mask)
    names = {}
    for ref in ("mean", "none"):
        res = reconstruct(scan, "tkd", {"reference": ref}, device="cpu")
        data, kw = result_layer_data(res, field, scan=scan)
        kw["name"] = names[ref] = f"TKD ref {ref}"
        viewer.add_image(data, **kw)
        if ref == "mean":
            shift = res.extras["reference_ppm"]
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    cmp_.set_results(list(names.values()))
    qtbot.waitUntil(lambda: len(cmp_.panel.columns) >= 2, timeout=10000)
    subs = {c.title: c.subtitle for c in cmp_.panel.columns}
    assert subs[names["mean"]].endswith(f"ref mean ({round(shift, 3) + 0.0:+.3f} ppm)"), subs
    assert subs[names["none"]].endswith("ref none"), subs


def test_save_as_dicom_button_into_a_chosen_folder(make_napari_viewer, qtbot, oblique_phantom, tmp_path, monkeypatch):
    """The button's dialog: a non-empty folder gets a new series folder inside it (named after the layer)."""
    from napari_qsm._napari.compare import clinic

    viewer = make_napari_viewer()
    layer = _chi_layer_from_file(viewer, oblique_phantom, tmp_path)  # tmp_path now holds the NIfTI
    _, cmp_ = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
    viewer.layers.selection.active = layer

    def fake_exec(dlg):
        dlg.out_edit.setText(str(tmp_path))
        return 1
    monkeypatch.setattr(clinic.DicomDialog, "exec", fake_exec)
    cmp_.dicom_button.click()
    qtbot.waitUntil(lambda: not cmp_.clinic.runner.running, timeout=30000)
    out = tmp_path / "sub-01_chi_dicom"
    assert len(list(out.glob("*.dcm"))) > 0 and (tmp_path / "sub-01_chi.nii.gz").exists()
