"""The registry: every inversion and every front-end step, collected in one place; the CLI, the batch,
the pipeline (:mod:`napari_qsm.pipeline`) and the docks all ask it.

Modules declare what they offer and know nothing of this registry: ``METHODS = (Method(...), ...)``
in the inversion modules (``core/inversion/``, ``nn/``), ``STEPS = (Step(...), ...)`` in
``core/field/``; other packages add theirs through the entry-point group ``napari_qsm.methods`` (a
:class:`Method` or :class:`Step`, an iterable of them, or a module with ``METHODS``/``STEPS``;
example in the README). A module that fails to import is skipped and its error kept
(``napari-qsm methods`` shows it). :func:`register_method` / :func:`register_step` add one at run time.
"""

from __future__ import annotations

import importlib
import inspect
from importlib import metadata
from typing import Iterable

from .core.field.steps import DERIVED_FAMILIES, FAMILIES, Step
from .core.method import Method, Result, run_method

__all__ = ["available_methods", "get_method", "register_method", "reconstruct", "import_errors",
           "available_steps", "get_step", "register_step", "Method", "Result", "Step", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "napari_qsm.methods"

# This package's modules that declare METHODS / STEPS, in no particular order (display order is Method.order).
_METHOD_MODULES = (
    "napari_qsm.core.inversion.tkd",
    "napari_qsm.core.inversion.medi",
    "napari_qsm.core.inversion.tfi",
    "napari_qsm.core.inversion.cosmos",
    "napari_qsm.core.inversion.tv",
    "napari_qsm.core.inversion.rts",
    "napari_qsm.core.inversion.hdqsm",
    "napari_qsm.core.inversion.ndi",
    "napari_qsm.core.inversion.ilsqr",
    "napari_qsm.nn.infer",
    "napari_qsm.nn.adapt",
)
_STEP_MODULES = (
    "napari_qsm.core.field.fit",
    "napari_qsm.core.field.unwrap",
    "napari_qsm.core.field.mask",
    "napari_qsm.core.field.background",
    "napari_qsm.core.swi",
)

_METHODS: dict[str, Method] = {}
_STEPS: dict[tuple[str, str], Step] = {}
_IMPORT_ERRORS: dict[str, str] = {}
_LOADED = False


def register_method(method: Method) -> Method:
    """Add (or replace) a method at run time, e.g. a test's or a notebook's own inversion."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method: expected a Method, got {type(method).__name__}")
    _load_all()
    _METHODS[method.name] = method
    return method


def register_step(step: Step) -> Step:
    """Add (or replace) a front-end step at run time; the CLI, the batch and the Field dock then offer it."""
    if not isinstance(step, Step):
        raise TypeError(f"register_step: expected a Step, got {type(step).__name__}")
    _load_all()
    _STEPS[(step.family, step.name)] = step
    return step


def _declared(obj, attr: str) -> Iterable:
    """The records an imported object declares: a record, an iterable of them, or a module's ``attr``."""
    if isinstance(obj, (Method, Step)):
        return (obj,)
    if hasattr(obj, attr) and not isinstance(obj, (list, tuple)):
        obj = getattr(obj, attr)
    return tuple(obj)


def _add(records, source: str) -> None:
    for r in records:
        if isinstance(r, Method):
            _METHODS.setdefault(r.name, r)
        elif isinstance(r, Step):
            _STEPS.setdefault((r.family, r.name), r)
        else:
            _IMPORT_ERRORS[source] = f"declares {type(r).__name__}, not a Method or Step"


def _import(modname: str, attr: str) -> None:
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name != modname:  # a real missing dependency inside an existing module
            _IMPORT_ERRORS[modname] = repr(exc)
        return
    except Exception as exc:  # reported by `napari-qsm methods`, not hidden
        _IMPORT_ERRORS[modname] = repr(exc)
        return
    _add(_declared(mod, attr) if hasattr(mod, attr) else (), modname)


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in _METHOD_MODULES:
        _import(mod, "METHODS")
    for mod in _STEP_MODULES:
        _import(mod, "STEPS")
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        source = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
            if inspect.ismodule(obj):  # a module: its METHODS and its STEPS
                if not (hasattr(obj, "METHODS") or hasattr(obj, "STEPS")):
                    raise TypeError(f"module {obj.__name__} declares neither METHODS nor STEPS")
                _add((*getattr(obj, "METHODS", ()), *getattr(obj, "STEPS", ())), source)
            else:
                _add(_declared(obj, "METHODS"), source)
        except Exception as exc:
            _IMPORT_ERRORS[source] = repr(exc)


def import_errors() -> dict[str, str]:
    """Modules and entry points that could not be loaded, with their errors."""
    _load_all()
    return dict(_IMPORT_ERRORS)


def available_methods() -> list[Method]:
    """Every method, in display order."""
    _load_all()
    return sorted(_METHODS.values(), key=lambda m: (m.order, m.name))


def get_method(name: str) -> Method:
    """A method by name (case-insensitive); ValueError naming the available ones otherwise."""
    _load_all()
    key = str(name).strip().lower()
    if key not in _METHODS:
        known = ", ".join(m.name for m in available_methods())
        extra = f" (import problems: {_IMPORT_ERRORS})" if _IMPORT_ERRORS else ""
        raise ValueError(f"method: unknown method {name!r}; available: {known}{extra}")
    return _METHODS[key]


def reconstruct(scan, method: str = "tkd", params=None, *, device="auto", progress=None,
                cancel=None, **extra) -> Result:
    """Run a method, by name, on a :class:`~napari_qsm.core.scan.Scan`: local field → χ (ppm).

    Parameters
    ----------
    scan : Scan
        Local field (ppm), brain mask, voxel size, B0 direction; magnitude, N_std, R2* when the
        method uses them.
    method : str
        A name of :func:`available_methods` (``napari-qsm methods`` lists them), e.g. "tkd", "medi", "dsbn".
    params : dict or parameter record, optional
        The method's parameters by public name (strings accepted, as from ``--param``); missing
        ones take their defaults. Checked against their ranges before any work.
    device : str
        "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    progress : callable, optional
        Called with :class:`~napari_qsm.core.progress.Progress` records.
    cancel : CancelToken, optional
        Raises :class:`~napari_qsm.core.progress.Cancelled` promptly when set.
    **extra
        Method-specific inputs: ``weights=`` (network checkpoint), ``csf_mask=`` (MEDI+0),
        ``scans=`` (COSMOS orientations).

    Returns
    -------
    Result
        χ (float32, ppm, referenced as the method records), the method and its parameters, wall
        time, device and extras; ``Result.provenance()`` is what the JSON sidecars hold.

    References
    ----------
    .. [1] Each method's ``doc`` and module give its own references (TKD: Shmueli et al., MRM 62
       (2009) 1510; MEDI: Liu et al., MRM 66 (2011) 777; COSMOS: Liu et al., MRM 61 (2009) 196).
    """
    return run_method(get_method(method), scan, params, device=device, progress=progress, cancel=cancel, **extra)


def available_steps(family: str | None = None) -> list[Step]:
    """Front-end steps of one family (or all), default first, then in display order."""
    _load_all()
    every = FAMILIES + DERIVED_FAMILIES
    if family is not None and family not in every:
        raise ValueError(f"step family: expected one of {every}, got {family!r}")
    steps = [s for s in _STEPS.values() if family is None or s.family == family]
    return sorted(steps, key=lambda s: (every.index(s.family), not s.default, s.order, s.name))


def get_step(family: str, name: str | None = None) -> Step:
    """A step by family and name; ``name=None`` gives the family's default."""
    steps = available_steps(family)
    if name is None:
        for s in steps:
            if s.default:
                return s
        if steps:
            return steps[0]
        raise ValueError(f"step family {family!r}: no step is available (import problems: {_IMPORT_ERRORS})")
    key = str(name).strip().lower()
    for s in steps:
        if s.name == key:
            return s
    known = ", ".join(s.name for s in steps)
    raise ValueError(f"{family}: unknown step {name!r}; available: {known}")
