"""Benchmark: update time of the Compare widget's orthogonal-slices panel.

Five 256×256×160 results plus a reference (six columns; χ and difference rows for the three
planes, i.e. 33 images). Two measurements, each over a sweep of positions:

* ``panel``: :class:`SliceGrid.set_point` + a synchronous repaint (slicing, colour mapping, painting);
* ``viewer``: the whole path from ``viewer.dims`` (a slider step in napari) through the widget to the
  repainted panel, with the napari canvas redrawing too.

Run under a display (``xvfb-run -a python benchmarks/bench_compare.py``). Writes
``docs/benchmarks/bench_compare.md`` (target: ≤ 100 ms per update).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _volumes(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    ref = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    res = {f"method {i + 1}": (ref + 0.02 * rng.standard_normal(shape)).astype(np.float32) for i in range(n)}
    mask = np.zeros(shape, bool)
    mask[16:-16, 16:-16, 8:-8] = True
    return ref, res, mask


def _stats(ts):
    ts = sorted(ts)
    return {"median": statistics.median(ts) * 1e3, "p90": ts[int(0.9 * (len(ts) - 1))] * 1e3, "max": ts[-1] * 1e3}


def bench_panel(ref, results, mask, vs, size, app, repeats):
    from napari_qsm._napari.compare.panel import PanelColumn, SliceGrid

    panel = SliceGrid()
    panel.resize(*size)
    panel.show()
    cols = [PanelColumn("reference", ref, subtitle="reference", diff_note="reference")]
    cols += [PanelColumn(n, v, ref=ref, mask=mask, offset=0.001) for n, v in results.items()]
    panel.set_columns(cols, vs)
    panel.set_point((128, 128, 80))
    panel.repaint()
    app.processEvents()
    ts = []
    shape = ref.shape
    for t in range(repeats):
        p = (int(40 + 3 * t) % shape[0], int(60 + 2 * t) % shape[1], int(20 + t) % shape[2])
        t0 = time.perf_counter()
        panel.set_point(p)
        panel.repaint()
        ts.append(time.perf_counter() - t0)
    panel.close()
    return _stats(ts)


def bench_viewer(ref, results, mask, vs, repeats):
    """Slider steps in napari: the widget's own work (dims event → panel rendered → painted) and
    napari's slicing of its layers, measured separately."""
    import napari

    from napari_qsm._napari.compare import CompareWidget
    from napari_qsm._napari.layers import Geometry, to_layer_order

    v = napari.Viewer(show=True)
    v.window._qt_window.resize(1800, 1100)
    g = Geometry.from_affine(np.diag([*vs, 1.0]))
    md = g.metadata()
    kw = g.layer_kwargs()
    v.add_image(to_layer_order(ref, g.axes), name="reference", metadata=dict(md, role="chi_true"), **kw)
    v.add_labels(to_layer_order(mask.astype(np.uint8), g.axes), name="mask", metadata=dict(md, role="mask"), **kw)
    for n, x in results.items():
        v.add_image(to_layer_order(x, g.axes), name=n, metadata=dict(md, role="chi", provenance={"method": n}), **kw)
    app = napari.qt.get_qapp()
    nz = int(v.dims.nsteps[0])

    def sweep(k0):
        ts, tt = [], []
        for t in range(repeats):
            t0 = time.perf_counter()
            v.dims.set_current_step(0, (k0 + 3 * t) % nz)
            ts.append(time.perf_counter() - t0)
            app.processEvents()  # napari's canvas redraw (software OpenGL here)
            tt.append(time.perf_counter() - t0)
        return ts, tt

    base, base_total = sweep(5)  # napari alone
    w = CompareWidget(v)
    v.window.add_dock_widget(w, name="Compare", area="right")
    for _ in range(20):
        app.processEvents()
    w._recompute_timer.stop()  # the metric worker is not part of this measurement
    own = []
    orig = w._on_dims

    def timed(event=None):
        t0 = time.perf_counter()
        orig(event)
        own.append(time.perf_counter() - t0)

    v.dims.events.point.disconnect(w._on_dims)
    v.dims.events.point.connect(timed)
    ours, total = [], []
    for t in range(repeats):
        own.clear()
        n0 = w.panel.paint_count
        t0 = time.perf_counter()
        v.dims.set_current_step(0, (7 + 3 * t) % nz)
        t_deadline = time.perf_counter() + 5
        while w.panel.paint_count == n0 and time.perf_counter() < t_deadline:
            app.processEvents()
        total.append(time.perf_counter() - t0)
        ours.append(sum(own) + w.panel.last_paint_ms / 1e3)
    cols = len(w.panel.columns)
    w.cleanup()
    v.close()
    return {"ours": _stats(ours), "napari": _stats(base), "napari_total": _stats(base_total),
            "total": _stats(total)}, cols


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    ap.add_argument("--results", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "bench_compare.md"))
    ap.add_argument("--no-viewer", action="store_true", help="skip the napari measurement")
    a = ap.parse_args(argv)

    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    shape = tuple(a.shape)
    vs = (0.9375, 0.9375, 1.0)
    ref, results, mask = _volumes(shape, a.results)
    rows = []
    st = bench_panel(ref, results, mask, vs, (900, 900), app, a.repeats)
    rows.append(("panel (900×900 px): set_point + repaint", st))
    print(f"panel   median {st['median']:.1f} ms  p90 {st['p90']:.1f} ms  max {st['max']:.1f} ms", flush=True)
    if not a.no_viewer:
        st, ncols = bench_viewer(ref, results, mask, vs, a.repeats)
        rows.append((f"napari slider step: widget work (dims event → {ncols} columns rendered + painted)", st["ours"]))
        rows.append(("napari slider step: napari's own slicing of the 7 layers, without the widget", st["napari"]))
        rows.append(("napari slider step → canvas redrawn, without the widget", st["napari_total"]))
        rows.append(("napari slider step → canvas and panel redrawn, with the widget", st["total"]))
        for k, s_ in st.items():
            print(f"viewer {k:7s} median {s_['median']:.1f} ms  p90 {s_['p90']:.1f} ms  max {s_['max']:.1f} ms", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Compare panel update time",
        "",
        f"{a.results} results + reference, {shape[0]}×{shape[1]}×{shape[2]} float32, χ and difference rows "
        f"for axial/coronal/sagittal ({3 * (2 * a.results + 1)} images). {a.repeats} positions each. "
        "Target ≤ 100 ms.",
        "",
        "| path | median (ms) | p90 (ms) | max (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, s in rows:
        lines.append(f"| {name} | {s['median']:.1f} | {s['p90']:.1f} | {s['max']:.1f} |")
    lines += ["", f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
              "Xvfb + Mesa (software OpenGL), shared CPU; `python benchmarks/bench_compare.py`."]
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
