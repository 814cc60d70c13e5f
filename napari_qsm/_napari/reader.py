"""NIfTI reader (npe2 ``napari-qsm.get_reader``).

* Returns None for anything that is not ``.nii`` / ``.nii.gz`` (never raises for a foreign file).
* Volumes are reoriented to the closest canonical (RAS+) voxel order and shown with the slices
  (I→S) on the slider: layer axes (k, j, i), scale = voxel size in mm, translate from the affine,
  units mm, axis labels; the canonical affine, voxel size, B0 direction (R⁻¹·ẑ), source path,
  the original orientation/header and any JSON sidecar go into the layer metadata
  (see :mod:`napari_qsm._napari.layers`). napari cannot slice obliquely, so the rotation part of
  an oblique affine is kept in the metadata (and used for B0), not applied to the display.
* Float data → float32 image layers; 0/1 or small non-negative integer volumes → Labels.
* 4-D multi-echo (echoes on the last axis) → one layer per echo; complex data → magnitude and
  phase layers.
* Each layer gets a ``role`` from its name (:func:`guess_role`): only a local field is offered as
  the reconstruction's field by default; a raw phase gets role "phase", a B0 / field map role
  "total_field" (inputs of the front end, not of an inversion).
* A file that cannot be read gives an error notification and no layer (no traceback).
* A BIDS MEGRE folder (an ``anat`` folder, or a subject/session folder above it, holding
  ``*_echo-N_part-mag|phase_MEGRE.nii[.gz]`` with JSON sidecars) opens through the front end's
  loader (:func:`napari_qsm.core.field.load.load_echoes`: phase scaled to radians, TE and B0 from
  the sidecars) as two 4-D layers, magnitude and phase, echo FIRST (so that 3-D maps made from
  them line up), with ``echo_times`` (s), ``b0_tesla`` and the vendor facts in the metadata: the
  input of the Field dock (:mod:`napari_qsm._napari.field_widget`).
* The per-echo layers of a 4-D file also carry ``echo_times`` (s, all echoes) and ``b0_tesla``
  when the sidecar tells them, so the Field dock can take the file's echoes as one source.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..core.io import NiftiError, load_image, nifti_path_ok, sidecar_path
from .layers import DISPLAY_AXES, Geometry, robust_limits, to_layer_order

MAX_LABEL_VALUES = 64     # integer volumes with at most this many distinct values open as Labels
MAX_LABEL_VALUE = 10000

# Word boundaries in file and layer names: start/end, "_", "-", ".", space (BIDS "part-phase", "sub-01_field").
_B = r"(^|[_\-. ])"
_E = r"([_\-. ]|$)"

_ROLE_PATTERNS = [
    ("mask", _B + r"(mask|brainmask|brain_mask|roi|seg|aseg)" + _E),
    ("labels", r"(label|parc|atlas|dseg)"),
    ("chi_true", r"(chi_?true|ground_?truth|truth)"),
    ("chi", r"(chi|qsm|suscept)"),
    ("noise_std", r"(noise|n_?std|sigma)"),
    ("magnitude", r"((?<!i)mag|t2s|gre_?m|(?<!part-)imag(?!e|inary))"),
    # local (tissue) field: background removed
    ("field", r"(local[_\- ]?field|" + _B + r"local" + _E + r"|" + _B + r"(lfs|rdf)" + _E + r"|tissue)"),
    # total field / B0 map: still holds the background field
    ("total_field", r"(total[_\- ]?field|field[_\- ]?map|b0[_\- ]?map|b0[_\- ]?field|" + _B + r"(tfs|fmap)" + _E
     + r"|freq)"),
    # raw (wrapped or unwrapped) phase of the echoes
    ("phase", r"(phase|unwrapped|" + _B + r"(ph|pha)" + _E + r")"),
    ("field", r"field"),
]


def guess_role(name: str) -> str:
    """Role of a volume from its file (or layer) name; first rule that matches, case-insensitive.

    ==============  ========================================================================
    role            name contains
    ==============  ========================================================================
    mask            the word mask, brainmask, brain_mask, roi, seg or aseg
    labels          label, parc, atlas, dseg
    chi_true        chi_true / chitrue, ground_truth, truth
    chi             chi, qsm, suscept
    noise_std       noise, n_std / nstd, sigma
    magnitude       mag, magnitude, t2s, gre_m, imag (MEDI's iMag; not image, imaginary or
                    BIDS part-imag)
    field           the LOCAL field: localfield / local_field / local-field, the word local,
                    the words lfs (local field shift) or rdf (MEDI's relative difference
                    field), tissue (tissue field or tissue phase)
    total_field     the total field or B0 map, background NOT removed: totalfield /
                    total_field, fieldmap / field_map, b0map / b0_map, b0field, the words tfs
                    or fmap, freq (MEDI's iFreq, frequency maps)
    phase           raw phase of the echoes: phase (BIDS part-phase), unwrapped, the words ph
                    or pha
    field           any other name with field in it (field, sub-01_field, phantom field)
    image           anything else
    ==============  ========================================================================

    Only ``field`` is a local field: the reconstruction dock picks it by default. A raw phase
    (``phase``) and a total field (``total_field``) still need the front end (unwrapping, echo
    fit, background removal); they open as plain images with that role and are never the
    dock's default field. Words are delimited by the start/end of the name, "_", "-", "." or a
    space. Tissue phase (``tissue_phase``) counts as local, as it has no background.
    """
    n = name.lower()
    for role, pat in _ROLE_PATTERNS:
        if re.search(pat, n, flags=re.IGNORECASE):
            return role
    return "image"


# Roles of a field-like volume that is NOT a local field (the dock does not offer it by default).
NOT_LOCAL_FIELD = {"phase": "a raw phase image", "total_field": "a total field (B0 map) with the background field in it"}


def napari_get_reader(path):
    """npe2 reader contribution: a reader function for NIfTI paths or a BIDS MEGRE folder, else None."""
    paths = [path] if isinstance(path, (str, Path)) else list(path or [])
    if len(paths) == 1 and isinstance(paths[0], (str, Path)) and Path(paths[0]).is_dir():
        return read_megre_folder if is_megre_folder(paths[0]) else None
    if not paths or not all(isinstance(p, (str, Path)) and nifti_path_ok(p) for p in paths):
        return None
    return read_nifti


def _notify_error(msg: str) -> None:
    try:
        from napari.utils.notifications import show_error
        show_error(msg)
    except Exception:  # pragma: no cover - napari missing
        import warnings
        warnings.warn(msg, stacklevel=3)


def read_nifti(path):
    """Read one or more NIfTI files into napari layer data tuples."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out = []
    for p in paths:
        try:
            out.extend(nifti_layer_data(p))
        except NiftiError as exc:
            _notify_error(f"napari-qsm: {exc}")
        except Exception as exc:  # never hand napari a traceback for a bad file
            _notify_error(f"napari-qsm: cannot open {Path(p).name}: {type(exc).__name__}: {exc}")
    return out or [(None,)]


def _stem(path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _read_sidecar(path) -> dict:
    sp = sidecar_path(path)
    if sp.exists():
        try:
            obj = json.loads(sp.read_text())
            return obj if isinstance(obj, dict) else {}
        except Exception:
            return {}
    return {}


def _label_names(path, sidecar: dict):
    names = sidecar.get("label_names")
    if names is None:
        pj = Path(path).with_name("phantom.json")
        if pj.exists():
            try:
                names = json.loads(pj.read_text()).get("label_names")
            except Exception:
                names = None
    if isinstance(names, dict):
        try:
            return {int(k): str(v).replace("_", " ") for k, v in names.items()}
        except ValueError:
            return None
    return None


def looks_like_labels(data: np.ndarray, role: str = "image") -> bool:
    """0/1 masks and small non-negative integer label maps (by dtype or by integer values).

    A field, χ or magnitude file (by name) opens as Labels only when it is a pure 0/1 volume.
    """
    a = np.asarray(data)
    if np.iscomplexobj(a) or a.size == 0:
        return False
    step = max(1, int(round((a.size / 1_000_000) ** (1 / a.ndim))))
    sub = a[tuple(slice(None, None, step) for _ in range(a.ndim))]
    integer_typed = np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)
    if not integer_typed:
        if not (np.all(np.isfinite(sub)) and np.all(sub == np.round(sub))):
            return False
    if np.unique(sub).size > MAX_LABEL_VALUES:  # cheap early exit for images
        return False
    if not integer_typed and not (np.all(np.isfinite(a)) and np.all(a == np.round(a))):
        return False
    vals = np.unique(a)
    if vals.min() < 0:
        return False
    if vals.size <= 2 and vals.max() <= 1:
        return True
    if role in ("field", "total_field", "phase", "chi", "chi_true", "magnitude", "noise_std"):
        return False
    return vals.size <= MAX_LABEL_VALUES and vals.max() <= MAX_LABEL_VALUE and (
        integer_typed or role in ("labels", "mask"))


def nifti_layer_data(path) -> list:
    """Layer data tuples for one NIfTI file (raises NiftiError on unreadable files)."""
    import nibabel as nib

    path = Path(path)
    stem = _stem(path)
    img = load_image(path, name=path.name)
    orig_affine = img.affine.copy()
    try:
        can = nib.as_closest_canonical(img)
    except Exception as exc:
        raise NiftiError(f"{path.name}: cannot reorient to RAS ({exc})") from None
    raw = np.asanyarray(can.dataobj)
    # squeeze singleton dimensions beyond the third (e.g. (x, y, z, 1) or (x, y, z, 1, echoes))
    while raw.ndim > 3 and 1 in raw.shape[3:]:
        ax = 3 + raw.shape[3:].index(1)
        raw = np.squeeze(raw, axis=ax)
    if raw.ndim == 2:
        raw = raw[:, :, None]
    if raw.ndim not in (3, 4):
        raise NiftiError(f"{path.name}: expected a 3-D volume or 4-D multi-echo series, got shape {raw.shape}")
    if raw.shape[:3] and min(raw.shape[:3]) < 1:
        raise NiftiError(f"{path.name}: empty volume of shape {raw.shape}")
    affine = can.affine.copy()
    geom = Geometry.from_affine(affine, DISPLAY_AXES)
    sidecar = _read_sidecar(path)
    role = guess_role(stem)
    if sidecar.get("software") == "napari-qsm" and sidecar.get("method"):
        role = "chi"
    base_md = dict(geom.metadata())
    base_md.update({
        "path": str(path.resolve()), "source_name": stem,
        "nifti_info": {"path": str(path.resolve()), "original_affine": orig_affine,
                       "ornt": nib.io_orientation(orig_affine), "header": img.header.copy()},
        "original_shape": [int(n) for n in img.shape],
    })
    if sidecar:
        base_md["sidecar"] = sidecar
        if sidecar.get("software") == "napari-qsm":
            base_md["provenance"] = sidecar
    geo_kw = geom.layer_kwargs()

    volumes = []  # (name, array canonical, role, extra metadata)
    if raw.ndim == 4:
        n = raw.shape[3]
        te = sidecar.get("EchoTime")
        for e in range(n):
            md = {"echo": e, "n_echoes": n}
            if isinstance(te, (list, tuple)) and len(te) == n:
                md["echo_time"] = float(te[e])
                md["echo_times"] = [float(t) for t in te]
            volumes.append((f"{stem} echo {e + 1}", raw[..., e], role, md))
    else:
        volumes.append((stem, raw, role, {}))

    out = []
    for name, arr, r, md_extra in volumes:
        if np.iscomplexobj(arr):
            for suffix, part, rr in (("magnitude", np.abs(arr), "magnitude"), ("phase", np.angle(arr), "phase")):
                out.append(_image_tuple(f"{name} {suffix}", part, rr, base_md, md_extra, geo_kw, geom))
            continue
        if looks_like_labels(arr, r):
            md = dict(base_md, **md_extra)
            r = "mask" if int(np.max(arr)) <= 1 else "labels"
            md["role"] = r
            lab = to_layer_order(arr.astype(np.uint8 if int(np.max(arr)) < 256 else np.int32), geom.axes)
            kw = dict(name=name, metadata=md, **geo_kw)
            if r == "mask":
                kw["opacity"] = 0.4
            names = _label_names(path, sidecar)
            if names:
                idx = sorted(set(names) | {0})
                kw["features"] = {"index": idx, "name": [names.get(i, "background" if i == 0 else str(i)) for i in idx]}
            out.append((lab, kw, "labels"))
        else:
            out.append(_image_tuple(name, arr, r, base_md, md_extra, geo_kw, geom))
    return out


def _image_tuple(name, arr, role, base_md, md_extra, geo_kw, geom):
    data = to_layer_order(np.asarray(arr, dtype=np.float32), geom.axes)
    md = dict(base_md, **md_extra)
    md["role"] = role
    if role in ("chi", "chi_true"):
        md.setdefault("units", "ppm")
        limits = (-0.15, 0.15)
    elif role in ("field", "total_field", "phase"):
        limits = robust_limits(data, symmetric=True)
    elif role in ("magnitude", "noise_std"):
        limits = robust_limits(data, symmetric=False)
    else:
        limits = robust_limits(data)
    kw = dict(name=name, metadata=md, colormap="gray", contrast_limits=limits, **geo_kw)
    return (data, kw, "image")


# ---------------------------------------------------------------------------------- raw multi-echo GRE

def is_megre_folder(path) -> bool:
    """A folder holding BIDS MEGRE echoes in it or up to two levels below (subject/session/anat); cheap."""
    from ..core.io.bids import has_megre
    return Path(path).is_dir() and has_megre(path, depth=2)


def read_megre_folder(path):
    """Read a BIDS MEGRE folder into a 4-D magnitude and a 4-D phase layer (errors: a notification, no layer)."""
    from ..core.field.load import load_echoes

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    try:
        echoes = load_echoes(str(paths[0]))
    except Exception as exc:  # a bad folder is a notification, never a traceback
        _notify_error(f"napari-qsm: {exc}")
        return [(None,)]
    return echoes_layer_data(echoes)


def echoes_layer_data(echoes, axes=DISPLAY_AXES) -> list:
    """Layer data tuples of :class:`~napari_qsm.core.field.records.Echoes`: 4-D magnitude and phase (rad), echo first.

    Spatial axes follow ``axes`` (the reader's display order), the echo is axis 0 and a slider. Metadata:
    the geometry keys of :mod:`napari_qsm._napari.layers`, ``role`` "magnitude" / "phase", ``units`` "rad"
    (phase), ``echo_axis`` 0, ``echo_times`` / ``te`` (s), ``n_echoes``, ``b0_tesla``, ``vendor`` (what the
    loader found: phase units and scaling, B0 source, warnings), ``sources`` and ``nifti_info``.
    """
    geom = Geometry(axes=tuple(axes), voxel_size=np.asarray(echoes.voxel_size, float),
                    b0_direction=np.asarray(echoes.b0_direction, float), affine=np.asarray(echoes.affine, float))
    kw = geom.layer_kwargs()
    kw4 = {"scale": (1.0,) + tuple(kw["scale"]), "translate": (0.0,) + tuple(kw["translate"]),
           "units": ("pixel",) + tuple(kw["units"]), "axis_labels": ("echo",) + tuple(kw["axis_labels"])}
    tes = [float(t) for t in echoes.te]
    base = dict(geom.metadata())
    base.update({"path": echoes.sources[0] if echoes.sources else None, "echo_axis": 0, "echo_times": tes,
                 "te": tes, "n_echoes": len(tes), "b0_tesla": float(echoes.b0_tesla), "vendor": dict(echoes.vendor),
                 "sources": list(echoes.sources), "source_name": echoes.name})
    if echoes.nifti_info is not None:
        base["nifti_info"] = echoes.nifti_info

    def stack(a):
        return np.stack([to_layer_order(a[..., e], axes) for e in range(a.shape[3])], 0).astype(np.float32, copy=False)

    mag, pha = stack(echoes.magnitude), stack(echoes.phase)
    return [
        (mag, dict(name=f"{echoes.name} magnitude", colormap="gray", metadata=dict(base, role="magnitude"),
                   contrast_limits=robust_limits(mag, symmetric=False), **kw4), "image"),
        (pha, dict(name=f"{echoes.name} phase", colormap="gray", visible=False,
                   metadata=dict(base, role="phase", units="rad"), contrast_limits=(-float(np.pi), float(np.pi)),
                   **kw4), "image"),
    ]
