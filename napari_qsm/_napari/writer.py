"""NIfTI writer (npe2 ``napari-qsm.write_image`` / ``napari-qsm.write_labels``).

The layer data is put back into the canonical voxel order (undoing the display permutation
recorded in the metadata) and written with :func:`napari_qsm.core.io.save_volume`: in the source
file's orientation and header when the layer came from a file, else with the canonical affine
(or one built from the layer's scale/translate). A JSON provenance sidecar goes next to it.
The writer refuses to overwrite the file the layer was read from.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.io import nifti_path_ok, save_volume
from ..core.scan import ScanError
from .layers import check_axes, DISPLAY_AXES, to_canonical


def _affine_from_attributes(attributes: dict, axes) -> np.ndarray:
    scale = np.abs(np.asarray(attributes.get("scale", (1, 1, 1)), float))[-3:]
    translate = np.asarray(attributes.get("translate", (0, 0, 0)), float)[-3:]
    inv = np.argsort(axes)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(scale[inv])
    aff[:3, 3] = translate[inv]
    return aff


def _write(path: str, data, attributes: dict, *, labels: bool) -> list[str]:
    p = Path(path)
    if not nifti_path_ok(p):
        p = p.with_name(p.name + ".nii.gz")
    arr = np.asarray(data[0] if isinstance(data, (list, tuple)) else data)
    if arr.ndim != 3:
        raise ScanError(f"napari-qsm writer: layer '{attributes.get('name')}' is {arr.ndim}-D; "
                        "only 3-D volumes can be written as NIfTI")
    md = dict(attributes.get("metadata") or {})
    src = md.get("path")
    if src and Path(src).resolve() == p.resolve():
        raise ScanError(f"napari-qsm writer: {p} is the file this layer was read from; "
                        "choose another name (inputs are never overwritten)")
    axes = check_axes(md.get("axes", DISPLAY_AXES))
    affine = np.asarray(md["affine"], float) if "affine" in md else _affine_from_attributes(attributes, axes)
    canon = to_canonical(arr, axes)
    info = md.get("nifti_info")
    if info is not None:
        orig_shape = md.get("original_shape")
        if orig_shape is not None and len(orig_shape) != 3 and int(np.prod(orig_shape[3:])) > 1:
            info = None  # a single echo of a 4-D file: keep the orientation, not the 4-D header
    if info is not None:
        info = {k: info[k] for k in ("original_affine", "ornt", "header") if k in info}
        if len(info) != 3:
            info = None
    prov = dict(md.get("provenance") or {})
    prov.setdefault("software", "napari-qsm")
    prov.setdefault("version", __version__)
    prov["layer"] = {
        "name": attributes.get("name"),
        "role": md.get("role"),
        "units": md.get("units"),
        "source": src,
        "voxel_size": md.get("voxel_size"),
        "b0_direction": md.get("b0_direction"),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    dtype = np.float32
    if labels:
        dtype = np.uint8 if (canon.min() >= 0 and canon.max() < 256) else np.int32
    out = save_volume(canon, p, affine, nifti_info=info, provenance=prov, dtype=dtype)
    return [str(out)]


def write_image(path: str, data, attributes: dict) -> list[str]:
    """npe2 single-layer writer for image layers."""
    return _write(path, data, attributes, labels=False)


def write_labels(path: str, data, attributes: dict) -> list[str]:
    """npe2 single-layer writer for labels layers (masks, label maps)."""
    return _write(path, data, attributes, labels=True)
