"""Where the slice panel draws: the pixel layout of its cells, titles, labels and colour bars.

:class:`PanelLayout` is a mixin of :class:`~napari_qsm._napari.compare.panel.SliceGrid` (it reads the
panel's columns, shape, voxel size, box and margins); "below" stacks the difference planes under
the χ planes, "beside" splits each result's column into χ | Δ.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRectF


class PanelLayout:
    """The layouts of the slice panel (see module doc)."""

    def _extents(self) -> dict:
        n = np.asarray(self._shape) if self._box is None else np.subtract(self._box[1], self._box[0])
        shp = n * self._vs  # extent in mm per axis
        return {"axial": (shp[0], shp[1]), "coronal": (shp[0], shp[2]), "sagittal": (shp[1], shp[2])}

    def _layout_below(self, rows) -> dict:
        """Columns = volumes; rows = χ planes, then (after a separator) the difference planes."""
        n = len(self._columns)
        wh = self._extents()
        W, H = self.width(), self.height()
        L, R, B, G, S = self.LEFT, self.RIGHT + self._unit_room(), self.BOTTOM, self.GAP, self.SEP
        n_diff = sum(1 for _, d in rows if d)
        cw = max(10.0, (W - L - R - G * (n - 1)) / n)
        nlines = self._title_lines([cw] * n)
        T = max(self.TOP, self._top(nlines))
        max_w = max(wh[p][0] for p, _ in rows)
        sum_h = sum(wh[p][1] for p, _ in rows)
        avail_h = H - T - B - G * (len(rows) - 1) - (S if n_diff else 0)
        s = max(1e-3, min(cw / max_w, max(10.0, avail_h) / sum_h))
        rects = {}
        row_y = []
        y = T
        sep = None
        for ri, (p, d) in enumerate(rows):
            if d and (ri == 0 or not rows[ri - 1][1]):
                sep = QRectF(L, y, W - L - R, S)
                y += S
            w_mm, h_mm = wh[p]
            row_y.append((y, h_mm * s))
            for ci in range(n):
                x0 = L + ci * (cw + G) + (cw - w_mm * s) / 2.0
                rects[(ci, ri)] = QRectF(x0, y, w_mm * s, h_mm * s)
            y += h_mm * s + G
        titles = [QRectF(L + ci * (cw + G), 1, cw, T) for ci in range(n)]
        chi_r = [row_y[ri] for ri, (_, d) in enumerate(rows) if not d]
        diff_r = [row_y[ri] for ri, (_, d) in enumerate(rows) if d]
        bars = {"chi": (chi_r[0][0], chi_r[-1][0] + chi_r[-1][1])}
        if diff_r:
            bars["diff"] = (diff_r[0][0], diff_r[-1][0] + diff_r[-1][1])
        labels = [(ri, y0, h, d) for ri, ((_, d), (y0, h)) in enumerate(zip(rows, row_y))]
        return {"arrangement": "below", "title_lines": nlines, "scale": s, "rects": rects, "rows": rows, "row_y": row_y, "cw": cw,
                "bottom": y, "titles": titles, "subheads": [], "diff_title": sep, "bars": bars,
                "labels": labels, "label_x": 2.0, "bar_x": W - R + 8 + self._unit_room(), "scale_cell": (0, len(rows) - 1)}

    def _layout_beside(self, rows, hbars: bool = False) -> dict:
        """Columns = volumes, each result's column split into χ | Δ; rows = planes. ``hbars``: the colour
        bars lie under the cells (more width for the cells) instead of right of them."""
        n = len(self._columns)
        wh = self._extents()
        W, H = self.width(), self.height()
        sub_h = self._small_height() + 2
        L, R, G = self.LEFT, self.RIGHT + self._unit_room(), 2 * self.GAP
        ks = [2 if self._diff_cell(c) else 1 for c in self._columns]   # cells per column: χ, or χ | Δ
        cw0 = max(10.0, (W - L - (8 if hbars else R)) / max(1, sum(ks)))   # column widths before scaling
        nlines = self._title_lines([k * cw0 for k in ks])
        T = max(self.TOP, self._top(nlines)) + sub_h
        B = self.BOTTOM + self._small_height() + 2    # scale bar and the difference's definition
        if hbars:
            R = 8
            B += self.HBAR_H
        GG = 3 * G                                     # between volumes (χ | Δ of one volume: G)
        planes = [p for p, d in rows if not d]
        nsub = sum(ks)
        avail_w = W - L - R - G * (nsub - n) - GG * (n - 1)
        max_w = max(wh[p][0] for p in planes)
        sum_h = sum(wh[p][1] for p in planes)
        avail_h = H - T - B - G * (len(planes) - 1)
        s = max(1e-3, min(max(10.0, avail_w) / nsub / max_w, max(10.0, avail_h) / sum_h))
        cw = max_w * s                                 # sub-columns just as wide as the widest plane
        total_w = nsub * cw + G * (nsub - n) + GG * (n - 1)
        x0 = L + max(0.0, (W - L - R - total_w) / 2.0)  # height-limited: the block is centred
        subx, titles, subheads = [], [], []
        x = x0
        for ci, k in enumerate(ks):
            subx.append([x + j * (cw + G) for j in range(k)])
            gw = k * cw + (k - 1) * G
            titles.append(QRectF(x, 1, gw, T - sub_h))
            subheads.append((QRectF(x, T - sub_h, cw, sub_h), "χ"))
            if k == 2:
                subheads.append((QRectF(x + cw + G, T - sub_h, cw, sub_h), "Δ"))
            x += gw + GG
        rects = {}
        row_y = [None] * len(rows)
        y = T
        labels = []
        for p in planes:
            w_mm, h_mm = wh[p]
            ri_c = rows.index((p, False))
            ri_d = rows.index((p, True)) if (p, True) in rows else None
            row_y[ri_c] = (y, h_mm * s)
            labels.append((ri_c, y, h_mm * s, False))
            for ci, k in enumerate(ks):
                rects[(ci, ri_c)] = QRectF(subx[ci][0] + (cw - w_mm * s) / 2.0, y, w_mm * s, h_mm * s)
                if k == 2 and ri_d is not None:
                    rects[(ci, ri_d)] = QRectF(subx[ci][1] + (cw - w_mm * s) / 2.0, y, w_mm * s, h_mm * s)
            if ri_d is not None:
                row_y[ri_d] = (y, h_mm * s)
            y += h_mm * s + G
        top, bot = T, y - G
        two = any(k == 2 for k in ks)
        if hbars:   # side by side under the cells, below the line that defines Δ
            yb = y + self.BOTTOM + self._small_height() + 6
            bars = self._hbars(x0, total_w, yb, two)
        else:
            mid = 0.5 * (top + bot)
            gap = min(24.0, 0.1 * (bot - top))
            bars = {"chi": (top, mid - gap / 2)} if two else {"chi": (top, bot)}
            if two:
                bars["diff"] = (mid + gap / 2, bot)
        cell0 = next(ci for ci in range(n))
        return {"arrangement": "beside", "title_lines": nlines, "scale": s, "rects": rects, "rows": rows, "row_y": row_y, "cw": cw,
                "bottom": y, "titles": titles, "subheads": subheads,
                "diff_title": QRectF(x0 + 0.3 * total_w, y + 2, 0.7 * total_w, self._small_height() + 4),
                "bars": bars, "hbars": hbars, "labels": labels, "label_x": x0 - L + 2.0, "bar_x": x0 + total_w + 8 + self._unit_room(),
                "scale_cell": (cell0, rows.index((planes[-1], False)))}

    def _hbars(self, x0: float, total_w: float, yb: float, two: bool) -> dict:
        """Horizontal colour bars (χ, and Δ when ``two``) in equal parts of the width under the cells.

        Each bar's unit is drawn above its middle and its end values (±30 px) under its ends, so a bar
        stays inside its own part and no label runs into the other bar.
        """
        keys = ["chi"] + (["diff"] if two else [])
        part = total_w / len(keys)
        room = max(40.0, part - 60.0)
        blen = min(0.8 * room, 360.0)
        return {key: (x0 + k * part + 30.0 + (room - blen) / 2, x0 + k * part + 30.0 + (room + blen) / 2, yb)
                for k, key in enumerate(keys)}

    def _unit_room(self) -> int:
        """Width of a vertical colour bar's unit, turned along its left side, so that it clears the cells."""
        return self._small_height() + 2

    def _small_font(self):
        from qtpy.QtGui import QFont

        small = QFont(self.font())
        small.setPointSizeF(max(7.0, self.font().pointSizeF() * 0.85))
        return small

    def _small_height(self) -> int:
        from qtpy.QtGui import QFontMetrics

        return QFontMetrics(self._small_font()).height()
