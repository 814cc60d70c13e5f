"""A one-page report per scan (PNG or PDF, matplotlib): what a reader needs to judge a χ map.

Orthogonal χ slices with a colour bar and the mask outline, the SWI minIP when given, the method
and its parameters, the field-consistency residual, and the mean χ of labelled regions when a
label map is given. Arrays are in the canonical voxel frame (RAS+, ``nib.as_closest_canonical``).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from .files import atomic_write
from .scan import ScanError

__all__ = ["region_means", "write_report"]


def region_means(chi: np.ndarray, labels: np.ndarray, names: Optional[Mapping[int, str]] = None,
                 mask: Optional[np.ndarray] = None) -> list[tuple[str, int, float, float]]:
    """(name, voxels, mean χ, SD χ) of every non-zero label (inside ``mask`` when given), by label value."""
    lab = np.asarray(labels).astype(np.int64)
    if lab.shape != np.shape(chi):
        raise ScanError(f"labels: shape {lab.shape} does not match χ {np.shape(chi)}")
    keep = lab != 0 if mask is None else (lab != 0) & np.asarray(mask, bool)
    rows = []
    for v in np.unique(lab[keep]):
        sel = keep & (lab == v)
        vals = np.asarray(chi)[sel]
        rows.append(((names or {}).get(int(v), f"label {int(v)}"), int(sel.sum()), float(vals.mean()),
                     float(vals.std())))
    return rows


def _centre(mask: np.ndarray) -> tuple[int, int, int]:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return tuple(s // 2 for s in mask.shape)
    return tuple(int(round(v)) for v in idx.mean(axis=0))


def _planes(vol: np.ndarray, c) -> list[np.ndarray]:
    # displayed with rows = the vertical axis: axial (y up), coronal (z up), sagittal (z up)
    return [vol[:, :, c[2]].T, vol[:, c[1], :].T, vol[c[0], :, :].T]


def _aspects(vs) -> list[float]:
    return [vs[1] / vs[0], vs[2] / vs[0], vs[2] / vs[1]]


def write_report(path, chi: np.ndarray, mask: np.ndarray, voxel_size, *, title: str, method: str,
                 parameters: Optional[Mapping] = None, residual_percent: Optional[float] = None,
                 min_ip: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                 label_names: Optional[Mapping[int, str]] = None, reference: str = "mean of the mask",
                 window: Optional[float] = None) -> Path:
    """Write the one-page report to ``path`` (``.png`` or ``.pdf``), atomically.

    Parameters
    ----------
    path : path
        Output file; its suffix chooses PNG or PDF.
    chi, mask : ndarray (i, j, k)
        χ in ppm and the brain mask, canonical voxel frame.
    voxel_size : 3 floats
        mm.
    title, method : str
        Scan name and the method's label.
    parameters : mapping, optional
        The method's parameters, printed as given.
    residual_percent : float, optional
        Field-consistency residual (%), :func:`napari_qsm.core.metrics.field_residual`.
    min_ip : ndarray (i, j, k), optional
        SWI minimum-intensity projection on the same grid.
    labels : ndarray of int (i, j, k), optional
        A label map on χ's grid; the mean χ of each label inside the mask is tabulated.
    window : float, optional
        χ display range ±window (ppm); default: the 99th percentile of |χ| in the mask.

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf"):
        raise ScanError(f"output: {path} must end in .png or .pdf")
    chi = np.asarray(chi, np.float32)
    m = np.asarray(mask, bool)
    if chi.ndim != 3 or m.shape != chi.shape:
        raise ScanError(f"mask: shape {m.shape} does not match χ {chi.shape}")
    if not m.any():
        raise ScanError("mask: empty; the report needs the brain mask")
    vs = [float(v) for v in voxel_size]
    w = float(window) if window else float(np.percentile(np.abs(chi[m]), 99)) or 0.1
    c = _centre(m)
    fig = plt.figure(figsize=(11.69, 8.27))  # A4 landscape
    fig.suptitle(f"{title} — χ by {method}", fontsize=14, x=0.02, ha="left")
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 0.05], height_ratios=[1, 1], hspace=0.25, wspace=0.15,
                            left=0.03, right=0.95, top=0.9, bottom=0.04)
    names = ("axial", "coronal", "sagittal")
    im = None
    for col, (img, mk, asp, name) in enumerate(zip(_planes(chi, c), _planes(m.astype(np.float32), c),
                                                   _aspects(vs), names)):
        ax = fig.add_subplot(grid[0, col])
        im = ax.imshow(img, cmap="gray", vmin=-w, vmax=w, origin="lower", aspect=asp, interpolation="nearest")
        ax.contour(mk, levels=[0.5], colors="tab:orange", linewidths=0.6)
        ax.set_title(f"χ {name} (slice {(c[2], c[1], c[0])[col]})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(im, cax=fig.add_subplot(grid[0, 3]))
    cb.set_label("χ (ppm)")
    ax = fig.add_subplot(grid[1, 0])
    if min_ip is not None:
        mi = np.asarray(min_ip, np.float32)
        lo, hi = np.percentile(mi[m], [1, 99])
        ax.imshow(mi[:, :, c[2]].T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=_aspects(vs)[0])
        ax.set_title("SWI minIP (axial)", fontsize=9)
    else:
        ax.text(0.5, 0.5, "no SWI given", ha="center", va="center", fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
    ax = fig.add_subplot(grid[1, 1:])
    ax.axis("off")
    lines = [f"method: {method}", f"reference: {reference}", f"display window: ±{w:.3g} ppm",
             f"mask: {int(m.sum())} voxels, voxel size {' × '.join(f'{v:g}' for v in vs)} mm"]
    if residual_percent is not None:
        lines.append(f"field-consistency residual: {residual_percent:.1f} % (‖M(f − d∗χ)‖ / ‖M f‖)")
    if parameters:
        ptxt = ", ".join(f"{k} = {v}" for k, v in parameters.items())
        lines += ["parameters: " + ptxt[i:i + 95] if i == 0 else "    " + ptxt[i:i + 95]
                  for i in range(0, min(len(ptxt), 380), 95)]
    if labels is not None:
        rows = region_means(chi, labels, label_names, m)
        lines.append("")
        lines.append(f"{'region':<24}{'voxels':>8}{'mean χ (ppm)':>15}{'SD':>9}")
        lines += [f"{n[:23]:<24}{k:>8}{mu:>15.4f}{sd:>9.4f}" for n, k, mu, sd in rows[:14]]
        if len(rows) > 14:
            lines.append(f"... {len(rows) - 14} more regions")
    lines.append("")
    lines.append(f"napari-qsm report, {_dt.datetime.now():%Y-%m-%d %H:%M}. Research use; not a diagnostic device.")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    fmt = path.suffix.lower()[1:]
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=110))
    finally:
        plt.close(fig)
    return path
