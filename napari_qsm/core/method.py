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
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .device import device_label, resolve_device
from .params import check_params, display_name, make_params, params_to_dict
from .progress import check_cancel

__all__ = ["Method", "Result", "run_method"]


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
    if params is None or isinstance(params, dict):
        p = make_params(m.params_cls, params or {})
    elif isinstance(params, m.params_cls):
        check_params(params)
        p = params
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
    return Result(chi=chi, method=m.name, params=params_to_dict(p), seconds=seconds,
                  device=device_label(dev), extras=extras, scan_info=scan.info(),
                  title=display_name(m.short or m.label, p))
