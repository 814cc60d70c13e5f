"""The "QSM reconstruction" dock end to end on a tiny phantom: generated forms, runs, cancel, errors."""

import threading

import numpy as np
import pytest
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox

from napari_qsm._napari.layers import to_canonical
from napari_qsm._napari.reconstruct_dock import QSMWidget
from napari_qsm.methods import available_methods, reconstruct
from napari_qsm.core.params import specs
from napari_qsm.core.scan import Scan
from napari_test_helpers import assert_responsive, form_row_labels, start_ticks


@pytest.fixture
def errors(monkeypatch):
    seen = []
    import napari.utils.notifications as nt
    monkeypatch.setattr(nt, "show_error", lambda msg: seen.append(str(msg)))
    return seen


def _dock(viewer, qtbot):
    w = QSMWidget(viewer)
    viewer.window.add_dock_widget(w, name="QSM reconstruction")
    qtbot.waitUntil(lambda: w.inputs.last_error is None and "ready" in w.inputs.message.text(), timeout=5000)
    return w


def _wait_done(w, qtbot, timeout=60000):
    qtbot.waitUntil(lambda: not w.runner.running, timeout=timeout)


def _job_threads():
    return [t for t in threading.enumerate() if t.name == "napari-qsm-job" and t.is_alive()]


def test_inputs_autopicked_and_geometry_shown(phantom_viewer, qtbot, tiny_phantom):
    w = _dock(phantom_viewer, qtbot)
    assert w.inputs.field_combo.currentText() == "phantom field"
    assert w.inputs.mask_combo.currentText() == "phantom mask"
    assert w.inputs.mag_combo.currentText() == "phantom magnitude"
    assert "32×36×28 voxels" in w.inputs.grid_label.text() and "1.5×1.5×1.8 mm" in w.inputs.grid_label.text()
    np.testing.assert_allclose(w.inputs.b0_direction(), (0, 0, 1))
    assert "from the affine" in w.inputs.b0_info.text()
    # B0 and TE are shown for every unit (prefilled from the phantom's sidecar: 20 ms, 3 T)
    for i in (2, 1, 0):
        w.inputs.units_combo.setCurrentIndex(i)
        assert w.inputs.te_spin.isVisibleTo(w) and w.inputs.b0t_spin.isVisibleTo(w)
    assert w.inputs.te_spin.value() == pytest.approx(20.0) and w.inputs.b0t_spin.value() == pytest.approx(3.0)
    assert "B0 from the sidecar MagneticFieldStrength" in w.inputs.acq_info.text()
    # inline validation: an empty mask is reported before anything runs
    phantom_viewer.add_labels(np.zeros_like(phantom_viewer.layers["phantom mask"].data), name="empty",
                              scale=phantom_viewer.layers["phantom mask"].scale)
    w.inputs.mask_combo.select(phantom_viewer.layers["empty"])
    qtbot.waitUntil(lambda: "mask: empty" in w.inputs.message.text(), timeout=3000)
    # removing a chosen layer falls back to another one
    phantom_viewer.layers.remove("empty")
    qtbot.waitUntil(lambda: w.inputs.mask_combo.currentText() == "phantom mask", timeout=3000)


def test_forms_generated_from_parameter_records(phantom_viewer, qtbot, slow_method):
    w = _dock(phantom_viewer, qtbot)
    names = [w.method_combo.itemData(i) for i in range(w.method_combo.count())]
    # methods combining several head orientations (COSMOS) are left out, with the reason on the dock
    assert names == [m.name for m in available_methods() if not m.multi_scan]
    excluded = [m for m in available_methods() if m.multi_scan]
    assert w.excluded_note.isVisibleTo(w) == bool(excluded)
    for m in excluded:
        assert m.label in w.excluded_note.text() and "orientation" in w.excluded_note.text()
        with pytest.raises(ValueError):
            w.set_method(m.name)
    for m in [m for m in available_methods() if not m.multi_scan]:
        w.set_method(m.name)
        visible = [s.name for s in specs(m.params_cls) if s.widget != "hidden"]
        assert w.form.names() == visible
        if not m.multi_scan:
            assert w.form.values()  # defaults validate through the core
    w.set_method("slowtest")
    kinds = {n: type(w.form.widget_for(n)) for n in w.form.names()}
    assert kinds == {"steps": QSpinBox, "delay": QDoubleSpinBox, "mode": QComboBox, "strength": QComboBox,
                     "flag": QCheckBox, "fail_at": QSpinBox, "reference": QComboBox}  # every method: the χ reference
    assert "secret" not in kinds
    strength = w.form.widget_for("strength")
    strength.setCurrentText("auto")
    assert w.form.values()["strength"] == "auto"
    strength.setCurrentText("banana")
    assert w.form.errors() and "strength" in w.form.errors()[0]
    assert "d9534f" in strength.styleSheet()
    strength.setCurrentText("2.5")
    assert w.form.values()["strength"] == 2.5 and not w.form.errors()
    # values are kept per method
    w.form.widget_for("steps").setValue(17)
    w.set_method("tkd")
    w.set_method("slowtest")
    assert w.form.values()["steps"] == 17
    # devices: only the ones that exist
    from napari_qsm.core.device import available_devices
    assert [w.device_combo.itemData(i) for i in range(w.device_combo.count())] == [d for d, _ in available_devices()]


def test_tkd_end_to_end_replace_or_add(phantom_viewer, qtbot, tiny_phantom):
    w = _dock(phantom_viewer, qtbot)
    w.set_method("tkd")
    w.form.set_values({"threshold": 0.2})
    assert w.run()
    assert not w.run_button.isEnabled() and w.cancel_button.isEnabled()
    _wait_done(w, qtbot)
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()
    chi = phantom_viewer.layers[-1]
    field = phantom_viewer.layers["phantom field"]
    assert chi.name == "TKD δ=0.2"
    assert chi.colormap.name == "gray" and tuple(chi.contrast_limits) == (-0.15, 0.15)
    np.testing.assert_allclose(chi.scale, field.scale)
    np.testing.assert_allclose(chi.translate, field.translate)
    assert tuple(chi.axis_labels) == tuple(field.axis_labels)
    prov = chi.metadata["provenance"]
    assert prov["method"] == "tkd" and prov["parameters"]["threshold"] == 0.2 and prov["units"] == "ppm"
    assert prov["inputs"]["field"] == "phantom field"
    assert chi.metadata["axes"] == field.metadata["axes"]
    expected = reconstruct(Scan.from_phantom(tiny_phantom), "tkd", {"threshold": 0.2}, device="cpu").chi
    np.testing.assert_allclose(to_canonical(chi.data, chi.metadata["axes"]), expected, atol=1e-6)
    assert "done" in w.status.text()
    # re-run, replace: same layer updated
    n = len(phantom_viewer.layers)
    w.form.set_values({"threshold": 0.15})
    assert w.run()
    _wait_done(w, qtbot)
    assert len(phantom_viewer.layers) == n and chi.name == "TKD δ=0.15"
    # re-run, add: a new layer
    w.output_combo.setCurrentIndex(w.output_combo.findData("add"))
    assert w.run()
    _wait_done(w, qtbot)
    assert len(phantom_viewer.layers) == n + 1


def test_edited_b0_direction_is_used(phantom_viewer, qtbot, tiny_phantom):
    w = _dock(phantom_viewer, qtbot)
    for s, v in zip(w.inputs.b0_spins, (0.0, 0.5, 0.866)):
        s.setValue(v)
    assert "30.0° from the slice axis" in w.inputs.b0_info.text() and "edited" in w.inputs.b0_info.text()
    assert w.run()
    _wait_done(w, qtbot)
    prov = phantom_viewer.layers[-1].metadata["provenance"]
    np.testing.assert_allclose(prov["scan"]["b0_direction"], np.array([0, 0.5, 0.866]) / np.linalg.norm([0, 0.5, 0.866]),
                               atol=1e-5)
    w.inputs.b0_reset.click()
    np.testing.assert_allclose(w.inputs.b0_direction(), (0, 0, 1))


def test_long_run_progress_responsive_and_cancel(phantom_viewer, qtbot, slow_method):
    w = _dock(phantom_viewer, qtbot)
    w.set_method("slowtest")
    w.form.set_values({"steps": 2000, "delay": 0.01})
    timer, ticks = start_ticks()
    n_layers = len(phantom_viewer.layers)
    assert w.run()
    assert not w.inputs.isEnabled() and not w.form.isEnabled()
    qtbot.waitUntil(lambda: "slow step" in w.status.text(), timeout=5000)
    qtbot.waitUntil(lambda: "slowtest (preview)" in phantom_viewer.layers, timeout=5000)  # live preview
    assert phantom_viewer.layers["slowtest (preview)"].colorbar.visible  # a χ estimate shows its scale
    assert_responsive(qtbot, ticks)
    assert w.runner.pbar is not None and w.runner.pbar.n > 0  # napari progress bar fed by Progress
    w.cancel_button.click()
    _wait_done(w, qtbot, timeout=5000)
    timer.stop()
    assert "cancelled" in w.status.text()
    assert len(phantom_viewer.layers) == n_layers  # nothing added, preview removed
    assert w.run_button.isEnabled() and w.inputs.isEnabled()
    qtbot.waitUntil(lambda: not _job_threads(), timeout=5000)


def test_solver_error_and_bad_inputs_are_notifications(phantom_viewer, qtbot, slow_method, errors):
    w = _dock(phantom_viewer, qtbot)
    w.set_method("slowtest")
    w.form.set_values({"steps": 10, "delay": 0.0, "fail_at": 3})
    n = len(phantom_viewer.layers)
    assert w.run()
    _wait_done(w, qtbot)
    assert errors and "failed on purpose" in errors[-1]
    assert len(phantom_viewer.layers) == n and w.run_button.isEnabled()
    # bad parameter → no run, inline + notification
    w.form.set_values({"fail_at": 0})
    w.form.widget_for("strength").setCurrentText("-3")
    assert not w.run()
    assert "strength" in errors[-1] and "minimum" in errors[-1]
    # bad input: NaN inside the mask
    field = phantom_viewer.layers["phantom field"]
    bad = field.data.copy()
    bad[bad.shape[0] // 2, bad.shape[1] // 2, bad.shape[2] // 2] = np.nan
    phantom_viewer.add_image(bad, name="nan field", scale=field.scale, translate=field.translate,
                             metadata=dict(field.metadata))
    w.inputs.field_combo.select(phantom_viewer.layers["nan field"])
    w.set_method("tkd")
    assert not w.run()
    assert "NaN" in errors[-1] and "field" in errors[-1]
    assert "NaN" in w.inputs.message.text()
    # missing B0 for Hz never reaches the core: here B0 has a default, so check rad → TE message path
    w.inputs.field_combo.select(field)
    w.inputs.mask_combo.select(None)
    phantom_viewer.layers.remove("phantom mask")
    phantom_viewer.layers.remove("phantom labels")
    qtbot.wait(300)
    assert not w.run() and "mask" in errors[-1]


def test_closing_the_viewer_stops_the_run(make_napari_viewer, qtbot, slow_method, tiny_phantom):
    from napari_qsm._napari.sample_data import phantom_layer_data
    from napari_test_helpers import add_layer_data

    viewer = make_napari_viewer()
    add_layer_data(viewer, phantom_layer_data(tiny_phantom))
    w = _dock(viewer, qtbot)
    w.set_method("slowtest")
    w.form.set_values({"steps": 100000, "delay": 0.01})
    assert w.run()
    qtbot.waitUntil(lambda: bool(_job_threads()), timeout=3000)
    token = w.runner.token
    viewer.close()
    assert token.is_set()
    qtbot.waitUntil(lambda: not _job_threads(), timeout=5000)


def test_medi_few_iterations(phantom_viewer, qtbot):
    names = [m.name for m in available_methods()]
    if "medi" not in names:
        pytest.skip("MEDI not registered")
    w = _dock(phantom_viewer, qtbot)
    w.set_method("medi")
    w.form.set_values({"max_iter": 1, "cg_max_iter": 5})
    assert w.run()
    _wait_done(w, qtbot, timeout=120000)
    chi = phantom_viewer.layers[-1]
    assert chi.metadata["provenance"]["method"] == "medi", w.status.text()
    assert chi.name == "MEDI λ=1000 cg_max_iter=5 max_iter=1"
    assert np.isfinite(chi.data).all() and np.abs(chi.data).max() > 0


def test_dsbn_runs_with_weights_file(phantom_viewer, qtbot, tmp_path):
    names = [m.name for m in available_methods()]
    if "dsbn" not in names:
        pytest.skip("DSBN not registered")
    import torch

    from napari_qsm.nn.unet import NetConfig, QSMInvNet

    # a small randomly initialised QSMInvNet+ checkpoint: exercises the weights path of the dock
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_dsbn.pt"
    torch.save(QSMInvNet(NetConfig(base_width=4)).state_dict(), str(ckpt))
    w = _dock(phantom_viewer, qtbot)
    w.set_method("dsbn")
    assert w.weights_edit.isVisibleTo(w)
    w.set_weights(ckpt)
    assert w.run()
    _wait_done(w, qtbot, timeout=300000)
    last = phantom_viewer.layers[-1]
    assert last.metadata.get("role") == "chi", w.status.text()
    assert last.metadata["provenance"]["method"] == "dsbn"
    assert last.data.shape == phantom_viewer.layers["phantom field"].data.shape
    # a bad weights file is a notification, not a crash
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    w.set_weights(bad)
    n = len(phantom_viewer.layers)
    assert w.run()
    _wait_done(w, qtbot, timeout=60000)
    assert len(phantom_viewer.layers) == n and "weights" in w.status.text()


@pytest.mark.parametrize("which", ["reconstruct", "adapt", "field"])
def test_docks_closed_then_layers_change(phantom_viewer, qtbot, which):
    """A closed dock leaves no callback on the viewer's events (nothing keeps it alive), and later layer
    changes raise nothing. The Field dock's callbacks were lambdas that kept it, and its deleted timer, alive."""
    import gc

    from napari_qsm._napari.adapt_widget import AdaptWidget
    from napari_qsm._napari.field_widget import FieldWidget

    cls = {"reconstruct": QSMWidget, "adapt": AdaptWidget, "field": FieldWidget}[which]
    ev = phantom_viewer.layers.events

    def live():
        return [len(e.callbacks) for e in (ev.inserted, ev.removed)]

    def churn():  # a layer added, renamed and removed: what reaches the docks' callbacks
        layer = phantom_viewer.add_image(np.zeros((4, 5, 6), np.float32), name="later")
        layer.name = "renamed"
        phantom_viewer.layers.remove(layer)

    churn()
    before = live()
    w = cls(phantom_viewer)
    dock = phantom_viewer.window.add_dock_widget(w, name=cls.__name__)
    qtbot.wait(50)
    assert live() > before  # the dock listens while it is open
    phantom_viewer.window.remove_dock_widget(dock)  # napari orphans the widget; the last reference goes here
    del w, dock
    gc.collect()
    qtbot.wait(100)
    with qtbot.capture_exceptions() as exceptions:
        churn()
        qtbot.wait(300)  # longer than the panels' validation delay
    assert exceptions == []
    assert live() == before


def test_inputs_from_files_oblique(make_napari_viewer, qtbot, oblique_files):
    """Files opened from the dock (any order): roles picked by name, exact B0 from the affine, and the
    dock's TKD equals the one from the files (oblique, anisotropic, stored sagittally)."""
    from napari_qsm.core.io import load_scan

    viewer = make_napari_viewer()
    w = QSMWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.inputs.open_files([oblique_files["mask"], oblique_files["magnitude"], oblique_files["field"]])
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    names = w.inputs.input_names()
    assert (names["field"], names["mask"], names["magnitude"]) == ("sub-01_field", "sub-01_mask", "sub-01_magnitude")
    files_scan = load_scan(oblique_files["field"], oblique_files["mask"], oblique_files["magnitude"])
    np.testing.assert_allclose(w.inputs.b0_direction(), files_scan.b0_direction, rtol=0, atol=1e-12)  # round-off
    assert "from the affine" in w.inputs.b0_info.text()
    w.set_method("tkd")
    assert w.run()
    _wait_done(w, qtbot)
    chi = viewer.layers[-1]
    expected = reconstruct(files_scan, "tkd", device="cpu").chi
    np.testing.assert_allclose(to_canonical(chi.data, chi.metadata["axes"]), expected, rtol=0, atol=1e-7)
    # a layer the user picks by hand is kept even when a better-named one arrives
    w.inputs.mag_combo.setCurrentIndex(0)
    w.inputs._user_picked[id(w.inputs.mag_combo)] = True
    viewer.add_image(np.ones_like(viewer.layers["sub-01_magnitude"].data), name="other_mag",
                     metadata={"role": "magnitude"})
    qtbot.wait(300)
    assert w.inputs.mag_combo.layer() is None


GAMMA_BAR = 42.577478  # MHz/T


def _write_bids_scan(ph, d, sidecar):
    """Tiny phantom as NIfTI files (field in ppm, mask, magnitude) with a BIDS-style sidecar next to the field."""
    import json

    from napari_test_helpers import save_stored
    paths = [save_stored(ph.mask, ph.affine, d / "sub-01_mask.nii.gz", dtype=np.uint8),
             save_stored(ph.magnitude, ph.affine, d / "sub-01_magnitude.nii.gz"),
             save_stored(ph.field, ph.affine, d / "sub-01_field.nii.gz")]
    (d / "sub-01_field.json").write_text(json.dumps(sidecar))
    return paths


def test_b0_and_te_for_ppm_field_reach_methods_and_provenance(make_napari_viewer, qtbot, tiny_phantom, tmp_path,
                                                             monkeypatch):
    """A ppm field: the dock shows B0 and TE (prefilled from the sidecar: ImagingFrequency / γ̄, EchoTime),
    hands them to the scan MEDI runs on (its ppm → rad scale is 2π·ΔTE·γ̄·B0 with THIS B0), and records them
    in the layer's provenance and in the sidecar the writer saves; values typed in are used and recorded too."""
    import json

    import napari_qsm._napari.reconstruct_dock as wmod
    from napari_qsm._napari.writer import write_image

    freq = 123.2  # MHz: a "3 T" scanner at 2.8936 T
    paths = _write_bids_scan(tiny_phantom, tmp_path, {"ImagingFrequency": freq, "MagneticFieldStrength": 3,
                                                      "EchoTime": 0.0245})
    seen = []
    real = wmod.reconstruct
    monkeypatch.setattr(wmod, "reconstruct", lambda scan, *a, **k: seen.append(scan) or real(scan, *a, **k))
    viewer = make_napari_viewer()
    w = QSMWidget(viewer)
    viewer.window.add_dock_widget(w)
    w.inputs.open_files(paths)
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    assert w.inputs.units() == "ppm"
    inp = w.inputs
    assert inp.b0t_spin.isVisibleTo(w) and inp.te_spin.isVisibleTo(w)
    assert inp.b0t_label.text() == "Field strength (B0)" and inp.te_label.text() == "Echo time (TE)"
    b0 = freq / GAMMA_BAR
    assert inp.b0t_spin.value() == pytest.approx(b0, abs=1e-4) and inp.te_spin.value() == pytest.approx(24.5)
    assert "sidecar ImagingFrequency" in inp.acq_info.text() and "sidecar EchoTime" in inp.acq_info.text()

    # MEDI gets them: its phase scale follows the B0 of the file, not 3 T
    w.set_method("medi")
    w.form.set_values({"max_iter": 1, "cg_max_iter": 3})
    delta_te = w.form.values()["delta_te"]
    assert w.run()
    _wait_done(w, qtbot, timeout=120000)
    assert seen[-1].b0_tesla == pytest.approx(b0, abs=1e-4) and seen[-1].te == pytest.approx(0.0245)
    chi = viewer.layers[-1]
    prov = chi.metadata["provenance"]
    assert prov["method"] == "medi", w.status.text()
    scale = prov["extras"]["phase_scale_rad_per_ppm"]
    assert scale == pytest.approx(2 * np.pi * delta_te * GAMMA_BAR * b0, rel=1e-4)
    assert prov["acquisition"]["b0_tesla"] == pytest.approx(b0, abs=1e-4)
    assert prov["acquisition"]["te"] == pytest.approx(0.0245)
    assert prov["acquisition"]["b0_from"] == "sidecar ImagingFrequency"
    assert prov["acquisition"]["te_from"] == "sidecar EchoTime"

    # values typed in by hand are the ones used and recorded, and reach the saved sidecar
    inp.b0t_spin.setValue(7.0)
    inp.te_spin.setValue(10.0)
    assert "B0 entered" in inp.acq_info.text()
    w.set_method("tkd")
    assert w.run()
    _wait_done(w, qtbot)
    assert seen[-1].b0_tesla == pytest.approx(7.0) and seen[-1].te == pytest.approx(0.010)
    chi = viewer.layers[-1]
    acq = chi.metadata["provenance"]["acquisition"]
    assert (acq["b0_tesla"], acq["te"], acq["b0_from"], acq["te_from"]) == (pytest.approx(7.0), pytest.approx(0.010),
                                                                           "entered", "entered")
    out = write_image(str(tmp_path / "chi_tkd.nii.gz"), chi.data,
                      {"name": chi.name, "metadata": chi.metadata, "scale": chi.scale, "translate": chi.translate})
    side = json.loads((tmp_path / "chi_tkd.json").read_text())
    assert out and side["acquisition"]["b0_tesla"] == pytest.approx(7.0) and side["acquisition"]["te"] == pytest.approx(0.01)


def test_ppm_field_without_acquisition_facts_says_defaults_are_assumed(make_napari_viewer, qtbot, tiny_phantom,
                                                                       tmp_path):
    """No sidecar, no TE in the header: the dock shows 3 T / 20 ms and says they are assumed (not silently)."""
    viewer = make_napari_viewer()
    w = QSMWidget(viewer)
    viewer.window.add_dock_widget(w)
    paths = _write_bids_scan(tiny_phantom, tmp_path, {})
    (tmp_path / "sub-01_field.json").unlink()
    w.inputs.open_files(paths)
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=5000)
    assert w.inputs.b0t_spin.isVisibleTo(w) and w.inputs.te_spin.isVisibleTo(w)
    text = w.inputs.acq_info.text()
    assert "B0 not in the file" in text and "TE not in the file" in text and "assumed" in text
    names = w.inputs.input_names()
    assert (names["b0_tesla"], names["te"], names["b0_from"], names["te_from"]) == (3.0, 0.02, "default", "default")


def test_raw_phase_and_total_field_are_not_the_default_local_field(phantom_viewer, qtbot):
    """Layers named as a raw phase or a B0 map arrive after the local field: the dock keeps the local field;
    with no local field open it picks none and says why; picked by hand, it warns."""
    w = _dock(phantom_viewer, qtbot)
    field = phantom_viewer.layers["phantom field"]
    kw = dict(scale=field.scale, translate=field.translate)
    phantom_viewer.add_image(np.angle(np.exp(1j * 30 * field.data)).astype(np.float32),
                             name="sub-01_echo-1_part-phase_MEGRE", **kw)
    phantom_viewer.add_image(field.data * 127.7, name="sub-01_fieldmap", **kw)
    qtbot.wait(300)
    assert w.inputs.field_combo.currentText() == "phantom field"
    # only non-local fields left: none is picked, and the message says which were skipped
    phantom_viewer.layers.remove("phantom field")
    qtbot.waitUntil(lambda: w.inputs.last_error is not None, timeout=3000)
    assert w.inputs.field_combo.layer() is None
    msg = w.inputs.message.text()
    assert "raw phase" in msg and "total field" in msg and "not picked as the local field" in msg
    # chosen by hand it is used, with a warning
    w.inputs.field_combo.select(phantom_viewer.layers["sub-01_fieldmap"])
    qtbot.waitUntil(lambda: "ready" in w.inputs.message.text(), timeout=3000)
    assert "not a local field" in w.inputs.message.text()


def _echo_map(viewer, name, data, role, **md):
    """An image layer on the phantom field's grid, with the field's geometry metadata and ``role``."""
    field = viewer.layers["phantom field"]
    meta = {k: v for k, v in field.metadata.items() if k not in ("role", "units")}
    return viewer.add_image(data.astype(np.float32), name=name, scale=field.scale, translate=field.translate,
                            metadata=dict(meta, role=role, **md), visible=False)


def test_noise_and_r2star_maps_reach_the_scan_and_medi(phantom_viewer, qtbot):
    """The Field dock's N_std and R2* layers are picked by role and become scan.noise_std / scan.r2star (MEDI uses them)."""
    if "medi" not in [m.name for m in available_methods()]:
        pytest.skip("MEDI not registered")
    w = _dock(phantom_viewer, qtbot)
    assert w.inputs.noise_combo.currentText() == "(none)" and w.inputs.r2star_combo.currentText() == "(none)"
    assert w.inputs.build_scan().noise_std is None
    field = phantom_viewer.layers["phantom field"]
    rng = np.random.default_rng(0)
    noise = (0.01 + 0.02 * rng.random(field.data.shape)).astype(np.float32)
    r2 = (10.0 + 40.0 * rng.random(field.data.shape)).astype(np.float32)
    _echo_map(phantom_viewer, "raw noise (N_std)", noise, "noise_std", units="ppm")
    _echo_map(phantom_viewer, "raw R2*", r2, "r2star", units="1/s")
    _echo_map(phantom_viewer, "wrong grid", noise[:, :-2], "noise_std")  # never offered for this field
    qtbot.waitUntil(lambda: w.inputs.noise_combo.currentText() == "raw noise (N_std)", timeout=3000)
    assert w.inputs.r2star_combo.currentText() == "raw R2*"
    axes = field.metadata["axes"]
    scan = w.inputs.build_scan()
    np.testing.assert_array_equal(scan.noise_std, to_canonical(noise, axes))
    np.testing.assert_array_equal(scan.r2star, to_canonical(r2, axes))
    assert scan.source["noise_std"] == "layer:raw noise (N_std)"
    # MEDI started from the dock weights the data by 1/N_std (its provenance says so)
    w.set_method("medi")
    w.form.set_values({"max_iter": 1, "cg_max_iter": 5})
    assert w.run()
    _wait_done(w, qtbot, timeout=120000)
    prov = phantom_viewer.layers[-1].metadata["provenance"]
    assert prov["method"] == "medi", w.status.text()
    assert prov["extras"]["data_weighting"] == "noise_std"
    assert prov["inputs"]["noise_std"] == "raw noise (N_std)" and prov["inputs"]["r2star"] == "raw R2*"
    # "(none)" chosen by hand stays: no noise map, MEDI falls back to the magnitude
    w.inputs.noise_combo.setCurrentIndex(0)
    w.inputs.noise_combo.activated.emit(0)
    _echo_map(phantom_viewer, "another noise", noise, "noise_std")
    qtbot.wait(300)
    assert w.inputs.noise_combo.currentText() == "(none)" and w.inputs.build_scan().noise_std is None


def test_echo_maps_of_another_field_run_are_not_picked(phantom_viewer, qtbot):
    w = _dock(phantom_viewer, qtbot)
    field = phantom_viewer.layers["phantom field"]
    field.metadata = dict(field.metadata, field_steps=[{"family": "fit", "name": "linear", "seconds": 1.0}])
    other = [{"family": "fit", "name": "linear", "seconds": 2.0}]
    _echo_map(phantom_viewer, "other run noise", np.ones(field.data.shape), "noise_std", field_steps=other)
    qtbot.wait(300)
    assert w.inputs.noise_combo.currentText() == "(none)"
    _echo_map(phantom_viewer, "same run noise", np.ones(field.data.shape), "noise_std",
              field_steps=field.metadata["field_steps"])
    qtbot.waitUntil(lambda: w.inputs.noise_combo.currentText() == "same run noise", timeout=3000)


def test_parameter_rows_are_words(phantom_viewer, qtbot):
    """Row labels of every offered method are words a person writes: no underscores, capitalised."""
    from qtpy.QtWidgets import QLabel

    w = _dock(phantom_viewer, qtbot)
    for i in range(w.method_combo.count()):
        w.method_combo.setCurrentIndex(i)
        texts = form_row_labels(w.form)
        assert len(texts) == len(w.form.names())
        assert not [t for t in texts if "_" in t or not t[:1].isupper()], texts
    w.set_method("tkd")
    assert {"Threshold δ", "Padding factor"} <= {la.text() for la in w.form.findChildren(QLabel)}
