"""What the clinic takes home, from the Compare dock: "Save as DICOM…" and "Report…".

Thin over :mod:`napari_qsm.core.io.dicom` and :mod:`napari_qsm.core.report`: the layer's data goes
back to the canonical voxel frame with its canonical affine (the geometry the NIfTI writer uses),
the work runs in a worker, and the outcome is a notification (path or the reason nothing was written).
"""

from __future__ import annotations

import weakref

from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtWidgets import (QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit,
                            QPushButton)

from ...core.scan import ScanError
from ..kit import notify_error, notify_info
from ..layers import layer_geometry, to_canonical
from ..workers import JobRunner

__all__ = ["ClinicTools", "dicom_job", "report_job", "series_description", "DicomDialog", "reference_note"]

#: roles a DICOM series can be written for: χ, and the Field dock's SWI maps
DICOM_ROLES = ("chi", "swi", "swi_minip", "t2star", "r2star")


def _canonical(layer, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(array in the canonical voxel frame, canonical affine); ScanError when the layer has no geometry."""
    geom = layer_geometry(layer)
    if not geom.known:
        raise ScanError(f"{what}: layer '{layer.name}' has no affine (it was not read from a NIfTI file or made "
                        "by a napari-qsm dock); DICOM and the report need the patient geometry")
    data = layer.data[0] if isinstance(layer.data, (list, tuple)) else layer.data
    return to_canonical(np.asarray(data, np.float32), geom.axes), np.asarray(geom.affine, float)


def reference_note(prov) -> str:
    """The χ reference a result was given (provenance ``extras``: reference, reference_ppm), e.g.
    "ref csf (+0.012 ppm)"; "" when the provenance does not record one."""
    extras = prov.get("extras") if isinstance(prov, dict) and isinstance(prov.get("extras"), dict) else {}
    ref = extras.get("reference")
    if not isinstance(ref, str) or not ref:
        return ""
    value = extras.get("reference_ppm")
    if ref == "none" or not isinstance(value, (int, float)):
        return f"ref {ref}"
    return f"ref {ref} ({round(float(value), 3) + 0.0:+.3f} ppm)"  # + 0.0: no "-0.000"


def series_description(layer) -> str:
    """SeriesDescription from the layer's provenance (:func:`napari_qsm.core.io.dicom.series_description`)."""
    from ...core.io.dicom import series_description as describe
    md = layer.metadata or {}
    return describe(md.get("provenance"), md.get("role") == "chi", layer.name)


def dicom_job(layer, out_dir, like=None):
    """A worker job writing ``layer`` as a DICOM series in ``out_dir`` (χ in ppb, other maps by their units)."""
    vol, aff = _canonical(layer, "Save as DICOM")
    md = layer.metadata or {}
    is_chi = md.get("role") == "chi"
    units = "ppm" if is_chi else str(md.get("units") or "a.u.")
    desc = series_description(layer)

    def job(progress):
        from ...core.io.dicom import write_dicom_series
        return write_dicom_series(vol, aff, out_dir, description=desc, like=like or None, signed_window=is_chi,
                                  units=units)
    return job


def report_job(chi_layer, mask_layer, path, *, field_layer=None, minip_layer=None):
    """A worker job writing the one-page report of ``chi_layer`` to ``path`` (PNG or PDF)."""
    if mask_layer is None:
        raise ScanError("Report: choose a mask in Compare (the report outlines it and averages χ inside it)")
    chi, aff = _canonical(chi_layer, "Report")
    mask = _canonical(mask_layer, "Report mask")[0] > 0.5
    if mask.shape != chi.shape:
        raise ScanError(f"Report: the mask '{mask_layer.name}' is not on the grid of '{chi_layer.name}'")
    field = _canonical(field_layer, "Report field")[0] if field_layer is not None else None
    minip = _canonical(minip_layer, "Report minIP")[0] if minip_layer is not None else None
    if field is not None and field.shape != chi.shape:
        raise ScanError(f"Report: the field '{field_layer.name}' is not on the grid of '{chi_layer.name}'")
    if minip is not None and minip.shape != chi.shape:
        minip = None  # another scan's minIP: left out rather than shown beside the wrong χ
    geom = layer_geometry(chi_layer)
    md = chi_layer.metadata or {}
    prov = md.get("provenance") if isinstance(md.get("provenance"), dict) else {}
    params = prov.get("parameters") if isinstance(prov.get("parameters"), dict) else None

    def job(progress):
        from ...core.metrics import field_residual
        from ...core.report import write_report
        residual = None
        if field is not None:
            residual = field_residual(chi, field, mask, geom.voxel_size, geom.b0_direction, device="cpu")
        ref = reference_note(prov)  # else the report's default, as `napari-qsm report` does
        return write_report(path, chi, mask, geom.voxel_size, title=chi_layer.name,
                            method=str(prov.get("method") or md.get("method") or "unknown"), parameters=params,
                            residual_percent=residual, min_ip=minip, **({"reference": ref[4:]} if ref else {}))
    return job


class DicomDialog(QDialog):
    """Output folder (new or empty) and an optional source DICOM folder (--like)."""

    def __init__(self, layer_name: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle(f"Save '{layer_name}' as DICOM")
        form = QFormLayout(self)
        self.out_edit, self.like_edit = QLineEdit(), QLineEdit()
        self.out_edit.setPlaceholderText("a new or empty folder")
        self.like_edit.setPlaceholderText("optional: the DICOM series the map was made from")
        self.like_edit.setToolTip("Patient, study and frame of reference are copied from it, and its grid must be "
                                  "the map's; empty: fresh UIDs and no patient identity")
        for label, edit in (("Output folder", self.out_edit), ("Source DICOM", self.like_edit)):
            row = QHBoxLayout()
            row.addWidget(edit, 1)
            b = QPushButton("Browse…")
            b.clicked.connect(lambda _=False, e=edit: self._browse(e))
            row.addWidget(b)
            form.addRow(label, row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self, edit: QLineEdit) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a folder", edit.text())
        if folder:
            edit.setText(folder)


class ClinicTools:
    """The Compare dock's "Save as DICOM…" and "Report…" buttons and their worker."""

    def __init__(self, dock, row: QHBoxLayout):
        self.dock = dock
        self.runner = JobRunner(dock.viewer)
        self.dicom_button = QPushButton("Save as DICOM…")
        self.dicom_button.setObjectName("dicom_button")
        self.dicom_button.setToolTip("Write the selected χ layer (or an SWI / minIP / T2* layer) as a DICOM MR "
                                     "series a PACS displays: χ in ppb, windowed, marked DERIVED")
        self.report_button = QPushButton("Report…")
        self.report_button.setObjectName("report_button")
        self.report_button.setToolTip("One page (PNG or PDF) for the selected χ: orthogonal slices, the mask "
                                      "outline, the SWI minIP when there is one, method, parameters and the "
                                      "field residual when the field is chosen")
        row.insertWidget(2, self.dicom_button)
        row.insertWidget(3, self.report_button)
        # through a weak reference: a Qt connection to a bound method of a plain Python object is a strong
        # reference Python's gc cannot see, which kept the dock and its viewer alive after napari closed them
        me = weakref.ref(self)
        self.dicom_button.clicked.connect(lambda *_: me() is not None and me()._ask_dicom())
        self.report_button.clicked.connect(lambda *_: me() is not None and me()._ask_report())
        runner = self.runner
        dock.destroyed.connect(lambda *_: runner.cancel(detach=True))

    # -- which layers -------------------------------------------------------------------------
    def _layer(self, name: Optional[str]):
        return self.dock.volumes.layer(name) if name else None

    def target(self, roles=DICOM_ROLES):
        """The viewer's active layer when it is one of ``roles``, else the first χ result chosen in Compare."""
        active = self.dock.viewer.layers.selection.active
        if active is not None and (active.metadata or {}).get("role") in roles and getattr(active, "ndim", 0) == 3:
            return active
        sel = self.dock.selection()
        return self._layer(sel.results[0]) if sel.results else None

    def minip_layer(self, chi_layer):
        """The newest SWI minIP layer on χ's grid, if any."""
        hits = [la for la in self.dock.viewer.layers if (la.metadata or {}).get("role") == "swi_minip"
                and np.shape(la.data) == np.shape(chi_layer.data)]
        return hits[-1] if hits else None

    # -- actions --------------------------------------------------------------------------------
    def _start(self, make_job, what: str, done) -> bool:
        if self.runner.running:
            notify_error(f"{what}: another export is still running")
            return False
        try:
            job = make_job()
        except (ScanError, ValueError) as exc:
            notify_error(str(exc))
            return False
        for b in (self.dicom_button, self.report_button):
            b.setEnabled(False)

        def finished():
            for b in (self.dicom_button, self.report_button):
                b.setEnabled(True)
        self.runner.start(job, description=what, on_result=done, on_error=lambda exc: notify_error(f"{what}: {exc}"),
                          on_finished=finished)
        return True

    def save_dicom(self, out_dir, like=None, layer=None) -> bool:
        """Write ``layer`` (default :meth:`target`) as a DICOM series in ``out_dir``; False when it did not start."""
        layer = layer or self.target()
        if layer is None:
            notify_error("Save as DICOM: select a χ layer (or an SWI / minIP layer) or choose a result in Compare")
            return False
        return self._start(lambda: dicom_job(layer, out_dir, like), "Save as DICOM",
                           lambda files: notify_info(f"DICOM: {len(files)} slices of '{layer.name}' → {out_dir}"))

    def write_report(self, path, layer=None) -> bool:
        """Write the one-page report of ``layer`` (default: the χ :meth:`target`) to ``path``."""
        layer = layer or self.target(("chi",))
        if layer is None:
            notify_error("Report: select a χ layer or choose a result in Compare")
            return False
        sel = self.dock.selection()

        def make():
            return report_job(layer, self._layer(sel.mask), path, field_layer=self._layer(sel.field),
                              minip_layer=self.minip_layer(layer))
        return self._start(make, "Report", lambda p: notify_info(f"Report of '{layer.name}' written: {p}"))

    def _ask_dicom(self) -> None:
        layer = self.target()
        if layer is None:
            notify_error("Save as DICOM: select a χ layer (or an SWI / minIP layer) or choose a result in Compare")
            return
        dlg = DicomDialog(layer.name, self.dock)
        if dlg.exec() and dlg.out_edit.text().strip():
            out = Path(dlg.out_edit.text().strip())
            if out.exists() and any(out.iterdir()):  # a chosen parent folder: a new series folder inside it
                out = out / (layer.name.replace(" ", "_").replace("/", "-") + "_dicom")
            self.save_dicom(out, dlg.like_edit.text().strip() or None, layer)

    def _ask_report(self) -> None:
        layer = self.target(("chi",))
        if layer is None:
            notify_error("Report: select a χ layer or choose a result in Compare")
            return
        path, _ = QFileDialog.getSaveFileName(self.dock, "Save the report", f"{layer.name}_report.png",
                                              "PNG (*.png);;PDF (*.pdf)")
        if path:
            self.write_report(path, layer)
