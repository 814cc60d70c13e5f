"""``napari-qsm recon``: a local field map or raw echoes → χ (the argparse side; the work is :mod:`napari_qsm.pipeline`)."""

from __future__ import annotations

import sys
from pathlib import Path

from .cli import _accepts, _load, _progress, _refuse_existing, _sidecar_of

__all__ = ["recon", "split_recon_args", "raw_field"]


def _method_for(args, has_magnitude: bool):
    """The method of ``recon``: ``--method``, else the default, said on stderr (always: it chose for the user)."""
    from .methods import get_method
    from .pipeline import default_method
    if args.method:
        return get_method(args.method)
    method = get_method(default_method(has_magnitude))
    why = "" if has_magnitude else " (no --magnitude: MEDI needs one)"
    print(f"napari-qsm recon: no --method given; using {method.name} ({method.label}){why}. "
          f"Choose with --method NAME ('napari-qsm methods' lists them)", file=sys.stderr)
    return method


def _dicom_targets(args) -> list:
    """``--dicom``: the series folder beside the χ map (``OUT_dicom/``), refused when it exists (no --overwrite)."""
    if not getattr(args, "dicom", False):
        return []
    from .core.io.bids import strip_ext
    return [Path(args.output).with_name(strip_ext(Path(args.output).name) + "_dicom")]


def _write_dicom(args, out) -> None:
    for folder in _dicom_targets(args):
        from .core.io.dicom import nifti_to_dicom
        files = nifti_to_dicom(out, folder, overwrite=getattr(args, "overwrite", False))
        if not args.quiet:
            print(f"DICOM: {len(files)} images -> {folder}", file=sys.stderr)


def recon(args) -> int:
    """``napari-qsm recon``: a local field map, or raw echoes (then the field steps first) → χ."""
    if split_recon_args(args):  # raw echoes: the field steps, then the inversion
        return _recon_raw(args)
    from .core.io import check_output_path, load_orientation, read_aligned, save_result
    from .core.params import make_params, parse_cli_params
    from .pipeline import chi_from_field

    inputs = ([args.field, args.mask, args.magnitude, args.noise_std, args.r2star, args.weights, args.csf_mask]
              + [o[0] for o in args.orientation])
    check_output_path(args.output, inputs)
    _refuse_existing([args.output, _sidecar_of(args.output)] + _dicom_targets(args), args.overwrite)
    method = _method_for(args, args.magnitude is not None)
    params = make_params(method.params_cls, parse_cli_params(args.param))
    extra = {}
    if args.weights and not method.accepts_weights:
        raise ValueError(f"--weights: method {method.name} takes no network weights")
    if args.csf_mask and not _accepts(method, "csf_mask"):
        raise ValueError(f"--csf-mask: method {method.name} takes no CSF mask (it is used by medi, MEDI+0)")
    if args.orientation and not method.multi_scan:
        raise ValueError(f"--orientation: method {method.name} uses one orientation; use --method cosmos")
    if method.multi_scan and not args.orientation:
        raise ValueError(f"method {method.name}: give the other orientations with --orientation FIELD [X Y Z]")
    for o in args.orientation:
        if len(o) not in (1, 4):
            raise ValueError(f"--orientation: expected FIELD or FIELD X Y Z, got {' '.join(o)}")
    scan = _load(args)
    if args.weights:
        extra["weights"] = args.weights
    if args.csf_mask:
        extra["csf_mask"] = read_aligned(args.csf_mask, "csf-mask", scan.nifti_info) > 0.5
    if args.orientation:
        scans = [scan]
        for o in args.orientation:
            try:
                b0 = [float(v) for v in o[1:]] if len(o) == 4 else None
            except ValueError:
                raise ValueError(f"--orientation: X Y Z must be numbers, got {' '.join(o[1:])}") from None
            scans.append(load_orientation(o[0], scan, b0_direction=b0, units=args.units, te=args.te, b0=args.b0,
                                          echo=args.echo, name=f"--orientation {o[0]}"))
        extra["scans"] = scans
    res = chi_from_field(scan, method.name, params, device=args.device, progress=_progress(args.quiet), **extra)
    out = save_result(res, args.output, scan=scan, inputs=inputs)
    _write_dicom(args, out)
    if not args.quiet:
        print(f"{res.name}: {res.seconds:.2f} s on {res.device} -> {out}", file=sys.stderr)
    return 0


#: options of recon's local-field form that have no meaning for raw echoes
_LOCAL_ONLY = {"noise_std": "--noise-std", "r2star": "--r2star", "voxel_size": "--voxel-size", "b0_dir": "--b0-dir",
               "echo": "--echo", "orientation": "--orientation", "csf_mask": "--csf-mask"}


def split_recon_args(args) -> bool:
    """Decide whether ``recon`` got raw echoes (True) or a local field (False); normalise ``args``.

    Raw: ``--phase`` is given, or an INPUT is a folder. Otherwise the local-field form
    ``FIELD --mask MASK [--magnitude MAG] [--te S]`` is restored exactly: a FIELD written after
    ``--magnitude MAG`` or ``--te S`` (which take several values for raw echoes) is given back.
    """
    inputs, mags, tes = list(args.field or []), list(args.magnitude or []), list(args.te or [])
    if bool(args.phase) or any(Path(p).is_dir() for p in inputs):
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
    if args.field_param or args.phase_units != "auto" or args.phase_sign not in (None, 1) or any(
            getattr(args, k) is not None for k in ("fit", "unwrap", "mask_method", "background")):
        raise ValueError("recon: --field-param, --phase-units, --phase-sign, --fit, --unwrap, --mask-method and "
                         "--background apply to raw echoes (a BIDS/DICOM folder or --magnitude … --phase …), not to "
                         "a local field map")
    args.field = inputs[0]
    return False


def raw_field(args, inputs, recipe, progress):
    """(echoes, FieldRun) of ``field`` / raw ``recon``: the Namespace turned into :func:`field_from_inputs` arguments."""
    from .pipeline import field_from_inputs
    return field_from_inputs(inputs, recipe, magnitude=args.magnitude or (), phase=args.phase or (), te=args.te,
                             b0=args.b0, phase_units=args.phase_units, phase_sign=args.phase_sign, mask=args.mask,
                             device=args.device, progress=progress)


def _recon_raw(args) -> int:
    """recon on raw echoes: the field steps of ``napari-qsm field``, then the inversion, in memory."""
    from .core.field.steps import FAMILIES
    from .core.io import check_output_path, save_result
    from .core.params import make_params, parse_cli_params
    from .pipeline import chi_from_field, make_recipe

    for attr, opt in _LOCAL_ONLY.items():
        if getattr(args, attr, None):
            raise ValueError(f"{opt}: not used with raw echoes (it describes a local field map)")
    if args.units != "ppm":
        raise ValueError("--units: raw echoes are phase (see --phase-units); --units describes a local field map")
    inputs = [str(p) for p in list(args.field or []) + list(args.magnitude or []) + list(args.phase or [])
              + [args.mask, args.weights] if p]
    check_output_path(args.output, inputs)
    _refuse_existing([args.output, _sidecar_of(args.output)] + _dicom_targets(args), args.overwrite)
    method = _method_for(args, True)
    if method.multi_scan:
        raise ValueError(f"method {method.name}: combines several orientations; run napari-qsm field per "
                         "orientation, then napari-qsm recon --orientation …")
    if args.weights and not method.accepts_weights:
        raise ValueError(f"--weights: method {method.name} takes no network weights")
    field_items, method_items = {}, {}
    for k, v in parse_cli_params(args.param).items():   # STEP.NAME items go to the field steps
        (field_items if "." in k and k.split(".", 1)[0] in FAMILIES else method_items)[k] = v
    field_items.update(parse_cli_params(args.field_param))
    params = make_params(method.params_cls, method_items)
    # --- tfi-medi (issue 25): a method that takes the TOTAL field (Method.field_kind == "total", TFI) gets the
    # fit → mask → unwrap chain and no background removal (the unwrapped total field and the un-eroded brain mask).
    total_kind = getattr(method, "field_kind", "local") == "total"
    if total_kind and (args.background or any(k == "background" or k.startswith("background.") for k in field_items)):
        raise ValueError(f"--background: method {method.name} takes the total field; it runs no background removal")
    # --- end tfi-medi
    recipe = make_recipe({"fit": args.fit, "mask": args.mask_method, "unwrap": args.unwrap,
                          "background": args.background}, field_items)
    if total_kind:  # tfi-medi
        from .core.inversion.tfi import KEEP_TOTAL_FIELD
        recipe.background = KEEP_TOTAL_FIELD
    progress = _progress(args.quiet)
    echoes, run = raw_field(args, args.field, recipe, progress)
    extra = {"weights": args.weights} if args.weights else {}
    res = chi_from_field(run, method.name, params, nifti_info=echoes.nifti_info, device=args.device,
                         progress=progress, **extra)
    out = save_result(res, args.output, scan=run.scan, inputs=inputs)
    _write_dicom(args, out)
    if not args.quiet:
        steps = ", ".join(f"{s['label']} {s['seconds']:.1f} s" for s in run.steps)
        print(run.total.report, file=sys.stderr)   # phase units (why), B0, TE, noise σ (source)
        print(f"local field: {steps}; {res.name}: {res.seconds:.2f} s on {res.device} -> {out}", file=sys.stderr)
    return 0
