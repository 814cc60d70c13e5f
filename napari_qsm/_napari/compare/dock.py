"""The Compare dock: assembles the picker, the tabs and grid mode, follows the viewer, runs the metrics.

Metrics run in a napari ``thread_worker`` over :func:`napari_qsm.core.compare.compare_steps` (a
generator: one result per step, so a newer request stops an older one between results) and are
recomputed when a chosen layer's data changes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QTabWidget, QVBoxLayout, QWidget

from ..docks import QSMDock, dock_of, toggle_large

from ...core import compare as core
from .clinic import ClinicTools, reference_note
from .geometry import canonical_geometry, label_names_of, meta, point_from_world, world_from_point
from .grid import SideBySide
from .metrics_tab import MetricsTab
from .panel import PanelColumn
from .picker import Picker, Selection
from .regions_tab import RegionsTab
from .slices_tab import SlicesTab
from .volumes import ChosenVolumes


class CompareWidget(QSMDock, QWidget):
    """Compare reconstructions: slices side by side, difference maps, metrics, region statistics."""

    qsm_dock_order = 2
    qsm_dock_title = "Compare"

    #: emitted (on the GUI thread) when a metric computation finished (table present)
    metricsReady = Signal()

    def __init__(self, napari_viewer, parent=None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.grid = SideBySide(napari_viewer)
        self.volumes = ChosenVolumes(napari_viewer, self._warn, self._on_layer_data)
        self._worker = None
        self._generation = 0
        self._offsets: dict = {}
        self._residuals: dict = {}
        self._contrast_set = False
        self._busy = False
        self._partial_rows: list = []
        self._job_reference: Optional[str] = None

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
        for emitter, cb in self._viewer_hooks():
            if emitter is not None:
                emitter.connect(cb)
        self._on_camera_orientation()
        self._selection_changed()

    def _viewer_hooks(self) -> list:
        """(viewer event emitter or None, callback): connected on opening, disconnected on close."""
        ev = self.viewer.layers.events
        return [(ev.inserted, self._on_layers_changed), (ev.removed, self._on_layers_changed),
                (ev.moved, self._on_layers_changed), (self.viewer.dims.events.point, self._on_dims),
                (self.viewer.cursor.events.position, self._on_cursor),
                (getattr(self.viewer.scene.camera.events, "orientation", None), self._on_camera_orientation)]

    def _on_camera_orientation(self, event=None) -> None:
        """Show the patient's right where napari's 2-D view shows it (camera orientation)."""
        orient = tuple(getattr(self.viewer.scene.camera, "orientation2d", ()) or ())
        if len(orient) == 2 and not self.grid.active:
            self.radio_check.setChecked(orient[1] == "left")

    # ------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        self.picker = Picker(self.viewer, self.grid.added_names)
        root.addWidget(self.picker)
        self.button_row = QWidget()
        row = QHBoxLayout(self.button_row)
        row.setContentsMargins(0, 0, 0, 0)
        self.grid_button = QPushButton("Side by side")
        self.grid_button.setToolTip("Show the results and their difference maps in napari's grid, contrast linked.")
        self.restore_button = QPushButton("Restore view")
        self.restore_button.setToolTip("Undo 'Side by side': remove the difference layers, grid off, previous view.")
        self.restore_button.setEnabled(False)
        self.large_button = QPushButton("Large window")
        self.large_button.setCheckable(True)
        self.large_button.setToolTip("Float this dock as a window over most of the screen (slices and table at a "
                                     "size you can read); click again to dock it back.")
        row.addWidget(self.grid_button)
        row.addWidget(self.restore_button)
        row.addStretch(1)
        row.addWidget(self.large_button)
        self.clinic = ClinicTools(self, row)  # Save as DICOM…, Report…
        self.dicom_button, self.report_button = self.clinic.dicom_button, self.clinic.report_button
        root.addWidget(self.button_row)
        self.tabs = QTabWidget()
        root.addWidget(self.tabs, 1)
        self.slices = SlicesTab()
        self.metrics = MetricsTab(self._warn)
        self.regions_tab = RegionsTab()
        for tab, title in ((self.slices, "Slices"), (self.metrics, "Metrics"), (self.regions_tab, "Regions")):
            self.tabs.addTab(tab, title)
        # the widgets scripts and tests reach for, by their names on the dock
        for name in ("reference_combo", "mask_combo", "field_combo", "labels_combo", "results_list"):
            setattr(self, name, getattr(self.picker, name))
        for name in ("chi_min", "chi_max", "diff_lim", "auto_button", "planes_combo", "layout_combo", "zoom_check",
                     "demean_check", "follow_check", "radio_check", "cross_check", "panel", "hover_label", "options"):
            setattr(self, name, getattr(self.slices, name))
        for name in ("status_label", "metric_table", "chart_combo", "chart_fig", "chart_canvas", "copy_button",
                     "export_button", "recompute_button", "copy_table", "export_csv"):
            setattr(self, name, getattr(self.metrics, name))
        for name in ("region_label", "region_table", "fit_table", "region_copy_button", "copy_regions"):
            setattr(self, name, getattr(self.regions_tab, name))

        self.picker.changed.connect(self._selection_changed)
        self.picker.layerRenamed.connect(self._on_layers_changed)
        self.slices.contrastChanged.connect(self._apply_grid_contrast)
        self.auto_button.clicked.connect(self.auto_contrast)
        self.demean_check.toggled.connect(self._demean_changed)
        self.zoom_check.toggled.connect(lambda _on: self._zoom_to_mask())
        self.panel.pointRequested.connect(self.move_viewer_to)
        self.grid_button.clicked.connect(self.side_by_side)
        self.large_button.toggled.connect(self.set_large)
        self.restore_button.clicked.connect(self.restore_view)
        self.recompute_button.clicked.connect(self.recompute)
        self.tabs.currentChanged.connect(self._on_tab)

    def _on_tab(self, index: int) -> None:
        if self.tabs.widget(index) is self.panel.parentWidget() and self.panel._dirty:
            self.panel.refresh()

    # ------------------------------------------------------------------ results of the computation
    @property
    def table(self) -> Optional[core.CompareTable]:
        """The metric table of the current selection (None while computing or without results)."""
        return self.metrics.table

    @property
    def regions(self) -> Optional[core.RegionStats]:
        """Region statistics of the current selection (None without a Labels layer or while computing)."""
        return self.regions_tab.regions

    def best_cells(self) -> dict:
        """{metric key: result name} of the highlighted cells (for tests)."""
        return core.best_per_column(self.table) if self.table else {}

    # ------------------------------------------------------------------ layer choices
    def _refresh_choices(self) -> None:
        self.picker.refresh()

    def set_reference(self, name: Optional[str]) -> None:
        self.picker.set_choice("reference", name)

    def set_mask(self, name: Optional[str]) -> None:
        self.picker.set_choice("mask", name)

    def set_field(self, name: Optional[str]) -> None:
        self.picker.set_choice("field", name)

    def set_labels(self, name: Optional[str]) -> None:
        self.picker.set_choice("labels", name)

    def set_results(self, names) -> None:
        self.picker.set_results(names)

    def selection(self) -> Selection:
        return self.picker.selection()

    def _on_layers_changed(self, event=None) -> None:
        if self._busy:
            return
        self._refresh_choices()
        self._selection_changed()

    # ------------------------------------------------------------------ data of the chosen layers
    def _on_layer_data(self, event=None) -> None:
        self.volumes.clear()
        self._build_panel()
        self._recompute_timer.start()

    def _selection_changed(self, *args) -> None:
        sel = self.selection()
        self.field_combo.setEnabled(True)
        self.volumes.watch([sel.reference, sel.mask, sel.field, sel.labels] + list(sel.results))
        self._build_panel()
        self._recompute_timer.start()

    # ------------------------------------------------------------------ the slices panel
    def _geometry_layer(self, sel: Selection):
        return self.volumes.layer(sel.reference) or (self.volumes.layer(sel.results[0]) if sel.results else None)

    def _build_panel(self) -> None:
        sel = self.selection()
        geo = self._geometry_layer(sel)
        if geo is None:
            self.panel.set_columns([], (1, 1, 1))
            return
        ref = self.volumes.canon(sel.reference) if sel.reference else None
        shape = (ref if ref is not None else self.volumes.canon(sel.results[0])).shape
        vs, _ = canonical_geometry(geo)
        mask = self.volumes.mask(sel.mask, shape)
        demean = self.demean_check.isChecked()
        cols = []
        if ref is not None:
            cols.append(PanelColumn(title=sel.reference, subtitle="reference", volume=ref, diff_note="reference"))
        for name in sel.results:
            try:
                vol = self.volumes.canon(name)
            except ValueError as exc:
                self._warn(str(exc))
                continue
            if vol.shape != shape:
                self._warn(f"{name!r}: shape {vol.shape} differs from {shape}; left out of the comparison")
                continue
            prov = meta(self.volumes.layer(name)).get("provenance")
            sub = " · ".join(b for b in (core.describe_provenance(prov), reference_note(prov)) if b)
            if ref is not None:
                cols.append(PanelColumn(title=name, subtitle=sub, volume=vol, ref=ref, mask=mask,
                                        offset=self._offsets.get(name, 0.0) if demean else 0.0))
            else:
                note = "computing field residual…" if sel.field else "choose a reference or a field"
                cols.append(PanelColumn(title=name, subtitle=sub, volume=vol, diff_volume=self._residuals.get(name),
                                        diff_note=note, mask=mask))
        if ref is not None:
            title = "Δχ = result − reference" + (" (demeaned in the mask)" if demean else "")
            unit = "Δχ (ppm)"
        else:
            title = "field residual D∗χ − field (demeaned in the mask)"
            unit = "residual (ppm)"
        self.panel.set_columns(cols, vs, diff_title=title, diff_unit=unit)
        self._zoom_to_mask(mask, vs)
        if not self._contrast_set and cols:
            self.auto_contrast()
        self._on_dims()

    def _zoom_to_mask(self, mask=None, vs=None, margin_mm: float = 4.0) -> None:
        """Show the mask's bounding box (plus ``margin_mm``) when "Zoom to mask" is on, else everything."""
        box = None
        cols = self.panel.columns
        if self.zoom_check.isChecked() and cols:
            if mask is None:
                mask = self.volumes.mask(self.selection().mask, cols[0].volume.shape)
            if vs is None:
                vs = self.panel._vs
            if mask is not None and mask.any() and not mask.all():
                idx = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
                pad = [int(np.ceil(margin_mm / max(float(v), 1e-6))) for v in vs]
                box = (tuple(int(i[0]) - p for i, p in zip(idx, pad)), tuple(int(i[-1]) + 1 + p for i, p in zip(idx, pad)))
        self.panel.set_box(box)

    def auto_contrast(self) -> None:
        """χ window = 1st–99th percentile (reference or first result) in the mask; Δ = a third of it."""
        cols = self.panel.columns
        if not cols:
            return
        vol = cols[0].volume
        window = core.auto_window(vol, self.volumes.mask(self.selection().mask, vol.shape))
        if window is None:
            return
        self._contrast_set = True
        self.slices.set_window(*window)

    def _demean_changed(self, on: bool) -> None:
        self._build_panel()

    def _show_world_point(self, world) -> None:
        lay = self._geometry_layer(self.selection())
        if lay is not None:
            self.panel.set_point(point_from_world(lay, world))

    def _on_dims(self, event=None) -> None:
        self._show_world_point(self.viewer.dims.point)

    def _on_cursor(self, event=None) -> None:
        if self.follow_check.isChecked():
            self._cursor_timer.start()

    def _follow_cursor(self) -> None:
        pos = self.viewer.cursor.position
        if pos is not None and len(pos) >= 3:
            self._show_world_point(pos)

    def move_viewer_to(self, point) -> None:
        """Move the viewer (``viewer.dims``) to a canonical voxel point of the compared volumes."""
        lay = self._geometry_layer(self.selection())
        if lay is None:
            return
        world = world_from_point(lay, point)
        nd = self.viewer.dims.ndim
        self.viewer.dims.set_point(list(range(nd - 3, nd)), tuple(float(v) for v in world[-3:]))
        self.panel.set_point(point)

    # ------------------------------------------------------------------ metrics (worker)
    def recompute(self) -> None:
        """Start (or restart) the metric computation for the current selection."""
        self._recompute_timer.stop()
        sel = self.selection()
        self._generation += 1
        gen = self._generation
        self._stop_worker()
        self.metrics.table = None
        self.regions_tab.regions = None
        if not sel.results:
            self._set_status("Choose result layers to compare.")
            self.metrics.fill(None)
            self.regions_tab.fill(None)
            return
        if sel.reference is None and sel.field is None:
            self._set_status("No reference: choose a field layer to score the results by their field residual.")
            self.metrics.fill(None)
            return
        try:
            job = self._job_inputs(sel)
        except ValueError as exc:
            self._set_status(str(exc))
            self._warn(str(exc))
            return
        from napari.qt.threading import thread_worker

        worker = thread_worker(core.compare_steps, progress=False)(**job)
        worker.yielded.connect(lambda item, g=gen: self._on_yield(g, item))
        worker.returned.connect(lambda _r, g=gen: self._on_done(g))
        worker.errored.connect(lambda exc, g=gen: self._on_error(g, exc))
        self._worker = worker
        self._partial_rows = []
        self.metrics.computing()
        self._job_reference = sel.reference
        self._set_status(f"Computing metrics for {len(job['results'])} result(s)…")
        worker.start()

    def _job_inputs(self, sel: Selection) -> dict:
        ref = self.volumes.canon(sel.reference) if sel.reference else None
        results = {}
        for n in sel.results:
            v = self.volumes.canon(n)
            shape = ref.shape if ref is not None else next(iter(results.values()), v).shape
            if v.shape != shape:
                continue
            results[n] = v
        if not results:
            raise ValueError("Compare: no result has the reference's shape")
        shape = next(iter(results.values())).shape
        mask = self.volumes.mask(sel.mask, shape)
        field = vs = b0 = None
        if sel.field is not None:
            f = self.volumes.canon(sel.field)
            if f.shape == shape:
                vs, b0 = canonical_geometry(self.volumes.layer(sel.field))
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
            lab = self.volumes.canon(sel.labels)
            if lab.shape == shape:
                labels = lab
                names = label_names_of(self.volumes.layer(sel.labels))
        return dict(results=results, reference=ref, mask=mask, field=field, voxel_size=vs, b0_direction=b0,
                    labels=labels, label_names=names, reference_name=sel.reference,
                    residual_maps=ref is None and field is not None)

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
            self.metrics.fill(core.table_of(self._partial_rows, self._job_reference))
            self._set_status(f"Computing metrics… {item[2]}/{item[3]}")
        elif kind == "table":
            self.metrics.table = item[1]
            self.metrics.fill(item[1])
        elif kind == "regions":
            self.regions_tab.regions = item[1]
            self.regions_tab.fill(item[1])

    def _on_done(self, gen: int) -> None:
        if gen != self._generation:
            return
        self._worker = None
        if self.table is not None:
            ref = self.table.reference
            what = f"against {ref!r}" if ref else "field-consistency residual (no reference)"
            mask = self.selection().mask
            self._set_status(f"{len(self.table)} result(s), {what}; inside "
                             f"{'mask ' + repr(mask) if mask else 'the whole volume'}.")
        if self.selection().labels is None:
            self.regions_tab.fill(None)
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
        self.metrics.set_status(text)

    def _warn(self, msg: str) -> None:
        try:
            from napari.utils.notifications import show_warning

            show_warning(msg)
        except Exception:  # pragma: no cover
            pass

    # ------------------------------------------------------------------ grid view
    @property
    def side_by_side_active(self) -> bool:
        return self.grid.active

    def side_by_side(self) -> None:
        """Grid mode: results in the top row (then the reference), their difference maps below."""
        if self.grid.active:
            return
        sel = self.selection()
        results = [r for r in (self.volumes.layer(n) for n in sel.results) if r is not None]
        if not results:
            self._warn("Compare: choose result layers first")
            return
        self._busy = True
        try:
            self.grid.open(results, self.volumes.layer(sel.reference), lambda shape: self.volumes.mask(sel.mask, shape),
                           self.demean_check.isChecked(), self._offsets, self._residuals,
                           self.slices.chi_window(), self.diff_lim.value())
        except Exception:
            self._busy = False
            self.restore_view()
            raise
        finally:
            self._busy = False
        self.grid_button.setEnabled(False)
        self.restore_button.setEnabled(True)

    def set_large(self, large: bool = True) -> bool:
        """Float the dock as a large window (``large``) or dock it back; returns whether it is large now."""
        now = toggle_large(self, bool(large))
        if self.large_button.isChecked() != now:
            self.large_button.blockSignals(True)
            self.large_button.setChecked(now)
            self.large_button.blockSignals(False)
        self.large_button.setText("Dock back" if now else "Large window")
        self._place_buttons(now)
        d = dock_of(self)
        if d is not None and not getattr(self, "_large_hooked", False):
            self._large_hooked = True
            d.topLevelChanged.connect(self._on_floating)
        return now

    def _place_buttons(self, in_tab_bar: bool) -> None:
        """In the large window the buttons sit right of the tabs (a row more for the slices); docked,
        in their own row (a narrow dock has no room beside the tabs)."""
        if in_tab_bar == (self.tabs.cornerWidget() is self.button_row):
            return
        if in_tab_bar:
            self.layout().removeWidget(self.button_row)
            self.tabs.setCornerWidget(self.button_row, Qt.Corner.TopRightCorner)
        else:
            self.tabs.setCornerWidget(None, Qt.Corner.TopRightCorner)
            self.layout().insertWidget(1, self.button_row)
        self.button_row.show()

    def _on_floating(self, floating: bool) -> None:
        """The user docked / floated the dock by its title bar: keep the button in step."""
        if not floating and self.large_button.isChecked():
            self.large_button.blockSignals(True)
            self.large_button.setChecked(False)
            self.large_button.blockSignals(False)
            self.large_button.setText("Large window")
            self._place_buttons(False)

    def _apply_grid_contrast(self) -> None:
        self.grid.apply_contrast(self.slices.chi_window(), self.diff_lim.value())

    def restore_view(self) -> None:
        """Undo :meth:`side_by_side` exactly (added layers, grid, visibility, contrast, camera)."""
        if not self.grid.active:
            return
        self._busy = True
        try:
            self.grid.restore()
        finally:
            self._busy = False
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
        for emitter, cb in self._viewer_hooks():
            try:
                if emitter is not None:
                    emitter.disconnect(cb)
            except Exception:
                pass
        self.volumes.unwatch()
