"""The Dask tasks of a batch: one scan from its inputs to its derivatives; the protocol adaptation."""

from __future__ import annotations

import os
import shlex
import socket
import time
import traceback
from pathlib import Path
from typing import Optional

from ..core.field.steps import FAMILIES as FIELD_FAMILIES
from .discovery import FIELD_SUFFIXES, SWI_MAPS, sidecar
from .fingerprints import read_json

__all__ = ["process_scan", "adapt_task", "warm_worker", "load_field_inputs"]


def _failing_field_step(exc: BaseException) -> str:
    """``field:<family>`` of the front-end step that raised ``exc``: the family
    :func:`~napari_qsm.core.field.pipeline.local_field` records on the exception (``exc.field_step``), else
    the family an input check names first in its message (``"mask: ..."``), else ``field``."""
    fam = getattr(exc, "field_step", None) or ""
    if not fam:
        msg = str(exc)
        fam = next((f for f in FIELD_FAMILIES if msg.startswith(f + ":")), "")
    return f"field:{fam}" if fam else "field"


def _set_threads(threads: Optional[int]) -> int:
    n = threads
    if n is None:
        try:
            from distributed import get_worker
            n = get_worker().state.nthreads
        except Exception:
            n = None
    import torch
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def load_field_inputs(fi: dict):
    """The :class:`~napari_qsm.core.scan.Scan` of ``{field, mask, magnitude, noise_std, r2star, units}``
    (the calls of ``napari-qsm recon`` on those files)."""
    from ..core.io import load_scan
    return load_scan(str(fi["field"]), str(fi["mask"]), None if not fi.get("magnitude") else str(fi["magnitude"]),
                     units=fi.get("units", "ppm"), noise_std=None if not fi.get("noise_std") else str(fi["noise_std"]),
                     r2star=None if not fi.get("r2star") else str(fi["r2star"]))


def _write_field_outputs(run, echoes, out: dict, prov: dict) -> None:
    """The front end's maps on the echoes' grid; the local field (the set's marker) last."""
    from ..core.io import save_volume
    from ..pipeline import FIELD_MAPS, field_maps
    maps = field_maps(run)
    marker = sidecar(out["localfield"])
    if marker.exists():
        marker.unlink()
    bg = run.background_name
    for suffix, key in FIELD_SUFFIXES.items():
        desc, units = FIELD_MAPS[key]
        side = {"Description": f"napari-qsm {desc}", **({"Units": units} if units else {}), **prov}
        if key == "local_field" and bg:   # MEDI's weak_harmonic=auto (load_scan → Scan.source["field_facts"])
            side["BackgroundRemoval"] = bg
        save_volume(maps[key], out[suffix], echoes.affine, nifti_info=echoes.nifti_info, provenance=side,
                    description=f"napari-qsm {suffix}" + (f" ({units})" if units else ""))


def _write_swi(run, echoes, out: dict, prov: dict):
    """SWI, its minIP and NumART2* T2* of a raw scan (:mod:`napari_qsm.core.swi`, default parameters); the minIP."""
    from ..core.io import save_volume
    from ..core.params import make_params
    from ..methods import get_step
    step = get_step("swi")  # the registry's SWI step, its default parameters
    res = step.run(echoes.magnitude, run.total.field, run.brain_mask, echoes.te, run.total.b0_tesla,
                   run.total.voxel_size, make_params(step.params_cls, {}))
    for suffix, arr in (("swi", res.swi), ("minIP", res.min_ip), ("T2starmap", res.t2star_ms)):
        quantity, units = SWI_MAPS[suffix]
        side = {"Description": f"napari-qsm {quantity}", "Units": units, **prov, **res.provenance,
                "output": {"file": out[suffix].name, "quantity": quantity, "units": units}}
        save_volume(arr, out[suffix], echoes.affine, nifti_info=echoes.nifti_info, provenance=side,
                    description=f"napari-qsm {suffix} ({units})")
    return res.min_ip


def _report_and_dicom(job: dict, out: dict, res, scan, resid: float, state: dict) -> None:
    """The scan's one-page report (with the SWI minIP of a raw scan) and, if asked, χ as DICOM."""
    from ..core.io import read_volume
    from ..core.report import write_report
    state["step"] = "report"
    minip = state.get("minip")  # computed by this task's front end, else read back (a reused field)
    if minip is None and out.get("minIP") is not None and out["minIP"].exists():
        minip = read_volume(str(out["minIP"]), "minIP")[0]
    write_report(out["report"], res.chi, scan.mask, scan.voxel_size, title=job["id"], method=res.name,
                 parameters=res.params, residual_percent=resid, min_ip=minip,
                 reference=str(res.extras.get("reference", "mean of the mask")))
    if job.get("dicom"):
        state["step"] = "dicom"
        from ..core.io.dicom import nifti_to_dicom
        folder = out["dicom"]
        nifti_to_dicom(out["chi"], folder, description=f"QSM {res.name}"[:64], overwrite=True)


def _recon_command(fi: dict, method: str, params: dict, defaults: dict, weights, out, threads: int) -> str:
    """The ``napari-qsm recon`` call that gives the same χ bit for bit (torch's thread count included:
    sums over threads round differently)."""
    parts = [f"OMP_NUM_THREADS={threads}", "napari-qsm", "recon", str(fi["field"]), "--mask", str(fi["mask"])]
    for key, flag in (("magnitude", "--magnitude"), ("noise_std", "--noise-std"), ("r2star", "--r2star")):
        if fi.get(key):
            parts += [flag, str(fi[key])]
    if fi.get("units", "ppm") != "ppm":
        parts += ["--units", fi["units"]]
    parts += ["--method", method]
    if weights:
        parts += ["--weights", str(weights)]
    for k, v in params.items():
        if defaults.get(k) != v:
            parts += ["--param", f"{k}={'auto' if v is None else v}"]
    parts += ["-o", str(out)]
    return " ".join(shlex.quote(p) for p in parts)


def _front_end(job: dict, out: dict, common: dict, state: dict) -> tuple[dict, list, float]:
    """A raw scan's local field: computed and written, or read back when up to date. (inputs, steps, seconds)."""
    fi = {"field": out["localfield"], "mask": out["mask"], "magnitude": out["magnitude"],
          "noise_std": out["noisestd"], "r2star": out["R2starmap"], "units": "ppm"}
    if job["field_ready"]:
        return fi, (read_json(sidecar(out["localfield"])) or {}).get("field_steps", []), 0.0
    from ..core.device import device_label, resolve_device
    from ..pipeline import field_from_echoes, make_recipe
    from ..core.field.load import load_echoes
    state["step"] = "load"
    echoes = load_echoes(magnitude=job["inputs"]["magnitude"], phase=job["inputs"]["phase"], name=job["id"],
                         **job["load"])
    state["step"] = "field"
    recipe = make_recipe(job["field_steps"], job["field_params"])
    tf = time.perf_counter()
    try:
        run = field_from_echoes(echoes, recipe, device=job["device"])
    except Exception as exc:
        state["step"] = _failing_field_step(exc)
        raise
    seconds = time.perf_counter() - tf
    state["step"] = "swi"
    state["minip"] = _write_swi(run, echoes, out, {**common, "field_fingerprint": job["field_fingerprint"]})
    state["step"] = "write field"
    prov = {**common, "field_fingerprint": job["field_fingerprint"], "field_steps": run.steps,
            "seconds": round(seconds, 3), "device": device_label(resolve_device(job["device"])),
            "echoes": run.provenance.get("echoes"), "EchoTime": float(run.scan.te),
            "MagneticFieldStrength": float(run.scan.b0_tesla)}
    _write_field_outputs(run, echoes, out, prov)
    return fi, run.steps, seconds


def _invert_and_write(job: dict, out: dict, common: dict, fi: dict, field: tuple, state: dict, threads: int) -> float:
    """χ of a scan from its local-field files, its residual, and the χ map with its sidecar (last). The residual %."""
    from ..core.io import save_volume, write_json
    from ..core.metrics import field_residual
    from ..core.params import make_params, params_to_dict
    from ..methods import get_method
    from ..pipeline import chi_from_field
    field_steps, field_seconds = field
    state["step"] = "load field"
    scan = load_field_inputs(fi)
    method = get_method(job["method"])
    state["step"] = f"recon:{method.name}"
    extra = {"weights": job["weights"]} if job.get("weights") else {}
    res = chi_from_field(scan, method.name, dict(job["params"]), device=job["device"], **extra)
    state["step"] = "residual"
    resid = field_residual(res.chi, scan.field, scan.mask, scan.voxel_size, scan.b0_direction, device=job["device"])
    state["step"] = "write"
    prov = res.provenance()
    prov["scan"]["b0_tesla"] = None if scan.b0_tesla is None else float(scan.b0_tesla)
    prov["scan"]["te"] = None if scan.te is None else float(scan.te)
    prov["output"] = {"file": out["chi"].name, "quantity": "magnetic susceptibility", "units": "ppm"}
    defaults = params_to_dict(make_params(method.params_cls, {}))
    prov.update({"Description": f"napari-qsm magnetic susceptibility (ppm), {res.name}", "Units": "ppm",
                 **common, "fingerprint": job["fingerprint"], "field_fingerprint": job.get("field_fingerprint"),
                 "field_steps": field_steps, "field_seconds": round(field_seconds, 3),
                 "field_residual_percent": float(resid), "weights_sha256": job.get("weights_sha256"),
                 "recon_command": _recon_command(fi, method.name, res.params, defaults, job.get("weights"),
                                                 out["chi"], threads)})
    chi_side = sidecar(out["chi"])
    if chi_side.exists():
        chi_side.unlink()
    save_volume(res.chi, out["chi"], scan.affine, nifti_info=getattr(scan, "nifti_info", None),
                description=f"napari-qsm chi (ppm) {res.method}")
    _report_and_dicom(job, out, res, scan, float(resid), state)
    state["step"] = "write"
    write_json(chi_side, prov)  # last: a matching χ sidecar means the scan is complete
    return float(resid)


def process_scan(job: dict) -> dict:
    """One Dask task: a scan from its inputs to its derivatives. Never raises for a bad scan.

    Parameters
    ----------
    job : dict
        Made by the planner (:func:`napari_qsm.batch.fingerprints.plan_scans`): paths, recipe,
        method, parameters, fingerprints.

    Returns
    -------
    dict
        A summary row: status ("done" or "failed"), seconds, field residual (%), the failing step
        (load, field:<family>, recon:<method>, write, ...) and error, and the worker.
    """
    t0 = time.perf_counter()
    rec = {"scan": job["id"], "kind": job["kind"], "status": "failed", "seconds": None, "field_residual": None,
           "step": "", "error": "", "worker": f"{socket.gethostname()}:{os.getpid()}"}
    state = {"step": "start"}
    try:
        threads = _set_threads(job.get("threads"))
        from .. import __version__
        out = {k: Path(v) for k, v in job["outputs"].items()}
        out["chi"].parent.mkdir(parents=True, exist_ok=True)
        common = {"software": "napari-qsm", "version": __version__, "scan_id": job["id"],
                  "input_sha256": job["input_sha256"], "Sources": job["sources"]}
        if job["kind"] == "raw":
            fi, field_steps, field_seconds = _front_end(job, out, common, state)
        else:
            fi = {**{k: job["inputs"].get(k) for k in ("field", "mask", "magnitude", "noise_std", "r2star")},
                  "units": job["units"]}
            field_steps, field_seconds = [], 0.0
        if job.get("field_only"):
            rec.update(status="done", step="")
        else:
            resid = _invert_and_write(job, out, common, fi, (field_steps, field_seconds), state, threads)
            rec.update(status="done", field_residual=resid, step="")
    except BaseException as exc:  # noqa: BLE001 - a task reports, the batch goes on
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        rec.update(step=state["step"], error=f"{type(exc).__name__}: {msg}")
        if not isinstance(exc, (ValueError, OSError)):
            rec["traceback"] = traceback.format_exc(limit=8)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def adapt_task(job: dict) -> dict:
    """One Dask task: protocol adaptation over the cohort's local fields, saved atomically with its sidecar."""
    t0 = time.perf_counter()
    try:
        _set_threads(job.get("threads"))
        from ..core.io import write_json
        from ..nn.adapt import adapt_protocol, save_adapted
        scans = [load_field_inputs(fi) for fi in job["fields"]]
        res = adapt_protocol(scans, dict(job["params"]), weights=job["base"], device=job["device"])
        path = Path(job["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapted(res, path, base_weights_path=job["base"], scan=scans)
        side = read_json(path.with_suffix(".json")) or {}  # the checkpoint's card
        side["batch"] = {"cohort_fingerprint": job["fingerprint"], "scans": job["ids"]}
        write_json(path.with_suffix(".json"), side)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 3), "error": ""}
    except Exception as exc:  # noqa: BLE001 - reported for every scan of the cohort
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def warm_worker() -> int:
    """Import what a task needs (torch, the registry); returns the process id. ``client.run(warm_worker)``."""
    from ..methods import available_methods
    available_methods()
    return os.getpid()
