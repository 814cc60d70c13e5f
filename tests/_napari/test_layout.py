"""The plugin's docks together in a small window (issue 17): 1280×800, every dock's key controls visible.

The screen is simulated (``docks.available_geometry``) so the check does not depend on the size of
the test display; the docks must join one tab group on the right and the window must stay inside
the screen.
"""

from __future__ import annotations

from napari_test_helpers import add_layer_data

SCREEN = (1280, 800)


def _shown(w, min_h: int = 12) -> bool:
    """Visible, not squeezed, and not scrolled or clipped out of sight."""
    vis = w.visibleRegion().boundingRect()
    return w.isVisible() and w.height() >= min_h and vis.height() >= min(min_h, w.height()) and vis.width() > 10


def _small_window(make_napari_viewer, tiny_phantom, qtbot, monkeypatch):
    from qtpy.QtCore import QRect

    from napari_qsm._napari import docks
    from napari_qsm._napari.sample_data import phantom_layer_data

    monkeypatch.setattr(docks, "available_geometry", lambda widget: QRect(0, 0, *SCREEN))
    viewer = make_napari_viewer(show=True)
    add_layer_data(viewer, phantom_layer_data(tiny_phantom))
    win = viewer.window._qt_window
    win.resize(*SCREEN)
    widgets = {}
    for name in ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare"):  # as `napari-qsm view` does
        _, widgets[name] = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    _, widgets["Field"] = viewer.window.add_plugin_dock_widget("napari-qsm", "Field")  # the raw-echo front end
    qtbot.wait(300)
    return viewer, win, widgets


def test_docks_fit_1280x800_and_key_controls_visible(make_napari_viewer, tiny_phantom, qtbot, monkeypatch):
    from napari_qsm._napari.docks import dock_of, qsm_docks

    viewer, win, widgets = _small_window(make_napari_viewer, tiny_phantom, qtbot, monkeypatch)
    qtbot.waitUntil(lambda: win.width() <= SCREEN[0] and win.height() <= SCREEN[1], timeout=5000)
    group = qsm_docks(win)
    assert len(group) == 4
    for d in group[1:]:  # one tab group on the right, in the plugin's order
        assert group[0] in win.tabifiedDockWidgets(d)
    assert [d.windowTitle() for d in group] == ["QSM reconstruction", "Field", "Adapt network", "Compare"]

    rec, adapt, cmp_, fld = (widgets[n] for n in ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare",
                                                  "Field"))
    keys = {
        rec: [rec.inputs.field_combo, rec.inputs.mask_combo, rec.method_combo, rec.run_button, rec.cancel_button,
              rec.status],
        adapt: [adapt.weights_edit, adapt.device_combo, adapt.form.widget_for("steps"),
                adapt.form.widget_for("mode"), adapt.form.advanced_toggle, adapt.run_button, adapt.plot.canvas],
        cmp_: [cmp_.reference_combo, cmp_.labels_combo, cmp_.results_list, cmp_.large_button, cmp_.tabs],
        fld: [fld.mag_combo, fld.phase_combo, *fld.step_combos.values(), fld.mask_combo, fld.run_button,
              fld.cancel_button, fld.status],
    }
    for widget, controls in keys.items():
        d = dock_of(widget)
        d.raise_()
        qtbot.wait(150)
        assert d.height() > 300, d.windowTitle()
        for c in controls:
            assert _shown(c), f"{d.windowTitle()}: {c.objectName() or type(c).__name__} not visible " \
                              f"(h={c.height()}, visible region {c.visibleRegion().boundingRect()})"
    assert cmp_.panel.height() >= 250  # the slices get room, not a strip
    assert win.width() <= SCREEN[0] and win.height() <= SCREEN[1]


def test_compare_large_window_and_back(make_napari_viewer, tiny_phantom, qtbot, monkeypatch):
    from napari_qsm._napari.docks import dock_of

    viewer, win, widgets = _small_window(make_napari_viewer, tiny_phantom, qtbot, monkeypatch)
    cmp_ = widgets["Compare"]
    d = dock_of(cmp_)
    assert cmp_.set_large(True) and d.isFloating()
    qtbot.wait(100)
    assert d.width() >= 0.8 * SCREEN[0] and d.height() >= 0.8 * SCREEN[1]
    assert cmp_.large_button.isChecked() and cmp_.large_button.text() == "Dock back"
    assert not cmp_.set_large(False) and not d.isFloating()
    assert not cmp_.large_button.isChecked()
