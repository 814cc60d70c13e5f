"""The "Field" dock: raw multi-echo GRE (magnitude and phase layers) → local field, in napari.

Thin over the headless front end (:mod:`napari_qsm.core.field`):

* **Echoes**: a magnitude and a phase source, each a 4-D image layer (from the sample "raw
  multi-echo head", a BIDS MEGRE folder opened with the plugin's reader, or any 4-D array with
  ``echo_axis`` in its metadata) or the per-echo layers the reader makes of one 4-D NIfTI file.
  Echo times (ms), field strength (T) and the phase units come from the layers' metadata (BIDS
  sidecars) and can be edited. "Open folder…" reads a BIDS anat/subject folder or a DICOM folder
  (dcm2niix) in a worker and adds its echoes as layers.
* **Steps**: one drop-down per step family (Echo fit, Unwrapping, Brain mask, Background
  removal) filled from the registry (:func:`napari_qsm.methods.available_steps`), each with its
  parameter form generated from the step's parameter record (:mod:`napari_qsm._napari.form`;
  ``widget="advanced"`` fields fold under "Advanced"). A mask layer, when chosen, replaces the
  brain-mask step (a user mask always wins).
* **Run** in a worker (:class:`~napari_qsm._napari.workers.JobRunner`: progress bar, Cancel,
  never blocking the event loop). The result's maps become 3-D layers on the echoes' grid: total
  field (ppm), brain mask, local field (ppm), eroded mask, combined magnitude, R2* (1/s) and the
  field noise N_std (ppm). They carry the geometry metadata of :mod:`napari_qsm._napari.layers`
  (role "field" for the local field, "mask", "magnitude", …), so the Reconstruct, Adapt and
  Compare docks list them at once; the dock also selects them there (no file round trip).

napari aligns layers of different dimensionality on their trailing axes, so 3-D maps line up
with 4-D echoes only when the echo axis comes first. The reader's and the sample's echo layers
are echo-first already; a 4-D layer added by hand with the echo on another axis (``echo_axis``
e.g. 3) is turned echo-first in place (its data is a view, nothing is copied) when the dock adds
its maps.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                            QLineEdit, QPushButton, QWidget)

from ..core.constants import PHASE_SCALES
from ..core.field.pipeline import FieldRecipe
from ..core.field.records import Echoes
from ..core.field.steps import FAMILIES
from ..core.params import ParamError
from ..core.scan import ScanError
from ..methods import available_steps, get_step
from ..pipeline import field_from_echoes
from .docks import QSMDock
from .form import ParamForm
from .layers import (Geometry, acquisition_from_metadata, check_axes, geometry_from, robust_limits,
                     to_layer_order)
from .widgets import (DIM_COLOR, OK_COLOR, WARN_COLOR, RunnerDock, _device_combo, _run_footer, _scrolling_body,
                      _section, _wrap_label)
from .workers import JobRunner

#: the step families in the words a person writes, in the order the dock shows them
FAMILY_TITLES = {"fit": "Echo fit", "unwrap": "Unwrapping", "mask": "Brain mask", "background": "Background removal"}
PHASE_UNITS = [("auto", "detect from the values"), ("rad", "radians"), ("siemens", "Siemens integers (±4096)"),
               ("mrad", "Philips milliradians")]
_PHASE_SCALE = PHASE_SCALES
NO_MASK = "(none: compute it)"

# parameter rows: words a person would write, units in the label (the record's name stays the key)
_LABELS = {
    "offsets": "Phase offsets", "offset_sigma_mm": "Offset smoothing σ (mm)", "intercept": "Intercept",
    "noise_sigma": "Noise σ (0 = estimate)", "r2star_max": "R2* clip (1/s)", "max_iter": "Max iterations",
    "tol": "Tolerance", "stop": "Stop rule", "echo_mode": "Echo mode", "template_echo": "Template echo",
    "use_magnitude": "Use the magnitude", "form": "Laplacian form", "pad_factor": "Padding factor",
    "source": "Threshold on", "threshold_scale": "Threshold scale", "open_mm": "Opening radius (mm)",
    "close_mm": "Closing radius (mm)", "erode_mm": "Erosion (mm)", "radius_max": "Largest radius (mm)",
    "radius_min": "Smallest radius (mm)", "radius_step": "Radius step (mm)", "threshold": "Truncation",
    "radius": "Radius (mm)", "lambda": "Regularisation λ", "use_noise": "Weight by N_std",
    "coarse_levels": "Coarse grids", "peel": "Boundary layers peeled",
}


def nice_label(spec) -> str:
    """Row label for a step parameter: hand-written when known, else the name in words with its unit."""
    if spec.name in _LABELS:
        return _LABELS[spec.name]
    words = spec.name.split("_")
    unit = None
    if len(words) > 1 and words[-1] in ("mm", "ms", "ppm", "s"):
        unit = words.pop()
    else:
        m = re.search(r"\((mm|ms|ppm|1/s|Hz|T)\)", spec.doc or "")
        unit = m.group(1) if m else None
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} ({unit})" if unit else text


def _relabel(form: ParamForm) -> None:
    from ..core.params import specs

    if form.params_cls is None:
        return
    by_name = {s.name: s for s in specs(form.params_cls)}
    for name in form.names():
        w = form.widget_for(name)
        for lay in form.findChildren(QFormLayout):
            lab = lay.labelForField(w)
            if isinstance(lab, QLabel):
                lab.setText(nice_label(by_name[name]))


def _short_doc(doc: str, limit: int = 150) -> str:
    """First sentence of a step's doc (the whole doc is the tooltip)."""
    doc = (doc or "").strip()
    m = re.match(r"(.+?\.)(\s|$)", doc)
    first = m.group(1) if m else doc
    if len(first) > limit:
        first = first[: limit - 1].rstrip() + "…"
    return first


# ------------------------------------------------------------------------------------------- echo sources

@dataclass
class EchoSource:
    """Where one part (magnitude or phase) of the echoes lives: a 4-D layer, or per-echo 3-D layers of one file."""

    label: str
    layers: list
    echo_axis: Optional[int] = None   # 4-D layer: its echo axis; None for a group of 3-D layers

    @property
    def layer(self):
        return self.layers[0]

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.layers[0], "metadata", None) or {})

    @property
    def n_echoes(self) -> int:
        if self.echo_axis is None:
            return len(self.layers)
        return int(np.shape(self.layers[0].data)[self.echo_axis])

    def alive(self, viewer) -> bool:
        return all(lay in viewer.layers for lay in self.layers)


def _md(layer) -> dict:
    return getattr(layer, "metadata", None) or {}


def _role(layer) -> str:
    from .reader import guess_role
    return _md(layer).get("role") or guess_role(layer.name)


def _echo_axis(layer) -> int:
    ax = _md(layer).get("echo_axis")
    if isinstance(ax, int) and 0 <= ax < 4:
        return ax
    return 0  # numpy (echo, slice, row, column) when nothing says otherwise


def echo_sources(viewer) -> list:
    """Every magnitude / phase candidate in the viewer: 4-D image layers and per-echo groups of one file."""
    from napari.layers import Image

    out, groups = [], {}
    for lay in viewer.layers:
        if not isinstance(lay, Image) or getattr(lay, "rgb", False):
            continue
        md = _md(lay)
        if lay.ndim == 4:
            ax = _echo_axis(lay)
            out.append(EchoSource(f"{lay.name} ({lay.data.shape[ax]} echoes)", [lay], ax))
        elif lay.ndim == 3 and isinstance(md.get("echo"), int) and md.get("path"):
            groups.setdefault((md["path"], _role(lay)), []).append(lay)
    for (path, _), lays in groups.items():
        if len(lays) < 2:
            continue
        lays = sorted(lays, key=lambda la: _md(la)["echo"])
        stem = _md(lays[0]).get("source_name") or Path(path).name
        out.append(EchoSource(f"{stem} (echoes {len(lays)} layers)", lays, None))
    return out


def _source_geometry(src: EchoSource) -> Geometry:
    lay = src.layer
    scale, translate = np.asarray(lay.scale, float), np.asarray(lay.translate, float)
    if src.echo_axis is not None:
        keep = [a for a in range(4) if a != src.echo_axis]
        scale, translate = scale[keep], translate[keep]
    return geometry_from(src.metadata, scale, translate)


def source_array(src: EchoSource, axes) -> np.ndarray:
    """The echoes of a source in the canonical frame, (i, j, k, echo) float32."""
    inv = list(np.argsort(check_axes(axes)))
    if src.echo_axis is None:
        vols = [np.asarray(lay.data) for lay in src.layers]
        return np.ascontiguousarray(np.stack([np.transpose(v, inv) for v in vols], -1), dtype=np.float32)
    a = np.moveaxis(np.asarray(src.layer.data), src.echo_axis, -1)
    return np.ascontiguousarray(np.transpose(a, inv + [3]), dtype=np.float32)


def source_echo_times(src: EchoSource) -> Optional[list]:
    """Echo times (s) the metadata tells, or None."""
    if src.echo_axis is None:
        tes = [acquisition_from_metadata(_md(lay))["te"] for lay in src.layers]
        return tes if all(t is not None for t in tes) else None
    md = src.metadata
    side = md.get("sidecar") if isinstance(md.get("sidecar"), dict) else {}
    for v in (md.get("echo_times"), md.get("te"), side.get("EchoTime")):
        if isinstance(v, (list, tuple)) and len(v) == src.n_echoes:
            try:
                tes = [float(t) for t in v]
            except (TypeError, ValueError):
                continue
            return [t / 1000.0 if t > 1.0 else t for t in tes]
    return None


def _prefix(name: str) -> str:
    """"raw head magnitude (5 echoes)" → "raw head"; "sub-01_part-mag_MEGRE" → "sub-01"."""
    n = re.sub(r"\s*\(.*\)$", "", name)
    n = re.sub(r"[_\- ]?(part-mag|magnitude|mag)([_\- ].*)?$", "", n, flags=re.IGNORECASE)
    n = re.sub(r"_MEGRE$", "", n)
    return n.strip() or "echoes"


def echoes_from_sources(mag: EchoSource, phase: EchoSource, te_s, b0_tesla: float, phase_units: str = "auto",
                        phase_sign: int = 1) -> Echoes:
    """Build the core's :class:`Echoes` from two sources (errors name the input)."""
    from ..core.field.load import detect_phase_units

    if mag is None:
        raise ScanError("magnitude: no echoes chosen; open a raw multi-echo scan (a BIDS or DICOM folder, or the "
                        "sample 'raw multi-echo head')")
    if phase is None:
        raise ScanError("phase: no echoes chosen; choose the phase layer of the same scan")
    geom = _source_geometry(mag)
    m = source_array(mag, geom.axes)
    p = source_array(phase, _source_geometry(phase).axes)
    if p.shape != m.shape:
        raise ScanError(f"phase: '{phase.label}' has shape {p.shape[:3]} with {p.shape[3]} echoes, the magnitude "
                        f"'{mag.label}' {m.shape[:3]} with {m.shape[3]}; expected the same scan")
    if not np.all(np.isfinite(p)):
        raise ScanError(f"phase: '{phase.label}' holds NaN/Inf values")
    side = mag.metadata.get("sidecar") if isinstance(mag.metadata.get("sidecar"), dict) else {}
    manufacturer = str(side.get("Manufacturer") or "")
    if phase_units == "auto":
        if phase.metadata.get("units") == "rad" or phase.metadata.get("phase_units") == "rad":
            units, reason = "rad", "layer metadata: radians"
        else:
            units, reason = detect_phase_units(p, manufacturer, name=f"phase '{phase.label}'")
    else:
        units, reason = phase_units, "chosen in the dock"
    if units not in _PHASE_SCALE:
        raise ScanError(f"phase units: expected one of {list(_PHASE_SCALE)}, got {units!r}")
    p = p * np.float32(_PHASE_SCALE[units] * phase_sign)
    vendor = {"phase_units": units, "phase_units_source": reason, "phase_sign": int(phase_sign),
              "manufacturer": manufacturer or None, "from_layers": [lay.name for lay in mag.layers + phase.layers]}
    srcs = tuple(str(_md(la).get("path")) for la in mag.layers + phase.layers if _md(la).get("path"))
    return Echoes(magnitude=m, phase=p, te=tuple(te_s), b0_tesla=float(b0_tesla), affine=geom.affine,
                  voxel_size=tuple(float(v) for v in geom.voxel_size), b0_direction=geom.b0_direction, vendor=vendor,
                  sources=tuple(dict.fromkeys(srcs)), nifti_info=mag.metadata.get("nifti_info"),
                  name=_prefix(mag.label))


def make_echo_first(layer) -> bool:
    """Turn a 4-D echo layer echo-first in place (a view of its data), so that 3-D maps line up with it.

    Returns True when the layer was changed.
    """
    ax = _echo_axis(layer)
    if layer.ndim != 4 or ax == 0:
        return False
    order = [ax] + [a for a in range(4) if a != ax]
    md = dict(_md(layer))
    md["echo_axis"] = 0
    kw = {k: tuple(np.asarray(getattr(layer, k))[order]) for k in ("scale", "translate")}
    labels = tuple(np.asarray(layer.axis_labels, dtype=object)[order])
    units = tuple(np.asarray([str(u) for u in layer.units], dtype=object)[order])
    layer.data = np.moveaxis(np.asarray(layer.data), ax, 0)
    layer.scale = kw["scale"]
    layer.translate = kw["translate"]
    try:
        layer.axis_labels = labels
        layer.units = units
    except Exception:  # older napari: no per-layer axis labels/units
        pass
    layer.metadata = md
    return True


# ---------------------------------------------------------------------------------------------- the dock

class FieldWidget(RunnerDock, QSMDock, QWidget):
    """Dock widget "Field": raw echoes → total field, brain mask, local field, R2*, N_std (see module doc)."""

    qsm_dock_order = 0.5  # tabs: QSM reconstruction, Field, Adapt network, Compare (`napari-qsm view` shows the first)
    qsm_dock_title = "Field"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.runner = JobRunner(napari_viewer)
        self.loader = JobRunner(napari_viewer)
        self.last_run = None
        self.output_layers: dict = {}
        self._sources: list = []
        self._forms: dict = {}
        self._form_values: dict = {}
        self._current: dict = {}
        self._acq_from = {"te": "", "b0": ""}

        outer, scroll, body = _scrolling_body(self)
        self._scroll = scroll

        # -- echoes ---------------------------------------------------------------------------
        box, lay = _section("Echoes")
        top = QHBoxLayout()
        top.addStretch(1)
        self.folder_button = QPushButton("Open folder…")
        self.folder_button.setObjectName("folder_button")
        self.folder_button.setToolTip("A BIDS anat or subject folder (*_echo-N_part-mag|phase_MEGRE.nii.gz with JSON "
                                      "sidecars) or a DICOM folder (converted with dcm2niix); its echoes open as "
                                      "magnitude and phase layers")
        top.addWidget(self.folder_button)
        lay.addLayout(top)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.mag_combo = QComboBox()
        self.mag_combo.setObjectName("magnitude_combo")
        self.mag_combo.setToolTip("Magnitude of every echo: a 4-D layer, or the per-echo layers of one file")
        self.phase_combo = QComboBox()
        self.phase_combo.setObjectName("phase_combo")
        self.phase_combo.setToolTip("Phase of every echo, same scan and echo order as the magnitude")
        for c in (self.mag_combo, self.phase_combo):
            c.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            c.setMinimumContentsLength(18)
        form.addRow("Magnitude", self.mag_combo)
        form.addRow("Phase", self.phase_combo)
        self.te_edit = QLineEdit()
        self.te_edit.setObjectName("echo_times")
        self.te_edit.setPlaceholderText("e.g. 4, 8, 12, 16, 20")
        self.te_edit.setToolTip("Echo times in milliseconds, one per echo, increasing (from the JSON sidecars or "
                                "the layer metadata when they tell)")
        form.addRow("Echo times (ms)", self.te_edit)
        self.b0_spin = QDoubleSpinBox()
        self.b0_spin.setObjectName("b0_tesla")
        self.b0_spin.setRange(0.05, 21.1)
        self.b0_spin.setDecimals(4)
        self.b0_spin.setSingleStep(0.1)
        self.b0_spin.setSuffix(" T")
        self.b0_spin.setValue(3.0)
        self.b0_spin.setKeyboardTracking(False)
        self.b0_spin.setToolTip("<qt>Field strength in tesla: ImagingFrequency / 42.577 MHz/T when the sidecar has "
                                "it (a '3 T' Siemens is 2.89 T), else MagneticFieldStrength.</qt>")
        form.addRow("Field strength", self.b0_spin)
        self.units_combo = QComboBox()
        for value, text in PHASE_UNITS:
            self.units_combo.addItem(text, value)
        self.units_combo.setToolTip("Units of the phase values: detected from their range and the vendor unless "
                                    "chosen here")
        self.units_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.units_combo.setMinimumContentsLength(14)
        self.sign_check = QCheckBox("flip (e.g. GE)")
        self.sign_check.setToolTip("Multiply the phase by −1 (scanners with the opposite phase convention)")
        form.addRow("Phase units", self.units_combo)
        form.addRow("Phase sign", self.sign_check)
        lay.addLayout(form)
        self.echo_info = _wrap_label("", DIM_COLOR, small=True)
        self.echo_info.setObjectName("echo_info")
        lay.addWidget(self.echo_info)
        body.addWidget(box)

        # -- steps: one drop-down per family, all visible together --------------------------
        box, lay = _section("Steps")
        sform = QFormLayout()
        sform.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.step_combos: dict = {}
        for fam in FAMILIES:
            c = QComboBox()
            c.setObjectName(f"{fam}_combo")
            c.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            c.setMinimumContentsLength(max([14] + [min(24, len(s.label)) for s in available_steps(fam)]))
            for s in available_steps(fam):
                c.addItem(s.label, s.name)
                c.setItemData(c.count() - 1, s.doc, Qt.ItemDataRole.ToolTipRole)
            self.step_combos[fam] = c
            sform.addRow(FAMILY_TITLES[fam], c)
            if fam == "mask":
                self.mask_combo = QComboBox()
                self.mask_combo.setObjectName("user_mask_combo")
                self.mask_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
                self.mask_combo.setMinimumContentsLength(14)
                self.mask_combo.setToolTip("A brain mask layer (labels, on the echoes' grid) replaces the mask step, "
                                           "e.g. the brain mask of a run, corrected with the labels brush")
                sform.addRow("Mask layer", self.mask_combo)
        self.device_combo = _device_combo()
        self.device_combo.setToolTip("Where the numerics run (only devices present on this machine)")
        sform.addRow("Device", self.device_combo)
        lay.addLayout(sform)
        self.handoff_check = QCheckBox("Use the local field in the other docks")
        self.handoff_check.setChecked(True)
        self.handoff_check.setToolTip("After a run, choose the new local field, eroded mask and magnitude in the "
                                      "Reconstruct, Adapt and Compare docks")
        lay.addWidget(self.handoff_check)
        body.addWidget(box)

        # -- one parameter section per family ------------------------------------------------
        self.step_docs: dict = {}
        self.step_boxes: dict = {}
        for fam in FAMILIES:
            box, lay = _section(f"{FAMILY_TITLES[fam]}: parameters")
            doc = _wrap_label("", DIM_COLOR, small=True)
            lay.addWidget(doc)
            f = ParamForm()
            lay.addWidget(f)
            self.step_docs[fam], self._forms[fam], self.step_boxes[fam] = doc, f, box
            body.addWidget(box)
        self.reset_button = QPushButton("Defaults")
        self.reset_button.setToolTip("Reset every step's parameters to their defaults")
        rrow = QHBoxLayout()
        rrow.addStretch(1)
        rrow.addWidget(self.reset_button)
        body.addLayout(rrow)
        body.addStretch(1)

        self.run_button, self.cancel_button, self.status = _run_footer(outer)
        self.run_button.setObjectName("run_button")
        self.cancel_button.setObjectName("cancel_button")
        self.status.setObjectName("status_label")
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        # -- signals ----------------------------------------------------------------------------
        for fam, c in self.step_combos.items():
            c.currentIndexChanged.connect(lambda _i, fam=fam: self._on_step_changed(fam))
            self._on_step_changed(fam)
        self.mag_combo.currentIndexChanged.connect(self._on_mag_changed)
        self.phase_combo.currentIndexChanged.connect(self._update_info)
        self.mask_combo.currentIndexChanged.connect(self._on_mask_changed)
        self.te_edit.textEdited.connect(lambda *_: self._edited("te"))
        self.b0_spin.valueChanged.connect(lambda *_: self._edited("b0"))
        self.units_combo.currentIndexChanged.connect(self._update_info)
        self.folder_button.clicked.connect(self._browse_folder)
        self.reset_button.clicked.connect(self.reset_parameters)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(50)
        self._refresh_timer.timeout.connect(self.refresh_sources)
        ev = napari_viewer.layers.events
        for e in (ev.inserted, ev.removed):
            e.connect(lambda *_: self._refresh_timer.start())
        runner, loader = self.runner, self.loader
        self.destroyed.connect(lambda *_: (runner.cancel(detach=True), loader.cancel(detach=True)))
        self.refresh_sources()
        self._fit_width()

    # -- sizing -------------------------------------------------------------------------------
    def _fit_width(self) -> None:
        self.setMinimumWidth(max(320, self._scroll.minimumSizeHint().width()))

    def showEvent(self, event) -> None:  # noqa: N802 - Qt name
        super().showEvent(event)
        QTimer.singleShot(0, self._fit_width)

    # -- sources --------------------------------------------------------------------------------
    def refresh_sources(self) -> None:
        """Refill the magnitude / phase / mask drop-downs; keep the choices; pick by role when free."""
        try:
            sources = echo_sources(self.viewer)
        except RuntimeError:  # the viewer is closing
            return
        self._sources = sources
        for combo, role in ((self.mag_combo, "magnitude"), (self.phase_combo, "phase")):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            for s in sources:
                combo.addItem(s.label)
            labels = [s.label for s in sources]
            if current in labels:
                combo.setCurrentIndex(labels.index(current))
            else:
                hits = [i for i, s in enumerate(sources) if _role(s.layer) == role]
                combo.setCurrentIndex(hits[-1] if hits else (-1 if not sources else 0))
            combo.blockSignals(False)
        self._refresh_masks()
        self._on_mag_changed()

    def _refresh_masks(self) -> None:
        from napari.layers import Labels

        current = self.mask_combo.currentText()
        eroded = self.output_layers.get("mask")
        names = [NO_MASK] + [la.name for la in self.viewer.layers
                             if isinstance(la, Labels) and la.ndim == 3 and la is not eroded]
        self.mask_combo.blockSignals(True)
        self.mask_combo.clear()
        self.mask_combo.addItems(names)
        self.mask_combo.setCurrentIndex(names.index(current) if current in names else 0)
        self.mask_combo.blockSignals(False)
        self._on_mask_changed()

    def _source(self, combo) -> Optional[EchoSource]:
        label = combo.currentText()
        for s in self._sources:
            if s.label == label:
                return s if s.alive(self.viewer) else None
        return None

    def magnitude_source(self) -> Optional[EchoSource]:
        return self._source(self.mag_combo)

    def phase_source(self) -> Optional[EchoSource]:
        return self._source(self.phase_combo)

    def set_sources(self, magnitude, phase) -> None:
        """Choose the echoes by layer (or source label)."""
        self.refresh_sources()
        for combo, what in ((self.mag_combo, magnitude), (self.phase_combo, phase)):
            for s in self._sources:
                if what is s.label or what in s.layers or s.label == getattr(what, "name", what):
                    combo.setCurrentText(s.label)
                    break

    def _on_mag_changed(self, *_) -> None:
        """Echo times and field strength from the magnitude's metadata (unless the user typed them)."""
        src = self.magnitude_source()
        if src is not None:
            tes = source_echo_times(src)
            if tes is not None and self._acq_from["te"] != "entered":
                self.te_edit.setText(", ".join(f"{t * 1000:g}" for t in tes))
                self._acq_from["te"] = "metadata"
            acq = acquisition_from_metadata(src.metadata)
            if acq["b0_tesla"] is not None and self._acq_from["b0"] != "entered":
                self.b0_spin.blockSignals(True)
                self.b0_spin.setValue(float(acq["b0_tesla"]))
                self.b0_spin.blockSignals(False)
                self._acq_from["b0"] = acq["b0_from"]
        self._update_info()

    def _edited(self, key: str) -> None:
        self._acq_from[key] = "entered"
        self._update_info()

    def echo_times(self) -> list:
        """Echo times in seconds from the text field (raises ScanError naming the problem)."""
        text = self.te_edit.text().strip()
        if not text:
            raise ScanError("echo times: none given; type them in ms (e.g. 4, 8, 12)")
        try:
            ms = [float(t) for t in re.split(r"[,;\s]+", text) if t]
        except ValueError:
            raise ScanError(f"echo times: {text!r} are not numbers; type them in ms separated by commas") from None
        return [t / 1000.0 for t in ms]

    def _update_info(self, *_) -> None:
        mag, ph = self.magnitude_source(), self.phase_source()
        if mag is None:
            self.echo_info.setText(f"<span style='color:{WARN_COLOR}'>No echoes yet: open a BIDS or DICOM folder, "
                                   "or File ▸ Open Sample ▸ napari QSM ▸ Raw multi-echo head</span>")
            return
        g = _source_geometry(mag)
        bits = [f"{mag.n_echoes} echoes", "voxel " + " × ".join(f"{v:g}" for v in g.voxel_size) + " mm"]
        if self._acq_from["b0"] and self._acq_from["b0"] != "entered":
            bits.append(f"B0 from the {html.escape(self._acq_from['b0'])}")
        text = ", ".join(bits)
        if ph is not None and ph.n_echoes != mag.n_echoes:
            text += (f"<br><span style='color:{WARN_COLOR}'>⚠ the phase has {ph.n_echoes} echoes, the magnitude "
                     f"{mag.n_echoes}</span>")
        if ph is not None and ph is mag:
            text += f"<br><span style='color:{WARN_COLOR}'>⚠ magnitude and phase are the same layer</span>"
        if not g.known:
            text += f"<br><span style='color:{WARN_COLOR}'>⚠ no geometry in the layer: B0 along the slice axis</span>"
        self.echo_info.setText(text)

    def _on_mask_changed(self, *_) -> None:
        user = self.mask_combo.currentText() not in ("", NO_MASK)
        self.step_combos["mask"].setEnabled(not user and not self.runner.running)
        self._forms["mask"].setEnabled(not user and not self.runner.running)
        self.step_boxes["mask"].setTitle(f"{FAMILY_TITLES['mask']}: parameters"
                                         + (" (not used: a mask layer is chosen)" if user else ""))

    def _browse_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a BIDS or DICOM folder")
        if folder:
            self.open_folder(folder)

    def open_folder(self, folder) -> bool:
        """Read a BIDS anat/subject folder or a DICOM folder in a worker; add its echoes as layers."""
        from ..core.field.load import load_echoes
        from .reader import echoes_layer_data

        if self.loader.running or self.runner.running:
            return False
        folder = str(folder)
        self.status.setText(f"reading {html.escape(Path(folder).name)}…")
        self.folder_button.setEnabled(False)

        def added(echoes):
            layers = []
            for data, kw, typ in echoes_layer_data(echoes):
                layers.append(getattr(self.viewer, f"add_{typ}")(data, **kw))
            self.set_sources(layers[0], layers[1])
            self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> {echoes.n_echoes} echoes from "
                                f"{html.escape(Path(folder).name)}")

        self.loader.start(lambda progress: load_echoes(folder), description=f"reading {Path(folder).name}",
                          on_result=added, on_error=lambda exc: self._fail(str(exc)),
                          on_finished=lambda: self.folder_button.setEnabled(True))
        return True

    # -- steps --------------------------------------------------------------------------------
    def step(self, family: str):
        return get_step(family, self.step_combos[family].currentData())

    def set_step(self, family: str, name: str) -> None:
        i = self.step_combos[family].findData(name)
        if i < 0:
            raise ValueError(f"{FAMILY_TITLES[family]}: no step {name!r}")
        self.step_combos[family].setCurrentIndex(i)

    def form(self, family: str) -> ParamForm:
        return self._forms[family]

    def _on_step_changed(self, family: str) -> None:
        f = self._forms[family]
        prev = self._current.get(family)
        if prev is not None:
            self._form_values[(family, prev)] = f.raw_values()
        s = self.step(family)
        self._current[family] = s.name
        f.set_params_cls(s.params_cls, self._form_values.get((family, s.name)))
        _relabel(f)
        doc = html.escape(_short_doc(s.doc))
        if not s.exact:
            doc += f" <span style='color:{WARN_COLOR}'>Not exact by construction.</span>"
        if family == "unwrap":
            doc += " Runs only when the echo fit leaves the field wrapped."
        self.step_docs[family].setText(doc)
        self.step_docs[family].setToolTip(s.doc)
        self.step_boxes[family].setTitle(f"{FAMILY_TITLES[family]}: {s.label}")
        if family == "mask":
            self._on_mask_changed()

    def reset_parameters(self) -> None:
        for f in self._forms.values():
            f.reset()

    def recipe(self) -> FieldRecipe:
        """The chosen steps and their validated parameters (raises ParamError / ValueError)."""
        r = FieldRecipe(**{fam: self.step(fam) for fam in FAMILIES})
        params = {}
        for fam in FAMILIES:
            try:
                params[fam] = self._forms[fam].values()
            except ParamError as exc:
                raise ParamError(f"{FAMILY_TITLES[fam]}: {exc}") from None
        r.params = params
        for fam in FAMILIES:
            r.record(fam)
        return r

    # -- run ----------------------------------------------------------------------------------
    def build_echoes(self) -> Echoes:
        b0 = float(self.b0_spin.value())
        return echoes_from_sources(self.magnitude_source(), self.phase_source(), self.echo_times(), b0,
                                   phase_units=self.units_combo.currentData(),
                                   phase_sign=-1 if self.sign_check.isChecked() else 1)

    def _user_mask(self, echoes: Echoes):
        name = self.mask_combo.currentText()
        if name in ("", NO_MASK) or name not in self.viewer.layers:
            return None
        layer = self.viewer.layers[name]
        axes = check_axes(_md(layer).get("axes", _source_geometry(self.magnitude_source()).axes))
        m = np.transpose(np.asarray(layer.data), np.argsort(axes))
        if m.shape != echoes.shape:
            raise ScanError(f"mask: layer '{name}' has shape {m.shape}, the echoes {echoes.shape}; choose a mask on "
                            "the echoes' grid")
        return m > 0

    def run(self) -> bool:
        """Validate, then start raw echoes → local field in a worker. Returns False when it could not start."""
        if self.runner.running or self.loader.running:
            return False
        try:
            recipe = self.recipe()
            echoes = self.build_echoes()
            user_mask = self._user_mask(echoes)
        except (ScanError, ParamError, ValueError, TypeError) as exc:
            self._fail(str(exc))
            return False
        mag_src = self.magnitude_source()
        device = self.device_combo.currentData()
        runner = self.runner

        axes = _source_geometry(mag_src).axes
        md_src = mag_src.metadata

        def job(progress):
            run = field_from_echoes(echoes, recipe, mask=user_mask, device=device, progress=progress,
                                    cancel=runner.token)
            # the layers' arrays and display windows (percentiles) are made here, not on the event loop
            geom = Geometry(axes=axes, voxel_size=np.asarray(run.scan.voxel_size, float),
                            b0_direction=np.asarray(run.scan.b0_direction, float),
                            affine=np.asarray(run.scan.affine, float))
            return run, field_layer_data(run, geom, run.scan.name or "echoes", md_src)

        self._set_running(True)
        self.status.setText(f"{html.escape(FAMILY_TITLES['fit'])}…")
        runner.start(job, description="Raw echoes → local field",
                     on_progress=self._on_progress, on_result=lambda out: self._on_result(*out, mag_src),
                     on_error=self._on_error, on_cancelled=self._on_cancelled, on_finished=self._on_finished)
        return True

    def _set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.mag_combo, self.phase_combo, self.te_edit, self.b0_spin, self.units_combo, self.sign_check,
                  self.mask_combo, self.device_combo, self.folder_button, self.reset_button,
                  *self.step_combos.values(), *self._forms.values()):
            w.setEnabled(not running)
        if not running:
            self._on_mask_changed()

    def _on_progress(self, p) -> None:
        frac = f" ({p.step}/{p.total})" if p.total else ""
        self.status.setText(html.escape(f"{p.message or p.stage}{frac}, {p.elapsed:.1f} s"))

    def _on_finished(self) -> None:
        self._set_running(False)

    # -- results --------------------------------------------------------------------------------
    def _on_result(self, run, layer_data: dict, mag_src: Optional[EchoSource]) -> None:
        self.last_run = run
        src = mag_src if mag_src is not None and mag_src.alive(self.viewer) else None
        if src is not None:  # 3-D maps line up with 4-D echoes only when the echo axis comes first
            dims = self.viewer.dims
            point, ax = list(dims.point), src.echo_axis
            turned = [make_echo_first(s.layer) for s in (src, self.phase_source())
                      if s is not None and s.echo_axis not in (None, 0)]
            if any(turned) and dims.ndim == 4 and ax is not None:
                dims.order = (0, 1, 2, 3)  # echo on a slider, the (j, i) plane in the canvas
                for new, old in enumerate([ax] + [a for a in range(4) if a != ax]):
                    dims.set_point(new, point[old])  # same echo and slice as before
            self.refresh_sources()
        for key, (data, kw, typ) in layer_data.items():
            old = self.output_layers.get(key)
            if old is not None and old in self.viewer.layers and old.data.shape == data.shape:
                old.data = data
                old.metadata = kw["metadata"]
                if typ == "image":
                    old.contrast_limits = kw["contrast_limits"]
            else:
                old = getattr(self.viewer, f"add_{typ}")(data, **kw)
                self.output_layers[key] = old
        self._refresh_masks()
        local = self.output_layers["local_field"]
        self.viewer.layers.selection.active = local
        if self.handoff_check.isChecked():
            self.hand_off()
        steps = ", ".join(f"{html.escape(FAMILY_TITLES.get(s['family'], s['family']).lower())} {s['seconds']:.1f} s"
                          for s in run.steps)
        self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> <b>{html.escape(local.name)}</b> (ppm) in "
                            f"{run.provenance.get('seconds', 0):.1f} s: {steps}")
        self.status.setToolTip("; ".join(f"{FAMILY_TITLES.get(s['family'], s['family'])}: {s['label']}, "
                                         f"{s['seconds']:.2f} s" for s in run.steps))

    def hand_off(self) -> list:
        """Choose the new local field, eroded mask and magnitude in the other docks; returns the docks changed."""
        from .widgets import InputsPanel

        local = self.output_layers.get("local_field")
        mask = self.output_layers.get("mask")
        mag = self.output_layers.get("magnitude")
        if local is None or local not in self.viewer.layers:
            return []
        win = self.window()
        changed = []
        for panel in win.findChildren(InputsPanel):
            if panel is self or getattr(panel, "viewer", None) is not self.viewer:
                continue
            for combo, layer in ((panel.field_combo, local), (panel.mask_combo, mask), (panel.mag_combo, mag)):
                if layer is not None:
                    combo.refresh()
                    combo.select(layer)
            changed.append(panel)
        try:
            from .compare.dock import CompareWidget
        except Exception:  # the Compare dock is optional here
            CompareWidget = None
        if CompareWidget is not None:
            for cmp_ in win.findChildren(CompareWidget):
                if getattr(cmp_, "viewer", self.viewer) is not self.viewer:
                    continue
                try:
                    cmp_.set_field(local.name)
                    if mask is not None:
                        cmp_.set_mask(mask.name)
                    changed.append(cmp_)
                except Exception:
                    pass
        return changed


def field_layer_data(run, geom: Geometry, prefix: str, source_md: Optional[dict] = None) -> dict:
    """Layer data tuples of a :class:`~napari_qsm.core.field.pipeline.FieldRun`, by key, on ``geom``'s grid.

    Keys: total_field, brain_mask, local_field, mask (eroded), magnitude, r2star, noise_std.
    """
    kw_geo = geom.layer_kwargs()
    base = dict(geom.metadata())
    source_md = source_md or {}
    for k in ("path", "nifti_info", "sidecar"):
        if source_md.get(k) is not None:
            base[k] = source_md[k]
    scan = run.scan
    base.update({"b0_tesla": float(scan.b0_tesla), "te": float(scan.te),
                 "field_steps": [dict(s) for s in run.steps], "echoes": run.provenance.get("echoes", {})})
    ax = geom.axes
    tot = run.total

    def img(arr, name, role, units=None, visible=False, symmetric=None, cmap="gray", **extra):
        d = to_layer_order(np.asarray(arr, np.float32), ax)
        md = dict(base, role=role, **extra)
        if units:
            md["units"] = units
        return (d, dict(name=f"{prefix} {name}", colormap=cmap, visible=visible, metadata=md,
                        contrast_limits=robust_limits(d, symmetric=symmetric), **kw_geo), "image")

    def lab(arr, name, visible=False, **extra):
        d = to_layer_order(np.asarray(arr).astype(np.uint8), ax)
        return (d, dict(name=f"{prefix} {name}", visible=visible, opacity=0.35, metadata=dict(base, role="mask", **extra),
                        **kw_geo), "labels")

    return {
        "total_field": img(tot.field, "total field", "total_field", "ppm", symmetric=True),
        "brain_mask": lab(run.brain_mask, "brain mask", stage="before background removal"),
        "r2star": img(tot.r2star, "R2*", "r2star", "1/s", symmetric=False, cmap="magma"),
        "noise_std": img(tot.noise_std, "noise (N_std)", "noise_std", "ppm", symmetric=False),
        "magnitude": img(tot.magnitude, "combined magnitude", "magnitude", symmetric=False),
        "mask": lab(scan.mask, "eroded mask", stage="eroded by background removal"),
        "local_field": img(scan.field, "local field", "field", "ppm", visible=True, symmetric=True),
    }
