"""Small Qt pieces the Compare tabs share: pages, read-only tables, value-sorted cells, ppm spin boxes."""

from __future__ import annotations

import math

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView, QDoubleSpinBox, QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
)


class NumItem(QTableWidgetItem):
    """A read-only, right-aligned table cell that sorts by value (NaN last)."""

    def __init__(self, value: float, text: str) -> None:
        super().__init__(text)
        self.value = float(value) if value is not None else float("nan")
        self.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other) -> bool:  # NaN sorts last
        a = self.value
        b = getattr(other, "value", float("nan"))
        if math.isnan(a):
            return False
        if math.isnan(b):
            return True
        return a < b


def text_item(text: str) -> QTableWidgetItem:
    """A read-only text cell."""
    it = QTableWidgetItem(text)
    it.setFlags(it.flags() & ~Qt.ItemFlag.ItemIsEditable)
    return it


def page(parent=None) -> tuple[QWidget, QVBoxLayout]:
    """A plain page (tab or sub-panel) with a margin-less vertical layout; ``parent``: the widget
    to lay out instead of a new one."""
    w = parent if parent is not None else QWidget()
    lay = QVBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    return w, lay


def wrapped_label(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    return lab


def readonly_table(sortable: bool = False) -> QTableWidget:
    """An empty read-only table without row numbers (sortable by clicking a header if asked)."""
    t = QTableWidget(0, 0)
    if sortable:
        t.setSortingEnabled(True)
    t.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    t.verticalHeader().setVisible(False)
    return t


def start_filling(t: QTableWidget, n_rows: int = 0, n_cols: int = 0) -> None:
    """Unsort and empty ``t`` and give it ``n_rows`` × ``n_cols`` cells (sorting stays off while filling)."""
    t.setSortingEnabled(False)
    t.clear()
    t.setRowCount(n_rows)
    t.setColumnCount(n_cols)


def ppm_spin(value, tip, lo=-10.0) -> QDoubleSpinBox:
    """A ppm spin box from ``lo`` to 10 (3 decimals, steps of 0.01, no keyboard tracking)."""
    sp = QDoubleSpinBox()
    sp.setDecimals(3)
    sp.setRange(lo, 10.0)
    sp.setSingleStep(0.01)
    sp.setValue(value)
    # the unit is in the row's label ("χ (ppm)"): a suffix got cut off in a narrow dock
    sp.setMinimumWidth(sp.fontMetrics().horizontalAdvance("-10.000") + 56)  # room for napari's +/- buttons
    sp.setToolTip(tip)
    sp.setKeyboardTracking(False)
    return sp
