"""NIfTI input/output: canonical (RAS+) reading, voxel size and B0 direction from the affine or the JSON
sidecar, unit conversion to ppm, results written back in the source's orientation with a provenance sidecar.

The rules (B0 precedence, user overrides in the file's own voxel order, sidecar keys, header reset on
writing) are in docs/io.md.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from ..constants import GAMMA_BAR_MHZ_PER_T
from ..files import atomic_write
from ..scan import Scan, ScanError

UNITS = ("ppm", "hz", "rad")


class NiftiError(ScanError):
    """A file could not be read or written as NIfTI."""


def nifti_path_ok(path) -> bool:
    p = str(path).lower()
    return p.endswith(".nii") or p.endswith(".nii.gz")


def _keep_first_read(proxy, raw: np.ndarray) -> None:
    """Let ``proxy`` hand out ``raw`` (its whole stored array, already read) the next time the whole
    array is read, instead of reading (decompressing) the file again; later reads read the file as before
    (a caller may change the array it got in place)."""
    read = proxy._get_unscaled
    kept = [raw]

    def get_unscaled(slicer):
        if kept and isinstance(slicer, tuple) and slicer == ():
            return kept.pop()
        kept.clear()
        return read(slicer)

    proxy._get_unscaled = get_unscaled


def load_image(path, name: str = "file") -> nib.Nifti1Image:
    """Load a NIfTI image, with errors naming the input.

    The data are read here, so that a corrupt or truncated file fails with a clear error; the first
    read of the whole array afterwards (``np.asarray(img.dataobj)``, ``get_fdata``, a reorientation)
    gets that data instead of decompressing a ``.nii.gz`` a second time.
    """
    p = Path(path)
    if not p.exists():
        raise NiftiError(f"{name}: file not found: {p}")
    if p.is_dir():
        raise NiftiError(f"{name}: {p} is a directory, expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
        # Force reading so corrupted/truncated data fails here, not later.
        proxy = img.dataobj
        if hasattr(proxy, "get_unscaled") and hasattr(proxy, "_get_unscaled"):
            raw = proxy.get_unscaled()
            if not isinstance(raw, np.memmap):       # a memory map reads nothing twice
                _keep_first_read(proxy, raw)
        else:
            np.asanyarray(proxy)
    except Exception as exc:
        raise NiftiError(f"{name}: cannot read {p} as NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    return img


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def b0_from_affine(affine: np.ndarray, b0_scanner=(0.0, 0.0, 1.0)) -> np.ndarray:
    """B0 direction (unit vector) in voxel coordinates: R⁻¹ · b0_scanner, R = normalised rotation."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    r = a / voxel_sizes(affine)
    b = np.linalg.solve(r, np.asarray(b0_scanner, dtype=np.float64))
    return b / np.linalg.norm(b)


def sizes_to_canonical(sizes, affine) -> np.ndarray:
    """Voxel sizes given in a file's stored voxel order → the order of ``nib.as_closest_canonical``."""
    ornt = nib.io_orientation(np.asarray(affine, np.float64))
    v = np.asarray(sizes, dtype=np.float64).reshape(3)
    out = np.empty(3)
    for i in range(3):
        out[int(ornt[i, 0])] = v[i]
    return out


def direction_to_canonical(vec, affine) -> np.ndarray:
    """A direction given in a file's stored voxel frame → the ``as_closest_canonical`` voxel frame.

    Stored axis i becomes canonical axis ``ornt[i, 0]``, reversed when ``ornt[i, 1] = -1``; the
    component is permuted and its sign flipped accordingly.
    """
    ornt = nib.io_orientation(np.asarray(affine, np.float64))
    v = np.asarray(vec, dtype=np.float64).reshape(3)
    out = np.empty(3)
    for i in range(3):
        out[int(ornt[i, 0])] = ornt[i, 1] * v[i]
    return out


class SidecarError(NiftiError):
    """A JSON sidecar exists but cannot be used: unreadable, not valid JSON, or not a JSON object."""


def read_json_object(path, name: str = "file", *, optional: bool = False) -> dict:
    """Read a JSON file that must hold one object: the one policy for every JSON sidecar.

    Parameters
    ----------
    path : str or Path
        The JSON file (a BIDS sidecar, ``dataset_description.json``, a model card...).
    name : str
        What the file belongs to, for messages (e.g. ``"field"``, ``"echo 2 phase"``).
    optional : bool
        False (default): a file that cannot be used is an error. True: the caller can do without it;
        it is ignored with a warning that names the file.

    Returns
    -------
    dict
        The object; ``{}`` when the file does not exist (or, with ``optional``, cannot be used).

    Raises
    ------
    SidecarError
        (a :class:`~napari_qsm.core.scan.ScanError`) when ``optional`` is False and the file cannot be
        read, is not valid JSON, or holds something other than an object (e.g. a JSON array); the
        message names the file and what was expected.
    """
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        msg = f"{name}: cannot read its JSON sidecar {p} ({type(exc).__name__}: {exc})"
    else:
        if isinstance(d, dict):
            return d
        msg = f"{name}: JSON sidecar {p} must hold an object ({{...}}), got a JSON {_json_kind(d)}"
    if not optional:
        raise SidecarError(msg)
    warnings.warn(f"{msg}; ignored", stacklevel=2)
    return {}


def _json_kind(v) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def read_sidecar(path, name: str = "file", *, optional: bool = False) -> dict:
    """The JSON sidecar next to a NIfTI file (``X.nii.gz`` → ``X.json``), or {} when there is none.

    Same policy as :func:`read_json_object`: a sidecar that is not a JSON object raises
    :class:`SidecarError` naming the file, or with ``optional=True`` is ignored with a warning.
    """
    return read_json_object(sidecar_path(path), name, optional=optional)


def _unit3(v, what: str) -> np.ndarray:
    try:
        a = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanError(f"{what}: expected three numbers, got {v!r}") from None
    if a.shape != (3,) or not np.all(np.isfinite(a)) or np.linalg.norm(a) == 0:
        raise ScanError(f"{what}: expected three finite numbers, not all zero, got {v!r}")
    return a / np.linalg.norm(a)


def _rotation_of(m, what: str) -> np.ndarray:
    try:
        a = np.asarray(m, dtype=np.float64)
    except (TypeError, ValueError):
        raise ScanError(f"{what}: expected a 4x4 matrix (list of 4 rows), got {m!r}") from None
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ScanError(f"{what}: expected a finite 4x4 matrix (list of 4 rows), got shape {a.shape}")
    u, sv, vt = np.linalg.svd(a[:3, :3])
    if sv.min() <= 0 or np.linalg.det(u @ vt) < 0:
        raise ScanError(f"{what}: the 3x3 part is singular or a reflection; expected a rigid registration")
    return u @ vt  # closest rotation (polar decomposition); a rigid matrix is returned unchanged


def b0_direction_in_file(affine, sidecar: Optional[dict] = None, explicit=None, name: str = "field"):
    """B0 direction (unit vector) in a file's STORED voxel frame and the rule it came from.

    Precedence: ``explicit`` → sidecar ``B0Direction`` → sidecar ``RegistrationMatrix`` (with
    this file's header as the common grid) → this file's header. See the module docstring.
    Returns ``(vector, source)`` with source one of "argument", "sidecar B0Direction",
    "sidecar RegistrationMatrix", "header".
    """
    side = sidecar or {}
    if explicit is not None:
        return _unit3(explicit, f"{name}: B0 direction"), "argument"
    if "B0Direction" in side:
        return _unit3(side["B0Direction"], f"{name}: sidecar B0Direction"), "sidecar B0Direction"
    if "RegistrationMatrix" in side:
        m = _rotation_of(side["RegistrationMatrix"], f"{name}: sidecar RegistrationMatrix")
        return b0_from_affine(affine, m @ np.array([0.0, 0.0, 1.0])), "sidecar RegistrationMatrix"
    if "AcquisitionAffine" in side:
        raise ScanError(f"{name}: its sidecar gives AcquisitionAffine but no RegistrationMatrix; the acquisition's own "
                        "affine does not say how the head was rotated onto the common grid. Add \"RegistrationMatrix\" "
                        "(4x4, acquisition scanner mm -> this file's world mm) or \"B0Direction\" (this file's voxel "
                        "frame), or give the direction explicitly")
    return b0_from_affine(affine), "header"


def _sidecar_acquisition(side: dict, name: str, te, b0, echo):
    """TE (s) and B0 (T) from BIDS sidecar keys when not given; returns (te, b0, sources).

    B0: ``ImagingFrequency`` (MHz) / γ̄ when present, else ``MagneticFieldStrength``."""
    src = {}
    if te is not None:
        src["te"] = "argument"
    elif "EchoTime" in side:
        v = side["EchoTime"]
        if isinstance(v, (list, tuple)):
            v = v[echo] if (echo is not None and -len(v) <= echo < len(v)) else (v[0] if len(v) == 1 else None)
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ScanError(f"{name}: sidecar EchoTime must be a number in seconds, got {side['EchoTime']!r}") from None
            if not np.isfinite(v) or v <= 0:
                raise ScanError(f"{name}: sidecar EchoTime must be positive (seconds), got {v!r}")
            if v > 1.0:
                raise ScanError(f"{name}: sidecar EchoTime {v} looks like milliseconds; BIDS wants seconds")
            te, src["te"] = v, "sidecar EchoTime"
    if te is None and "DeltaTE" in side:  # a field made by `napari-qsm field`: the echo spacing of its fit
        try:
            v = float(side["DeltaTE"])
        except (TypeError, ValueError):
            raise ScanError(f"{name}: sidecar DeltaTE must be a number in seconds, got {side['DeltaTE']!r}") from None
        if not np.isfinite(v) or not 0 < v <= 1.0:
            raise ScanError(f"{name}: sidecar DeltaTE must be positive seconds (<= 1), got {v!r}")
        te, src["te"] = v, "sidecar DeltaTE (echo spacing of the field's echo fit)"
    freq = side.get("ImagingFrequency")
    if b0 is not None:
        src["b0_tesla"] = "argument"
    elif freq is not None:  # the exact field: a "3 T" Siemens is 2.89 T (3.7 % χ scale error otherwise)
        try:
            v = float(freq) / GAMMA_BAR_MHZ_PER_T
        except (TypeError, ValueError):
            raise ScanError(f"{name}: sidecar ImagingFrequency must be a number in MHz, got {freq!r}") from None
        if not np.isfinite(v) or v <= 0:
            raise ScanError(f"{name}: sidecar ImagingFrequency must be positive (MHz), got {freq!r}")
        b0, src["b0_tesla"] = v, "sidecar ImagingFrequency"
    elif "MagneticFieldStrength" in side:
        try:
            v = float(side["MagneticFieldStrength"])
        except (TypeError, ValueError):
            raise ScanError(f"{name}: sidecar MagneticFieldStrength must be a number in tesla, "
                            f"got {side['MagneticFieldStrength']!r}") from None
        if not np.isfinite(v) or v <= 0:
            raise ScanError(f"{name}: sidecar MagneticFieldStrength must be positive (tesla), got {v!r}")
        b0, src["b0_tesla"] = v, "sidecar MagneticFieldStrength"
    return te, b0, src


def to_ppm(data: np.ndarray, units: str = "ppm", te: Optional[float] = None,
           b0: Optional[float] = None, name: str = "field") -> np.ndarray:
    """Convert a field map to ppm. hz: f/(γ̄·B0); rad: φ/(2π·TE·γ̄·B0)·1e6 (TE in s, B0 in T)."""
    u = str(units).strip().lower()
    if u not in UNITS:
        raise ScanError(f"units: expected one of {UNITS}, got {units!r}")
    data = np.asarray(data, dtype=np.float32)
    if u == "ppm":
        return data.copy()
    if b0 is None or not np.isfinite(b0) or b0 <= 0:
        raise ScanError(f"{name}: converting from {u} to ppm needs the field strength B0 in tesla (--b0 T / b0_tesla=)")
    if u == "hz":
        return (data / (GAMMA_BAR_MHZ_PER_T * b0)).astype(np.float32)
    if te is None or not np.isfinite(te) or te <= 0:
        raise ScanError(f"{name}: converting from rad to ppm needs the echo time TE in seconds (--te S / te=)")
    hz = data / (2 * np.pi * te)
    return (hz / (GAMMA_BAR_MHZ_PER_T * b0)).astype(np.float32)


def from_ppm(data: np.ndarray, units: str = "ppm", te=None, b0=None) -> np.ndarray:
    """Inverse of :func:`to_ppm`."""
    u = str(units).lower()
    if u == "ppm":
        return np.asarray(data, np.float32).copy()
    hz = np.asarray(data, np.float64) * GAMMA_BAR_MHZ_PER_T * b0
    if u == "hz":
        return hz.astype(np.float32)
    return (hz * 2 * np.pi * te).astype(np.float32)


def _select_echo(data: np.ndarray, echo: Optional[int], name: str, combine: bool = False) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        return data[..., 0]
    if data.ndim == 4:
        n = data.shape[3]
        if echo is None:
            if combine:  # a multi-echo magnitude: its first echo (MEDI's magnitude; keeps the echo-1 contrast)
                from ..inversion.medi import medi_magnitude
                return medi_magnitude(data, "first")
            raise ScanError(f"{name}: 4-D input with {n} echoes (shape {data.shape}); choose one with "
                            f"--echo INDEX (0..{n - 1}) on the command line or echo=INDEX in the API")
        if not -n <= echo < n:
            raise ScanError(f"{name}: echo index {echo} out of range for {n} echoes")
        return data[..., echo]
    if data.ndim != 3:
        raise ScanError(f"{name}: expected a 3-D volume (or 4-D multi-echo), got shape {data.shape}")
    return data


def read_volume(path, name: str = "file", echo: Optional[int] = None, combine_echoes: bool = False):
    """Read a NIfTI volume reoriented to closest canonical.

    Returns ``(data float32, canonical_affine, info)`` with info holding the original affine,
    orientation, header and path (used to write results back in the source orientation).
    """
    img = load_image(path, name)
    orig_affine = img.affine.copy()
    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj, dtype=np.float32)
    data = _select_echo(data, echo, name, combine=combine_echoes)
    info = {"path": str(Path(path).resolve()), "original_affine": orig_affine,
            "ornt": nib.io_orientation(orig_affine), "header": img.header.copy()}
    return data, can.affine.copy(), info


def read_aligned(path, name: str, ref_info: dict, echo: Optional[int] = None) -> np.ndarray:
    """Read a volume that must lie on a reference file's voxel grid (same stored shape and affine).

    ``ref_info`` is the info dict of :func:`read_volume` (e.g. ``scan.nifti_info``). Returns the
    data in the reference's canonical frame.
    """
    data, aff, info = read_volume(path, name, echo=echo)
    ref_shape = tuple(ref_info["header"].get_data_shape()[:3])
    if tuple(info["header"].get_data_shape()[:3]) != ref_shape:
        raise ScanError(f"{name}: shape {tuple(info['header'].get_data_shape()[:3])} does not match the field's "
                        f"{ref_shape}")
    if not np.allclose(info["original_affine"], ref_info["original_affine"], atol=1e-3):
        raise ScanError(f"{name}: its affine differs from the field's; resample it onto the field grid first")
    return data


#: sidecar keys of `napari-qsm field` outputs (core/field/facts.py) recorded in ``Scan.source["field_facts"]``
_FIELD_FACTS = ("Quantity", "Units", "EchoTimes", "DeltaTE", "PhaseUnits", "PhaseUnitsReason", "PhaseSign",
                "NoiseSigma", "NoiseSigmaSource", "Manufacturer", "BackgroundRemoval")


def load_scan(field, mask, magnitude=None, *, voxel_size: Optional[Sequence[float]] = None,
              b0_direction: Optional[Sequence[float]] = None, units: str = "ppm",
              te: Optional[float] = None, b0: Optional[float] = None, echo: Optional[int] = None,
              noise_std=None, r2star=None, frame: str = "file", sidecar: bool = True) -> Scan:
    """Build a :class:`Scan` from NIfTI paths.

    ``voxel_size`` / ``b0_direction`` override the header. With ``frame="file"`` (default) they are
    in the field file's own voxel order as stored on disk (what the header / fslinfo show) and are
    converted to the canonical frame; ``frame="canonical"`` takes them as already canonical.
    Without an explicit direction, B0 comes from the field's JSON sidecar (``B0Direction`` or
    ``RegistrationMatrix``) or else its header (:func:`b0_direction_in_file`). ``te`` / ``b0``
    default to the sidecar's ``EchoTime`` / ``MagneticFieldStrength`` (``sidecar=False`` ignores
    the sidecar; a sidecar written by ``napari-qsm field`` gives ``DeltaTE``, the echo spacing MEDI
    scales by, and its phase-unit and noise facts go to ``Scan.source["field_facts"]``). A 4-D field
    needs ``echo``; a 4-D magnitude uses ``echo`` when given, else its first echo (not a root sum of squares, which mixes the later echoes' R2* decay into the edges). ``noise_std`` (ppm) and ``r2star`` (1/s, e.g. from the echo
    fit; MEDI+0 finds CSF in it) are optional maps on the field's grid (same shape and affine).
    """
    side = read_sidecar(field, "field") if sidecar else {}
    te, b0, acq_src = _sidecar_acquisition(side, "field", te, b0, echo)
    fdata, faff, finfo = read_volume(field, "field", echo=echo)
    fdata = to_ppm(fdata, units, te=te, b0=b0)
    mdata, maff, _ = read_volume(mask, "mask")
    if mdata.shape != fdata.shape:
        raise ScanError(f"mask: shape {mdata.shape} does not match field shape {fdata.shape}")
    if not np.allclose(maff, faff, atol=1e-3):
        raise ScanError("mask: its affine differs from the field's; resample the mask onto the field grid first")
    mag = None
    if magnitude is not None:
        mag, gaff, _ = read_volume(magnitude, "magnitude", echo=echo, combine_echoes=True)
        if mag.shape != fdata.shape:
            raise ScanError(f"magnitude: shape {mag.shape} does not match field shape {fdata.shape}")
    nstd = None if noise_std is None else read_aligned(noise_std, "noise_std", finfo)
    extra = {}
    if r2star is not None:
        extra["r2star"] = read_aligned(r2star, "r2star", finfo)
    if frame not in ("file", "canonical"):
        raise ValueError(f"frame: expected 'file' or 'canonical', got {frame!r}")
    orig = finfo["original_affine"]
    if voxel_size is None:
        vs = voxel_sizes(faff)
    else:
        vs = np.asarray(voxel_size, float) if frame == "canonical" else sizes_to_canonical(voxel_size, orig)
    if b0_direction is not None and frame == "canonical":
        b0d, b0_src = _unit3(b0_direction, "b0_direction"), "argument (canonical frame)"
    else:
        b_file, b0_src = b0_direction_in_file(orig, side, b0_direction, "field")
        # header: computed on the canonical affine directly (bit-identical to the layer route)
        b0d = b0_from_affine(faff) if b0_src == "header" else direction_to_canonical(b_file, orig)
    source = {"field": finfo["path"], "mask": str(Path(mask).resolve()), "units": units,
              "b0_direction_source": b0_src}
    if voxel_size is not None:
        source["voxel_size_source"] = "argument" if frame == "file" else "argument (canonical frame)"
    source.update({f"{k}_source": v for k, v in acq_src.items()})
    facts = {k: side[k] for k in _FIELD_FACTS if k in side}
    if facts:  # written by `napari-qsm field`: how the field was made travels on to χ's provenance
        source["field_facts"] = facts
    for key, val in (("magnitude", magnitude), ("noise_std", noise_std), ("r2star", r2star)):
        if val is not None:
            source[key] = str(Path(val).resolve())
    if echo is not None:
        source["echo"] = int(echo)
    scan = Scan(field=fdata, mask=mdata, voxel_size=tuple(vs), b0_direction=b0d, magnitude=mag,
                noise_std=nstd, affine=faff, te=te, b0_tesla=b0,
                name=Path(field).name.split(".nii")[0], source=source, nifti_info=finfo, **extra)
    return scan


def load_orientation(field, ref: Scan, *, b0_direction: Optional[Sequence[float]] = None, units: str = "ppm",
                     te: Optional[float] = None, b0: Optional[float] = None, echo: Optional[int] = None,
                     sidecar: bool = True, name: Optional[str] = None) -> Scan:
    """Another orientation of the head of ``ref`` (a :func:`load_scan` result), for COSMOS.

    The field must be registered to ``ref``'s voxel grid: the same stored shape and voxel size.
    Its array is reoriented with ``ref``'s canonical transform (so the grids line up whatever this
    file's header says) and it takes ``ref``'s mask, voxel size and affine. Its B0 direction,
    in this file's stored voxel frame (= the common grid's), comes from ``b0_direction`` →
    sidecar ``B0Direction`` → sidecar ``RegistrationMatrix`` → this file's header (see the module
    docstring), converted with ``ref``'s canonical transform. ``te`` / ``b0`` default to this
    file's sidecar, else ``ref``'s values.
    """
    label = name or f"orientation {Path(field).name}"
    rinfo = ref.nifti_info
    if rinfo is None:
        raise ValueError(f"{label}: the reference scan was not loaded from a file (use load_scan)")
    side = read_sidecar(field, label) if sidecar else {}
    te, b0, acq_src = _sidecar_acquisition(side, label, te, b0, echo)
    te = ref.te if te is None else te
    b0 = ref.b0_tesla if b0 is None else b0
    img = load_image(field, label)
    ref_shape = tuple(rinfo["header"].get_data_shape()[:3])
    shape = tuple(img.shape[:3])
    if shape != ref_shape:
        raise ScanError(f"{label}: stored shape {shape} does not match the reference field's {ref_shape}; "
                        "COSMOS needs field maps registered (resampled) onto one grid")
    ref_vs = voxel_sizes(rinfo["original_affine"])
    if not np.allclose(voxel_sizes(img.affine), ref_vs, rtol=1e-3):
        raise ScanError(f"{label}: voxel size {tuple(np.round(voxel_sizes(img.affine), 4))} (stored order) does not "
                        f"match the reference field's {tuple(np.round(ref_vs, 4))}; resample onto one grid first")
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = _select_echo(nib.orientations.apply_orientation(data, rinfo["ornt"]), echo, label)
    data = to_ppm(data, units, te=te, b0=b0, name=label)
    b_file, b0_src = b0_direction_in_file(img.affine, side, b0_direction, label)
    b0d = direction_to_canonical(b_file, rinfo["original_affine"])
    source = {"field": str(Path(field).resolve()), "units": units, "b0_direction_source": b0_src,
              **{f"{k}_source": v for k, v in acq_src.items()}}
    if echo is not None:
        source["echo"] = int(echo)
    s = Scan(field=data, mask=ref.mask, voxel_size=ref.voxel_size, b0_direction=b0d, affine=ref.affine,
             te=te, b0_tesla=b0, name=Path(field).name.split(".nii")[0], source=source, nifti_info=rinfo)
    return s


def sidecar_path(path) -> Path:
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + ".json")


def check_output_path(out, inputs: Sequence) -> Path:
    """Refuse to write over an input; require a NIfTI name and an existing directory."""
    o = Path(out)
    if not nifti_path_ok(o):
        raise ScanError(f"output: {o} must end in .nii or .nii.gz")
    ro = o.resolve()
    for i in inputs:
        if i is not None and Path(i).resolve() == ro:
            raise ScanError(f"output: {o} is also an input; choose another output path (inputs are never overwritten)")
    if not ro.parent.exists():
        raise ScanError(f"output: directory {ro.parent} does not exist")
    return o


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
    atomic_write(Path(path), w)


def _reset_derived_header(hdr, description: str) -> None:
    """Header fields that describe the source's values, not the derived map's: reset them.

    A phase image's cal_min/cal_max (e.g. -4096/4095) and intent "phase" would make viewers show
    a χ map as blank; the description of the source would mislabel it.
    """
    hdr["cal_min"] = 0.0   # 0/0: no display range recorded, viewers use the data range
    hdr["cal_max"] = 0.0
    hdr.set_intent("none", (), name="")
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    for key in ("aux_file", "db_name"):
        if key in hdr:
            hdr[key] = b""
    hdr.set_xyzt_units("mm", "unknown")


def save_volume(data: np.ndarray, path, affine: np.ndarray, *, nifti_info: Optional[dict] = None,
                provenance: Optional[dict] = None, dtype=np.float32, description: str = "napari-qsm") -> Path:
    """Write a canonical-frame volume to NIfTI (atomically), plus a JSON sidecar if provenance is given.

    With ``nifti_info`` (from :func:`read_volume` / :func:`load_scan`) the volume is written back
    in the source file's orientation with its header's geometry; data type float32, and the
    source's scaling, display range (cal_min/cal_max), intent and description are reset (the
    written map is derived, not the source). ``description`` goes into the header's descrip
    (at most 79 ASCII characters), e.g. "napari-qsm chi (ppm)". Spatial units: mm.
    """
    path = Path(path)
    if not nifti_path_ok(path):
        raise ScanError(f"output: {path} must end in .nii or .nii.gz")
    arr = np.asarray(data).astype(dtype, copy=False)
    img = nib.Nifti1Image(arr, np.asarray(affine, np.float64))
    if nifti_info is not None:
        target = nifti_info["ornt"]
        can_ornt = nib.io_orientation(np.asarray(affine, np.float64))
        img = img.as_reoriented(nib.orientations.ornt_transform(can_ornt, target))
        hdr = nifti_info["header"].copy()
        if isinstance(hdr, nib.Nifti1Header) and not isinstance(hdr, nib.Nifti2Header):
            out = nib.Nifti1Image(np.asarray(img.dataobj), nifti_info["original_affine"], header=hdr)
            out.set_data_dtype(dtype)
            img = out
    else:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    _reset_derived_header(img.header, description)
    atomic_write(path, lambda tmp: nib.save(img, tmp))
    if provenance is not None:
        write_json(sidecar_path(path), provenance)
    return path


def save_result(result, path, scan: Optional[Scan] = None, inputs: Sequence = ()) -> Path:
    """Write a :class:`~napari_qsm.core.method.Result`'s χ (ppm) and its provenance sidecar.

    The sidecar records the field strength (T) and echo time (s) of the scan when known.
    """
    src = list(inputs)
    if scan is not None and scan.source:
        src += [scan.source.get(k) for k in ("field", "mask", "magnitude", "noise_std", "r2star")]
    check_output_path(path, src)
    affine = scan.affine if (scan is not None and scan.affine is not None) else np.diag(
        list(scan.voxel_size if scan is not None else (1, 1, 1)) + [1.0])
    info = getattr(scan, "nifti_info", None) if scan is not None else None
    prov = result.provenance()
    if scan is not None:
        sc = prov.setdefault("scan", {})
        sc["b0_tesla"] = None if scan.b0_tesla is None else float(scan.b0_tesla)
        sc["te"] = None if scan.te is None else float(scan.te)
    prov["output"] = {"file": Path(path).name, "quantity": "magnetic susceptibility", "units": "ppm"}
    return save_volume(result.chi, path, affine, nifti_info=info, provenance=prov,
                       description=f"napari-qsm chi (ppm) {result.method}")
