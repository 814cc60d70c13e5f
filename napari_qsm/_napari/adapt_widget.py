"""Dock widget "Adapt network": QSMInvNet+ adapted to the open scan (napari_qsm.nn.adapt).

Inputs as in the reconstruction dock; the adaptation parameters (steps, λ schedule, learning rate,
…) are the form generated from :class:`napari_qsm.nn.adapt.AdaptParams`; a live matplotlib plot of
L_S, L_T and λ; a χ preview layer updated during the run; the adapted χ added as a layer at the end.
"Save adapted weights…" writes the checkpoint and its JSON card (atomically, where the user
chooses); "Use adapted weights" hands that checkpoint to the reconstruction dock (method DSBN).
Cancel keeps the state after the last completed step, which can still be saved.
"""

from __future__ import annotations

import html
import math
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QAbstractItemView, QFileDialog, QFormLayout, QHBoxLayout, QListWidget, QListWidgetItem,
                            QPushButton, QVBoxLayout, QWidget)

from ..methods import Result, get_method
from ..core.method import apply_reference
from ..core.params import display_name, params_to_dict
from .form import ParamForm
from .reconstruct_dock import param_label
from .inputs_panel import inputs_section
from .kit import (DIM_COLOR, OK_COLOR, WARN_COLOR, device_combo, hook_events, notify_info, pick_weights_file,
                  relabel_form, section, unwrap, viewer_docks, weights_row, wrap_label)
from .layer_roles import is_volume, layer_role
from .layers import result_layer_data, scan_from_layers, show_chi_colorbar
from .run_dock import PreviewLayer, RunDock, scan_and_params

LOSS_KEYS = ("L_S", "L_T", "TV", "lambda")
ABOUT = ("Adaptation fine-tunes the network on the scan that is open: it keeps what it learned from "
         "synthetic heads and adjusts itself until its χ map explains this scan's field. More steps fit "
         "the scan more closely and take longer; Cancel keeps what is done so far.")
ABOUT_DETAIL = ("<qt>Each step: a synthetic batch on batch-norm domain 0 (L_S) and patches of this scan on "
                "domain 1 (λ·L_T field consistency + tv·R, MEDI's magnitude-edge prior); λ rises linearly. "
                "QSMInvNet+ (mode dsbn) keeps one batch norm per domain; finetune is the QSMInvNet baseline; uqsm "
                "trains the same U-Net from scratch on the scan alone (uQSM: field term + TV, no labels). "
                "Several scans of one protocol (the list below): one adaptation, one checkpoint for all.</qt>")
PREVIEW_EVERY = 10  # widget default for the χ preview (the API default is off)


#: seconds per adaptation step measured on this machine, by device (shared by the docks of a session)
SECONDS_PER_STEP: dict = {}


def _duration(seconds: float) -> str:
    """'0.8 s', '42 s', '3.5 min', '1.2 h'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class LossPlot(QWidget):
    """L_S, L_T and the edge prior R (log scale, left axis) and λ (right axis) against the adaptation step."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        # margins in pixels (see _margins), not constrained layout: that let the right (λ) axis label clip
        self.fig = Figure(figsize=(3.6, 2.4), dpi=100, facecolor="#262930")
        self.canvas = FigureCanvasQTAgg(self.fig)
        self.canvas.setMinimumHeight(170)
        self.canvas.setMaximumHeight(240)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        self.rows: dict[int, dict] = {}
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(400)
        self._timer.timeout.connect(self._flush)
        self._timer.start()
        self._draw()

    def clear(self) -> None:
        self.rows = {}
        self._draw()

    def add(self, step: int, losses: dict) -> None:
        if not losses or "L_T" not in losses:
            return
        self.rows[int(step)] = {k: float(losses.get(k, math.nan)) for k in LOSS_KEYS}
        self._dirty = True

    def set_history(self, history) -> None:
        self.rows = {}
        for row in history or []:
            if "step" in row:
                self.rows[int(row["step"])] = {k: float(row.get(k, math.nan)) for k in LOSS_KEYS}
        self._draw()

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        steps = np.array(sorted(self.rows), dtype=float)
        vals = np.array([self.rows[int(s)][key] for s in steps], dtype=float)
        return steps, vals

    def _margins(self) -> None:
        """Fixed pixel room for the tick labels and axis titles on both sides, whatever the canvas size."""
        w, h = self.fig.get_size_inches() * self.fig.dpi
        w, h = max(w, 120.0), max(h, 80.0)
        self.fig.subplots_adjust(left=min(0.4, 52 / w), right=max(0.6, 1 - 52 / w),
                                 bottom=min(0.4, 34 / h), top=max(0.6, 1 - 30 / h))

    def resizeEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().resizeEvent(event)
        self._dirty = True

    def _flush(self) -> None:
        if self._dirty:
            self._dirty = False
            self._draw()

    def _draw(self) -> None:
        fg, grid = "#d6d6d6", "#4a4d55"
        self.fig.clear()
        ax = self.fig.add_subplot(111)
        ax.set_facecolor("#262930")
        ax2 = ax.twinx()
        plotted = False
        for key, color, label in (("L_S", "#f0a04b", "L_S (synthetic)"), ("L_T", "#5ec8e5", "L_T (this scan)"),
                                  ("TV", "#9fd17a", "R (edge prior)")):
            x, y = self.series(key)
            ok = np.isfinite(y) & (y > 0)
            if ok.any():
                ax.plot(x[ok], y[ok], color=color, lw=1.6, marker="o" if ok.sum() < 20 else None, ms=3, label=label)
                plotted = True
        x, lam = self.series("lambda")
        if np.isfinite(lam).any():
            ax2.plot(x, lam, color="#b0b0b0", lw=1.2, ls="--", label="λ")
        if plotted:
            ax.set_yscale("log")
        ax.set_xlabel("step", color=fg, fontsize=8)
        ax.set_ylabel("loss", color=fg, fontsize=8)
        ax2.set_ylabel("λ", color=fg, fontsize=8)
        for a in (ax, ax2):
            a.tick_params(colors=fg, labelsize=7)
            for sp in a.spines.values():
                sp.set_color(grid)
        ax.grid(True, color=grid, lw=0.5, alpha=0.6)
        self._margins()
        if not self.rows:
            ax.text(0.5, 0.5, "losses appear here during a run", transform=ax.transAxes, ha="center",
                    va="center", color=DIM_COLOR, fontsize=8)
            ax.set_yticks([])
            ax2.set_yticks([])
        else:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            leg = ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                            ncol=3, frameon=False, borderaxespad=0.2)
            for t in leg.get_texts():
                t.set_color(fg)
        self.canvas.draw_idle()


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.lower(), b.lower()):
        if x != y:
            break
        n += 1
    return n


def _partner(field_layer, layers, role: str):
    """The open layer of ``role`` on the field's grid (same shape) whose name shares the longest start with it."""
    cands = [ly for ly in layers if unwrap(ly) is not unwrap(field_layer) and is_volume(ly) and layer_role(ly) == role
             and tuple(ly.data.shape) == tuple(field_layer.data.shape)]
    return max(cands, key=lambda ly: _common_prefix(ly.name, field_layer.name), default=None)


class ProtocolScans(QWidget):
    """More open scans of the same protocol for one adaptation: a multi-select of the other field layers, each
    paired with the mask (and magnitude) layer on its grid whose name shares the longest start with it."""

    def __init__(self, viewer, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self._exclude = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(wrap_label("More scans of this protocol (optional): one adaptation for all of them, one "
                                  "checkpoint that reconstructs every scan of the protocol. Each is paired with the "
                                  "mask layer of its grid whose name matches best.", DIM_COLOR, small=True))
        self.list = QListWidget()
        self.list.setObjectName("adapt_protocol_scans")
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.MultiSelection)
        self.list.setMaximumHeight(90)
        lay.addWidget(self.list)
        self.empty = wrap_label("No other field layer is open.", DIM_COLOR, small=True)
        self.empty.setObjectName("adapt_protocol_empty")
        lay.addWidget(self.empty)
        ev = viewer.layers.events
        hook_events(self, [(ev.inserted, self.refresh), (ev.removed, self.refresh)])
        self.refresh()

    def refresh(self, *_, exclude=None) -> None:
        if exclude is not None:
            self._exclude = exclude
        chosen = {it.text() for it in self.list.selectedItems()}
        self.list.clear()
        for ly in self.viewer.layers:
            if is_volume(ly) and layer_role(ly) == "field" and unwrap(ly) is not unwrap(self._exclude):
                it = QListWidgetItem(ly.name)
                self.list.addItem(it)
                it.setSelected(ly.name in chosen)
        self.empty.setVisible(self.list.count() == 0)   # a line in words, not an empty box
        self.list.setVisible(self.list.count() > 0)

    def select(self, names) -> None:
        for k in range(self.list.count()):
            it = self.list.item(k)
            it.setSelected(it.text() in set(names))

    def selected_layers(self) -> list:
        names = [it.text() for it in self.list.selectedItems()]
        return [self.viewer.layers[n] for n in names if n in self.viewer.layers]

    def scans(self, main_field, units: str, te, b0_tesla) -> list:
        """Scans of the selected layers (each its own geometry from its layer); ScanError/ValueError naming the layer."""
        from ..core.scan import ScanError

        out = []
        for fl in self.selected_layers():
            if unwrap(fl) is unwrap(main_field):
                continue
            mask = _partner(fl, self.viewer.layers, "mask")
            if mask is None:
                raise ScanError(f"protocol scan '{fl.name}': no mask layer of its shape {tuple(fl.data.shape)} is open")
            mag = _partner(fl, self.viewer.layers, "magnitude")
            try:
                out.append(scan_from_layers(fl, mask, mag, units=units, te=te, b0_tesla=b0_tesla))
            except (ScanError, ValueError) as exc:
                raise ScanError(f"protocol scan '{fl.name}': {exc}") from None
            out[-1].name = fl.name
        return out


class AdaptWidget(RunDock):
    """Dock widget: adapt QSMInvNet+ to the open scan; loss plot, preview, save/use adapted weights.

    ``_fail`` and ``_on_error`` are :class:`~napari_qsm._napari.run_dock.RunDock`'s; ``cancel`` and
    ``_on_cancelled`` are its own (Cancel keeps the state after the last completed step).
    """

    qsm_dock_order = 1
    min_width = 340
    qsm_dock_title = "Adapt network"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        from ..nn.adapt import AdaptParams  # registers the adapt method too

        self.adapted = None          # AdaptResult of the last run (complete or cancelled)
        self.saved_path: Optional[Path] = None
        self._scan = None
        self._base_weights: Optional[str] = None
        self._preview: Optional[PreviewLayer] = None
        self.chi_layer = None

        body = self.body
        self.inputs = inputs_section(body, napari_viewer)

        box, lay = section("Adaptation (QSMInvNet+)")
        self.about = wrap_label(ABOUT, small=True)
        self.about.setObjectName("adapt_about")
        self.about.setToolTip(ABOUT_DETAIL)
        lay.addWidget(self.about)
        self.estimate = wrap_label("", DIM_COLOR, small=True)
        self.estimate.setObjectName("adapt_estimate")
        lay.addWidget(self.estimate)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        wrow, self.weights_edit, self.weights_browse = weights_row(
            "Base QSMInvNet+ checkpoint (.pt); empty = the one shipped with napari-qsm")
        form.addRow("Base weights", wrow)
        lay.addLayout(form)
        form2 = QFormLayout()
        self.device_combo = device_combo()
        form2.addRow("Device", self.device_combo)
        lay.addLayout(form2)
        # the few settings a user changes first, the research knobs folded under "Advanced"
        self.form = ParamForm(AdaptParams)
        relabel_form(self.form, param_label)   # the Reconstruct dock's words ("Data consistency (CG steps)", ...)
        if "preview_every" in self.form.names():
            self.form.set_values({"preview_every": PREVIEW_EVERY})
        lay.addWidget(self.form)
        self.protocol = ProtocolScans(napari_viewer)
        lay.addWidget(self.protocol)
        self.inputs.field_combo.currentIndexChanged.connect(
            lambda *_: self.protocol.refresh(exclude=self.inputs.field_combo.layer()))
        self.protocol.refresh(exclude=self.inputs.field_combo.layer())
        body.addWidget(box)
        # the adaptation settings first, the (auto-picked, shared) inputs under them: in a short window the
        # settings stay in sight next to the loss plot and Run
        inputs_box = self.inputs.parentWidget()
        body.removeWidget(inputs_box)
        body.insertWidget(body.indexOf(box) + 1, inputs_box)
        self.form.changed.connect(self._update_estimate)
        self.device_combo.currentIndexChanged.connect(self._update_estimate)
        self._timing: Optional[tuple] = None  # (step, elapsed s) of the first step report of a run
        self._update_estimate()

        body.addStretch(1)

        # footer, always visible: the loss plot, Run / Cancel, weights buttons, status
        self.plot = LossPlot()
        row = QHBoxLayout()
        self.save_button = QPushButton("Save adapted weights…")
        self.save_button.setToolTip("Write the adapted checkpoint (.pt) and its JSON card where you choose")
        self.use_button = QPushButton("Use adapted weights")
        self.use_button.setToolTip("Reconstruct with the adapted network (method DSBN in the reconstruction dock)")
        self.save_button.setEnabled(False)
        self.use_button.setEnabled(False)
        row.addWidget(self.save_button)
        row.addWidget(self.use_button)
        self.add_footer(top=self.plot, extra=row)

        self.save_button.clicked.connect(lambda: self.save_weights())
        self.use_button.clicked.connect(lambda: self.use_weights())
        self.weights_browse.clicked.connect(self._browse)
        self._fit_width()

    def _browse(self):
        pick_weights_file(self, "Base weights", self.weights_edit)

    # -- run ------------------------------------------------------------------------------------
    def run(self) -> bool:
        from ..nn.adapt import AdaptParams, adapt

        if self.runner.running:
            return False
        got = scan_and_params(self, AdaptParams)
        if got is None:
            return False
        scan, params = got
        weights = self.weights_edit.text().strip() or None
        device = self.device_combo.currentData()
        field_layer = self.inputs.field_combo.layer()
        inputs = self.inputs.input_names()
        try:   # protocol: the other selected scans, each with its own geometry
            more = self.protocol.scans(field_layer, self.inputs.units(), self.inputs.te_seconds(),
                                       self.inputs.b0_tesla())
        except ValueError as exc:
            self._fail(str(exc))
            return False
        scans = [scan] + more
        self._more_layers = [ly for ly in self.protocol.selected_layers() if ly is not field_layer]
        runner = self.runner
        self._scan = scans if more else scan
        self._base_weights = weights
        self.adapted = None
        self.saved_path = None
        self.plot.clear()
        self._timing = None

        def job(progress):
            return adapt(scans if more else scan, params, weights=weights, device=device, progress=progress,
                         cancel=runner.token, on_cancel="return")

        self._preview = PreviewLayer(self.viewer, "adapt (preview)", min_interval=0.0)
        self.start(job, "QSMInvNet+ adaptation", f"adapting{f' to {len(scans)} scans' if more else ''} on "
                   f"{html.escape(self.device_combo.currentText())}…", total=params.steps,
                   on_progress=lambda p: self._on_progress(p, field_layer),
                   on_result=lambda res: self._on_result(res, field_layer, scans if more else scan, inputs, params))
        return True

    def cancel(self) -> None:
        """Stop after the current step; the state after the last completed step is kept (and can be saved).

        Unlike :meth:`RunDock.cancel` the worker is not quit: only the token is set, and the job returns
        its partial result (``on_cancel="return"``), which :meth:`_on_result` keeps.
        """
        if self.runner.running and self.runner.token is not None:
            self.status.setText("cancelling (finishing the current step)…")
            self.runner.token.cancel()

    def _on_cancelled(self) -> None:
        """The job ended without a partial result (cancelled while it was still setting up)."""
        self.status.setText(f"<span style='color:{WARN_COLOR}'>cancelled</span>")

    def running_widgets(self) -> list:
        return [self.inputs, self.form, self.protocol, self.device_combo, self.weights_edit, self.weights_browse]

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if running:
            self.save_button.setEnabled(False)
            self.use_button.setEnabled(False)

    # -- time estimate ----------------------------------------------------------------------------
    def _device_key(self) -> str:
        return str(self.device_combo.currentData())

    def _steps(self) -> Optional[int]:
        try:
            return int(self.form.values().get("steps"))
        except Exception:
            return None

    def _update_estimate(self, *_) -> None:
        """Say how long the chosen number of steps takes here (per-step time measured on a run's first steps)."""
        per = SECONDS_PER_STEP.get(self._device_key())
        steps = self._steps()
        if per is None or steps is None:
            self.estimate.setText("How long it takes is measured on the first steps of a run and shown here "
                                  "(a network step takes about a second or more on a CPU, well under on a GPU).")
            return
        self.estimate.setText(f"Measured here: {_duration(per)} per step on {html.escape(self.device_combo.currentText())}"
                              f", so {steps} steps take about {_duration(per * steps)} "
                              "(plus a few seconds to start).")

    def _measure(self, p) -> None:
        step, elapsed = int(getattr(p, "step", 0) or 0), float(getattr(p, "elapsed", 0.0) or 0.0)
        if step < 1:
            return
        if self._timing is None:
            self._timing = (step, elapsed)  # the first step also carries the start-up (data, model)
            return
        s0, t0 = self._timing
        if step - s0 >= 2 and elapsed > t0:
            per = (elapsed - t0) / (step - s0)
            SECONDS_PER_STEP[self._device_key()] = per
            total = p.total or self._steps() or step
            left = max(0, total - step) * per
            self.estimate.setText(f"Measured on the first steps: {_duration(per)} per step here; "
                                  f"{total} steps take about {_duration(per * total)}, "
                                  f"about {_duration(left)} left.")

    def _on_progress(self, p, field_layer=None) -> None:
        for rec in getattr(p, "history", None) or [p]:
            self.plot.add(rec.step, rec.losses)
        self._measure(p)
        super()._on_progress(p)
        if self._preview is not None:
            self._preview.show_progress(p, field_layer)

    def _on_result(self, res, field_layer, scan, inputs, params) -> None:
        self.adapted = res
        self.plot.set_history(res.history)
        if res.cancelled or res.chi is None:
            self.status.setText(f"<span style='color:{WARN_COLOR}'>cancelled after step {res.step}</span>; "
                                "the adapted state so far can be saved")
            return
        pd = params_to_dict(res.params)
        scans = scan if isinstance(scan, list) else [scan]
        fls = [field_layer] + list(getattr(self, "_more_layers", []) or [])[: len(scans) - 1]
        for k, (sc, fl, chi) in enumerate(zip(scans, fls, res.chis or [res.chi])):
            mname = "uqsm" if res.mode == "uqsm" else "dsbn_adapt"
            # the same χ reference as every other method (core.method.apply_reference; default: mask mean)
            chi, ref_info = apply_reference(chi, sc.mask, pd.get("reference", "mean"), scan=sc)
            pd = {**pd, "reference": ref_info["reference"]}
            result = Result(chi=chi, method=mname, params=pd, seconds=res.seconds, device=res.device,
                            extras={**ref_info, "steps_done": res.step, "base_weights": res.base_weights,
                                    "final_losses": res.history[-1] if res.history else {},
                                    **({"protocol_scans": len(scans)} if len(scans) > 1 else {})},
                            scan_info=sc.info())
            result.title = (f"uQSM ({res.step} steps)" if mname == "uqsm" else
                            display_name(get_method(mname).short, replace(res.params, steps=res.step)))
            data, kw = result_layer_data(result, fl, scan=sc, inputs=inputs if k == 0 else {"field": fl.name})
            layer = self.viewer.add_image(data, **kw)
            if k == 0:
                self.chi_layer = layer
        self.viewer.layers.selection.active = self.chi_layer
        show_chi_colorbar(self.viewer, self.chi_layer)
        last = res.history[-1] if res.history else {}
        try:
            lt = f"final L_T {float(last.get('L_T')):.3g}, "
        except (TypeError, ValueError):
            lt = ""
        kw = {"name": self.chi_layer.name}
        self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> adapted {res.step} steps"
                            f"{f' to {len(scans)} scans' if len(scans) > 1 else ''} in {res.seconds:.0f} s "
                            f"on {html.escape(str(res.device))} ({lt}base {html.escape(Path(str(res.base_weights)).name)})"
                            f" → layer <b>{html.escape(kw['name'])}</b>")

    def _on_finished(self) -> None:
        self._update_estimate()
        if self._preview is not None:
            self._preview.remove()
            self._preview = None
        super()._on_finished()
        ok = self.adapted is not None
        self.save_button.setEnabled(ok)
        self.use_button.setEnabled(ok)

    # -- weights ----------------------------------------------------------------------------------
    def save_weights(self, path=None) -> Optional[Path]:
        """Write the adapted checkpoint (+ JSON card); asks for a path when none is given."""
        from ..nn.adapt import save_adapted

        if self.adapted is None:
            self._fail("no adapted network yet: run the adaptation first")
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save adapted weights", "qsminvnet_plus_adapted.pt",
                                                  "PyTorch weights (*.pt)")
            if not path:
                return None
        try:
            out = save_adapted(self.adapted, path, base_weights_path=self._base_weights, scan=self._scan)
        except (ValueError, OSError) as exc:
            self._fail(str(exc))
            return None
        self.saved_path = Path(out)
        self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> saved {html.escape(str(out))} "
                            "(+ JSON card)")
        notify_info(f"napari-qsm: adapted weights saved to {out}")
        return self.saved_path

    def use_weights(self, path=None):
        """Point the reconstruction dock at the adapted weights (saving them first if needed)."""
        from .reconstruct_dock import QSMWidget

        if self.saved_path is None or path is not None:
            if self.save_weights(path) is None:
                return None
        docks = viewer_docks(self.viewer, QSMWidget)
        if not docks:
            try:
                _, widget = self.viewer.window.add_plugin_dock_widget("napari-qsm", "QSM reconstruction")
                docks = [widget]
            except Exception:
                widget = QSMWidget(self.viewer)
                self.viewer.window.add_dock_widget(widget, name="QSM reconstruction")
                docks = [widget]
        target = docks[0]
        target.set_method("dsbn")
        target.set_weights(self.saved_path)
        self.status.setText(f"reconstruction dock set to DSBN with {html.escape(self.saved_path.name)}")
        return target

