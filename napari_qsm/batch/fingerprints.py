"""What a batch must run: fingerprints of every scan's inputs and settings, compared with the derivatives'."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from ..core.files import sha256_file
from .discovery import FIELD_SUFFIXES, BatchScan, output_paths, sidecar

__all__ = ["input_hashes", "digest", "read_json", "field_units", "plan_scans", "field_inputs"]

_UNITS = {"ppm": "ppm", "hz": "hz", "rad": "rad", "radian": "rad", "radians": "rad"}


def input_hashes(scan: BatchScan, root: Path) -> dict:
    """``{path relative to root: sha256}`` of the scan's input files (``{"__error__": ...}`` if one is unreadable)."""
    try:
        return {str(p.relative_to(root)): sha256_file(p) for p in scan.files()}
    except OSError as exc:
        return {"__error__": f"{type(exc).__name__}: {exc}"}


def digest(obj) -> str:
    """sha256 of an object's sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_json(p: Path) -> Optional[dict]:
    """A derivatives sidecar this package wrote, or None (missing, unreadable or not a JSON object: not up to date)."""
    try:
        obj = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def field_units(scan: BatchScan) -> str:
    """Units of a local-field scan from its sidecar's ``"Units"`` (ppm, hz or rad; default ppm).

    A sidecar that cannot be read or holds no JSON object raises ValueError (that scan fails)."""
    if scan.kind != "field":
        return "ppm"
    from ..core.io import read_sidecar
    side = read_sidecar(scan.inputs["field"], scan.inputs["field"].name)
    return _UNITS.get(str(side.get("Units", "ppm")).strip().lower(), "ppm")


def field_inputs(scan: BatchScan, root, method: str) -> dict:
    """``{field, mask, magnitude, noise_std, r2star, units}`` the inversion reads for a scan."""
    if scan.kind == "raw":
        out = output_paths(root, scan, method)
        return {"field": str(out["localfield"]), "mask": str(out["mask"]), "magnitude": str(out["magnitude"]),
                "noise_std": str(out["noisestd"]), "r2star": str(out["R2starmap"]), "units": "ppm"}
    return {**{k: None if scan.inputs.get(k) is None else str(scan.inputs[k])
               for k in ("field", "mask", "magnitude", "noise_std", "r2star")}, "units": field_units(scan)}


def _up_to_date(s: BatchScan, out: dict, row: dict, fps: tuple, overwrite: bool, field_only: bool) -> tuple:
    """(skip this scan?, are its field outputs reusable?) from the derivatives' sidecars."""
    field_fp, fp = fps
    field_ready = False
    if s.kind == "raw" and not overwrite:
        fside = read_json(sidecar(out["localfield"])) or {}
        field_ready = fside.get("field_fingerprint") == field_fp and all(out[k].exists() for k in FIELD_SUFFIXES)
    if field_only:
        if s.kind == "field" or field_ready:
            row.update(status="skipped", seconds=0.0)
            return True, field_ready
        return False, field_ready
    chi_side = read_json(sidecar(out["chi"])) or {}
    if not overwrite and all(p.exists() for p in out.values()) and chi_side.get("fingerprint") == fp:
        row.update(status="skipped", seconds=0.0, field_residual=chi_side.get("field_residual_percent"))
        return True, field_ready
    return False, field_ready


def plan_scans(scans, all_hashes, *, root, m, par, fsteps, recipe, field_recipe, fload, overwrite, device, weights,
               w_sha, field_only: bool = False, dicom: bool = False):
    """(summary rows, [(row, job)]) for the scans: fingerprints, what is up to date, what runs.

    field_only: plan the front end alone (a raw scan is up to date when its field outputs are)."""
    rows, jobs = [], []
    for s, h in zip(scans, all_hashes):
        out = output_paths(root, s, m.name, dicom=dicom)
        row = {"scan": s.id, "kind": s.kind, "status": "", "seconds": None, "field_residual": None,
               "step": "", "error": "", "worker": ""}
        rows.append(row)
        try:
            units = field_units(s)
        except ValueError as exc:   # e.g. a sidecar holding a JSON array: this scan fails, the batch goes on
            h = {"__error__": " ".join(str(exc).split())}
        if s.problem or "__error__" in h:
            row.update(status="failed", step="discover", error=s.problem or h["__error__"], seconds=0.0)
            continue
        raw = s.kind == "raw"
        field_fp = digest({"inputs": h, "field": field_recipe, "load": fload}) if raw else None
        fp = digest({"inputs": h, "field": field_recipe if raw else None, "units": units,
                     "load": fload if raw else None, "method": m.name, "parameters": par, "weights_sha256": w_sha})
        skip, field_ready = _up_to_date(s, out, row, (field_fp, fp), overwrite, field_only)
        if skip:
            continue
        sources = [f"bids:raw:{Path(p).relative_to(root).as_posix()}" for p in s.files()
                   if not str(p).endswith(".json")]
        jobs.append((row, {
            "id": s.id, "kind": s.kind, "inputs": {k: ([str(x) for x in v] if isinstance(v, list) else
                                                       (None if v is None else str(v))) for k, v in s.inputs.items()},
            "outputs": {k: str(v) for k, v in out.items()}, "input_sha256": h, "sources": sources,
            "field_steps": fsteps, "field_params": recipe.params, "load": fload, "units": units,
            "field_fingerprint": field_fp, "field_ready": field_ready, "fingerprint": fp, "field_only": field_only,
            "method": m.name, "params": par, "weights": weights, "weights_sha256": w_sha, "device": device,
            "threads": None,  # the worker's own thread count
            "dicom": dicom,
        }))
        row["status"] = "planned"
    return rows, jobs
