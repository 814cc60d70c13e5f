"""Screenshots of the Compare widget on the head phantom (docs/compare_*.png).

Run under a display, e.g. ``xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_compare_screenshots.py``.

* a 1 mm phantom (``make_phantom``, SNR 100) opened as the sample data opens it;
* results: TKD (δ 0.15), MEDI-L1 and QSMInvNet+ (DSBN) when their method / weights are
  available, otherwise TKD at two thresholds and TSVD;
* ``docs/compare_panel.png``: the Compare dock in its "Large window" mode at 1600×1000 (orthogonal
  slices through the basal ganglia and the haemorrhage, zoomed to the brain mask, each result's
  difference to the true χ beside it); ``docs/compare_panel_1280.png``: the same at 1280×800;
  ``docs/compare_metrics.png``: its metric table and bar chart; ``docs/compare_grid.png``: napari's
  canvas after "Side by side". The panel's arrangement and thumbnail size are printed.

``--cache DIR`` keeps the reconstructions (npz) so that re-running only redraws.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _results(ph, cache: Path | None, methods):
    from napari_qsm.methods import available_methods, reconstruct
    from napari_qsm.core.scan import Scan

    scan = Scan.from_phantom(ph)
    names = {m.name for m in available_methods()}
    out = []
    for method, params in methods:
        if method not in names:
            print(f"  {method}: not registered, skipped", flush=True)
            continue
        key = method + "".join(f"_{k}{v}" for k, v in (params or {}).items())
        f = cache / f"{key}.npz" if cache else None
        if f is not None and f.exists():
            z = np.load(f, allow_pickle=True)
            out.append((z["chi"], z["prov"].item(), str(z["name"])))
            print(f"  {key}: from cache", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            r = reconstruct(scan, method, params, device="cpu")
        except Exception as exc:  # e.g. no network weights shipped yet
            print(f"  {method}: {type(exc).__name__}: {exc} — skipped", flush=True)
            continue
        print(f"  {key}: {time.perf_counter() - t0:.1f} s", flush=True)
        item = (r.chi, r.provenance(), r.name)
        if f is not None:
            np.savez(f, chi=r.chi, prov=np.array(r.provenance(), dtype=object), name=r.name)
        out.append(item)
    return scan, out


def _report_panel(w, label: str) -> None:
    """Print the panel's size, arrangement and the smallest χ cell (the thumbnails must stay legible)."""
    p = w.panel
    tw, th = p.thumbnail_size()
    print(f"panel at {label}: {p.width()}×{p.height()} px, difference maps {p.arrangement} χ, "
          f"{p._geometry()['scale']:.2f} px/mm, smallest χ cell {tw:.0f}×{th:.0f} px, box {p.box}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 144, 112))
    ap.add_argument("--voxel-size", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--outdir", default=str(ROOT / "docs"))
    a = ap.parse_args(argv)

    from napari_qsm.core.sim.phantom import make_phantom

    cache = Path(a.cache) if a.cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    print("phantom…", flush=True)
    ph = make_phantom(tuple(a.shape), tuple(a.voxel_size), seed=a.seed, snr=100.0)
    print("reconstructions…", flush=True)
    scan, results = _results(ph, cache, [("tkd", {"threshold": 0.15}), ("medi", None), ("dsbn", None)])
    if len(results) < 3:  # no MEDI / network: still show three classic results
        _, more = _results(ph, cache, [("tsvd", {"threshold": 0.15}), ("tkd", {"threshold": 0.25})])
        results += more
        results = results[:3]

    import napari
    from napari.layers import Layer

    from napari_qsm._napari.compare import CompareWidget
    from napari_qsm._napari.layers import result_layer_data
    from napari_qsm._napari.sample_data import phantom_layer_data
    from napari_qsm.methods import Result

    v = napari.Viewer(show=True)
    v.window._qt_window.resize(1600, 1000)
    v.scene.camera.orientation2d = ("up", "right")  # neurological: anterior up, patient's right on the right
    for data, kw, kind in phantom_layer_data(ph, prefix="phantom"):
        v.add_layer(Layer.create(data, kw, kind))
    field_layer = v.layers["phantom field"]
    for chi, prov, name in results:
        r = Result(chi=chi, method=prov["method"], params=prov["parameters"], seconds=prov["seconds"],
                   device=prov["device"], scan_info=scan.info())
        data, kw = result_layer_data(r, field_layer, scan=scan)
        kw["name"] = name
        v.add_image(data, **kw)
    field_layer.visible = False
    w = CompareWidget(v)
    dock = v.window.add_dock_widget(w, name="Compare", area="right")
    app = napari.qt.get_qapp()
    from qtpy.QtCore import Qt

    # the dock's "Large window" mode: floated over the screen, here at 1600×1000
    w.set_large(True)
    from napari_qsm._napari.docks import dock_of
    dock_of(w).resize(1600, 1000)
    assert w.selection().labels == "phantom labels", "the open labels layer is picked by default"
    # axial and coronal planes through the globus pallidus (basal ganglia), sagittal through the
    # haemorrhage (strong source: streaking of the k-space methods)
    gp = np.argwhere(ph.labels == 6)
    hem = np.argwhere(ph.labels == 12)
    i, j, k = np.round(gp.mean(axis=0)).astype(int)
    if hem.size:
        i = int(np.round(hem[:, 0].mean()))
    w.move_viewer_to((int(i), int(j), int(k)))
    t0 = time.time()
    while (w.busy or w.table is None) and time.time() - t0 < 600:
        app.processEvents()
        time.sleep(0.05)
    w.chi_min.setValue(-0.1)
    w.chi_max.setValue(0.2)
    w.diff_lim.setValue(0.05)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    out = Path(a.outdir)
    w.tabs.setCurrentIndex(0)
    for _ in range(5):
        app.processEvents()
    w.grab().save(str(out / "compare_panel.png"))
    _report_panel(w, "1600×1000")
    dock_of(w).resize(1280, 800)   # the same large window on a smaller screen
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    w.grab().save(str(out / "compare_panel_1280.png"))
    _report_panel(w, "1280×800")
    dock_of(w).resize(1600, 1000)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    w.tabs.setCurrentIndex(1)
    for _ in range(5):
        app.processEvents()
    w.grab().save(str(out / "compare_metrics.png"))
    hbar = w.metric_table.horizontalScrollBar()
    print(f"metrics table: {w.metric_table.viewport().width()} px wide, horizontal scroll range {hbar.maximum()}")
    w.tabs.setCurrentIndex(0)
    w.set_large(False)
    v.window._qt_window.resizeDocks([dock], [560], Qt.Orientation.Horizontal)
    w.planes_combo.setCurrentText("axial")
    w.side_by_side()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    v.screenshot(str(out / "compare_grid.png"), canvas_only=False)
    w.restore_view()
    print("table:")
    print(w.copy_table())
    if w.regions is not None:
        print(w.regions.to_text())
    print(f"wrote {out / 'compare_panel.png'}, {out / 'compare_metrics.png'}, {out / 'compare_grid.png'}")
    w.cleanup()
    v.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
