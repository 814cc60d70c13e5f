"""Open a finished ``napari-qsm batch`` in napari: one subject's results side by side in Compare.

:func:`open_derivatives` reads ``ROOT/derivatives/napari-qsm`` (or that folder itself), opens the
χ maps of one scan of the chosen subject (``<prefix>_desc-<method>_Chimap.nii.gz``, one per
method) with its local field, mask and magnitude (the batch's own, or for local-field inputs
the dataset's ``<prefix>_localfield`` / ``_mask`` / ``_magnitude``), and selects them in the
Compare dock: every χ as a result, the mask and the field for the field residual.
:class:`DerivativesWidget` (npe2 widget "Batch results") is the form for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from qtpy.QtWidgets import QWidget

from ..core.io.bids import CHI_SUFFIX as _CHI, DERIVATIVES, chi_method, chi_prefix

__all__ = ["derivatives_folder", "subjects", "scans", "open_derivatives", "DerivativesWidget"]


def derivatives_folder(root) -> Path:
    """The napari-qsm derivatives folder of a BIDS root, or ``root`` when it is that folder."""
    root = Path(root)
    for cand in (root, root / "derivatives" / DERIVATIVES):
        try:
            desc = json.loads((cand / "dataset_description.json").read_text())
        except (OSError, ValueError):
            continue
        if desc.get("DatasetType") == "derivative":
            return cand
    raise ValueError(f"{root}: no napari-qsm derivatives (expected {root / 'derivatives' / DERIVATIVES} with a "
                     "dataset_description.json); run `napari-qsm batch` first")


def subjects(root) -> list[str]:
    """Subjects with at least one χ map."""
    return _subjects(derivatives_folder(root))


def scans(root, subject: str) -> dict[str, list[Path]]:
    """{scan prefix: its χ maps} of one subject (sessions and runs are separate scans)."""
    return _scans(derivatives_folder(root), subject)


def _subjects(deriv: Path) -> list[str]:
    """:func:`subjects` of an already found derivatives folder."""
    return sorted(p.name for p in deriv.glob("sub-*") if p.is_dir() and any(p.rglob("*" + _CHI)))


def _scans(deriv: Path, subject: str) -> dict[str, list[Path]]:
    """:func:`scans` of an already found derivatives folder."""
    d = deriv / subject
    out: dict[str, list[Path]] = {}
    for p in sorted(d.rglob("*" + _CHI)):
        prefix = chi_prefix(p.name)
        out.setdefault(prefix, []).append(p)
    return out


def _inputs_of(chi: Path, prefix: str, deriv: Path) -> dict[str, Path]:
    """local field, mask, magnitude of the scan: the batch's, else the dataset's (local-field inputs)."""
    raw_anat = deriv.parent.parent / chi.parent.relative_to(deriv)
    out = {}
    for key in ("localfield", "mask", "magnitude"):
        for folder in (chi.parent, raw_anat):
            hits = [p for ext in (".nii.gz", ".nii") for p in [folder / f"{prefix}_{key}{ext}"] if p.exists()]
            if hits:
                out[key] = hits[0]
                break
    return out


def _method_of(chi: Path) -> str:
    """The method of a χ map for its layer name: the sidecar's "method", else the file name's
    ``desc-<method>`` entity, else "χ" (no readable sidecar and no entity: the file name)."""
    desc = chi_method(chi.name)
    try:
        side = json.loads(chi.with_name(chi.name[: -len(".nii.gz")] + ".json").read_text())
    except (OSError, ValueError):
        return desc or chi.name
    if not isinstance(side, dict):   # a sidecar that is valid JSON but not an object names nothing
        return desc or chi.name
    return str(side.get("method") or desc or "χ")


def open_derivatives(viewer, root, subject: Optional[str] = None, scan: Optional[str] = None,
                     compare: bool = True) -> dict:
    """Open one scan's batch results in ``viewer`` and select them in Compare; returns the layers by role.

    ``subject`` defaults to the first with results, ``scan`` to that subject's first scan.
    Returns ``{"chi": [layers], "field": layer, "mask": layer, "magnitude": layer, "compare": widget}``.
    """
    deriv = derivatives_folder(root)
    subs = _subjects(deriv)
    if not subs:
        raise ValueError(f"{deriv}: no χ maps (*{_CHI}) yet")
    subject = subject or subs[0]
    if not subject.startswith("sub-"):
        subject = "sub-" + subject
    if subject not in subs:
        raise ValueError(f"subject: {subject} has no results in {deriv} (subjects: {', '.join(subs)})")
    found = _scans(deriv, subject)
    scan = scan or next(iter(found))
    if scan not in found:
        raise ValueError(f"scan: {scan} not found for {subject} (scans: {', '.join(found)})")
    chis = found[scan]
    out: dict = {"chi": []}
    for key, path in _inputs_of(chis[0], scan, deriv).items():
        layers = viewer.open(str(path), plugin="napari-qsm")
        if layers:
            layers[0].name = f"{scan} {key}"
            out[{"localfield": "field"}.get(key, key)] = layers[0]
    for p in chis:
        layers = viewer.open(str(p), plugin="napari-qsm")
        if layers:
            layers[0].name = f"{scan} {_method_of(p)}"
            out["chi"].append(layers[0])
    if compare and out["chi"]:
        _, w = viewer.window.add_plugin_dock_widget("napari-qsm", "Compare")
        w.set_results([lyr.name for lyr in out["chi"]])
        if "mask" in out:
            w.set_mask(out["mask"].name)
        if "field" in out:
            w.set_field(out["field"].name)
        out["compare"] = w
    return out


class DerivativesWidget(QWidget):
    """Dataset folder, subject, scan, and a button that opens them in Compare (npe2 widget "Batch results").

    A widget class, as napari passes the viewer (``napari_viewer``) only to classes; the form is a magicgui
    container whose fields are attributes here (``folder``, ``subject``, ``scan``, ``button``, ``status``).
    """

    def __init__(self, napari_viewer, parent=None):
        from magicgui.widgets import ComboBox, Container, FileEdit, Label, PushButton
        from qtpy.QtWidgets import QVBoxLayout

        super().__init__(parent)
        self.viewer = napari_viewer
        self.folder = FileEdit(mode="d", name="folder", label="Dataset",
                               tooltip="a BIDS root with derivatives/napari-qsm, or that folder")
        self.subject = ComboBox(name="subject", label="Subject", choices=[])
        self.scan = ComboBox(name="scan", label="Scan", choices=[])
        self.button = PushButton(name="button", text="Open in Compare")
        self.status = Label(name="status", value="")
        self.form = Container(widgets=[self.folder, self.subject, self.scan, self.button, self.status])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.form.native)
        lay.addStretch(1)
        self.folder.changed.connect(self._on_folder)
        self.subject.changed.connect(self._on_subject)
        self.button.changed.connect(self._on_open)

    def _on_folder(self, *_) -> None:
        try:
            self.subject.choices = subjects(self.folder.value)
            self.status.value = f"{len(self.subject.choices)} subject(s) with results"
        except ValueError as exc:
            self.subject.choices = []
            self.status.value = str(exc)
        self._on_subject()

    def _on_subject(self, *_) -> None:
        self.scan.choices = list(scans(self.folder.value, self.subject.value)) if self.subject.value else []

    def _on_open(self, *_) -> None:
        try:
            res = open_derivatives(self.viewer, self.folder.value, self.subject.value, self.scan.value or None)
            self.status.value = f"opened {len(res['chi'])} result(s) of {self.scan.value or self.subject.value}"
        except (ValueError, OSError) as exc:
            self.status.value = str(exc)
            from napari.utils.notifications import show_error
            show_error(str(exc))
