"""The records a reconstruction method is declared and returned with: :class:`Method` and :class:`Result`.

A module that implements an inversion (``core/inversion/tkd.py``, ``core/inversion/medi.py``, ``nn/infer.py``, or a
third-party package) declares it with a module-level ``METHODS = (Method(...), ...)`` and knows
nothing of the registry: :mod:`napari_qsm.methods` collects the declarations (from this package's
modules and from the ``napari_qsm.methods`` entry-point group), and the Python API, the command
line and the napari docks are generated from what it collects.

A method's ``run`` function has the signature::

    run(scan: Scan, params: ParamsRecord, *, device: torch.device, progress, cancel, **extra) -> np.ndarray | dict

returning χ (ppm, float32, the scan's shape) or a dict ``{"chi": ..., "extras": {...}}``.
``extra`` carries method-specific inputs that are not parameters (e.g. ``weights`` for the
network, or additional scans for COSMOS).

One χ reference for every method: :class:`Method` adds a ``reference`` field (none / mean / csf) to
its parameter record, so the API, the CLI (``--param reference=csf``) and the dock's generated form
all offer it, and :func:`run_method` applies it after the method ran (:func:`apply_reference`) and
records it in the result's parameters and extras.
"""

from __future__ import annotations

import datetime as _dt
import time
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .device import device_label, resolve_device
from .params import check_params, display_name, make_params, param, params_to_dict
from .progress import check_cancel

__all__ = ["Method", "Result", "run_method", "apply_reference", "REFERENCES", "with_reference"]

REFERENCES = ("none", "mean", "csf")
REFERENCE_DOC = ("χ reference: mean (χ's mean in the mask = 0, QSMxT's default), csf (mean in CSF = 0: R2* < 5 1/s "
                 "central regions when the scan has R2*, else the brightest central magnitude; MEDI+0's rule) or none")


def _rebuild_params(base: type, values: dict):
    """Unpickle a record of a :func:`with_reference` class (the dynamic class is rebuilt from its base)."""
    return with_reference(base)(**values)


_WITH_REF: dict = {}


def with_reference(cls: type) -> type:
    """The parameter record ``cls`` with a ``reference`` field appended (cached; ``cls`` itself when it
    already has one). Records of the new class pickle through their base class (Dask workers)."""
    if not dataclasses.is_dataclass(cls):
        return cls
    if cls in _WITH_REF or any(f.name == "reference" for f in dataclasses.fields(cls)):
        return _WITH_REF.get(cls, cls)

    def __reduce__(self):
        return (_rebuild_params, (cls, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}))

    new = dataclasses.make_dataclass(
        cls.__name__, [("reference", str, param("mean", REFERENCE_DOC, choices=REFERENCES, short="ref"))],
        bases=(cls,), namespace={"__reduce__": __reduce__, "__module__": cls.__module__, "__doc__": cls.__doc__})
    new.__qualname__ = cls.__qualname__
    new.base_params = cls
    _WITH_REF[cls] = new
    return new


@dataclass
class Method:
    name: str                     # registry key, CLI --method value
    label: str                    # human name ("TKD", "MEDI-L1")
    params_cls: type              # parameter record dataclass
    run: Callable[..., Any]
    doc: str = ""                 # one paragraph shown in --help and the widget
    needs_magnitude: bool = False  # True when the method cannot run without a magnitude image
    uses_magnitude: bool = False   # True when the magnitude improves it (MEDI edges, noise weights)
    long_running: bool = False     # True: run in a worker with progress and cancel in the GUI
    accepts_weights: bool = False  # True: takes a weights=PATH extra (networks)
    multi_scan: bool = False       # True: takes scans=[Scan, ...] (COSMOS)
    order: int = 100              # position in dropdowns
    short: str = ""               # result name, formatted with the parameters ("QSMInvNet+ adapted ({steps} steps)"); default: label
    field_kind: str = "local"     # "total": takes the unwrapped TOTAL field (TFI); raw-echo pipelines skip background removal

    def __post_init__(self) -> None:
        self.params_cls = with_reference(self.params_cls)   # every method gets the same χ reference option


@dataclass
class Result:
    """A reconstruction: χ plus everything needed to reproduce and describe it."""

    chi: np.ndarray
    method: str
    params: dict
    seconds: float
    device: str
    extras: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    scan_info: dict = field(default_factory=dict)
    title: str = ""               # the name a person would write, e.g. "TKD δ=0.2" (set by run_method)

    @property
    def name(self) -> str:
        """Layer name: the method and only the parameters that differ from its defaults, e.g. ``TKD δ=0.2``,
        ``MEDI-L1 λ=auto``, ``QSMInvNet+ adapted (120 steps)``; the full record is in :meth:`provenance`."""
        return self.title or self.method

    def provenance(self) -> dict:
        """JSON-friendly provenance (written as NIfTI sidecar and layer metadata)."""
        from .. import __version__

        extras = {k: _jsonable(v) for k, v in self.extras.items() if not isinstance(v, np.ndarray)}
        return {
            "software": "napari-qsm",
            "version": __version__,
            "method": self.method,
            "parameters": {k: _jsonable(v) for k, v in self.params.items()},
            "seconds": round(float(self.seconds), 3),
            "device": self.device,
            "created": self.created,
            "units": "ppm",
            "scan": {k: _jsonable(v) for k, v in self.scan_info.items()},
            "extras": extras,
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 16 else f"array{tuple(v.shape)}"
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def run_method(m: Method, scan, params=None, *, device="auto", progress=None, cancel=None, **extra) -> Result:
    """Run method ``m`` on a :class:`~napari_qsm.core.scan.Scan` and wrap χ in a :class:`Result`.

    ``params``: a record of the method's class, a dict of public names (values may be strings),
    or None for the defaults. ``extra``: method-specific inputs (e.g. ``weights=PATH``). The
    registry's :func:`napari_qsm.methods.reconstruct` looks the method up by name and calls this.
    """
    base = getattr(m.params_cls, "base_params", m.params_cls)
    if params is None or isinstance(params, dict):
        p = make_params(m.params_cls, params or {})
    elif isinstance(params, m.params_cls):
        check_params(params)
        p = params
    elif isinstance(params, base):  # a record of the method's own class: the default reference
        check_params(params)
        p = m.params_cls(**{f.name: getattr(params, f.name) for f in dataclasses.fields(params)})
    else:
        raise TypeError(f"params: expected {m.params_cls.__name__} or dict, got {type(params).__name__}")
    if m.needs_magnitude and getattr(scan, "magnitude", None) is None:
        raise ValueError(f"magnitude: method {m.label} needs a magnitude image; pass --magnitude / magnitude=")
    dev = resolve_device(device)
    check_cancel(cancel)
    t0 = time.perf_counter()
    out = m.run(scan, p, device=dev, progress=progress, cancel=cancel, **extra)
    seconds = time.perf_counter() - t0
    extras = {}
    if isinstance(out, dict):
        extras = dict(out.get("extras", {}))
        chi = out["chi"]
    else:
        chi = out
    chi = np.asarray(chi, dtype=np.float32)
    if chi.shape != scan.shape:
        raise RuntimeError(f"method {m.name} returned shape {chi.shape}, expected {scan.shape}")
    region = extras.get("mask") if isinstance(extras.get("mask"), np.ndarray) else scan.mask
    reference = getattr(p, "reference", "none")
    if "csf_reference_ppm" in extras and reference == "mean":
        reference = "none"  # MEDI+0 has referenced χ to its CSF already: the default must not undo it
    chi, ref_info = apply_reference(chi, region, reference, scan=scan, csf_mask=extra.get("csf_mask"))
    extras.update(ref_info)
    return Result(chi=chi, method=m.name, params=params_to_dict(p), seconds=seconds,
                  device=device_label(dev), extras=extras, scan_info=scan.info(),
                  title=display_name(m.short or m.label, p))


def apply_reference(chi: np.ndarray, mask: np.ndarray, reference: str = "mean", *, scan=None,
                    csf_mask: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Reference χ: subtract the mean of χ over a region, inside ``mask`` only.

    Parameters
    ----------
    chi : ndarray
        χ in ppm (not modified).
    mask : ndarray of bool
        The region χ is defined on (the brain mask, or a method's eroded mask).
    reference : {"none", "mean", "csf"}
        none: χ unchanged; mean: χ's mean over ``mask`` becomes 0 (QSMxT's default); csf: χ's mean
        over the CSF becomes 0 (MEDI+0's rule: CSF = R2* < 5 s⁻¹ central regions when ``scan.r2star``
        is given, else the brightest homogeneous central magnitude of ``scan.magnitude``).
    scan : Scan, optional
        Supplies voxel size, R2* and magnitude for ``csf``.
    csf_mask : ndarray of bool, optional
        An explicit CSF mask (wins over the derived one).

    Returns
    -------
    chi : ndarray
        The referenced χ (float32; 0 outside ``mask`` stays 0).
    info : dict
        ``reference`` (the choice), ``reference_ppm`` (the value subtracted), and for csf
        ``reference_rule`` and ``reference_voxels``.

    References
    ----------
    Liu Z et al. MEDI+0: morphology enabled dipole inversion with automatic uniform cerebrospinal
    fluid zero reference for quantitative susceptibility mapping. MRM 2018;79:2795-2803.
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference: expected one of {list(REFERENCES)}, got {reference!r}")
    mask = np.asarray(mask, bool)
    info: dict = {"reference": reference}
    if reference == "none":
        info["reference_ppm"] = 0.0
        return chi, info
    if reference == "mean":
        region = mask
    else:
        region, info["reference_rule"] = _csf_region(mask, scan, csf_mask)
        info["reference_voxels"] = int(region.sum())
    ref = float(chi[region].astype(np.float64).mean())
    out = chi.astype(np.float32, copy=True)
    out[mask] -= ref
    info["reference_ppm"] = ref
    return out, info


def _csf_region(mask, scan, csf_mask):
    """(CSF ∩ mask, rule text) for the csf reference; a clear error when none can be found."""
    if csf_mask is not None:
        region, rule = np.asarray(csf_mask, bool) & mask, "given CSF mask"
    else:
        from .inversion.medi import CSF_RULE_MAGNITUDE, CSF_RULE_R2STAR, derive_csf_mask

        r2 = getattr(scan, "r2star", None)
        mag = getattr(scan, "magnitude", None)
        if scan is None or (r2 is None and mag is None):
            raise ValueError("reference=csf: finding CSF needs an R2* map or a magnitude image (--magnitude); "
                             "use reference=mean or none")
        region = derive_csf_mask(mag, mask, scan.voxel_size, r2star=r2) & mask
        rule = CSF_RULE_R2STAR if r2 is not None else CSF_RULE_MAGNITUDE
    if not region.any():
        raise ValueError(f"reference=csf: no CSF found ({rule}); use reference=mean or none")
    return region, rule
