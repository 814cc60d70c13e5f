"""Method registry and result record.

A method is registered once, with its parameter record class; the Python API
(:func:`reconstruct`), the command line (``napari-qsm recon --method NAME --param k=v``) and the
napari Reconstruct widget are all generated from the registry, so adding a method or a parameter
happens in one place.

A method's ``run`` function has the signature::

    run(scan: Scan, params: ParamsRecord, *, device: torch.device, progress, cancel, **extra) -> np.ndarray | dict

returning χ (ppm, float32, the scan's shape) or a dict ``{"chi": ..., "extras": {...}}``.
``extra`` carries method-specific inputs that are not parameters (e.g. ``weights`` for the
network, or additional scans for COSMOS).
"""

from __future__ import annotations

import datetime as _dt
import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .device import device_label, resolve_device
from .params import check_params, make_params, params_to_dict
from .progress import check_cancel


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


_REGISTRY: dict[str, Method] = {}

# Modules that register methods on import. A module that fails to import (e.g. torch missing a
# feature) is skipped so the rest stays usable; the error is kept for `napari-qsm recon --help`.
_METHOD_MODULES = [
    "napari_qsm.core.tkd",
    "napari_qsm.core.medi",
    "napari_qsm.core.cosmos",
    "napari_qsm.nn.infer",
    "napari_qsm.nn.adapt",
]
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


def register_method(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real missing dependency inside an existing module
                _IMPORT_ERRORS[mod] = repr(exc)
        except Exception as exc:  # pragma: no cover - reported, not hidden
            _IMPORT_ERRORS[mod] = repr(exc)


def available_methods() -> list[Method]:
    """Registered methods in display order."""
    _load_all()
    return sorted(_REGISTRY.values(), key=lambda m: (m.order, m.name))


def get_method(name: str) -> Method:
    _load_all()
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        known = ", ".join(m.name for m in available_methods())
        extra = f" (import problems: {_IMPORT_ERRORS})" if _IMPORT_ERRORS else ""
        raise ValueError(f"method: unknown method {name!r}; available: {known}{extra}")
    return _REGISTRY[key]


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

    @property
    def name(self) -> str:
        """Layer / file friendly name: method and key parameters, e.g. ``tkd_threshold0.15``."""
        keys = list(self.params.items())[:2]
        bits = [self.method] + [f"{k}{v}" for k, v in keys if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
        return "_".join(str(b) for b in bits)

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


def reconstruct(scan, method: str = "tkd", params=None, *, device="auto", progress=None,
                cancel=None, **extra) -> Result:
    """Run a registered method on a :class:`~napari_qsm.core.scan.Scan`.

    ``params``: a record of the method's class, a dict of public names (values may be strings),
    or None for the defaults. ``extra``: method-specific inputs (e.g. ``weights=PATH``).
    """
    m = get_method(method)
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
                  device=device_label(dev), extras=extras, scan_info=scan.info())
