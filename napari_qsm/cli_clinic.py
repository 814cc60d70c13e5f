"""The clinic's commands: ``dicom`` (a map as a DICOM series), ``swi`` (SWI, minIP, NumART2*) and
``report`` (one page per scan). Registered on the main parser by :func:`add_parsers`."""

from __future__ import annotations

import sys
from pathlib import Path

from .core.io.bids import strip_ext

__all__ = ["add_parsers", "COMMANDS"]

SWI_OUTPUTS = {  # file stem: (quantity, units)
    "swi": ("susceptibility-weighted image", "a.u."), "minip": ("SWI minimum-intensity projection", "a.u."),
    "swi_magnitude": ("combined magnitude", "a.u."), "swi_phase": ("high-passed phase", "rad"),
    "t2star_numart": ("T2* (NumART2*)", "ms"), "r2star_numart": ("R2* (NumART2*)", "1/s")}


def add_parsers(sub) -> None:
    d = sub.add_parser("dicom", help="a χ map (or SWI, minIP, R2*) NIfTI as a DICOM series a PACS displays")
    d.add_argument("map", metavar="MAP.nii.gz", help="χ (ppm) or another 3-D map written by napari-qsm")
    d.add_argument("-o", "--output", required=True, help="output folder for the series (one file per slice)")
    d.add_argument("--like", metavar="SOURCE_DICOM", help="the source DICOM series' folder: its patient, study "
                   "and frame of reference are copied (its grid must be the map's)")
    d.add_argument("--description", help="SeriesDescription (default: the method and parameters of the sidecar)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    s = sub.add_parser("swi", help="CLEAR-SWI-style SWI, its minIP and NumART2* T2*/R2* from multi-echo "
                                   "magnitude and phase")
    s.add_argument("inputs", nargs="*", help="a BIDS anat or subject folder, or a DICOM folder")
    s.add_argument("--magnitude", nargs="+", default=[], help="magnitude echoes: one 3-D file per echo or one 4-D")
    s.add_argument("--phase", nargs="+", default=[], help="phase echoes, in the magnitude's order")
    s.add_argument("--te", nargs="+", type=float, help="echo times in seconds (default: the JSON sidecars)")
    s.add_argument("--b0", type=float, help="field strength in tesla (default: the sidecars)")
    from .cli import PHASE_SIGN_HELP, PHASE_UNIT_CHOICES, PHASE_UNITS_HELP
    s.add_argument("--phase-units", default="auto", choices=list(PHASE_UNIT_CHOICES), help=PHASE_UNITS_HELP)
    s.add_argument("--phase-sign", type=int, default=None, choices=[1, -1], help=PHASE_SIGN_HELP)
    s.add_argument("--mask", help="tissue mask (NIfTI on the echoes' grid); default: the front end's brain mask")
    s.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="SWI parameter: highpass_mm, power, magnitude (rss|te), reference_te, minip_mm")
    s.add_argument("--dicom", action="store_true", help="also write the SWI and minIP as DICOM series")
    s.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    s.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    r = sub.add_parser("report", help="a one-page report (PNG or PDF) of a χ map: slices, SWI minIP, method, "
                                      "field residual, regions")
    r.add_argument("chi", metavar="CHI.nii.gz", help="χ map (ppm) with its napari-qsm sidecar")
    r.add_argument("--mask", required=True, help="brain mask on χ's grid")
    r.add_argument("--field", help="the local field (ppm) χ was made from: for the field-consistency residual")
    r.add_argument("--minip", help="SWI minIP on χ's grid (napari-qsm swi)")
    r.add_argument("--labels", help="label map on χ's grid: mean χ per region")
    r.add_argument("--label-names", help="TSV or JSON of label value -> name")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report")
    r.add_argument("-o", "--output", required=True, help="report.png or report.pdf")


def _refuse_existing(paths, overwrite: bool) -> None:
    from .cli import _refuse_existing as rule  # the one overwrite rule of every command (imported late: cli
    rule(paths, overwrite)                     # imports this module, also when it runs as __main__)


def cmd_dicom(args) -> int:
    from .core.io.dicom import nifti_to_dicom

    if not Path(args.map).exists():
        raise FileNotFoundError(f"map: {args.map}: no such file")
    files = nifti_to_dicom(args.map, args.output, like=args.like, description=args.description,
                           overwrite=args.overwrite)
    print(f"DICOM: {len(files)} images -> {args.output}", file=sys.stderr)
    return 0


def cmd_swi(args) -> int:
    from .core.io import save_volume
    from .core.params import make_params, parse_cli_params
    from .methods import get_step
    from .pipeline import field_from_inputs

    step = get_step("swi")  # the registry's SWI step (the shipped CLEAR-SWI unless another is registered)
    params = make_params(step.params_cls, parse_cli_params(args.param))  # checked before any work
    out = Path(args.output)
    targets = {k: out / f"{k}.nii.gz" for k in SWI_OUTPUTS}
    _refuse_existing(list(targets.values()), args.overwrite)
    progress = None
    if not args.quiet:
        from .core.progress import stderr_progress
        progress = stderr_progress()
    echoes, run = field_from_inputs(args.inputs, magnitude=args.magnitude, phase=args.phase, te=args.te,
                                    b0=args.b0, phase_units=args.phase_units, phase_sign=args.phase_sign,
                                    mask=args.mask, device=args.device, progress=progress)
    total = run.total
    res = step.run(echoes.magnitude, total.field, run.brain_mask, echoes.te, total.b0_tesla, total.voxel_size,
                   params)
    out.mkdir(parents=True, exist_ok=True)
    maps = {"swi": res.swi, "minip": res.min_ip, "swi_magnitude": res.magnitude, "swi_phase": res.phase_hp,
            "t2star_numart": res.t2star_ms, "r2star_numart": res.r2star}
    from . import __version__
    prov = {"software": "napari-qsm", "version": __version__, **res.provenance, "field_steps": run.steps}
    for k, arr in maps.items():
        quantity, units = SWI_OUTPUTS[k]
        save_volume(arr, targets[k], echoes.affine, nifti_info=echoes.nifti_info,
                    description=f"napari-qsm {quantity} ({units})"[:79],
                    provenance={**prov, "output": {"file": targets[k].name, "quantity": quantity, "units": units}})
    if args.dicom:
        from .core.io.dicom import nifti_to_dicom
        for k, desc in (("swi", "SWI (CLEAR-SWI style)"), ("minip", f"SWI minIP {params.minip_mm:g} mm")):
            nifti_to_dicom(targets[k], out / f"{k}_dicom", description=desc, overwrite=args.overwrite)
    print(f"SWI: {', '.join(maps)} -> {out}", file=sys.stderr)
    return 0


def _label_names(path):
    if not path:
        return None
    import json
    p = Path(path)
    if p.suffix.lower() == ".json":  # {value: name}, or a phantom.json with "label_names"
        d = json.loads(p.read_text())
        d = d.get("label_names", d) if isinstance(d, dict) else {}
        return {int(k): str(v).replace("_", " ") for k, v in d.items() if str(k).lstrip("-").isdigit()}
    names = {}
    for line in p.read_text().splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 2 and parts[0].strip().lstrip("-").isdigit():
            names[int(parts[0])] = parts[1].strip()
    return names


def cmd_report(args) -> int:
    import numpy as np

    from .core.io import read_sidecar, read_volume, voxel_sizes
    from .core.metrics import field_residual
    from .core.report import write_report

    _refuse_existing([args.output], args.overwrite)
    chi, aff, info = read_volume(args.chi, "χ")
    mask, maff, _ = read_volume(args.mask, "mask")
    if mask.shape != chi.shape or not np.allclose(maff, aff, atol=1e-3):
        raise ValueError("mask: not on χ's grid (shape or affine differ)")
    side = read_sidecar(args.chi, "χ")
    vs = voxel_sizes(aff)
    residual = None
    if args.field:
        from .core.io import b0_from_affine
        field, faff, _ = read_volume(args.field, "field")
        if field.shape != chi.shape:
            raise ValueError("field: not on χ's grid")
        residual = field_residual(chi, field, mask > 0.5, vs, b0_from_affine(faff), device="cpu")
    minip = read_volume(args.minip, "minIP")[0] if args.minip else None
    labels = read_volume(args.labels, "labels")[0] if args.labels else None
    params = side.get("parameters") if isinstance(side.get("parameters"), dict) else None
    extras = side.get("extras") if isinstance(side.get("extras"), dict) else {}
    reference = str(extras.get("reference", side.get("reference", "mean of the mask")))
    write_report(args.output, chi, mask > 0.5, vs, title=strip_ext(Path(args.chi).name),
                 method=str(side.get("method", "unknown")), parameters=params, residual_percent=residual,
                 min_ip=minip, labels=labels, label_names=_label_names(args.label_names), reference=reference)
    print(f"report -> {args.output}", file=sys.stderr)
    return 0


COMMANDS = {"dicom": cmd_dicom, "swi": cmd_swi, "report": cmd_report}
