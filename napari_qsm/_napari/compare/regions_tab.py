"""The Compare dock's "Regions" tab: mean χ per label of a Labels layer for the reference and every
result, and each result's linear fit against the reference (slope, intercept, R²)."""

from __future__ import annotations

from typing import Optional

from qtpy.QtGui import QGuiApplication
from qtpy.QtWidgets import QHBoxLayout, QPushButton, QTableWidgetItem, QWidget

from ...core import compare as core
from .qt import NumItem, page, readonly_table, start_filling, text_item, wrapped_label


class RegionsTab(QWidget):
    """Region table, fit table and *Copy*."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        #: the region statistics shown (None: no Labels layer chosen, or not computed yet)
        self.regions: Optional[core.RegionStats] = None
        _, rv = page(self)
        self.region_label = wrapped_label(
            "Choose a Labels layer to get the mean χ per region and the fit against the reference.")
        rv.addWidget(self.region_label)
        self.region_table = readonly_table(sortable=True)
        rv.addWidget(self.region_table, 1)
        self.fit_table = readonly_table()
        self.fit_table.setMaximumHeight(150)
        rv.addWidget(self.fit_table)
        rrow = QHBoxLayout()
        self.region_copy_button = QPushButton("Copy")
        rrow.addWidget(self.region_copy_button)
        rrow.addStretch(1)
        rv.addLayout(rrow)
        self.region_copy_button.clicked.connect(self.copy_regions)

    def fill(self, st: Optional[core.RegionStats]) -> None:
        t = self.region_table
        if st is None:
            start_filling(t)
            start_filling(self.fit_table)
            return
        cols = (["reference"] if st.reference is not None else []) + list(st.means)
        start_filling(t, len(st.labels), 3 + len(cols))
        self.fit_table.clear()
        t.setHorizontalHeaderLabels(["Label", "Region", "Voxels"] + [f"{c} (ppm)" for c in cols])
        for ri, (lab, nm) in enumerate(zip(st.labels, st.names)):
            t.setItem(ri, 0, NumItem(lab, str(lab)))
            t.setItem(ri, 1, text_item(nm))
            t.setItem(ri, 2, NumItem(st.counts[ri], str(int(st.counts[ri]))))
            vals = ([st.reference[ri]] if st.reference is not None else []) + [st.means[c][ri] for c in st.means]
            for ci, v in enumerate(vals):
                t.setItem(ri, 3 + ci, NumItem(v, f"{v:+.4f}"))
        t.setSortingEnabled(True)
        t.resizeColumnsToContents()
        if st.fits:
            self._fill_fits(st.fits)
            self.region_label.setText("Mean χ per region; fit: result mean = slope · reference mean + intercept.")
        else:
            self.region_label.setText("Mean χ per region (no reference: no fit).")

    def _fill_fits(self, fits: dict) -> None:
        f = self.fit_table
        f.setColumnCount(5)
        f.setRowCount(len(fits))
        f.setHorizontalHeaderLabels(["Result", "Slope", "Intercept (ppm)", "R²", "Regions"])
        for ri, (name, fit) in enumerate(fits.items()):
            f.setItem(ri, 0, QTableWidgetItem(name))
            f.setItem(ri, 1, NumItem(fit.slope, f"{fit.slope:.3f}"))
            f.setItem(ri, 2, NumItem(fit.intercept, f"{fit.intercept:+.4f}"))
            f.setItem(ri, 3, NumItem(fit.r2, f"{fit.r2:.3f}"))
            f.setItem(ri, 4, NumItem(fit.n, str(fit.n)))
        f.resizeColumnsToContents()

    def copy_regions(self) -> str:
        text = self.regions.to_text() if self.regions is not None else ""
        QGuiApplication.clipboard().setText(text)
        return text
