"""Dock widgets: QSM inputs + Reconstruct (one dock, two sections).

Thin over the core: the inputs panel turns layers into a :class:`~napari_qsm.core.scan.Scan`
(:mod:`napari_qsm._napari.layers`), the method drop-down and parameter form come from the
registry and the parameter records (:mod:`napari_qsm._napari.form`), and the run goes through
:class:`~napari_qsm._napari.workers.JobRunner` (napari generator worker, progress bar, cancel).
"""

from __future__ import annotations

import html
import re
import warnings
from typing import Optional

import numpy as np
from qtpy.QtCore import QSize, Qt, QTimer, Signal
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame,
                            QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QScrollArea,
                            QSizePolicy, QToolButton, QVBoxLayout, QWidget)

from ..core.device import available_devices
from ..methods import available_methods, get_method, reconstruct
from ..core.params import ParamError, make_params
from ..core.scan import ScanError
from .docks import QSMDock
from .form import ParamForm, label_for
from .layers import (acquisition_from_metadata, b0_angle_deg, extra_volumes, layer_geometry, result_layer_data,
                     scan_from_layers, show_chi_colorbar)
from .reader import NOT_LOCAL_FIELD, guess_role
from .workers import JobRunner

NONE_TEXT = "(none)"
UNITS = [("ppm", "ppm (of B0)"), ("hz", "Hz"), ("rad", "rad (phase over TE)")]
ORIENTATIONS = [
    ("neurological", "Neurological (A up, R right)", ("up", "right")),
    ("radiological", "Radiological (A up, R left)", ("up", "left")),
    ("napari", "napari default (A down)", ("down", "right")),
]
OK_COLOR, WARN_COLOR, ERR_COLOR, DIM_COLOR = "#5cb85c", "#f0ad4e", "#e8635f", "#9a9a9a"
DEFAULT_TE_MS, DEFAULT_B0_T = 20.0, 3.0  # shown (and flagged as assumed) when the file does not tell


def _notify_error(msg: str) -> None:
    from napari.utils.notifications import show_error
    show_error(msg)


def _notify_info(msg: str) -> None:
    from napari.utils.notifications import show_info
    show_info(msg)


def _section(title: str) -> tuple[QGroupBox, QVBoxLayout]:
    box = QGroupBox(title)
    lay = QVBoxLayout(box)
    lay.setContentsMargins(8, 6, 8, 8)
    lay.setSpacing(6)
    return box, lay



def _scrolling_body(widget: QWidget) -> tuple:
    """Give a dock a vertically scrolling body: returns (outer layout, scroll area, body layout)."""
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = VScrollArea()
    outer.addWidget(scroll)
    inner = QWidget()
    scroll.setWidget(inner)
    body = QVBoxLayout(inner)
    body.setContentsMargins(6, 6, 6, 6)
    return outer, scroll, body


def _inputs_section(body: QVBoxLayout, viewer, echo_maps: bool = False) -> "InputsPanel":
    """Add the shared "Inputs" section (field, mask, magnitude, units, B0) to a dock body.

    ``echo_maps``: also offer the echo fit's noise N_std and R2* maps (see :class:`InputsPanel`).
    """
    box, lay = _section("Inputs")
    panel = InputsPanel(viewer, echo_maps=echo_maps)
    lay.addWidget(panel)
    body.addWidget(box)
    return panel

def _wrap_label(text: str = "", color: Optional[str] = None, small: bool = False) -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextFormat(Qt.TextFormat.RichText)
    lab.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
    style = []
    if color:
        style.append(f"color: {color};")
    if small:
        style.append("font-size: 11px;")
    if style:
        lab.setStyleSheet(" ".join(style))
    return lab


def _weights_row(tooltip: str, browse_tooltip: Optional[str] = None) -> tuple[QHBoxLayout, QLineEdit, QPushButton]:
    """A network-weights path field (empty = the built-in checkpoint) and its "…" browse button, in a row."""
    row = QHBoxLayout()
    edit = QLineEdit()
    edit.setPlaceholderText("built-in checkpoint")
    edit.setToolTip(tooltip)
    browse = QPushButton("…")
    browse.setMaximumWidth(30)
    if browse_tooltip:
        browse.setToolTip(browse_tooltip)
    row.addWidget(edit)
    row.addWidget(browse)
    return row, edit, browse


def _pick_weights_file(parent: QWidget, title: str, edit: QLineEdit) -> None:
    """Ask for a weights file (.pt / .pth) and put its path into ``edit`` (unchanged when cancelled)."""
    path, _ = QFileDialog.getOpenFileName(parent, title, "", "PyTorch weights (*.pt *.pth)")
    if path:
        edit.setText(path)


def _device_combo() -> QComboBox:
    """Drop-down of the devices present on this machine (item data: the device value)."""
    combo = QComboBox()
    for value, label in available_devices():
        combo.addItem(label, value)
    return combo


def _run_footer(outer: QVBoxLayout, top: Optional[QWidget] = None,
                extra: Optional[QHBoxLayout] = None) -> tuple[QPushButton, QPushButton, QLabel]:
    """A dock's footer, always visible under its scrolling body: [top], Run / Cancel, [extra row], status.

    Returns (Run button, Cancel button (disabled until a run starts), status label).
    """
    footer = QFrame()
    footer.setFrameShape(QFrame.Shape.NoFrame)
    flay = QVBoxLayout(footer)
    flay.setContentsMargins(8, 4, 8, 6)
    if top is not None:
        flay.addWidget(top)
    buttons = QHBoxLayout()
    run_button = QPushButton("Run")
    cancel_button = QPushButton("Cancel")
    cancel_button.setEnabled(False)
    buttons.addWidget(run_button)
    buttons.addWidget(cancel_button)
    flay.addLayout(buttons)
    if extra is not None:
        flay.addLayout(extra)
    status = _wrap_label("", small=True)
    status.setMinimumHeight(30)
    flay.addWidget(status)
    outer.addWidget(footer)
    return run_button, cancel_button, status


def _show_failure(status: QLabel, msg: str) -> None:
    """A run could not start or failed: red line in the dock's status label, and a napari error notification."""
    status.setText(f"<span style='color:{ERR_COLOR}'>✗ {html.escape(msg)}</span>")
    _notify_error(f"napari-qsm: {msg}")


class RunnerDock:
    """Worker plumbing shared by the docks that run one job at a time (Reconstruct, Field, Adapt).

    Needs ``self.runner`` (:class:`~napari_qsm._napari.workers.JobRunner`) and ``self.status`` (QLabel).
    """

    def _fail(self, msg: str) -> None:
        _show_failure(self.status, msg)

    def cancel(self) -> None:
        if self.runner.running:
            self.status.setText("cancelling…")
            self.runner.cancel()

    def _on_error(self, exc) -> None:
        msg = str(exc) if isinstance(exc, ValueError) and str(exc) else f"{type(exc).__name__}: {exc}"
        self._fail(msg)

    def _on_cancelled(self) -> None:
        self.status.setText(f"<span style='color:{WARN_COLOR}'>cancelled</span>; nothing was added")


def _scan_and_params(dock, params_cls, errors: tuple = (ParamError, ValueError)) -> Optional[tuple]:
    """(Scan from ``dock.inputs``, parameter record from ``dock.form``), or None after ``dock._fail(why)``."""
    scan = dock.inputs.validate()
    if scan is None:
        dock._fail(dock.inputs.last_error or "invalid inputs")
        return None
    try:
        params = make_params(params_cls, dock.form.values())
    except errors as exc:
        dock._fail(str(exc))
        return None
    return scan, params


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
}


def param_label(name: str) -> str:
    """Row label of a method parameter: hand-written when known, else its name in words, capitalised."""
    if name in PARAM_LABELS:
        return PARAM_LABELS[name]
    return label_for(name)


def _relabel_form(form: ParamForm) -> None:
    """Put :func:`param_label` on the rows of a generated parameter form (the tooltips stay the records' docs)."""
    for name in form.names():
        w = form.widget_for(name)
        for lay in form.findChildren(QFormLayout):
            lab = lay.labelForField(w)
            if isinstance(lab, QLabel):
                lab.setText(param_label(name))


def _loss_words(key: str) -> str:
    """A progress record's loss key as words for the status line (``cg_residual`` → ``CG residual``)."""
    if str(key) != str(key).lower():  # symbols such as L_T stay as written
        return str(key)
    words = str(key).split("_")
    return " ".join(w.upper() if w.lower() in ("cg", "gn", "tv", "smv") else w for w in words)


def _is_image(layer) -> bool:
    from napari.layers import Image
    return isinstance(layer, Image) and not getattr(layer, "rgb", False)


def _is_volume(layer) -> bool:
    from napari.layers import Image, Labels
    return isinstance(layer, (Image, Labels)) and getattr(layer, "ndim", 0) == 3 and not getattr(layer, "rgb", False)


def _role(layer) -> str:
    md = getattr(layer, "metadata", None) or {}
    return md.get("role") or guess_role(layer.name)


_R2STAR_NAME = re.compile(r"(^|[_\-. ])r2(star|s|\*)", re.IGNORECASE)


def _map_role(layer) -> str:
    """Role of an echo-fit map: the metadata's, else "r2star" for names like R2*, r2star, R2starmap, else by name."""
    md = getattr(layer, "metadata", None) or {}
    if md.get("role"):
        return md["role"]
    return "r2star" if _R2STAR_NAME.search(layer.name) else guess_role(layer.name)


def _same_run(a, b) -> bool:
    """False only when both layers come from Field dock runs and not from the same one."""
    sa = (getattr(a, "metadata", None) or {}).get("field_steps")
    sb = (getattr(b, "metadata", None) or {}).get("field_steps")
    return sa is None or sb is None or sa == sb


def _map_array(layer, what: str, field_layer) -> np.ndarray:
    """A 3-D map layer on the field layer's grid, in the canonical frame (ScanError naming ``what``)."""
    from .layers import to_canonical

    data = layer.data[0] if isinstance(layer.data, (list, tuple)) else layer.data
    arr = np.asarray(data)
    fshape = tuple(np.shape(field_layer.data))
    if arr.shape != fshape:
        raise ScanError(f"{what}: layer '{layer.name}' has shape {arr.shape}, the field layer "
                        f"'{field_layer.name}' has {fshape}")
    g, geom = layer_geometry(layer), layer_geometry(field_layer)
    if g.known and geom.known and (tuple(g.axes) != tuple(geom.axes) or not np.allclose(g.affine, geom.affine,
                                                                                      atol=1e-3)):
        raise ScanError(f"{what}: layer '{layer.name}' is on a different voxel grid than the field layer "
                        f"'{field_layer.name}'; resample it first")
    if np.iscomplexobj(arr):
        raise ScanError(f"{what}: layer '{layer.name}' is complex; expected a real-valued map")
    return np.ascontiguousarray(to_canonical(arr, geom.axes), dtype=np.float32)


class VScrollArea(QScrollArea):
    """Scroll area asking for the width its content needs (a horizontal bar only when squeezed)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)

    def _extra(self) -> int:
        return self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth() + 2

    def minimumSizeHint(self) -> QSize:
        w = self.widget()
        base = super().minimumSizeHint()
        if w is None:
            return base
        return QSize(w.minimumSizeHint().width() + self._extra(), base.height())

    def sizeHint(self) -> QSize:
        w = self.widget()
        if w is None:
            return super().sizeHint()
        hint = w.sizeHint()
        return QSize(hint.width() + self._extra(), min(hint.height(), 900))


class LayerCombo(QComboBox):
    """Drop-down of the viewer's 3-D layers that pass ``accept``; keeps the choice by name."""

    def __init__(self, viewer, accept, optional: bool = False, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.optional = optional
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)

    def candidates(self) -> list:
        return [lay for lay in self.viewer.layers if _is_volume(lay) and self.accept(lay)]

    def refresh(self) -> None:
        current = self.currentText()
        names = ([NONE_TEXT] if self.optional else []) + [lay.name for lay in reversed(self.candidates())]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentIndex(names.index(current))
        else:  # nothing chosen yet, or the chosen layer is gone: let the panel pick by role
            self.setCurrentIndex(0 if self.optional else -1)
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        name = self.currentText()
        if not name or name == NONE_TEXT or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def select(self, layer) -> None:
        name = NONE_TEXT if layer is None else layer.name
        i = self.findText(name)
        if i >= 0:
            self.setCurrentIndex(i)


class InputsPanel(QWidget):
    """Choose field / mask / magnitude layers, units, field strength and TE, and the B0 direction; validates inline.

    Field strength B0 (T) and echo time TE (ms) are always shown and always passed to the scan:
    they convert Hz / rad fields to ppm, and for every unit (ppm included) they set the phase
    scaling of MEDI (B0) and of the network adaptation (B0 and TE). They are prefilled from the
    field layer (:func:`~napari_qsm._napari.layers.acquisition_from_metadata`: BIDS sidecar
    ImagingFrequency / MagneticFieldStrength / EchoTime, NIfTI header, layer metadata); the line
    under them says where each value came from, and flags the 3 T / 20 ms defaults as assumed.

    With ``echo_maps`` (the Reconstruct dock) two optional maps of the echo fit follow the
    magnitude: the field noise N_std (ppm; MEDI weights the data by 1/N_std, as the command line's
    ``--noise-std``) and R2* (1/s; MEDI+0 finds the CSF in it, as ``--r2star``). Both are picked
    by their metadata role ("noise_std", "r2star", as the Field dock makes them) on the field's
    grid, from the field's own Field run when it has one; "(none)" when there is none.
    """

    changed = Signal()

    def __init__(self, viewer, parent=None, echo_maps: bool = False):
        super().__init__(parent)
        self.viewer = viewer
        self._b0_from_layer: Optional[np.ndarray] = None
        self._b0_edited = False
        self._geometry_known = True
        self._acq_from = {"te": "default", "b0": "default"}  # where the TE / B0 values came from
        self._setting_acq = False
        self.last_error: Optional[str] = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        lay.addLayout(form)

        open_row = QHBoxLayout()
        open_row.addStretch(1)
        self.open_button = QPushButton("Open NIfTI files…")
        self.open_button.setToolTip("Open field / mask / magnitude files (.nii, .nii.gz) as layers; they are "
                                    "picked below by their names (field, mask, mag…)")
        self.open_button.clicked.connect(self._open_files)
        open_row.addWidget(self.open_button)
        lay.addLayout(open_row)

        self.field_combo = LayerCombo(viewer, _is_image)
        self.field_combo.setToolTip("Local (tissue) field map: background field removed; ppm, Hz or rad")
        form.addRow("Field", self.field_combo)

        self.units_combo = QComboBox()
        for value, text in UNITS:
            self.units_combo.addItem(text, value)
        self.units_combo.setToolTip("Units of the field map; Hz needs B0, rad needs TE and B0")
        form.addRow("Field units", self.units_combo)

        self.b0t_spin = QDoubleSpinBox()
        self.b0t_spin.setObjectName("b0_tesla")
        self.b0t_spin.setRange(0.05, 21.1)
        self.b0t_spin.setDecimals(4)
        self.b0t_spin.setSingleStep(0.1)
        self.b0t_spin.setSuffix(" T")
        self.b0t_spin.setValue(DEFAULT_B0_T)
        self.b0t_spin.setKeyboardTracking(False)
        self.b0t_spin.setToolTip("<qt>Main magnetic field strength of the scanner, in tesla (γ/2π = 42.577 MHz/T). "
                                 "Converts Hz and rad fields to ppm, and for every unit sets MEDI's ppm → radian "
                                 "scale (2π·ΔTE·γ̄·B0) and the adaptation's phase scale (2π·γ̄·B0·TE). Read from "
                                 "the JSON sidecar (ImagingFrequency / 42.577, else MagneticFieldStrength) when "
                                 "there is one.</qt>")
        self.b0t_label = QLabel("Field strength (B0)")
        form.addRow(self.b0t_label, self.b0t_spin)

        self.te_spin = QDoubleSpinBox()
        self.te_spin.setObjectName("te_ms")
        self.te_spin.setRange(0.01, 1000.0)
        self.te_spin.setDecimals(2)
        self.te_spin.setSuffix(" ms")
        self.te_spin.setValue(DEFAULT_TE_MS)
        self.te_spin.setKeyboardTracking(False)
        self.te_spin.setToolTip("<qt>Echo time in milliseconds (the TE of the phase, or the effective TE of a "
                                "multi-echo fit). Converts a rad field to ppm, and for every unit sets the phase "
                                "the network adaptation compares (2π·γ̄·B0·TE radians per ppm). MEDI's ΔTE is its "
                                "own parameter. Read from the sidecar's EchoTime or the NIfTI header when "
                                "there.</qt>")
        self.te_label = QLabel("Echo time (TE)")
        self.acq_info = _wrap_label("", DIM_COLOR, small=True)
        self.acq_info.setObjectName("acquisition_info")
        te_box = QVBoxLayout()
        te_box.setSpacing(2)
        te_box.addWidget(self.te_spin)
        te_box.addWidget(self.acq_info)  # where B0 and TE came from (sidecar, header, entered, assumed)
        form.addRow(self.te_label, te_box)

        self.mask_combo = LayerCombo(viewer, lambda layer: True)
        self.mask_combo.setToolTip("Brain mask (0/1 labels or an image, > 0.5 inside) on the field's grid")
        form.addRow("Mask", self.mask_combo)

        self.mag_combo = LayerCombo(viewer, _is_image, optional=True)
        self.mag_combo.setToolTip("Magnitude image (optional; MEDI uses it for edges and noise weights)")
        form.addRow("Magnitude", self.mag_combo)

        self.noise_combo = self.r2star_combo = None
        if echo_maps:
            self.noise_combo = LayerCombo(viewer, _is_image, optional=True)
            self.noise_combo.setObjectName("noise_combo")
            self.noise_combo.setToolTip("<qt>Field noise standard deviation N_std (ppm) from the echo fit, e.g. the "
                                        "Field dock's 'noise (N_std)' (optional). MEDI weights the data by 1/N_std; "
                                        "without it, by the magnitude.</qt>")
            form.addRow("Noise N_std (ppm)", self.noise_combo)
            self.r2star_combo = LayerCombo(viewer, _is_image, optional=True)
            self.r2star_combo.setObjectName("r2star_combo")
            self.r2star_combo.setToolTip("<qt>R2* map (1/s) from the echo fit, e.g. the Field dock's 'R2*' (optional). "
                                         "MEDI+0 finds the CSF in it (low R2*); without it, in the magnitude.</qt>")
            form.addRow("R2* (1/s)", self.r2star_combo)

        self.grid_label = _wrap_label("", DIM_COLOR, small=True)
        form.addRow("Grid", self.grid_label)

        b0row = QHBoxLayout()
        b0row.setSpacing(3)
        self.b0_spins = []
        for axis in ("x", "y", "z"):
            s = QDoubleSpinBox()
            s.setRange(-1.0, 1.0)
            s.setDecimals(4)
            s.setSingleStep(0.01)
            s.setKeyboardTracking(False)
            s.setButtonSymbols(QDoubleSpinBox.ButtonSymbols.NoButtons)
            s.setPrefix(f"{axis} ")
            s.setMinimumWidth(56)
            s.setToolTip(f"B0 component along voxel axis {axis} (x = L→R, y = P→A, z = I→S, RAS canonical "
                         "frame); normalised before use")
            b0row.addWidget(s)
            self.b0_spins.append(s)
        self.b0_reset = QToolButton()
        self.b0_reset.setText("↺")
        self.b0_reset.setToolTip("Reset the B0 direction to the field layer's (from its affine)")
        b0row.addWidget(self.b0_reset)
        b0box = QVBoxLayout()
        b0box.setSpacing(2)
        b0box.addLayout(b0row)
        self.b0_info = _wrap_label("", DIM_COLOR, small=True)
        b0box.addWidget(self.b0_info)
        form.addRow("B0 direction", b0box)

        self.orient_combo = QComboBox()
        for key, text, _ in ORIENTATIONS:
            self.orient_combo.addItem(text, key)
        self.orient_combo.setToolTip("Orientation of the 2-D view (napari camera): anterior up for axial "
                                     "slices, superior up for coronal and sagittal ones")
        form.addRow("View", self.orient_combo)

        self.message = _wrap_label("")
        self.message.setObjectName("inputs_message")
        lay.addWidget(self.message)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.validate)

        self._user_picked: dict = {}
        for c in self._combos():
            c.activated.connect(lambda _i, c=c: self._user_picked.__setitem__(id(c), True))
        self.field_combo.currentIndexChanged.connect(self._on_field_changed)
        for w in self._combos()[1:]:
            w.currentIndexChanged.connect(self._schedule)
        self.units_combo.currentIndexChanged.connect(self._on_units_changed)
        self.te_spin.valueChanged.connect(lambda *_: self._on_acq_edited("te"))
        self.b0t_spin.valueChanged.connect(lambda *_: self._on_acq_edited("b0"))
        for s in self.b0_spins:
            s.valueChanged.connect(self._on_b0_edited)
        self.b0_reset.clicked.connect(self.reset_b0)
        self.orient_combo.currentIndexChanged.connect(self._apply_orientation)

        ev = viewer.layers.events
        ev.inserted.connect(self._on_layers_changed)
        ev.removed.connect(self._on_layers_changed)
        ev.moved.connect(self._on_layers_changed)
        for layer in viewer.layers:
            layer.events.name.connect(self._on_layers_changed)
        self._on_units_changed()
        self._update_acq_info()
        self._on_layers_changed()
        self._apply_orientation()

    def open_files(self, paths) -> list:
        """Read NIfTI files with the plugin's reader and add them as layers (errors are notifications)."""
        from .reader import read_nifti

        added = []
        for data in read_nifti([str(p) for p in paths]):
            if len(data) == 3:
                arr, kw, typ = data
                added.append(getattr(self.viewer, f"add_{typ}")(arr, **kw))
        return added

    def _open_files(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Open NIfTI volumes", "",
                                                "NIfTI (*.nii *.nii.gz);;All files (*)")
        if paths:
            self.open_files(paths)

    # -- layer lists ------------------------------------------------------------------------
    def _on_layers_changed(self, event=None) -> None:
        if event is not None and getattr(event, "type", "") == "inserted":
            try:
                event.value.events.name.connect(self._on_layers_changed)
            except Exception:
                pass
        combos = self._combos()
        before = tuple(c.layer() for c in combos)
        for c in combos:
            c.blockSignals(True)
            c.refresh()
        self._autopick(force=False)
        for c in combos:
            c.blockSignals(False)
        after = tuple(c.layer() for c in combos)
        if before[0] is not after[0]:
            self._on_field_changed()
        elif before != after:
            self._schedule()
        else:
            self._schedule()

    def _combos(self) -> list:
        """The layer drop-downs: field, mask, magnitude, then the echo maps when shown."""
        return [c for c in (self.field_combo, self.mask_combo, self.mag_combo, self.noise_combo, self.r2star_combo)
                if c is not None]

    def _map_combos(self) -> list:
        return [(c, role) for c, role in ((self.noise_combo, "noise_std"), (self.r2star_combo, "r2star"))
                if c is not None]

    def _best(self, combo: LayerCombo, roles: tuple, shape=None):
        cands = combo.candidates()
        if shape is not None:
            cands = [c for c in cands if tuple(c.data.shape) == tuple(shape)]
        for role in roles:
            hits = [c for c in cands if _role(c) == role]
            if hits:
                return hits[-1]
        return None

    def _auto(self, combo: LayerCombo, role: str) -> bool:
        """May the panel re-pick this combo? (not when the user chose a layer by hand)"""
        layer = combo.layer()
        return layer is None or (not self._user_picked.get(id(combo)) and _role(layer) != role)

    def _autopick(self, force: bool) -> None:
        field = self.field_combo.layer()
        if force or self._auto(self.field_combo, "field"):
            best = self._best(self.field_combo, ("field",))
            if best is None and field is None:  # else an image of no known role (never a raw phase, a
                # total field, a magnitude or a χ: a local field is picked by hand when not named as one)
                cands = [c for c in self.field_combo.candidates() if _role(c) == "image"]
                best = cands[-1] if cands else None
            if best is not None:
                self.field_combo.select(best)
            field = self.field_combo.layer()
        shape = tuple(field.data.shape) if field is not None else None
        mask = self.mask_combo.layer()
        if mask is None or mask is field or (shape is not None and tuple(mask.data.shape) != shape) or (
                self._auto(self.mask_combo, "mask") and self._best(self.mask_combo, ("mask",), shape) is not None):
            best = self._best(self.mask_combo, ("mask",), shape)
            if best is None:  # else a labels layer on the field's grid (never an image: pick it by hand)
                from napari.layers import Labels
                cands = [c for c in self.mask_combo.candidates() if isinstance(c, Labels) and
                         (shape is None or tuple(c.data.shape) == shape)]
                best = cands[-1] if cands else None
            if best is not None:
                self.mask_combo.select(best)
        mag = self.mag_combo.layer()
        mismatch = mag is not None and shape is not None and tuple(mag.data.shape) != shape
        if mismatch or (not self._user_picked.get(id(self.mag_combo)) and self._auto(self.mag_combo, "magnitude")):
            best = self._best(self.mag_combo, ("magnitude",), shape)
            if best is not None or mismatch:
                self.mag_combo.select(best)
        for combo, role in self._map_combos():
            # an echo map follows the field (its Field run's map; "(none)" when there is none) until
            # the user picks one by hand; one on another grid is always dropped
            cur = combo.layer()
            mismatch = cur is not None and (shape is None or tuple(cur.data.shape) != shape)
            if mismatch or not self._user_picked.get(id(combo)):
                hits = [c for c in combo.candidates() if _map_role(c) == role and shape is not None
                        and tuple(c.data.shape) == shape and _same_run(c, field)]
                combo.select(hits[-1] if hits else None)

    # -- field / geometry ---------------------------------------------------------------------
    def _on_field_changed(self, *_) -> None:
        layer = self.field_combo.layer()
        if layer is not None:
            others = self._combos()[1:]
            for c in others:
                c.blockSignals(True)
            self._autopick(force=False)
            for c in others:
                c.blockSignals(False)
            md = layer.metadata or {}
            self._prefill_acquisition(md)
            units = md.get("units")
            if units in ("ppm", "hz", "rad"):
                self.units_combo.setCurrentIndex([u for u, _ in UNITS].index(units))
        self.reset_b0()

    def _prefill_acquisition(self, md: dict) -> None:
        """B0 and TE from the field layer when it tells them; else keep what the user entered, or the defaults."""
        acq = acquisition_from_metadata(md)
        self._setting_acq = True
        try:
            for key, spin, value, default in (("b0", self.b0t_spin, acq["b0_tesla"], DEFAULT_B0_T),
                                              ("te", self.te_spin, None if acq["te"] is None else acq["te"] * 1000.0,
                                               DEFAULT_TE_MS)):
                if value is not None:
                    spin.setValue(float(value))
                    self._acq_from[key] = acq[f"{key}_from"]
                elif self._acq_from[key] != "entered":
                    spin.setValue(default)
                    self._acq_from[key] = "default"
        finally:
            self._setting_acq = False
        self._update_acq_info()

    def _on_acq_edited(self, key: str) -> None:
        if not self._setting_acq:
            self._acq_from[key] = "entered"
            self._update_acq_info()
        self._schedule()

    def acquisition_sources(self) -> dict:
        """Where the B0 and TE values come from: "sidecar …", "NIfTI header …", "entered", or "default" (assumed)."""
        return {"b0_from": self._acq_from["b0"], "te_from": self._acq_from["te"]}

    def _update_acq_info(self) -> None:
        parts = []
        for key, what in (("b0", "B0"), ("te", "TE")):
            src = self._acq_from[key]
            if src == "default":
                parts.append(f"<span style='color:{WARN_COLOR}'>{what} not in the file: default assumed, check it</span>")
            else:
                parts.append(f"{what} {html.escape(src if src == 'entered' else 'from the ' + src)}")
        self.acq_info.setText("; ".join(parts))

    def reset_b0(self) -> None:
        layer = self.field_combo.layer()
        if layer is None:
            self._b0_from_layer = None
            self.grid_label.setText("")
            self._schedule()
            return
        try:
            geom = layer_geometry(layer)
        except ScanError as exc:
            self._b0_from_layer = None
            self.grid_label.setText(html.escape(str(exc)))
            self._schedule()
            return
        self._geometry_known = geom.known
        self._b0_from_layer = np.asarray(geom.b0_direction, float)
        for s, v in zip(self.b0_spins, self._b0_from_layer):
            s.blockSignals(True)
            s.setValue(float(v))
            s.blockSignals(False)
        self._b0_edited = False
        shp = tuple(layer.data.shape)
        canon_shape = tuple(int(shp[list(geom.axes).index(a)]) for a in range(3))
        vs = "×".join(f"{v:.3g}" for v in geom.voxel_size)
        self.grid_label.setText(f"{'×'.join(str(n) for n in canon_shape)} voxels (x×y×z), {vs} mm"
                                + ("" if geom.known else " <i>(from the layer scale; no affine)</i>"))
        self._update_b0_info()
        self._schedule()

    def _on_b0_edited(self, *_):
        self._b0_edited = True
        self._update_b0_info()
        self._schedule()

    def b0_direction(self) -> Optional[np.ndarray]:
        """Unit B0 vector (canonical voxel frame): the layer's exact one unless the user edited it."""
        if not self._b0_edited and self._b0_from_layer is not None:
            return np.asarray(self._b0_from_layer, float) / np.linalg.norm(self._b0_from_layer)
        v = np.array([s.value() for s in self.b0_spins], float)
        n = np.linalg.norm(v)
        return None if n < 1e-9 else v / n

    def _update_b0_info(self) -> None:
        b = self.b0_direction()
        if b is None:
            self.b0_info.setText(f"<span style='color:{ERR_COLOR}'>B0 direction is the zero vector</span>")
            return
        ang = b0_angle_deg(b)
        if self._b0_edited:
            src = "edited"
        elif self._geometry_known:
            src = "from the affine"
        else:
            src = "<span style='color:%s'>assumed along the slice axis (no affine): check it</span>" % WARN_COLOR
        self.b0_info.setText(f"{ang:.1f}° from the slice axis (z); {src}")

    def _on_units_changed(self, *_):
        # B0 and TE stay visible for every unit: ppm fields need them too (MEDI, adaptation)
        self._schedule()

    def _apply_orientation(self, *_):
        key = self.orient_combo.currentData()
        for k, _, orient in ORIENTATIONS:
            if k == key:
                scene = getattr(self.viewer, "scene", None)  # napari ≥ 0.9; viewer.camera before
                camera = scene.camera if scene is not None else self.viewer.camera
                try:
                    camera.orientation2d = orient
                except Exception:
                    pass

    # -- values -----------------------------------------------------------------------------
    def units(self) -> str:
        return self.units_combo.currentData()

    def te_seconds(self) -> float:
        """Echo time in seconds (passed to the scan for every unit)."""
        return self.te_spin.value() / 1000.0

    def b0_tesla(self) -> float:
        """Field strength in tesla (passed to the scan for every unit)."""
        return self.b0t_spin.value()

    def build_scan(self):
        """The Scan for the chosen layers (raises ScanError / ValueError naming the input)."""
        b0 = self.b0_direction()
        if b0 is None:
            raise ScanError("b0_direction: the zero vector has no direction; set the B0 direction")
        noise = self.noise_combo.layer() if self.noise_combo is not None else None
        scan = scan_from_layers(self.field_combo.layer(), self.mask_combo.layer(), self.mag_combo.layer(),
                                units=self.units(), te=self.te_seconds(), b0_tesla=self.b0_tesla(),
                                b0_direction=b0, noise_layer=noise)
        r2 = self.r2star_combo.layer() if self.r2star_combo is not None else None
        if r2 is not None:
            scan.r2star = _map_array(r2, "r2star", self.field_combo.layer())
        for key, lay in (("noise_std", noise), ("r2star", r2)):
            if lay is not None:
                scan.source[key] = (lay.metadata or {}).get("path") or f"layer:{lay.name}"
        return scan

    def input_names(self) -> dict:
        out = {"field": getattr(self.field_combo.layer(), "name", None),
               "mask": getattr(self.mask_combo.layer(), "name", None)}
        if self.mag_combo.layer() is not None:
            out["magnitude"] = self.mag_combo.layer().name
        for key, combo in (("noise_std", self.noise_combo), ("r2star", self.r2star_combo)):
            if combo is not None and combo.layer() is not None:
                out[key] = combo.layer().name
        out["units"] = self.units()
        out["b0_tesla"] = self.b0_tesla()
        out["te"] = self.te_seconds()
        out.update(self.acquisition_sources())
        return out

    # -- validation ---------------------------------------------------------------------------
    def _schedule(self, *_):
        self._timer.start()

    def validate(self):
        """Build the scan as the core would; show the problem (or a summary) inline. Returns the Scan or None."""
        self._timer.stop()
        try:
            with warnings.catch_warnings(record=True) as wlist:
                warnings.simplefilter("always")
                scan = self.build_scan()
        except (ScanError, ValueError) as exc:
            self.last_error = str(exc)
            hint = ""
            if self.field_combo.layer() is None:
                skipped = [lay.name for lay in self.field_combo.candidates() if _role(lay) in NOT_LOCAL_FIELD]
                if skipped:
                    hint = (f"<br><span style='color:{DIM_COLOR}'>not picked as the local field: "
                            + ", ".join(f"'{html.escape(n)}' ({NOT_LOCAL_FIELD[_role(self.viewer.layers[n])]})"
                                        for n in skipped)
                            + "; compute the local field first (napari-qsm field), or choose one by hand</span>")
            self.message.setText(f"<span style='color:{ERR_COLOR}'>✗ {html.escape(str(exc))}</span>{hint}")
            self.changed.emit()
            return None
        self.last_error = None
        f = scan.field[scan.mask]
        lo, hi = np.percentile(f, [1, 99]) if f.size else (0.0, 0.0)
        text = (f"<span style='color:{OK_COLOR}'>✓ ready</span>: {int(scan.mask.sum()):,} voxels in the mask; "
                f"field 1–99% {lo:+.3f} … {hi:+.3f} ppm")
        if scan.magnitude is None:
            text += f"<br><span style='color:{DIM_COLOR}'>no magnitude: MEDI edge weighting unavailable</span>"
        maps = [what for what, arr in (("noise N_std (MEDI's data weights)", scan.noise_std),
                                       ("R2* (MEDI+0's CSF mask)", scan.r2star)) if arr is not None]
        if maps:
            text += f"<br><span style='color:{DIM_COLOR}'>from the echo fit: {html.escape(', '.join(maps))}</span>"
        field_layer = self.field_combo.layer()
        field_role = _role(field_layer) if field_layer is not None else None
        if field_role in NOT_LOCAL_FIELD:
            text += (f"<br><span style='color:{WARN_COLOR}'>⚠ '{html.escape(self.field_combo.layer().name)}' looks "
                     f"like {NOT_LOCAL_FIELD[field_role]}, not a local field: the inversion expects the background "
                     "field removed</span>")
        for w in wlist:
            text += f"<br><span style='color:{WARN_COLOR}'>⚠ {html.escape(str(w.message))}</span>"
        self.message.setText(text)
        self.changed.emit()
        return scan


class PreviewLayer:
    """A temporary image layer showing a solver's preview (χ estimate) while it runs."""

    def __init__(self, viewer, name: str, min_interval: float = 0.7):
        self.viewer = viewer
        self.name = name
        self.layer = None
        self.min_interval = min_interval
        self._last = 0.0

    def update(self, array, reference_layer) -> None:
        import time

        from .layers import derived_layer_kwargs, to_layer_order, CHI_CONTRAST

        now = time.perf_counter()
        if now - self._last < self.min_interval:
            return
        self._last = now
        geom = layer_geometry(reference_layer)
        data = to_layer_order(np.asarray(array, np.float32), geom.axes)
        if self.layer is not None and self.layer in self.viewer.layers and self.layer.data.shape == data.shape:
            self.layer.data = data
            return
        kw = derived_layer_kwargs(reference_layer, name=self.name, role="preview")
        self.layer = self.viewer.add_image(data, colormap="gray", contrast_limits=CHI_CONTRAST, **kw)
        bar = getattr(self.layer, "colorbar", None)  # a χ estimate: its ±0.15 ppm scale, as the result's
        if bar is not None:
            bar.visible = True

    def show_progress(self, p, reference_layer) -> None:
        """Show the χ preview a Progress record carries, if any (a preview problem never breaks the run)."""
        if p.preview is None or np.ndim(p.preview) != 3:
            return
        try:
            self.update(p.preview, reference_layer)
        except Exception:
            pass

    def remove(self) -> None:
        if self.layer is not None and self.layer in self.viewer.layers:
            self.viewer.layers.remove(self.layer)
        self.layer = None


class QSMWidget(RunnerDock, QSMDock, QWidget):
    """Dock widget "QSM reconstruction": inputs section and reconstruct section."""

    qsm_dock_order = 0
    qsm_dock_title = "QSM reconstruction"

    result_added = Signal(object)  # the χ layer

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = JobRunner(napari_viewer)
        self._form_values: dict = {}
        self._results: dict = {}  # method -> {"chi": layer, extra key: layer}
        self._current_method = None
        self.last_result = None
        self._preview: Optional[PreviewLayer] = None

        outer, scroll, body = _scrolling_body(self)
        self.inputs = _inputs_section(body, napari_viewer, echo_maps=True)

        box, lay = _section("Reconstruct")
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
        self.method_doc = _wrap_label("", DIM_COLOR, small=True)
        lay.addWidget(self.method_doc)
        self.excluded_note = _wrap_label(" ".join(
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
        wrow, self.weights_edit, self.weights_browse = _weights_row(
            "Network weights (.pt); empty = the checkpoint shipped with napari-qsm", "Choose a weights file (.pt)")
        self.weights_label = QLabel("Weights")
        form2.addRow(self.weights_label, wrow)
        self.device_combo = _device_combo()
        self.device_combo.setToolTip("Where the numerics run (only devices present on this machine)")
        form2.addRow("Device", self.device_combo)
        self.output_combo = QComboBox()
        self.output_combo.addItem("Replace this method's last result", "replace")
        self.output_combo.addItem("Add a new layer", "add")
        self.output_combo.setToolTip("Re-running a method updates its previous χ layer, or adds another one")
        form2.addRow("Result", self.output_combo)
        lay.addLayout(form2)

        self.method_problem = _wrap_label("")
        lay.addWidget(self.method_problem)
        body.addWidget(box)
        body.addStretch(1)

        # footer, always visible under the scrolling part: Run / Cancel and the status line
        self.run_button, self.cancel_button, self.status = _run_footer(outer)
        self.run_button.setObjectName("run_button")
        self.cancel_button.setObjectName("cancel_button")
        self.status.setObjectName("status_label")
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.method_combo.currentIndexChanged.connect(self._on_method_changed)
        self.reset_button.clicked.connect(self.form.reset)
        self.weights_browse.clicked.connect(self._browse_weights)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.inputs.changed.connect(self._update_method_problem)
        runner = self.runner
        self.destroyed.connect(lambda *_: runner.cancel(detach=True))  # dock closed: stop the run
        self._on_method_changed()
        self._scroll = scroll
        self._fit_width()

    def _fit_width(self) -> None:
        """Ask the dock for the width the content needs, so nothing is clipped on the right."""
        self.setMinimumWidth(max(320, self._scroll.minimumSizeHint().width()))

    def showEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().showEvent(event)
        # the napari style sheet (fonts, padding) applies once the dock is shown: measure again
        QTimer.singleShot(0, self._fit_width)

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
        _relabel_form(self.form)
        self.method_doc.setText(html.escape(m.doc or ""))
        self.weights_edit.setVisible(m.accepts_weights)
        self.weights_browse.setVisible(m.accepts_weights)
        self.weights_label.setVisible(m.accepts_weights)
        self._update_method_problem()
        if hasattr(self, "_scroll"):
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
        _pick_weights_file(self, "Network weights", self.weights_edit)

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
        got = _scan_and_params(self, m.params_cls, errors=(ParamError, ValueError, TypeError))
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

        self._set_running(True)
        self.status.setText(f"{m.label} running on {self.device_combo.currentText()}…")
        self._preview = PreviewLayer(self.viewer, f"{m.name} (preview)") if m.long_running else None
        runner.start(job, description=f"{m.label} reconstruction",
                     on_progress=lambda p: self._on_progress(p, field_layer),
                     on_result=lambda res: self._on_result(res, field_layer, scan, inputs),
                     on_error=self._on_error, on_cancelled=self._on_cancelled, on_finished=self._on_finished)
        return True

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.inputs, self.method_combo, self.form, self.reset_button, self.device_combo,
                  self.output_combo, self.weights_edit, self.weights_browse):
            w.setEnabled(not running)

    def _on_progress(self, p, field_layer) -> None:
        frac = f"{p.step}/{p.total}" if p.total else f"{p.step}"
        losses = "  ".join(f"{_loss_words(k)} {v:.3g}" for k, v in list(p.losses.items())[:3])
        self.status.setText(html.escape(f"{p.message or p.stage} ({frac}, {p.elapsed:.1f} s)  {losses}".strip()))
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
            from .layers import robust_limits, to_layer_order
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
        self._set_running(False)
        self._update_method_problem()


def make_qsm_widget(napari_viewer):
    """npe2 widget factory."""
    return QSMWidget(napari_viewer)
