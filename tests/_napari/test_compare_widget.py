"""The Compare dock widget in a real napari viewer (pytest-qt, Xvfb)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt  # noqa: E402

from napari_qsm.core import compare as core  # noqa: E402
from napari_qsm.core.sim.phantom import make_phantom  # noqa: E402

pytestmark = pytest.mark.gui

AXES = (2, 1, 0)  # the plugin shows volumes slices-first: layer axis a holds canonical axis AXES[a]


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((24, 28, 22), (7.0, 7.0, 7.0), seed=5)


def _geometry_md(ph, role):
    return {"axes": list(AXES), "affine": np.asarray(ph.affine).tolist(), "voxel_size": list(ph.voxel_size),
            "b0_direction": [float(v) for v in ph.b0_direction], "role": role}


def _layer_kw(ph):
    return {"scale": tuple(float(ph.voxel_size[a]) for a in AXES)}


def _to_layer(a):
    return np.ascontiguousarray(np.transpose(a, AXES))


@pytest.fixture
def scene(make_napari_viewer, phantom, qtbot):
    from napari_qsm._napari.compare import CompareWidget

    ph = phantom
    rng = np.random.default_rng(1)
    v = make_napari_viewer()
    kw = _layer_kw(ph)
    v.add_image(_to_layer(ph.chi), name="chi_true", metadata=_geometry_md(ph, "chi_true"), **kw)
    v.add_image(_to_layer(ph.field), name="field", metadata=_geometry_md(ph, "field"), **kw)
    v.add_labels(_to_layer(ph.mask.astype(np.uint8)), name="mask", metadata=_geometry_md(ph, "mask"), **kw)
    results = {
        "half": (0.5 * ph.chi).astype(np.float32),
        "noisy": (ph.chi + 0.03 * rng.standard_normal(ph.chi.shape) * ph.mask).astype(np.float32),
    }
    for name, x in results.items():
        md = _geometry_md(ph, "chi")
        md["provenance"] = {"method": name, "parameters": {"threshold": 0.15}, "seconds": 0.1}
        v.add_image(_to_layer(x), name=name, metadata=md, contrast_limits=(-0.15, 0.15), **kw)
    w = CompareWidget(v)
    v.window.add_dock_widget(w, name="Compare", area="right")
    qtbot.waitUntil(lambda: w.table is not None and not w.busy, timeout=60000)
    yield v, w, results
    w.cleanup()


def test_choose_reference_and_results(scene, phantom):
    v, w, results = scene
    sel = w.selection()
    assert sel.reference == "chi_true"          # role chi_true
    assert sel.results == ["half", "noisy"]      # layers with provenance
    assert sel.mask == "mask" and sel.field == "field"
    want = core.compare(results, phantom.chi, phantom.mask, field=phantom.field, voxel_size=phantom.voxel_size,
                        b0_direction=phantom.b0_direction)
    assert w.table.names == ["half", "noisy"]
    for name in results:
        for k in want.columns:
            np.testing.assert_allclose(w.table.row(name)[k], want.row(name)[k], rtol=1e-5, equal_nan=True)
    # table widget: one row per result, header with units, best value bold
    t = w.metric_table
    assert t.rowCount() == 2
    headers = [t.horizontalHeaderItem(c).text().replace("\n", " ") for c in range(t.columnCount())]
    assert headers[0] == "Result" and "PSNR (dB)" in headers and "Field residual (%)" in headers
    best = core.best_per_column(w.table)
    col = headers.index("NRMSE (%)")
    for r in range(t.rowCount()):
        name = t.item(r, 0).text()
        assert t.item(r, col).font().bold() == (best["nrmse"] == name)
    # sorting by a metric column orders rows by value
    t.sortItems(col, Qt.SortOrder.AscendingOrder)
    vals = [w.table.row(t.item(r, 0).text())["nrmse"] for r in range(t.rowCount())]
    assert vals == sorted(vals)
    # the panel: reference column + one per result, χ and Δ rows
    assert [c.title for c in w.panel.columns] == ["chi_true", "half", "noisy"]
    # unchecking a result removes it from panel and table
    w.set_results(["noisy"])
    assert [c.title for c in w.panel.columns] == ["chi_true", "noisy"]
    w.recompute()
    assert w.table is None or w.busy


def _cell_bytes(w, col, plane, diff=False):
    ri = w.panel._rows().index((plane, diff))
    img, buf = w.panel._images[(col, ri)]
    return buf.copy()


def test_panel_follows_viewer_and_click_moves_viewer(scene, phantom, qtbot):
    v, w, _ = scene
    # viewer dims axis 0 is the canonical k axis (slices first)
    v.dims.set_current_step(0, 5)
    assert w.panel.point()[2] == 5
    before = _cell_bytes(w, 1, "axial")
    v.dims.set_current_step(0, 12)
    assert w.panel.point()[2] == 12
    after = _cell_bytes(w, 1, "axial")
    assert not np.array_equal(before, after)          # a new axial plane is shown
    ax = core.orthogonal_slices(phantom.chi * 0.5, w.panel.point(), phantom.voxel_size)[0]
    assert ax.index == 12
    # clicking the coronal plane of a result column moves the viewer's i and k, keeps j
    w.panel.repaint()
    target = (6, w.panel.point()[1], 15)
    pos = w.panel.pos_for_point(1, "coronal", target)
    qtbot.mouseClick(w.panel, Qt.MouseButton.LeftButton, pos=pos.toPoint())
    assert w.panel.point() == target
    step = v.dims.current_step
    assert (step[0], step[1], step[2]) == (15, target[1], 6)   # layer order (k, j, i)
    # hover read-out names the layer, the voxel and the value in ppm
    text = w.panel._describe(w.panel.pos_for_point(1, "axial", target))
    assert text.startswith("half: χ(6, ") and text.endswith("ppm")
    # the panel renders only while visible, and catches up when shown again
    w.tabs.setCurrentIndex(1)
    v.dims.set_current_step(0, 3)
    assert w.panel.point()[2] == 3 and w.panel._dirty
    w.tabs.setCurrentIndex(0)
    assert not w.panel._dirty and w.panel._planes_cache[(1, 0)].index == 3


def test_copy_and_csv_export(scene, tmp_path):
    v, w, _ = scene
    p = tmp_path / "metrics.csv"
    w.export_csv(p)
    rows = list(csv.reader(p.open()))
    assert rows[0] == ["result"] + w.table.columns
    assert [r[0] for r in rows[1:]] == ["half", "noisy"]
    for r in rows[1:]:
        for k, val in zip(w.table.columns, r[1:]):
            assert float(val) == pytest.approx(w.table.row(r[0])[k], rel=1e-5, abs=1e-9)
    text = w.copy_table()
    from qtpy.QtGui import QGuiApplication

    assert QGuiApplication.clipboard().text() == text
    assert text.splitlines()[0].startswith("result\tPSNR (dB)")


def _view_snapshot(v):
    g = v.canvas.grid
    cam = v.scene.camera
    return {
        "layers": [lay.name for lay in v.layers],
        "visible": [lay.visible for lay in v.layers],
        "contrast": [tuple(np.round(lay.contrast_limits, 6)) for lay in v.layers if hasattr(lay, "contrast_limits")],
        "grid": (g.enabled, tuple(g.shape), g.stride, g.spacing),
        "camera": (tuple(np.round(cam.center, 6)), round(cam.zoom, 6), tuple(np.round(cam.angles, 6))),
        "selection": sorted(lay.name for lay in v.layers.selection),
        "name_overlays": [(lay.name_overlay.visible, lay.name_overlay.font_size) for lay in v.layers],
        "orientation": tuple(cam.orientation),
        "active": v.layers.selection.active.name if v.layers.selection.active else None,
    }


def test_side_by_side_and_exact_restore(scene):
    v, w, _ = scene
    v.layers["field"].visible = False
    v.scene.camera.zoom = 3.0
    before = _view_snapshot(v)
    w.side_by_side()
    assert w.side_by_side_active and not w.grid_button.isEnabled() and w.restore_button.isEnabled()
    g = v.canvas.grid
    assert g.enabled and tuple(g.shape) == (2, 3)
    names = [lay.name for lay in v.layers if lay.visible]
    assert names == ["half", "noisy", "chi_true (reference)", "Δ half", "Δ noisy"]
    # grid positions: results (and the reference) on top, their differences underneath
    vis = [lay for lay in v.layers]
    pos = {vis[i].name: g.position(i, vis) for i in range(len(vis)) if vis[i].visible}
    assert pos["half"] == (0, 0) and pos["Δ half"] == (1, 0) and pos["Δ noisy"] == (1, 1)
    d = v.layers["Δ half"]
    assert d.colormap.name.startswith("RdBu_r")
    assert all(v.layers[n].name_overlay.visible for n in names)  # every grid cell is labelled
    lo, hi = d.contrast_limits
    assert lo == pytest.approx(-hi)
    mask = v.layers["mask"].data > 0
    ref = v.layers["chi_true"].data
    res = v.layers["half"].data
    diff = res - ref
    np.testing.assert_allclose(d.data[mask], (diff - diff[mask].mean())[mask], atol=1e-6)
    assert np.all(d.data[~mask] == 0)
    # contrast is linked among the χ layers and among the difference layers
    v.layers["half"].contrast_limits = (-0.2, 0.3)
    assert tuple(v.layers["noisy"].contrast_limits) == pytest.approx((-0.2, 0.3))
    v.layers["Δ noisy"].contrast_limits = (-0.05, 0.05)
    assert tuple(v.layers["Δ half"].contrast_limits) == pytest.approx((-0.05, 0.05))
    # the widget's choices do not list the layers it added
    assert all(not w.results_list.item(i).text().startswith("Δ") for i in range(w.results_list.count()))

    w.restore_view()
    assert not w.side_by_side_active and w.grid_button.isEnabled()
    assert _view_snapshot(v) == before
    # links are gone
    v.layers["half"].contrast_limits = (-0.1, 0.1)
    assert tuple(v.layers["noisy"].contrast_limits) != pytest.approx((-0.1, 0.1))


def test_restore_after_user_removed_an_added_layer(scene):
    v, w, _ = scene
    before = _view_snapshot(v)
    w.side_by_side()
    v.layers.remove("Δ noisy")
    w.restore_view()
    assert _view_snapshot(v) == before


def test_no_reference_uses_field_residual(scene, phantom, qtbot):
    v, w, results = scene
    w.set_reference(None)
    qtbot.waitUntil(lambda: w.table is not None and not w.busy, timeout=60000)
    assert w.table.columns == ["field_residual"]
    assert w.table.reference is None
    want = core.compare(results, None, phantom.mask, field=phantom.field, voxel_size=phantom.voxel_size,
                        b0_direction=phantom.b0_direction)
    for n in results:
        assert w.table.row(n)["field_residual"] == pytest.approx(want.row(n)["field_residual"], rel=1e-5)
    # the difference rows show the residual maps, and no reference column is drawn
    assert [c.title for c in w.panel.columns] == ["half", "noisy"]
    assert all(c.diff_volume is not None for c in w.panel.columns)
    assert "field residual" in w.panel._diff_title


def test_recompute_when_layer_data_changes(scene, phantom, qtbot):
    v, w, _ = scene
    old = w.table.row("half")["nrmse"]
    with qtbot.waitSignal(w.metricsReady, timeout=60000):
        v.layers["half"].data = _to_layer((0.9 * phantom.chi).astype(np.float32))
    assert w.table.row("half")["nrmse"] < old


def test_region_statistics(scene, phantom, qtbot):
    v, w, _ = scene
    lab = v.add_labels(_to_layer(phantom.labels), name="labels", metadata=_geometry_md(phantom, "labels"),
                       **_layer_kw(phantom))
    lab.features = {"index": list(range(16)),
                    "name": ["background"] + [phantom.label_names[i] for i in range(1, 16)]}
    # an open labels layer is picked by default (Regions is not left empty)
    qtbot.waitUntil(lambda: w.selection().labels == "labels", timeout=5000)
    w.set_labels("labels")
    qtbot.waitUntil(lambda: w.regions is not None and not w.busy, timeout=60000)
    st = w.regions
    assert "globus_pallidus" in st.names
    assert st.fits["half"].slope == pytest.approx(0.5, abs=1e-5)
    assert st.fits["half"].r2 == pytest.approx(1.0, abs=1e-6)
    assert w.region_table.rowCount() == len(st.labels)
    assert w.fit_table.rowCount() == 2
    assert "globus_pallidus" in w.copy_regions()


def test_contrast_spinboxes_drive_panel(scene):
    v, w, _ = scene
    w.chi_min.setValue(-0.3)
    w.chi_max.setValue(0.4)
    w.diff_lim.setValue(0.07)
    assert w.panel._chi_lim == (pytest.approx(-0.3), pytest.approx(0.4))
    assert w.panel._diff_lim == pytest.approx(0.07)
    w.planes_combo.setCurrentText("axial")
    assert w.panel.planes == ("axial",)
    assert len(w.panel._rows()) == 2


def test_slice_grid_alone(qtbot):
    """The panel on its own: physical aspect, subsampling of small cells, clicks and hover."""
    from napari_qsm._napari.compare.panel import PanelColumn, SliceGrid

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((64, 80, 40)).astype(np.float32) * 0.05
    res = ref + 0.01
    mask = np.zeros(ref.shape, bool)
    mask[8:-8, 8:-8, 4:-4] = True
    g = SliceGrid()
    qtbot.addWidget(g)
    g.resize(900, 900)
    g.set_columns([PanelColumn("ref", ref, subtitle="reference", diff_note="reference"),
                   PanelColumn("res", res, ref=ref, mask=mask, offset=0.01)], (1.0, 1.0, 2.0))
    g.set_point((10, 20, 30))
    rects = g._geometry()["rects"]
    rows = g._rows()
    ax = rects[(0, rows.index(("axial", False)))]
    sa = rects[(0, rows.index(("sagittal", False)))]
    assert ax.width() / ax.height() == pytest.approx(64 / 80, rel=1e-6)      # mm, not voxels
    assert sa.width() / sa.height() == pytest.approx(80 / 80, rel=1e-6)      # 80 mm × 40·2 mm
    # the demeaned difference inside the mask is 0 (white); outside it is black
    ri = rows.index(("axial", True))
    buf = g._images[(1, ri)][1]
    rgba = buf.view(np.uint8).reshape(buf.shape + (4,))
    assert tuple(rgba[rgba.shape[0] // 2, rgba.shape[1] // 2][:3]) == pytest.approx((247, 247, 247), abs=8)
    assert tuple(rgba[0, 0][:3]) == (0, 0, 0)
    # small cells: planes are subsampled (never fewer samples than pixels)
    full = g._images[(0, 0)][1].shape
    g.set_arrangement("below")   # six rows of cells in 300 px: less than a pixel per voxel
    g.resize(260, 300)
    g.refresh()
    small = g._images[(0, 0)][1].shape
    assert small[0] < full[0] and small[0] >= g._geometry()["rects"][(0, 0)].height() - 1
    # a click in the sagittal plane changes j and k and keeps i
    g.resize(900, 900)
    g.refresh()
    seen = []
    g.pointRequested.connect(seen.append)
    pos = g.pos_for_point(1, "sagittal", (10, 50, 7))
    qtbot.mouseClick(g, Qt.MouseButton.LeftButton, pos=pos.toPoint())
    assert seen == [(10, 50, 7)]
    assert g._describe(pos).startswith("res: χ(10, 50, 7) = ")


def test_choices_follow_renames_and_new_layers(make_napari_viewer, phantom, qtbot):
    from napari_qsm._napari.compare import CompareWidget

    v = make_napari_viewer()
    w = CompareWidget(v)            # opened before any data
    assert w.selection().reference is None and w.selection().results == []
    kw = _layer_kw(phantom)
    v.add_image(_to_layer(phantom.chi), name="truth", metadata=_geometry_md(phantom, "chi_true"), **kw)
    md = _geometry_md(phantom, "chi")
    md["provenance"] = {"method": "tkd", "parameters": {}, "seconds": 0.1}
    v.add_image(_to_layer(0.5 * phantom.chi), name="tkd", metadata=md, **kw)
    assert w.selection().reference == "truth"   # picked up when it appears
    assert w.selection().results == ["tkd"]     # new results are checked
    v.layers["tkd"].name = "tkd renamed"
    assert w.selection().results == ["tkd renamed"]
    v.layers["truth"].name = "true chi"
    assert w.selection().reference == "true chi"
    w.cleanup()


def test_phase_and_total_field_are_not_offered_as_results(make_napari_viewer, phantom):
    """Front-end inputs (reader roles "phase" and "total_field") are never results, like the local field."""
    from napari_qsm._napari.compare import CompareWidget

    v = make_napari_viewer()
    kw = _layer_kw(phantom)
    v.add_image(_to_layer(phantom.chi), name="truth", metadata=_geometry_md(phantom, "chi_true"), **kw)
    for name, role in (("echo phase", "phase"), ("B0 map", "total_field"), ("local", "field"), ("other", "image")):
        v.add_image(_to_layer(phantom.field), name=name, metadata=_geometry_md(phantom, role), **kw)
    md = _geometry_md(phantom, "chi")
    md["provenance"] = {"method": "tkd", "parameters": {}, "seconds": 0.1}
    v.add_image(_to_layer(0.5 * phantom.chi), name="tkd", metadata=md, **kw)
    w = CompareWidget(v)
    offered = [w.results_list.item(i).text() for i in range(w.results_list.count())]
    assert "echo phase" not in offered and "B0 map" not in offered and "local" not in offered
    assert "other" in offered and "tkd" in offered       # a plain image can still be checked by hand
    assert w.selection().results == ["tkd"]
    assert w.selection().field == "local"                # the local field stays the field
    w.cleanup()


def test_titles_wrap_and_crosshairs_toggle(scene, qtbot):
    from qtpy.QtGui import QFont, QFontMetrics

    from napari_qsm._napari.compare.paint import wrap_title

    fm = QFontMetrics(QFont())
    width = fm.horizontalAdvance("QSMInvNet+ adapted")
    lines = wrap_title("QSMInvNet+ adapted (120 steps)", fm, width)
    assert lines == ["QSMInvNet+ adapted", "(120 steps)"]
    assert all(fm.horizontalAdvance(ln) <= width for ln in lines)
    long = wrap_title("dsbn_domainauto_memory_gb3.0 and more words", fm, fm.horizontalAdvance("dsbn_domain"))
    assert len(long) == 2 and long[0].startswith("dsbn_do")
    v, w, _ = scene
    assert w.panel.crosshairs and w.cross_check.isChecked()
    w.cross_check.setChecked(False)
    assert not w.panel.crosshairs
    w.panel.repaint()  # paints without the lines
    w.cross_check.setChecked(True)
    assert w.panel.crosshairs


def test_thumbnails_scale_with_the_panel(qtbot):
    """Reference + 3 results of a 128×144×112 mm head: in a wide panel the differences go beside χ and
    every χ cell is ≥ 170 px (they were ~100 px with six stacked rows); in a narrow one they go below;
    zooming to a box enlarges the cells; each arrangement can be forced."""
    from napari_qsm._napari.compare.panel import PanelColumn, SliceGrid

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((32, 36, 28)).astype(np.float32) * 0.05
    cols = [PanelColumn("phantom true χ", ref, subtitle="reference", diff_note="reference")]
    for t in ("TKD δ=0.15", "MEDI λ=1000", "QSMInvNet+ adapted (120 steps)"):
        cols.append(PanelColumn(t, ref + 0.01, ref=ref, subtitle="x"))
    g = SliceGrid()
    qtbot.addWidget(g)
    g.set_columns(cols, (4.0, 4.0, 4.0))
    g.resize(1580, 640)          # the panel of the large window at 1600×1000
    assert g.arrangement == "beside"
    w, h = g.thumbnail_size()
    assert min(w, h) >= 150 and max(w, h) >= 170, (w, h)
    ax = g._geometry()["rects"][(1, g._rows().index(("axial", False)))]
    assert ax.height() >= 190                                   # 144 mm A-P at ≥ 1.3 px/mm
    # the Δ of a result sits right of its χ, on the same row
    d = g._geometry()["rects"][(1, g._rows().index(("axial", True)))]
    assert d.top() == ax.top() and ax.right() < d.left() < ax.right() + 40
    g.set_arrangement("below")
    assert g.arrangement == "below" and g.thumbnail_size()[1] < h
    g.set_arrangement("auto")
    g.resize(540, 800)           # a narrow dock: six rows, four columns
    assert g.arrangement == "below"
    assert min(g.thumbnail_size()) >= 70
    s_all = g._geometry()["scale"]
    g.set_box(((4, 4, 4), (28, 32, 24)))                         # e.g. the mask's bounding box
    assert g._geometry()["scale"] > 1.2 * s_all                  # px per mm: the brain fills the cells
    assert g._images[(0, 0)][1].shape[1] <= 24                    # cropped planes


def test_large_window_gives_the_slices_room(scene, qtbot):
    """The dock floated as a large window of 1600×1000: the differences go beside χ, the options take
    one line, and every χ cell is ≥ 150 px (about 100 px with the six stacked rows of before)."""
    from napari_qsm._napari.docks import dock_of

    v, w, _ = scene
    assert w.set_large(True)
    dock_of(w).resize(1600, 1000)
    qtbot.waitUntil(lambda: w.panel.width() > 1500, timeout=5000)
    qtbot.wait(50)
    assert w.panel.height() >= 650, w.panel.height()
    assert w.panel.arrangement == "beside"
    assert min(w.panel.thumbnail_size()) >= 150, w.panel.thumbnail_size()
    assert w.panel.box is not None                     # zoomed to the mask's bounding box
    assert w.options.height() < 2.5 * w.chi_min.height()  # one line of options
    w.set_large(False)
    assert w.tabs.cornerWidget() is not w.button_row          # docked: the buttons have their own row again
    assert w.layout().indexOf(w.button_row) == 1 and not w.button_row.isHidden()
