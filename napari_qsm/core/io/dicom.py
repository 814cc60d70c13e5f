"""χ, SWI and other derived maps as a classic DICOM MR image series that a PACS displays.

One file per slice of the volume's third stored axis (MR Image Storage, explicit VR little
endian), signed 16-bit pixels with RescaleSlope/Intercept in the map's display units, a window that
opens on the data, ImageType DERIVED\\SECONDARY, geometry from the NIfTI affine (RAS, mm)
converted to DICOM's patient frame (LPS). With ``like=`` (the source DICOM series) the patient,
study and frame of reference are copied so the series files next to its source; otherwise new
UIDs are made and patient identity is left empty.

Display units: DICOM requires Window Width ≥ 1 (PS3.3 C.11.2.1.2), and viewers truncate the window
to integers: a χ map in ppm (widths of 0.1–0.3) opens blank (aeskulap shows "W: 0"), which is the
PACS complaint QSMxT users report. χ is therefore stored in ppb (1 ppm = 1000 ppb), the unit
clinical QSM is usually read in, and any other map is scaled by a power of ten until its window is
at least 10 wide; RescaleType names the unit (e.g. "ppb", "1/s x 10").
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..files import default_file_mode
from ..scan import ScanError

__all__ = ["DicomError", "SourceSeries", "display_scale", "read_source_series", "series_description", "write_dicom_series", "nifti_to_dicom"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_LPS = np.diag([-1.0, -1.0, 1.0])
_INT16_MAX = 32000  # quantisation range used (of 32767), so rounding never overflows
# copied from the source series with like=: who and what the derived series belongs to
_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                  "PatientWeight", "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID",
                  "AccessionNumber", "StudyDescription", "ReferringPhysicianName",
                  "FrameOfReferenceUID", "PositionReferenceIndicator", "MagneticFieldStrength",
                  "InstitutionName")


class DicomError(ScanError):
    """A DICOM input could not be used, or a series could not be written."""


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise DicomError("DICOM export needs pydicom: pip install pydicom") from exc
    return pydicom


@dataclass(frozen=True)
class SourceSeries:
    """The one series of a ``--like`` folder: its first dataset (no pixels) and voxel-centre corners."""

    folder: Path
    first: object
    n_files: int
    corners_lps: np.ndarray  # (8, 3) voxel-centre corners of the series' grid, mm
    spacing: tuple  # sorted voxel sizes, mm


def _slice_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        ps = np.asarray([float(v) for v in ds.PixelSpacing])
    except (AttributeError, TypeError, ValueError) as exc:
        raise DicomError(f"{getattr(ds, 'filename', 'DICOM file')}: no image geometry "
                         f"(ImageOrientationPatient, ImagePositionPatient, PixelSpacing)") from exc
    return iop, ipp, ps


def read_source_series(folder) -> SourceSeries:
    """Read the headers of the single DICOM series in ``folder`` (for ``like=``).

    Raises
    ------
    DicomError
        The folder is missing, holds no DICOM image, or holds more than one series.
    """
    pydicom = _pydicom()
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"--like: {folder} is not a folder of DICOM files")
    series: dict[str, list] = {}
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # not DICOM: skipped (DICOMDIR, notes, ...)
            continue
        if "ImagePositionPatient" not in ds or "SeriesInstanceUID" not in ds:
            continue
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not series:
        raise DicomError(f"--like: no DICOM image found in {folder}")
    if len(series) > 1:
        names = [f"{v[0].get('SeriesNumber', '?')} {v[0].get('SeriesDescription', '')}".strip()
                 for v in series.values()]
        raise DicomError(f"--like: {folder} holds {len(series)} series ({'; '.join(names)}); "
                         f"pass the folder of the one series the map was made from")
    dss = next(iter(series.values()))
    iop, _, ps = _slice_geometry(dss[0])
    normal = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda d: float(np.dot(normal, _slice_geometry(d)[1])))
    p0, p1 = _slice_geometry(dss[0])[1], _slice_geometry(dss[-1])[1]
    rows, cols = int(dss[0].Rows), int(dss[0].Columns)
    corners = []
    for base in (p0, p1):
        for r in (0, rows - 1):
            for c in (0, cols - 1):
                corners.append(base + c * ps[1] * iop[:3] + r * ps[0] * iop[3:])
    thick = (np.linalg.norm(p1 - p0) / (len(dss) - 1)) if len(dss) > 1 else float(dss[0].get("SliceThickness", 1.0))
    return SourceSeries(folder, dss[0], len(dss), np.asarray(corners), tuple(sorted([ps[0], ps[1], thick])))


def _corners_of(affine: np.ndarray, shape) -> np.ndarray:
    pts = [[i, j, k] for k in (0, shape[2] - 1) for j in (0, shape[1] - 1) for i in (0, shape[0] - 1)]
    ras = (affine[:3, :3] @ np.asarray(pts, float).T).T + affine[:3, 3]
    return ras @ _LPS.T


def _check_same_grid(src: SourceSeries, affine, shape) -> None:
    ours = _corners_of(affine, shape)
    sizes = tuple(sorted(np.linalg.norm(affine[:3, :3], axis=0)))
    tol = 0.5 * min(sizes)
    d = np.max([np.min(np.linalg.norm(src.corners_lps - p, axis=1)) for p in ours])
    if not np.allclose(sizes, src.spacing, atol=0.02 * max(sizes)) or d > tol:
        raise DicomError(f"--like: the geometry of {src.folder} differs from the map's (voxel sizes "
                         f"{np.round(src.spacing, 3).tolist()} vs {np.round(sizes, 3).tolist()} mm, corners "
                         f"up to {d:.1f} mm apart): pass the series the map was reconstructed from")


def _flip(vol: np.ndarray, aff: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Reverse one voxel axis and keep every voxel's world position (the affine follows)."""
    a = aff.copy()
    a[:3, 3] = aff[:3, 3] + aff[:3, axis] * (vol.shape[axis] - 1)
    a[:3, axis] = -aff[:3, axis]
    return np.flip(vol, axis), a


def radiological_inplane(vol: np.ndarray, aff: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order and flip the two in-plane axes as scanners store slices; the slice axis (k) is kept.

    Rows run towards the patient's left (axial, coronal) or posterior (sagittal); columns run
    towards posterior (axial) or inferior (coronal, sagittal): patient right on the image's left,
    anterior or superior at the top. Every voxel keeps its world position (the affine follows).
    """
    lps = _LPS @ aff[:3, :3]
    if np.argmax(np.abs(lps[:, 0])) > np.argmax(np.abs(lps[:, 1])):
        vol = np.swapaxes(vol, 0, 1)
        aff = aff[:, [1, 0, 2, 3]]
        lps = _LPS @ aff[:3, :3]
    r = int(np.argmax(np.abs(lps[:, 0])))
    if lps[r, 0] < 0:
        vol, aff = _flip(vol, aff, 0)
    c = int(np.argmax(np.abs((_LPS @ aff[:3, :3])[:, 1])))
    want_negative = c == 2  # columns pointing down the image = towards the feet
    if ((_LPS @ aff[:3, :3])[c, 1] < 0) != want_negative:
        vol, aff = _flip(vol, aff, 1)
    return np.ascontiguousarray(vol), aff


def _ds_number(x: float) -> float:
    """A value that a DS (decimal string, 16 characters) stores exactly."""
    return float(f"{x:.9g}")


def display_scale(vol: np.ndarray, units: str) -> tuple[float, str]:
    """The factor (a power of ten) and unit name that make the map's display window at least 10 wide."""
    if units == "ppm":
        return 1000.0, "ppb"
    v = np.asarray(vol, np.float64)
    nz = v[np.isfinite(v) & (v != 0)]
    if nz.size == 0:
        return 1.0, units
    lo, hi = np.percentile(nz, [1, 99])
    width = max(hi - lo, 1e-12)
    k = max(0, int(np.ceil(np.log10(10.0 / width))))
    return float(10 ** k), units if k == 0 else f"{units} x {10 ** k:g}"


def _quantise(vol: np.ndarray, signed_window: bool) -> tuple[np.ndarray, float, float, float, float]:
    """int16 pixels, slope, intercept (0), window centre and width, in the values' units."""
    v = np.nan_to_num(np.asarray(vol, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(np.max(np.abs(v))) or 1.0
    slope = _ds_number(peak / _INT16_MAX)
    pix = np.clip(np.rint(v / slope), -32768, 32767).astype(np.int16)
    nz = v[v != 0]
    if nz.size == 0:
        return pix, slope, 0.0, 0.0, 2 * peak
    if signed_window:  # χ: symmetric about 0, covering 99 % of the non-zero values
        half = float(np.percentile(np.abs(nz), 99))
        return pix, slope, 0.0, 0.0, _ds_number(max(2 * half or 2 * peak, 1.0))
    lo, hi = np.percentile(nz, [1, 99])
    return pix, slope, 0.0, _ds_number((lo + hi) / 2), _ds_number(max(hi - lo, slope, 1.0))


def _new_dataset(pydicom, uid_series, uid_sop, meta_extra):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid_sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    for k, v in meta_extra.items():
        setattr(ds, k, v)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = uid_sop
    ds.SeriesInstanceUID = uid_series
    return ds


def write_dicom_series(volume: np.ndarray, affine: np.ndarray, out_dir, *, description: str,
                       like=None, signed_window: bool = True, units: str = "ppm",
                       series_number: int = 900, overwrite: bool = False) -> list[Path]:
    """Write a 3-D volume as a DICOM MR image series, one file per slice.

    Parameters
    ----------
    volume : ndarray, shape (I, J, K)
        The map in the NIfTI file's stored voxel order (not reoriented); slices along K.
    affine : ndarray, shape (4, 4)
        Voxel to world (RAS, mm), as in the NIfTI header.
    out_dir : path
        Folder to create; refused when it exists and is not empty, unless ``overwrite``.
    description : str
        SeriesDescription (at most 64 characters kept), e.g. the method and its parameters.
    like : path or SourceSeries, optional
        The source DICOM series: patient, study and frame of reference are copied and its grid
        must be the map's; otherwise fresh UIDs and an empty patient identity.
    signed_window : bool
        Window centred on 0 (χ) instead of on the data's 1–99 % range (SWI, magnitude).
    units : str
        Units of ``volume``: "ppm" (χ) is stored in ppb; other maps are scaled by a power of ten
        until the window is at least 10 wide (:func:`display_scale`); RescaleType names the result.

    Returns
    -------
    list of Path
        The files written, in slice order.
    """
    pydicom = _pydicom()
    from pydicom.uid import generate_uid

    vol = np.asarray(volume)
    aff = np.asarray(affine, np.float64)
    if vol.ndim != 3:
        raise DicomError(f"map: expected a 3-D volume, got shape {vol.shape}")
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise DicomError("map: its affine is not a valid voxel-to-world transform")
    src = read_source_series(like) if like is not None and not isinstance(like, SourceSeries) else like
    if src is not None:
        _check_same_grid(src, aff, vol.shape)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DicomError(f"output: {out_dir} exists and is not empty; choose a new folder or pass --overwrite")
    if not out_dir.parent.exists():
        raise DicomError(f"output: folder {out_dir.parent} does not exist")

    vol, aff = radiological_inplane(vol, aff)
    scale, shown_units = display_scale(vol, units)
    pix, slope, inter, wc, ww = _quantise(vol * scale, signed_window)
    sizes = np.linalg.norm(aff[:3, :3], axis=0)
    row_cos = _LPS @ (aff[:3, 0] / sizes[0])  # along a row: increasing column index = voxel axis i
    col_cos = _LPS @ (aff[:3, 1] / sizes[1])  # down a column: increasing row index = voxel axis j
    normal = np.cross(row_cos, col_cos)
    now = _dt.datetime.now()
    common = dict(
        Modality="MR", ImageType=["DERIVED", "SECONDARY", "QSM" if signed_window else "OTHER"],
        SeriesDescription=description[:64], SeriesNumber=int(series_number), Manufacturer="napari-qsm",
        SeriesDate=now.strftime("%Y%m%d"), SeriesTime=now.strftime("%H%M%S"),
        ContentDate=now.strftime("%Y%m%d"), ContentTime=now.strftime("%H%M%S"),
        DerivationDescription=description[:1024], ScanningSequence="RM", SequenceVariant="NONE",
        ScanOptions="", MRAcquisitionType="3D", EchoTrainLength=None, RepetitionTime=None, EchoTime=None,
        ImageOrientationPatient=[_ds_number(x) for x in (*row_cos, *col_cos)],
        PixelSpacing=[_ds_number(sizes[1]), _ds_number(sizes[0])],
        SliceThickness=_ds_number(sizes[2]), SpacingBetweenSlices=_ds_number(sizes[2]),
        SamplesPerPixel=1, PhotometricInterpretation="MONOCHROME2", Rows=int(vol.shape[1]),
        Columns=int(vol.shape[0]), BitsAllocated=16, BitsStored=16, HighBit=15, PixelRepresentation=1,
        RescaleSlope=slope, RescaleIntercept=inter, RescaleType=shown_units[:64],
        WindowCenter=wc, WindowWidth=ww, BurnedInAnnotation="NO", AcquisitionNumber=1,
        PatientName="", PatientID="", PatientBirthDate="", PatientSex="", ReferringPhysicianName="",
        StudyID="", AccessionNumber="", StudyDate=now.strftime("%Y%m%d"), StudyTime=now.strftime("%H%M%S"),
        PositionReferenceIndicator="",
    )
    if src is not None:
        for key in _PATIENT_STUDY:
            if key in src.first:
                common[key] = src.first.data_element(key).value
    common.setdefault("StudyInstanceUID", generate_uid())
    common.setdefault("FrameOfReferenceUID", generate_uid())
    uid_series = generate_uid()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-dicom-", dir=str(out_dir.parent)))
    files = []
    try:
        for k in range(vol.shape[2]):
            uid = generate_uid()
            ds = _new_dataset(pydicom, uid_series, uid, common)
            ipp = _LPS @ (aff[:3, :3] @ np.array([0.0, 0.0, float(k)]) + aff[:3, 3])
            ds.ImagePositionPatient = [_ds_number(x) for x in ipp]
            ds.SliceLocation = _ds_number(float(np.dot(normal, ipp)))
            ds.InstanceNumber = k + 1
            ds.PixelData = np.ascontiguousarray(pix[:, :, k].T).tobytes()
            name = f"IM_{k + 1:04d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            os.chmod(tmp / name, default_file_mode())
            files.append(out_dir / name)
        os.chmod(tmp, default_file_mode() | 0o111)  # a folder: rwxr-xr-x under umask 022
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def series_description(provenance: dict, is_chi: bool, what: str) -> str:
    """SeriesDescription from a napari-qsm provenance record: "QSM <method> <parameters>" for χ, else
    ``what`` (the quantity or the file/layer name) with the method and parameters when recorded."""
    prov = provenance if isinstance(provenance, dict) else {}
    params = prov.get("parameters") if isinstance(prov.get("parameters"), dict) else {}
    ptxt = " ".join(f"{k}={v}" for k, v in params.items())
    return " ".join(b for b in ("QSM" if is_chi else what, str(prov.get("method") or ""), ptxt) if b)


def nifti_to_dicom(path, out_dir, *, like=None, description: Optional[str] = None,
                   overwrite: bool = False) -> list[Path]:
    """Export a NIfTI map (χ by default; SWI, minIP, R2*... by their sidecar) as a DICOM series.

    The series description comes from the JSON sidecar's method and parameters when there is one
    (``napari-qsm recon`` writes it), else from the file name.

    Raises
    ------
    DicomError
        The file is not a 3-D NIfTI map with an orientation (qform or sform), or ``like`` is unusable.
    """
    from .nifti import load_image, read_sidecar

    img = load_image(path, "map")
    hdr = img.header
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        raise DicomError(f"map: {path} has no orientation (qform and sform codes are 0); DICOM needs the "
                         f"patient geometry: write the map with its source's affine")
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DicomError(f"map: {path} has shape {data.shape}; expected one 3-D volume")
    side = read_sidecar(path, "map")
    output = side.get("output") if isinstance(side.get("output"), dict) else {}
    quantity = str(output.get("quantity", ""))
    # χ when the sidecar says so, or (no sidecar quantity) when the file is named like one
    is_chi = "susceptib" in quantity.lower() and "weighted" not in quantity.lower() or (
        not quantity and any(t in Path(str(path)).name.lower() for t in ("chi", "qsm")))
    units = str(output.get("units") or ("ppm" if is_chi else "a.u."))
    if description is None:
        description = series_description(side, is_chi, quantity or Path(str(path)).name.split(".")[0])
    return write_dicom_series(data, img.affine, out_dir, description=description, like=like,
                              signed_window=is_chi, units=units, overwrite=overwrite)
