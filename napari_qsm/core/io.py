"""NIfTI input/output, affine geometry and unit conversion.

* Volumes are read with nibabel and reoriented with ``nib.as_closest_canonical`` (RAS+ voxel
  order); voxel size comes from the reoriented header zooms.
* The B0 direction in voxel coordinates is scanner z expressed in the voxel frame:
  ``b̂ = R⁻¹ · (0, 0, 1)`` with R the affine's rotation (columns normalised by the voxel size).
  This is right for axial, sagittal, coronal and oblique acquisitions.
* Units: ppm (of B0), hz (needs B0 in tesla), rad (needs TE in s and B0 in tesla);
  γ̄ = γ/2π = 42.577478 MHz/T.
* Results are written back in the orientation of the source file, with its affine and header,
  plus a JSON provenance sidecar (``OUT.nii.gz`` → ``OUT.json``). Writes are atomic (temporary
  file, then rename) and refuse to overwrite an input.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from .scan import Scan, ScanError

GAMMA_BAR_MHZ_PER_T = 42.577478  # γ/2π of 1H, MHz/T
UNITS = ("ppm", "hz", "rad")


class NiftiError(ScanError):
    """A file could not be read or written as NIfTI."""


def nifti_path_ok(path) -> bool:
    p = str(path).lower()
    return p.endswith(".nii") or p.endswith(".nii.gz")


def load_image(path, name: str = "file") -> nib.Nifti1Image:
    """Load a NIfTI image, with errors naming the input."""
    p = Path(path)
    if not p.exists():
        raise NiftiError(f"{name}: file not found: {p}")
    if p.is_dir():
        raise NiftiError(f"{name}: {p} is a directory, expected a .nii or .nii.gz file")
    try:
        img = nib.load(str(p))
        # Force reading so corrupted/truncated data fails here, not later.
        np.asanyarray(img.dataobj)
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
            if combine:
                return np.sqrt((data.astype(np.float64) ** 2).sum(axis=3)).astype(np.float32)
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


def load_scan(field, mask, magnitude=None, *, voxel_size: Optional[Sequence[float]] = None,
              b0_direction: Optional[Sequence[float]] = None, units: str = "ppm",
              te: Optional[float] = None, b0: Optional[float] = None, echo: Optional[int] = None,
              noise_std=None) -> Scan:
    """Build a :class:`Scan` from NIfTI paths.

    ``voxel_size`` / ``b0_direction`` override the header (in the canonical voxel frame).
    A 4-D field needs ``echo``; a 4-D magnitude uses ``echo`` when given, else the root sum of
    squares over echoes.
    """
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
    nstd = None
    if noise_std is not None:
        nstd, _, _ = read_volume(noise_std, "noise_std")
    vs = voxel_sizes(faff) if voxel_size is None else np.asarray(voxel_size, float)
    b0d = b0_from_affine(faff) if b0_direction is None else np.asarray(b0_direction, float)
    source = {"field": finfo["path"], "mask": str(Path(mask).resolve()), "units": units}
    if magnitude is not None:
        source["magnitude"] = str(Path(magnitude).resolve())
    if echo is not None:
        source["echo"] = int(echo)
    scan = Scan(field=fdata, mask=mdata, voxel_size=tuple(vs), b0_direction=b0d, magnitude=mag,
                noise_std=nstd, affine=faff, te=te, b0_tesla=b0,
                name=Path(field).name.split(".nii")[0], source=source)
    scan._nifti_info = finfo  # original orientation and header, for writing results back
    return scan


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


def _atomic_write_bytes(path: Path, writer) -> None:
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=str(path.parent))
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=str)
            fh.write("\n")
    _atomic_write_bytes(Path(path), w)


def save_volume(data: np.ndarray, path, affine: np.ndarray, *, nifti_info: Optional[dict] = None,
                provenance: Optional[dict] = None, dtype=np.float32) -> Path:
    """Write a canonical-frame volume to NIfTI (atomically), plus a JSON sidecar if provenance is given.

    With ``nifti_info`` (from :func:`read_volume` / :func:`load_scan`) the volume is written back
    in the source file's orientation with its header (data type float32, scaling reset).
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
            out.header.set_slope_inter(1.0, 0.0)
            out.header["descrip"] = b"napari-qsm"
            img = out
    else:
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    _atomic_write_bytes(path, lambda tmp: nib.save(img, tmp))
    if provenance is not None:
        write_json(sidecar_path(path), provenance)
    return path


def save_result(result, path, scan: Optional[Scan] = None, inputs: Sequence = ()) -> Path:
    """Write a :class:`~napari_qsm.core.methods.Result`'s χ (ppm) and its provenance sidecar."""
    src = list(inputs)
    if scan is not None and scan.source:
        src += [scan.source.get(k) for k in ("field", "mask", "magnitude")]
    check_output_path(path, src)
    affine = scan.affine if (scan is not None and scan.affine is not None) else np.diag(
        list(scan.voxel_size if scan is not None else (1, 1, 1)) + [1.0])
    info = getattr(scan, "_nifti_info", None) if scan is not None else None
    prov = result.provenance()
    prov["output"] = {"file": Path(path).name, "quantity": "magnetic susceptibility", "units": "ppm"}
    return save_volume(result.chi, path, affine, nifti_info=info, provenance=prov)
