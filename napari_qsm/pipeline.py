"""Raw echoes (or a local field) → χ with provenance: the one path the CLI, the batch and the docks call.

    from napari_qsm import pipeline
    recipe = pipeline.make_recipe({"background": "pdf"})            # steps from the registry
    echoes, run = pipeline.field_from_inputs("sub-01/anat", recipe)  # load → local field
    res = pipeline.chi_from_field(run, "medi")                      # → χ, provenance in res

``napari-qsm field`` is :func:`field_from_inputs` then :func:`write_field_folder`; ``napari-qsm recon``
on raw echoes is :func:`field_from_inputs` then :func:`chi_from_field`; a batch task is the same calls
on each scan. Steps and methods are looked up in :mod:`napari_qsm.methods` (entry points included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .core.field.pipeline import FieldRecipe, FieldRun, local_field, split_params
from .core.field.records import Echoes
from .core.field.steps import FAMILIES, Step

__all__ = ["DEFAULT_METHOD", "LOAD_KEYS", "FIELD_MAPS", "default_method", "make_recipe", "split_field_items",
           "field_from_echoes", "field_from_inputs", "chi_from_field", "chi_from_echoes", "field_maps",
           "write_field_folder"]

#: ``napari-qsm recon`` without ``--method``: MEDI-L1 (18.8 % demeaned NRMSE on the honest phantom against
#: TKD's 51.4 % at its best δ, README); it needs a magnitude, so a bare local field falls back to TKD
DEFAULT_METHOD = "medi"
FALLBACK_METHOD = "tkd"
#: front-end items that go to the echo loader, not to a step
LOAD_KEYS = ("phase_units", "phase_sign")
#: the maps the front end makes: key -> (description, units)
FIELD_MAPS = {
    "local_field": ("local (tissue) field, background removed", "ppm"),
    "mask": ("brain mask, eroded by background removal (1 = inside)", None),
    "magnitude": ("combined magnitude of the echoes", None),
    "total_field": ("total field (background not removed)", "ppm"),
    "noise_std": ("field noise standard deviation from the echo fit", "ppm"),
    "r2star": ("R2* from the echo fit", "1/s"),
}


def default_method(has_magnitude: bool) -> str:
    """The method ``recon`` uses when none is given: :data:`DEFAULT_METHOD`, or TKD without a magnitude.

    Parameters
    ----------
    has_magnitude : bool
        Whether the scan has a magnitude image (raw echoes always do).

    Returns
    -------
    str
        A method name of the registry.
    """
    return DEFAULT_METHOD if has_magnitude else FALLBACK_METHOD


def _is_per_family(params: dict) -> bool:
    return bool(params) and all(k in FAMILIES and isinstance(v, dict) for k, v in params.items())


def make_recipe(steps: Optional[dict] = None, params: Optional[dict] = None) -> FieldRecipe:
    """A :class:`~napari_qsm.core.field.pipeline.FieldRecipe` whose steps come from the registry.

    Parameters
    ----------
    steps : dict, optional
        ``{family: step name, Step or None}`` (None: the family's default).
    params : dict, optional
        Either per family, ``{"background": {"radius": 6}}``, or flat command-line items,
        ``{"background.radius": "6", "max_iter": "20", "background": "pdf"}``: a bare family name
        chooses that family's step (it wins over ``steps``), ``FAMILY.NAME`` goes to the family and
        a bare ``NAME`` to the one step that has it.

    Returns
    -------
    FieldRecipe
        Steps as :class:`~napari_qsm.core.field.steps.Step` records (third-party steps included),
        parameters validated.
    """
    from .methods import get_step

    steps = dict(steps or {})
    params = dict(params or {})
    if not _is_per_family(params):
        for fam in FAMILIES:
            if fam in params and not isinstance(params[fam], dict):
                steps[fam] = params.pop(fam)
    recipe = FieldRecipe(**{f: (s if isinstance(s := steps.get(f), Step) else get_step(f, s)) for f in FAMILIES})
    recipe.params = dict(params) if _is_per_family(params) else split_params(params, recipe)
    for fam in FAMILIES:
        recipe.record(fam)   # every step and parameter checked before any data is read
    return recipe


def split_field_items(items) -> tuple[dict, dict, dict]:
    """``{"background": "pdf", "background.radius": "6", "phase_units": "siemens"}`` → (steps, params, load).

    Parameters
    ----------
    items : dict
        Front-end items as ``napari-qsm batch --field-param`` takes them.

    Returns
    -------
    steps : dict
        ``{family: step name}`` for the family names given.
    params : dict
        The step parameters (``[FAMILY.]NAME``: see :func:`make_recipe`).
    load : dict
        ``phase_units`` (str) / ``phase_sign`` (int) for the echo loader.
    """
    steps, params, load = {}, {}, {}
    for k, v in dict(items or {}).items():
        k = str(k).strip()
        if k in FAMILIES:
            steps[k] = v
        elif k in LOAD_KEYS:
            load[k] = int(v) if k == "phase_sign" else str(v)
        else:
            params[k] = v
    return steps, params, load


def _user_mask(mask, echoes: Echoes) -> Optional[np.ndarray]:
    """A user mask (a NIfTI path or an array on the echoes' grid), or None."""
    if mask is None or isinstance(mask, np.ndarray):
        return mask
    from .core.io import read_volume
    arr, maff, _ = read_volume(str(mask), "mask")
    if not np.allclose(maff, echoes.affine, atol=1e-3):
        raise ValueError("mask: its affine differs from the echoes'; resample it onto their grid first")
    return arr


def field_from_echoes(echoes: Echoes, recipe: Optional[FieldRecipe] = None, *, mask=None, device="auto",
                      progress=None, cancel=None) -> FieldRun:
    """Loaded echoes → local field: fit, mask, unwrap (when needed), background removal.

    Parameters
    ----------
    echoes : Echoes
        From :func:`napari_qsm.core.field.load.load_echoes` or a dock's layers.
    recipe : FieldRecipe, optional
        From :func:`make_recipe` (default: every family's default step).
    mask : array or path, optional
        A user brain mask on the echoes' grid (bool array or NIfTI); it replaces the mask step.
    device : str
        "auto", "cpu", "cuda" or "cuda:N".
    progress, cancel
        See :mod:`napari_qsm.core.progress`.

    Returns
    -------
    FieldRun
        ``run.scan`` (local field in ppm, eroded mask, magnitude, N_std, R2*, geometry) and every
        intermediate map, with the steps' names, parameters and seconds in ``run.steps``.

    References
    ----------
    .. [1] Liu T. et al., Morphology enabled dipole inversion (MEDI) from a single-angle acquisition:
       comparison with COSMOS in human brain imaging, MRM 66 (2011) 777-783 (the echo fit and N_std).
    """
    recipe = recipe if recipe is not None else make_recipe()
    return local_field(echoes, recipe, mask=_user_mask(mask, echoes), device=device, progress=progress,
                       cancel=cancel)


def field_from_inputs(inputs=None, recipe: Optional[FieldRecipe] = None, *, magnitude: Sequence = (),
                      phase: Sequence = (), te=None, b0=None, phase_units: str = "auto",
                      phase_sign: Optional[int] = None, name: Optional[str] = None, mask=None, device="auto", progress=None,
                      cancel=None) -> tuple[Echoes, FieldRun]:
    """Files → echoes → local field: what ``napari-qsm field`` and ``recon`` on raw echoes run.

    Parameters
    ----------
    inputs : path or list of one path, optional
        A BIDS anat/subject folder or a DICOM folder; else ``magnitude`` and ``phase`` file lists.
    recipe : FieldRecipe, optional
        From :func:`make_recipe`; checked before the echoes are read.
    magnitude, phase : sequence of paths
        One 3-D file per echo or one 4-D file each.
    te : sequence of float, optional
        Echo times in seconds (default: the JSON sidecars).
    b0 : float, optional
        Field strength in tesla (default: the sidecars).
    phase_units : {"auto", "rad", "siemens", "siemens-unsigned", "mrad", "rescale"}
        See :mod:`napari_qsm.core.field.phase_units`.
    phase_sign : {1, -1, None}
        None: −1 when the sidecar's Manufacturer is GE, else 1.
    name : str, optional
        The scan's name in provenance.
    mask, device, progress, cancel
        As :func:`field_from_echoes`.

    Returns
    -------
    echoes : Echoes
        What was loaded (grid, NIfTI facts, vendor facts).
    run : FieldRun
        As :func:`field_from_echoes`.
    """
    from .core.field.load import load_echoes

    recipe = recipe if recipe is not None else make_recipe()
    echoes = load_echoes(inputs or None, magnitude=magnitude or (), phase=phase or (), te=te, b0=b0,
                         phase_units=phase_units, phase_sign=phase_sign, name=name)
    return echoes, field_from_echoes(echoes, recipe, mask=mask, device=device, progress=progress, cancel=cancel)


def chi_from_field(run, method: Optional[str] = None, params=None, *, nifti_info=None, device="auto",
                   progress=None, cancel=None, **extra):
    """A local field → χ with the named method; a :class:`FieldRun`'s steps go into the provenance.

    Parameters
    ----------
    run : FieldRun or Scan
        The front end's result, or a scan loaded from a local field map.
    method : str, optional
        A method of :mod:`napari_qsm.methods` (default: :func:`default_method`).
    params : dict or parameter record, optional
        The method's parameters (public names; values may be strings).
    nifti_info : dict, optional
        The echoes' NIfTI facts (``Echoes.nifti_info``): χ is then written on their grid and orientation.
    device, progress, cancel
        As :func:`napari_qsm.methods.reconstruct`.
    **extra
        Passed to the method (``weights=``, ``csf_mask=``, ``scans=``).

    Returns
    -------
    Result
        χ (ppm) with the method, parameters, seconds and device; ``extras["field_steps"]`` and
        ``extras["echoes"]`` when ``run`` is a FieldRun.
    """
    from .methods import reconstruct

    scan = run.scan if isinstance(run, FieldRun) else run
    if nifti_info is not None:
        scan.nifti_info = nifti_info  # write χ back on the echoes' grid and orientation
    name = method or default_method(scan.magnitude is not None)
    res = reconstruct(scan, name, params, device=device, progress=progress, cancel=cancel, **extra)
    if isinstance(run, FieldRun):
        res.extras["field_steps"] = [dict(s) for s in run.steps]
        res.extras["echoes"] = run.provenance.get("echoes", {})
    return res


def chi_from_echoes(echoes: Echoes, method: Optional[str] = None, params=None, recipe: Optional[FieldRecipe] = None,
                    *, mask=None, device="auto", progress=None, cancel=None, **extra):
    """Loaded echoes → local field → χ in one call.

    Parameters
    ----------
    echoes : Echoes
    method, params, **extra
        As :func:`chi_from_field`.
    recipe, mask, device, progress, cancel
        As :func:`field_from_echoes`.

    Returns
    -------
    run : FieldRun
    result : Result
        χ on the echoes' grid, its provenance naming every field step.
    """
    run = field_from_echoes(echoes, recipe, mask=mask, device=device, progress=progress, cancel=cancel)
    return run, chi_from_field(run, method, params, nifti_info=echoes.nifti_info, device=device,
                               progress=progress, cancel=cancel, **extra)


def field_maps(run: FieldRun) -> dict[str, np.ndarray]:
    """The front end's maps by :data:`FIELD_MAPS` key, float32 on the echoes' grid."""
    return {"local_field": run.scan.field, "mask": run.scan.mask.astype(np.float32),
            "magnitude": run.total.magnitude, "total_field": run.total.field, "noise_std": run.total.noise_std,
            "r2star": run.total.r2star}


def field_folder_paths(outdir) -> dict[str, Path]:
    """``napari-qsm field``'s outputs in ``outdir``: each map's NIfTI and ``field.json``."""
    out = Path(outdir)
    return {**{k: out / f"{k}.nii.gz" for k in FIELD_MAPS}, "json": out / "field.json"}


def write_field_folder(run: FieldRun, echoes: Echoes, outdir) -> dict[str, Path]:
    """Write ``napari-qsm field``'s outputs: the maps on the echoes' grid, each with a JSON sidecar of facts
    (:func:`napari_qsm.core.field.facts.field_sidecar`), and ``field.json`` (provenance).

    Parameters
    ----------
    run : FieldRun
    echoes : Echoes
        Whose grid, orientation and NIfTI header the maps keep.
    outdir : path
        Created when missing; existing files are replaced (the caller decides whether that is allowed).

    Returns
    -------
    dict
        ``{map key: path}`` and ``"json"``.
    """
    from . import __version__
    from .core.field.facts import field_facts, field_sidecar
    from .core.io import save_volume, sidecar_path, write_json

    paths = field_folder_paths(outdir)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    for k, arr in field_maps(run).items():
        units = FIELD_MAPS[k][1]
        save_volume(arr, paths[k], echoes.affine, nifti_info=echoes.nifti_info,
                    description=f"napari-qsm {k.replace('_', ' ')}" + (f" ({units})" if units else ""))
    prov = {"software": "napari-qsm", "version": __version__, **run.provenance,
            "b0_tesla": run.scan.b0_tesla, "b0_direction": [float(v) for v in run.scan.b0_direction],
            "voxel_size": [float(v) for v in run.scan.voxel_size],
            "outputs": {k: str(p) for k, p in paths.items() if k != "json"}, **field_facts(run.total)}
    write_json(paths["json"], prov)
    # facts that travel with each map (B0, TE/ΔTE, units, B0 direction, phase units, noise): recon/adapt read them
    orig = (echoes.nifti_info or {}).get("original_affine")
    # the local field says which background removal made it (MEDI's weak_harmonic=auto turns on for such fields)
    bg = run.background_name
    for k in field_maps(run):
        extra = {"GeneratedBy": "napari-qsm", "Provenance": "field.json"}
        if k == "local_field" and bg:
            extra["BackgroundRemoval"] = bg
        write_json(sidecar_path(paths[k]), field_sidecar(FIELD_MAPS[k][0], FIELD_MAPS[k][1], run.total,
                                                         original_affine=orig, extra=extra))
    return paths
