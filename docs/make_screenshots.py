"""Screenshots of the napari-qsm dock widgets in use, written to docs/.

Run (a virtual screen is enough):

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_screenshots.py

It loads the 1 mm sample phantom, runs TKD in the "QSM reconstruction" dock, and saves (window
1600×1000 unless ``--window``):

* ``docs/screenshot_docks.png``          the four docks opened together (as ``napari-qsm view`` opens them:
                                           Reconstruct, Field, Adapt and Compare as tabs of one group)
* ``docs/screenshot_reconstruct_tkd.png``  whole window: TKD result with its colour bar, dock with inputs and parameters
* ``docs/screenshot_dock_tkd.png``         the dock alone (readable detail)
* ``docs/screenshot_dock_dsbn.png``        (``dsbn``) the dock after a QSMInvNet+ run: the network's form with its
                                           data-consistency settings
* ``docs/screenshot_truth_vs_tkd.png``     grid view: true χ next to TKD, same ±0.15 ppm window
* ``docs/screenshot_medi_running.png``     a MEDI run in flight (progress bar, Cancel enabled, live preview)
* ``docs/screenshot_clinical_oblique.png`` the clinical-like phantom, 0.75×0.75×3 mm, B0 tilted 15°
* ``docs/screenshot_adapt.png``            the Adapt dock after a short adaptation (loss plot, adapted χ)
* ``docs/screenshot_dock_adapt.png``       the Adapt dock alone, in its simple form ("Advanced" folded)
* ``docs/screenshot_field.png``            the Field dock after a run on the raw multi-echo head sample: total
                                           field, local field, R2* and magnitude side by side (grid)
* ``docs/screenshot_field_dock.png``       the Field dock alone; ``screenshot_field_1280x800.png``: a 1280×800 window
* ``docs/screenshot_raw_<W>x<H>_{open,mask,compare}.png``  the newcomer's path at 1600×1000 and 1280×800 (``raw``):
                                           the raw head sample with the docks opened through napari (Field in
                                           front, nothing red), after Field → Run (the brain mask to correct), and
                                           Compare after TKD (the field residual, as the hand-off sets it up)
* ``docs/screenshot_clinic_field.png``    (``clinic``) the Field dock's SWI section after a run on the raw head: SWI,
                                           SWI minIP, T2* (NumART2*, ms) and R2* (1/s) in a grid
* ``docs/screenshot_clinic_compare.png``  Compare after TKD with its "Save as DICOM…" and "Report…" buttons;
                                           ``docs/screenshot_clinic_report.png``: the report those buttons write

The Adapt screenshots need QSMInvNet+ weights: the shipped checkpoint, or ``--weights CKPT``
(e.g. a training checkpoint); without either they are skipped.

``--only reconstruct`` (repeatable: docks, reconstruct, truth, medi, clinical, adapt) regenerates only those
screenshots, e.g. only the Reconstruction dock after a change to it::

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_screenshots.py --only reconstruct --window 1600x1000
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

DOCS = Path(__file__).resolve().parent
WINDOW = [1600, 1000]
SCREENS = ("docks", "reconstruct", "truth", "medi", "clinical", "adapt", "field", "raw", "clinic", "dsbn")


def _pump(app, seconds: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def _wait(app, cond, timeout: float) -> bool:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.02)
    return False


def _add(viewer, layer_data):
    for data, kw, typ in layer_data:
        getattr(viewer, f"add_{typ}")(data, **kw)


def _save_window(viewer, app, name: str) -> Path:
    _pump(app, 0.5)
    path = DOCS / name
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print("wrote", path)
    return path


def _save_widget(widget, app, name: str) -> Path:
    _pump(app, 0.3)
    path = DOCS / name
    widget.grab().save(str(path))
    print("wrote", path)
    return path


def _new_viewer(app):
    import napari

    viewer = napari.Viewer(title="napari-qsm")
    qtw = viewer.window._qt_window
    qtw.resize(*WINDOW)
    overlays = viewer.canvas.overlays
    overlays.scale_bar.visible = True  # units come from the layers (mm)
    overlays.text.position = "top_left"
    overlays.text.font_size = 11
    _pump(app, 0.5)
    return viewer


def main(argv=None) -> int:
    import argparse

    import napari
    from qtpy.QtWidgets import QApplication

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="QSMInvNet+ checkpoint for the Adapt screenshots (default: the shipped one)")
    ap.add_argument("--adapt-steps", type=int, default=12)
    ap.add_argument("--only-adapt", action="store_true", help="only the Adapt screenshots")
    ap.add_argument("--only", action="append", choices=SCREENS,
                    help="only these screenshots (repeatable); default: all")
    ap.add_argument("--window", default=f"{WINDOW[0]}x{WINDOW[1]}", help="window size WxH in pixels")
    args = ap.parse_args(argv)
    try:
        size = tuple(int(v) for v in args.window.lower().split("x"))
        assert len(size) == 2 and min(size) > 0
    except (ValueError, AssertionError):
        ap.error(f"--window: expected WxH, e.g. 1600x1000, got {args.window!r}")
    WINDOW[:] = size
    only = set(args.only or (["adapt"] if args.only_adapt else SCREENS))
    app = QApplication.instance() or napari.qt.get_qapp()
    if "docks" in only:
        _docks_screen(app)
    if only & {"reconstruct", "truth", "medi", "clinical", "dsbn"}:
        _reconstruct_screens(app, only)
    if "adapt" in only:
        _adapt_screens(app, args.weights, args.adapt_steps)
    if "field" in only:
        _field_screens(app)
    if "raw" in only:
        _raw_path_screens(app)
    if "clinic" in only:
        _clinic_screens(app)
    return 0


def _docks_screen(app) -> None:
    """The four docks together, opened the way ``napari-qsm view`` opens them (one tab group)."""
    from napari_qsm.cli import open_viewer

    viewer = open_viewer(show=True)
    viewer.window._qt_window.resize(*WINDOW)
    _pump(app, 3.0)
    qtw = viewer.window._qt_window
    for _ in range(20):  # napari grows the window while the docks are added (before they join one tab group),
        qtw.resize(*WINDOW)  # later on a busy machine: resize until the window keeps the size asked for
        _pump(app, 1.0)
        if (qtw.width(), qtw.height()) == tuple(WINDOW):
            break
    print(f"window {qtw.width()}×{qtw.height()}")
    _save_window(viewer, app, "screenshot_docks.png")
    viewer.close()


def _reconstruct_screens(app, only=SCREENS) -> None:
    from napari_qsm._napari.sample_data import make_phantom_1mm, make_phantom_clinical
    from napari_qsm._napari.reconstruct_dock import QSMWidget
    from napari_qsm.methods import available_methods

    # 1. 1 mm phantom, TKD -----------------------------------------------------------------
    viewer = _new_viewer(app)
    _add(viewer, make_phantom_1mm())
    dock = QSMWidget(viewer)
    viewer.window.add_dock_widget(dock, name="QSM reconstruction", area="right")
    _wait(app, lambda: "ready" in dock.inputs.message.text(), 10)
    viewer.dims.set_point(0, float(viewer.layers["phantom field"].translate[0] + 62))
    dock.set_method("tkd")
    dock.run()
    _wait(app, lambda: not dock.runner.running, 120)
    chi = viewer.layers[-1]
    viewer.layers["phantom field"].visible = False
    viewer.layers["phantom magnitude"].visible = False
    viewer.canvas.overlays.text.text = ""  # the dock captions the colour bar ("TKD δ=0.15: χ (ppm)")
    viewer.layers.selection.active = None
    viewer.layers.selection.active = chi
    viewer.reset_view()
    if "reconstruct" in only:
        _save_window(viewer, app, "screenshot_reconstruct_tkd.png")
        _save_widget(dock, app, "screenshot_dock_tkd.png")

    if "dsbn" in only:   # the network's form (data consistency), after a run
        dock.set_method("dsbn")
        dock.run()
        _wait(app, lambda: not dock.runner.running, 300)
        _save_widget(dock, app, "screenshot_dock_dsbn.png")

    # 2. truth vs TKD in grid mode -------------------------------------------------------------
    if "truth" in only:
        for layer in viewer.layers:
            layer.visible = layer.name in ("phantom true χ", chi.name)
        grid = viewer.canvas.grid
        grid.enabled = True
        grid.shape = (1, 2)
        viewer.canvas.overlays.text.position = "top_left"
        viewer.canvas.overlays.text.visible = True
        viewer.canvas.overlays.text.text = "left: true χ · right: TKD (δ 0.15) · both −0.15 … +0.15 ppm"
        viewer.reset_view()
        _save_window(viewer, app, "screenshot_truth_vs_tkd.png")
        grid.enabled = False

    # 3. MEDI in flight --------------------------------------------------------------------------
    if "medi" in only and "medi" in [m.name for m in available_methods()]:
        for layer in viewer.layers:
            layer.visible = layer.name == "phantom magnitude"
        viewer.canvas.overlays.text.text = "MEDI-L1 running: live χ preview, progress in the activity dock"
        dock.set_method("medi")
        dock.output_combo.setCurrentIndex(dock.output_combo.findData("add"))
        dock.run()
        try:  # show napari's activity dock with the progress bar
            viewer.window._status_bar._toggle_activity_dock(True)
        except Exception:
            pass
        _wait(app, lambda: "(preview)" in " ".join(lay.name for lay in viewer.layers), 90)
        _wait(app, lambda: (dock.runner.pbar is not None and dock.runner.pbar.n >= 1), 240)
        viewer.reset_view()
        _pump(app, 1.0)
        _save_window(viewer, app, "screenshot_medi_running.png")
        dock.cancel()
        _wait(app, lambda: not dock.runner.running, 30)
        try:
            viewer.window._status_bar._toggle_activity_dock(False)
        except Exception:
            pass
    viewer.close()

    # 4. clinical-like phantom with an oblique B0 ------------------------------------------------
    if "clinical" not in only:
        return
    viewer = _new_viewer(app)
    _add(viewer, make_phantom_clinical())
    dock = QSMWidget(viewer)
    viewer.window.add_dock_widget(dock, name="QSM reconstruction", area="right")
    _wait(app, lambda: "ready" in dock.inputs.message.text(), 10)
    dock.set_method("tkd")
    dock.form.set_values({"threshold": 0.2})
    dock.run()
    _wait(app, lambda: not dock.runner.running, 120)
    viewer.layers["clinical field"].visible = False
    viewer.dims.set_point(0, float(viewer.layers["clinical field"].translate[0] + 3.0 * 26))
    # top left, short: on the right napari tiles the caption with the χ layer's colour bar (a long one pushes it out)
    viewer.canvas.overlays.text.position = "top_left"
    viewer.canvas.overlays.text.visible = True
    viewer.canvas.overlays.text.text = "0.75×0.75×3 mm, B0 15° off the slice axis · TKD δ 0.2 · χ (ppm)"
    viewer.layers.selection.active = None
    viewer.layers.selection.active = viewer.layers[-1]
    viewer.reset_view()
    _save_window(viewer, app, "screenshot_clinical_oblique.png")
    viewer.close()


def _adapt_screens(app, weights, steps: int) -> None:
    from napari_qsm._napari.sample_data import make_phantom_1mm

    try:
        from napari_qsm._napari.adapt_widget import AdaptWidget
        from napari_qsm.nn.infer import default_weights_path
    except ImportError as exc:
        print("skipping the Adapt screenshots:", exc)
        return
    if weights is None and not default_weights_path().exists():
        print("skipping the Adapt screenshots: no shipped weights; pass --weights CKPT")
        return
    viewer = _new_viewer(app)
    _add(viewer, make_phantom_1mm())
    viewer.scene.camera.orientation2d = ("up", "right")
    dock = AdaptWidget(viewer)
    viewer.window.add_dock_widget(dock, name="Adapt network", area="right")
    _wait(app, lambda: "ready" in dock.inputs.message.text(), 10)
    if weights:
        dock.weights_edit.setText(str(weights))
    dock.form.set_values({"steps": steps, "preview_every": max(1, steps // 3)})
    viewer.dims.set_point(0, float(viewer.layers["phantom field"].translate[0] + 62))
    dock.run()
    _wait(app, lambda: not dock.runner.running, 1800)
    for layer in viewer.layers:
        layer.visible = layer is dock.chi_layer
    viewer.layers.selection.active = None
    viewer.layers.selection.active = dock.chi_layer  # its colour bar and 'χ (ppm)' caption
    viewer.reset_view()
    _save_window(viewer, app, "screenshot_adapt.png")
    _save_widget(dock, app, "screenshot_dock_adapt.png")
    viewer.close()


def _grid_of(viewer, shown) -> None:
    """Only ``shown`` visible, in napari's 2×2 grid, each tile naming its layer (napari's name overlay)."""
    for layer in viewer.layers:
        layer.visible = layer in shown
    for layer in shown:
        try:
            layer._overlays["layer_name"].visible = True
        except Exception:
            pass
    viewer.canvas.grid.enabled = True
    viewer.canvas.grid.shape = (2, 2)


def _field_screens(app) -> None:
    """The Field dock on the raw multi-echo head sample, after a run (default steps), at WINDOW and 1280×800."""
    from napari_qsm._napari.field_widget import FieldWidget

    for size, name in ((tuple(WINDOW), "screenshot_field.png"), ((1280, 800), "screenshot_field_1280x800.png")):
        viewer = _new_viewer(app)
        viewer.window._qt_window.resize(*size)
        viewer.open_sample("napari-qsm", "raw_head")
        dock = FieldWidget(viewer)
        viewer.window.add_dock_widget(dock, name="Field", area="right")
        _pump(app, 1.0)
        dock.run()
        _wait(app, lambda: not dock.runner.running, 600)
        print("Field dock:", dock.status.text())
        keys = ("magnitude", "total_field", "local_field", "r2star")
        _grid_of(viewer, [dock.output_layers[k] for k in keys])
        viewer.layers.selection.active = dock.output_layers["local_field"]
        viewer.window._qt_window.resize(*size)
        viewer.reset_view()
        _save_window(viewer, app, name)
        if size == tuple(WINDOW):
            _save_widget(dock, app, "screenshot_field_dock.png")
        viewer.close()


def _raw_path_screens(app) -> None:
    """Raw echoes → Field → Reconstruct (TKD) → Compare, every dock opened through napari, at two window sizes."""
    for size in (tuple(WINDOW), (1280, 800)):
        tag = f"{size[0]}x{size[1]}"
        viewer = _new_viewer(app)
        qtw = viewer.window._qt_window
        viewer.open_sample("napari-qsm", "raw_head")
        docks = {}
        for name in ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare", "Field"):
            _, docks[name] = viewer.window.add_plugin_dock_widget("napari-qsm", name)
        for _ in range(10):
            qtw.resize(*size)
            _pump(app, 1.0)
            if (qtw.width(), qtw.height()) == size:
                break
        _save_window(viewer, app, f"screenshot_raw_{tag}_open.png")
        fld, rec, cmp_ = docks["Field"], docks["QSM reconstruction"], docks["Compare"]
        fld.run()
        _wait(app, lambda: not fld.runner.running, 900)
        print("Field dock:", fld.status.text())
        fld.edit_mask()  # the brain mask selected with napari's brush, as a user starts a correction
        viewer.reset_view()
        _save_window(viewer, app, f"screenshot_raw_{tag}_mask.png")
        rec.set_method("tkd")
        rec.run()
        _wait(app, lambda: not rec.runner.running, 300)
        from napari_qsm._napari.docks import raise_dock
        raise_dock(cmp_)
        _pump(app, 4.0)
        _save_window(viewer, app, f"screenshot_raw_{tag}_compare.png")
        viewer.close()


def _clinic_screens(app) -> None:
    """Field → Run (with SWI) → TKD → Compare with Save as DICOM… / Report…, docks opened through napari."""
    from napari_qsm._napari.docks import raise_dock

    viewer = _new_viewer(app)
    qtw = viewer.window._qt_window
    viewer.open_sample("napari-qsm", "raw_head")
    docks = {}
    for name in ("QSM reconstruction", "Compare", "Field"):
        _, docks[name] = viewer.window.add_plugin_dock_widget("napari-qsm", name)
    for _ in range(10):
        qtw.resize(*WINDOW)
        _pump(app, 1.0)
        if (qtw.width(), qtw.height()) == tuple(WINDOW):
            break
    fld, rec, cmp_ = docks["Field"], docks["QSM reconstruction"], docks["Compare"]
    fld.run()
    _wait(app, lambda: not fld.runner.running, 900)
    print("Field dock:", fld.status.text())
    _grid_of(viewer, [fld.output_layers[k] for k in ("swi", "swi_minip", "t2star", "r2star")])
    viewer.reset_view()
    fld._scroll.ensureWidgetVisible(fld.swi.box)
    _pump(app, 1.0)
    _save_window(viewer, app, "screenshot_clinic_field.png")
    viewer.canvas.grid.enabled = False
    for layer in viewer.layers:
        layer.visible = layer.name.endswith("local field") or layer.name.endswith("combined magnitude")
    rec.set_method("tkd")
    rec.run()
    _wait(app, lambda: not rec.runner.running, 300)
    raise_dock(cmp_)
    _pump(app, 4.0)
    viewer.reset_view()
    _save_window(viewer, app, "screenshot_clinic_compare.png")
    out = DOCS / "screenshot_clinic_report.png"
    out.unlink(missing_ok=True)
    cmp_.clinic.write_report(out)
    _wait(app, lambda: not cmp_.clinic.runner.running, 300)
    print("report:", out, out.exists())
    viewer.close()


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main(sys.argv[1:]))
