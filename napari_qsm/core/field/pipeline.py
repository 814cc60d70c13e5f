"""Raw multi-echo GRE → local field: the front end's steps chained into one call.

``Echoes`` → fit (total field, N_std, R2*, combined magnitude, misfit) → brain mask from the
phase-quality map, edge voxels whose echo fit does not hold left out (a user mask always wins) →
spatial unwrapping of the fitted field when the fit left it wrapped (``provenance["unwrap_check"]``
counts the neighbour jumps above π left in the mask: 0 when exact), then, for the linear fit with
``refit="origin"`` (default), the unwrapped field refitted through the origin after offset removal
(:mod:`.refit`: less biased by intra-voxel dephasing next to veins than the free slope) → background field removal → a :class:`~napari_qsm.core.scan.Scan` (local field in ppm, the eroded mask, magnitude,
N_std, R2*, voxel size, B0 direction, B0 and TE) that every inversion, the adaptation included,
accepts unchanged.

Each stage is one registered step (``STEPS`` of ``fit.py``, ``mask.py``, ``unwrap.py``,
``background.py``), chosen by name with its parameters, so the command line, the API and the dock
forms share one description. Steps are pure functions of their inputs: :func:`local_field` keeps
no state, and its provenance lists every step with its parameters and seconds.

Example::

    from napari_qsm.core.field.load import load_echoes
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    run = local_field(load_echoes("sub-01/anat"), FieldRecipe(background="pdf"))
    run.scan  # → napari_qsm.methods.reconstruct(run.scan, "medi")
"""

from __future__ import annotations

import inspect
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..params import check_params, make_params, params_to_dict, specs
from ..progress import check_cancel
from ..scan import Scan, ScanError
from . import background as _background
from . import fit as _fit
from . import mask as _mask
from . import refit as _refit
from . import unwrap as _unwrap
from .records import Echoes, TotalField
from .steps import FAMILIES, Step

__all__ = ["FieldRecipe", "FieldRun", "local_field", "core_steps", "find_step", "split_params"]


def core_steps() -> dict[tuple[str, str], Step]:
    """The steps this package ships, by (family, name). The registry adds third-party ones."""
    out = {}
    for mod in (_fit, _mask, _unwrap, _background):
        for s in mod.STEPS:
            out[(s.family, s.name)] = s
    return out


def find_step(family: str, name: Optional[str] = None) -> Step:
    """A shipped step by family and name (None: the family's default).

    Only this package's steps: the registry (:func:`napari_qsm.methods.get_step`) also has the
    third-party ones, and :func:`napari_qsm.pipeline.make_recipe` puts its :class:`Step` records in
    a recipe. Every caller outside ``core`` goes through it; this lookup serves core-only use.
    """
    if family not in FAMILIES:
        raise ValueError(f"step family: expected one of {FAMILIES}, got {family!r}")
    steps = [s for (f, _), s in core_steps().items() if f == family]
    if name is None:
        return next((s for s in steps if s.default), steps[0])
    key = str(name).strip().lower()
    for s in steps:
        if s.name == key:
            return s
    raise ValueError(f"{family}: unknown step {name!r}; available: {', '.join(s.name for s in steps)}")


@dataclass
class FieldRecipe:
    """Which step runs in each family, and their parameters (public names; values may be strings).

    ``params`` maps a family to its parameters, e.g. ``{"background": {"radius": 6}}`` (RESHARP).
    A step may also be given as a :class:`Step` (e.g. from the registry, a third-party step).
    ``unwrap`` runs only when the fit leaves the field wrapped (``TotalField.wrapped``).
    """

    fit: Any = None          # None: the family's default ("linear")
    mask: Any = None         # "threshold"
    unwrap: Any = None       # "quality"
    background: Any = None   # "vsharp"
    params: dict = field(default_factory=dict)

    def step(self, family: str) -> Step:
        s = getattr(self, family)
        return s if isinstance(s, Step) else find_step(family, s)

    def record(self, family: str):
        """The validated parameter record of the family's step."""
        s = self.step(family)
        vals = self.params.get(family, {})
        if isinstance(vals, s.params_cls):
            check_params(vals)
            return vals
        return make_params(s.params_cls, dict(vals or {}))


def split_params(items: dict, recipe: FieldRecipe) -> dict:
    """``{"background.radius": "6", "max_iter": "20"}`` → per-family dicts for ``recipe``.

    A bare name must belong to exactly one of the recipe's steps; ``family.name`` picks the family."""
    out: dict = {f: {} for f in FAMILIES}
    names = {f: {s.name for s in specs(recipe.step(f).params_cls)} for f in FAMILIES}
    for key, val in items.items():
        if "." in key:
            fam, name = key.split(".", 1)
            if fam not in FAMILIES:
                raise ValueError(f"--param {key}: unknown step family {fam!r}; expected one of {FAMILIES}")
            if name not in names[fam]:
                raise ValueError(f"--param {key}: {recipe.step(fam).label} has no parameter {name!r} "
                                 f"(known: {', '.join(sorted(names[fam]))})")
            out[fam][name] = val
            continue
        owners = [f for f in FAMILIES if key in names[f]]
        if len(owners) != 1:
            where = "no step" if not owners else "several steps (" + ", ".join(owners) + ")"
            raise ValueError(f"--param {key}: {where} of this recipe take it; write FAMILY.{key} "
                             f"(families: {', '.join(FAMILIES)})")
        out[owners[0]][key] = val
    return {f: v for f, v in out.items() if v}


@dataclass
class FieldRun:
    """What :func:`local_field` returns: the scan for the inversions and every intermediate map."""

    scan: Scan                       # local field (ppm), eroded mask, magnitude, N_std, R2*, geometry
    total: TotalField                # the fit (total field unwrapped when it was wrapped)
    brain_mask: np.ndarray           # the mask before background removal eroded it
    steps: list                      # [{family, name, label, parameters, seconds}]
    provenance: dict

    @property
    def background_name(self) -> Optional[str]:
        """The name of the background-removal step that made the local field (None when it did not run);
        the local field's sidecar and layer carry it as ``BackgroundRemoval`` (MEDI's ``weak_harmonic=auto``)."""
        return next((st["name"] for st in self.steps if st.get("family") == "background"), None)


def local_field(echoes: Echoes, recipe: Optional[FieldRecipe] = None, *, mask=None, device="auto",
                progress=None, cancel=None) -> FieldRun:
    """Run fit → mask → unwrap (when needed) → background removal on ``echoes``.

    ``mask``: a user brain mask (bool array on the echoes' grid); it replaces the mask step.
    """
    if not isinstance(echoes, Echoes):
        raise TypeError(f"echoes: expected napari_qsm.core.field.records.Echoes, got {type(echoes).__name__}")
    recipe = recipe or FieldRecipe()
    records = {f: recipe.record(f) for f in FAMILIES}  # validate every parameter before any work
    t_all = time.perf_counter()
    done = []

    def timed(family, fn):
        check_cancel(cancel)
        s = recipe.step(family)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:   # e.g. a solver that stopped short of its tolerance
                warnings.simplefilter("always")
                out = fn(s, records[family])
        except Exception as exc:
            exc.field_step = getattr(exc, "field_step", None) or family   # which family failed (batch reports it)
            raise
        for w in caught:                                       # still shown on the console
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        done.append({"family": family, "name": s.name, "label": s.label,
                     "parameters": params_to_dict(records[family]), "seconds": round(time.perf_counter() - t0, 3)})
        if caught:
            done[-1]["warnings"] = [str(w.message) for w in caught]
        return out

    unwrap_check = None
    total = timed("fit", lambda s, p: s.run(echoes, p, device=device, progress=progress, cancel=cancel))
    if mask is not None:
        brain = _mask.check_user_mask(mask, total.shape)
        done.append({"family": "mask", "name": "user", "label": "user mask", "parameters": {}, "seconds": 0.0})
    else:
        def make_mask(s, p):
            # the phase-quality map (ROMEO-like: phase, magnitude and echo coherence) lets the mask leave out
            # voxels whose phase cannot be trusted (signal voids and steep gradients near air cavities)
            quality = _unwrap.voxel_quality(echoes.phase[..., :2], echoes.magnitude[..., :2], echoes.te[:2])
            extra = {}
            if total.misfit is not None and "misfit" in inspect.signature(s.run).parameters:
                extra["misfit"] = total.misfit   # edge voxels whose phase is not linear in TE are left out
            if "r2star" in inspect.signature(s.run).parameters:
                extra["r2star"] = total.r2star   # short T2* (bone) is left out unless enclosed by brain
            if "te" in inspect.signature(s.run).parameters:
                extra["te"] = total.te           # with R2*: the shell's dark test on the proton density
            return s.run(total.magnitude, p, quality=quality, voxel_size=total.voxel_size, progress=progress,
                         cancel=cancel, **extra)
        brain = timed("mask", make_mask)
    if not np.any(brain):
        raise ScanError("mask: the brain mask is empty; give a mask (--mask) or lower the threshold "
                        "(--param threshold_scale=0.5)")
    if total.wrapped:
        def unwrap(s, p):
            phase = total.field * np.float32(total.rad_per_ppm)
            u = s.run(phase, p, magnitude=total.magnitude, mask=brain, voxel_size=total.voxel_size,
                      device=device, progress=progress, cancel=cancel)
            return total.replace(field=np.where(brain, u / np.float32(total.rad_per_ppm), 0).astype(np.float32),
                                 wrapped=False, mask=brain)
        total = timed("unwrap", unwrap)
        # neighbours inside the mask whose unwrapped phases still differ by more than π: each is a 2π error
        # (or a true step no spatial unwrapper can resolve); 0 after exact unwrapping
        unwrap_check = {"residual_jumps": _unwrap.residual_jumps(total.field * np.float32(total.rad_per_ppm), brain)}
        fit_p = records["fit"]
        if getattr(fit_p, "refit", "none") == "origin":   # the through-origin refit needs the unwrapped field
            check_cancel(cancel)
            total = _refit.through_origin(echoes, total, brain, sigma_mm=fit_p.refit_sigma_mm,
                                          misfit_noise=fit_p.misfit_noise, device=device)
            # the refit is the fit's last stage (it needs the unwrapped field): its time counts in the fit's entry,
            # so the console's and the dock's step times add up to the chain's
            fit_entry = next(d for d in done if d["family"] == "fit")
            fit_entry["refit_seconds"] = total.provenance["refit"]["seconds"]
            fit_entry["seconds"] = round(fit_entry["seconds"] + fit_entry["refit_seconds"], 3)
    else:
        total = total.replace(field=np.where(brain, total.field, 0).astype(np.float32), mask=brain)
    local, eroded = timed("background", lambda s, p: s.run(
        total.field, brain, p, voxel_size=total.voxel_size, b0_direction=total.b0_direction,
        noise_std=total.noise_std, device=device, progress=progress, cancel=cancel))
    if not np.any(eroded):
        raise ScanError("background: the eroded mask is empty (the brain mask is smaller than the SMV radius); "
                        "use a smaller radius or another method")
    provenance = {"steps": done, "seconds": round(time.perf_counter() - t_all, 3), "echoes": echoes.info(),
                  "fit": total.provenance}
    if unwrap_check is not None:
        provenance["unwrap_check"] = unwrap_check
    scan = Scan(field=np.where(eroded, local, 0).astype(np.float32), mask=eroded, voxel_size=total.voxel_size,
                b0_direction=total.b0_direction, magnitude=total.magnitude, noise_std=total.noise_std,
                r2star=total.r2star, affine=total.affine, te=float(total.delta_te), b0_tesla=total.b0_tesla,
                name=echoes.name, source={"echoes": list(map(str, echoes.sources)), "field_steps": done})
    return FieldRun(scan=scan, total=total, brain_mask=brain, steps=done, provenance=provenance)
