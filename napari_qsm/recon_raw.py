"""``napari-qsm recon`` from raw echoes: the field steps, then the inversion, in one command.

    napari-qsm recon INPUT --method M -o CHI.nii.gz                    (BIDS anat/subject or DICOM folder)
    napari-qsm recon --magnitude M1 M2 … --phase P1 P2 … [--te S …] --method M -o CHI.nii.gz
               [--mask MASK] [--b0 T] [--phase-units auto|rad|siemens|mrad] [--phase-sign ±1]
               [--fit NAME] [--unwrap NAME] [--mask-method NAME] [--background NAME]
               [--param FAMILY.NAME=VALUE …] [--field-param [FAMILY.]NAME=VALUE …] [--param NAME=VALUE …]

``--param`` items named ``FAMILY.NAME`` (FAMILY one of fit, unwrap, mask, background) go to the
field steps, exactly as in ``napari-qsm field``; the others go to the method. ``--field-param``
items always go to the field steps (a bare name must belong to one step; a family name chooses the
step: ``--field-param background=pdf``, as ``napari-qsm batch`` takes it). The local field, eroded
mask, combined magnitude, N_std and R2* the steps make are handed to the method in memory, so the
result equals ``napari-qsm field`` followed by ``napari-qsm recon`` on its outputs. The χ map is
written on the echoes' grid and affine; its JSON sidecar lists the field steps with their parameters.

This module holds the logic; :mod:`napari_qsm.cli` only routes raw inputs here (:func:`split_recon_args`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .core.field.steps import FAMILIES

#: options of the local-field form that have no meaning for raw echoes
_LOCAL_ONLY = {"noise_std": "--noise-std", "r2star": "--r2star", "voxel_size": "--voxel-size", "b0_dir": "--b0-dir",
               "echo": "--echo", "orientation": "--orientation", "csf_mask": "--csf-mask"}


def split_recon_args(args) -> bool:
    """Decide whether ``recon`` got raw echoes (True) or a local field (False); normalise ``args``.

    Raw: ``--phase`` is given, or an INPUT is a folder. Otherwise the local-field form
    ``FIELD --mask MASK [--magnitude MAG] [--te S]`` is restored exactly: a FIELD written after
    ``--magnitude MAG`` or ``--te S`` (which take several values for raw echoes) is given back.
    """
    inputs = list(args.field or [])
    mags = list(args.magnitude or [])
    tes = list(args.te or [])
    raw = bool(args.phase) or any(Path(p).is_dir() for p in inputs)
    if raw:
        try:
            args.te = [float(t) for t in tes] or None
        except ValueError:
            raise ValueError(f"--te: expected echo times in seconds, got {' '.join(map(str, tes))}") from None
        return True
    inputs += mags[1:] + tes[1:]
    args.magnitude = mags[0] if mags else None
    try:
        args.te = float(tes[0]) if tes else None
    except ValueError:
        raise ValueError(f"--te: expected an echo time in seconds, got {tes[0]!r}") from None
    if len(inputs) != 1:
        raise ValueError(f"recon: expected one local field map FIELD (or raw echoes: a BIDS/DICOM folder, or "
                         f"--magnitude … --phase …), got {len(inputs)}: {' '.join(inputs) or 'none'}")
    if args.mask is None:
        raise ValueError("recon: --mask MASK is required with a local field map (raw echoes make their own mask: "
                         "give a BIDS/DICOM folder, or --magnitude M1 M2 … with --phase P1 P2 …)")
    if args.field_param or args.phase_units != "auto" or args.phase_sign != 1 or any(
            getattr(args, k) is not None for k in ("fit", "unwrap", "mask_method", "background")):
        raise ValueError("recon: --field-param, --phase-units, --phase-sign, --fit, --unwrap, --mask-method and "
                         "--background apply to raw echoes (a BIDS/DICOM folder or --magnitude … --phase …), not to "
                         "a local field map")
    args.field = inputs[0]
    return False


def split_params(items) -> tuple[dict, dict]:
    """``--param`` items → (field-step items ``{"family.name": value}``, method items ``{name: value}``)."""
    from .core.params import parse_cli_params

    field, method = {}, {}
    for k, v in parse_cli_params(items).items():
        if "." in k and k.split(".", 1)[0] in FAMILIES:
            field[k] = v
        else:
            method[k] = v
    return field, method


def raw_local_field(args, inputs, recipe, progress=None):
    """The field steps of ``napari-qsm field`` and ``napari-qsm recon`` on raw echoes → ``(echoes, run)``.

    Every step and parameter of ``recipe`` is checked before the echoes are read (``inputs``: BIDS/DICOM
    folders, or ``args.magnitude``/``args.phase`` files); ``args.mask``, if given, must lie on the echoes'
    grid and replaces the mask step.
    """
    import numpy as np

    from .core.field.load import load_echoes
    from .core.field.pipeline import local_field
    from .core.io import read_volume

    for fam in FAMILIES:
        recipe.record(fam)  # every step and parameter checked before reading the data
    echoes = load_echoes(inputs or None, magnitude=args.magnitude or (), phase=args.phase or (), te=args.te,
                         b0=args.b0, phase_units=args.phase_units, phase_sign=args.phase_sign)
    user_mask = None
    if args.mask:
        user_mask, maff, _ = read_volume(args.mask, "mask")
        if not np.allclose(maff, echoes.affine, atol=1e-3):
            raise ValueError("mask: its affine differs from the echoes'; resample it onto their grid first")
    return echoes, local_field(echoes, recipe, mask=user_mask, device=args.device, progress=progress)


def recon_from_raw(args, progress=None) -> int:
    """Raw echoes → local field (the Field steps) → χ with ``args.method``; writes ``args.output``."""
    from .core.field.pipeline import FieldRecipe, split_params as split_field
    from .core.io import check_output_path, save_result
    from .core.params import make_params, parse_cli_params
    from .methods import get_method, reconstruct

    for attr, opt in _LOCAL_ONLY.items():
        if getattr(args, attr, None):
            raise ValueError(f"{opt}: not used with raw echoes (it describes a local field map)")
    if args.units != "ppm":
        raise ValueError("--units: raw echoes are phase (see --phase-units); --units describes a local field map")
    inputs = [str(p) for p in list(args.field or []) + list(args.magnitude or []) + list(args.phase or [])
              + [args.mask, args.weights] if p]
    check_output_path(args.output, inputs)
    method = get_method(args.method)
    if method.multi_scan:
        raise ValueError(f"method {method.name}: combines several orientations; run napari-qsm field per "
                         "orientation, then napari-qsm recon --orientation …")
    if args.weights and not method.accepts_weights:
        raise ValueError(f"--weights: method {method.name} takes no network weights")
    field_items, method_items = split_params(args.param)
    field_items.update(parse_cli_params(args.field_param))
    # a bare family name chooses the step (--field-param background=pdf, as napari-qsm batch takes it)
    chosen = {fam: field_items.pop(fam) for fam in FAMILIES if fam in field_items}
    params = make_params(method.params_cls, method_items)
    recipe = FieldRecipe(fit=chosen.get("fit", args.fit), mask=chosen.get("mask", args.mask_method),
                         unwrap=chosen.get("unwrap", args.unwrap), background=chosen.get("background", args.background))
    # --- tfi-medi (issue 25): a method that takes the TOTAL field (Method.field_kind == "total", TFI) gets the
    # fit → mask → unwrap chain and no background removal (the unwrapped total field, un-eroded brain mask).
    if getattr(method, "field_kind", "local") == "total":
        if recipe.background is not None or field_items.get("background") or any(
                k.startswith("background.") for k in field_items):
            raise ValueError(f"--background: method {method.name} takes the total field; it runs no background "
                             "removal")
        from .core.inversion.tfi import KEEP_TOTAL_FIELD
        recipe.background = KEEP_TOTAL_FIELD
    # --- end tfi-medi
    recipe.params = split_field(field_items, recipe)
    echoes, run = raw_local_field(args, args.field, recipe, progress)
    scan = run.scan
    if echoes.nifti_info is not None:
        scan._nifti_info = echoes.nifti_info  # write χ back on the echoes' grid and orientation
    extra = {"weights": args.weights} if args.weights else {}
    res = reconstruct(scan, method.name, params, device=args.device, progress=progress, **extra)
    res.extras["field_steps"] = [dict(s) for s in run.steps]
    res.extras["echoes"] = run.provenance.get("echoes", {})
    out = save_result(res, args.output, scan=scan, inputs=inputs)
    if not args.quiet:
        steps = ", ".join(f"{s['label']} {s['seconds']:.1f} s" for s in run.steps)
        print(f"local field: {steps}; {res.name}: {res.seconds:.2f} s on {res.device} -> {out}", file=sys.stderr)
    return 0
