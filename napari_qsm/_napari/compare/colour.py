"""Colour mapping for the Compare panel: matplotlib colormaps as lookup tables, planes → RGBA images."""

from __future__ import annotations

from typing import Optional

import numpy as np


def colormap_lut(name: str) -> np.ndarray:
    """(256,) uint32 lookup table of a matplotlib colormap; each entry holds the RGBA bytes."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    lut = (cmap(np.linspace(0.0, 1.0, 256)) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(lut).view(np.uint32).reshape(256)


_BLACK = np.array([0, 0, 0, 255], np.uint8).view(np.uint32)[0]


def to_rgba(data: np.ndarray, lo: float, hi: float, lut: np.ndarray, flip_h: bool = False,
            flip_v: bool = False, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Map a 2-D array to a contiguous (h, w) uint32 RGBA image through ``lut``.

    NaN and voxels outside ``mask`` (same shape as ``data``) are black. ``flip_v``/``flip_h``
    reverse rows/columns (row 0 of a QImage is the top).
    """
    a = data
    m = mask
    if flip_v:
        a = a[::-1]
        m = None if m is None else m[::-1]
    if flip_h:
        a = a[:, ::-1]
        m = None if m is None else m[:, ::-1]
    span = float(hi - lo) if hi > lo else 1e-12
    t = np.subtract(a, np.float32(lo), dtype=np.float32)
    t *= np.float32(255.0 / span)
    np.clip(t, 0.0, 255.0, out=t)
    nan = np.isnan(t)
    has_nan = bool(nan.any())
    if has_nan:
        t[nan] = 0.0
    out = lut.take(t.astype(np.uint8))
    if has_nan:
        out[nan] = _BLACK
    if m is not None:
        out[~m] = _BLACK
    return out
