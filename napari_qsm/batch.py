"""Whole datasets: every scan of a BIDS folder reconstructed on Dask distributed, BIDS derivatives out.

    from napari_qsm.batch import run_batch
    summary = run_batch("/data/study", method="medi", params={"lambda": "auto"})
    summary.failed          # scans that failed (each with its step and error)

or ``napari-qsm batch /data/study --method medi`` (a thin wrapper). No Qt, no napari.

Inputs (discovered under ``ROOT/sub-*/anat`` and ``ROOT/sub-*/ses-*/anat``; ``derivatives``,
``sourcedata`` and hidden folders are not searched); a scan is one (subject, session, run):

* raw multi-echo GRE (BIDS MEGRE): ``<prefix>_echo-<N>_part-mag_MEGRE.nii[.gz]`` and
  ``<prefix>_echo-<N>_part-phase_MEGRE.nii[.gz]`` with JSON sidecars (EchoTime,
  MagneticFieldStrength or ImagingFrequency); ``<prefix>`` holds the other entities
  (``sub-01[_ses-2][_acq-x][_run-1]``). The front end (:func:`napari_qsm.core.field.pipeline.local_field`)
  makes the local field, then the inversion runs on it;
* a local field made elsewhere: ``<prefix>_localfield.nii[.gz]`` (ppm; a sidecar ``"Units"``
  of ``"Hz"`` or ``"rad"`` is converted with its EchoTime / MagneticFieldStrength) with
  ``<prefix>_mask.nii[.gz]`` (required, nonzero = brain) and optionally
  ``<prefix>_magnitude``, ``<prefix>_noisestd`` (ppm) and ``<prefix>_R2starmap`` (1/s). These are
  the names this module writes, so a derivatives folder of another run can be used as input.
  When both exist for one prefix the raw echoes win.

Outputs, in ``ROOT/derivatives/napari-qsm/sub-*/[ses-*/]anat/`` (``<prefix>`` as above), each
NIfTI with a JSON sidecar (method, parameters, software version, seconds, device, sha256 of the
input files, the equivalent ``napari-qsm recon`` command):

* ``<prefix>_desc-<method>_Chimap.nii.gz``: χ (ppm); several methods live side by side;
* from raw echoes: ``<prefix>_localfield`` (ppm), ``_mask`` (the eroded brain mask),
  ``_magnitude``, ``_totalfield`` (ppm), ``_noisestd`` (ppm), ``_R2starmap`` (1/s);
* ``dataset_description.json`` (DatasetType derivative, GeneratedBy) and
  ``batch_summary.tsv`` (scan, status, seconds, field residual %, step, error, worker).

Every file is written through :func:`napari_qsm.core.files.atomic_write` (a temporary file, then
a rename); a set's sidecar is removed before the set is rewritten and written last, so a
complete sidecar means a complete set. A scan is skipped when all its outputs exist and the χ
sidecar's fingerprint matches: sha256 of every input file (sidecars included), the front-end
recipe, the method, its parameters and the network weights (the software version is recorded,
not compared). A rerun therefore continues a killed batch where it stopped; ``overwrite=True``
recomputes everything. Field outputs whose fingerprint matches are reused when only the
inversion changed (another method or parameter): every χ is computed from the written field
files by the same calls as ``napari-qsm recon`` (:func:`napari_qsm.core.io.load_scan`, then
:func:`napari_qsm.methods.reconstruct`), so a χ equals ``napari-qsm recon`` on those files bit
for bit. Fingerprints are computed by the client before anything is submitted (hashing reads
each input once: about 1 GB/s), so an up-to-date dataset needs no cluster at all.

Scheduling: one Dask task per scan, keyed ``qsm-<prefix>-<fingerprint>``. A task never raises
for a bad scan: it returns a record with the failing step (load, field:<family>, recon:<method>,
write) and the error, and the other scans go on. A worker that dies (killed, out of memory) has
its task rescheduled by the Dask scheduler on another worker, up to
``distributed.scheduler.allowed-failures`` times (default 3); then the scan is reported as
failed at step "worker". Without ``client`` / ``scheduler`` a :class:`distributed.LocalCluster`
is started: processes, ``threads_per_worker`` threads each (torch is told the same), as many
workers as the CPUs and the memory allow (:func:`default_workers`). On a cluster, start a
scheduler and workers (``dask scheduler``, ``dask worker tcp://host:8786 --nthreads 1``, or
``dask-jobqueue``'s ``SLURMCluster`` / ``PBSCluster``) and pass ``scheduler="tcp://host:8786"``
or ``client=Client(cluster)``; workers must see the dataset at the same path. A script that lets
``run_batch`` start the local cluster must call it under ``if __name__ == "__main__":`` (the
workers are new processes that import the script's module). Two batches must not write the same
derivatives folder at the same time (there is no lock).

Protocol adaptation (``adapt_protocol=True``, ``--adapt-protocol``): the local fields of every scan
first, then one task runs :func:`napari_qsm.nn.adapt.adapt_protocol` over all the scans that have
one (a scan that failed is left out and reported), writing
``derivatives/napari-qsm/adapted/protocol-<cohort fingerprint>.pt`` with its card; it is reused
while the cohort (every scan's input sha256), the front end, the adaptation parameters and the
base checkpoint are the same. Then every scan is reconstructed with ``dsbn`` and that checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .core.field.steps import FAMILIES as FIELD_FAMILIES
from .core.files import sha256_file  # noqa: F401  (tests and benchmarks import it from here too)

__all__ = ["run_batch", "discover", "BatchScan", "BatchSummary", "default_workers", "DERIVATIVES",
           "output_paths", "SUMMARY_COLUMNS", "parse_field_params", "process_scan", "adapt_task", "warm_worker"]

DERIVATIVES = "napari-qsm"                      # ROOT/derivatives/<this>
SUMMARY_COLUMNS = ("scan", "kind", "status", "seconds", "field_residual", "step", "error", "worker")
_LOAD_KEYS = ("phase_units", "phase_sign")      # --field-param keys that go to the loader
FIELD_MAPS = {  # output suffix -> (FieldRun attribute path, description, units)
    "mask": ("mask", "brain mask, eroded by background removal (1 = inside)", None),
    "magnitude": ("magnitude", "combined magnitude of the echoes", None),
    "totalfield": ("total_field", "total field (background not removed)", "ppm"),
    "noisestd": ("noise_std", "field noise standard deviation from the echo fit", "ppm"),
    "R2starmap": ("r2star", "R2* from the echo fit", "1/s"),
    "localfield": ("local_field", "local (tissue) field, background removed", "ppm"),  # last: the set's marker
}
_OPTIONAL_FIELD_INPUTS = {"magnitude": "magnitude", "noisestd": "noise_std", "R2starmap": "r2star"}


# ----------------------------------------------------------------------------------------------- discovery

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
                side = p.with_name(_strip_ext(p.name) + ".json")
                if side.exists():
                    out.append(side)
        return out


def _strip_ext(name: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_nifti(p: Path) -> bool:
    n = p.name.lower()
    return p.is_file() and (n.endswith(".nii") or n.endswith(".nii.gz")) and not p.name.startswith(".")


_ECHO = re.compile(r"_echo-(\d+)(?=_)")
_PART = re.compile(r"_part-(mag|phase)(?=_)")


def _label(value: str, prefix: str) -> str:
    v = str(value).strip()
    return v if v.startswith(prefix) else prefix + v


def discover(root, only: Optional[Sequence[str]] = None) -> list[BatchScan]:
    """Every scan under a BIDS ``root`` (see the module docstring), sorted by id.

    ``only``: subject labels to keep ("sub-01" or "01"); an unknown label raises ValueError."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"BIDS root: {root} is not a folder")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if only:
        want = {_label(s, "sub-") for s in only}
        missing = sorted(want - {p.name for p in subjects})
        if missing:
            raise ValueError(f"--only: {', '.join(missing)} not found under {root} "
                             f"(subjects: {', '.join(p.name for p in subjects) or 'none'})")
        subjects = [p for p in subjects if p.name in want]
    scans: list[BatchScan] = []
    for sub in subjects:
        anats = [sub / "anat"] + sorted(s / "anat" for s in sub.glob("ses-*") if s.is_dir())
        for anat in anats:
            if anat.is_dir():
                scans += _scans_in(anat, sub.name, anat.parent.name if anat.parent != sub else None)
    return sorted(scans, key=lambda s: s.id)


def _scans_in(anat: Path, subject: str, session: Optional[str]) -> list[BatchScan]:
    raw: dict[str, dict] = {}
    fields: dict[str, Path] = {}
    files = {}
    for p in sorted(anat.iterdir()):
        if not _is_nifti(p):
            continue
        stem = _strip_ext(p.name)
        files[stem] = p
        if stem.endswith("_MEGRE"):
            e, part = _ECHO.search(stem), _PART.search(stem)
            if not e or not part:
                continue
            prefix = _PART.sub("", _ECHO.sub("", stem))[: -len("_MEGRE")]
            raw.setdefault(prefix, {"mag": {}, "phase": {}})[part.group(1)][int(e.group(1))] = p
        elif stem.endswith("_localfield"):
            fields[stem[: -len("_localfield")]] = p
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


def output_paths(root, scan: BatchScan, method: str) -> dict[str, Path]:
    """The derivative files of one scan: {"chi": ..., and for raw scans the FIELD_MAPS suffixes}."""
    d = Path(root) / "derivatives" / DERIVATIVES / scan.subject
    if scan.session:
        d = d / scan.session
    d = d / "anat"
    out = {"chi": d / f"{scan.id}_desc-{method}_Chimap.nii.gz"}
    if scan.kind == "raw":
        for suffix in FIELD_MAPS:
            out[suffix] = d / f"{scan.id}_{suffix}.nii.gz"
    return out


def _sidecar(p: Path) -> Path:
    return p.with_name(_strip_ext(p.name) + ".json")


# ----------------------------------------------------------------------------------------------- fingerprints

def input_hashes(scan: "BatchScan", root: Path) -> dict:
    """``{path relative to root: sha256}`` of the scan's input files (``{"__error__": ...}`` if one is unreadable)."""
    try:
        return {str(p.relative_to(root)): sha256_file(p) for p in scan.files()}
    except OSError as exc:
        return {"__error__": f"{type(exc).__name__}: {exc}"}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(p: Path) -> Optional[dict]:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def parse_field_params(items) -> tuple[dict, dict, dict]:
    """``{"background": "pdf", "background.radius": "6", "phase_units": "siemens"}`` → (steps, params, load).

    A family name (fit, mask, unwrap, background) chooses that family's step; ``phase_units`` /
    ``phase_sign`` go to the echo loader; everything else is a step parameter (``[FAMILY.]NAME``,
    see :func:`napari_qsm.core.field.pipeline.split_params`)."""
    steps, params, load = {}, {}, {}
    for k, v in dict(items or {}).items():
        k = str(k).strip()
        if k in FIELD_FAMILIES:
            steps[k] = v
        elif k in _LOAD_KEYS:
            load[k] = int(v) if k == "phase_sign" else str(v)
        else:
            params[k] = v
    return steps, params, load


# ----------------------------------------------------------------------------------------------- summary

@dataclass
class BatchSummary:
    """What :func:`run_batch` returns: one row per scan (``SUMMARY_COLUMNS``) and where it was written."""

    rows: list
    path: Optional[Path]
    seconds: float
    dashboard: str = ""
    workers: int = 0
    dry_run: bool = False

    def _with(self, status) -> list:
        return [r for r in self.rows if r["status"] == status]

    @property
    def done(self) -> list:
        return self._with("done")

    @property
    def skipped(self) -> list:
        return self._with("skipped")

    @property
    def failed(self) -> list:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def table(self) -> str:
        lines = ["\t".join(SUMMARY_COLUMNS)]
        lines += ["\t".join(_tsv(r.get(c)) for c in SUMMARY_COLUMNS) for r in self.rows]
        return "\n".join(lines) + "\n"


def _tsv(v) -> str:
    if v is None:
        return "n/a"  # BIDS: n/a for missing values
    if isinstance(v, float):
        return f"{v:.3f}"
    return " ".join(str(v).split())  # one line, no tabs


# ----------------------------------------------------------------------------------------------- cluster

def _estimate_bytes(scans: Sequence[BatchScan], method) -> int:
    """Rough peak memory of one task: the largest scan's voxels × bytes per voxel of the work."""
    import nibabel as nib
    biggest, echoes = 1, 1
    for s in scans:
        try:
            f = s.inputs["magnitude"][0] if s.kind == "raw" else s.inputs["field"]
            shape = nib.load(str(f)).header.get_data_shape()
        except Exception:
            continue
        n = int(shape[0]) * int(shape[1]) * int(shape[2])
        ne = len(s.inputs["magnitude"]) if s.kind == "raw" else 1
        if len(shape) > 3:
            ne *= int(shape[3])
        if n * (ne + 8) > biggest * (echoes + 8):
            biggest, echoes = n, ne
    # echoes: magnitude, phase, complex and fit temporaries (~40 B per voxel and echo); inversions:
    # 2x-padded complex FFT work arrays (MEDI keeps ~a dozen; networks more) ~ 600 B per voxel
    per_voxel = 40 * echoes + (1500 if getattr(method, "accepts_weights", False) else 600)
    return int(max(1 << 30, biggest * per_voxel + (600 << 20)))  # + interpreter, torch and numpy


def default_workers(task_bytes: int, threads_per_worker: int = 1, n_tasks: Optional[int] = None) -> int:
    """Workers that fit the machine: CPUs // threads, and the available memory // a task's peak."""
    import psutil
    cpus = max(1, (os.cpu_count() or 1) // max(1, threads_per_worker))
    mem = max(1, int(psutil.virtual_memory().available * 0.85) // max(1, task_bytes))
    n = min(cpus, mem)
    if n_tasks:
        n = min(n, n_tasks)
    return max(1, n)


def _parse_bytes(v) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return int(v)
    from dask.utils import parse_bytes
    try:
        return int(parse_bytes(str(v)))
    except (ValueError, TypeError):
        raise ValueError(f"--memory-limit: expected a size like 4GB or 4GiB, got {v!r}") from None


# ----------------------------------------------------------------------------------------------- the task

def _failing_field_step(exc: BaseException) -> str:
    """The front-end family running when ``exc`` was raised (from the traceback of local_field)."""
    fam = ""
    tb = exc.__traceback__
    while tb is not None:
        f = tb.tb_frame
        if f.f_code.co_name == "timed" and "family" in f.f_locals:
            fam = f.f_locals["family"]
        tb = tb.tb_next
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


def _write_field_outputs(run, echoes, out: dict, prov: dict) -> None:
    """The front end's maps on the echoes' grid; the local field (the set's marker) last."""
    import numpy as np
    from .core.io import save_volume
    maps = {"mask": run.scan.mask.astype(np.float32), "magnitude": run.total.magnitude,
            "totalfield": run.total.field, "noisestd": run.total.noise_std, "R2starmap": run.total.r2star,
            "localfield": run.scan.field}
    marker = _sidecar(out["localfield"])
    if marker.exists():
        marker.unlink()
    for suffix, arr in maps.items():
        _, desc, units = FIELD_MAPS[suffix]
        side = {"Description": f"napari-qsm {desc}", **({"Units": units} if units else {}), **prov}
        save_volume(arr, out[suffix], echoes.affine, nifti_info=echoes.nifti_info, provenance=side,
                    description=f"napari-qsm {suffix}" + (f" ({units})" if units else ""))


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


def process_scan(job: dict) -> dict:
    """One Dask task: a scan from its inputs to its derivatives. Never raises for a bad scan.

    ``job`` is a plain dict made by :func:`run_batch` (paths, recipe, method, fingerprints)."""
    t0 = time.perf_counter()
    rec = {"scan": job["id"], "kind": job["kind"], "status": "failed", "seconds": None, "field_residual": None,
           "step": "", "error": "", "worker": f"{socket.gethostname()}:{os.getpid()}"}
    step = "start"
    try:
        threads = _set_threads(job.get("threads"))
        from . import __version__
        from .core.field.pipeline import FieldRecipe
        from .core.io import save_volume, write_json
        from .core.metrics import field_residual
        from .core.params import make_params, params_to_dict
        from .methods import get_method, reconstruct

        out = {k: Path(v) for k, v in job["outputs"].items()}
        out["chi"].parent.mkdir(parents=True, exist_ok=True)
        common = {"software": "napari-qsm", "version": __version__, "scan_id": job["id"],
                  "input_sha256": job["input_sha256"], "Sources": job["sources"]}
        field_seconds = 0.0
        if job["kind"] == "raw":
            fi = {"field": out["localfield"], "mask": out["mask"], "magnitude": out["magnitude"],
                  "noise_std": out["noisestd"], "r2star": out["R2starmap"], "units": "ppm"}
            if job["field_ready"]:
                side = _read_json(_sidecar(out["localfield"])) or {}
                field_steps = side.get("field_steps", [])
            else:
                from .core.field.load import load_echoes
                from .core.field.pipeline import local_field
                step = "load"
                echoes = load_echoes(magnitude=job["inputs"]["magnitude"], phase=job["inputs"]["phase"],
                                     name=job["id"], **job["load"])
                step = "field"
                recipe = FieldRecipe(**job["field_steps"])
                recipe.params = job["field_params"]
                tf = time.perf_counter()
                try:
                    run = local_field(echoes, recipe, device=job["device"])
                except Exception as exc:
                    step = _failing_field_step(exc)
                    raise
                field_seconds = time.perf_counter() - tf
                field_steps = run.steps
                step = "write field"
                from .core.device import device_label, resolve_device
                prov = {**common, "field_fingerprint": job["field_fingerprint"], "field_steps": run.steps,
                        "seconds": round(field_seconds, 3), "device": device_label(resolve_device(job["device"])),
                        "echoes": run.provenance.get("echoes"), "EchoTime": float(run.scan.te),
                        "MagneticFieldStrength": float(run.scan.b0_tesla)}
                _write_field_outputs(run, echoes, out, prov)
                del run, echoes
        else:
            fi = {**{k: job["inputs"].get(k) for k in ("field", "mask", "magnitude", "noise_std", "r2star")},
                  "units": job["units"]}
            field_steps = []
        if job.get("field_only"):
            rec.update(status="done", step="")
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            return rec
        step = "load field"
        scan = _load_fi(fi)
        method = get_method(job["method"])
        step = f"recon:{method.name}"
        extra = {"weights": job["weights"]} if job.get("weights") else {}
        res = reconstruct(scan, method.name, dict(job["params"]), device=job["device"], **extra)
        step = "residual"
        resid = field_residual(res.chi, scan.field, scan.mask, scan.voxel_size, scan.b0_direction,
                               device=job["device"])
        step = "write"
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
        chi_side = _sidecar(out["chi"])
        if chi_side.exists():
            chi_side.unlink()
        save_volume(res.chi, out["chi"], scan.affine, nifti_info=getattr(scan, "_nifti_info", None),
                    description=f"napari-qsm chi (ppm) {res.method}")
        write_json(chi_side, prov)  # last: a matching χ sidecar means the scan is complete
        rec.update(status="done", field_residual=float(resid), step="")
    except BaseException as exc:  # noqa: BLE001 - a task reports, the batch goes on
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        rec.update(step=step, error=f"{type(exc).__name__}: {msg}")
        if not isinstance(exc, (ValueError, OSError)):
            rec["traceback"] = traceback.format_exc(limit=8)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def warm_worker() -> int:
    """Import what a task needs (torch, the registry); returns the process id. ``client.run(warm_worker)``."""
    from .methods import available_methods
    available_methods()
    return os.getpid()


# ----------------------------------------------------------------------------------------------- the batch

def _bar(done: int, total: int, failed: int, t0: float, last: str, tty: bool) -> str:
    width = 28
    n = int(width * done / max(1, total))
    fail = f", {failed} failed" if failed else ""
    return (f"{'[' + '#' * n + '.' * (width - n) + ']'} {done}/{total} scans{fail}, {time.perf_counter() - t0:.0f} s"
            + (f"  {last}" if last else ""))


def _dataset_description(deriv: Path, root: Path) -> None:
    from . import __version__
    from .core.io import write_json
    path = deriv / "dataset_description.json"
    desc = _read_json(path) or {}
    gen = {"Name": "napari-qsm", "Version": __version__,
           "Description": "quantitative susceptibility mapping (napari-qsm batch)"}
    if desc.get("DatasetType") == "derivative" and gen in desc.get("GeneratedBy", []):
        return
    src = _read_json(root / "dataset_description.json") or {}
    new = {"Name": f"napari-qsm QSM derivatives of {src.get('Name', root.name)}",
           "BIDSVersion": src.get("BIDSVersion", "1.9.0"), "DatasetType": "derivative",
           "GeneratedBy": [g for g in desc.get("GeneratedBy", []) if g.get("Name") != "napari-qsm"] + [gen],
           "SourceDatasets": [{"URL": "bids:raw:"}], "DatasetLinks": {"raw": "../../"}}
    write_json(path, new)


def _clean_tmp(deriv: Path) -> int:
    """Remove temporary files a killed worker left behind (only while no task is running)."""
    n = 0
    for p in deriv.rglob(".tmp-*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def run_batch(root, method: str = "tkd", params: Optional[dict] = None, field_params: Optional[dict] = None,
              weights=None, *, client=None, scheduler: Optional[str] = None, workers: Optional[int] = None,
              threads_per_worker: int = 1, memory_limit=None, only: Optional[Sequence[str]] = None,
              dry_run: bool = False, overwrite: bool = False, device: str = "auto",
              adapt_protocol: bool = False, adapt_params: Optional[dict] = None,
              progress: Optional[Callable] = None, echo: bool = True) -> BatchSummary:
    """Reconstruct every scan of the BIDS dataset ``root`` on Dask (see the module docstring).

    method / params: an inversion from :mod:`napari_qsm.methods` and its parameters (public names,
    values may be strings). field_params: the front end for raw echoes, ``{"background": "pdf",
    "background.radius": 6, "phase_units": "siemens", ...}`` (:func:`parse_field_params`).
    weights: a network checkpoint (network methods; default their shipped weights).
    client: a ``distributed.Client`` to use (not closed); else ``scheduler`` ("tcp://host:8786");
    else a LocalCluster with ``workers`` (default :func:`default_workers`) processes of
    ``threads_per_worker`` threads and ``memory_limit`` each (bytes or "4GB"; default: the memory
    divided among the workers). only: subject labels. dry_run: plan only, write nothing.
    overwrite: recompute scans that are up to date.
    adapt_protocol: one protocol adaptation (:func:`napari_qsm.nn.adapt.adapt_protocol`, parameters
    ``adapt_params``, base checkpoint ``weights``) over every scan's local field first, as one task,
    written to ``derivatives/napari-qsm/adapted/protocol-<fingerprint>.pt`` (+ sidecar) and reused
    while the cohort and parameters are the same; then every scan with ``method="dsbn"`` and that
    checkpoint. progress: called with a :class:`~napari_qsm.core.progress.Progress` record per finished
    scan (``message`` e.g. "sub-01 done (4.2 s)"). echo: print the plan, dashboard and a bar to stderr.

    Returns a :class:`BatchSummary`; ``batch_summary.tsv`` is written unless ``dry_run``. Invalid
    arguments (unknown method or parameter, missing root) raise ValueError before any work.
    """
    from .core.field.pipeline import FieldRecipe, split_params
    from .core.params import make_params, params_to_dict
    from .methods import get_method

    t_start = time.perf_counter()
    root = Path(root).resolve()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if echo else (lambda *a: None)
    m = get_method(method)
    if m.multi_scan:
        raise ValueError(f"method {m.name} needs several orientations of one head; batch runs one scan at a time")
    record = make_params(m.params_cls, dict(params or {}))
    par = params_to_dict(record)
    if weights is not None and not m.accepts_weights:
        raise ValueError(f"--weights: method {m.name} takes no network weights")
    w_path = w_sha = None
    if m.accepts_weights:
        if weights is None:
            from .nn.infer import default_weights_path
            w_path = default_weights_path()
        else:
            w_path = Path(weights).resolve()
        if not Path(w_path).is_file():
            raise ValueError(f"--weights: {w_path} is not a file")
        w_sha = sha256_file(w_path)
    a_par = None
    if adapt_protocol:
        if m.name != "dsbn":
            raise ValueError(f"--adapt-protocol: every scan is reconstructed with the adapted network; use --method dsbn "
                             f"(not {m.name})")
        from .nn.adapt import AdaptParams
        a_par = params_to_dict(make_params(AdaptParams, dict(adapt_params or {})))
    elif adapt_params:
        raise ValueError("--adapt-param: given without --adapt-protocol")
    fsteps, fparams, fload = parse_field_params(field_params)
    recipe = FieldRecipe(**fsteps)
    recipe.params = split_params(fparams, recipe)
    field_recipe = {f: {"step": recipe.step(f).name, "parameters": params_to_dict(recipe.record(f))}
                    for f in FIELD_FAMILIES}
    if fload.get("phase_units", "auto") not in ("auto", "rad", "siemens", "mrad"):
        raise ValueError(f"--field-param phase_units: expected auto, rad, siemens or mrad, got {fload['phase_units']!r}")
    if fload.get("phase_sign", 1) not in (1, -1):
        raise ValueError(f"--field-param phase_sign: expected 1 or -1, got {fload['phase_sign']!r}")
    mem_bytes = _parse_bytes(memory_limit)
    if threads_per_worker < 1 or (workers is not None and workers < 1):
        raise ValueError("--workers and --threads-per-worker must be at least 1")

    scans = discover(root, only)
    deriv = root / "derivatives" / DERIVATIVES
    say(f"napari-qsm batch: {len(scans)} scan(s) under {root} "
        f"({sum(s.kind == 'raw' for s in scans)} raw echoes, {sum(s.kind == 'field' for s in scans)} local fields)"
        f" -> {deriv}")

    with ThreadPoolExecutor(max_workers=4) as pool:  # the client hashes every input once
        all_hashes = list(pool.map(lambda s: input_hashes(s, root), scans))
    plan = dict(root=root, m=m, par=par, fsteps=fsteps, recipe=recipe, field_recipe=field_recipe, fload=fload,
                overwrite=overwrite, device=device)
    holder = _ClientHolder(client, scheduler, workers, threads_per_worker, mem_bytes, say,
                           lambda ids: _estimate_bytes([s for s in scans if s.id in ids], m))
    wrote = False

    def _dry_or_open(planned):
        """Dry run: say the plan and return its summary; otherwise create the derivatives folder (None)."""
        if dry_run:
            _say_rows(planned, say)
            return BatchSummary(planned, None, time.perf_counter() - t_start, dry_run=True)
        deriv.mkdir(parents=True, exist_ok=True)
        _dataset_description(deriv, root)

    try:
        if adapt_protocol:
            rows0, field_jobs = _plan(scans, all_hashes, **plan, weights=None, w_sha=None, field_only=True)
            say(f"  protocol adaptation over the cohort: local fields to compute: {len(field_jobs)}; then one "
                f"adaptation ({a_par['steps']} steps, mode {a_par['mode']}), then dsbn on every scan")
            if (dry := _dry_or_open(rows0)) is not None:
                return dry
            wrote = True
            if field_jobs:
                _submit_and_wait(holder, field_jobs, say, progress, echo, what="local fields")
            ok = [s for s, r in zip(scans, rows0) if r["status"] != "failed"]
            ok_hashes = [h for s, h in zip(scans, all_hashes) if s in ok]
            ckpt, c_sha = _adapt_cohort(holder, ok, ok_hashes, plan, a_par,
                                        w_path, w_sha, deriv, say) if ok else (None, None)
            rows, jobs = [], []
            failed = {r["scan"]: r for r in rows0 if r["status"] == "failed"}
            if ckpt is None and ok:  # the adaptation failed: every scan of the cohort with it
                for s in ok:
                    failed[s.id] = {**next(r for r in rows0 if r["scan"] == s.id), "status": "failed",
                                    "step": "adapt", "error": c_sha}
            r2, jobs = (_plan(ok, ok_hashes, **plan, weights=str(ckpt),
                              w_sha=c_sha) if ckpt is not None else ([], []))
            by = {r["scan"]: r for r in r2}
            rows = [failed.get(s.id) or by[s.id] for s in scans]
        else:
            rows, jobs = _plan(scans, all_hashes, **plan,
                               weights=None if w_path is None or weights is None else str(w_path), w_sha=w_sha)
            if (dry := _dry_or_open(rows)) is not None:
                return dry
            wrote = True
        n_skip = sum(r["status"] == "skipped" for r in rows)
        n_bad = sum(r["status"] == "failed" for r in rows)
        reuse = sum(j["field_ready"] for _, j in jobs)
        say(f"  to run: {len(jobs)}, up to date: {n_skip}, unusable: {n_bad}"
            + (f" (field reused for {reuse})" if reuse else ""))
        if jobs:
            _submit_and_wait(holder, jobs, say, progress, echo)
    except BaseException:  # interrupted (Ctrl-C) or the scheduler went away: keep what finished
        if wrote and not dry_run and "rows" in locals():
            for r in rows:
                if r["status"] == "planned":
                    r.update(status="not run", step="interrupted")
            _write_summary(rows, deriv)
        raise
    finally:
        holder.close()
        if deriv.is_dir() and not dry_run:
            _clean_tmp(deriv)
    summary = BatchSummary(rows, _write_summary(rows, deriv), time.perf_counter() - t_start, holder.dashboard,
                           holder.n_workers)
    say(f"napari-qsm batch: {len(summary.done)} done, {len(summary.skipped)} up to date, {len(summary.failed)} failed "
        f"in {summary.seconds:.1f} s -> {summary.path}")
    for r in summary.failed:
        say(f"  FAILED {r['scan']} [{r['step']}] {r['error']}")
    return summary


def _say_rows(rows, say) -> None:
    for r in rows:
        st = {"skipped": "up to date", "planned": "to run"}.get(r["status"], r["status"])
        say(f"  {r['scan']:32s} {r['kind']:5s} {st}" + (f"  [{r['step']}] {r['error']}" if r["error"] else ""))


def _plan(scans, all_hashes, *, root, m, par, fsteps, recipe, field_recipe, fload, overwrite, device, weights, w_sha,
          field_only: bool = False):
    """(summary rows, [(row, job)]) for the scans: fingerprints, what is up to date, what runs.

    field_only: plan the front end alone (a raw scan is up to date when its field outputs are)."""
    rows, jobs = [], []
    for s, h in zip(scans, all_hashes):
        out = output_paths(root, s, m.name)
        row = {"scan": s.id, "kind": s.kind, "status": "", "seconds": None, "field_residual": None,
               "step": "", "error": "", "worker": ""}
        rows.append(row)
        if s.problem or "__error__" in h:
            row.update(status="failed", step="discover", error=s.problem or h["__error__"], seconds=0.0)
            continue
        units = "ppm"
        if s.kind == "field":
            u = str((_read_json(_sidecar(s.inputs["field"])) or {}).get("Units", "ppm")).strip().lower()
            units = {"ppm": "ppm", "hz": "hz", "rad": "rad", "radian": "rad", "radians": "rad"}.get(u, "ppm")
        field_fp = _digest({"inputs": h, "field": field_recipe, "load": fload}) if s.kind == "raw" else None
        fp = _digest({"inputs": h, "field": field_recipe if s.kind == "raw" else None, "units": units,
                      "load": fload if s.kind == "raw" else None,
                      "method": m.name, "parameters": par, "weights_sha256": w_sha})
        field_ready = False
        if s.kind == "raw" and not overwrite:
            fside = _read_json(_sidecar(out["localfield"])) or {}
            field_ready = (fside.get("field_fingerprint") == field_fp
                           and all(out[k].exists() for k in FIELD_MAPS))
        if field_only:
            if s.kind == "field" or field_ready:
                row.update(status="skipped", seconds=0.0)
                continue
        else:
            chi_side = _read_json(_sidecar(out["chi"])) or {}
            complete = all(p.exists() for p in out.values())
            if not overwrite and complete and chi_side.get("fingerprint") == fp:
                row.update(status="skipped", seconds=0.0, field_residual=chi_side.get("field_residual_percent"))
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
        }))
        row["status"] = "planned"
    return rows, jobs


def _field_inputs(job_or_scan, root, method) -> dict:
    """{field, mask, magnitude, noise_std, r2star, units} the inversion reads for a scan."""
    s = job_or_scan
    if s.kind == "raw":
        out = output_paths(root, s, method)
        return {"field": str(out["localfield"]), "mask": str(out["mask"]), "magnitude": str(out["magnitude"]),
                "noise_std": str(out["noisestd"]), "r2star": str(out["R2starmap"]), "units": "ppm"}
    units = str((_read_json(_sidecar(s.inputs["field"])) or {}).get("Units", "ppm")).strip().lower()
    return {**{k: None if s.inputs.get(k) is None else str(s.inputs[k])
               for k in ("field", "mask", "magnitude", "noise_std", "r2star")},
            "units": {"hz": "hz", "rad": "rad"}.get(units, "ppm")}


def _load_fi(fi: dict):
    from .core.io import load_scan
    return load_scan(str(fi["field"]), str(fi["mask"]), None if not fi.get("magnitude") else str(fi["magnitude"]),
                     units=fi.get("units", "ppm"), noise_std=None if not fi.get("noise_std") else str(fi["noise_std"]),
                     r2star=None if not fi.get("r2star") else str(fi["r2star"]))


def adapt_task(job: dict) -> dict:
    """One Dask task: protocol adaptation over the cohort's local fields, saved atomically with its sidecar."""
    t0 = time.perf_counter()
    try:
        _set_threads(job.get("threads"))
        from .nn.adapt import adapt_protocol, save_adapted
        scans = [_load_fi(fi) for fi in job["fields"]]
        res = adapt_protocol(scans, dict(job["params"]), weights=job["base"], device=job["device"])
        path = Path(job["path"])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_adapted(res, path, base_weights_path=job["base"], scan=scans)
        from .core.io import write_json
        side = _read_json(path.with_suffix(".json")) or {}  # the checkpoint's card
        side["batch"] = {"cohort_fingerprint": job["fingerprint"], "scans": job["ids"]}
        write_json(path.with_suffix(".json"), side)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 3), "error": ""}
    except Exception as exc:  # noqa: BLE001 - reported for every scan of the cohort
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 3),
                "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def _adapt_cohort(holder, scans, hashes, plan, a_par, w_path, w_sha, deriv: Path, say):
    """The adapted checkpoint of the cohort (reused when present); (path, its sha256) or (None, error)."""
    root, m = plan["root"], plan["m"]
    ids = [s.id for s in scans]
    cfp = _digest({"scans": [[s.id, h] for s, h in zip(scans, hashes)], "field": plan["field_recipe"],
                   "load": plan["fload"], "adapt": a_par, "base_sha256": w_sha})
    path = deriv / "adapted" / f"protocol-{cfp[:16]}.pt"
    side = _read_json(path.with_suffix(".json")) or {}
    if (not plan["overwrite"] and path.exists()
            and (side.get("batch") or {}).get("cohort_fingerprint") == cfp):
        say(f"  adapted checkpoint up to date: {path}")
        return path, sha256_file(path)
    job = {"fields": [_field_inputs(s, root, m.name) for s in scans], "params": a_par, "base": str(w_path),
           "device": plan["device"], "path": str(path), "fingerprint": cfp, "ids": ids, "threads": None}
    say(f"  adapting to {len(scans)} scan(s) ({a_par['steps']} steps) -> {path}")
    t0 = time.perf_counter()
    fut = holder.get().submit(adapt_task, job, key=f"qsm-adapt-protocol-{cfp[:12]}", pure=False, retries=0)
    try:
        rec = fut.result()
    except Exception as exc:
        rec = {"ok": False, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
    if not rec["ok"]:
        say(f"  adaptation FAILED: {rec['error']}")
        return None, rec["error"]
    say(f"  adapted in {time.perf_counter() - t0:.1f} s")
    return path, sha256_file(path)


class _ClientHolder:
    """The Dask client: the caller's, one to ``scheduler``, or a LocalCluster started when first needed."""

    def __init__(self, client, scheduler, workers, threads, mem_bytes, say, estimate):
        self.client, self.scheduler, self.workers, self.threads = client, scheduler, workers, threads
        self.mem_bytes, self.say, self.estimate = mem_bytes, say, estimate
        self.own_client = self.own_cluster = None
        self.dashboard, self.n_workers = "", 0
        self.n_tasks = 1
        self.ids: set = set()

    def get(self):
        if self.client is None:
            from distributed import Client, LocalCluster
            if self.scheduler:
                self.client = self.own_client = Client(self.scheduler)
            else:
                task_bytes = self.estimate(self.ids)
                n = self.workers or default_workers(self.mem_bytes or task_bytes, self.threads, self.n_tasks)
                mem = self.mem_bytes
                if mem is None:
                    import psutil
                    mem = max(task_bytes, int(psutil.virtual_memory().total * 0.9) // n)
                env = {k: str(self.threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
                self.own_cluster = LocalCluster(n_workers=n, threads_per_worker=self.threads, processes=True,
                                                memory_limit=mem, env=env, silence_logs=40)
                self.client = self.own_client = Client(self.own_cluster)
        if not self.n_workers:
            self.n_workers = len(self.client.scheduler_info().get("workers", {}))
            self.dashboard = self.client.dashboard_link or ""
            try:
                import bokeh  # noqa: F401
                note = ""
            except ImportError:
                note = " (not served: `pip install bokeh` to see it)"
            self.say(f"  Dask scheduler {getattr(self.client.scheduler, 'address', '?')}, {self.n_workers} worker(s); "
                     f"dashboard {self.dashboard or 'n/a'}{note}")
        return self.client

    def close(self):
        if self.own_client is not None:
            self.own_client.close()
        if self.own_cluster is not None:
            self.own_cluster.close()


def _write_summary(rows, deriv: Path) -> Path:
    from .core.files import atomic_write
    path = deriv / "batch_summary.tsv"
    text = BatchSummary(rows, path, 0.0).table()

    def w(tmp):
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
    return atomic_write(path, w)


def _submit_and_wait(holder, jobs, say, progress, echo=True, what="scans") -> None:
    from distributed import as_completed

    from .core.progress import Progress
    holder.n_tasks = max(holder.n_tasks, len(jobs))
    holder.ids |= {job["id"] for _, job in jobs}
    client = holder.get()
    tty = sys.stderr.isatty()
    t0 = time.perf_counter()
    futures = {}
    for row, job in jobs:
        key = f"qsm-{job['id']}-{'field-' if job.get('field_only') else ''}{job['fingerprint'][:12]}"
        futures[client.submit(process_scan, job, key=key, pure=False, retries=0)] = row
    done = failed = 0
    try:
        for fut in as_completed(list(futures)):
            row = futures[fut]
            try:
                rec = fut.result()
            except Exception as exc:  # KilledWorker (the task killed too many workers), lost scheduler...
                name = type(exc).__name__
                hint = " (every worker that ran it died: out of memory?)" if name == "KilledWorker" else ""
                rec = {"status": "failed", "step": "worker", "error": f"{name}: {' '.join(str(exc).split())}{hint}"}
            rec.pop("traceback", None)
            row.update({k: v for k, v in rec.items() if k in row})
            done += 1
            failed += row["status"] == "failed"
            last = f"{row['scan']} {row['status']}" + (f" ({row['seconds']:.1f} s)" if row.get("seconds") else "")
            line = _bar(done, len(jobs), failed, t0, last, tty).replace(" scans", f" {what}")
            if not echo:
                pass
            elif tty:
                print("\r" + line[:150].ljust(150), end="" if done < len(jobs) else "\n", file=sys.stderr, flush=True)
            else:
                say(line)
            if progress is not None:
                progress(Progress(step=done, total=len(jobs), message=last, stage="batch" if what == "scans" else what,
                                  elapsed=time.perf_counter() - t0))
    except BaseException:
        for f in futures:
            f.cancel()
        raise
