"""The Compare dock's "Slices" tab: the shared χ / difference contrast, the plane and display
options, the orthogonal-slices panel (:class:`~.panel.SliceGrid`) and the hover read-out."""

from __future__ import annotations

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QPushButton, QWidget

from ...core import compare as core
from .panel import SliceGrid
from .qt import FlowLayout, page, ppm_spin


class SlicesTab(QWidget):
    """Contrast and options rows over the slices panel; the panel follows them."""

    #: layout combo text → the panel's arrangement of the difference maps
    LAYOUTS = {"Δ where it fits": "auto", "Δ below χ": "below", "Δ beside χ": "beside"}

    #: the χ window or the difference limit changed (the panel already shows it)
    contrastChanged = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        _, sv = page(self)
        self.chi_min = ppm_spin(-0.15, "χ window minimum (ppm), shared by all χ panels")
        self.chi_max = ppm_spin(0.25, "χ window maximum (ppm), shared by all χ panels")
        self.diff_lim = ppm_spin(0.1, "difference window ±limit (ppm), shared by all difference panels", lo=1e-4)
        self.auto_button = QPushButton("Auto")
        self.auto_button.setToolTip("Contrast from the reference (or first result): 1st–99th percentile in the mask.")
        self.planes_combo = QComboBox()
        self.planes_combo.addItems(["axial + coronal + sagittal", "axial", "coronal", "sagittal"])
        self.layout_combo = QComboBox()
        self.layout_combo.addItems(list(self.LAYOUTS))
        self.layout_combo.setToolTip("Where the difference maps go: under the χ planes, beside them (χ | Δ in each "
                                     "result's column), or whichever draws the slices larger in this window.")
        self.zoom_check = QCheckBox("Zoom to mask")
        self.zoom_check.setChecked(True)
        self.zoom_check.setToolTip("Show only the mask's bounding box (a few mm around the brain), so the brain "
                                   "fills the slices.")
        self.demean_check = QCheckBox("Demean Δ")
        self.demean_check.setChecked(True)
        self.demean_check.setToolTip("Remove each difference map's mean inside the mask (χ is defined up to a constant).")
        self.follow_check = QCheckBox("Follow mouse")
        self.follow_check.setToolTip("Slices follow the mouse over the napari canvas (else the current slice).")
        self.radio_check = QCheckBox("Radiological")
        self.radio_check.setToolTip("Show the patient's right on the left in axial and coronal planes.")
        self.cross_check = QCheckBox("Cross-hairs")
        self.cross_check.setChecked(True)
        self.cross_check.setToolTip("Draw the lines through the current point on every slice.")

        def group(*widgets):
            box = QWidget()
            lay = QHBoxLayout(box)
            lay.setContentsMargins(0, 0, 0, 0)
            for w in widgets:
                lay.addWidget(w)
            return box

        # one line of options in a wide (large) window, wrapped onto several in a narrow dock
        self.options = QWidget()
        flow = FlowLayout(self.options)
        for w in (group(QLabel("χ (ppm)"), self.chi_min, QLabel("…"), self.chi_max),
                  group(QLabel("Δ ±"), self.diff_lim, self.auto_button),
                  self.planes_combo, self.layout_combo, self.zoom_check, self.demean_check, self.follow_check,
                  self.radio_check, self.cross_check):
            flow.addWidget(w)
        sv.addWidget(self.options)
        self.panel = SliceGrid()
        self.panel.setMinimumHeight(300)
        sv.addWidget(self.panel, 1)
        self.hover_label = QLabel(" ")
        self.hover_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        sv.addWidget(self.hover_label)

        for sp in (self.chi_min, self.chi_max, self.diff_lim):
            sp.valueChanged.connect(self._contrast_changed)
        self.planes_combo.currentIndexChanged.connect(self._planes_changed)
        self.radio_check.toggled.connect(self.panel.set_radiological)
        self.cross_check.toggled.connect(self.panel.set_crosshairs)
        self.layout_combo.currentTextChanged.connect(lambda t: self.panel.set_arrangement(self.LAYOUTS[t]))
        self.panel.hovered.connect(lambda s: self.hover_label.setText(s or " "))

    def chi_window(self) -> tuple[float, float]:
        return self.chi_min.value(), self.chi_max.value()

    def set_window(self, lo: float, hi: float, dl: float) -> None:
        """Set the χ window and the difference limit at once (one update of the panel)."""
        for sp, v in ((self.chi_min, lo), (self.chi_max, hi), (self.diff_lim, dl)):
            sp.blockSignals(True)
            sp.setValue(float(v))
            sp.blockSignals(False)
        self._contrast_changed()

    def _contrast_changed(self, *args) -> None:
        lo, hi = self.chi_window()
        if hi <= lo:
            hi = lo + 1e-3
        self.panel.set_chi_limits(lo, hi)
        self.panel.set_diff_limit(self.diff_lim.value())
        self.contrastChanged.emit()

    def _planes_changed(self, idx: int) -> None:
        txt = self.planes_combo.currentText()
        self.panel.set_planes(core.PLANES if "+" in txt else (txt,))
