"""Every dock of the manifest opened the way napari opens it (Plugins menu → ``add_plugin_dock_widget``).

napari hands each dock its own ``PublicOnlyProxy`` of the viewer, and only to widget classes whose
``__init__`` asks for ``napari_viewer``; tests that build the docks with the bare viewer miss both.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from napari_test_helpers import MANIFEST, add_layer_data

WIDGETS = [w["display_name"] for w in yaml.safe_load(open(MANIFEST))["contributions"]["widgets"]]


def test_the_manifest_lists_five_docks():
    assert sorted(WIDGETS) == sorted(["QSM reconstruction", "Compare", "Adapt network (QSMInvNet+)", "Batch results",
                                      "Field"])


@pytest.mark.parametrize("name", WIDGETS)
def test_every_manifest_dock_opens_from_the_plugins_menu(make_napari_viewer, qtbot, name):
    from napari.utils._proxies import PublicOnlyProxy
    from qtpy.QtWidgets import QWidget

    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    qtbot.wait(50)
    assert isinstance(widget, QWidget), type(widget)
    assert dock.isVisible() or not viewer.window._qt_window.isVisible()
    v = getattr(widget, "viewer", None)
    if v is not None:  # napari gave the dock its own proxy, which the dock keeps
        assert isinstance(v, PublicOnlyProxy)


def test_field_run_hands_off_to_docks_opened_by_napari(make_napari_viewer, qtbot, raw_head):
    """Field → Run → the local field, eroded mask and magnitude are chosen in Reconstruct, Adapt and Compare,
    each opened through napari (each with its own viewer proxy)."""
    from napari_qsm._napari.reader import echoes_layer_data

    viewer = make_napari_viewer()
    add_layer_data(viewer, echoes_layer_data(raw_head.to_echoes(name="raw")))
    docks = {}
    for name in ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare", "Field"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    fld = docks["Field"]
    rec, adapt, cmp_ = docks["QSM reconstruction"], docks["Adapt network (QSMInvNet+)"], docks["Compare"]
    assert fld.viewer is not rec.viewer  # two proxies of one viewer, as in napari
    fld.device_combo.setCurrentIndex(fld.device_combo.findData("cpu"))
    assert fld.handoff_check.isChecked()
    assert fld.run()
    qtbot.waitUntil(lambda: not fld.runner.running, timeout=60000)
    assert "✓" in fld.status.text(), fld.status.text()
    for dock in (rec, adapt):
        assert dock.inputs.field_combo.currentText() == "raw local field"
        assert dock.inputs.mask_combo.currentText() == "raw eroded mask"
        assert dock.inputs.mag_combo.currentText() == "raw combined magnitude"
    assert cmp_.picker.field_combo.currentText() == "raw local field"
    assert cmp_.picker.mask_combo.currentText() == "raw eroded mask"
    offered = [cmp_.picker.results_list.item(i).text() for i in range(cmp_.picker.results_list.count())]
    assert "raw R2* (1/s)" not in offered  # R2* is not a χ map
    # the Reconstruct dock builds its scan from the handed-off layers: the eroded mask, where the field is defined
    scan = rec.inputs.build_scan()
    eroded = np.asarray(viewer.layers["raw eroded mask"].data) > 0
    assert int(scan.mask.sum()) == int(eroded.sum())
    # and it knows which background removal made the field (MEDI's weak_harmonic=auto turns on for it)
    from napari_qsm.core.inversion.medi import MEDIParams, weak_harmonic_for
    assert scan.source["field_facts"] == {"BackgroundRemoval": "lbv"}
    assert weak_harmonic_for(scan, MEDIParams())[0] is True


def test_raw_echoes_open_with_field_in_front_and_no_error_yet(make_napari_viewer, qtbot, raw_head):
    """With raw echoes loaded, the docks opened together show Field in front, and no dock shows an error
    before the user has done anything (it was a red "b0_direction: the zero vector has no direction")."""
    from napari_qsm._napari.docks import dock_of
    from napari_qsm._napari.kit import ERR_COLOR
    from napari_qsm._napari.reader import echoes_layer_data

    viewer = make_napari_viewer(show=True)
    add_layer_data(viewer, echoes_layer_data(raw_head.to_echoes(name="raw")))
    docks = {}
    for name in ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare", "Field"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    field_dock, rec_dock = dock_of(docks["Field"]), dock_of(docks["QSM reconstruction"])
    win = field_dock.parentWidget()
    qtbot.waitUntil(lambda: rec_dock in win.tabifiedDockWidgets(field_dock), timeout=5000)  # one tab group
    qtbot.waitUntil(lambda: not field_dock.visibleRegion().isEmpty() and rec_dock.visibleRegion().isEmpty(),
                    timeout=5000)
    for name in ("QSM reconstruction", "Adapt network (QSMInvNet+)"):
        inputs = docks[name].inputs
        inputs.validate()
        text = inputs.message.text()
        assert ERR_COLOR not in text and "✗" not in text and "zero vector" not in text, (name, text)
        assert "no local field yet" in text
        assert ERR_COLOR not in docks[name].status.text()
    qtbot.wait(300)  # let the docks' queued start-up calls (source refresh, raising Field) run before napari closes


@pytest.mark.parametrize("name", ["QSM reconstruction", "Field", "Adapt network (QSMInvNet+)"])
def test_docks_show_progress_as_the_console_does(make_napari_viewer, name):
    """One progress format (Progress.format) for the console and every running dock."""
    import html

    from napari_qsm.core.progress import Progress

    p = Progress(step=3, total=10, message="GN 1/10 <fast>", losses={"cost": 0.5, "nan": float("nan")},
                 stage="medi", elapsed=1.5)
    assert p.format() == "[medi] 3/10 GN 1/10 <fast> cost=0.5 (1.5s)"
    viewer = make_napari_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    w._on_progress(p)
    assert w.status.text() == html.escape(p.format())
