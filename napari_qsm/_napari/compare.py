"""The "Compare" dock widget: results side by side, difference maps and metrics.

A thin layer over :mod:`napari_qsm.core.compare`:

* choose a reference (any image layer, or *none*: then every result is scored by its
  field-consistency residual against a chosen field layer), a mask, and the result layers;
* an orthogonal-slices panel (:class:`~napari_qsm._napari.compare_panel.SliceGrid`): per
  result its axial / coronal / sagittal planes through the viewer's current position and,
  underneath, the difference to the reference; one shared χ contrast and one shared difference
  contrast (ppm). It follows ``viewer.dims`` (and optionally the mouse); clicking or scrolling
  in it moves the viewer;
* *Side by side* puts the results and their difference maps in napari's grid
  (``viewer.canvas.grid``) with linked contrast; *Restore view* undoes exactly that;
* a sortable metric table (best value per column highlighted), *Copy* / *Export CSV…*, a bar
  chart of one metric, and optional region statistics from a Labels layer.

Metrics run in a napari ``thread_worker`` (a generator: one result per step, so a newer request
stops an older one between results) and are recomputed when a chosen layer's data changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtGui import QBrush, QColor, QFont, QGuiApplication
from qtpy.QtWidgets import (
    QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QGridLayout, QHBoxLayout,
    QHeaderView, QLabel, QListWidget, QListWidgetItem, QPushButton, QSplitter,
    QTableWidget, QTableWidgetItem, QTabWidget, QVBoxLayout, QWidget,
)

from ..core import compare as core
from .compare_panel import PanelColumn, SliceGrid

NONE = "(none)"
_PERM_KEYS = ("axes", "axis_permutation", "permutation", "axes_permutation", "transpose", "axis_order",
              "display_permutation", "perm")


# ----------------------------------------------------------------------------------------------
# Layer geometry: the layer array may be a transposed view of the scan's voxel frame
# ----------------------------------------------------------------------------------------------

def _meta(layer) -> dict:
    md = getattr(layer, "metadata", None) or {}
    return md if isinstance(md, dict) else {}


def _plugin_geometry(layer):
    """The plugin's own geometry record (``layers.layer_geometry``), or None when unavailable."""
    try:
        from .layers import layer_geometry
    except ImportError:  # pragma: no cover - the plugin's layer helpers are missing
        return None
    try:
        return layer_geometry(layer)
    except Exception:
        return None


def layer_permutation(layer) -> Optional[tuple]:
    """``p`` with ``layer.data == canonical.transpose(p)`` (None: the layer is in the voxel frame).

    The plugin stores it as ``metadata["axes"]`` (layer axis a holds canonical axis axes[a]);
    layers without geometry follow the plugin's convention for plain arrays.
    """
    g = _plugin_geometry(layer)
    if g is not None:
        p = tuple(int(a) for a in g.axes)
        return None if p == (0, 1, 2) else p
    md = _meta(layer)
    for k in _PERM_KEYS:
        v = md.get(k)
        if v is None:
            continue
        try:
            p = tuple(int(a) for a in v)
        except (TypeError, ValueError):
            continue
        if sorted(p) == [0, 1, 2]:
            return None if p == (0, 1, 2) else p
    return None


def canonical(layer) -> np.ndarray:
    """The layer's 3-D data in the scan's voxel frame (a view; no copy for numpy data)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    a = np.asarray(data)
    if a.ndim != 3:
        raise ValueError(f"layer {layer.name!r}: expected a 3-D volume, got shape {a.shape}")
    p = layer_permutation(layer)
    return a if p is None else a.transpose(np.argsort(p))


def canonical_geometry(layer) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(voxel size in mm, B0 direction or None) in the voxel frame of :func:`canonical`."""
    g = _plugin_geometry(layer)
    if g is not None:
        return np.asarray(g.voxel_size, dtype=np.float64), np.asarray(g.b0_direction, dtype=np.float64)
    p = layer_permutation(layer)
    scale = np.abs(np.asarray(layer.scale, dtype=np.float64)[-3:])
    vs = np.empty(3)
    if p is None:
        vs[:] = scale
    else:
        for a in range(3):
            vs[p[a]] = scale[a]
    b0 = _meta(layer).get("b0_direction")
    if b0 is not None:
        b0 = np.asarray(b0, dtype=np.float64).reshape(-1)
        if b0.shape != (3,) or not np.all(np.isfinite(b0)):
            b0 = None
    return vs, b0


def _is_image(layer) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image) and layer.ndim == 3 and not getattr(layer, "rgb", False)


def _is_labels(layer) -> bool:
    from napari.layers import Labels

    return isinstance(layer, Labels) and layer.ndim == 3


def _kind(layer) -> str:
    md = _meta(layer)
    for k in ("role", "kind"):
        v = md.get(k)
        if isinstance(v, str):
            return v.lower()
    return ""


def _is_result(layer) -> bool:
    """A reconstruction (from the Reconstruct widget or a χ file), not the true χ."""
    md = _meta(layer)
    return "provenance" in md or _kind(layer) == "chi"


_NOT_RESULTS = ("field", "magnitude", "noise_std", "mask", "labels")


def _guess(layers, roles, words=()) -> Optional[str]:
    """First layer whose metadata role is in ``roles``, else whose name contains one of ``words``."""
    for lay in layers:
        if _kind(lay) in roles:
            return lay.name
    for lay in layers:
        nm = lay.name.lower()
        if any(w in nm for w in words):
            return lay.name
    return None


def label_names_of(layer) -> dict:
    """{value: name} of a Labels layer from its metadata (``label_names``) or features."""
    md = _meta(layer)
    for k in ("label_names", "labels", "names"):
        v = md.get(k)
        if isinstance(v, dict):
            out = {}
            for kk, vv in v.items():
                try:
                    out[int(kk)] = str(vv)
                except (TypeError, ValueError):
                    pass
            if out:
                return out
    try:
        feats = layer.features
        for col in ("name", "label_name", "names"):
            if col in feats.columns and "index" in feats.columns:
                return {int(i): str(n) for i, n in zip(feats["index"], feats[col])}
    except Exception:
        pass
    return {}


# ----------------------------------------------------------------------------------------------
# Table items that sort by value
# ----------------------------------------------------------------------------------------------

class _NumItem(QTableWidgetItem):
    def __init__(self, value: float, text: str) -> None:
        super().__init__(text)
        self.value = float(value) if value is not None else float("nan")
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other) -> bool:  # NaN sorts last
        a = self.value
        b = getattr(other, "value", float("nan"))
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a < b


def _page() -> tuple[QWidget, QVBoxLayout]:
    """A plain page (tab or sub-panel) with a margin-less vertical layout."""
    w = QWidget()
    lay = QVBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    return w, lay


def _wrapped_label(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    return lab


def _readonly_table(sortable: bool = False) -> QTableWidget:
    """An empty read-only table without row numbers (sortable by clicking a header if asked)."""
    t = QTableWidget(0, 0)
    if sortable:
        t.setSortingEnabled(True)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.verticalHeader().setVisible(False)
    return t


def _fmt(key: str, v: float) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if key in ("ssim", "xsim", "correlation"):
        return f"{v:.4f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}"


@dataclass
class _Selection:
    reference: Optional[str]
    results: list
    mask: Optional[str]
    field: Optional[str]
    labels: Optional[str]


class _ViewState:
    """What "Side by side" changed, so that "Restore view" undoes exactly that."""

    def __init__(self, viewer) -> None:
        g = viewer.canvas.grid
        self.grid = dict(enabled=g.enabled, shape=tuple(g.shape), stride=g.stride, spacing=g.spacing)
        cam = viewer.scene.camera
        self.camera = dict(center=tuple(cam.center), zoom=float(cam.zoom), angles=tuple(cam.angles),
                           orientation=tuple(getattr(cam, "orientation", ())))
        self.visible = {id(lay): bool(lay.visible) for lay in viewer.layers}
        self.layers = list(viewer.layers)
        self.selection = set(viewer.layers.selection)
        self.active = viewer.layers.selection.active
        self.contrast = {}
        self.name_overlay = {}
        self.added: list = []
        self.links = []


# ----------------------------------------------------------------------------------------------
# The widget
# ----------------------------------------------------------------------------------------------

class CompareWidget(QWidget):
    """Compare reconstructions: slices side by side, difference maps, metrics, region statistics."""

    #: emitted (on the GUI thread) when a metric computation finished (table present)
    metricsReady = Signal()

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.table: Optional[core.CompareTable] = None
        self.regions: Optional[core.RegionStats] = None
        self._worker = None
        self._generation = 0
        self._offsets: dict = {}
        self._residuals: dict = {}
        self._view_state: Optional[_ViewState] = None
        self._connected_layers: list = []
        self._updating = False
        self._contrast_set = False
        self._busy = False
        self._canon_cache: dict = {}
        self._known_names: dict = {}   # id(layer) → name at the last refresh (to follow renames)
        self._name_hooked: set = set()
        self._user_set: set = set()    # combos the user set (an explicit "(none)" is kept)

        self._recompute_timer = QTimer(self)
        self._recompute_timer.setSingleShot(True)
        self._recompute_timer.setInterval(300)
        self._recompute_timer.timeout.connect(self.recompute)
        self._cursor_timer = QTimer(self)
        self._cursor_timer.setSingleShot(True)
        self._cursor_timer.setInterval(30)
        self._cursor_timer.timeout.connect(self._follow_cursor)

        self._build_ui()
        self._refresh_choices()
        ev = self.viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layers_changed)
        ev.moved.connect(self._on_layers_changed)
        self.viewer.dims.events.point.connect(self._on_dims)
        self.viewer.cursor.events.position.connect(self._on_cursor)
        cam_ev = getattr(self.viewer.scene.camera.events, "orientation", None)
        if cam_ev is not None:
            cam_ev.connect(self._on_camera_orientation)
        self._on_camera_orientation()
        self._selection_changed()

    def _on_camera_orientation(self, event=None) -> None:
        """Show the patient's right where napari's 2-D view shows it (camera orientation)."""
        orient = tuple(getattr(self.viewer.scene.camera, "orientation2d", ()) or ())
        if len(orient) == 2 and self._view_state is None:
            self.radio_check.setChecked(orient[1] == "left")

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        self.reference_combo = QComboBox()
        self.reference_combo.setToolTip("Reference χ (e.g. the phantom's true χ, COSMOS or one method's result). "
                                        "(none): score each result by its field residual.")
        self.mask_combo = QComboBox()
        self.mask_combo.setToolTip("Metrics and demeaning use the voxels inside this mask ((none): whole volume).")
        self.field_combo = QComboBox()
        self.field_combo.setToolTip("Measured local field (ppm) for the field-consistency residual.")
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Labels layer for region statistics (mean χ per label).")
        self.results_list = QListWidget()
        self.results_list.setToolTip("Result layers to compare (checked ones).")
        self.results_list.setMaximumHeight(84)
        self.results_list.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        for cb in (self.reference_combo, self.mask_combo, self.field_combo, self.labels_combo):
            cb.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            cb.setMinimumContentsLength(8)
        grid = QGridLayout()
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(6)
        grid.setVerticalSpacing(3)
        for r, (lab, w1, lab2, w2) in enumerate((("Reference", self.reference_combo, "Mask", self.mask_combo),
                                                  ("Field", self.field_combo, "Labels", self.labels_combo))):
            grid.addWidget(QLabel(lab), r, 0)
            grid.addWidget(w1, r, 1)
            grid.addWidget(QLabel(lab2), r, 2)
            grid.addWidget(w2, r, 3)
        grid.addWidget(QLabel("Results"), 2, 0, Qt.AlignmentFlag.AlignTop)
        grid.addWidget(self.results_list, 2, 1, 1, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        root.addLayout(grid)

        # view buttons
        row = QHBoxLayout()
        self.grid_button = QPushButton("Side by side")
        self.grid_button.setToolTip("Show the results and their difference maps in napari's grid, contrast linked.")
        self.restore_button = QPushButton("Restore view")
        self.restore_button.setToolTip("Undo 'Side by side': remove the difference layers, grid off, previous view.")
        self.restore_button.setEnabled(False)
        row.addWidget(self.grid_button)
        row.addWidget(self.restore_button)
        root.addLayout(row)

        self.tabs = QTabWidget()
        root.addWidget(self.tabs, 1)

        # --- slices tab
        sl, sv = _page()
        c1 = QHBoxLayout()
        self.chi_min = self._spin(-0.15, "χ window minimum (ppm), shared by all χ panels")
        self.chi_max = self._spin(0.25, "χ window maximum (ppm), shared by all χ panels")
        self.diff_lim = self._spin(0.1, "difference window ±limit (ppm), shared by all difference panels", lo=1e-4)
        self.auto_button = QPushButton("Auto")
        self.auto_button.setToolTip("Contrast from the reference (or first result): 1st–99th percentile in the mask.")
        c1.addWidget(QLabel("χ"))
        c1.addWidget(self.chi_min)
        c1.addWidget(QLabel("…"))
        c1.addWidget(self.chi_max)
        c1.addWidget(QLabel("Δ ±"))
        c1.addWidget(self.diff_lim)
        c1.addWidget(self.auto_button)
        sv.addLayout(c1)
        c2 = QHBoxLayout()
        self.planes_combo = QComboBox()
        self.planes_combo.addItems(["axial + coronal + sagittal", "axial", "coronal", "sagittal"])
        self.demean_check = QCheckBox("Demean Δ")
        self.demean_check.setChecked(True)
        self.demean_check.setToolTip("Remove each difference map's mean inside the mask (χ is defined up to a constant).")
        self.follow_check = QCheckBox("Follow mouse")
        self.follow_check.setToolTip("Slices follow the mouse over the napari canvas (else the current slice).")
        self.radio_check = QCheckBox("Radiological")
        self.radio_check.setToolTip("Show the patient's right on the left in axial and coronal planes.")
        c2.addWidget(self.planes_combo)
        c2.addWidget(self.demean_check)
        c2.addWidget(self.follow_check)
        c2.addWidget(self.radio_check)
        c2.addStretch(1)
        sv.addLayout(c2)
        self.panel = SliceGrid()
        self.panel.setMinimumHeight(420)
        sv.addWidget(self.panel, 1)
        self.hover_label = QLabel(" ")
        self.hover_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        sv.addWidget(self.hover_label)
        self.tabs.addTab(sl, "Slices")

        # --- metrics tab
        mt, mv = _page()
        self.status_label = _wrapped_label("")
        mv.addWidget(self.status_label)
        self.metric_table = _readonly_table(sortable=True)
        self.metric_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.metric_table)
        chart, cv = _page()
        crow = QHBoxLayout()
        crow.addWidget(QLabel("Bar chart"))
        self.chart_combo = QComboBox()
        crow.addWidget(self.chart_combo, 1)
        cv.addLayout(crow)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.chart_fig = Figure(figsize=(4, 2.4), dpi=90, layout="constrained")
        self.chart_canvas = FigureCanvasQTAgg(self.chart_fig)
        self.chart_canvas.setMinimumHeight(180)
        cv.addWidget(self.chart_canvas, 1)
        splitter.addWidget(chart)
        mv.addWidget(splitter, 1)
        brow = QHBoxLayout()
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the table (tab-separated, with units) to the clipboard.")
        self.export_button = QPushButton("Export CSV…")
        self.recompute_button = QPushButton("Recompute")
        brow.addWidget(self.copy_button)
        brow.addWidget(self.export_button)
        brow.addStretch(1)
        brow.addWidget(self.recompute_button)
        mv.addLayout(brow)
        self.tabs.addTab(mt, "Metrics")

        # --- regions tab
        rt, rv = _page()
        self.region_label = _wrapped_label(
            "Choose a Labels layer to get the mean χ per region and the fit against the reference.")
        rv.addWidget(self.region_label)
        self.region_table = _readonly_table(sortable=True)
        rv.addWidget(self.region_table, 1)
        self.fit_table = _readonly_table()
        self.fit_table.setMaximumHeight(150)
        rv.addWidget(self.fit_table)
        rrow = QHBoxLayout()
        self.region_copy_button = QPushButton("Copy")
        rrow.addWidget(self.region_copy_button)
        rrow.addStretch(1)
        rv.addLayout(rrow)
        self.tabs.addTab(rt, "Regions")

        # signals
        for cb in (self.reference_combo, self.mask_combo, self.field_combo, self.labels_combo):
            cb.currentIndexChanged.connect(self._selection_changed)
            cb.activated.connect(lambda _i, c=cb: self._user_set.add(c))
        self.results_list.itemChanged.connect(self._selection_changed)
        self.chi_min.valueChanged.connect(self._contrast_changed)
        self.chi_max.valueChanged.connect(self._contrast_changed)
        self.diff_lim.valueChanged.connect(self._contrast_changed)
        self.auto_button.clicked.connect(self.auto_contrast)
        self.planes_combo.currentIndexChanged.connect(self._planes_changed)
        self.demean_check.toggled.connect(self._demean_changed)
        self.radio_check.toggled.connect(self.panel.set_radiological)
        self.panel.pointRequested.connect(self.move_viewer_to)
        self.panel.hovered.connect(lambda s: self.hover_label.setText(s or " "))
        self.grid_button.clicked.connect(self.side_by_side)
        self.restore_button.clicked.connect(self.restore_view)
        self.copy_button.clicked.connect(self.copy_table)
        self.export_button.clicked.connect(self._export_dialog)
        self.recompute_button.clicked.connect(self.recompute)
        self.chart_combo.currentIndexChanged.connect(self._draw_chart)
        self.region_copy_button.clicked.connect(self.copy_regions)
        self.tabs.currentChanged.connect(self._on_tab)

    def _on_tab(self, index: int) -> None:
        if self.tabs.widget(index) is self.panel.parentWidget() and self.panel._dirty:
            self.panel.refresh()

    def _spin(self, value, tip, lo=-10.0) -> QDoubleSpinBox:
        sp = QDoubleSpinBox()
        sp.setDecimals(3)
        sp.setRange(lo, 10.0)
        sp.setSingleStep(0.01)
        sp.setValue(value)
        sp.setSuffix(" ppm")
        sp.setToolTip(tip)
        sp.setKeyboardTracking(False)
        return sp

    # ------------------------------------------------------------------ layer choices
    def _image_layers(self) -> list:
        return [lay for lay in self.viewer.layers if _is_image(lay) and lay.name not in self._added_names()]

    def _added_names(self) -> set:
        if self._view_state is None:
            return set()
        return {lay.name for lay in self._view_state.added}

    def _layer(self, name: Optional[str]):
        if not name or name == NONE:
            return None
        try:
            return self.viewer.layers[name]
        except (KeyError, ValueError):
            return None

    def _refresh_choices(self) -> None:
        self._updating = True
        try:
            images = self._image_layers()
            names = [lay.name for lay in images]
            labels = [lay.name for lay in self.viewer.layers if _is_labels(lay)]
            mask_names = names + [n for n in labels if n not in names]
            # follow renamed layers (choices are kept by layer, not by name)
            renamed = {}
            for lay in self.viewer.layers:
                old = self._known_names.get(id(lay))
                if old is not None and old != lay.name:
                    renamed[old] = lay.name
            self._known_names = {id(lay): lay.name for lay in self.viewer.layers}

            def fill(combo, options, guess):
                cur = combo.currentText() if combo.count() else None
                cur = renamed.get(cur, cur)
                combo.clear()
                combo.addItems([NONE] + options)
                if cur and cur in options:
                    combo.setCurrentText(cur)
                elif combo in self._user_set and cur == NONE:
                    pass  # the user chose (none): keep it
                elif guess in options:
                    combo.setCurrentText(guess)

            non_results = [lay for lay in images if not _is_result(lay)]
            fill(self.reference_combo, names, _guess(non_results, ("chi_true",), ("truth", "reference", "cosmos")))
            fill(self.mask_combo, mask_names, _guess([self.viewer.layers[n] for n in mask_names], ("mask",), ("mask",)))
            fill(self.field_combo, names, _guess(non_results, ("field",), ("field",)))
            fill(self.labels_combo, labels, None)
            # results: checkable list; keep check states, default = layers that carry provenance
            checked = {renamed.get(self.results_list.item(i).text(), self.results_list.item(i).text()):
                       self.results_list.item(i).checkState() for i in range(self.results_list.count())}
            self.results_list.clear()
            skip = {self.mask_combo.currentText(), self.field_combo.currentText()}
            for lay in images:
                if (lay.name in skip or _kind(lay) in _NOT_RESULTS) and lay.name not in checked:
                    continue
                it = QListWidgetItem(lay.name)
                it.setFlags(it.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                if lay.name in checked:
                    st = checked[lay.name]
                else:
                    st = Qt.CheckState.Checked if _is_result(lay) else Qt.CheckState.Unchecked
                it.setCheckState(st)
                self.results_list.addItem(it)
            # layer renames refresh the choices
            for lay in self.viewer.layers:
                if id(lay) not in self._name_hooked:
                    lay.events.name.connect(self._on_layers_changed)
                    self._name_hooked.add(id(lay))
        finally:
            self._updating = False

    def set_reference(self, name: Optional[str]) -> None:
        self._user_set.add(self.reference_combo)
        self.reference_combo.setCurrentText(name or NONE)

    def set_mask(self, name: Optional[str]) -> None:
        self._user_set.add(self.mask_combo)
        self.mask_combo.setCurrentText(name or NONE)

    def set_field(self, name: Optional[str]) -> None:
        self._user_set.add(self.field_combo)
        self.field_combo.setCurrentText(name or NONE)

    def set_labels(self, name: Optional[str]) -> None:
        self._user_set.add(self.labels_combo)
        self.labels_combo.setCurrentText(name or NONE)

    def set_results(self, names) -> None:
        names = set(names)
        self._updating = True
        try:
            for i in range(self.results_list.count()):
                it = self.results_list.item(i)
                it.setCheckState(Qt.CheckState.Checked if it.text() in names else Qt.CheckState.Unchecked)
        finally:
            self._updating = False
        self._selection_changed()

    def selection(self) -> _Selection:
        def val(cb):
            t = cb.currentText()
            return None if (not t or t == NONE) else t

        ref = val(self.reference_combo)
        results = [self.results_list.item(i).text() for i in range(self.results_list.count())
                   if self.results_list.item(i).checkState() == Qt.CheckState.Checked]
        results = [r for r in results if r != ref]
        return _Selection(reference=ref, results=results, mask=val(self.mask_combo),
                          field=val(self.field_combo), labels=val(self.labels_combo))

    def _on_layers_changed(self, event=None) -> None:
        if self._busy:
            return
        self._refresh_choices()
        self._selection_changed()

    # ------------------------------------------------------------------ data of the chosen layers
    def _canon(self, name: str) -> np.ndarray:
        lay = self._layer(name)
        key = (name, id(lay), id(lay.data))
        got = self._canon_cache.get(name)
        if got is not None and got[0] == key:
            return got[1]
        arr = canonical(lay)
        self._canon_cache[name] = (key, arr)
        return arr

    def _mask_array(self, sel: _Selection, shape) -> Optional[np.ndarray]:
        if sel.mask is None:
            return None
        m = self._canon(sel.mask)
        if m.shape != tuple(shape):
            self._warn(f"mask {sel.mask!r}: shape {m.shape} does not match {tuple(shape)}; ignored")
            return None
        return m > 0.5 if m.dtype != bool else m

    def _disconnect_layer_data(self) -> None:
        for lay in self._connected_layers:
            try:
                lay.events.data.disconnect(self._on_layer_data)
            except Exception:
                pass
        self._connected_layers = []

    def _connect_layer_events(self, sel: _Selection) -> None:
        self._disconnect_layer_data()
        for name in [sel.reference, sel.mask, sel.field, sel.labels] + list(sel.results):
            lay = self._layer(name)
            if lay is not None and lay not in self._connected_layers:
                lay.events.data.connect(self._on_layer_data)
                self._connected_layers.append(lay)

    def _on_layer_data(self, event=None) -> None:
        self._canon_cache.clear()
        self._build_panel()
        self._recompute_timer.start()

    def _selection_changed(self, *args) -> None:
        if self._updating:
            return
        sel = self.selection()
        self.field_combo.setEnabled(True)
        self._connect_layer_events(sel)
        self._build_panel()
        self._recompute_timer.start()

    # ------------------------------------------------------------------ the slices panel
    def _geometry_layer(self, sel: _Selection):
        return self._layer(sel.reference) or (self._layer(sel.results[0]) if sel.results else None)

    def _build_panel(self) -> None:
        sel = self.selection()
        geo = self._geometry_layer(sel)
        if geo is None:
            self.panel.set_columns([], (1, 1, 1))
            return
        ref = self._canon(sel.reference) if sel.reference else None
        shape = (ref if ref is not None else self._canon(sel.results[0])).shape
        vs, _ = canonical_geometry(geo)
        mask = self._mask_array(sel, shape)
        cols = []
        if ref is not None:
            cols.append(PanelColumn(title=sel.reference, subtitle="reference", volume=ref, diff_note="reference"))
        for name in sel.results:
            try:
                vol = self._canon(name)
            except ValueError as exc:
                self._warn(str(exc))
                continue
            if vol.shape != shape:
                self._warn(f"{name!r}: shape {vol.shape} differs from {shape}; left out of the comparison")
                continue
            sub = _describe_result(self._layer(name))
            if ref is not None:
                cols.append(PanelColumn(title=name, subtitle=sub, volume=vol, ref=ref, mask=mask,
                                        offset=self._offsets.get(name, 0.0) if self.demean_check.isChecked() else 0.0))
            else:
                res = self._residuals.get(name)
                note = "computing field residual…" if sel.field else "choose a reference or a field"
                cols.append(PanelColumn(title=name, subtitle=sub, volume=vol, diff_volume=res, diff_note=note,
                                        mask=mask))
        if ref is not None:
            title = "Δχ = result − reference" + (" (demeaned in the mask)" if self.demean_check.isChecked() else "")
            unit = "Δχ (ppm)"
        else:
            title = "field residual D∗χ − field (demeaned in the mask)"
            unit = "residual (ppm)"
        self.panel.set_columns(cols, vs, diff_title=title, diff_unit=unit)
        if not self._contrast_set and cols:
            self.auto_contrast()
        self._on_dims()

    def _contrast_changed(self, *args) -> None:
        lo, hi = self.chi_min.value(), self.chi_max.value()
        if hi <= lo:
            hi = lo + 1e-3
        self.panel.set_chi_limits(lo, hi)
        self.panel.set_diff_limit(self.diff_lim.value())
        self._apply_grid_contrast()

    def auto_contrast(self) -> None:
        """χ window = 1st–99th percentile (reference or first result) in the mask; Δ = a third of it."""
        cols = self.panel.columns
        if not cols:
            return
        sel = self.selection()
        vol = cols[0].volume
        m = self._mask_array(sel, vol.shape)
        step = max(1, int(round((vol.size / 2e6) ** (1 / 3))))
        sub = vol[::step, ::step, ::step]
        if m is not None:
            vals = sub[m[::step, ::step, ::step]]
        else:
            vals = sub.ravel()
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            return
        lo, hi = np.percentile(vals, [1.0, 99.0])
        if hi - lo < 1e-6:
            lo, hi = lo - 0.05, hi + 0.05
        lo, hi = _nice(lo), _nice(hi)
        dl = _nice(max(abs(hi - lo) / 3.0, 1e-3))
        self._contrast_set = True
        for sp, v in ((self.chi_min, lo), (self.chi_max, hi), (self.diff_lim, dl)):
            sp.blockSignals(True)
            sp.setValue(float(v))
            sp.blockSignals(False)
        self._contrast_changed()

    def _planes_changed(self, idx: int) -> None:
        txt = self.planes_combo.currentText()
        self.panel.set_planes(core.PLANES if "+" in txt else (txt,))

    def _demean_changed(self, on: bool) -> None:
        self._build_panel()

    def _point_from_world(self, world) -> Optional[tuple]:
        sel = self.selection()
        lay = self._geometry_layer(sel)
        if lay is None:
            return None
        data = np.asarray(lay.world_to_data(np.asarray(world, dtype=np.float64)))[-3:]
        p = layer_permutation(lay)
        if p is None:
            return tuple(float(v) for v in data)
        out = [0.0, 0.0, 0.0]
        for a in range(3):
            out[p[a]] = float(data[a])
        return tuple(out)

    def _on_dims(self, event=None) -> None:
        pt = self._point_from_world(self.viewer.dims.point)
        if pt is not None:
            self.panel.set_point(pt)

    def _on_cursor(self, event=None) -> None:
        if self.follow_check.isChecked():
            self._cursor_timer.start()

    def _follow_cursor(self) -> None:
        pos = self.viewer.cursor.position
        if pos is None or len(pos) < 3:
            return
        pt = self._point_from_world(pos)
        if pt is not None:
            self.panel.set_point(pt)

    def move_viewer_to(self, point) -> None:
        """Move the viewer (``viewer.dims``) to a canonical voxel point of the compared volumes."""
        sel = self.selection()
        lay = self._geometry_layer(sel)
        if lay is None:
            return
        p = layer_permutation(lay)
        data = [0.0, 0.0, 0.0]
        for a in range(3):
            data[a] = float(point[a if p is None else p[a]])
        world = np.asarray(lay.data_to_world(data), dtype=np.float64)
        nd = self.viewer.dims.ndim
        axes = list(range(nd - 3, nd))
        self.viewer.dims.set_point(axes, tuple(float(v) for v in world[-3:]))
        self.panel.set_point(point)

    # ------------------------------------------------------------------ metrics (worker)
    def recompute(self) -> None:
        """Start (or restart) the metric computation for the current selection."""
        self._recompute_timer.stop()
        sel = self.selection()
        self._generation += 1
        gen = self._generation
        self._stop_worker()
        self.table = None
        self.regions = None
        if not sel.results:
            self._set_status("Choose result layers to compare.")
            self._fill_table(None)
            self._fill_regions(None)
            return
        if sel.reference is None and sel.field is None:
            self._set_status("No reference: choose a field layer to score the results by their field residual.")
            self._fill_table(None)
            return
        try:
            job = self._job_inputs(sel)
        except ValueError as exc:
            self._set_status(str(exc))
            self._warn(str(exc))
            return
        from napari.qt.threading import thread_worker

        worker = thread_worker(_metrics_job, progress=False)(**job)
        worker.yielded.connect(lambda item, g=gen: self._on_yield(g, item))
        worker.returned.connect(lambda _r, g=gen: self._on_done(g))
        worker.errored.connect(lambda exc, g=gen: self._on_error(g, exc))
        self._worker = worker
        self._partial_rows = []
        self._job_reference = sel.reference
        self._set_status(f"Computing metrics for {len(job['results'])} result(s)…")
        worker.start()

    def _job_inputs(self, sel: _Selection) -> dict:
        ref = self._canon(sel.reference) if sel.reference else None
        results = {}
        for n in sel.results:
            v = self._canon(n)
            shape = ref.shape if ref is not None else next(iter(results.values()), v).shape
            if v.shape != shape:
                continue
            results[n] = v
        if not results:
            raise ValueError("Compare: no result has the reference's shape")
        shape = next(iter(results.values())).shape
        mask = self._mask_array(sel, shape)
        field = vs = b0 = None
        if sel.field is not None:
            f = self._canon(sel.field)
            if f.shape == shape:
                vs, b0 = canonical_geometry(self._layer(sel.field))
                if b0 is None:
                    vs2, b0 = canonical_geometry(self._geometry_layer(sel))
                if b0 is None:
                    b0 = np.array([0.0, 0.0, 1.0])
                    self._warn(f"field {sel.field!r}: no B0 direction in the layer metadata; assuming (0, 0, 1)")
                field = f
            else:
                self._warn(f"field {sel.field!r}: shape {f.shape} differs from {shape}; no field residual")
        if ref is None and field is None:
            raise ValueError("Compare: without a reference the field layer must match the results' shape")
        labels = names = None
        if sel.labels is not None:
            lab = self._canon(sel.labels)
            if lab.shape == shape:
                labels = lab
                names = label_names_of(self._layer(sel.labels))
        return dict(results=results, reference=ref, mask=mask, field=field, voxel_size=vs, b0_direction=b0,
                    labels=labels, label_names=names, reference_name=sel.reference,
                    residual_maps=ref is None and field is not None,
                    demean=self.demean_check.isChecked())

    def _on_yield(self, gen: int, item) -> None:
        if gen != self._generation:
            return
        kind = item[0]
        if kind == "offsets":
            self._offsets = dict(item[1])
            if self.demean_check.isChecked():
                self.panel.set_offsets(self._offsets)
        elif kind == "residual":
            self._residuals[item[1]] = item[2]
            self.panel.set_diff_volume(item[1], item[2])
        elif kind == "row":
            self._partial_rows.append(item[1])
            keys = [k for r in self._partial_rows for k in r.metrics]
            partial = core.CompareTable(rows=list(self._partial_rows), columns=core._columns_for(keys),
                                        reference=self._job_reference)
            self._fill_table(partial)
            self._set_status(f"Computing metrics… {item[2]}/{item[3]}")
        elif kind == "table":
            self.table = item[1]
            self._fill_table(self.table)
        elif kind == "regions":
            self.regions = item[1]
            self._fill_regions(self.regions)

    def _on_done(self, gen: int) -> None:
        if gen != self._generation:
            return
        self._worker = None
        if self.table is not None:
            ref = self.table.reference
            what = f"against {ref!r}" if ref else "field-consistency residual (no reference)"
            self._set_status(f"{len(self.table)} result(s), {what}; inside "
                             f"{'mask ' + repr(self.selection().mask) if self.selection().mask else 'the whole volume'}.")
        if self.selection().labels is None:
            self._fill_regions(None)
        self.metricsReady.emit()

    def _on_error(self, gen: int, exc) -> None:
        if gen != self._generation:
            return
        self._worker = None
        self._set_status(f"Metrics failed: {exc}")
        self._warn(f"Compare: metrics failed: {exc}")

    def _stop_worker(self) -> None:
        """Quit a running metrics worker (its late results are ignored by generation)."""
        if self._worker is not None:
            try:
                self._worker.quit()
            except Exception:
                pass
            self._worker = None

    @property
    def busy(self) -> bool:
        return self._worker is not None or self._recompute_timer.isActive()

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _warn(self, msg: str) -> None:
        try:
            from napari.utils.notifications import show_warning

            show_warning(msg)
        except Exception:  # pragma: no cover
            pass

    # ------------------------------------------------------------------ table, chart, export
    def _fill_table(self, table: Optional[core.CompareTable]) -> None:
        t = self.metric_table
        t.setSortingEnabled(False)
        t.clear()
        if table is None or not table.rows:
            t.setRowCount(0)
            t.setColumnCount(0)
            self._update_chart_choices([])
            return
        cols = table.columns
        t.setColumnCount(len(cols) + 1)
        t.setRowCount(len(table.rows))
        headers = ["Result"]
        for c in cols:
            lab, unit, hib, doc = core.metric_info(c)
            headers.append(f"{lab} ({unit})" if unit else lab)
        t.setHorizontalHeaderLabels(headers)
        for ci, c in enumerate(cols):
            lab, unit, hib, doc = core.metric_info(c)
            hi = t.horizontalHeaderItem(ci + 1)
            hi.setToolTip(f"{doc} — {'higher' if hib else 'lower'} is better")
        best = core.best_per_column(table)
        bold = QFont(t.font())
        bold.setBold(True)
        good = QBrush(QColor(60, 140, 70, 150))
        for ri, row in enumerate(table.rows):
            it = QTableWidgetItem(row.name)
            it.setFlags(it.flags() & ~Qt.ItemFlag.ItemIsEditable)
            t.setItem(ri, 0, it)
            for ci, c in enumerate(cols):
                v = row.get(c)
                cell = _NumItem(v, _fmt(c, v))
                if best.get(c) == row.name:
                    cell.setFont(bold)
                    cell.setBackground(good)
                    cell.setToolTip("best in this column")
                t.setItem(ri, ci + 1, cell)
        t.setSortingEnabled(True)
        self._update_chart_choices(cols)

    def best_cells(self) -> dict:
        """{metric key: result name} of the highlighted cells (for tests)."""
        return core.best_per_column(self.table) if self.table else {}

    def _update_chart_choices(self, cols) -> None:
        cur = self.chart_combo.currentData()
        self.chart_combo.blockSignals(True)
        self.chart_combo.clear()
        for c in cols:
            lab, unit = core.metric_info(c)[:2]
            self.chart_combo.addItem(f"{lab} ({unit})" if unit else lab, c)
        if cur in cols:
            self.chart_combo.setCurrentIndex(list(cols).index(cur))
        elif "nrmse_demeaned" in cols:
            self.chart_combo.setCurrentIndex(list(cols).index("nrmse_demeaned"))
        self.chart_combo.blockSignals(False)
        self._draw_chart()

    def _draw_chart(self, *args) -> None:
        fig = self.chart_fig
        fig.clear()
        key = self.chart_combo.currentData()
        table = self.table
        if table is None and self.metric_table.rowCount():
            table = core.CompareTable(rows=list(getattr(self, "_partial_rows", [])),
                                      columns=[self.chart_combo.itemData(i) for i in range(self.chart_combo.count())])
        if key is None or table is None or not table.rows:
            self.chart_canvas.draw_idle()
            return
        pal = self.palette()
        bg = pal.color(pal.ColorRole.Window).name()
        fg = pal.color(pal.ColorRole.WindowText).name()
        fig.set_facecolor(bg)
        ax = fig.add_subplot(111)
        ax.set_facecolor(bg)
        for sp in ax.spines.values():
            sp.set_color(fg)
        ax.tick_params(colors=fg)
        vals = table.column(key)
        names = table.names
        lab, unit, hib, _ = core.metric_info(key)
        best = core.best_per_column(table).get(key)
        colors = ["#3c8c46" if n == best else "#6a7fa8" for n in names]
        y = np.arange(len(names))
        ax.barh(y, np.nan_to_num(vals), color=colors)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{lab} ({unit})" if unit else lab, fontsize=8, color=fg)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(("higher" if hib else "lower") + " is better", fontsize=8, color=fg)
        for yi, v in zip(y, vals):
            if np.isfinite(v):
                ax.text(v, yi, " " + _fmt(key, v), va="center", fontsize=7, color=fg)
        ax.margins(x=0.2)
        self.chart_canvas.draw_idle()

    def copy_table(self) -> str:
        table = self.table
        text = core.to_text(table) if table else ""
        QGuiApplication.clipboard().setText(text)
        return text

    def export_csv(self, path) -> None:
        if self.table is None:
            raise ValueError("Compare: no metrics to export yet")
        core.to_csv(self.table, path)

    def _export_dialog(self) -> None:
        if self.table is None:
            self._warn("Compare: no metrics to export yet")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", "compare_metrics.csv", "CSV (*.csv)")
        if path:
            try:
                self.export_csv(path)
            except Exception as exc:
                self._warn(f"Compare: could not write {path}: {exc}")

    # ------------------------------------------------------------------ regions
    def _fill_regions(self, st: Optional[core.RegionStats]) -> None:
        t = self.region_table
        t.setSortingEnabled(False)
        t.clear()
        self.fit_table.clear()
        if st is None:
            t.setRowCount(0)
            t.setColumnCount(0)
            self.fit_table.setRowCount(0)
            self.fit_table.setColumnCount(0)
            return
        cols = (["reference"] if st.reference is not None else []) + list(st.means)
        t.setColumnCount(3 + len(cols))
        t.setRowCount(len(st.labels))
        t.setHorizontalHeaderLabels(["Label", "Region", "Voxels"] + [f"{c} (ppm)" for c in cols])
        for ri, (lab, nm) in enumerate(zip(st.labels, st.names)):
            t.setItem(ri, 0, _NumItem(lab, str(lab)))
            it = QTableWidgetItem(nm)
            it.setFlags(it.flags() & ~Qt.ItemFlag.ItemIsEditable)
            t.setItem(ri, 1, it)
            t.setItem(ri, 2, _NumItem(st.counts[ri], str(int(st.counts[ri]))))
            vals = ([st.reference[ri]] if st.reference is not None else []) + [st.means[c][ri] for c in st.means]
            for ci, v in enumerate(vals):
                t.setItem(ri, 3 + ci, _NumItem(v, f"{v:+.4f}"))
        t.setSortingEnabled(True)
        t.resizeColumnsToContents()
        if st.fits:
            f = self.fit_table
            f.setColumnCount(5)
            f.setRowCount(len(st.fits))
            f.setHorizontalHeaderLabels(["Result", "Slope", "Intercept (ppm)", "R²", "Regions"])
            for ri, (name, fit) in enumerate(st.fits.items()):
                f.setItem(ri, 0, QTableWidgetItem(name))
                f.setItem(ri, 1, _NumItem(fit.slope, f"{fit.slope:.3f}"))
                f.setItem(ri, 2, _NumItem(fit.intercept, f"{fit.intercept:+.4f}"))
                f.setItem(ri, 3, _NumItem(fit.r2, f"{fit.r2:.3f}"))
                f.setItem(ri, 4, _NumItem(fit.n, str(fit.n)))
            f.resizeColumnsToContents()
            self.region_label.setText("Mean χ per region; fit: result mean = slope · reference mean + intercept.")
        else:
            self.region_label.setText("Mean χ per region (no reference: no fit).")

    def copy_regions(self) -> str:
        text = self.regions.to_text() if self.regions is not None else ""
        QGuiApplication.clipboard().setText(text)
        return text

    # ------------------------------------------------------------------ grid view
    @property
    def side_by_side_active(self) -> bool:
        return self._view_state is not None

    def side_by_side(self) -> None:
        """Grid mode: results in the top row (then the reference), their difference maps below."""
        if self._view_state is not None:
            return
        sel = self.selection()
        results = [self._layer(n) for n in sel.results]
        results = [r for r in results if r is not None]
        if not results:
            self._warn("Compare: choose result layers first")
            return
        from napari.experimental import layers_linked

        v = self.viewer
        state = _ViewState(v)
        ref_layer = self._layer(sel.reference)
        # results in the order of the layer list (that is the grid order)
        order = {id(lay): i for i, lay in enumerate(v.layers)}
        results.sort(key=lambda lay: order[id(lay)])
        lo, hi = self.chi_min.value(), self.chi_max.value()
        dl = self.diff_lim.value()
        self._busy = True
        try:
            for lay in v.layers:
                lay.visible = False
            chi_layers = list(results)
            diff_layers = []
            if ref_layer is not None:
                ref_view = v.add_image(ref_layer.data, name=f"{ref_layer.name} (reference)", colormap="gray",
                                       contrast_limits=(lo, hi), **_like(ref_layer, role=_kind(ref_layer) or "chi"))
                state.added.append(ref_view)
                chi_layers.append(ref_view)
                cmap = _diverging_colormap()
                refd = np.asarray(ref_layer.data)
                for lay in results:
                    d = np.asarray(lay.data)
                    if d.shape != refd.shape:
                        continue
                    diff = np.subtract(d, refd, dtype=np.float32)
                    m = self._mask_array(sel, canonical(lay).shape)
                    perm = layer_permutation(lay)
                    mm = None if m is None else (m if perm is None else m.transpose(perm))
                    if self.demean_check.isChecked():
                        off = self._offsets.get(lay.name)
                        if off is None:
                            off = float(diff[mm].mean()) if mm is not None else float(diff.mean())
                        diff -= np.float32(off)
                    if mm is not None:
                        diff[~mm] = 0.0
                    dl_layer = v.add_image(diff, name=f"Δ {lay.name}", colormap=cmap, contrast_limits=(-dl, dl),
                                           **_like(lay, difference={"result": lay.name, "reference": ref_layer.name,
                                                                    "demeaned": self.demean_check.isChecked()}))
                    state.added.append(dl_layer)
                    diff_layers.append(dl_layer)
            elif self._residuals:
                cmap = _diverging_colormap()
                for lay in results:
                    r = self._residuals.get(lay.name)
                    if r is None:
                        continue
                    p = layer_permutation(lay)
                    data = r if p is None else r.transpose(p)
                    dl_layer = v.add_image(np.ascontiguousarray(data), name=f"residual {lay.name}", colormap=cmap,
                                           contrast_limits=(-dl, dl),
                                           **_like(lay, difference={"result": lay.name, "field_residual": True}))
                    state.added.append(dl_layer)
                    diff_layers.append(dl_layer)
            for lay in results:
                state.contrast[id(lay)] = tuple(lay.contrast_limits)
                state.name_overlay[id(lay)] = (bool(lay.name_overlay.visible), float(lay.name_overlay.font_size))
                lay.contrast_limits = (lo, hi)
                lay.visible = True
            for lay in results + state.added:  # layer name in its grid cell
                lay.visible = True
                lay.name_overlay.font_size = 9
                lay.name_overlay.visible = True
            # one colour bar per group (ppm), in the cells of the reference and of the first difference
            for lay in ([state.added[0]] if ref_layer is not None else []) + diff_layers[:1]:
                try:
                    lay.colorbar.position = "bottom_right"
                    lay.colorbar.visible = True
                except Exception:  # pragma: no cover - older napari without layer colour bars
                    pass
            ncols = len(chi_layers)
            if len(chi_layers) > 1:
                cm = layers_linked(chi_layers, ("contrast_limits",))
                cm.__enter__()
                state.links.append(cm)
            if len(diff_layers) > 1:
                cm = layers_linked(diff_layers, ("contrast_limits",))
                cm.__enter__()
                state.links.append(cm)
            grid = v.canvas.grid
            grid.stride = 1
            grid.shape = (2, ncols) if diff_layers else (1, ncols)
            grid.enabled = True
            v.reset_view()
            v.layers.selection.active = results[0]
        except Exception:
            self._busy = False
            self._view_state = state
            self.restore_view()
            raise
        finally:
            self._busy = False
        self._view_state = state
        self.grid_button.setEnabled(False)
        self.restore_button.setEnabled(True)

    def _apply_grid_contrast(self) -> None:
        st = self._view_state
        if st is None:
            return
        lo, hi = self.chi_min.value(), self.chi_max.value()
        dl = self.diff_lim.value()
        for lay in st.added:
            if lay in self.viewer.layers:
                lay.contrast_limits = (-dl, dl) if lay.name.startswith(("Δ ", "residual ")) else (lo, hi)
        for lay in self.viewer.layers:
            if id(lay) in st.contrast:
                lay.contrast_limits = (lo, hi)

    def restore_view(self) -> None:
        """Undo :meth:`side_by_side` exactly (added layers, grid, visibility, contrast, camera)."""
        st = self._view_state
        if st is None:
            return
        v = self.viewer
        self._busy = True
        try:
            for cm in st.links:
                try:
                    cm.__exit__(None, None, None)
                except Exception:
                    pass
            for lay in st.added:
                if lay in v.layers:
                    v.layers.remove(lay)
            for lay in v.layers:
                if id(lay) in st.contrast:
                    lay.contrast_limits = st.contrast[id(lay)]
                if id(lay) in st.name_overlay:
                    lay.name_overlay.visible, lay.name_overlay.font_size = st.name_overlay[id(lay)]
                if id(lay) in st.visible:
                    lay.visible = st.visible[id(lay)]
            g = v.canvas.grid
            g.enabled = st.grid["enabled"]
            g.shape = st.grid["shape"]
            g.stride = st.grid["stride"]
            g.spacing = st.grid["spacing"]
            cam = v.scene.camera
            if st.camera["orientation"]:
                cam.orientation = st.camera["orientation"]
            cam.angles = st.camera["angles"]
            cam.center = st.camera["center"]
            cam.zoom = st.camera["zoom"]
            v.layers.selection.clear()
            v.layers.selection.update({lay for lay in st.selection if lay in v.layers})
            if st.active is not None and st.active in v.layers:
                v.layers.selection.active = st.active
        finally:
            self._busy = False
            self._view_state = None
            self.grid_button.setEnabled(True)
            self.restore_button.setEnabled(False)
        self._refresh_choices()

    # ------------------------------------------------------------------ teardown
    def closeEvent(self, event) -> None:  # noqa: N802
        self.cleanup()
        super().closeEvent(event)

    def cleanup(self) -> None:
        """Stop the worker and disconnect from the viewer (called on close)."""
        self._generation += 1  # late results of a running worker are ignored
        self._recompute_timer.stop()
        self._cursor_timer.stop()
        self._stop_worker()
        for emitter, cb in ((self.viewer.layers.events.inserted, self._on_layers_changed),
                            (self.viewer.layers.events.removed, self._on_layers_changed),
                            (self.viewer.layers.events.moved, self._on_layers_changed),
                            (self.viewer.dims.events.point, self._on_dims),
                            (self.viewer.cursor.events.position, self._on_cursor),
                            (getattr(self.viewer.scene.camera.events, "orientation", None),
                             self._on_camera_orientation)):
            try:
                if emitter is not None:
                    emitter.disconnect(cb)
            except Exception:
                pass
        self._disconnect_layer_data()


_GEOMETRY_KEYS = ("axes", "affine", "voxel_size", "b0_direction", "geometry_known")


def _like(layer, role: str = "difference", **extra) -> dict:
    """Layer kwargs for a volume on the grid of ``layer`` (same transform, geometry metadata)."""
    md = {k: v for k, v in _meta(layer).items() if k in _GEOMETRY_KEYS}
    md.update(role=role, units="ppm", compare_added=True, **extra)
    kw = dict(scale=tuple(layer.scale), translate=tuple(layer.translate), rotate=layer.rotate, metadata=md)
    for k in ("units", "axis_labels"):
        val = getattr(layer, k, None)
        if val is not None:
            kw[k] = tuple(str(u) for u in val)
    return kw


def _describe_result(layer) -> str:
    """Short provenance line for a result layer: method, first parameters, run time."""
    prov = _meta(layer).get("provenance") if layer is not None else None
    if not isinstance(prov, dict):
        return ""
    bits = [str(prov.get("method", "")).upper()]
    sec = prov.get("seconds")
    if isinstance(sec, (int, float)):
        bits.append(f"{sec:.1f} s" if sec < 100 else f"{sec / 60:.1f} min")
    params = prov.get("parameters") or {}
    for k, v in list(params.items())[:2]:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            bits.append(f"{k} {v:g}")
    return " · ".join(b for b in bits if b)


def _nice(v: float) -> float:
    """Round to 2 significant digits (contrast defaults)."""
    if v == 0 or not math.isfinite(v):
        return 0.0
    e = math.floor(math.log10(abs(v))) - 1
    return round(v, -e)


_DIVERGING = None


def _diverging_colormap():
    """napari Colormap of matplotlib's RdBu_r (blue negative, white zero, red positive)."""
    global _DIVERGING
    if _DIVERGING is None:
        import matplotlib
        from napari.utils.colormaps import Colormap

        cols = matplotlib.colormaps["RdBu_r"](np.linspace(0, 1, 256))
        _DIVERGING = Colormap(colors=cols, name="RdBu_r (difference)")
    return _DIVERGING


def _metrics_job(results, reference, mask, field, voxel_size, b0_direction, labels, label_names,
                 reference_name, residual_maps, demean):
    """Generator run in a napari thread worker: offsets, residual maps, metric rows, regions."""
    names = list(results)
    if reference is not None:
        m = mask if mask is not None else None
        offs = {}
        for n, x in results.items():
            d = np.subtract(x[m] if m is not None else x, reference[m] if m is not None else reference,
                            dtype=np.float64)
            offs[n] = float(d.mean()) if d.size else 0.0
            yield ("noop", None)
        yield ("offsets", offs)
    if residual_maps and field is not None:
        m = mask if mask is not None else np.ones(field.shape, bool)
        for n, x in results.items():
            yield ("residual", n, core.field_residual_map(x, field, m, voxel_size, b0_direction))
    rows = []
    for i, row in enumerate(core.iter_compare(results, reference, mask, field, voxel_size, b0_direction)):
        rows.append(row)
        yield ("row", row, i + 1, len(names))
    keys = [k for r in rows for k in r.metrics]
    yield ("table", core.CompareTable(rows=rows, columns=core._columns_for(keys), reference=reference_name))
    if labels is not None:
        yield ("regions", core.region_stats(results, reference, labels, label_names, mask=mask))
