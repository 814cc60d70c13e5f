"""The "QSM reconstruction" dock: the shared inputs section, then a method, its parameters and Run.

Thin over the core: the inputs panel turns layers into a :class:`~napari_qsm.core.scan.Scan`
(:mod:`napari_qsm._napari.inputs_panel`), the method drop-down and parameter form come from the
registry and the parameter records (:mod:`napari_qsm._napari.form`), and the run goes through the
dock base (:class:`~napari_qsm._napari.run_dock.RunDock`: worker, progress, cancel).
"""

from __future__ import annotations

import html
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton

from ..core.params import ParamError
from ..methods import available_methods, get_method, reconstruct
from .form import ParamForm, label_for
from .inputs_panel import inputs_section
from .kit import (DIM_COLOR, OK_COLOR, WARN_COLOR, device_combo, pick_weights_file, relabel_form, section,
                  weights_row, wrap_label)
from .layers import extra_volumes, layer_geometry, result_layer_data, robust_limits, show_chi_colorbar, to_layer_order
from .run_dock import PreviewLayer, RunDock, scan_and_params

__all__ = ["QSMWidget", "param_label"]

#: parameter rows of the Reconstruct dock in the words a person writes (the record's name stays the key)
PARAM_LABELS = {
    "threshold": "Threshold δ", "correction": "Schweser correction", "pad_factor": "Padding factor",
    "lambda": "Regularisation λ", "percentage": "Edge share", "smv": "SMV radius (mm)", "merit": "MERIT",
    "csf": "CSF prior (MEDI+0)", "lambda_csf": "CSF λ", "data_weighting": "Data weighting", "edge_mask": "Edge mask",
    "cg_tol": "CG tolerance", "cg_max_iter": "CG iterations", "max_iter": "Gauss–Newton iterations",
    "tol_norm_ratio": "Stop at ‖dχ‖/‖χ‖", "delta_te": "ΔTE (s)", "auto_rule": "Automatic λ rule",
    "discrepancy": "Discrepancy target", "auto_max_solves": "Automatic λ: most solves", "domain": "BN domain",
    "memory_gb": "Memory (GB)", "tile": "Tile (voxels)", "overlap": "Tile overlap (voxels)", "eps": "Tikhonov ε",
    "lr": "Learning rate", "patch": "Patch (voxels)", "seed": "Random seed",
    "consistency": "Data consistency (CG steps)", "consistency_mu": "Data consistency μ",
    "weak_harmonic": "Residual background φ", "beta": "Residual background weight β", "mu_h": "Residual background ADMM μh",
}


def param_label(name: str) -> str:
    """Row label of a method parameter: hand-written when known, else its name in words, capitalised."""
    if name in PARAM_LABELS:
        return PARAM_LABELS[name]
    return label_for(name)


class QSMWidget(RunDock):
    """Dock widget "QSM reconstruction": inputs section and reconstruct section."""

    qsm_dock_order = 0
    qsm_dock_title = "QSM reconstruction"

    result_added = Signal(object)  # the χ layer

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self._form_values: dict = {}
        self._results: dict = {}  # method -> {"chi": layer, extra key: layer}
        self._current_method = None
        self.last_result = None
        self._preview: Optional[PreviewLayer] = None
        body = self.body
        self.inputs = inputs_section(body, napari_viewer, echo_maps=True)

        box, lay = section("Reconstruct")
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.method_combo = QComboBox()
        # methods that combine several scans (COSMOS) need scans at other head orientations, which the
        # inputs above cannot describe: they are not offered here, and a line says where they run
        self._methods = [m for m in available_methods() if not m.multi_scan]
        self.gui_excluded = [m for m in available_methods() if m.multi_scan]
        for m in self._methods:
            self.method_combo.addItem(m.label, m.name)
            self.method_combo.setItemData(self.method_combo.count() - 1, m.doc, Qt.ItemDataRole.ToolTipRole)
        form.addRow("Method", self.method_combo)
        lay.addLayout(form)
        self.method_doc = wrap_label("", DIM_COLOR, small=True)
        lay.addWidget(self.method_doc)
        self.excluded_note = wrap_label(" ".join(
            f"{html.escape(m.label)} is not in this list: it combines scans of the head in several orientations, "
            "which this dock cannot choose yet; run it from a terminal with <code>napari-qsm recon FIELD "
            f"--method {html.escape(m.name)} --orientation FIELD2 …</code> (see --help) or the Python API." for m in self.gui_excluded), DIM_COLOR, small=True)
        self.excluded_note.setObjectName("excluded_methods_note")
        self.excluded_note.setVisible(bool(self.gui_excluded))
        lay.addWidget(self.excluded_note)

        self.form = ParamForm()
        lay.addWidget(self.form)
        reset_row = QHBoxLayout()
        reset_row.addStretch(1)
        self.reset_button = QPushButton("Defaults")
        self.reset_button.setToolTip("Reset the parameters of this method to their defaults")
        reset_row.addWidget(self.reset_button)
        lay.addLayout(reset_row)

        form2 = QFormLayout()
        form2.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        wrow, self.weights_edit, self.weights_browse = weights_row(
            "Network weights (.pt); empty = the checkpoint shipped with napari-qsm", "Choose a weights file (.pt)")
        self.weights_label = QLabel("Weights")
        form2.addRow(self.weights_label, wrow)
        self.device_combo = device_combo()
        form2.addRow("Device", self.device_combo)
        self.output_combo = QComboBox()
        self.output_combo.addItem("Replace this method's last result", "replace")
        self.output_combo.addItem("Add a new layer", "add")
        self.output_combo.setToolTip("Re-running a method updates its previous χ layer, or adds another one")
        form2.addRow("Result", self.output_combo)
        lay.addLayout(form2)

        self.method_problem = wrap_label("")
        lay.addWidget(self.method_problem)
        body.addWidget(box)
        body.addStretch(1)

        self.add_footer()

        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        self.reset_button.clicked.connect(self.form.reset)
        self.weights_browse.clicked.connect(self._browse_weights)
        self.inputs.changed.connect(self._update_method_problem)
        self._on_method_changed()
        self._fit_width()

    # -- method / form ------------------------------------------------------------------------
    def method(self):
        return get_method(self.method_combo.currentData())

    def set_method(self, name: str) -> None:
        i = self.method_combo.findData(name)
        if i < 0:
            raise ValueError(f"method {name!r} is not registered or not offered in this dock")
        self.method_combo.setCurrentIndex(i)

    def _on_method_changed(self, *_):
        if self._current_method is not None:
            self._form_values[self._current_method] = self.form.raw_values()
        m = self.method()
        self._current_method = m.name
        self.form.set_params_cls(m.params_cls, self._form_values.get(m.name))
        relabel_form(self.form, param_label)
        self.method_doc.setText(html.escape(m.doc or ""))
        self.weights_edit.setVisible(m.accepts_weights)
        self.weights_browse.setVisible(m.accepts_weights)
        self.weights_label.setVisible(m.accepts_weights)
        self._update_method_problem()
        if hasattr(self, "run_button"):
            self._fit_width()

    def _update_method_problem(self, *_):
        m = self.method()
        msgs = []
        if m.multi_scan:
            msgs.append(f"{m.label} combines several head orientations; run it from the command line "
                        "(napari-qsm recon --orientation …) or the Python API")
        if m.needs_magnitude and self.inputs.mag_combo.layer() is None:
            msgs.append(f"{m.label} needs a magnitude image: choose one in Inputs")
        self.method_problem.setText("<br>".join(f"<span style='color:{WARN_COLOR}'>⚠ {html.escape(t)}</span>"
                                                for t in msgs))
        if not self.runner.running:
            self.run_button.setEnabled(not m.multi_scan)

    def _browse_weights(self):
        pick_weights_file(self, "Network weights", self.weights_edit)

    def set_weights(self, path) -> None:
        """Use these weights for network methods (e.g. adapted weights from the Adapt dock)."""
        self.weights_edit.setText(str(path) if path else "")

    # -- run --------------------------------------------------------------------------------
    def run(self) -> bool:
        """Validate, then start the reconstruction in a worker. Returns False when it could not start."""
        if self.runner.running:
            return False
        m = self.method()
        if m.multi_scan:
            self._fail(f"{m.label} needs several orientations; use the command line or the Python API")
            return False
        got = scan_and_params(self, m.params_cls, errors=(ParamError, ValueError, TypeError))
        if got is None:
            return False
        scan, params = got
        if m.needs_magnitude and scan.magnitude is None:
            self._fail(f"magnitude: {m.label} needs a magnitude image; choose one in Inputs")
            return False
        extra = {}
        if m.accepts_weights and self.weights_edit.text().strip():
            extra["weights"] = self.weights_edit.text().strip()
        device = self.device_combo.currentData()
        field_layer = self.inputs.field_combo.layer()
        inputs = self.inputs.input_names()
        runner = self.runner

        def job(progress):
            return reconstruct(scan, m.name, params, device=device, progress=progress, cancel=runner.token, **extra)

        self._preview = PreviewLayer(self.viewer, f"{m.name} (preview)") if m.long_running else None
        self.start(job, f"{m.label} reconstruction", f"{m.label} running on {self.device_combo.currentText()}…",
                   on_progress=lambda p: self._on_progress(p, field_layer),
                   on_result=lambda res: self._on_result(res, field_layer, scan, inputs))
        return True

    def running_widgets(self) -> list:
        return [self.inputs, self.method_combo, self.form, self.reset_button, self.device_combo, self.output_combo,
                self.weights_edit, self.weights_browse]

    def _on_progress(self, p, field_layer=None) -> None:
        super()._on_progress(p)
        if self._preview is not None:
            self._preview.show_progress(p, field_layer)

    def _on_result(self, result, field_layer, scan, inputs) -> None:
        data, kw = result_layer_data(result, field_layer, scan=scan, inputs=inputs)
        mode = self.output_combo.currentData()
        previous = self._results.get(result.method, {})
        chi_layer = previous.get("chi")
        if mode == "replace" and chi_layer is not None and chi_layer in self.viewer.layers \
                and chi_layer.data.shape == data.shape:
            chi_layer.data = data
            chi_layer.metadata = kw["metadata"]
            chi_layer.name = kw["name"]
            for k in ("scale", "translate"):
                setattr(chi_layer, k, kw[k])
        else:
            previous = {}
            chi_layer = self.viewer.add_image(data, **kw)
        layers = {"chi": chi_layer}
        for key, arr in extra_volumes(result, scan.shape).items():
            ekw = dict(kw)
            ekw["name"] = f"{kw['name']} {key}"
            ekw["metadata"] = dict(kw["metadata"], role=f"extra:{key}")
            edata = to_layer_order(arr.astype(np.float32), layer_geometry(field_layer).axes)
            ekw["contrast_limits"] = robust_limits(edata)
            old = previous.get(key)
            if old is not None and old in self.viewer.layers and old.data.shape == edata.shape:
                old.data = edata
                old.metadata = ekw["metadata"]
                layers[key] = old
            else:
                layers[key] = self.viewer.add_image(edata, visible=False, **ekw)
        self._results[result.method] = layers
        self.viewer.layers.selection.active = chi_layer
        show_chi_colorbar(self.viewer, chi_layer)
        self.last_result = result
        self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> {html.escape(get_method(result.method).label)} "
                            f"done in {result.seconds:.1f} s on {html.escape(result.device)} → "
                            f"layer <b>{html.escape(chi_layer.name)}</b> (χ, ppm; window ±0.15)")
        self.result_added.emit(chi_layer)

    def _on_finished(self) -> None:
        if self._preview is not None:
            self._preview.remove()
            self._preview = None
        super()._on_finished()
        self._update_method_problem()

