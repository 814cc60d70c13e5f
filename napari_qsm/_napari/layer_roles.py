"""Which layer is what: the layer heuristics the docks share (roles by metadata or name, grids, echo-fit maps)."""

from __future__ import annotations

import re

import numpy as np

from ..core.scan import ScanError
from .layers import layer_geometry, to_canonical
from .reader import guess_role

__all__ = ["is_image", "is_volume", "layer_role", "map_role", "same_run", "map_array"]


def is_image(layer) -> bool:
    """A greyscale image layer."""
    from napari.layers import Image
    return isinstance(layer, Image) and not getattr(layer, "rgb", False)


def is_volume(layer) -> bool:
    """A 3-D image or labels layer."""
    from napari.layers import Image, Labels
    return isinstance(layer, (Image, Labels)) and getattr(layer, "ndim", 0) == 3 and not getattr(layer, "rgb", False)


def layer_role(layer) -> str:
    """The layer's role: its metadata's "role", else guessed from its name."""
    md = getattr(layer, "metadata", None) or {}
    return md.get("role") or guess_role(layer.name)


_R2STAR_NAME = re.compile(r"(^|[_\-. ])r2(star|s|\*)", re.IGNORECASE)


def map_role(layer) -> str:
    """Role of an echo-fit map: the metadata's, else "r2star" for names like R2*, r2star, R2starmap, else by name."""
    md = getattr(layer, "metadata", None) or {}
    if md.get("role"):
        return md["role"]
    return "r2star" if _R2STAR_NAME.search(layer.name) else guess_role(layer.name)


def same_run(a, b) -> bool:
    """False only when both layers come from Field dock runs and not from the same one."""
    sa = (getattr(a, "metadata", None) or {}).get("field_steps")
    sb = (getattr(b, "metadata", None) or {}).get("field_steps")
    return sa is None or sb is None or sa == sb


def map_array(layer, what: str, field_layer) -> np.ndarray:
    """A 3-D map layer on the field layer's grid, in the canonical frame (ScanError naming ``what``)."""
    data = layer.data[0] if isinstance(layer.data, (list, tuple)) else layer.data
    arr = np.asarray(data)
    fshape = tuple(np.shape(field_layer.data))
    if arr.shape != fshape:
        raise ScanError(f"{what}: layer '{layer.name}' has shape {arr.shape}, the field layer "
                        f"'{field_layer.name}' has {fshape}")
    g, geom = layer_geometry(layer), layer_geometry(field_layer)
    if g.known and geom.known and (tuple(g.axes) != tuple(geom.axes) or not np.allclose(g.affine, geom.affine,
                                                                                      atol=1e-3)):
        raise ScanError(f"{what}: layer '{layer.name}' is on a different voxel grid than the field layer "
                        f"'{field_layer.name}'; resample it first")
    if np.iscomplexobj(arr):
        raise ScanError(f"{what}: layer '{layer.name}' is complex; expected a real-valued map")
    return np.ascontiguousarray(to_canonical(arr, geom.axes), dtype=np.float32)
