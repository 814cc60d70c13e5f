"""Small Qt pieces the Compare tabs share: pages, read-only tables, value-sorted cells, ppm spin boxes,
a flow layout."""

from __future__ import annotations

import math

from qtpy.QtCore import QPoint, QRect, QSize, Qt
from qtpy.QtWidgets import (
    QAbstractItemView, QDoubleSpinBox, QLabel, QLayout, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget,
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


class FlowLayout(QLayout):
    """Widgets left to right, wrapping onto a new line when the width runs out (rows of options that
    take one line in a wide window and several in a narrow dock)."""

    def __init__(self, parent=None, spacing: int = 6) -> None:
        super().__init__(parent)
        self._items: list = []
        self._spacing = spacing
        self.setContentsMargins(0, 0, 0, 0)

    def addItem(self, item) -> None:  # noqa: N802 (Qt name)
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, i):  # noqa: N802
        return self._items[i] if 0 <= i < len(self._items) else None

    def takeAt(self, i):  # noqa: N802
        return self._items.pop(i) if 0 <= i < len(self._items) else None

    def expandingDirections(self):  # noqa: N802
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:  # noqa: N802
        return True

    def heightForWidth(self, width: int) -> int:  # noqa: N802
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect) -> None:  # noqa: N802
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self) -> QSize:  # noqa: N802
        return self.minimumSize()

    def minimumSize(self) -> QSize:  # noqa: N802
        size = QSize()
        for it in self._items:
            size = size.expandedTo(it.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _place(self, rect, move: bool) -> int:
        """Lay the items out in ``rect`` (when ``move``); returns the height used."""
        m = self.contentsMargins()
        x0, y = rect.x() + m.left(), rect.y() + m.top()
        right = rect.right() - m.right()
        x, line_h = x0, 0
        for it in self._items:
            if it.widget() is not None and it.widget().isHidden():
                continue
            hint = it.sizeHint()
            if x > x0 and x + hint.width() > right + 1:
                x, y = x0, y + line_h + self._spacing
                line_h = 0
            if move:
                it.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._spacing
            line_h = max(line_h, hint.height())
        return y + line_h - rect.y() + m.bottom()
