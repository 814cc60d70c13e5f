"""Painting of the Compare panel (:class:`~.panel.SliceGrid`): titles, plane images, cross-hairs,
orientation letters, row labels, colour bars and a scale bar, all with QPainter."""

from __future__ import annotations

import time

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QFontMetrics, QImage, QPainter, QPen

# (plane, edge) → orientation letter, for the neurological display; radiological swaps R/L.
_LETTERS = {
    "axial": ("L", "R", "A", "P"),      # left, right, top, bottom
    "coronal": ("L", "R", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def wrap_title(text: str, fm: QFontMetrics, width: int, max_lines: int = 2) -> list:
    """Break a column title at spaces (or anywhere, for a long word) into at most ``max_lines`` lines
    of ``width`` pixels; the last line is elided when the title still does not fit."""
    width = max(8, int(width))
    words = text.split(" ")
    lines: list = []
    cur = ""
    for wd in words:
        trial = f"{cur} {wd}" if cur else wd
        if fm.horizontalAdvance(trial) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = wd
    if cur:
        lines.append(cur)
    out: list = []
    for ln in lines:  # a single word wider than the column: break it by characters
        while fm.horizontalAdvance(ln) > width and len(ln) > 1 and len(out) < max_lines - 1:
            n = len(ln)
            while n > 1 and fm.horizontalAdvance(ln[:n]) > width:
                n -= 1
            out.append(ln[:n])
            ln = ln[n:]
        out.append(ln)
    if len(out) > max_lines:
        out = out[:max_lines - 1] + [" ".join(out[max_lines - 1:])]
    out[-1] = fm.elidedText(out[-1], Qt.TextElideMode.ElideRight, width)
    return out or [""]


class PanelPainting:
    """The paint half of :class:`~.panel.SliceGrid` (it reads the grid's layout and rendered images)."""

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt name)
        t0 = time.perf_counter()
        painter = QPainter(self)
        try:
            self._paint(painter)
        finally:
            painter.end()
        self.paint_count += 1
        self.last_paint_ms = (time.perf_counter() - t0) * 1e3

    def _paint(self, qp: QPainter) -> None:
        pal = self.palette()
        bg = pal.color(pal.ColorRole.Window)
        fg = pal.color(pal.ColorRole.WindowText)
        qp.fillRect(self.rect(), bg)
        geo = self._geometry()
        self._layout = geo
        if not geo:
            qp.setPen(fg)
            qp.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter,
                        "Choose result layers (and a reference) to compare")
            return
        qp.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, self.font().pointSizeF() * 0.85))
        bold = QFont(self.font())
        bold.setBold(True)
        self._paint_titles(qp, geo, fg, bold, small)
        self._paint_cells(qp, geo, fg, bold, small)
        self._paint_labels(qp, geo, fg, bold, small)
        self._paint_bars(qp, geo, fg, bold, small)

    def _paint_titles(self, qp: QPainter, geo: dict, fg, bold: QFont, small: QFont) -> None:
        """Column titles and subtitles, "χ" / "Δ" subheads, and what the difference is."""
        rows = geo["rows"]
        fm, sfm = QFontMetrics(bold), QFontMetrics(small)
        # column titles (wrapped over the column's width) and subtitles
        qp.setFont(bold)
        qp.setPen(fg)
        sfm = QFontMetrics(small)
        for ci, col in enumerate(self._columns):
            band = geo["titles"][ci]
            x, cw = band.left(), band.width()
            lines = wrap_title(col.title, fm, int(cw), geo.get("title_lines", self.TITLE_LINES))
            qp.setFont(bold)
            for li, line in enumerate(lines):
                qp.drawText(QRectF(x, 1 + li * fm.height(), cw, fm.height()),
                            Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, line)
            if col.subtitle:
                qp.setFont(small)
                sub = sfm.elidedText(col.subtitle, Qt.TextElideMode.ElideRight, int(cw))
                qp.drawText(QRectF(x, 1 + len(lines) * fm.height(), cw, sfm.height()),
                            Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, sub)
        # "χ" / "Δ" over the two halves of a column (difference beside χ)
        qp.setFont(small)
        for rect, text in geo["subheads"]:
            qp.drawText(rect, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignBottom, text)
        # what the difference is: a separator over the difference rows, or a line under the panel
        if geo["diff_title"] is not None and any(d for _, d in rows):
            rect = geo["diff_title"]
            text = ("Δ: " if geo["arrangement"] == "beside" else "") + self._diff_title
            sfm_ = QFontMetrics(qp.font())
            if sfm_.horizontalAdvance(text) > rect.width():  # too long for the room: without the parenthesis,
                text = text.split(" (")[0]                    # then cut at a word, never inside one
            while sfm_.horizontalAdvance(text) > rect.width() and " " in text.removesuffix(" …"):
                text = text.removesuffix(" …").rsplit(" ", 1)[0].rstrip(" ,;:−-") + " …"
            qp.drawText(rect, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter, text)

    def _paint_cells(self, qp: QPainter, geo: dict, fg, bold: QFont, small: QFont) -> None:
        """The images, their cross-hairs and orientation letters, and notes in empty cells."""
        rows, rects = geo["rows"], geo["rects"]
        # images, cross-hairs and notes
        cross_pen = QPen(QColor(255, 210, 0, 150))
        cross_pen.setWidthF(1.0)
        letter_pen = QPen(QColor(255, 255, 140))
        for (ci, ri), rect in rects.items():
            name, is_diff = rows[ri]
            item = self._images.get((ci, ri))
            if item is not None:
                qp.fillRect(rect, QColor(0, 0, 0))
            if item is None:
                note = self._columns[ci].diff_note if is_diff else ""
                if note:
                    qp.setPen(fg)
                    qp.setFont(small)
                    qp.drawText(rect, Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, note)
                continue
            qp.drawImage(rect, item[0])
            pl = self._planes_cache[(ci, ri)]
            cx, cy = self._mm_to_px(pl, rect, *pl.cross)
            if self._cross:  # (the point can lie outside a zoomed box: then no line there)
                qp.setPen(cross_pen)
                if rect.left() <= cx <= rect.right():
                    qp.drawLine(QPointF(cx, rect.top()), QPointF(cx, rect.bottom()))
                if rect.top() <= cy <= rect.bottom():
                    qp.drawLine(QPointF(rect.left(), cy), QPointF(rect.right(), cy))
            if ci == 0 and rect.width() > 40:
                lt, rt, tp, bt = _LETTERS[name]
                if self._radiological and name != "sagittal":
                    lt, rt = rt, lt
                qp.setPen(letter_pen)
                qp.setFont(small)
                sm = QFontMetrics(small)
                hh = sm.height()
                qp.drawText(QRectF(rect.left() + 2, rect.center().y() - hh / 2, 14, hh), Qt.AlignmentFlag.AlignLeft, lt)
                qp.drawText(QRectF(rect.right() - 16, rect.center().y() - hh / 2, 14, hh), Qt.AlignmentFlag.AlignRight, rt)
                qp.drawText(QRectF(rect.center().x() - 8, rect.top() + 1, 16, hh), Qt.AlignmentFlag.AlignHCenter, tp)
                qp.drawText(QRectF(rect.center().x() - 8, rect.bottom() - hh - 1, 16, hh), Qt.AlignmentFlag.AlignHCenter, bt)

    def _paint_labels(self, qp: QPainter, geo: dict, fg, bold: QFont, small: QFont) -> None:
        """Row labels: plane and slice index (mm)."""
        rows = geo["rows"]
        # row labels: plane and slice index (mm)
        qp.setFont(small)
        qp.setPen(fg)
        ax_name = "ijk"
        for ri, y, h, is_diff in geo["labels"]:
            name = rows[ri][0]
            pl = self._planes_cache.get((0, ri))
            label = ("Δ " if is_diff else "") + name
            if pl is not None:
                label += f"\n{ax_name[pl.normal]} = {pl.index}\n{pl.index * self._vs[pl.normal]:.0f} mm"
            qp.drawText(QRectF(geo["label_x"], y, self.LEFT - 8, h),
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, label)

    def _paint_bars(self, qp: QPainter, geo: dict, fg, bold: QFont, small: QFont) -> None:
        """Colour bars and the scale bar."""
        rects, s = geo["rects"], geo["scale"]
        sfm = QFontMetrics(small)
        # colour bars
        bars = geo["bars"]
        x_bar = geo["bar_x"]
        if geo.get("hbars"):   # bars[...] = (x0, x1, y)
            def draw(qp_, x0, x1, y, *rest):
                self._colorbar(qp_, x0, x1, y, *rest, vertical=False)
        else:                  # bars[...] = (y0, y1), all at x_bar
            def draw(qp_, y0, y1, *rest):
                self._colorbar(qp_, y0, y1, x_bar, *rest, vertical=True)
        if "chi" in bars:
            draw(qp, *bars["chi"], self._chi_lut, *self._chi_lim, self._chi_unit, fg, small)
        if "diff" in bars and self._images and any(k[1] >= len(self._planes) for k in self._images):
            draw(qp, *bars["diff"], self._diff_lut, -self._diff_lim, self._diff_lim, self._diff_unit, fg, small)
        # scale bar (10 mm or 50 mm) under the first column
        r0 = rects.get(geo["scale_cell"])
        if r0 is not None:
            mm = 50 if 50 * s < 0.8 * r0.width() else 10
            if mm * s > 8:
                y = r0.bottom() + 5
                qp.setPen(QPen(fg, 2))
                qp.drawLine(QPointF(r0.left(), y), QPointF(r0.left() + mm * s, y))
                qp.setFont(small)
                qp.drawText(QRectF(r0.left() + mm * s + 4, y - sfm.height() / 2, 60, sfm.height()),
                            Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, f"{mm} mm")

    def _colorbar(self, qp, a0, a1, at, lut, lo, hi, unit, fg, font, *, vertical: bool) -> None:
        """A colour bar 10 px thick from ``a0`` to ``a1`` along its length, ``at`` across it, with three ticks.

        ``vertical``: at x = ``at`` from y = ``a0`` (``hi``) down to ``a1`` (``lo``), values right of it and
        the unit turned along its left side; else at y = ``at`` from x = ``a0`` (``lo``) to ``a1`` (``hi``),
        values under it and the unit over it.
        """
        n = max(10, int(a1 - a0))
        strip = lut[::-1][:, None] if vertical else lut[None, :]   # 256 × 1 or 1 × 256 RGBA
        grad = np.ascontiguousarray(np.repeat(strip, 10, axis=1 if vertical else 0))
        gh, gw = grad.shape[:2]
        img = QImage(grad.data, gw, gh, 4 * gw, QImage.Format.Format_RGBA8888)
        qp.drawImage(QRectF(at, a0, 10, n) if vertical else QRectF(a0, at, n, 10), img)
        qp.setPen(fg)
        qp.setFont(font)
        fm = QFontMetrics(font)
        fmh = fm.height()
        if vertical:
            if fm.horizontalAdvance(unit) > n and "(" in unit:  # a short bar: its unit alone ("ppm"), not cut
                unit = unit[unit.rfind("(") + 1:].rstrip(")")
            qp.save()
            qp.translate(at - 3, a0 + n / 2)
            qp.rotate(-90)
            qp.drawText(QRectF(-n / 2, -fmh, n, fmh), Qt.AlignmentFlag.AlignCenter, unit)
            qp.restore()
        else:  # the unit over the bar's middle, inside the bar's own part of the width
            uw = fm.horizontalAdvance(unit) + 8
            qp.drawText(QRectF(a0 + n / 2 - uw / 2, at - fmh - 1, uw, fmh),
                        Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignBottom, unit)
        ticks = ((0.0, hi if vertical else lo), (0.5, 0.5 * (lo + hi)), (1.0, lo if vertical else hi))
        if not vertical and n < 130:  # three 60 px values would run into each other: the ends only
            ticks = (ticks[0], ticks[2])
        for frac, val in ticks:
            t = a0 + frac * n
            if vertical:
                qp.drawLine(QPointF(at + 10, t), QPointF(at + 13, t))
                qp.drawText(QRectF(at + 15, t - fmh / 2, self.RIGHT - 24, fmh), Qt.AlignmentFlag.AlignLeft,
                            f"{val:+.3g}")
            else:
                qp.drawLine(QPointF(t, at + 10), QPointF(t, at + 13))
                qp.drawText(QRectF(t - 30, at + 14, 60, fmh), Qt.AlignmentFlag.AlignHCenter, f"{val:+.3g}")
