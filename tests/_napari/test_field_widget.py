"""The Field dock: raw echoes (layers) → local field in a worker, equal to the headless run; cancel; hand-off."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_test_helpers import RAW_VS, add_layer_data, assert_responsive, start_ticks



@pytest.fixture(scope="module")
def headless_run(raw_head):
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    return local_field(raw_head.to_echoes(name="raw"), FieldRecipe(), device="cpu")


def _field_viewer(make_napari_viewer, raw_head):
    from napari_qsm._napari.field_widget import FieldWidget
    from napari_qsm._napari.reader import echoes_layer_data

    viewer = make_napari_viewer()
    add_layer_data(viewer, echoes_layer_data(raw_head.to_echoes(name="raw")))
    w = FieldWidget(viewer)
    viewer.window.add_dock_widget(w, name="Field")
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))
    return viewer, w


def _to_canonical(layer):
    from napari_qsm._napari.layers import to_canonical
    return to_canonical(np.asarray(layer.data), layer.metadata["axes"])


def test_dock_run_equals_headless_and_hands_off(make_napari_viewer, qtbot, raw_head, headless_run):
    from napari_qsm._napari.compare.dock import CompareWidget
    from napari_qsm._napari.reconstruct_dock import QSMWidget

    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    rec = QSMWidget(viewer)
    viewer.window.add_dock_widget(rec, name="QSM reconstruction")
    cmp_ = CompareWidget(viewer)
    viewer.window.add_dock_widget(cmp_, name="Compare")
    # the echoes are found, with TE and B0 from the layer metadata
    assert w.magnitude_source().layer.name == "raw magnitude"
    assert w.phase_source().layer.name == "raw phase"
    assert w.echo_times() == pytest.approx(list(raw_head.echo_times))
    assert w.b0_spin.value() == pytest.approx(raw_head.b0_tesla)
    assert [w.step_combos[f].currentData() for f in ("fit", "unwrap", "mask", "background")] == \
        ["linear", "quality", "threshold", "lbv"]  # LBV: the default by docs/benchmarks/field.md
    assert w.run()
    assert w.cancel_button.isEnabled() and not w.run_button.isEnabled()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    assert "local field" in w.status.text() and "✓" in w.status.text(), w.status.text()
    names = [la.name for la in viewer.layers]
    for n in ("raw total field", "raw brain mask", "raw local field", "raw eroded mask", "raw R2* (1/s)",
              "raw noise (N_std)", "raw combined magnitude"):
        assert n in names
    local = viewer.layers["raw local field"]
    assert local.ndim == 3 and local.metadata["role"] == "field" and local.metadata["units"] == "ppm"
    np.testing.assert_allclose(_to_canonical(local), headless_run.scan.field, atol=1e-4)
    np.testing.assert_array_equal(_to_canonical(viewer.layers["raw eroded mask"]) > 0, headless_run.scan.mask)
    np.testing.assert_allclose(_to_canonical(viewer.layers["raw R2* (1/s)"]), headless_run.total.r2star, atol=1e-3)
    # handed to the Reconstruct dock, which builds the same scan from the layers
    qtbot.waitUntil(lambda: rec.inputs.field_combo.currentText() == "raw local field", timeout=3000)
    assert rec.inputs.mask_combo.currentText() == "raw eroded mask"
    assert rec.inputs.mag_combo.currentText() == "raw combined magnitude"
    assert cmp_.picker.field_combo.currentText() == "raw local field"
    assert cmp_.picker.mask_combo.currentText() == "raw eroded mask"
    scan = rec.inputs.build_scan()
    np.testing.assert_allclose(scan.field, headless_run.scan.field, atol=1e-4)
    assert scan.b0_tesla == pytest.approx(raw_head.b0_tesla)
    np.testing.assert_allclose(scan.b0_direction, headless_run.scan.b0_direction, atol=1e-6)
    # the local field says it came from LBV: MEDI's weak_harmonic=auto is on for it, off for the total field
    from napari_qsm._napari.layers import scan_from_layers
    from napari_qsm.core.inversion.medi import MEDIParams, weak_harmonic_for
    assert scan.source["field_facts"] == {"BackgroundRemoval": "lbv"}
    assert weak_harmonic_for(scan, MEDIParams()) == (True, "auto → on: local field from LBV (this package's "
                                                           "background removal)")
    total = scan_from_layers(viewer.layers["raw total field"], viewer.layers["raw brain mask"])
    assert weak_harmonic_for(total, MEDIParams())[0] is False
    # a second run replaces the maps instead of adding more
    n_layers = len(viewer.layers)
    w.set_step("background", "resharp")
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    assert len(viewer.layers) == n_layers
    assert viewer.layers["raw local field"].metadata["field_steps"][-1]["name"] == "resharp"
    assert viewer.layers["raw local field"].metadata["background_removal"] == "resharp"
    assert "background_removal" not in viewer.layers["raw total field"].metadata


def test_cancel_stops_the_run_and_adds_nothing(make_napari_viewer, qtbot, raw_head, monkeypatch):
    from napari_qsm import methods
    from napari_qsm.core.field.background import STEPS as BG
    from napari_qsm.core.progress import check_cancel
    from napari_qsm.methods import Step

    def slow(field, mask, p, *, cancel=None, **_):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 30:
            check_cancel(cancel)
            time.sleep(0.02)
        return field, mask

    methods._load_all()
    monkeypatch.setitem(methods._STEPS, ("background", "slowtest"),
                        Step("background", "slowtest", "Slow test", BG[0].params_cls, slow, order=999))
    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    w.set_step("background", "slowtest")
    n = len(viewer.layers)
    timer, ticks = start_ticks()
    assert w.run()
    assert_responsive(qtbot, ticks, seconds=1.5)  # the echo fit, mask and unwrapping run off the event loop
    timer.stop()
    assert w.runner.running
    t0 = time.perf_counter()
    w.cancel()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=10000)
    assert time.perf_counter() - t0 < 5
    assert "cancelled" in w.status.text()
    assert len(viewer.layers) == n and w.run_button.isEnabled()


def test_forms_labels_and_bad_input(make_napari_viewer, qtbot, raw_head):
    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    w.set_step("background", "resharp")
    assert "radius" in w.form("background").names()
    from qtpy.QtWidgets import QLabel
    labels = {la.text() for la in w.findChildren(QLabel)}
    assert {"Echo fit", "Unwrapping", "Brain mask", "Background removal", "Radius (mm)",
            "Echo times (ms)"} <= labels
    assert not any("_" in t for t in labels if t in {"Radius (mm)"})
    # echo times that do not match the echoes: a clear error, no run
    w.te_edit.setText("4, 8")
    w._edited("te")
    assert not w.run()
    assert "te" in w.status.text() and "2 echo times for 5 echoes" in w.status.text()
    w.te_edit.setText("4, 8, x")
    assert not w.run() and "not numbers" in w.status.text()


def test_echo_last_layers_turn_echo_first(make_napari_viewer, qtbot, raw_head):
    """Echo-last 4-D layers added by hand (echo_axis 3): the dock reads them and lines them up with its 3-D maps."""
    from napari_qsm._napari.field_sources import source_array
    from napari_qsm._napari.field_widget import FieldWidget
    from napari_qsm._napari.reader import echoes_layer_data

    viewer = make_napari_viewer()
    for data, kw, typ in echoes_layer_data(raw_head.to_echoes(name="raw")):
        kw = dict(kw)
        order = [1, 2, 3, 0]
        for k in ("scale", "translate", "units", "axis_labels"):
            kw[k] = tuple(kw[k][i] for i in order)
        kw["metadata"] = dict(kw["metadata"], echo_axis=3)
        viewer.add_image(np.moveaxis(data, 0, -1), **kw)
    viewer.dims.order = (3, 0, 1, 2)  # as the sample shows them: echo on a slider, (j, i) in the canvas
    viewer.dims.set_point(0, float(viewer.layers["raw magnitude"].translate[0] + 20 * RAW_VS[2]))
    viewer.dims.set_point(3, 2.0)
    w = FieldWidget(viewer)
    src = w.magnitude_source()
    assert src.echo_axis == 3
    np.testing.assert_array_equal(source_array(src, src.metadata["axes"]), raw_head.to_echoes().magnitude)
    w.device_combo.setCurrentIndex(w.device_combo.findData("cpu"))
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    mag = viewer.layers["raw magnitude"]
    assert mag.metadata["echo_axis"] == 0 and mag.data.shape[0] == 5
    local = viewer.layers["raw local field"]
    np.testing.assert_allclose(np.asarray(mag.scale)[1:], local.scale)
    assert tuple(viewer.dims.order) == (0, 1, 2, 3) and viewer.dims.point[0] == pytest.approx(2.0)
    assert viewer.dims.point[1] == pytest.approx(float(local.translate[0] + 20 * RAW_VS[2]))


def test_a_mask_layer_replaces_the_mask_step(make_napari_viewer, qtbot, raw_head, headless_run):
    from napari_qsm._napari.layers import to_layer_order

    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    user = headless_run.brain_mask.copy()
    user[:, :, : user.shape[2] // 2] = False  # half a brain: clearly not what the mask step makes
    mag = viewer.layers["raw magnitude"]
    viewer.add_labels(to_layer_order(user.astype(np.uint8), mag.metadata["axes"]), name="my mask",
                      scale=mag.scale[1:], translate=mag.translate[1:], metadata={"axes": mag.metadata["axes"]})
    qtbot.waitUntil(lambda: w.mask_combo.findText("my mask") >= 0, timeout=3000)
    w.mask_combo.setCurrentText("my mask")
    assert not w.step_combos["mask"].isEnabled()
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    np.testing.assert_array_equal(_to_canonical(viewer.layers["raw brain mask"]) > 0, user)
    assert viewer.layers["raw local field"].metadata["field_steps"][1]["name"] == "user"


def test_brain_mask_corrected_by_hand_is_used_by_the_next_run(make_napari_viewer, qtbot, raw_head):
    """Issue 24: the run's brain mask is a Labels layer; painting it or Erode / Dilate makes it the mask of the
    next run (the mask step is skipped), and the hand-off gives the other docks the mask eroded from it."""
    from napari_qsm._napari.field_mask import morph_mask

    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    assert not w.change_mask("erode") and "no brain mask yet" in w.status.text()
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    brain = viewer.layers["raw brain mask"]
    assert brain.visible and w.mask_combo.currentText() == "(none: compute it)"
    first = np.asarray(brain.data) > 0
    # painting with napari's labels tools makes the layer the dock's mask
    idx = tuple(int(i) for i in np.argwhere(~first)[0])
    brain.paint(idx, 1, refresh=True)
    qtbot.waitUntil(lambda: w.mask_combo.currentText() == "raw brain mask", timeout=3000)
    assert not w.step_combos["mask"].isEnabled()
    painted = np.asarray(brain.data) > 0
    assert painted.sum() > first.sum()
    # Erode (one voxel): the next run uses exactly that mask
    w.erode_button.click()
    eroded = np.asarray(brain.data) > 0
    np.testing.assert_array_equal(eroded, morph_mask(painted, "erode"))
    assert eroded.sum() < painted.sum() and "the next Run uses this mask" in w.mask_info.text()
    assert w.run()
    qtbot.waitUntil(lambda: not w.runner.running, timeout=60000)
    local = viewer.layers["raw local field"]
    assert local.metadata["field_steps"][1]["name"] == "user"
    np.testing.assert_array_equal(np.asarray(viewer.layers["raw brain mask"].data) > 0, eroded)
    handed = np.asarray(viewer.layers["raw eroded mask"].data) > 0
    assert handed.sum() > 0 and not (handed & ~eroded).any()  # eroded from the corrected mask
    w.dilate_button.click()
    np.testing.assert_array_equal(np.asarray(brain.data) > 0, morph_mask(eroded, "dilate"))


def test_field_forms_speak_words(make_napari_viewer, qtbot, raw_head):
    """No code names in the step choices, and step descriptions are never cut inside a word."""
    import html

    from qtpy.QtWidgets import QComboBox

    from napari_qsm._napari.field_words import short_doc
    from napari_qsm.methods import available_steps

    viewer, w = _field_viewer(make_napari_viewer, raw_head)
    for fam in w.step_combos:
        for s in available_steps(fam):
            w.set_step(fam, s.name)
            form = w.form(fam)
            for name in form.names():
                c = form.widget_for(name)
                if isinstance(c, QComboBox) and not c.isEditable():
                    texts = [c.itemText(i) for i in range(c.count())]
                    assert not any(t in ("mcpc3ds", "template", "sincos", "voxel", "global", "origin", "auto") for t in texts), texts
            doc = w.step_docs[fam].text()
            assert w.step_docs[fam].toolTip() == s.doc
            short = short_doc(s.doc)
            assert html.escape(short) in doc
            words = {x.strip("().,;:") for x in s.doc.split()}
            shown = short.replace("…", "").split()
            assert shown[-1].strip("().,;:") in words, (s.name, short)  # the last word shown is a whole word
            assert short.count("(") == short.count(")"), short
    long = "word " * 80 + "end."
    assert short_doc(long).endswith("word …") and len(short_doc(long)) <= 202


def test_a_closed_field_dock_leaves_no_pending_call(make_napari_viewer, qtbot, raw_head, monkeypatch):
    """With raw echoes open the Field dock queues a call that brings it to the front. That call was a
    free-standing QTimer.singleShot holding the dock: deleted before it ran, the dock (and its viewer) was
    kept until it ran. The dock's timers are now its children and die with it: the call never runs."""
    from qtpy.QtCore import QCoreApplication, QEvent

    import napari_qsm._napari.field_widget as fw
    from napari_qsm._napari.reader import echoes_layer_data

    calls = []
    monkeypatch.setattr(fw, "raise_dock", lambda w: calls.append(w))
    viewer = make_napari_viewer()
    add_layer_data(viewer, echoes_layer_data(raw_head.to_echoes(name="raw")))
    w = fw.FieldWidget(viewer)
    w.refresh_sources()                       # raw echoes, no local field: the raise is queued
    assert w._fronted
    w.deleteLater()
    del w
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)   # deletes; runs no timer
    qtbot.wait(100)                           # a queued call would run now
    assert calls == []
