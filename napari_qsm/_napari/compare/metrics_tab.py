"""The Compare dock's "Metrics" tab: a sortable metric table (best value per column highlighted),
a bar chart of one metric, *Copy* / *Export CSV…* and *Recompute*."""

from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor, QFont, QGuiApplication
from qtpy.QtWidgets import QComboBox, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QPushButton, QSplitter, QWidget

from ...core import compare as core
from .qt import NumItem, page, readonly_table, start_filling, text_item, wrapped_label


def _label(key: str) -> str:
    lab, unit = core.metric_info(key)[:2]
    return f"{lab} ({unit})" if unit else lab


def _header(key: str) -> str:
    """Column header: the metric's name over its unit (two short lines instead of one wide one)."""
    lab, unit = core.metric_info(key)[:2]
    return f"{lab}\n({unit})" if unit else lab


class MetricsTab(QWidget):
    """Status line, metric table, bar chart and the copy / export / recompute buttons."""

    def __init__(self, warn, parent=None) -> None:
        super().__init__(parent)
        self._warn = warn
        #: the finished table of the last computation (None while computing or without results)
        self.table: Optional[core.CompareTable] = None
        self._shown: Optional[core.CompareTable] = None  # what the table widget shows (maybe partial)
        _, mv = page(self)
        self.status_label = wrapped_label("")
        mv.addWidget(self.status_label)
        self.metric_table = readonly_table(sortable=True)
        # metric columns share the width (headers wrap onto two lines): no horizontal scrolling
        hdr = self.metric_table.horizontalHeader()
        hdr.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        hdr.setMinimumSectionSize(36)
        hdr.setDefaultAlignment(Qt.AlignmentFlag.AlignCenter)
        self.metric_table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.metric_table.setWordWrap(True)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(self.metric_table)
        chart, cv = page()
        crow = QHBoxLayout()
        crow.addWidget(QLabel("Bar chart"))
        self.chart_combo = QComboBox()
        crow.addWidget(self.chart_combo, 1)
        cv.addLayout(crow)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.chart_fig = Figure(figsize=(4, 2.4), dpi=90, layout="constrained")
        self.chart_canvas = FigureCanvasQTAgg(self.chart_fig)
        self.chart_canvas.setMinimumHeight(180)
        cv.addWidget(self.chart_canvas, 1)
        splitter.addWidget(chart)
        mv.addWidget(splitter, 1)
        brow = QHBoxLayout()
        self.copy_button = QPushButton("Copy")
        self.copy_button.setToolTip("Copy the table (tab-separated, with units) to the clipboard.")
        self.export_button = QPushButton("Export CSV…")
        self.recompute_button = QPushButton("Recompute")
        brow.addWidget(self.copy_button)
        brow.addWidget(self.export_button)
        brow.addStretch(1)
        brow.addWidget(self.recompute_button)
        mv.addLayout(brow)
        self.copy_button.clicked.connect(self.copy_table)
        self.export_button.clicked.connect(self._export_dialog)
        self.chart_combo.currentIndexChanged.connect(self._draw_chart)

    def set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def computing(self) -> None:
        """A new computation started: nothing to chart until its first row arrives."""
        self._shown = None

    # ------------------------------------------------------------------ table
    def fill(self, table: Optional[core.CompareTable]) -> None:
        """Show ``table`` (partial while computing; None or empty: an empty table)."""
        t = self.metric_table
        if table is None or not table.rows:
            start_filling(t)
            self._shown = None
            self._update_chart_choices([])
            return
        self._shown = table
        cols = table.columns
        start_filling(t, len(table.rows), len(cols) + 1)
        t.setHorizontalHeaderLabels(["Result"] + [_header(c) for c in cols])
        t.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        for ci, c in enumerate(cols):
            hib, doc = core.metric_info(c)[2:]
            t.horizontalHeaderItem(ci + 1).setToolTip(f"{doc} — {'higher' if hib else 'lower'} is better")
        best = core.best_per_column(table)
        bold = QFont(t.font())
        bold.setBold(True)
        good = QBrush(QColor(60, 140, 70, 150))
        for ri, row in enumerate(table.rows):
            t.setItem(ri, 0, text_item(row.name))
            for ci, c in enumerate(cols):
                v = row.get(c)
                cell = NumItem(v, core.format_metric(c, v))
                if best.get(c) == row.name:
                    cell.setFont(bold)
                    cell.setBackground(good)
                    cell.setToolTip("best in this column")
                t.setItem(ri, ci + 1, cell)
        t.setSortingEnabled(True)
        self._update_chart_choices(cols)

    # ------------------------------------------------------------------ chart
    def _update_chart_choices(self, cols) -> None:
        cur = self.chart_combo.currentData()
        self.chart_combo.blockSignals(True)
        self.chart_combo.clear()
        for c in cols:
            self.chart_combo.addItem(_label(c), c)
        if cur in cols:
            self.chart_combo.setCurrentIndex(list(cols).index(cur))
        elif "nrmse_demeaned" in cols:
            self.chart_combo.setCurrentIndex(list(cols).index("nrmse_demeaned"))
        self.chart_combo.blockSignals(False)
        self._draw_chart()

    def _draw_chart(self, *args) -> None:
        fig = self.chart_fig
        fig.clear()
        key = self.chart_combo.currentData()
        table = self.table if self.table is not None else self._shown
        if key is None or table is None or not table.rows:
            self.chart_canvas.draw_idle()
            return
        pal = self.palette()
        bg = pal.color(pal.ColorRole.Window).name()
        fg = pal.color(pal.ColorRole.WindowText).name()
        fig.set_facecolor(bg)
        ax = fig.add_subplot(111)
        ax.set_facecolor(bg)
        for sp in ax.spines.values():
            sp.set_color(fg)
        ax.tick_params(colors=fg)
        vals = table.column(key)
        names = table.names
        hib = core.metric_info(key)[2]
        best = core.best_per_column(table).get(key)
        colors = ["#3c8c46" if n == best else "#6a7fa8" for n in names]
        y = np.arange(len(names))
        ax.barh(y, np.nan_to_num(vals), color=colors)
        ax.set_yticks(y, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(_label(key), fontsize=8, color=fg)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(("higher" if hib else "lower") + " is better", fontsize=8, color=fg)
        for yi, v in zip(y, vals):
            if np.isfinite(v):
                ax.text(v, yi, " " + core.format_metric(key, v), va="center", fontsize=7, color=fg)
        ax.margins(x=0.2)
        self.chart_canvas.draw_idle()

    # ------------------------------------------------------------------ copy, export
    def copy_table(self) -> str:
        text = core.to_text(self.table) if self.table else ""
        QGuiApplication.clipboard().setText(text)
        return text

    def export_csv(self, path) -> None:
        if self.table is None:
            raise ValueError("Compare: no metrics to export yet")
        core.to_csv(self.table, path)

    def _export_dialog(self) -> None:
        if self.table is None:
            self._warn("Compare: no metrics to export yet")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", "compare_metrics.csv", "CSV (*.csv)")
        if path:
            try:
                self.export_csv(path)
            except Exception as exc:
                self._warn(f"Compare: could not write {path}: {exc}")
