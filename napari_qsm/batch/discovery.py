"""The scans of a BIDS dataset (raw MEGRE echoes or local fields) and where their derivatives go."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..core.io import bids
from ..core.io.bids import DERIVATIVES, strip_ext

__all__ = ["BatchScan", "discover", "output_paths", "sidecar", "FIELD_SUFFIXES", "SWI_MAPS", "DERIVATIVES"]

#: BIDS output suffix -> key of :data:`napari_qsm.pipeline.FIELD_MAPS` (which holds each map's description
#: and units); the local field is written last: the set's marker
FIELD_SUFFIXES = {"mask": "mask", "magnitude": "magnitude", "totalfield": "total_field", "noisestd": "noise_std",
                  "R2starmap": "r2star", "localfield": "local_field"}
#: SWI maps written beside the front end's (raw scans): suffix -> (quantity, units)
SWI_MAPS = {"swi": ("susceptibility-weighted image (CLEAR-SWI style)", "a.u."),
            "minIP": ("SWI minimum-intensity projection", "a.u."),
            "T2starmap": ("T2* (NumART2*)", "ms")}
_OPTIONAL_FIELD_INPUTS = {"magnitude": "magnitude", "noisestd": "noise_std", "R2starmap": "r2star"}


def sidecar(p: Path) -> Path:
    """``X.nii.gz`` → ``X.json``."""
    return p.with_name(strip_ext(p.name) + ".json")


@dataclass
class BatchScan:
    """One (subject, session, run) of the dataset."""

    id: str                        # BIDS prefix: sub-01[_ses-2][_acq-x][_run-1]
    subject: str                   # sub-01
    session: Optional[str]         # ses-2 or None
    kind: str                      # "raw" (MEGRE echoes) or "field" (a local field)
    inputs: dict                   # raw: {"magnitude": [...], "phase": [...]}; field: {"field", "mask", ...}
    anat: Path                     # the input folder
    problem: str = ""              # found while discovering (reported as a failure at step "discover")

    def files(self) -> list[Path]:
        """Every input file, JSON sidecars that exist included (what the fingerprint hashes)."""
        out = []
        for v in self.inputs.values():
            for p in (v if isinstance(v, list) else [v]):
                if p is None:
                    continue
                p = Path(p)
                out.append(p)
                if sidecar(p).exists():
                    out.append(sidecar(p))
        return out


def discover(root, only: Optional[Sequence[str]] = None) -> list[BatchScan]:
    """Every scan under a BIDS ``root``, sorted by id.

    Parameters
    ----------
    root : path
        The dataset: ``sub-*/anat`` and ``sub-*/ses-*/anat`` are searched.
    only : sequence of str, optional
        Subject labels to keep ("sub-01" or "01"); an unknown label raises ValueError.

    Returns
    -------
    list of BatchScan
        Raw MEGRE acquisitions and local fields (``<prefix>_localfield`` + ``_mask``); the raw echoes
        win when both exist for one prefix. A scan found incomplete carries its ``problem``.
    """
    scans: list[BatchScan] = []
    for anat, subject, session in bids.anat_folders(root, only):
        scans += _scans_in(anat, subject, session)
    return sorted(scans, key=lambda s: s.id)


def _scans_in(anat: Path, subject: str, session: Optional[str]) -> list[BatchScan]:
    niftis = [p for p in sorted(anat.iterdir()) if bids.is_nifti(p)]
    files = {strip_ext(p.name): p for p in niftis}
    raw = {prefix: g for (_, prefix), g in bids.megre_groups(niftis).items()}
    fields = {stem[: -len("_localfield")]: p for stem, p in files.items() if stem.endswith("_localfield")}
    out = []
    for prefix, g in raw.items():
        me, pe = sorted(g["mag"]), sorted(g["phase"])
        problem = ""
        if me != pe:
            problem = (f"magnitude echoes {me} and phase echoes {pe} differ; expected one phase file per "
                       "magnitude echo")
        out.append(BatchScan(prefix, subject, session, "raw",
                             {"magnitude": [g["mag"][e] for e in me], "phase": [g["phase"][e] for e in pe]},
                             anat, problem))
    for prefix, f in fields.items():
        if prefix in raw:
            continue  # the raw echoes win
        inputs = {"field": f, "mask": files.get(prefix + "_mask")}
        for suffix, key in _OPTIONAL_FIELD_INPUTS.items():
            inputs[key] = files.get(f"{prefix}_{suffix}")
        problem = "" if inputs["mask"] is not None else f"{f.name}: no {prefix}_mask.nii[.gz] beside it"
        out.append(BatchScan(prefix, subject, session, "field", inputs, anat, problem))
    return out


def output_paths(root, scan: BatchScan, method: str, dicom: bool = False) -> dict[str, Path]:
    """The derivative files of one scan: ``{"chi": ...}`` and, for raw scans, the :data:`FIELD_SUFFIXES`."""
    d = bids.derivatives_anat(root, scan.subject, scan.session)
    out = {"chi": d / bids.chi_name(scan.id, method)}
    out["report"] = d / f"{scan.id}_desc-{method}_report.png"
    if dicom:  # the χ series (--dicom): an output like the others, so a rerun that asks for it is not up to date
        out["dicom"] = d / (bids.strip_ext(out["chi"].name) + "_dicom")
    if scan.kind == "raw":
        for suffix in FIELD_SUFFIXES:
            out[suffix] = d / f"{scan.id}_{suffix}.nii.gz"
        for suffix in SWI_MAPS:
            out[suffix] = d / f"{scan.id}_{suffix}.nii.gz"
    return out
