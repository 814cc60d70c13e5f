"""Layers <-> core: volume geometry in layer metadata, layers -> Scan, Result -> layer.

The core works in the canonical voxel frame (i, j, k) = (L→R, P→A, I→S) of
``nib.as_closest_canonical``. Layers present a volume with its axes permuted for axial browsing:
layer axis ``a`` holds canonical axis ``axes[a]``; the default ``DISPLAY_AXES = (2, 1, 0)`` puts the
slices (k, I→S) on the slider and shows (j, i) in the canvas.

Layer metadata keys written by the reader, the sample data and the widgets (all in the canonical
frame, never permuted):

``role``          "field" (local field), "total_field" (B0 / field map, background not removed),
                  "phase" (raw phase), "mask", "magnitude", "chi", "chi_true", "labels",
                  "noise_std", "image" (see :func:`napari_qsm._napari.reader.guess_role`)
``axes``          the permutation above (list of 3 ints)
``affine``        4x4 canonical voxel -> scanner mm (list of lists)
``voxel_size``    mm, canonical order
``b0_direction``  unit vector, canonical voxel frame (from the affine: R⁻¹·ẑ)
``geometry_known`` False when the layer carried no geometry and it was guessed
``path``          source file (or None); ``nifti_info`` original orientation/header (python objects)
``sidecar``       the JSON sidecar next to the file, when there was one (BIDS EchoTime, …)
``provenance``    for results: :meth:`napari_qsm.core.method.Result.provenance`, plus
                  ``acquisition`` (B0 in T and TE in s the method was given, and where they came from)
``echo_time``     s, one echo of a multi-echo file; ``b0_tesla`` / ``te`` may also be set directly

Anything handing a layer to the core goes through :func:`to_canonical` /
:func:`scan_from_layers`, which undo the permutation, so a reconstruction from layers equals the
one from the files.
"""

from __future__ import annotations

import weakref

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..core.constants import GAMMA_BAR_MHZ_PER_T
from ..core.io import b0_from_affine, to_ppm, voxel_sizes
from ..core.scan import Scan, ScanError

DISPLAY_AXES = (2, 1, 0)
# Canonical axis names (RAS+): i, j, k.
AXIS_NAMES = ("L→R", "P→A", "I→S")
CHI_CONTRAST = (-0.15, 0.15)  # ppm, result display window
GEOMETRY_KEYS = ("axes", "affine", "voxel_size", "b0_direction", "geometry_known", "path",
                 "nifti_info", "sidecar")


@dataclass
class Geometry:
    """Where a layer's voxels are: permutation to the canonical frame and physical description."""

    axes: tuple            # layer axis a holds canonical axis axes[a]
    voxel_size: np.ndarray  # canonical order, mm
    b0_direction: np.ndarray  # canonical voxel frame
    affine: np.ndarray      # canonical voxel -> scanner mm
    known: bool = True      # False: guessed from scale/translate (no affine in the metadata)

    def layer_kwargs(self) -> dict:
        """scale / translate / units / axis_labels of a layer presenting the volume with ``axes``."""
        ax = list(self.axes)
        return {
            "scale": tuple(float(v) for v in np.asarray(self.voxel_size)[ax]),
            "translate": tuple(float(v) for v in np.asarray(self.affine)[:3, 3][ax]),
            "units": ("mm",) * 3,
            "axis_labels": tuple(AXIS_NAMES[a] for a in ax),
        }

    def metadata(self) -> dict:
        return {
            "axes": [int(a) for a in self.axes],
            "affine": np.asarray(self.affine, float).tolist(),
            "voxel_size": [float(v) for v in self.voxel_size],
            "b0_direction": [float(v) for v in self.b0_direction],
            "geometry_known": bool(self.known),
        }

    @classmethod
    def from_affine(cls, affine, axes=DISPLAY_AXES) -> "Geometry":
        aff = np.asarray(affine, dtype=np.float64)
        return cls(axes=tuple(int(a) for a in axes), voxel_size=voxel_sizes(aff),
                   b0_direction=b0_from_affine(aff), affine=aff, known=True)


#: viewers whose layer selection already updates the χ caption (no private attribute on the Viewer)
_CAPTIONED: "weakref.WeakSet" = weakref.WeakSet()

def check_axes(axes) -> tuple:
    ax = tuple(int(a) for a in axes)
    if sorted(ax) != [0, 1, 2]:
        raise ScanError(f"layer metadata: 'axes' must be a permutation of (0, 1, 2), got {axes!r}")
    return ax


def to_layer_order(data: np.ndarray, axes=DISPLAY_AXES) -> np.ndarray:
    """Canonical (i, j, k) array -> layer order (contiguous, for fast slicing)."""
    return np.ascontiguousarray(np.transpose(np.asarray(data), check_axes(axes)))


def to_canonical(data: np.ndarray, axes=DISPLAY_AXES) -> np.ndarray:
    """Layer-order array -> canonical (i, j, k) order (undoes the display permutation)."""
    return np.ascontiguousarray(np.transpose(np.asarray(data), np.argsort(check_axes(axes))))


def layer_geometry(layer) -> Geometry:
    """Geometry of a layer: from its metadata, or guessed from scale/translate.

    A layer without napari-qsm metadata (e.g. from numpy or another reader) is taken to be in
    numpy (slice, row, column) order, i.e. ``axes = (2, 1, 0)``: voxel size = reversed scale and
    B0 along the slice axis. ``known`` is then False and the widget says so.
    """
    md = getattr(layer, "metadata", None) or {}
    if np.ndim(layer.data) != 3 and getattr(layer, "ndim", 3) != 3:
        raise ScanError(f"layer '{layer.name}': expected a 3-D volume, got {layer.ndim}-D data")
    return geometry_from(md, np.asarray(layer.scale, dtype=np.float64)[-3:],
                         np.asarray(layer.translate, dtype=np.float64)[-3:])


def geometry_from(md: dict, scale, translate) -> Geometry:
    """Geometry from napari-qsm metadata, else guessed from a layer's (3-D) scale and translate.

    The guess is as in :func:`layer_geometry` (display axes, B0 along the slice axis, ``known`` False).
    """
    if "affine" in md and "axes" in md:
        axes = check_axes(md["axes"])
        aff = np.asarray(md["affine"], dtype=np.float64)
        vs = np.asarray(md.get("voxel_size", voxel_sizes(aff)), dtype=np.float64)
        b0 = np.asarray(md.get("b0_direction", b0_from_affine(aff)), dtype=np.float64)
        return Geometry(axes=axes, voxel_size=vs, b0_direction=b0, affine=aff,
                        known=bool(md.get("geometry_known", True)))
    axes = DISPLAY_AXES
    scale = np.abs(np.asarray(scale, dtype=np.float64))
    translate = np.asarray(translate, dtype=np.float64)
    inv = np.argsort(axes)
    vs = scale[inv]
    aff = np.eye(4)
    aff[:3, :3] = np.diag(vs)
    aff[:3, 3] = translate[inv]
    return Geometry(axes=axes, voxel_size=vs, b0_direction=np.array([0.0, 0.0, 1.0]), affine=aff, known=False)


# -- field strength and echo time known for a layer --------------------------------------------------

def _positive(v) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (list, tuple)) and len(v) == 1:
        v = v[0]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) and f > 0 else None


def _te_seconds(v) -> Optional[float]:
    """An echo time in seconds; values above 1 are taken as milliseconds (BIDS wants seconds)."""
    f = _positive(v)
    if f is None:
        return None
    return f / 1000.0 if f > 1.0 else f


def _header_te(header) -> Optional[float]:
    """TE (s) from a NIfTI header's description as dcm2niix writes it ("TE=20;Time=…", ms)."""
    import re

    try:
        descrip = header["descrip"]
        text = descrip.item().decode("latin-1") if hasattr(descrip, "item") else str(descrip)
    except Exception:
        return None
    m = re.search(r"(?:^|[;\s])TE=([0-9]*\.?[0-9]+)", text)
    if not m:
        return None
    f = _positive(m.group(1))
    return None if f is None else f / 1000.0


def acquisition_from_metadata(md: Optional[dict]) -> dict:
    """Field strength and echo time a layer's metadata tells, with where each came from.

    Returns ``{"b0_tesla": T or None, "te": s or None, "b0_from": text, "te_from": text}``.
    B0, first hit: metadata ``b0_tesla``; the JSON sidecar's ``ImagingFrequency`` (MHz) / γ̄
    (the exact field: a "3 T" Siemens is 2.89 T), else its ``MagneticFieldStrength``; a result's
    provenance ``acquisition``. TE: metadata ``echo_time`` (one echo of a multi-echo file) or
    ``te``; the sidecar's ``EchoTime`` (s; one value, or the list entry of this echo); the
    provenance; the NIfTI header description ``TE=…`` (ms, as dcm2niix writes it).
    """
    md = md or {}
    side = md.get("sidecar") if isinstance(md.get("sidecar"), dict) else {}
    prov = md.get("provenance") if isinstance(md.get("provenance"), dict) else {}
    acq = prov.get("acquisition") if isinstance(prov.get("acquisition"), dict) else {}
    if not acq and isinstance(side.get("acquisition"), dict):
        acq = side["acquisition"]
    out = {"b0_tesla": None, "te": None, "b0_from": "", "te_from": ""}

    b0_hits = [(md.get("b0_tesla"), "layer metadata")]
    freq = _positive(side.get("ImagingFrequency"))
    if freq is not None:
        b0_hits.append((freq / GAMMA_BAR_MHZ_PER_T, "sidecar ImagingFrequency"))
    b0_hits += [(side.get("MagneticFieldStrength"), "sidecar MagneticFieldStrength"),
                (acq.get("b0_tesla"), "provenance")]
    for v, src in b0_hits:
        f = _positive(v)
        if f is not None:
            out["b0_tesla"], out["b0_from"] = f, src
            break

    te_side = side.get("EchoTime")
    if isinstance(te_side, (list, tuple)) and len(te_side) > 1:
        echo = md.get("echo")
        te_side = te_side[echo] if isinstance(echo, int) and 0 <= echo < len(te_side) else None
    te_hits = [(md.get("echo_time"), "layer metadata (echo time)"), (md.get("te"), "layer metadata"),
               (te_side, "sidecar EchoTime"), (acq.get("te"), "provenance")]
    for v, src in te_hits:
        f = _te_seconds(v)
        if f is not None:
            out["te"], out["te_from"] = f, src
            break
    if out["te"] is None:
        info = md.get("nifti_info")
        header = info.get("header") if isinstance(info, dict) else None
        if header is not None:
            f = _header_te(header)
            if f is not None:
                out["te"], out["te_from"] = f, "NIfTI header description"
    return out


def _layer_array(layer, what: str) -> np.ndarray:
    data = layer.data
    if isinstance(data, (list, tuple)):  # multiscale: full resolution
        data = data[0]
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ScanError(f"{what}: layer '{layer.name}' is {arr.ndim}-D (shape {arr.shape}); expected a 3-D volume")
    return arr


def scan_from_layers(field_layer, mask_layer, magnitude_layer=None, *, units: str = "ppm",
                     te: Optional[float] = None, b0_tesla: Optional[float] = None,
                     b0_direction: Optional[Sequence[float]] = None,
                     voxel_size: Optional[Sequence[float]] = None, noise_layer=None) -> Scan:
    """Build a :class:`Scan` (canonical frame) from napari layers.

    ``b0_direction`` / ``voxel_size`` override the field layer's geometry; both are in the
    canonical voxel frame (i, j, k). ``units``/``te``/``b0_tesla`` convert the field to ppm;
    ``te`` (s) and ``b0_tesla`` (T) are kept on the Scan for every unit, ppm included, because
    the methods that work with phase use them (MEDI's rad/ppm scale uses B0, the adaptation's
    phase wrap uses 2π·γ̄·B0·TE). Errors are :class:`ScanError` naming the input.
    """
    if field_layer is None:
        raise ScanError("field: no layer chosen; open a local field map (ppm, Hz or rad)")
    if mask_layer is None:
        raise ScanError("mask: no layer chosen; open a brain mask (0/1) for the field")
    geom = layer_geometry(field_layer)
    fdata = _layer_array(field_layer, "field")
    layers = {"mask": mask_layer, "magnitude": magnitude_layer, "noise_std": noise_layer}
    arrays = {}
    for name, lay in layers.items():
        if lay is None:
            arrays[name] = None
            continue
        arr = _layer_array(lay, name)
        if arr.shape != fdata.shape:
            raise ScanError(f"{name}: layer '{lay.name}' has shape {arr.shape}, the field layer "
                            f"'{field_layer.name}' has {fdata.shape}")
        g = layer_geometry(lay)
        if g.known and geom.known and (tuple(g.axes) != tuple(geom.axes)
                                        or not np.allclose(g.affine, geom.affine, atol=1e-3)):
            raise ScanError(f"{name}: layer '{lay.name}' is on a different voxel grid (affine or axis "
                            f"order) than the field layer '{field_layer.name}'; resample it first")
        if not np.allclose(np.abs(np.asarray(lay.scale)[-3:]), np.abs(np.asarray(field_layer.scale)[-3:]), rtol=1e-4):
            raise ScanError(f"{name}: layer '{lay.name}' has voxel size (scale) {tuple(lay.scale)}, the field "
                            f"layer has {tuple(field_layer.scale)}")
        arrays[name] = to_canonical(arr, geom.axes)
    field = to_ppm(to_canonical(fdata, geom.axes).astype(np.float32), units, te=te, b0=b0_tesla, name="field")
    mask = arrays["mask"]
    if mask is not None and mask.dtype != bool:
        mask = mask > 0 if np.issubdtype(mask.dtype, np.integer) else mask > 0.5
    md = field_layer.metadata or {}
    source = {"field": md.get("path") or f"layer:{field_layer.name}",
              "mask": (mask_layer.metadata or {}).get("path") or f"layer:{mask_layer.name}",
              "units": units}
    if magnitude_layer is not None:
        source["magnitude"] = (magnitude_layer.metadata or {}).get("path") or f"layer:{magnitude_layer.name}"
    if te is not None:
        source["te"] = float(te)
    if b0_tesla is not None:
        source["b0_tesla"] = float(b0_tesla)
    if md.get("background_removal"):   # a local field from the Field dock: which background removal made it
        source["field_facts"] = {"BackgroundRemoval": str(md["background_removal"])}
    scan = Scan(field=field, mask=mask,
                voxel_size=tuple(voxel_size) if voxel_size is not None else tuple(geom.voxel_size),
                b0_direction=b0_direction if b0_direction is not None else geom.b0_direction,
                magnitude=arrays["magnitude"], noise_std=arrays["noise_std"], affine=geom.affine,
                te=te, b0_tesla=b0_tesla, name=str(field_layer.name), source=source)
    if md.get("nifti_info") is not None:
        scan.nifti_info = md["nifti_info"]
    return scan


def derived_layer_kwargs(reference_layer, *, name: str, role: str, extra_metadata: Optional[dict] = None) -> dict:
    """Layer kwargs for a new volume on the same grid as ``reference_layer`` (scale, translate, metadata)."""
    geom = layer_geometry(reference_layer)
    md = dict(geom.metadata())
    ref_md = reference_layer.metadata or {}
    for k in ("path", "nifti_info"):
        if k in ref_md:
            md[k] = ref_md[k]
    md["role"] = role
    md.update(extra_metadata or {})
    kw = {"name": name, "metadata": md,
          "scale": tuple(float(s) for s in reference_layer.scale),
          "translate": tuple(float(t) for t in reference_layer.translate)}
    if geom.known:
        kw.update(units=("mm",) * 3, axis_labels=geom.layer_kwargs()["axis_labels"])
    else:
        kw["units"] = tuple(str(u) for u in reference_layer.units)
        kw["axis_labels"] = tuple(reference_layer.axis_labels)
    return kw


def result_layer_data(result, field_layer, *, scan: Optional[Scan] = None, inputs: Optional[dict] = None):
    """(data in layer order, Image kwargs) for a :class:`~napari_qsm.core.method.Result`."""
    geom = layer_geometry(field_layer)
    prov = result.provenance()
    if inputs:
        prov["inputs"] = dict(inputs)
    extra = {"provenance": prov, "units": "ppm", "quantity": "magnetic susceptibility", "method": result.method}
    if scan is not None:  # record the geometry actually used (e.g. an edited B0 direction)
        extra["b0_direction"] = [float(v) for v in scan.b0_direction]
        extra["voxel_size"] = [float(v) for v in scan.voxel_size]
        # field strength and echo time the method was given (also for ppm input: MEDI's and the
        # adaptation's phase scaling use them); where they came from, when the dock knows it
        acq = {"b0_tesla": None if scan.b0_tesla is None else float(scan.b0_tesla),
               "te": None if scan.te is None else float(scan.te)}
        for k in ("b0_from", "te_from"):
            if inputs and inputs.get(k):
                acq[k] = str(inputs[k])
        prov["acquisition"] = acq
        if scan.b0_tesla is not None:
            extra["b0_tesla"] = float(scan.b0_tesla)
        if scan.te is not None:
            extra["te"] = float(scan.te)
    kw = derived_layer_kwargs(field_layer, name=result.name, role="chi", extra_metadata=extra)
    kw.update(colormap="gray", contrast_limits=CHI_CONTRAST)
    return to_layer_order(result.chi, geom.axes), kw


def extra_volumes(result, shape) -> dict:
    """The 3-D arrays among a result's extras that live on the scan grid (e.g. residual maps)."""
    out = {}
    for k, v in (result.extras or {}).items():
        if isinstance(v, np.ndarray) and v.shape == tuple(shape) and np.issubdtype(v.dtype, np.number):
            out[k] = v
    return out


def robust_limits(data: np.ndarray, symmetric: Optional[bool] = None, pct: float = 99.5) -> tuple:
    """Display window from percentiles of the non-zero voxels (symmetric about 0 for signed maps)."""
    a = np.asarray(data)
    step = max(1, int(round((a.size / 2_000_000) ** (1 / 3)))) if a.ndim == 3 else 1
    sub = a[::step, ::step, ::step] if a.ndim == 3 else a
    v = sub[np.isfinite(sub) & (sub != 0)]
    if v.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(v, [100 - pct, pct])
    if symmetric is None:
        symmetric = lo < 0 < hi and min(-lo, hi) > 0.2 * max(-lo, hi)
    if symmetric:
        m = float(max(abs(lo), abs(hi))) or 1.0
        return (-m, m)
    lo = min(float(lo), 0.0) if lo >= 0 else float(lo)
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def b0_angle_deg(b0_direction, axis: int = 2) -> float:
    """Angle (degrees) between B0 and a canonical voxel axis (default k, the slice axis)."""
    b = np.asarray(b0_direction, float)
    b = b / np.linalg.norm(b)
    return float(np.degrees(np.arccos(min(1.0, abs(b[axis])))))


# -- colour bar of χ layers ---------------------------------------------------------------------
CHI_CAPTION = "χ (ppm)"


def _text_overlay(viewer):
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return getattr(overlays, "text", None)


def is_chi_layer(layer) -> bool:
    md = getattr(layer, "metadata", None) or {}
    return md.get("role") == "chi" and md.get("units", "ppm") == "ppm"


def _update_chi_caption(viewer) -> None:
    """'χ (ppm)' next to the colour bar while the selected layer is a χ result (never over a caption set by others)."""
    ov = _text_overlay(viewer)
    if ov is None:
        return
    active = viewer.layers.selection.active
    ours = ov.text in ("", CHI_CAPTION) or ov.text.endswith(f": {CHI_CAPTION}")
    if not ours:
        return
    if active is not None and is_chi_layer(active) and active.visible:
        ov.position = "top_right"  # napari tiles it with the colour bar
        ov.text = f"{active.name}: {CHI_CAPTION}"
        ov.visible = True
    elif ov.text:
        ov.text = ""
        ov.visible = False


def show_chi_colorbar(viewer, layer) -> None:
    """napari's colour bar on a χ result layer, captioned 'χ (ppm)' (napari ≥ 0.6: ``layer.colorbar``)."""
    bar = getattr(layer, "colorbar", None)
    if bar is None:
        return
    bar.visible = True
    if viewer not in _CAPTIONED:
        try:
            viewer.layers.selection.events.active.connect(lambda *_: _update_chi_caption(viewer))
            _CAPTIONED.add(viewer)
        except Exception:
            return
    try:
        layer.events.visible.connect(lambda *_: _update_chi_caption(viewer))
        layer.events.name.connect(lambda *_: _update_chi_caption(viewer))
    except Exception:
        pass
    _update_chi_caption(viewer)
