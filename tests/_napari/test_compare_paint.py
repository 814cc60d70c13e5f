"""The Compare panel's colour bars (compare/paint.py): one drawing function for both orientations.

The reference below is the drawing code as it was before the two bars became one function
(``_colorbar`` vertical, ``_colorbar_h`` horizontal); the rendered pixels must stay identical, and the
bar and its labels must sit where the layout puts them.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from qtpy.QtCore import QPointF, QRectF, Qt  # noqa: E402
from qtpy.QtGui import QColor, QFont, QFontMetrics, QImage, QPainter  # noqa: E402

from napari_qsm._napari.compare.colour import colormap_lut  # noqa: E402
from napari_qsm._napari.compare.paint import PanelPainting  # noqa: E402

RIGHT = 84  # SliceGrid.RIGHT
W, H = 260, 360


def _ref_vertical(qp, x, y0, y1, lut, lo, hi, unit, fg, font) -> None:
    h = max(10, int(y1 - y0))
    grad = np.ascontiguousarray(np.repeat(lut[::-1][:, None], 10, axis=1))
    img = QImage(grad.data, 10, 256, 40, QImage.Format.Format_RGBA8888)
    qp.drawImage(QRectF(x, y0, 10, h), img)
    qp.setPen(fg)
    qp.setFont(font)
    fmh = QFontMetrics(font).height()
    for frac, val in ((0.0, hi), (0.5, 0.5 * (lo + hi)), (1.0, lo)):
        yy = y0 + frac * h
        qp.drawLine(QPointF(x + 10, yy), QPointF(x + 13, yy))
        qp.drawText(QRectF(x + 15, yy - fmh / 2, RIGHT - 24, fmh), Qt.AlignmentFlag.AlignLeft, f"{val:+.3g}")
    if QFontMetrics(font).horizontalAdvance(unit) > h and "(" in unit:   # a short bar: the unit alone
        unit = unit[unit.rfind("(") + 1:].rstrip(")")
    qp.save()
    qp.translate(x - 3, y0 + h / 2)
    qp.rotate(-90)
    qp.drawText(QRectF(-h / 2, -fmh, h, fmh), Qt.AlignmentFlag.AlignCenter, unit)
    qp.restore()


def _ref_horizontal(qp, x0, x1, y, lut, lo, hi, unit, fg, font) -> None:
    w = max(10, int(x1 - x0))
    grad = np.ascontiguousarray(np.repeat(lut[None, :], 10, axis=0))
    img = QImage(grad.data, 256, 10, 4 * 256, QImage.Format.Format_RGBA8888)
    qp.drawImage(QRectF(x0, y, w, 10), img)
    qp.setPen(fg)
    qp.setFont(font)
    fm = QFontMetrics(font)
    fmh = fm.height()
    uw = fm.horizontalAdvance(unit) + 8   # the unit over the bar's middle (it ran into the next bar on the left)
    qp.drawText(QRectF(x0 + w / 2 - uw / 2, y - fmh - 1, uw, fmh),
                Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignBottom, unit)
    ticks = ((0.0, lo), (0.5, 0.5 * (lo + hi)), (1.0, hi)) if w >= 130 else ((0.0, lo), (1.0, hi))
    for frac, val in ticks:
        xx = x0 + frac * w
        qp.drawLine(QPointF(xx, y + 10), QPointF(xx, y + 13))
        qp.drawText(QRectF(xx - 30, y + 14, 60, fmh), Qt.AlignmentFlag.AlignHCenter, f"{val:+.3g}")


class _Painter(PanelPainting):
    RIGHT = RIGHT


def _render(draw) -> np.ndarray:
    """Paint on a black ARGB32 image with the panel's render hints; the pixels as an (H, W, 4) array."""
    img = QImage(W, H, QImage.Format.Format_ARGB32)
    img.fill(QColor(0, 0, 0))
    qp = QPainter(img)
    qp.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, False)
    qp.setRenderHint(QPainter.RenderHint.Antialiasing, True)
    try:
        draw(qp)
    finally:
        qp.end()
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes())
    return np.frombuffer(ptr, np.uint8).reshape(H, img.bytesPerLine() // 4, 4)[:, :W].copy()


def _font() -> QFont:
    f = QFont()
    f.setPointSizeF(8.0)
    return f


CASES = [  # (a0, a1, at, lo, hi, unit): integer and fractional positions (the layout gives both)
    (20, 300, 90, -0.15, 0.15, "ppm"),
    (33.25, 211.75, 101.5, -0.05, 0.05, "Δ ppm"),
    (40, 44, 60, 0.0, 1.0, "χ"),   # shorter than 10 px: drawn 10 px long
    (20, 80, 90, -0.05, 0.05, "residual (ppm)"),   # a caption longer than its bar: the unit alone, not cut
]


@pytest.mark.parametrize("lut_name", ["gray", "RdBu_r"])
@pytest.mark.parametrize("case", CASES)
def test_vertical_bar_pixels_unchanged(qapp, lut_name, case):
    a0, a1, at, lo, hi, unit = case
    lut, fg, font = colormap_lut(lut_name), QColor(230, 230, 230), _font()
    new = _render(lambda qp: _Painter()._colorbar(qp, a0, a1, at, lut, lo, hi, unit, fg, font, vertical=True))
    ref = _render(lambda qp: _ref_vertical(qp, at, a0, a1, lut, lo, hi, unit, fg, font))
    assert ref.any() and np.array_equal(new, ref)


@pytest.mark.parametrize("lut_name", ["gray", "RdBu_r"])
@pytest.mark.parametrize("case", CASES)
def test_horizontal_bar_pixels_unchanged(qapp, lut_name, case):
    a0, a1, at, lo, hi, unit = case
    a0, a1, at = a0 - 10, a1 - 100, at + 180   # room for the unit over it and the values under it
    lut, fg, font = colormap_lut(lut_name), QColor(230, 230, 230), _font()
    new = _render(lambda qp: _Painter()._colorbar(qp, a0, a1, at, lut, lo, hi, unit, fg, font, vertical=False))
    ref = _render(lambda qp: _ref_horizontal(qp, a0, a1, at, lut, lo, hi, unit, fg, font))
    assert ref.any() and np.array_equal(new, ref)


def _green_lut() -> np.ndarray:
    lut = np.zeros((256, 4), np.uint8)
    lut[:, 1] = np.linspace(40, 255, 256).astype(np.uint8)
    lut[:, 3] = 255
    return lut.view(np.uint32).reshape(256)   # as colormap_lut: one uint32 of RGBA bytes per entry


def _rows_cols(mask):
    rows, cols = np.nonzero(mask)
    return (rows.min(), rows.max(), cols.min(), cols.max()) if rows.size else None


def test_bar_extents_and_label_places(qapp):
    """Independent of the reference: the gradient fills exactly its 10-px strip (high end at the top of a
    vertical bar, at the right of a horizontal one), the values sit right of / under the ends and the middle,
    the unit turned left of a vertical bar and over the middle of a horizontal one."""
    lut, fg, font = _green_lut(), QColor(255, 0, 0), _font()   # bar: green only; text and ticks: red only
    fmh = QFontMetrics(font).height()
    px = _render(lambda qp: _Painter()._colorbar(qp, 20, 300, 90, lut, -0.15, 0.15, "ppm", fg, font, vertical=True))
    bar = (px[..., 1] > 0) & (px[..., 2] == 0)   # Format_ARGB32 bytes are B, G, R, A
    assert _rows_cols(bar) == (20, 299, 90, 99)
    assert px[20, 95, 1] == 255 and px[299, 95, 1] == 40   # hi at the top
    text = px[..., 2] > 0
    for yy in (20, 160, 300):   # a value beside each tick, right of the bar
        assert text[int(yy - fmh / 2): int(yy + fmh / 2) + 1, 105:90 + RIGHT].any(), yy
    assert text[20:300, 90 - 3 - fmh: 90 - 2].any()   # the unit, turned, on the left
    assert text[160, 100:104].any() and not text[40:150, 100:104].any()   # tick marks at the ticks only

    px = _render(lambda qp: _Painter()._colorbar(qp, 60, 220, 200, lut, -0.15, 0.15, "ppm", fg, font, vertical=False))
    bar = (px[..., 1] > 0) & (px[..., 2] == 0)
    assert _rows_cols(bar) == (200, 209, 60, 219)
    assert px[205, 60, 1] == 40 and px[205, 219, 1] == 255   # hi on the right
    text = px[..., 2] > 0
    for xx in (60, 140, 220):   # a value under each tick
        assert text[214: 214 + fmh, xx - 30: xx + 30].any(), xx
    assert text[200 - fmh - 1: 199, 100:180].any()   # the unit over the bar's middle
    assert not text[200 - fmh - 1: 199, :56].any() and not text[200:208, 62:218].any()   # not left, not on the bar
    px = _render(lambda qp: _Painter()._colorbar(qp, 60, 160, 200, lut, -0.15, 0.15, "ppm", fg, font, vertical=False))
    text = px[..., 2] > 0   # a short bar: its two end values only (three 60 px values would overlap)
    assert text[214: 214 + fmh, 30:80].any() and text[214: 214 + fmh, 140:190].any()
    assert not text[214: 214 + fmh, 95:125].any()


def _grid_pixels(g) -> np.ndarray:
    img = g.grab().toImage().convertToFormat(QImage.Format.Format_ARGB32)
    ptr = img.constBits()
    ptr.setsize(img.sizeInBytes())
    return np.frombuffer(ptr, np.uint8).reshape(img.height(), img.bytesPerLine() // 4, 4)[:, :img.width()].copy()


@pytest.mark.parametrize("size, hbars", [((1200, 420), False), ((420, 1000), True)])
def test_panel_bars_unchanged(qtbot, monkeypatch, size, hbars):
    """The whole panel (both bars, χ and Δ), painted with the one function and with the reference pair."""
    from napari_qsm._napari.compare.panel import PanelColumn, SliceGrid

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((24, 30, 16)).astype(np.float32) * 0.05
    g = SliceGrid()
    qtbot.addWidget(g)
    g.resize(*size)
    g.set_columns([PanelColumn("ref", ref, subtitle="reference", diff_note="reference"),
                   PanelColumn("res", ref + 0.01, ref=ref, offset=0.01)], (1.0, 1.0, 2.0))
    g.set_arrangement("beside")
    g.refresh()
    geo = g._geometry()
    assert bool(geo.get("hbars")) is hbars and {"chi", "diff"} <= set(geo["bars"])
    new = _grid_pixels(g)
    # each bar where the layout puts it, its ends the first / last tenth of its colour map (checks the call site;
    # the widget grab on the virtual screen is a few levels off the table, hence the 8)
    for key, lut in (("chi", g._chi_lut), ("diff", g._diff_lut)):
        lut = lut.view(np.uint8).reshape(256, 4)   # RGBA bytes of each entry
        rgb = lambda y, x: new[int(y), int(x), 2::-1].astype(int)   # B, G, R → R, G, B  # noqa: E731
        if hbars:
            x0, x1, y = geo["bars"][key]
            ends = rgb(y + 5, np.ceil(x0) + 1), rgb(y + 5, np.floor(x1) - 2)
        else:
            y0, y1 = geo["bars"][key]
            ends = rgb(np.floor(y1) - 2, geo["bar_x"] + 5), rgb(np.ceil(y0) + 1, geo["bar_x"] + 5)
        near = lambda c, part: np.abs(part[:, :3].astype(int) - c).max(axis=1).min() <= 8   # noqa: E731
        assert near(ends[0], lut[:26]) and near(ends[1], lut[-26:]), (key, ends)   # low end, high end

    def reference(self, qp, a0, a1, at, lut, lo, hi, unit, fg, font, *, vertical):
        if vertical:
            _ref_vertical(qp, at, a0, a1, lut, lo, hi, unit, fg, font)
        else:
            _ref_horizontal(qp, a0, a1, at, lut, lo, hi, unit, fg, font)

    monkeypatch.setattr(SliceGrid, "_colorbar", reference)
    old = _grid_pixels(g)
    assert np.array_equal(new, old)
    monkeypatch.setattr(SliceGrid, "_colorbar", lambda self, *a, **k: None)
    assert not np.array_equal(_grid_pixels(g), old)   # the bars are in the picture
