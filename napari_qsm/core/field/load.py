"""One loader for raw multi-echo GRE: :func:`load_echoes` (used by the API, the CLI and the reader).

Inputs (``inputs`` or the explicit lists):

* a BIDS ``anat`` folder, a subject/session folder above it, or any folder holding
  ``*_echo-N_part-mag_*MEGRE.nii[.gz]`` / ``*_echo-N_part-phase_*MEGRE.nii[.gz]`` with JSON
  sidecars (EchoTime s, MagneticFieldStrength T, ImagingFrequency MHz, Manufacturer). More than
  one acquisition (other run/acq/session entities) is refused with the list to choose from;
* explicit lists ``magnitude=[...]``, ``phase=[...]`` (one 3-D file per echo, or one 4-D file each
  with echo last) and ``te=[...]``;
* a DICOM folder: converted with the ``dcm2niix`` binary (the PyPI wheel ``dcm2niix`` ships it;
  ``pip install napari-qsm[dicom]``) into a temporary folder, renamed to BIDS MEGRE names from the
  sidecars (EchoNumber, ImageType M/P), then read by the BIDS path.

Phase units and sign (``phase_units``, ``phase_sign``): see :mod:`.phase_units` (auto-detection
of radians, signed/unsigned Siemens integers, Philips milliradians, "rescale" only with evidence,
GE's sign; what was chosen and why is in ``Echoes.vendor``).

B0: the argument, else ImagingFrequency (MHz) / 42.577478 (a "3 T" Siemens is 2.89 T), else
MagneticFieldStrength. TE: the argument, else each echo's sidecar EchoTime; values > 1 are taken
as milliseconds, converted and warned about. Everything found is recorded in ``Echoes.vendor``.

Output: :class:`~.records.Echoes` in the canonical voxel order (``nib.as_closest_canonical``), with
the first magnitude file's original affine and header kept for writing results back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np

from ..constants import GAMMA_BAR_MHZ_PER_T
from ..io import load_image, read_sidecar
from ..io.bids import find_megre, has_megre, strip_ext as _strip_ext
from ..scan import ScanError
from .phase_units import PHASE_UNITS, detect_phase_units, phase_to_radians
from .records import Echoes

__all__ = ["load_echoes", "detect_phase_units", "phase_to_radians", "PHASE_UNITS", "find_bids_echoes", "dicom_to_bids",
           "dcm2niix_binary"]

# ----------------------------------------------------------------------------------------------- reading

def _read(path, name):
    """(data canonical float32 4-D, canonical affine, info, stored shape, header scaling) of one file."""
    img = load_image(path, name)
    orig = img.affine.copy()
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    can = nib.as_closest_canonical(img)
    data = np.asarray(can.dataobj, dtype=np.float32)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise ScanError(f"{name}: expected a 3-D volume per echo or a 4-D volume with echoes last, got shape "
                        f"{data.shape} ({path})")
    info = {"path": str(Path(path).resolve()), "original_affine": orig, "ornt": nib.io_orientation(orig),
            "header": img.header.copy()}
    scaling = None
    try:
        s, i = float(slope), float(inter)
        if np.isfinite(s) and np.isfinite(i) and (s, i) != (1.0, 0.0) and s != 0:
            scaling = {"scl_slope": s, "scl_inter": i}
    except (TypeError, ValueError):
        pass
    return data, can.affine.copy(), info, tuple(img.shape[:3]), scaling


def _stack(paths, kind):
    """Read a list of files of one kind (magnitude/phase) into (i, j, k, echo)."""
    vols, infos, scalings = [], [], []
    ref = None
    for n, p in enumerate(paths):
        label = f"{kind} {n + 1} ({Path(p).name})"
        data, aff, info, sshape, sc = _read(p, label)
        if ref is None:
            ref = (sshape, info["original_affine"], label)
        else:
            if sshape != ref[0]:
                raise ScanError(f"{label}: shape {sshape} differs from {ref[2]}'s {ref[0]}; all echoes must share one grid")
            if not np.allclose(info["original_affine"], ref[1], atol=1e-3):
                raise ScanError(f"{label}: its affine differs from {ref[2]}'s; all echoes must share one grid")
        vols.append(data)
        infos.append(info)
        scalings.append(sc)
    return np.concatenate(vols, axis=3), aff, infos, ref, scalings


def _num(v, what):
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ScanError(f"{what}: expected a number, got {v!r}") from None
    if not np.isfinite(x) or x <= 0:
        raise ScanError(f"{what}: expected a positive number, got {v!r}")
    return x


def _te_from_sidecars(sides, n_echo, label):
    """Echo times from sidecars: one per file, or a list of n_echo in a single 4-D file's sidecar."""
    if len(sides) == 1 and n_echo > 1:
        v = sides[0].get("EchoTime")
        if isinstance(v, (list, tuple)) and len(v) == n_echo:
            return [_num(x, f"{label} sidecar EchoTime") for x in v]
        return None
    tes = []
    for n, s in enumerate(sides):
        v = s.get("EchoTime")
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            if len(v) != 1:
                return None
            v = v[0]
        tes.append(_num(v, f"{label} {n + 1} sidecar EchoTime"))
    return tes


def _first(sides, key):
    for s in sides:
        if key in s and s[key] not in (None, ""):
            return s[key]
    return None


# ----------------------------------------------------------------------------------------------- BIDS

def find_bids_echoes(folder) -> tuple[list[Path], list[Path]]:
    """(magnitude files, phase files) of the one MEGRE acquisition under ``folder``, in echo order."""
    folder = Path(folder)
    groups = find_megre(folder)
    if not groups:
        raise ScanError(f"input: no BIDS multi-echo GRE files (*_echo-N_part-mag_MEGRE.nii.gz and "
                        f"*_echo-N_part-phase_MEGRE.nii.gz) under {folder}")
    if len(groups) > 1:
        names = "\n  ".join(sorted(prefix + "_MEGRE" for _, prefix in groups))
        raise ScanError(f"input: {folder} holds {len(groups)} MEGRE acquisitions; give the folder or files of one:"
                        f"\n  {names}")
    g = next(iter(groups.values()))
    me, pe = sorted(g["mag"]), sorted(g["phase"])
    if me != pe:
        raise ScanError(f"input: magnitude echoes {me} and phase echoes {pe} differ in {folder}; expected one phase "
                        "per magnitude echo")
    return [g["mag"][e] for e in me], [g["phase"][e] for e in pe]


# ----------------------------------------------------------------------------------------------- DICOM

def dcm2niix_binary() -> Optional[str]:
    """Path of the dcm2niix binary: the PyPI wheel's, else one on PATH, else None."""
    try:
        import dcm2niix  # type: ignore
        b = Path(dcm2niix.bin)
        if b.is_file():
            return str(b)
    except Exception:
        pass
    return shutil.which("dcm2niix")


def _looks_like_dicom(folder: Path) -> bool:
    for n, p in enumerate(folder.rglob("*")):
        if n > 2000:
            break
        if p.is_file():
            try:
                with open(p, "rb") as fh:
                    head = fh.read(132)
            except OSError:
                continue
            if len(head) == 132 and head[128:132] == b"DICM":
                return True
            if p.suffix.lower() in (".dcm", ".ima"):
                return True
    return False


def _protocol(side: dict) -> str:
    """Protocol/series name without a phase suffix, to pair magnitude and phase series."""
    name = str(side.get("ProtocolName") or side.get("SeriesDescription") or "").strip()
    return re.sub(r"[_ ](ph|pha|phase|p)$", "", name, flags=re.IGNORECASE)


def dicom_to_bids(dicom_dir, out_dir) -> tuple[list[Path], list[Path]]:
    """Convert a DICOM folder with dcm2niix into BIDS MEGRE names in ``out_dir``; (mag files, phase files).

    Runs ``dcm2niix -b y -z y -f %s_%e -o OUT DICOM``; each output's sidecar gives SeriesNumber,
    EchoNumber, ImageType (``P``/``PHASE`` = phase, otherwise magnitude) and ProtocolName. Magnitude
    and phase series of one protocol are paired (Siemens writes them as two series); the pair with
    both parts and the most echoes is kept. Raises ScanError when there is none.
    """
    exe = dcm2niix_binary()
    if exe is None:
        raise ScanError("input: a DICOM folder needs dcm2niix; install it with `pip install dcm2niix` "
                        "(or `pip install napari-qsm[dicom]`)")
    raw = Path(out_dir) / "dcm2niix"
    raw.mkdir(parents=True, exist_ok=True)
    cmd = [exe, "-b", "y", "-z", "y", "-f", "%s_%e", "-o", str(raw), str(dicom_dir)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ScanError(f"input: dcm2niix failed on {dicom_dir} ({type(exc).__name__}: {exc})") from None
    if res.returncode not in (0,) and not any(raw.glob("*.nii*")):
        tail = (res.stderr or res.stdout or "").strip().splitlines()[-3:]
        raise ScanError(f"input: dcm2niix could not convert {dicom_dir} (exit {res.returncode}): {' | '.join(tail)}")
    series: dict = {}
    entries = []
    for js in sorted(raw.glob("*.json")):
        try:
            side = json.loads(js.read_text())
        except Exception:
            continue
        nii = [p for p in (js.with_suffix(".nii.gz"), js.with_suffix(".nii")) if p.exists()]
        if not nii:
            continue
        itype = [str(t).upper() for t in side.get("ImageType", [])]
        part = "phase" if ("P" in itype or "PHASE" in itype) else "mag"
        entries.append((int(side.get("SeriesNumber", 0) or 0), part, int(side.get("EchoNumber", 1) or 1), nii[0], js,
                        _protocol(side)))
    # magnitude and phase may be separate series (Siemens: phase = the next series number, same protocol):
    # group by protocol name, later series of a part replacing earlier ones
    for num, part, echo, nii, js, proto in sorted(entries, key=lambda t: (t[0], t[2])):
        key = proto or f"series {num - (1 if part == 'phase' else 0)}"
        s = series.setdefault(key, {"mag": {}, "phase": {}})
        s[part][echo] = (nii, js)
    cands = [(k, s) for k, s in series.items() if s["mag"] and s["phase"] and sorted(s["mag"]) == sorted(s["phase"])]
    if not cands:
        found = ", ".join(f"{k}: {len(s['mag'])} magnitude / {len(s['phase'])} phase" for k, s in series.items())
        raise ScanError(f"input: no gradient-echo series with both magnitude and phase images in {dicom_dir}"
                        f"{' (found ' + found + ')' if found else ' (dcm2niix found no images)'}")
    _, s = max(cands, key=lambda ks: len(ks[1]["mag"]))
    bids = Path(out_dir) / "anat"
    bids.mkdir(parents=True, exist_ok=True)
    out = {"mag": [], "phase": []}
    for part in ("mag", "phase"):
        for e in sorted(s[part]):
            nii, js = s[part][e]
            ext = ".nii.gz" if nii.name.endswith(".gz") else ".nii"
            dst = bids / f"sub-dicom_echo-{e}_part-{part}_MEGRE{ext}"
            shutil.move(str(nii), dst)
            shutil.move(str(js), dst.with_name(dst.name[: -len(ext)] + ".json"))
            out[part].append(dst)
    return out["mag"], out["phase"]


# ----------------------------------------------------------------------------------------------- main

def _as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, (str, Path)):
        return [x]
    return list(x)


def load_echoes(inputs=None, *, magnitude: Sequence = (), phase: Sequence = (), te: Optional[Sequence[float]] = None,
                b0: Optional[float] = None, phase_units: str = "auto", phase_sign: Optional[int] = None,
                name: Optional[str] = None) -> Echoes:
    """Raw multi-echo GRE → :class:`Echoes` (see the module docstring for inputs and rules).

    inputs: a BIDS anat/subject folder or a DICOM folder (a list of one is accepted). Otherwise
    ``magnitude`` and ``phase`` lists (3-D per echo or one 4-D each). ``te`` (s; ms detected),
    ``b0`` (T) override the sidecars. Errors name the input and what was expected.
    """
    units = str(phase_units).strip().lower()
    if units not in PHASE_UNITS:
        raise ScanError(f"phase_units: expected one of {PHASE_UNITS}, got {phase_units!r}")
    if phase_sign is not None and phase_sign not in (1, -1):
        raise ScanError(f"phase_sign: expected +1 or -1, got {phase_sign!r}")
    ins, mags, phs = _as_list(inputs), _as_list(magnitude), _as_list(phase)
    if ins and (mags or phs):
        raise ScanError("input: give either a folder (BIDS or DICOM) or magnitude=/phase= lists, not both")
    if len(ins) > 1:
        raise ScanError(f"input: expected one folder (BIDS anat/subject folder or DICOM folder), got {len(ins)} paths; "
                        "for separate files use magnitude=[...] and phase=[...]")
    if ins:
        folder = Path(ins[0])
        if not folder.exists():
            raise ScanError(f"input: {folder} does not exist")
        if not folder.is_dir():
            raise ScanError(f"input: {folder} is not a folder; give a BIDS or DICOM folder, or magnitude=/phase= files")
        if has_megre(folder):
            mags, phs = find_bids_echoes(folder)
            kind = "bids"
        elif _looks_like_dicom(folder):
            with tempfile.TemporaryDirectory(prefix="napari-qsm-dcm2niix-") as tmp:
                m, p = dicom_to_bids(folder, tmp)
                ech = _load_lists(m, p, te, b0, units, phase_sign, name or folder.name, "dicom")
            v = dict(ech.vendor)
            v["converted_with"] = "dcm2niix"
            return Echoes(magnitude=ech.magnitude, phase=ech.phase, te=ech.te, b0_tesla=ech.b0_tesla,
                          affine=ech.affine, vendor=v, sources=(str(folder.resolve()),), nifti_info=ech.nifti_info,
                          name=ech.name)
        else:
            raise ScanError(f"input: {folder} holds neither BIDS MEGRE files (*_echo-N_part-mag|phase_MEGRE.nii.gz) "
                            "nor DICOM files")
    else:
        kind = "files"
        if not mags and not phs:
            raise ScanError("input: nothing given; expected a BIDS/DICOM folder or magnitude=[...] and phase=[...]")
        if not mags:
            raise ScanError("magnitude: missing; expected magnitude files matching the phase files")
        if not phs:
            raise ScanError("phase: missing; expected phase files matching the magnitude files")
    return _load_lists(mags, phs, te, b0, units, phase_sign, name, kind)


def _load_lists(mags, phs, te, b0, units, phase_sign, name, kind) -> Echoes:
    mag, aff, minfo, mref, _ = _stack(mags, "magnitude")
    ph, _, pinfo, pref, pscal = _stack(phs, "phase")
    if mag.shape[3] != ph.shape[3]:
        raise ScanError(f"phase: {ph.shape[3]} echoes but magnitude has {mag.shape[3]} ({len(phs)} phase and "
                        f"{len(mags)} magnitude files); expected one phase per magnitude echo")
    if pref[0] != mref[0]:
        raise ScanError(f"phase: shape {pref[0]} differs from the magnitude's {mref[0]}")
    if not np.allclose(pref[1], mref[1], atol=1e-3):
        raise ScanError("phase: its affine differs from the magnitude's; magnitude and phase must share one grid")
    for arr, kind_ in ((mag, "magnitude"), (ph, "phase")):
        if not np.all(np.isfinite(arr)):
            e = int(np.nonzero(~np.all(np.isfinite(arr), axis=(0, 1, 2)))[0][0])
            raise ScanError(f"{kind_} echo {e + 1}: NaN/Inf values; expected finite numbers")
    for e in range(mag.shape[3]):
        if not np.any(mag[..., e]):
            raise ScanError(f"magnitude echo {e + 1}: all zero")
    if np.any(mag < 0):
        warnings.warn("magnitude: negative values found; taking their absolute value", stacklevel=3)
        mag = np.abs(mag)

    msides = [read_sidecar(p, f"magnitude {n + 1}") for n, p in enumerate(mags)]
    psides = [read_sidecar(p, f"phase {n + 1}") for n, p in enumerate(phs)]
    sides = msides + psides
    vendor: dict = {"input": kind}
    notes: list = []
    manufacturer = _first(sides, "Manufacturer") or ""
    if manufacturer:
        vendor["manufacturer"] = str(manufacturer)

    # echo times
    n_echo = mag.shape[3]
    if te is not None:
        tes = [_num(t, "te") for t in np.atleast_1d(np.asarray(te, dtype=object))]
        te_src = "argument"
    else:
        tes = _te_from_sidecars(msides, n_echo, "magnitude") or _te_from_sidecars(psides, n_echo, "phase")
        te_src = "sidecar EchoTime"
        if tes is None:
            raise ScanError(f"te: echo times missing; the sidecars do not give EchoTime for all {n_echo} echoes; "
                            "give te=[...] (seconds) / --te T1 T2 ...")
    if len(tes) != n_echo:
        raise ScanError(f"te: {len(tes)} echo times for {n_echo} echoes")
    if max(tes) > 1.0:
        msg = f"te: echo times {tes} look like milliseconds (> 1); converted to seconds"
        warnings.warn(msg, stacklevel=3)
        notes.append(msg)
        tes = [t / 1000.0 for t in tes]
        te_src += " (ms converted to s)"
    if any(b <= a for a, b in zip(tes, tes[1:])):
        raise ScanError(f"te: echo times must be strictly increasing, got {tes}")
    vendor["te_source"] = te_src

    # field strength
    if b0 is not None:
        b0_t, b0_src = _num(b0, "b0"), "argument"
    else:
        f = _first(sides, "ImagingFrequency")
        if f is not None:
            b0_t = _num(f, "sidecar ImagingFrequency (MHz)") / GAMMA_BAR_MHZ_PER_T
            b0_src = f"sidecar ImagingFrequency {float(f)} MHz / {GAMMA_BAR_MHZ_PER_T}"
            if not 0.01 < b0_t < 30:
                raise ScanError(f"sidecar ImagingFrequency: {f} gives B0 = {b0_t:.4g} T; expected MHz of 1H")
        else:
            f = _first(sides, "MagneticFieldStrength")
            if f is None:
                raise ScanError("b0: field strength missing; the sidecars have neither ImagingFrequency nor "
                                "MagneticFieldStrength; give b0= (tesla) / --b0 T")
            b0_t, b0_src = _num(f, "sidecar MagneticFieldStrength"), "sidecar MagneticFieldStrength"
    vendor["b0_source"] = b0_src

    # phase units and sign
    phase_rad, facts = phase_to_radians(ph, units, manufacturer, phase_sign, "phase", magnitude=mag)
    vendor.update(facts)
    hs = [s for s in pscal if s]
    vendor["phase_header_scaling"] = hs[0] if hs else None
    if notes:
        vendor["notes"] = notes
    nm = name or _strip_ext(Path(mags[0]).name).replace("_part-mag", "").replace("_echo-1", "")
    return Echoes(magnitude=mag, phase=phase_rad, te=tuple(tes), b0_tesla=b0_t, affine=aff, vendor=vendor,
                  sources=tuple(str(Path(p).resolve()) for p in list(mags) + list(phs)), nifti_info=minfo[0],
                  name=nm)
