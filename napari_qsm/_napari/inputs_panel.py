"""The "Inputs" section the Reconstruct and Adapt docks share: field, mask and magnitude layers, units, B0, TE.

:class:`InputsPanel` turns the chosen layers into a :class:`~napari_qsm.core.scan.Scan`
(:func:`~napari_qsm._napari.layers.scan_from_layers`) and validates inline.
"""

from __future__ import annotations

import html
import warnings
from typing import Optional

import numpy as np
from qtpy.QtCore import QTimer, Signal
from qtpy.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QPushButton,
                            QToolButton, QVBoxLayout, QWidget)

from ..core.scan import ScanError
from .kit import (DIM_COLOR, ERR_COLOR, OK_COLOR, WARN_COLOR, LayerCombo, field_strength_spin, hook_events,
                  section, spin_box, unwrap, wrap_label)
from .layer_roles import is_image, layer_role, map_array, map_role, same_run
from .layers import acquisition_from_metadata, b0_angle_deg, layer_geometry, scan_from_layers
from .reader import NOT_LOCAL_FIELD

__all__ = ["InputsPanel", "inputs_section", "UNITS", "ORIENTATIONS"]

UNITS = [("ppm", "ppm (of B0)"), ("hz", "Hz"), ("rad", "rad (phase over TE)")]
ORIENTATIONS = [
    ("neurological", "Neurological (A up, R right)", ("up", "right")),
    ("radiological", "Radiological (A up, R left)", ("up", "left")),
    ("napari", "napari default (A down)", ("down", "right")),
]
DEFAULT_TE_MS, DEFAULT_B0_T = 20.0, 3.0  # shown (and flagged as assumed) when the file does not tell



def inputs_section(body: QVBoxLayout, viewer, echo_maps: bool = False) -> "InputsPanel":
    """Add the shared "Inputs" section (field, mask, magnitude, units, B0) to a dock body.

    ``echo_maps``: also offer the echo fit's noise N_std and R2* maps (see :class:`InputsPanel`).
    """
    box, lay = section("Inputs")
    panel = InputsPanel(viewer, echo_maps=echo_maps)
    lay.addWidget(panel)
    body.addWidget(box)
    return panel


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

        self.field_combo = LayerCombo(viewer, is_image)
        self.field_combo.setToolTip("Local (tissue) field map: background field removed; ppm, Hz or rad")
        form.addRow("Field", self.field_combo)

        self.units_combo = QComboBox()
        for value, text in UNITS:
            self.units_combo.addItem(text, value)
        self.units_combo.setToolTip("Units of the field map; Hz needs B0, rad needs TE and B0")
        form.addRow("Field units", self.units_combo)

        self._add_acquisition_rows(form)

        self.mask_combo = LayerCombo(viewer, lambda layer: True)
        self.mask_combo.setToolTip("Brain mask (0/1 labels or an image, > 0.5 inside) on the field's grid")
        form.addRow("Mask", self.mask_combo)

        self.mag_combo = LayerCombo(viewer, is_image, optional=True)
        self.mag_combo.setToolTip("Magnitude image (optional; MEDI uses it for edges and noise weights)")
        form.addRow("Magnitude", self.mag_combo)

        self.noise_combo = self.r2star_combo = None
        if echo_maps:
            self._add_echo_map_rows(form)

        self.grid_label = wrap_label("", DIM_COLOR, small=True)
        form.addRow("Grid", self.grid_label)

        form.addRow("B0 direction", self._b0_direction_box())

        self.orient_combo = QComboBox()
        for key, text, _ in ORIENTATIONS:
            self.orient_combo.addItem(text, key)
        self.orient_combo.setToolTip("Orientation of the 2-D view (napari camera): anterior up for axial "
                                     "slices, superior up for coronal and sagittal ones")
        form.addRow("View", self.orient_combo)

        self.message = wrap_label("")
        self.message.setObjectName("inputs_message")
        lay.addWidget(self.message)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.validate)

        self._connect()
        self._on_units_changed()
        self._update_acq_info()
        self._on_layers_changed()
        self._apply_orientation()

    def _add_acquisition_rows(self, form: QFormLayout) -> None:
        """Field strength B0 (T) and echo time TE (ms), with the line saying where they came from."""
        self.b0t_spin = field_strength_spin(
            DEFAULT_B0_T, "<qt>Main magnetic field strength of the scanner, in tesla (γ/2π = 42.577 MHz/T). "
                          "Converts Hz and rad fields to ppm, and for every unit sets MEDI's ppm → radian "
                          "scale (2π·ΔTE·γ̄·B0) and the adaptation's phase scale (2π·γ̄·B0·TE). Read from "
                          "the JSON sidecar (ImagingFrequency / 42.577, else MagneticFieldStrength) when "
                          "there is one.</qt>")
        self.b0t_label = QLabel("Field strength (B0)")
        form.addRow(self.b0t_label, self.b0t_spin)

        self.te_spin = spin_box("te_ms", 0.01, 1000.0, DEFAULT_TE_MS, decimals=2, suffix=" ms",
                                tooltip="<qt>Echo time in milliseconds (the TE of the phase, or the effective TE of a "
                                        "multi-echo fit). Converts a rad field to ppm, and for every unit sets the phase "
                                        "the network adaptation compares (2π·γ̄·B0·TE radians per ppm). MEDI's ΔTE is its "
                                        "own parameter. Read from the sidecar's EchoTime or the NIfTI header when "
                                        "there.</qt>")
        self.te_label = QLabel("Echo time (TE)")
        self.acq_info = wrap_label("", DIM_COLOR, small=True)
        self.acq_info.setObjectName("acquisition_info")
        te_box = QVBoxLayout()
        te_box.setSpacing(2)
        te_box.addWidget(self.te_spin)
        te_box.addWidget(self.acq_info)  # where B0 and TE came from (sidecar, header, entered, assumed)
        form.addRow(self.te_label, te_box)

    def _add_echo_map_rows(self, form: QFormLayout) -> None:
        """The echo fit's noise N_std and R2* maps (optional; the Reconstruct dock)."""
        self.noise_combo = LayerCombo(self.viewer, is_image, optional=True)
        self.noise_combo.setObjectName("noise_combo")
        self.noise_combo.setToolTip("<qt>Field noise standard deviation N_std (ppm) from the echo fit, e.g. the "
                                    "Field dock's 'noise (N_std)' (optional). MEDI weights the data by 1/N_std; "
                                    "without it, by the magnitude.</qt>")
        form.addRow("Noise N_std (ppm)", self.noise_combo)
        self.r2star_combo = LayerCombo(self.viewer, is_image, optional=True)
        self.r2star_combo.setObjectName("r2star_combo")
        self.r2star_combo.setToolTip("<qt>R2* map (1/s) from the echo fit, e.g. the Field dock's 'R2*' (optional). "
                                     "MEDI+0 finds the CSF in it (low R2*); without it, in the magnitude.</qt>")
        form.addRow("R2* (1/s)", self.r2star_combo)

    def _b0_direction_box(self) -> QVBoxLayout:
        """The B0 direction row: x, y, z spin boxes, a reset button, and a line saying where it came from."""
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
        self.b0_info = wrap_label("", DIM_COLOR, small=True)
        b0box.addWidget(self.b0_info)
        return b0box

    def _connect(self) -> None:
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

        viewer = self.viewer
        ev = viewer.layers.events
        self._hooks = hook_events(self, [(ev.inserted, self._on_layers_changed), (ev.removed, self._on_layers_changed),
                                         (ev.moved, self._on_layers_changed)]
                                  + [(layer.events.name, self._on_layers_changed) for layer in viewer.layers])

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
                self._hooks.append((event.value.events.name, self._on_layers_changed))
            except Exception:
                pass
        combos = self._combos()
        before = tuple(unwrap(c.layer()) for c in combos)  # a dock's viewer proxy wraps each layer anew
        for c in combos:
            c.blockSignals(True)
            c.refresh()
        self._autopick(force=False)
        for c in combos:
            c.blockSignals(False)
        after = tuple(unwrap(c.layer()) for c in combos)
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
            hits = [c for c in cands if layer_role(c) == role]
            if hits:
                return hits[-1]
        return None

    def _auto(self, combo: LayerCombo, role: str) -> bool:
        """May the panel re-pick this combo? (not when the user chose a layer by hand)"""
        layer = combo.layer()
        return layer is None or (not self._user_picked.get(id(combo)) and layer_role(layer) != role)

    def _autopick(self, force: bool) -> None:
        field = self.field_combo.layer()
        if force or self._auto(self.field_combo, "field"):
            best = self._best(self.field_combo, ("field",))
            if best is None and field is None:  # else an image of no known role (never a raw phase, a
                # total field, a magnitude or a χ: a local field is picked by hand when not named as one)
                cands = [c for c in self.field_combo.candidates() if layer_role(c) == "image"]
                best = cands[-1] if cands else None
            if best is not None:
                self.field_combo.select(best)
            field = self.field_combo.layer()
        shape = tuple(field.data.shape) if field is not None else None
        mask = self.mask_combo.layer()
        if mask is None or unwrap(mask) is unwrap(field) or (shape is not None and tuple(mask.data.shape) != shape) or (
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
                hits = [c for c in combo.candidates() if map_role(c) == role and shape is not None
                        and tuple(c.data.shape) == shape and same_run(c, field)]
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
        if self.field_combo.layer() is None:
            raise ScanError("field: no local field yet; run the Field dock on raw echoes, open a field map, or "
                            "choose a layer as the field")
        b0 = self.b0_direction()
        if b0 is None:
            raise ScanError("b0_direction: the zero vector has no direction; set the B0 direction")
        noise = self.noise_combo.layer() if self.noise_combo is not None else None
        scan = scan_from_layers(self.field_combo.layer(), self.mask_combo.layer(), self.mag_combo.layer(),
                                units=self.units(), te=self.te_seconds(), b0_tesla=self.b0_tesla(),
                                b0_direction=b0, noise_layer=noise)
        r2 = self.r2star_combo.layer() if self.r2star_combo is not None else None
        if r2 is not None:
            scan.r2star = map_array(r2, "r2star", self.field_combo.layer())
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
                skipped = [lay.name for lay in self.field_combo.candidates() if layer_role(lay) in NOT_LOCAL_FIELD]
                if skipped:
                    hint = (f"<br><span style='color:{DIM_COLOR}'>not picked as the local field: "
                            + ", ".join(f"'{html.escape(n)}' ({NOT_LOCAL_FIELD[layer_role(self.viewer.layers[n])]})"
                                        for n in skipped)
                            + "; compute the local field first (napari-qsm field), or choose one by hand</span>")
            # nothing chosen yet is not an error: a hint in grey until the user has a field to work on
            color, mark = (DIM_COLOR, "") if self.field_combo.layer() is None else (ERR_COLOR, "✗ ")
            self.message.setText(f"<span style='color:{color}'>{mark}{html.escape(str(exc))}</span>{hint}")
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
        field_role = layer_role(field_layer) if field_layer is not None else None
        if field_role in NOT_LOCAL_FIELD:
            text += (f"<br><span style='color:{WARN_COLOR}'>⚠ '{html.escape(self.field_combo.layer().name)}' looks "
                     f"like {NOT_LOCAL_FIELD[field_role]}, not a local field: the inversion expects the background "
                     "field removed</span>")
        for w in wlist:
            text += f"<br><span style='color:{WARN_COLOR}'>⚠ {html.escape(str(w.message))}</span>"
        self.message.setText(text)
        self.changed.emit()
        return scan

