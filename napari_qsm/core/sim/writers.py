"""Writers of the procedural phantoms: the phantom as NIfTI + JSON, and an honest phantom's echoes as raw BIDS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..constants import GAMMA_BAR_HZ_PER_T as GAMMA_BAR

if TYPE_CHECKING:  # pragma: no cover
    from .phantom import Phantom


def save_phantom(phantom: Phantom, outdir) -> dict[str, Path]:
    """Write the phantom as NIfTI (with ``phantom.affine``) plus ``phantom.json``.

    Files: field.nii.gz (ppm), mask.nii.gz (uint8), magnitude.nii.gz, chi.nii.gz (ground truth,
    ppm), labels.nii.gz (int16), noise_std.nii.gz (ppm, only when the phantom has noise),
    true_field.nii.gz (ppm) and r2star.nii.gz (1/s) for honest phantoms (with a background also
    true_local_field.nii.gz and true_total_field.nii.gz), and phantom.json (:meth:`Phantom.info`). Returns {name: path}.
    """
    import nibabel as nib

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "field": phantom.field.astype(np.float32),
        "mask": phantom.mask.astype(np.uint8),
        "magnitude": phantom.magnitude.astype(np.float32),
        "chi": phantom.chi.astype(np.float32),
        "labels": phantom.labels.astype(np.int16),
    }
    if phantom.noise_std is not None:
        arrays["noise_std"] = phantom.noise_std.astype(np.float32)
    names = ("true_field", "r2star") + (("true_local_field", "true_total_field") if phantom.background else ())
    for name in names:
        if getattr(phantom, name, None) is not None:
            arrays[name] = getattr(phantom, name).astype(np.float32)
    paths: dict[str, Path] = {}
    affine = np.asarray(phantom.affine, dtype=np.float64)
    for name, data in arrays.items():
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        p = out / f"{name}.nii.gz"
        tmp = out / f".{name}.tmp.nii.gz"
        nib.save(img, str(tmp))
        tmp.replace(p)
        paths[name] = p
    pj = out / "phantom.json"
    pj.write_text(json.dumps(phantom.info(), indent=2))
    paths["json"] = pj
    return paths


def _save_nifti(data, affine, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def save_raw_bids(phantom: Phantom, outdir, phase_units: str = "rad", subject: str = "phantom") -> dict[str, Path]:
    """Write an honest phantom's echoes as a BIDS-like MEGRE folder, with its truth next to it.

    ``OUTDIR/sub-<subject>/anat/sub-<subject>_echo-N_part-mag_MEGRE.nii.gz`` and ``_part-phase_``
    (radians in (−π, π], or Siemens integers −4096..4095 with ``phase_units="siemens"``), each
    with a JSON sidecar (EchoTime s, EchoNumber, MagneticFieldStrength T, ImagingFrequency MHz,
    Manufacturer); ``OUTDIR/dataset_description.json``; the truth in ``OUTDIR/truth/``: chi
    (brain χ relative to CSF, ppm), local_field and total_field (ppm), mask, labels, and
    phantom.json (:meth:`Phantom.info`). Needs ``make_phantom(honest=True, keep_echoes=True)``.
    Returns {name: path}. :func:`napari_qsm.core.field.load.load_echoes` reads the subject folder back.
    """
    if phantom.echoes is None:
        raise ValueError("phantom: no echoes kept; make it with honest=True, keep_echoes=True")
    units = str(phase_units).strip().lower()
    if units not in ("rad", "siemens"):
        raise ValueError(f"phase_units: expected 'rad' or 'siemens', got {phase_units!r}")
    if not subject or not str(subject).isalnum():
        raise ValueError(f"subject: expected a BIDS label (letters and digits), got {subject!r}")
    out = Path(outdir)
    anat = out / f"sub-{subject}" / "anat"
    truth = out / "truth"
    anat.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(phantom.affine, dtype=np.float64)
    b0 = float(phantom.b0_tesla)
    paths: dict[str, Path] = {}
    desc = out / "dataset_description.json"
    if not desc.exists():
        desc.write_text(json.dumps({"Name": "napari-qsm procedural raw head phantom", "BIDSVersion": "1.8.0",
                                    "DatasetType": "raw", "GeneratedBy": [{"Name": "napari-qsm phantom --raw"}]},
                                   indent=2))
    paths["dataset_description"] = desc
    for e, te in enumerate(phantom.echo_times):
        S = phantom.echoes[..., e]
        ph = np.angle(S).astype(np.float32)
        if units == "siemens":
            ph = np.clip(np.round(ph * (4096.0 / np.pi)), -4096, 4095).astype(np.int16)
        for part, data in (("mag", np.abs(S).astype(np.float32)), ("phase", ph)):
            stem = f"sub-{subject}_echo-{e + 1}_part-{part}_MEGRE"
            paths[f"echo{e + 1}_{part}"] = _save_nifti(data, affine, anat / f"{stem}.nii.gz")
            side = {"EchoTime": float(te), "EchoNumber": e + 1, "MagneticFieldStrength": b0,
                    "ImagingFrequency": round(b0 * GAMMA_BAR * 1e-6, 6),
                    "Manufacturer": "Siemens" if units == "siemens" else "napari-qsm",
                    "ManufacturersModelName": "procedural head phantom", "MRAcquisitionType": "3D",
                    "ImageType": ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P"],
                    "PhaseUnits": ("rad" if units == "rad" else "siemens (-4096..4095 = -pi..pi)")
                    if part == "phase" else None}
            side = {k: v for k, v in side.items() if v is not None}
            (anat / f"{stem}.json").write_text(json.dumps(side, indent=2))
    local = phantom.true_local_field if phantom.true_local_field is not None else phantom.true_field
    total = phantom.true_total_field if phantom.true_total_field is not None else phantom.true_field
    for name, data in (("chi", phantom.chi.astype(np.float32)), ("local_field", local),
                       ("total_field", total), ("mask", phantom.mask.astype(np.uint8)),
                       ("labels", phantom.labels.astype(np.int16))):
        if data is not None:
            paths[f"truth_{name}"] = _save_nifti(np.asarray(data), affine, truth / f"{name}.nii.gz")
    pj = truth / "phantom.json"
    pj.write_text(json.dumps(phantom.info(), indent=2))
    paths["truth_json"] = pj
    return paths
