"""The orthogonal-slices panel of the Compare widget (pure Qt painting, no matplotlib).

One column per volume (the reference first, then the results), rows axial / coronal /
sagittal. The difference to the reference (or the field residual when there is no reference)
goes either below, as the same planes under a separator ("below": suits a tall, narrow dock), or
beside χ, each result's column split into χ | Δ ("beside": suits a wide window); "auto" takes the
arrangement that draws the planes larger at the panel's size. With a box (the dock's "Zoom to
mask": the mask's bounding box) only that part is shown, so the brain fills the cells. All planes
are drawn at one scale (pixels per mm), so the physical aspect is kept and the planes line up. Colour
mapping is a numpy lookup table into a QImage that Qt scales with nearest-neighbour sampling:
updating 36 planes of 256×256 takes a few tens of milliseconds.

Orientation (the scan's voxel frame after ``as_closest_canonical``, RAS+): axial and coronal
show the patient's right on the right (neurological; ``radiological=True`` flips them), axial
anterior up, coronal and sagittal superior up, sagittal anterior on the left. Letters at the
image edges say so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt, Signal
from qtpy.QtGui import QImage
from qtpy.QtWidgets import QSizePolicy, QWidget

from ...core.compare import PLANES, Plane, clamp_point, orthogonal_slices, plane_click_to_point
from .colour import colormap_lut, to_rgba
from .layout import PanelLayout
from .paint import PanelPainting


class _LazyDiff(dict):
    """plane name → result plane − reference plane, computed on first use."""

    def __init__(self, chi_planes, ref_planes, steps) -> None:
        super().__init__()
        self._chi = chi_planes
        self._ref = ref_planes
        self._steps = steps

    def __missing__(self, name):
        sv, sh = self._steps[name]
        d = np.subtract(self._chi[name].data[::sv, ::sh], self._ref[name][::sv, ::sh], dtype=np.float32)
        self[name] = d
        return d


@dataclass
class PanelColumn:
    """One column of the panel (volumes in the canonical voxel frame, ppm).

    The difference row shows ``diff_volume`` when given (e.g. the field residual), else
    ``volume − ref − offset`` when ``ref`` is given, else nothing (``diff_note`` is written).
    """

    title: str
    volume: np.ndarray
    ref: Optional[np.ndarray] = None
    offset: float = 0.0
    diff_volume: Optional[np.ndarray] = None
    diff_note: str = ""
    subtitle: str = ""
    mask: Optional[np.ndarray] = None  # difference shown inside it only (black outside)

    def has_diff(self) -> bool:
        return self.diff_volume is not None or self.ref is not None


class SliceGrid(PanelLayout, PanelPainting, QWidget):
    """Columns of orthogonal slices (χ rows, then difference rows), one contrast per group."""

    #: canonical voxel point (i, j, k) the user clicked / scrolled to
    pointRequested = Signal(tuple)
    #: text describing the value under the mouse (empty when outside the images)
    hovered = Signal(str)

    LEFT, TOP, RIGHT, BOTTOM, GAP, SEP = 64, 36, 84, 18, 3, 18
    HBAR_H = 44  # height of a horizontal colour bar with its tick labels
    TITLE_LINES = 2  # column titles wrap onto this many lines (then they are elided) ...
    TITLE_LINES_MAX = 3  # ... or up to this many in narrow columns

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 260)
        self.setMouseTracking(True)
        self._columns: list[PanelColumn] = []
        self._vs = np.ones(3)
        self._shape: Optional[tuple] = None
        self._point = (0, 0, 0)
        self._planes: tuple = PLANES
        self._chi_lim = (-0.1, 0.2)
        self._diff_lim = 0.1
        self._chi_lut = colormap_lut("gray")
        self._diff_lut = colormap_lut("RdBu_r")
        self._radiological = False
        self._cross = True
        self._diff_title = "Δχ = result − reference"
        self._chi_unit = "χ (ppm)"
        self._diff_unit = "Δχ (ppm)"
        self._images: dict = {}       # (col, row) → (QImage, buffer)
        self._image_cache: dict = {}  # (col, row) → (key, (QImage, buffer)) of the last rendering
        self._planes_cache: dict = {}  # (col, row) → Plane (for clicks / hover)
        self._layout: dict = {}        # geometry of the last paint
        self._arrangement = "auto"
        self._box: Optional[tuple] = None  # (lo, hi) voxel box shown (zoom to the mask), None = all
        self._geo_cache = None         # (size and content key, geometry)
        self.last_render_ms = 0.0      # timing of the last update (benchmarks)
        self.last_paint_ms = 0.0
        self.paint_count = 0
        self._dirty = False

    # ------------------------------------------------------------------ configuration
    def set_columns(self, columns: Sequence[PanelColumn], voxel_size, diff_title: str = "",
                    diff_unit: str = "") -> None:
        cols = list(columns)
        shape = tuple(cols[0].volume.shape) if cols else None
        for c in cols:
            if tuple(c.volume.shape) != shape:
                raise ValueError(f"panel: {c.title!r} has shape {c.volume.shape}, expected {shape}")
        self._columns = cols
        self._image_cache.clear()
        if shape != self._shape:
            self._box = None
        self._shape = shape
        self._vs = np.asarray(voxel_size, dtype=np.float64)
        if diff_title:
            self._diff_title = diff_title
        if diff_unit:
            self._diff_unit = diff_unit
        if shape is not None:
            self._point = clamp_point(self._point, shape)
        self.refresh()

    def set_offsets(self, offsets: dict) -> None:
        """Update the demeaning offsets (title → ppm) without rebuilding."""
        for c in self._columns:
            if c.title in offsets:
                c.offset = float(offsets[c.title])
        self.refresh()

    def set_diff_volume(self, title: str, vol: Optional[np.ndarray]) -> None:
        for c in self._columns:
            if c.title == title:
                c.diff_volume = vol
        self.refresh()

    def set_point(self, point) -> None:
        if self._shape is None:
            self._point = tuple(int(round(float(p))) for p in point)
            return
        p = clamp_point(point, self._shape)
        if p != self._point or not self._images:
            self._point = p
            if self._shown():
                self.refresh()
            else:  # hidden (other tab, closed dock): render when shown
                self._dirty = True

    def point(self) -> tuple:
        return self._point

    def set_planes(self, planes: Sequence[str]) -> None:
        self._planes = tuple(p for p in PLANES if p in planes) or PLANES
        self.refresh()

    def set_chi_limits(self, lo: float, hi: float) -> None:
        self._chi_lim = (float(lo), float(hi))
        self.refresh()

    def set_diff_limit(self, lim: float) -> None:
        self._diff_lim = abs(float(lim)) or 1e-6
        self.refresh()

    def set_crosshairs(self, on: bool) -> None:
        """Draw (or not) the cross-hairs at the current point."""
        self._cross = bool(on)
        self.update()

    @property
    def crosshairs(self) -> bool:
        return self._cross

    def set_box(self, box) -> None:
        """Show only the voxel box ``(lo, hi)`` (inclusive lo, exclusive hi per axis; e.g. the mask's
        bounding box, so the brain fills the cells), or the whole volume (None)."""
        if box is not None and self._shape is not None:
            lo = [int(min(max(v, 0), n - 1)) for v, n in zip(box[0], self._shape)]
            hi = [int(min(max(v, l + 1), n)) for v, l, n in zip(box[1], lo, self._shape)]
            box = (tuple(lo), tuple(hi))
            if box == ((0, 0, 0), tuple(self._shape)):
                box = None
        if box != self._box:
            self._box = box
            self._image_cache.clear()
            self.refresh()

    @property
    def box(self) -> Optional[tuple]:
        return self._box

    def _slices(self, vol) -> dict:
        """plane name → Plane through the current point, cropped to the shown box."""
        planes = orthogonal_slices(vol, self._point, self._vs)
        if self._box is None:
            return {p.name: p for p in planes}
        lo, hi = self._box
        vs = self._vs
        out = {}
        for p in planes:
            h, v = p.h_axis, p.v_axis
            out[p.name] = replace(p, data=p.data[lo[v]:hi[v], lo[h]:hi[h]],
                                  extent=((lo[h] - 0.5) * vs[h], (hi[h] - 0.5) * vs[h],
                                          (lo[v] - 0.5) * vs[v], (hi[v] - 0.5) * vs[v]))
        return out

    def _title_lines(self, widths) -> int:
        """Lines the column titles need at these widths (px): 2, or up to TITLE_LINES_MAX in narrow columns."""
        from qtpy.QtGui import QFont, QFontMetrics

        from .paint import wrap_title

        bold = QFont(self.font())
        bold.setBold(True)
        fm = QFontMetrics(bold)
        need = max((len(wrap_title(c.title, fm, int(w), self.TITLE_LINES_MAX)) for c, w in zip(self._columns, widths)),
                   default=1)
        return max(self.TITLE_LINES, need)

    def _top(self, lines: int | None = None) -> float:
        """Height of the title band: ``lines`` (default TITLE_LINES) wrapped title lines and a subtitle line."""
        from qtpy.QtGui import QFont, QFontMetrics

        bold = QFont(self.font())
        bold.setBold(True)
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, self.font().pointSizeF() * 0.85))
        return (lines or self.TITLE_LINES) * QFontMetrics(bold).height() + QFontMetrics(small).height() + 4

    def set_radiological(self, on: bool) -> None:
        self._radiological = bool(on)
        self.refresh()

    @property
    def columns(self) -> list:
        return self._columns

    @property
    def planes(self) -> tuple:
        return self._planes

    # ------------------------------------------------------------------ rendering
    def _flip_h(self, plane: str) -> bool:
        if plane == "sagittal":
            return True  # anterior on the left
        return self._radiological

    def _rows(self) -> list[tuple[str, bool]]:
        rows = [(p, False) for p in self._planes]
        if any(c.has_diff() for c in self._columns):
            rows += [(p, True) for p in self._planes]
        return rows

    def _shown(self) -> bool:
        """False on a hidden tab or in a closed dock (then rendering waits until shown)."""
        return self.isWindow() or self.isVisibleTo(self.window())

    def resizeEvent(self, event) -> None:  # noqa: N802
        super().resizeEvent(event)
        if self._columns and self._shown():
            self.refresh()  # the subsampling step depends on the size (cached planes are reused)

    def showEvent(self, event) -> None:  # noqa: N802
        if self._dirty:
            self.refresh()
        super().showEvent(event)

    def refresh(self) -> None:
        """Recompute the plane images for the current point and schedule a repaint."""
        self._dirty = False
        t0 = time.perf_counter()
        self._render()
        self.last_render_ms = (time.perf_counter() - t0) * 1e3
        self.update()

    def _render(self) -> None:
        self._images.clear()
        self._planes_cache.clear()
        if not self._columns or self._shape is None:
            return
        lo, hi = self._chi_lim
        dl = self._diff_lim
        rows = self._rows()
        steps = self._steps()
        shared: dict = {}  # id(volume) → its planes (the reference and mask are shared by columns)

        def planes_of(vol):
            key = id(vol)
            if key not in shared:
                shared[key] = {n: p.data for n, p in self._slices(vol).items()}
            return shared[key]

        for ci, col in enumerate(self._columns):
            chi_planes = self._slices(col.volume)
            diff_planes = None
            off = 0.0
            if col.diff_volume is not None:
                diff_planes = planes_of(col.diff_volume)
            elif col.ref is not None:
                refp = planes_of(col.ref)
                diff_planes = _LazyDiff(chi_planes, refp, steps)
                off = float(col.offset)
            mplanes = planes_of(col.mask) if (diff_planes is not None and col.mask is not None) else None
            for ri, (name, is_diff) in enumerate(rows):
                pl = chi_planes[name]
                self._planes_cache[(ci, ri)] = pl
                flip = self._flip_h(name)
                sv, sh = steps[name]
                if is_diff:
                    if diff_planes is None:
                        continue
                    key = ("diff", pl.index, id(col.volume), id(col.ref), id(col.diff_volume), id(col.mask),
                           off, dl, flip, sv, sh)
                else:
                    key = ("chi", pl.index, id(col.volume), lo, hi, flip, sv, sh)
                hit = self._image_cache.get((ci, ri))
                if hit is not None and hit[0] == key:  # same plane and window: only the cross-hair moved
                    self._images[(ci, ri)] = hit[1]
                    continue
                if is_diff:
                    d = diff_planes[name]
                    if col.diff_volume is not None:
                        d = d[::sv, ::sh]
                    rgba = to_rgba(d, off - dl, off + dl, self._diff_lut, flip, True,
                                   None if mplanes is None else mplanes[name][::sv, ::sh])
                else:
                    rgba = to_rgba(pl.data[::sv, ::sh], lo, hi, self._chi_lut, flip, True)
                h, w = rgba.shape
                img = QImage(rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888)
                self._images[(ci, ri)] = (img, rgba)
                self._image_cache[(ci, ri)] = (key, (img, rgba))

    def _steps(self) -> dict:
        """plane → (row step, column step): planes shown smaller than one pixel per voxel are
        subsampled before colour mapping (what nearest-neighbour scaling would show anyway)."""
        geo = self._geometry()
        s = geo.get("scale", 1.0)
        out = {}
        for name, n_ax, h_ax, v_ax in (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2)):
            out[name] = tuple(max(1, int(1.0 / max(s * self._vs[a], 1e-6))) for a in (v_ax, h_ax))
        return out

    #: how the difference planes are placed: under the χ planes, beside them (each result's column
    #: holds χ | Δ), or whichever of the two gives the larger images for the panel's size
    ARRANGEMENTS = ("auto", "below", "beside")

    def set_arrangement(self, how: str) -> None:
        """"below": Δ rows under the χ rows; "beside": χ | Δ side by side in each result's column;
        "auto" (default): the one that draws the planes larger at the panel's current size."""
        if how not in self.ARRANGEMENTS:
            raise ValueError(f"arrangement: expected one of {self.ARRANGEMENTS}, got {how!r}")
        self._arrangement = how
        self.refresh()

    @property
    def arrangement(self) -> str:
        """The arrangement drawn now ("below" or "beside"; "auto" resolved)."""
        return self._geometry().get("arrangement", "below")

    def _diff_cell(self, col: PanelColumn) -> bool:
        """Whether a column gets difference cells in the "beside" arrangement (not the reference's)."""
        if col.has_diff():
            return True
        return bool(col.diff_note) and col.diff_note != "reference"

    def _geometry(self) -> dict:
        """Pixel layout: scale (px/mm), the image rectangle of every cell, titles, labels, colour bars."""
        if not self._columns or self._shape is None:
            return {}
        key = (self.width(), self.height(), self._arrangement, self._planes, self._shape, tuple(self._vs), self._box,
               tuple((c.has_diff(), self._diff_cell(c)) for c in self._columns), self.font().key())
        if self._geo_cache is not None and self._geo_cache[0] == key:
            return self._geo_cache[1]
        rows = self._rows()
        beside_ok = any(d for _, d in rows)
        if self._arrangement == "below" or not beside_ok:
            geo = self._layout_below(rows)
        else:
            # beside: colour bars on the right, or under the cells when the width is what limits
            b = max((self._layout_beside(rows, hbars) for hbars in (False, True)), key=lambda g: g["scale"])
            a = self._layout_below(rows) if self._arrangement == "auto" else None
            geo = b if a is None or b["scale"] > a["scale"] * 1.02 else a
        self._geo_cache = (key, geo)
        return geo

    def thumbnail_size(self) -> tuple[float, float]:
        """(width, height) in pixels of the smallest χ plane drawn (for tests and screenshots)."""
        geo = self._geometry()
        cells = [r for (ci, ri), r in geo.get("rects", {}).items() if not geo["rows"][ri][1]]
        if not cells:
            return (0.0, 0.0)
        return (min(r.width() for r in cells), min(r.height() for r in cells))

    # ------------------------------------------------------------------ coordinates
    def _mm_to_px(self, pl: Plane, rect: QRectF, x_mm: float, y_mm: float) -> tuple[float, float]:
        l, r, b, t = pl.extent
        fx = (x_mm - l) / (r - l)
        fy = (y_mm - b) / (t - b)
        if self._flip_h(pl.name):
            fx = 1.0 - fx
        return rect.left() + fx * rect.width(), rect.bottom() - fy * rect.height()

    def _px_to_mm(self, pl: Plane, rect: QRectF, px: float, py: float) -> tuple[float, float]:
        l, r, b, t = pl.extent
        fx = (px - rect.left()) / rect.width()
        fy = (rect.bottom() - py) / rect.height()
        if self._flip_h(pl.name):
            fx = 1.0 - fx
        return l + fx * (r - l), b + fy * (t - b)

    def cell_at(self, pos) -> Optional[tuple]:
        """(column, row) of the image under a widget position, or None."""
        geo = self._geometry()
        for key, rect in geo.get("rects", {}).items():
            if rect.contains(QPointF(pos)):
                return key
        return None

    def point_at(self, pos) -> Optional[tuple]:
        """Canonical voxel point for a widget position inside an image (in-plane indices change)."""
        key = self.cell_at(pos)
        if key is None or key not in self._planes_cache:
            return None
        geo = self._geometry()
        pl = self._planes_cache[key]
        x_mm, y_mm = self._px_to_mm(pl, geo["rects"][key], float(QPointF(pos).x()), float(QPointF(pos).y()))
        return plane_click_to_point(pl, x_mm, y_mm, self._point, self._shape, self._vs)

    def image_center(self, col: int, plane: str, diff: bool = False) -> QPointF:
        """Widget position of the centre of a cell (used by tests and scripts)."""
        geo = self._geometry()
        ri = geo["rows"].index((plane, diff))
        return geo["rects"][(col, ri)].center()

    def pos_for_point(self, col: int, plane: str, point, diff: bool = False) -> QPointF:
        """Widget position of a canonical voxel point inside a cell."""
        geo = self._geometry()
        ri = geo["rows"].index((plane, diff))
        rect = geo["rects"][(col, ri)]
        pl = self._planes_cache[(col, ri)]
        x = point[pl.h_axis] * self._vs[pl.h_axis]
        y = point[pl.v_axis] * self._vs[pl.v_axis]
        px, py = self._mm_to_px(pl, rect, x, y)
        return QPointF(px, py)

    # ------------------------------------------------------------------ mouse
    def mousePressEvent(self, event) -> None:  # noqa: N802
        if event.button() == Qt.MouseButton.LeftButton:
            p = self.point_at(event.position())
            if p is not None:
                self.pointRequested.emit(tuple(int(v) for v in p))
                return
        super().mousePressEvent(event)

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        if event.buttons() & Qt.MouseButton.LeftButton:
            p = self.point_at(event.position())
            if p is not None:
                self.pointRequested.emit(tuple(int(v) for v in p))
        self.hovered.emit(self._describe(event.position()))
        super().mouseMoveEvent(event)

    def leaveEvent(self, event) -> None:  # noqa: N802
        self.hovered.emit("")
        super().leaveEvent(event)

    def wheelEvent(self, event) -> None:  # noqa: N802
        key = self.cell_at(event.position())
        if key is None or key not in self._planes_cache or self._shape is None:
            return super().wheelEvent(event)
        step = 1 if event.angleDelta().y() > 0 else -1
        pl = self._planes_cache[key]
        p = list(self._point)
        p[pl.normal] += step
        self.pointRequested.emit(tuple(clamp_point(p, self._shape)))
        event.accept()

    def _describe(self, pos) -> str:
        key = self.cell_at(pos)
        if key is None or key not in self._planes_cache:
            return ""
        p = self.point_at(pos)
        ci, ri = key
        col = self._columns[ci]
        is_diff = self._geometry()["rows"][ri][1]
        if is_diff:
            if col.diff_volume is not None:
                v = float(col.diff_volume[p])
            elif col.ref is not None:
                v = float(col.volume[p]) - float(col.ref[p]) - col.offset
            else:
                return ""
            what = "Δ"
        else:
            v = float(col.volume[p])
            what = "χ"
        return f"{col.title}: {what}({p[0]}, {p[1]}, {p[2]}) = {v:+.4f} ppm"
