"""The "Field" dock: raw multi-echo GRE (magnitude and phase layers) → local field, in napari.

Thin over the headless front end (:mod:`napari_qsm.core.field`):

* **Echoes**: a magnitude and a phase source (:mod:`napari_qsm._napari.field_sources`): 4-D image
  layers or the per-echo layers of one file; echo times, field strength and phase units from the
  layers' metadata (BIDS sidecars), editable. "Open folder…" reads a BIDS or DICOM folder in a worker.
* **Steps**: one drop-down per step family, filled from the registry, each with the form of its
  parameter record. A mask layer, when chosen, replaces the brain-mask step (a user mask always
  wins); the run's brain mask can be corrected by hand (:mod:`napari_qsm._napari.field_mask`).
* **Run** in a worker (the dock base :class:`~napari_qsm._napari.run_dock.RunDock`). The maps become
  3-D layers on the echoes' grid, and the local field, eroded mask and magnitude are chosen in the
  Reconstruct, Adapt and Compare docks (:meth:`FieldWidget.hand_off`).
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit,
                            QPushButton)

from ..core.field.pipeline import FieldRecipe
from ..core.field.records import Echoes
from ..core.field.steps import FAMILIES
from ..core.params import ParamError
from ..core.scan import ScanError
from ..methods import available_steps, get_step
from ..pipeline import field_from_echoes
from .docks import call_later, raise_dock
from .field_mask import NO_MASK, MaskTools
from .field_swi import SWISection, swi_layer_data
from .field_words import FAMILY_TITLES, PHASE_UNITS, relabel_step_form, short_doc
from .field_sources import (EchoSource, echo_sources, echoes_from_sources, field_layer_data, make_echo_first,
                            source_echo_times, source_geometry)
from .form import ParamForm
from .kit import (DIM_COLOR, OK_COLOR, WARN_COLOR, device_combo, field_strength_spin, hook_events, section, unwrap,
                  viewer_docks, wrap_label)
from .layer_roles import layer_role
from .layers import Geometry, acquisition_from_metadata, check_axes
from .workers import JobRunner
from .run_dock import RunDock

# ---------------------------------------------------------------------------------------------- the dock

class FieldWidget(MaskTools, RunDock):
    """Dock widget "Field": raw echoes → total field, brain mask, local field, R2*, N_std (see module doc)."""

    qsm_dock_order = 0.5  # tabs: QSM reconstruction, Field, Adapt network, Compare (`napari-qsm view` shows the first)
    qsm_dock_title = "Field"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.loader = JobRunner(napari_viewer)
        self.last_run = None
        self.output_layers: dict = {}
        self._sources: list = []
        self._forms: dict = {}
        self._form_values: dict = {}
        self._current: dict = {}
        self._acq_from = {"te": "", "b0": ""}
        self._fronted = False

        self._build_echoes(self.body)
        self._build_steps(self.body)
        self._build_parameters(self.body)
        self.swi = SWISection(self.body)
        self.body.addStretch(1)
        self.add_footer()
        self._connect()
        self.refresh_sources()
        self._fit_width()

    # -- building -------------------------------------------------------------------------------
    def _build_echoes(self, body) -> None:
        """The "Echoes" section: magnitude and phase sources, echo times, field strength, phase units."""
        box, lay = section("Echoes")
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
        self.b0_spin = field_strength_spin(
            3.0, "<qt>Field strength in tesla: ImagingFrequency / 42.577 MHz/T when the sidecar has "
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
        self.echo_info = wrap_label("", DIM_COLOR, small=True)
        self.echo_info.setObjectName("echo_info")
        lay.addWidget(self.echo_info)
        body.addWidget(box)

    def _build_steps(self, body) -> None:
        """The "Steps" section: one drop-down per step family (all visible together), the mask layer and its
        tools, the device and the hand-off switch."""
        box, lay = section("Steps")
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
                self.mask_tools = self._mask_tools_widget()
                sform.addRow("", self.mask_tools)
        self.device_combo = device_combo()
        sform.addRow("Device", self.device_combo)
        lay.addLayout(sform)
        self.handoff_check = QCheckBox("Use the local field in the other docks")
        self.handoff_check.setChecked(True)
        self.handoff_check.setToolTip("After a run, choose the new local field, eroded mask and magnitude in the "
                                      "Reconstruct, Adapt and Compare docks")
        lay.addWidget(self.handoff_check)
        body.addWidget(box)

    def _build_parameters(self, body) -> None:
        """One parameter section per step family, and the Defaults button."""
        self.step_docs: dict = {}
        self.step_boxes: dict = {}
        for fam in FAMILIES:
            box, lay = section(f"{FAMILY_TITLES[fam]}: parameters")
            doc = wrap_label("", DIM_COLOR, small=True)
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

    def _connect(self) -> None:
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
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(50)
        self._refresh_timer.timeout.connect(self.refresh_sources)
        ev = self.viewer.layers.events
        hook_events(self, [(ev.inserted, self._schedule_refresh), (ev.removed, self._schedule_refresh)])
        loader = self.loader
        self.destroyed.connect(lambda *_: loader.cancel(detach=True))

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
                hits = [i for i, s in enumerate(sources) if layer_role(s.layer) == role]
                combo.setCurrentIndex(hits[-1] if hits else (-1 if not sources else 0))
            combo.blockSignals(False)
        self._refresh_masks()
        self._on_mag_changed()
        if self.wants_front() and not self._fronted:  # raw echoes came in, nothing computed yet: this dock first
            self._fronted = True
            call_later(self, 0, lambda: raise_dock(self))   # the dock's child: dropped if the dock goes first

    def _schedule_refresh(self, *_) -> None:
        self._refresh_timer.start()

    def wants_front(self) -> bool:
        """Raw echoes are open and no local field yet: the Field dock is where to start."""
        try:
            return bool(self._sources) and not any(layer_role(la) == "field" for la in self.viewer.layers)
        except RuntimeError:  # the viewer is closing
            return False

    def _refresh_masks(self) -> None:
        from napari.layers import Labels

        current = self.mask_combo.currentText()
        eroded = self.output_layers.get("mask")
        names = [NO_MASK] + [la.name for la in self.viewer.layers
                             if isinstance(la, Labels) and la.ndim == 3 and unwrap(la) is not unwrap(eroded)]
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
        g = source_geometry(mag)
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
        relabel_step_form(f)
        doc = html.escape(short_doc(s.doc))
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
        axes = check_axes((layer.metadata or {}).get("axes", source_geometry(self.magnitude_source()).axes))
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
            swi_params = self.swi.params()
        except (ScanError, ParamError, ValueError, TypeError) as exc:
            self._fail(str(exc))
            return False
        mag_src = self.magnitude_source()
        device = self.device_combo.currentData()
        runner = self.runner

        axes = source_geometry(mag_src).axes
        md_src = mag_src.metadata

        def job(progress):
            run = field_from_echoes(echoes, recipe, mask=user_mask, device=device, progress=progress,
                                    cancel=runner.token)
            # the layers' arrays and display windows (percentiles) are made here, not on the event loop
            geom = Geometry(axes=axes, voxel_size=np.asarray(run.scan.voxel_size, float),
                            b0_direction=np.asarray(run.scan.b0_direction, float),
                            affine=np.asarray(run.scan.affine, float))
            data = field_layer_data(run, geom, run.scan.name or "echoes", md_src)
            if swi_params is not None:  # SWI, minIP and T2* beside the fit's R2*, on the same grid
                base = {k: v for k, v in data["r2star"][1]["metadata"].items() if k not in ("role", "units")}
                data.update(swi_layer_data(run, echoes.magnitude, geom, run.scan.name or "echoes", base, swi_params))
            return run, data

        self.start(job, "Raw echoes → local field", f"{html.escape(FAMILY_TITLES['fit'])}…",
                   on_result=lambda out: self._on_result(*out, mag_src))
        return True

    def running_widgets(self) -> list:
        return [self.mag_combo, self.phase_combo, self.te_edit, self.b0_spin, self.units_combo, self.sign_check,
                self.mask_combo, self.device_combo, self.folder_button, self.reset_button, self.mask_tools,
                self.swi.box,
                *self.step_combos.values(), *self._forms.values()]

    def _set_running(self, running: bool) -> None:
        super()._set_running(running)
        if not running:
            self._on_mask_changed()

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
        self._mask_run_done(self.output_layers.get("brain_mask"))
        local = self.output_layers["local_field"]
        self.viewer.layers.selection.active = local
        if self.handoff_check.isChecked():
            self.hand_off()
        steps = ", ".join(f"{html.escape(FAMILY_TITLES.get(s['family'], s['family']).lower())} {s['seconds']:.1f} s"
                          for s in run.steps)
        self.status.setText(f"<span style='color:{OK_COLOR}'>✓</span> <b>{html.escape(local.name)}</b> (ppm) in "
                            f"{run.provenance.get('seconds', 0):.1f} s: {steps}"
                            + ("; SWI, minIP and T2* (ms) made" if "swi" in layer_data else ""))
        self.status.setToolTip("; ".join(f"{FAMILY_TITLES.get(s['family'], s['family'])}: {s['label']}, "
                                         f"{s['seconds']:.2f} s" for s in run.steps))

    def hand_off(self) -> list:
        """Choose the new local field, eroded mask and magnitude in the other docks; returns the docks changed.

        The docks are found by the viewer they work on (:func:`~napari_qsm._napari.kit.viewer_docks`): napari
        gives each dock its own proxy of the viewer, so the handles differ while the viewer is the same.
        """
        from .compare.dock import CompareWidget
        from .inputs_panel import InputsPanel

        local = self.output_layers.get("local_field")
        mask = self.output_layers.get("mask")
        mag = self.output_layers.get("magnitude")
        if local is None or local not in self.viewer.layers:
            return []
        changed = []
        for panel in viewer_docks(self.viewer, InputsPanel):
            for combo, layer in ((panel.field_combo, local), (panel.mask_combo, mask), (panel.mag_combo, mag)):
                if layer is not None:
                    combo.refresh()
                    combo.select(layer)
            changed.append(panel)
        for cmp_ in viewer_docks(self.viewer, CompareWidget):
            cmp_.set_field(local.name)
            if mask is not None:
                cmp_.set_mask(mask.name)
            changed.append(cmp_)
        return changed

