"""Side-by-side comparison of reconstructions, headless (numpy only; never Qt or napari).

The napari *Compare* widget is a thin layer over this module; scripts and notebooks use it
directly:

* :func:`compare` — every metric of :func:`napari_qsm.core.metrics.compute_metrics` for each
  result against a reference χ inside the mask. Without a reference (a clinical scan) only the
  field-consistency residual against the measured field is computed. Returns a
  :class:`CompareTable` (rows = results, columns = metric keys).
* :func:`best_per_column` — the best result per metric (``METRIC_INFO`` says whether higher is
  better); :func:`to_csv` / :func:`to_text` — export (CSV file, tab-separated clipboard text).
* :func:`difference_maps` — result − reference (optionally demeaned inside the mask), and
  :func:`field_residual_map` — D∗χ − field inside the mask, the "difference" without a reference.
* :func:`orthogonal_slices` — axial, coronal and sagittal planes through a point with their
  physical extent in mm (pure indexing, no copies), oriented for ``imshow(origin="lower")``.
* :func:`region_stats` — mean χ per label (e.g. deep grey nuclei) per result and the linear fit
  of each result's region means against the reference's (slope, intercept, R²).
* :func:`compare_steps` — all of the above for a GUI worker, one step at a time (offsets, residual
  maps, rows, table, regions), and the display helpers the widget shows them with
  (:func:`format_metric`, :func:`auto_window`, :func:`describe_provenance`).

Arrays are in the scan's voxel frame (i, j, k) = (left→right, posterior→anterior,
inferior→superior) after ``nib.as_closest_canonical``; ``voxel_size`` in mm in that frame.
χ and differences are in ppm.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from .files import atomic_write
from .progress import Progress, check_cancel

__all__ = [
    "METRIC_ORDER", "CompareRow", "CompareTable", "compare", "iter_compare", "best_per_column",
    "to_csv", "to_text", "difference_maps", "difference", "field_residual_map", "Plane",
    "orthogonal_slices", "RegionFit", "RegionStats", "region_stats", "metric_info", "format_metric",
    "nice", "auto_window", "table_of", "describe_provenance", "offsets", "shown_difference", "compare_steps",
]

#: display order of the metric columns (keys of ``metrics.compute_metrics``)
METRIC_ORDER: tuple[str, ...] = (
    "psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "correlation",
    "field_residual",
)
REFERENCE_METRICS: tuple[str, ...] = METRIC_ORDER[:-1]

# Used only when napari_qsm.core.metrics does not describe a key (label, unit, higher_is_better, doc).
_FALLBACK_INFO = {
    "psnr": ("PSNR", "dB", True, "peak signal-to-noise ratio against the reference"),
    "nrmse": ("NRMSE", "%", False, "100·‖x − r‖/‖r‖ in the mask"),
    "nrmse_demeaned": ("NRMSE (demeaned)", "%", False, "NRMSE after removing the mean in the mask"),
    "nrmse_detrended": ("NRMSE (detrended)", "%", False, "NRMSE after the linear fit x = a·r + b"),
    "hfen": ("HFEN", "%", False, "NRMSE of Laplacian-of-Gaussian filtered images"),
    "ssim": ("SSIM", "", True, "structural similarity"),
    "xsim": ("XSIM", "", True, "structural similarity tuned for χ maps"),
    "correlation": ("Correlation", "", True, "Pearson correlation in the mask"),
    "field_residual": ("Field residual", "%", False, "‖D∗χ − f‖/‖f‖ in the mask"),
}


def _metrics_module():
    from . import metrics  # imported lazily: slicing and region statistics do not need it

    return metrics


def metric_info(key: str) -> tuple[str, str, bool, str]:
    """(label, unit, higher_is_better, definition) of a metric key."""
    try:
        info = _metrics_module().METRIC_INFO
    except Exception:  # pragma: no cover - metrics module unavailable
        info = {}
    if key in info:
        label, unit, hib, doc = info[key]
        return str(label), str(unit or ""), bool(hib), str(doc)
    return _FALLBACK_INFO.get(key, (key, "", True, ""))


# ----------------------------------------------------------------------------------------------
# Metric table
# ----------------------------------------------------------------------------------------------

@dataclass
class CompareRow:
    """Metrics of one result (``metrics``: metric key → value)."""

    name: str
    metrics: dict

    def __getitem__(self, key: str) -> float:
        return self.metrics[key]

    def get(self, key: str, default=float("nan")) -> float:
        return self.metrics.get(key, default)


@dataclass
class CompareTable:
    """Rows (one per result) × columns (metric keys, in :data:`METRIC_ORDER`)."""

    rows: list = field(default_factory=list)
    columns: list = field(default_factory=list)
    reference: Optional[str] = None  # reference name (None: field residual only)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def row(self, name: str) -> CompareRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def column(self, key: str) -> np.ndarray:
        return np.array([r.get(key) for r in self.rows], dtype=np.float64)

    def to_dicts(self) -> list[dict]:
        return [{"result": r.name, **{c: r.get(c) for c in self.columns}} for r in self.rows]


def _columns_for(keys_seen: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(keys_seen))
    cols = [k for k in METRIC_ORDER if k in seen]
    return cols + [k for k in seen if k not in cols]


def table_of(rows: Sequence[CompareRow], reference: Optional[str] = None) -> CompareTable:
    """A table of these rows, its columns every metric they hold (in :data:`METRIC_ORDER`)."""
    keys = [k for r in rows for k in r.metrics]
    return CompareTable(rows=list(rows), columns=_columns_for(keys), reference=reference)


def _as_volume(name: str, a, shape=None) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D volume, got shape {arr.shape}")
    if shape is not None and arr.shape != tuple(shape):
        raise ValueError(f"{name}: shape {arr.shape} does not match the reference/mask shape {tuple(shape)}")
    return arr


def _as_mask(mask, shape) -> np.ndarray:
    if mask is None:
        return np.ones(shape, bool)
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask: shape {m.shape} does not match the volume shape {tuple(shape)}")
    m = m > 0.5 if m.dtype != bool else m
    if not m.any():
        raise ValueError("mask: empty (no voxel > 0.5)")
    return m


def iter_compare(results: Mapping[str, np.ndarray], reference=None, mask=None, field=None,
                 voxel_size=None, b0_direction=None, *, progress: Optional[Callable] = None,
                 cancel=None) -> Iterator[CompareRow]:
    """Yield one :class:`CompareRow` per result (so a GUI worker can stop between results).

    With ``reference``: every metric of ``compute_metrics`` (plus the field residual when
    ``field`` is given). Without: the field-consistency residual only (needs ``field``,
    ``voxel_size`` and ``b0_direction``).
    """
    if not results:
        return
    items = list(results.items())
    shape = np.asarray(reference).shape if reference is not None else np.asarray(items[0][1]).shape
    if reference is not None:
        reference = _as_volume("reference", reference)
    m = _as_mask(mask, shape)
    if reference is None and field is None:
        raise ValueError("compare: without a reference a measured field is needed (field residual)")
    if field is not None:
        field = _as_volume("field", field, shape)
        if voxel_size is None or b0_direction is None:
            raise ValueError("field: the field residual needs voxel_size and b0_direction")
    cm = _metrics_module().compute_metrics
    n = len(items)
    for i, (name, x) in enumerate(items):
        check_cancel(cancel)
        x = _as_volume(f"result {name!r}", x, shape)
        vals = cm(x, ref=reference, mask=m, field=field, voxel_size=voxel_size, b0_direction=b0_direction)
        keep = REFERENCE_METRICS if reference is not None else ()
        keep = keep + (("field_residual",) if field is not None else ())
        row = CompareRow(name=str(name), metrics={k: float(v) for k, v in vals.items()
                                                  if k in keep or k not in METRIC_ORDER})
        if progress is not None:
            progress(Progress(step=i + 1, total=n, message=f"metrics {name}", stage="compare"))
        yield row


def compare(results: Mapping[str, np.ndarray], reference=None, mask=None, field=None,
            voxel_size=None, b0_direction=None, *, reference_name: Optional[str] = None,
            progress: Optional[Callable] = None, cancel=None) -> CompareTable:
    """Metric table of every result (name → χ array, ppm) against ``reference`` inside ``mask``.

    Each row holds exactly what :func:`napari_qsm.core.metrics.compute_metrics` returns for that
    result (all reference metrics, and ``field_residual`` when ``field`` is given; without a
    reference only ``field_residual``).
    """
    rows = list(iter_compare(results, reference, mask, field, voxel_size, b0_direction,
                             progress=progress, cancel=cancel))
    ref_name = reference_name if reference_name is not None else ("reference" if reference is not None else None)
    return table_of(rows, ref_name)


def best_per_column(table: CompareTable) -> dict[str, str]:
    """Metric key → name of the best result (``METRIC_INFO`` higher_is_better; NaN ignored)."""
    out = {}
    for c in table.columns:
        vals = table.column(c)
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        hib = metric_info(c)[2]
        v = np.where(ok, vals, -np.inf if hib else np.inf)
        idx = int(np.argmax(v) if hib else np.argmin(v))
        out[c] = table.rows[idx].name
    return out


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{float(v):.6g}"


def to_text(table: CompareTable, sep: str = "\t", labels: bool = True) -> str:
    """Table as text (tab-separated by default, for the clipboard). ``labels``: "PSNR (dB)" headers."""
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep, lineterminator="\n")
    if labels:
        head = []
        for c in table.columns:
            lab, unit = metric_info(c)[:2]
            head.append(f"{lab} ({unit})" if unit else lab)
    else:
        head = list(table.columns)
    w.writerow(["result"] + head)
    for r in table.rows:
        w.writerow([r.name] + [_fmt(r.get(c)) for c in table.columns])
    return buf.getvalue()


def to_csv(table: CompareTable, path) -> Path:
    """Write the table as CSV (header: ``result`` and the metric keys), atomically. Returns the path."""
    p = Path(path)
    if not p.parent.exists():
        raise ValueError(f"CSV: directory {p.parent} does not exist")
    text = to_text(table, sep=",", labels=False)

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(text)

    atomic_write(p, write)
    return p


# ----------------------------------------------------------------------------------------------
# Display helpers (what the Compare widget shows; no Qt)
# ----------------------------------------------------------------------------------------------

def format_metric(key: str, v: float) -> str:
    """A metric value as the table shows it ("—" for missing, 4 decimals for similarities)."""
    if v is None or not math.isfinite(v):
        return "—"
    if key in ("ssim", "xsim", "correlation"):
        return f"{v:.4f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.2f}"


def nice(v: float) -> float:
    """Round to 2 significant digits (contrast defaults)."""
    if v == 0 or not math.isfinite(v):
        return 0.0
    e = math.floor(math.log10(abs(v))) - 1
    return round(v, -e)


def auto_window(volume: np.ndarray, mask: Optional[np.ndarray] = None) -> Optional[tuple[float, float, float]]:
    """(χ low, χ high, difference ±limit): 1st–99th percentile in the mask, Δ a third of that.

    A subsample of about 2 million voxels is used; None when there is no finite voxel.
    """
    step = max(1, int(round((volume.size / 2e6) ** (1 / 3))))
    sub = volume[::step, ::step, ::step]
    if mask is not None:
        vals = sub[mask[::step, ::step, ::step]]
    else:
        vals = sub.ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return None
    lo, hi = np.percentile(vals, [1.0, 99.0])
    if hi - lo < 1e-6:
        lo, hi = lo - 0.05, hi + 0.05
    lo, hi = nice(lo), nice(hi)
    return lo, hi, nice(max(abs(hi - lo) / 3.0, 1e-3))


def describe_provenance(prov) -> str:
    """Short line for a result's provenance record: method and run time (and device when recorded).

    The parameters that differ from the defaults are already in the result's name ("TKD δ=0.15",
    "MEDI λ=1000"); the full record stays in the layer's metadata, so raw parameter names
    ("memory_gb 3") are not repeated here.
    """
    if not isinstance(prov, dict):
        return ""
    bits = [str(prov.get("method", "")).upper()]
    sec = prov.get("seconds")
    if isinstance(sec, (int, float)):
        bits.append(f"{sec:.1f} s" if sec < 100 else f"{sec / 60:.1f} min")
    dev = prov.get("device")
    if isinstance(dev, str) and dev and dev != "cpu":
        bits.append(dev)
    return " · ".join(b for b in bits if b)


# ----------------------------------------------------------------------------------------------
# Difference maps
# ----------------------------------------------------------------------------------------------

def _masked_mean(x: np.ndarray, m: np.ndarray) -> float:
    return float(np.mean(x[m], dtype=np.float64)) if m.any() else 0.0


def difference(x, reference, mask=None, demean: bool = True) -> np.ndarray:
    """x − reference (ppm, float32); ``demean``: both demeaned inside the mask; 0 outside the mask."""
    ref = _as_volume("reference", reference)
    x = _as_volume("result", x, ref.shape)
    m = _as_mask(mask, ref.shape)
    d = x.astype(np.float32) - ref.astype(np.float32)
    if demean:
        d -= np.float32(_masked_mean(d, m))
    if mask is not None:
        d[~m] = 0.0
    return d


def difference_maps(results: Mapping[str, np.ndarray], reference, mask=None,
                    demean: bool = True) -> dict[str, np.ndarray]:
    """name → :func:`difference` of each result against the reference."""
    return {name: difference(x, reference, mask, demean) for name, x in results.items()}


def offsets(results: Mapping[str, np.ndarray], reference, mask=None) -> Iterator[tuple[str, float]]:
    """(name, mean of result − reference in the mask), one result at a time (the demeaning offsets)."""
    m = mask
    for n, x in results.items():
        d = np.subtract(x[m] if m is not None else x, reference[m] if m is not None else reference,
                        dtype=np.float64)
        yield n, float(d.mean()) if d.size else 0.0


def shown_difference(x, reference, mask=None, offset: Optional[float] = None, demean: bool = True) -> np.ndarray:
    """x − reference as float32 in the arrays' own axis order; ``demean``: minus ``offset`` (None:
    the mean inside the mask); 0 outside the mask. What the widget's difference layers show."""
    d = np.subtract(x, reference, dtype=np.float32)
    if demean:
        off = offset
        if off is None:
            off = float(d[mask].mean()) if mask is not None else float(d.mean())
        d -= np.float32(off)
    if mask is not None:
        d[~mask] = 0.0
    return d


def field_residual_map(chi, field, mask, voxel_size, b0_direction, device="auto") -> np.ndarray:
    """D∗χ − field inside the mask (ppm), demeaned in the mask; 0 outside. No reference needed."""
    from .dipole import forward_field

    f = _as_volume("field", field)
    chi = _as_volume("result", chi, f.shape)
    m = _as_mask(mask, f.shape)
    r = forward_field(chi, voxel_size, b0_direction, device=device) - f.astype(np.float32)
    r -= np.float32(_masked_mean(r, m))
    r[~m] = 0.0
    return r.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Orthogonal slices
# ----------------------------------------------------------------------------------------------

PLANES = ("axial", "coronal", "sagittal")


@dataclass
class Plane:
    """One 2-D plane for ``imshow(data, origin="lower", extent=extent)``.

    ``data[row, col]``: rows run along the vertical axis (``v_axis``), columns along the
    horizontal one (``h_axis``). ``extent`` = (left, right, bottom, top) in mm (voxel edges);
    ``cross`` = (h, v) of the point in mm; ``index`` = the voxel index of the plane along its normal.
    """

    name: str
    data: np.ndarray
    extent: tuple
    h_axis: int
    v_axis: int
    normal: int
    index: int
    cross: tuple

    @property
    def width_mm(self) -> float:
        return abs(self.extent[1] - self.extent[0])

    @property
    def height_mm(self) -> float:
        return abs(self.extent[3] - self.extent[2])


# (name, normal axis, horizontal axis, vertical axis)
_PLANE_AXES = (("axial", 2, 0, 1), ("coronal", 1, 0, 2), ("sagittal", 0, 1, 2))


def plane_extent(shape, voxel_size, h_axis: int, v_axis: int) -> tuple:
    vs = np.asarray(voxel_size, dtype=np.float64)
    return (-0.5 * vs[h_axis], (shape[h_axis] - 0.5) * vs[h_axis],
            -0.5 * vs[v_axis], (shape[v_axis] - 0.5) * vs[v_axis])


def clamp_point(point, shape) -> tuple[int, int, int]:
    """Nearest voxel index inside the volume for a (possibly fractional / out-of-range) point."""
    return tuple(int(min(max(int(round(float(p))), 0), n - 1)) for p, n in zip(point, shape))


def orthogonal_slices(volume, point, voxel_size=(1.0, 1.0, 1.0)) -> tuple[Plane, Plane, Plane]:
    """Axial (k fixed), coronal (j fixed) and sagittal (i fixed) planes through ``point``.

    ``point``: voxel indices (i, j, k) (rounded and clamped). Planes are views of ``volume``
    (transposed so that the vertical axis is the row axis); pass ``extent`` to ``imshow`` with
    ``origin="lower"`` and an equal aspect for physical proportions:
    axial: x = i (left→right), y = j (posterior→anterior);
    coronal: x = i, y = k (inferior→superior); sagittal: x = j, y = k.
    """
    vol = np.asarray(volume)
    if vol.ndim != 3:
        raise ValueError(f"volume: expected a 3-D array, got shape {vol.shape}")
    idx = clamp_point(point, vol.shape)
    vs = np.asarray(voxel_size, dtype=np.float64)
    out = []
    for name, n_ax, h_ax, v_ax in _PLANE_AXES:
        sl = [slice(None)] * 3
        sl[n_ax] = idx[n_ax]
        data = vol[tuple(sl)]          # 2-D, axes (h, v) in increasing axis order
        # remaining axes are in increasing order; h_ax < v_ax for all three planes → transpose
        data = data.T
        out.append(Plane(name=name, data=data, extent=plane_extent(vol.shape, vs, h_ax, v_ax),
                         h_axis=h_ax, v_axis=v_ax, normal=n_ax, index=idx[n_ax],
                         cross=(idx[h_ax] * vs[h_ax], idx[v_ax] * vs[v_ax])))
    return tuple(out)


def plane_click_to_point(plane: Plane, x_mm: float, y_mm: float, point, shape, voxel_size) -> tuple:
    """Voxel point after a click at (x_mm, y_mm) in ``plane``: the in-plane indices change."""
    vs = np.asarray(voxel_size, dtype=np.float64)
    p = list(clamp_point(point, shape))
    p[plane.h_axis] = int(round(x_mm / vs[plane.h_axis]))
    p[plane.v_axis] = int(round(y_mm / vs[plane.v_axis]))
    return clamp_point(p, shape)


# ----------------------------------------------------------------------------------------------
# Region statistics
# ----------------------------------------------------------------------------------------------

@dataclass
class RegionFit:
    """Least-squares fit ``result_mean = slope · reference_mean + intercept`` over the regions."""

    slope: float
    intercept: float
    r2: float
    n: int


@dataclass
class RegionStats:
    """Mean χ (ppm) per label for the reference and every result, and the fits against it."""

    labels: list                   # label values with at least one voxel (in the mask)
    names: list                    # label names
    counts: np.ndarray             # voxels per label
    reference: Optional[np.ndarray]  # reference mean per label (None without reference)
    means: dict                    # result name → mean per label
    stds: dict                     # result name → standard deviation per label
    fits: dict                     # result name → RegionFit (only with a reference)

    def to_text(self, sep: str = "\t") -> str:
        buf = io.StringIO()
        w = csv.writer(buf, delimiter=sep, lineterminator="\n")
        cols = (["reference"] if self.reference is not None else []) + list(self.means)
        w.writerow(["label", "name", "voxels"] + [f"{c} mean (ppm)" for c in cols])
        for i, (lab, nm) in enumerate(zip(self.labels, self.names)):
            vals = ([self.reference[i]] if self.reference is not None else []) + [self.means[c][i] for c in self.means]
            w.writerow([lab, nm, int(self.counts[i])] + [_fmt(v) for v in vals])
        for key in ("slope", "intercept", "r2"):
            if self.fits:
                w.writerow([key, "", ""] + ([""] if self.reference is not None else [])
                           + [_fmt(getattr(self.fits[c], key)) if c in self.fits else "" for c in self.means])
        return buf.getvalue()


def linear_fit(x, y) -> RegionFit:
    """Ordinary least squares y = a·x + b with R² = 1 − SS_res/SS_tot (NaN when undefined)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    if n < 2 or np.ptp(x) == 0:
        return RegionFit(float("nan"), float("nan"), float("nan"), n)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    a = float(((x - xm) * (y - ym)).sum() / sxx)
    b = float(ym - a * xm)
    ss_tot = float(((y - ym) ** 2).sum())
    ss_res = float(((y - (a * x + b)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))
    return RegionFit(a, b, r2, n)


def region_stats(results: Mapping[str, np.ndarray], reference, labels, label_names=None,
                 mask=None, include=None) -> RegionStats:
    """Mean χ per label per result (and reference), plus each result's fit against the reference.

    ``labels``: integer volume (0 = background, ignored). ``label_names``: {value: name}.
    ``mask``: only voxels inside it count. ``include``: label values to keep (default: all > 0
    with voxels). Without ``reference`` (None) the means are returned and ``fits`` is empty.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels: expected a 3-D label volume, got shape {lab.shape}")
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.all(np.isfinite(lab)) or np.any(lab != np.round(lab)):
            raise ValueError("labels: expected integer label values")
        lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError("labels: negative label values are not supported")
    sel = lab > 0
    if mask is not None:
        sel &= _as_mask(mask, lab.shape)
    flat = lab[sel].astype(np.int64)
    nbins = int(flat.max()) + 1 if flat.size else 1
    counts = np.bincount(flat, minlength=nbins)
    present = [int(v) for v in np.nonzero(counts)[0] if v > 0]
    if include is not None:
        keep = {int(v) for v in include}
        present = [v for v in present if v in keep]
    idx = np.asarray(present, dtype=np.int64)
    cnt = counts[idx].astype(np.int64) if idx.size else np.zeros(0, np.int64)

    def stats(name, vol):
        v = _as_volume(name, vol, lab.shape)
        vals = v[sel].astype(np.float64)
        s1 = np.bincount(flat, weights=vals, minlength=nbins)
        s2 = np.bincount(flat, weights=vals * vals, minlength=nbins)
        mean = s1[idx] / np.maximum(cnt, 1)
        var = np.maximum(s2[idx] / np.maximum(cnt, 1) - mean * mean, 0.0)
        return mean, np.sqrt(var)

    names = [str((label_names or {}).get(v, (label_names or {}).get(str(v), f"label {v}"))) for v in present]
    ref_mean = stats("reference", reference)[0] if reference is not None else None
    means, stds, fits = {}, {}, {}
    for name, x in results.items():
        m, s = stats(f"result {name!r}", x)
        means[str(name)] = m
        stds[str(name)] = s
        if ref_mean is not None:
            fits[str(name)] = linear_fit(ref_mean, m)
    return RegionStats(labels=present, names=names, counts=cnt, reference=ref_mean, means=means,
                       stds=stds, fits=fits)


# ----------------------------------------------------------------------------------------------
# Step by step (a GUI worker)
# ----------------------------------------------------------------------------------------------

def compare_steps(results: Mapping[str, np.ndarray], reference=None, mask=None, field=None, voxel_size=None,
                  b0_direction=None, labels=None, label_names=None, reference_name: Optional[str] = None,
                  residual_maps: bool = False) -> Iterator[tuple]:
    """Everything the Compare widget shows, one step at a time, so that a newer request can stop
    an older one between steps. Yields ``("noop", None)`` after each offset, ``("offsets", {name:
    ppm})`` (with a reference), ``("residual", name, map)`` (``residual_maps`` and a field), ``("row",
    CompareRow, i, n)``, ``("table", CompareTable)`` and ``("regions", RegionStats)`` (with labels)."""
    names = list(results)
    if reference is not None:
        offs = {}
        for n, off in offsets(results, reference, mask):
            offs[n] = off
            yield ("noop", None)
        yield ("offsets", offs)
    if residual_maps and field is not None:
        m = mask if mask is not None else np.ones(field.shape, bool)
        for n, x in results.items():
            yield ("residual", n, field_residual_map(x, field, m, voxel_size, b0_direction))
    rows = []
    for i, row in enumerate(iter_compare(results, reference, mask, field, voxel_size, b0_direction)):
        rows.append(row)
        yield ("row", row, i + 1, len(names))
    yield ("table", table_of(rows, reference_name))
    if labels is not None:
        yield ("regions", region_stats(results, reference, labels, label_names, mask=mask))
