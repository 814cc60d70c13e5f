"""Layer ↔ scan frame for the Compare dock: a layer's array may be a transposed view of the scan's
voxel frame (the plugin shows volumes slices-first); the comparison works in the voxel frame.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

_PERM_KEYS = ("axes", "axis_permutation", "permutation", "axes_permutation", "transpose", "axis_order",
              "display_permutation", "perm")
_GEOMETRY_KEYS = ("axes", "affine", "voxel_size", "b0_direction", "geometry_known")


def meta(layer) -> dict:
    """The layer's metadata dict (empty when it has none)."""
    md = getattr(layer, "metadata", None) or {}
    return md if isinstance(md, dict) else {}


def _plugin_geometry(layer):
    """The plugin's own geometry record (``layers.layer_geometry``), or None when unavailable."""
    try:
        from ..layers import layer_geometry
    except ImportError:  # pragma: no cover - the plugin's layer helpers are missing
        return None
    try:
        return layer_geometry(layer)
    except Exception:
        return None


def layer_permutation(layer) -> Optional[tuple]:
    """``p`` with ``layer.data == canonical.transpose(p)`` (None: the layer is in the voxel frame).

    The plugin stores it as ``metadata["axes"]`` (layer axis a holds canonical axis axes[a]);
    layers without geometry follow the plugin's convention for plain arrays.
    """
    g = _plugin_geometry(layer)
    if g is not None:
        p = tuple(int(a) for a in g.axes)
        return None if p == (0, 1, 2) else p
    md = meta(layer)
    for k in _PERM_KEYS:
        v = md.get(k)
        if v is None:
            continue
        try:
            p = tuple(int(a) for a in v)
        except (TypeError, ValueError):
            continue
        if sorted(p) == [0, 1, 2]:
            return None if p == (0, 1, 2) else p
    return None


def to_canonical_axes(values, p: Optional[tuple]) -> list:
    """Per-layer-axis values (3) → per-canonical-axis values (layer axis a holds canonical p[a])."""
    out = [float(v) for v in values]
    if p is not None:
        for a in range(3):
            out[p[a]] = float(values[a])
    return out


def to_layer_axes(values, p: Optional[tuple]) -> list:
    """Per-canonical-axis values (3) → per-layer-axis values (the inverse of :func:`to_canonical_axes`)."""
    return [float(values[a if p is None else p[a]]) for a in range(3)]


def canonical(layer) -> np.ndarray:
    """The layer's 3-D data in the scan's voxel frame (a view; no copy for numpy data)."""
    data = layer.data
    if getattr(layer, "multiscale", False):
        data = data[0]
    a = np.asarray(data)
    if a.ndim != 3:
        raise ValueError(f"layer {layer.name!r}: expected a 3-D volume, got shape {a.shape}")
    p = layer_permutation(layer)
    return a if p is None else a.transpose(np.argsort(p))


def in_layer_frame(volume: np.ndarray, layer) -> np.ndarray:
    """A voxel-frame volume in ``layer``'s axis order (a view)."""
    p = layer_permutation(layer)
    return volume if p is None else volume.transpose(p)


def canonical_geometry(layer) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(voxel size in mm, B0 direction or None) in the voxel frame of :func:`canonical`."""
    g = _plugin_geometry(layer)
    if g is not None:
        return np.asarray(g.voxel_size, dtype=np.float64), np.asarray(g.b0_direction, dtype=np.float64)
    scale = np.abs(np.asarray(layer.scale, dtype=np.float64)[-3:])
    vs = np.asarray(to_canonical_axes(scale, layer_permutation(layer)))
    b0 = meta(layer).get("b0_direction")
    if b0 is not None:
        b0 = np.asarray(b0, dtype=np.float64).reshape(-1)
        if b0.shape != (3,) or not np.all(np.isfinite(b0)):
            b0 = None
    return vs, b0


def point_from_world(layer, world) -> tuple:
    """The voxel-frame point (floats) of a world position, through ``layer``'s transform."""
    data = np.asarray(layer.world_to_data(np.asarray(world, dtype=np.float64)))[-3:]
    return tuple(to_canonical_axes(data, layer_permutation(layer)))


def world_from_point(layer, point) -> np.ndarray:
    """The world position of a voxel-frame point of ``layer`` (inverse of :func:`point_from_world`)."""
    data = to_layer_axes(point, layer_permutation(layer))
    return np.asarray(layer.data_to_world(data), dtype=np.float64)


def label_names_of(layer) -> dict:
    """{value: name} of a Labels layer from its metadata (``label_names``) or features."""
    md = meta(layer)
    for k in ("label_names", "labels", "names"):
        v = md.get(k)
        if isinstance(v, dict):
            out = {}
            for kk, vv in v.items():
                try:
                    out[int(kk)] = str(vv)
                except (TypeError, ValueError):
                    pass
            if out:
                return out
    try:
        feats = layer.features
        for col in ("name", "label_name", "names"):
            if col in feats.columns and "index" in feats.columns:
                return {int(i): str(n) for i, n in zip(feats["index"], feats[col])}
    except Exception:
        pass
    return {}


def like(layer, role: str = "difference", **extra) -> dict:
    """Layer kwargs for a volume on the grid of ``layer`` (same transform, geometry metadata)."""
    md = {k: v for k, v in meta(layer).items() if k in _GEOMETRY_KEYS}
    md.update(role=role, units="ppm", compare_added=True, **extra)
    kw = dict(scale=tuple(layer.scale), translate=tuple(layer.translate), rotate=layer.rotate, metadata=md)
    for k in ("units", "axis_labels"):
        val = getattr(layer, k, None)
        if val is not None:
            kw[k] = tuple(str(u) for u in val)
    return kw
