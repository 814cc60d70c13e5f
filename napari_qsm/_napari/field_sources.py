"""Raw echoes in napari layers: magnitude / phase sources, the core's :class:`Echoes` from them, result layers.

napari aligns layers of different dimensionality on their trailing axes, so 3-D maps line up
with 4-D echoes only when the echo axis comes first. The reader's and the sample's echo layers
are echo-first already; a 4-D layer added by hand with the echo on another axis (``echo_axis``
e.g. 3) is turned echo-first in place by :func:`make_echo_first` (its data is a view).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.field.records import Echoes
from ..core.scan import ScanError
from .layer_roles import layer_role
from .layers import Geometry, acquisition_from_metadata, check_axes, geometry_from, robust_limits, to_layer_order

__all__ = ["EchoSource", "echo_sources", "source_geometry", "source_array", "source_echo_times", "echoes_from_sources",
           "make_echo_first", "field_layer_data"]


@dataclass
class EchoSource:
    """Where one part (magnitude or phase) of the echoes lives: a 4-D layer, or per-echo 3-D layers of one file."""

    label: str
    layers: list
    echo_axis: Optional[int] = None   # 4-D layer: its echo axis; None for a group of 3-D layers

    @property
    def layer(self):
        return self.layers[0]

    @property
    def metadata(self) -> dict:
        return dict(getattr(self.layers[0], "metadata", None) or {})

    @property
    def n_echoes(self) -> int:
        if self.echo_axis is None:
            return len(self.layers)
        return int(np.shape(self.layers[0].data)[self.echo_axis])

    def alive(self, viewer) -> bool:
        return all(lay in viewer.layers for lay in self.layers)



def _md(layer) -> dict:
    return getattr(layer, "metadata", None) or {}



def _echo_axis(layer) -> int:
    ax = _md(layer).get("echo_axis")
    if isinstance(ax, int) and 0 <= ax < 4:
        return ax
    return 0  # numpy (echo, slice, row, column) when nothing says otherwise


def echo_sources(viewer) -> list:
    """Every magnitude / phase candidate in the viewer: 4-D image layers and per-echo groups of one file."""
    from napari.layers import Image

    out, groups = [], {}
    for lay in viewer.layers:
        if not isinstance(lay, Image) or getattr(lay, "rgb", False):
            continue
        md = _md(lay)
        if lay.ndim == 4:
            ax = _echo_axis(lay)
            out.append(EchoSource(f"{lay.name} ({lay.data.shape[ax]} echoes)", [lay], ax))
        elif lay.ndim == 3 and isinstance(md.get("echo"), int) and md.get("path"):
            groups.setdefault((md["path"], layer_role(lay)), []).append(lay)
    for (path, _), lays in groups.items():
        if len(lays) < 2:
            continue
        lays = sorted(lays, key=lambda la: _md(la)["echo"])
        stem = _md(lays[0]).get("source_name") or Path(path).name
        out.append(EchoSource(f"{stem} (echoes {len(lays)} layers)", lays, None))
    return out


def source_geometry(src: EchoSource) -> Geometry:
    lay = src.layer
    scale, translate = np.asarray(lay.scale, float), np.asarray(lay.translate, float)
    if src.echo_axis is not None:
        keep = [a for a in range(4) if a != src.echo_axis]
        scale, translate = scale[keep], translate[keep]
    return geometry_from(src.metadata, scale, translate)


def source_array(src: EchoSource, axes) -> np.ndarray:
    """The echoes of a source in the canonical frame, (i, j, k, echo) float32."""
    inv = list(np.argsort(check_axes(axes)))
    if src.echo_axis is None:
        vols = [np.asarray(lay.data) for lay in src.layers]
        return np.ascontiguousarray(np.stack([np.transpose(v, inv) for v in vols], -1), dtype=np.float32)
    a = np.moveaxis(np.asarray(src.layer.data), src.echo_axis, -1)
    return np.ascontiguousarray(np.transpose(a, inv + [3]), dtype=np.float32)


def source_echo_times(src: EchoSource) -> Optional[list]:
    """Echo times (s) the metadata tells, or None."""
    if src.echo_axis is None:
        tes = [acquisition_from_metadata(_md(lay))["te"] for lay in src.layers]
        return tes if all(t is not None for t in tes) else None
    md = src.metadata
    side = md.get("sidecar") if isinstance(md.get("sidecar"), dict) else {}
    for v in (md.get("echo_times"), md.get("te"), side.get("EchoTime")):
        if isinstance(v, (list, tuple)) and len(v) == src.n_echoes:
            try:
                tes = [float(t) for t in v]
            except (TypeError, ValueError):
                continue
            return [t / 1000.0 if t > 1.0 else t for t in tes]
    return None


def _prefix(name: str) -> str:
    """"raw head magnitude (5 echoes)" → "raw head"; "sub-01_part-mag_MEGRE" → "sub-01"."""
    n = re.sub(r"\s*\(.*\)$", "", name)
    n = re.sub(r"[_\- ]?(part-mag|magnitude|mag)([_\- ].*)?$", "", n, flags=re.IGNORECASE)
    n = re.sub(r"_MEGRE$", "", n)
    return n.strip() or "echoes"


def echoes_from_sources(mag: EchoSource, phase: EchoSource, te_s, b0_tesla: float, phase_units: str = "auto",
                        phase_sign=None) -> Echoes:
    """Build the core's :class:`Echoes` from two sources (errors name the input)."""
    from ..core.field.phase_units import phase_to_radians

    if mag is None:
        raise ScanError("magnitude: no echoes chosen; open a raw multi-echo scan (a BIDS or DICOM folder, or the "
                        "sample 'raw multi-echo head')")
    if phase is None:
        raise ScanError("phase: no echoes chosen; choose the phase layer of the same scan")
    geom = source_geometry(mag)
    m = source_array(mag, geom.axes)
    p = source_array(phase, source_geometry(phase).axes)
    if p.shape != m.shape:
        raise ScanError(f"phase: '{phase.label}' has shape {p.shape[:3]} with {p.shape[3]} echoes, the magnitude "
                        f"'{mag.label}' {m.shape[:3]} with {m.shape[3]}; expected the same scan")
    if not np.all(np.isfinite(p)):
        raise ScanError(f"phase: '{phase.label}' holds NaN/Inf values")
    side = mag.metadata.get("sidecar") if isinstance(mag.metadata.get("sidecar"), dict) else {}
    manufacturer = str(side.get("Manufacturer") or "")
    units = phase_units
    if phase_units == "auto" and (phase.metadata.get("units") == "rad" or phase.metadata.get("phase_units") == "rad"):
        units = "rad"  # the reader already converted it
    # the core's one conversion (radians, signed/unsigned Siemens, Philips mrad, rescale with evidence, GE sign)
    p, facts = phase_to_radians(p, units, manufacturer, None if phase_sign in (None, 0) else int(phase_sign),
                                name=f"phase '{phase.label}'", magnitude=m)
    units, reason, phase_sign = facts["phase_units"], facts["phase_units_source"], facts["phase_sign"]
    vendor = {"phase_units": units, "phase_units_source": reason, "phase_sign": int(phase_sign),
              "manufacturer": manufacturer or None, "from_layers": [lay.name for lay in mag.layers + phase.layers]}
    srcs = tuple(str(_md(la).get("path")) for la in mag.layers + phase.layers if _md(la).get("path"))
    return Echoes(magnitude=m, phase=p, te=tuple(te_s), b0_tesla=float(b0_tesla), affine=geom.affine,
                  voxel_size=tuple(float(v) for v in geom.voxel_size), b0_direction=geom.b0_direction, vendor=vendor,
                  sources=tuple(dict.fromkeys(srcs)), nifti_info=mag.metadata.get("nifti_info"),
                  name=_prefix(mag.label))


def make_echo_first(layer) -> bool:
    """Turn a 4-D echo layer echo-first in place (a view of its data), so that 3-D maps line up with it.

    Returns True when the layer was changed.
    """
    ax = _echo_axis(layer)
    if layer.ndim != 4 or ax == 0:
        return False
    order = [ax] + [a for a in range(4) if a != ax]
    md = dict(_md(layer))
    md["echo_axis"] = 0
    kw = {k: tuple(np.asarray(getattr(layer, k))[order]) for k in ("scale", "translate")}
    labels = tuple(np.asarray(layer.axis_labels, dtype=object)[order])
    units = tuple(np.asarray([str(u) for u in layer.units], dtype=object)[order])
    layer.data = np.moveaxis(np.asarray(layer.data), ax, 0)
    layer.scale = kw["scale"]
    layer.translate = kw["translate"]
    try:
        layer.axis_labels = labels
        layer.units = units
    except Exception:  # older napari: no per-layer axis labels/units
        pass
    layer.metadata = md
    return True


def field_layer_data(run, geom: Geometry, prefix: str, source_md: Optional[dict] = None) -> dict:
    """Layer data tuples of a :class:`~napari_qsm.core.field.pipeline.FieldRun`, by key, on ``geom``'s grid.

    Keys: total_field, brain_mask, local_field, mask (eroded), magnitude, r2star, noise_std.
    """
    kw_geo = geom.layer_kwargs()
    base = dict(geom.metadata())
    source_md = source_md or {}
    for k in ("path", "nifti_info", "sidecar"):
        if source_md.get(k) is not None:
            base[k] = source_md[k]
    scan = run.scan
    base.update({"b0_tesla": float(scan.b0_tesla), "te": float(scan.te),
                 "field_steps": [dict(s) for s in run.steps], "echoes": run.provenance.get("echoes", {})})
    ax = geom.axes
    tot = run.total
    bg = run.background_name

    def img(arr, name, role, units=None, visible=False, symmetric=None, cmap="gray", **extra):
        d = to_layer_order(np.asarray(arr, np.float32), ax)
        md = dict(base, role=role, **extra)
        if units:
            md["units"] = units
        return (d, dict(name=f"{prefix} {name}", colormap=cmap, visible=visible, metadata=md,
                        contrast_limits=robust_limits(d, symmetric=symmetric), **kw_geo), "image")

    def lab(arr, name, visible=False, **extra):
        d = to_layer_order(np.asarray(arr).astype(np.uint8), ax)
        return (d, dict(name=f"{prefix} {name}", visible=visible, opacity=0.35, metadata=dict(base, role="mask", **extra),
                        **kw_geo), "labels")

    return {
        "total_field": img(tot.field, "total field", "total_field", "ppm", symmetric=True),
        "r2star": img(tot.r2star, "R2* (1/s)", "r2star", "1/s", symmetric=False, cmap="magma"),
        "noise_std": img(tot.noise_std, "noise (N_std)", "noise_std", "ppm", symmetric=False),
        "magnitude": img(tot.magnitude, "combined magnitude", "magnitude", symmetric=False),
        "mask": lab(scan.mask, "eroded mask", stage="eroded by background removal"),
        # which background removal made it: scan_from_layers carries it to the Scan (MEDI's weak_harmonic=auto)
        "local_field": img(scan.field, "local field", "field", "ppm", visible=True, symmetric=True,
                           **({"background_removal": bg} if bg else {})),
        # on top (added last), visible: the mask to check and correct by hand (field_mask)
        "brain_mask": lab(run.brain_mask, "brain mask", visible=True, stage="before background removal"),
    }

