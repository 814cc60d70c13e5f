"""The ``napari-qsm`` command line (contract in DESIGN.md).

    napari-qsm recon FIELD --mask MASK [--magnitude MAG] [--noise-std MAP] [--r2star MAP]
               [--method NAME] [--voxel-size X Y Z]
               [--b0-dir X Y Z] [--units ppm|hz|rad] [--te S] [--b0 T] [--echo N]
               [--device auto|cpu|cuda] [--weights CKPT] [--param NAME=VALUE ...]
               [--csf-mask MASK] [--orientation FIELD [X Y Z] ...]   (COSMOS: more orientations)
               -o OUT.nii.gz
    napari-qsm recon INPUT... [--method NAME] -o OUT.nii.gz   (raw echoes: a BIDS/DICOM folder or --magnitude M...
               --phase P... [--te S...]; the field steps first, options as `field`; see napari_qsm.pipeline)
    napari-qsm adapt FIELD [FIELD ...] --mask MASK [MASK ...] [--magnitude MAG ...] [--steps N]
               [--weights CKPT] [--save-weights OUT.pt] -o OUT.nii.gz [OUT.nii.gz ...]
               (several fields: one checkpoint adapted to all scans of a protocol; files paired in order)
    napari-qsm metrics RECON REFERENCE --mask MASK [--field FIELD] [--json]
    napari-qsm phantom OUTDIR [--shape X Y Z] [--voxel-size X Y Z] [--seed N] [--snr S] [--oblique DEG]
               [--raw [--phase-units rad|siemens]]   (raw echoes of the head in air: BIDS MEGRE + truth/)
    napari-qsm methods            (list methods and their parameters)
    napari-qsm demo [OUTDIR]      (every method on the built-in phantom: metrics table + comparison PNG)
    napari-qsm view [FILES ...]   (napari with the QSM docks and the scans, or the sample phantom)
    napari-qsm field INPUT... -o OUTDIR   (raw multi-echo GRE -> local field, mask, N_std, R2*)
    napari-qsm batch BIDS_ROOT --method M [--param ...] [--field-param ...] [--scheduler ADDRESS | --workers N]
               [--only sub-01,...] [--dry-run] [--overwrite] [--adapt-protocol [--adapt-param NAME=VALUE ...]]
               (every scan on Dask -> derivatives/napari-qsm)

Errors print ``napari-qsm: error: ...`` to stderr and exit with status 2; nothing is written.
Progress goes to stderr. Every command refuses to replace an existing output unless ``--overwrite``
(``batch`` skips what is up to date instead). ``recon`` without ``--method`` uses
:data:`napari_qsm.pipeline.DEFAULT_METHOD` (MEDI; TKD without a magnitude) and says so.

Geometry: ``--voxel-size`` and ``--b0-dir`` (and the X Y Z of ``--orientation``) are in the FIELD
file's own voxel order as stored on disk (what its header / fslinfo show: pixdim1..3 and axes
i, j, k); they are converted to the canonical frame used internally. Without ``--b0-dir`` B0
comes from the field's JSON sidecar (``FIELD.json``: ``"B0Direction"`` in that voxel frame, or
``"RegistrationMatrix"``, the 4x4 rigid world transform acquisition scanner mm -> this file's
world mm), else from its header (scanner z in voxel coordinates). ``--te`` / ``--b0`` default to
the sidecar's ``EchoTime`` (s) / ``MagneticFieldStrength`` (T). See ``napari_qsm.core.io``.

COSMOS: every ``--orientation`` field must be registered (resampled) onto FIELD's voxel grid
(same stored shape and voxel size). Registration rotates the head, not B0: each orientation's
B0 in the common voxel frame is R_grid⁻¹ · M · ẑ, M the rotation of its registration. Give it
as X Y Z after the file name, or in that file's sidecar (``"B0Direction"`` or
``"RegistrationMatrix"``), or keep each orientation's own header placing the common grid in
that acquisition's scanner space.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path



RECON_EPILOG = """\
geometry:
  --voxel-size and --b0-dir (and the X Y Z of --orientation) follow the FIELD file's voxel axes
  i, j, k as stored on disk (header pixdim order, as fslinfo shows); they are converted to the
  canonical (RAS) frame used internally. Without --b0-dir, B0 comes from FIELD.json
  ("B0Direction": 3 numbers in that voxel frame, or "RegistrationMatrix": the 4x4 rigid
  transform acquisition scanner mm -> FIELD's world mm), else from the header (scanner z).

COSMOS (--method cosmos --orientation F2 [X Y Z] --orientation F3 ...):
  every orientation is registered (resampled) onto FIELD's voxel grid: same stored shape and
  voxel size; the mask is shared. Registration rotates the head, not B0, so each orientation
  needs its own B0 in the common voxel frame: X Y Z after its file name, or its sidecar
  (B0Direction / RegistrationMatrix; B0 = R_grid^-1 M z), or its own header when that places
  the common grid in the acquisition's scanner space. Identical directions are refused.

Run 'napari-qsm methods' for every method's parameters."""


def _add_scan_args(p: argparse.ArgumentParser, raw: bool = False) -> None:
    # raw=True (recon): INPUT may also be raw echoes (split_recon_args)
    if raw:
        p.add_argument("field", nargs="*", metavar="INPUT",
                       help="local field map (NIfTI), units per --units (default ppm); or raw echoes: a BIDS "
                            "anat/subject folder or a DICOM folder (the field steps run first)")
    else:
        p.add_argument("field", help="local field map (NIfTI), units per --units (default ppm)")
    p.add_argument("--mask", required=not raw, help="brain mask (NIfTI, nonzero = inside)"
                   + ("; required with a local field map, replaces the mask step for raw echoes" if raw else ""))
    p.add_argument("--magnitude", nargs="+" if raw else None,
                   help="magnitude image (NIfTI; 4-D: the first echo unless --echo)"
                        + ("; raw echoes: one 3-D file per echo or one 4-D file, with --phase" if raw else ""))
    p.add_argument("--noise-std", metavar="MAP", help="field noise standard deviation (NIfTI, ppm, on the field's "
                                                      "grid), e.g. from the echo fit; MEDI weights its data term by it")
    p.add_argument("--r2star", metavar="MAP", help="R2* map (NIfTI, 1/s, on the field's grid); MEDI+0 "
                                                   "(--param csf=auto) finds CSF in it")
    p.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="override voxel size (mm) along the FIELD file's voxel axes i, j, k as stored on disk "
                        "(the header's pixdim order, as fslinfo shows it); default: from the header")
    p.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="override the B0 direction, components along the FIELD file's stored voxel axes i, j, k "
                        "(default: FIELD.json sidecar \"B0Direction\" or \"RegistrationMatrix\", else scanner z "
                        "from the affine)")
    p.add_argument("--units", default="ppm", choices=["ppm", "hz", "rad"], help="field units (default ppm)")
    p.add_argument("--te", nargs="+" if raw else None, type=None if raw else float,
                   help="echo time in seconds (needed for --units rad; default: sidecar EchoTime)"
                        + ("; raw echoes: one per echo" if raw else ""))
    p.add_argument("--b0", type=float, help="field strength in tesla (needed for --units hz/rad; default: sidecar "
                                            "MagneticFieldStrength); recorded in the output's provenance")
    p.add_argument("--echo", type=int, help="echo index for 4-D multi-echo input")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


FIELD_EPILOG = """outputs in OUTDIR, on the input's grid and orientation:
  local_field.nii.gz (ppm), mask.nii.gz (the eroded brain mask), magnitude.nii.gz, total_field.nii.gz (ppm),
  noise_std.nii.gz (ppm), r2star.nii.gz (1/s), each with a JSON sidecar (B0 in T, echo times and ΔTE in s,
  units, B0 direction, phase units and why, noise σ and its source: recon and adapt read them), field.json
  (inputs, vendor facts, every step with its parameters and seconds).
  Then: napari-qsm recon OUTDIR/local_field.nii.gz --mask OUTDIR/mask.nii.gz
  --magnitude OUTDIR/magnitude.nii.gz --noise-std OUTDIR/noise_std.nii.gz --method medi -o chi.nii.gz"""

#: --phase-units of raw echoes (napari_qsm.core.field.load.PHASE_UNITS; kept here so that --help imports nothing heavy)
PHASE_UNIT_CHOICES = ("auto", "rad", "siemens", "siemens-unsigned", "mrad", "rescale")
PHASE_UNITS_HELP = ("auto (default): radians, Siemens integers (signed −4096..4095 or unsigned 0..4095), Philips "
                    "milliradians, or, only with evidence of wrapped phase (saturating at both ends, even histogram), "
                    "rescale; otherwise an error. rescale: min..max → −π..π (ROMEO, CLEAR-SWI). Reported on stderr and "
                    "in field.json")
PHASE_SIGN_HELP = "-1 flips the phase, 1 keeps it (default: -1 when the sidecar's Manufacturer is GE, else 1)"


def build_parser() -> argparse.ArgumentParser:
    # long by nature (over 80 lines): one declarative table of every command and option, read top to bottom
    ap = argparse.ArgumentParser(prog="napari-qsm", description="Quantitative susceptibility mapping (χ in ppm).")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("recon", help="reconstruct χ from a local field map", epilog=RECON_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_scan_args(r, raw=True)
    r.add_argument("--method", help="tkd, tsvd, medi, cosmos, dsbn, ... (default: medi; tkd for a local field "
                                    "without --magnitude; the command says which it used)")
    _add_raw_recon_args(r)
    r.add_argument("--weights", help="network checkpoint (.pt) for network methods")
    r.add_argument("--dicom", action="store_true", help="also write χ as a DICOM series (OUT_dicom/, in ppb)")
    r.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="method parameter (repeatable); raw echoes: STEP.NAME=VALUE goes to a field step")
    r.add_argument("--csf-mask", metavar="MASK",
                   help="CSF mask (NIfTI on the field's grid) for MEDI+0: turns on the CSF term (param lambda_csf) "
                        "and references χ to the CSF mean")
    r.add_argument("--orientation", action="append", nargs="+", default=[], metavar=("FIELD", "X Y Z"),
                   help="COSMOS: another field map of the same head registered onto FIELD's voxel grid, optionally "
                        "followed by its B0 direction along the stored voxel axes i, j, k; without X Y Z: its "
                        "sidecar (\"B0Direction\", or \"RegistrationMatrix\" = acquisition scanner mm -> common "
                        "world mm), else its own header. Repeat per orientation")
    r.add_argument("-o", "--output", required=True, help="output χ map (.nii or .nii.gz), JSON sidecar beside it")
    _add_overwrite(r)

    a = sub.add_parser("adapt", help="adapt QSMInvNet+ to this scan (or to several scans of one protocol: one "
                                     "checkpoint for all; FIELD, --mask, --magnitude, --noise-std, -o paired in order)")
    _add_scan_args(a)
    for act in a._actions:   # protocol adaptation: one file per scan for each of these
        if act.dest in ("field", "mask", "magnitude", "noise_std"):
            act.nargs = "+"
    a.add_argument("--steps", type=int, help="adaptation steps (default: the method's default)")
    a.add_argument("--weights", help="base checkpoint (default: shipped weights)")
    a.add_argument("--save-weights", help="where to write the adapted checkpoint (.pt, JSON sidecar beside it)")
    a.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="adaptation parameter (repeatable)")
    a.add_argument("-o", "--output", required=True, nargs="+", help="output χ map (.nii or .nii.gz); one per FIELD")
    _add_overwrite(a)

    m = sub.add_parser("metrics", help="compare a χ map with a reference inside a mask")
    m.add_argument("recon", help="reconstructed χ (NIfTI, ppm)")
    m.add_argument("reference", nargs="?", help="reference χ (NIfTI, ppm); omit it to get only the field-consistency residual, which needs --field")
    m.add_argument("--mask", required=True, help="mask (NIfTI)")
    m.add_argument("--field", help="local field (ppm) for the field-consistency residual")
    m.add_argument("--b0-dir", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="override the B0 direction along the --field file's stored voxel axes i, j, k")
    m.add_argument("--json", action="store_true", help="print one JSON object")

    ph = sub.add_parser("phantom", help="write a procedural head phantom (field, mask, magnitude, χ, labels)")
    ph.add_argument("outdir")
    ph.add_argument("--shape", nargs=3, type=int, metavar=("X", "Y", "Z"))
    ph.add_argument("--voxel-size", nargs=3, type=float, metavar=("X", "Y", "Z"))
    ph.add_argument("--clinical", action="store_true", help="clinical-like preset 192x224x48 at 0.75x0.75x3 mm")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--snr", type=float, help="magnitude SNR for magnitude-weighted field noise (default: none)")
    ph.add_argument("--oblique", type=float, default=0.0, help="B0 tilt in degrees about the x axis")
    ph.add_argument("--raw", action="store_true",
                    help="raw multi-echo GRE of the head in air (background field, sinuses) as a BIDS MEGRE folder "
                         "OUTDIR/sub-phantom/anat plus the truth in OUTDIR/truth (default SNR 50)")
    ph.add_argument("--phase-units", choices=["rad", "siemens"], default="rad",
                    help="--raw: phase in radians or Siemens integers (-4096..4095)")
    _add_overwrite(ph, "the files in OUTDIR")
    ph.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    fl = sub.add_parser("field", help="raw multi-echo GRE (BIDS, DICOM or files) -> local field, mask, total field, "
                                      "N_std, R2*", epilog=FIELD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fl.add_argument("inputs", nargs="*", help="a BIDS anat or subject folder, or a DICOM folder")
    fl.add_argument("--magnitude", nargs="+", default=[], help="magnitude echoes: one 3-D file per echo or one 4-D file")
    fl.add_argument("--phase", nargs="+", default=[], help="phase echoes, in the magnitude's order")
    fl.add_argument("--te", nargs="+", type=float, help="echo times in seconds (default: the JSON sidecars)")
    fl.add_argument("--b0", type=float, help="field strength in tesla (default: ImagingFrequency/γ̄ or "
                                            "MagneticFieldStrength of the sidecars)")
    fl.add_argument("--phase-units", default="auto", choices=list(PHASE_UNIT_CHOICES), help=PHASE_UNITS_HELP)
    fl.add_argument("--phase-sign", type=int, default=None, choices=[1, -1], help=PHASE_SIGN_HELP)
    fl.add_argument("--mask", help="brain mask (NIfTI on the echoes' grid); replaces the mask step")
    fl.add_argument("--fit", default=None, help="echo fit: linear (default) or nonlinear")
    fl.add_argument("--unwrap", default=None, help="spatial unwrapping: quality (default, exact) or laplacian")
    fl.add_argument("--mask-method", default=None, help="brain mask step: threshold (default)")
    fl.add_argument("--background", default=None, help="background removal: lbv (default), vsharp, ismv, resharp, pdf")
    fl.add_argument("--param", action="append", default=[], metavar="[STEP.]NAME=VALUE",
                    help="step parameter, e.g. background.radius=6 (repeatable; 'napari-qsm methods' lists them)")
    fl.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    fl.add_argument("-o", "--output", required=True, help="output folder (created; existing outputs are refused "
                                                         "unless --overwrite)")
    _add_overwrite(fl, "the outputs in the folder")
    fl.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    bt = sub.add_parser("batch", help="every scan of a BIDS dataset on Dask distributed -> derivatives/napari-qsm",
                        epilog=BATCH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    bt.add_argument("root", metavar="BIDS_ROOT", help="BIDS dataset: sub-*/[ses-*/]anat with MEGRE echoes or local fields")
    bt.add_argument("--method", required=True, help="tkd, tsvd, medi, dsbn, ...")
    bt.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="method parameter (repeatable)")
    bt.add_argument("--field-param", action="append", default=[], metavar="FAMILY=STEP|[FAMILY.]NAME=VALUE",
                    help="front end for raw echoes: a step (background=pdf), a step parameter (background.radius=6) or "
                         "phase_units=siemens / phase_sign=-1 (repeatable)")
    bt.add_argument("--weights", metavar="CKPT", help="network checkpoint (.pt) for network methods; the base of --adapt-protocol")
    bt.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler (tcp://host:8786) instead of a "
                                                           "local cluster")
    bt.add_argument("--workers", type=int, metavar="N", help="local cluster: worker processes (default: what CPUs and memory allow)")
    bt.add_argument("--threads-per-worker", type=int, default=1, metavar="T", help="local cluster: threads per worker (default 1)")
    bt.add_argument("--memory-limit", metavar="SIZE", help="local cluster: memory per worker, e.g. 4GB")
    bt.add_argument("--only", metavar="sub-01,sub-02", help="these subjects only")
    bt.add_argument("--dry-run", action="store_true", help="list what would run; write nothing")
    bt.add_argument("--overwrite", action="store_true", help="recompute scans that are up to date")
    bt.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (on every worker)")
    bt.add_argument("--dicom", action="store_true", help="also write every χ as a DICOM series "
                    "(<prefix>_desc-<method>_Chimap_dicom/)")
    bt.add_argument("--adapt-protocol", action="store_true",
                    help="first adapt QSMInvNet+ once to all the dataset's scans (one protocol; base: --weights or the "
                         "shipped checkpoint), then reconstruct every scan with it (needs --method dsbn)")
    bt.add_argument("--adapt-param", action="append", default=[], metavar="NAME=VALUE",
                    help="--adapt-protocol: adaptation parameter, e.g. steps=200 (repeatable; see 'napari-qsm methods')")
    bt.add_argument("-q", "--quiet", action="store_true", help="no plan, bar or summary on stderr")

    from .cli_clinic import add_parsers as _add_clinic_parsers
    _add_clinic_parsers(sub)  # dicom, swi, report
    sub.add_parser("methods", help="list methods and their parameters")

    d = sub.add_parser("demo", help="every method on the built-in phantom: metrics table and comparison PNG")
    d.add_argument("outdir", nargs="?", default="demo_output")
    d.add_argument("--size", choices=["small", "full"], default="small",
                   help="small: 1.25 mm 128x152x128 (fast); full: 1 mm 160x192x160")
    d.add_argument("--snr", type=float, default=40.0)
    d.add_argument("--device", default="auto")
    d.add_argument("--methods", nargs="+", help="subset of methods (default: all)")
    d.add_argument("--full", action="store_true",
                   help="every method with its defaults (the adaptation's 120 steps: about 4 more minutes on 2 idle cores)")
    _add_overwrite(d, "the tables and figure in OUTDIR")

    v = sub.add_parser("view", help="open napari with the QSM docks and the given scans (or the sample phantom)")
    v.add_argument("files", nargs="*", help="NIfTI files to open (field, mask, magnitude, ...) or a BIDS MEGRE folder "
                                            "(raw echoes, for the Field dock); none: the 1 mm phantom")
    v.add_argument("--sample", choices=["phantom_1mm", "phantom_clinical", "raw_head"], default="phantom_1mm",
                   help="sample data to open when no files are given")
    return ap


def _add_raw_recon_args(r: argparse.ArgumentParser) -> None:
    """recon from raw echoes (napari_qsm.pipeline): the options of `napari-qsm field`."""
    g = r.add_argument_group("raw echoes (a BIDS/DICOM folder or --magnitude/--phase lists: the field steps first)")
    g.add_argument("--phase", nargs="+", default=[], help="phase echoes, in the magnitude's order")
    g.add_argument("--phase-units", default="auto", choices=list(PHASE_UNIT_CHOICES), help=PHASE_UNITS_HELP)
    g.add_argument("--phase-sign", type=int, default=None, choices=[1, -1], help=PHASE_SIGN_HELP)
    g.add_argument("--fit", help="echo fit: linear (default) or nonlinear")
    g.add_argument("--unwrap", help="spatial unwrapping: quality (default, exact) or laplacian")
    g.add_argument("--mask-method", help="brain mask step: threshold (default)")
    g.add_argument("--background", help="background removal: lbv (default), vsharp, ismv, resharp, pdf")
    g.add_argument("--field-param", action="append", default=[], metavar="[STEP.]NAME=VALUE",
                   help="field step parameter (repeatable); --param STEP.NAME=VALUE works too")


def _add_overwrite(p: argparse.ArgumentParser, what: str = "an existing output") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what} (refused otherwise)")


def _refuse_existing(paths, overwrite: bool) -> None:
    """The one overwrite rule of every command: an existing output is refused unless --overwrite."""
    existing = [str(p) for p in paths if p is not None and Path(p).exists()]
    if existing and not overwrite:
        raise ValueError(f"output: {', '.join(existing)} already exist(s); give --overwrite to replace "
                         f"{'it' if len(existing) == 1 else 'them'}, or choose another output")


def _sidecar_of(path) -> Path:
    from .core.io import sidecar_path
    return sidecar_path(path)


def _version() -> str:
    from . import __version__
    return f"napari-qsm {__version__}"


def _progress(quiet: bool):
    if quiet:
        return None
    from .core.progress import stderr_progress
    return stderr_progress()


def _load(args):
    from .core.io import load_scan
    return load_scan(args.field, args.mask, args.magnitude, voxel_size=args.voxel_size,
                     b0_direction=args.b0_dir, units=args.units, te=args.te, b0=args.b0, echo=args.echo,
                     noise_std=args.noise_std, r2star=args.r2star)


def _accepts(method, name: str) -> bool:
    import inspect
    return name in inspect.signature(method.run).parameters


def cmd_recon(args) -> int:
    from .cli_recon import recon
    return recon(args)


def cmd_adapt(args) -> int:
    from .core.io import check_output_path, save_result
    from .core.params import parse_cli_params
    try:
        from .nn import adapt as adapt_mod
    except ImportError as exc:
        raise ValueError(f"adapt: on-scan adaptation is not available in this build ({exc})") from None
    fields, n = list(args.field), len(args.field)
    for opt, vals in (("--mask", args.mask), ("--magnitude", args.magnitude), ("--noise-std", args.noise_std),
                      ("-o/--output", args.output)):   # paired in order: one per FIELD (or none when optional)
        if vals is not None and len(vals) != n:
            raise ValueError(f"{opt}: {len(vals)} file(s) for {n} field map(s); give one per FIELD, in the same order")
    if n > 1 and (args.b0_dir or args.voxel_size):
        raise ValueError(f"{'--b0-dir' if args.b0_dir else '--voxel-size'}: with several FIELDs each scan's geometry "
                         f"comes from its own header (B0 direction also from FIELD.json \"B0Direction\"); "
                         f"one override for all is refused")
    pick = lambda vals, k: None if vals is None else vals[k]  # noqa: E731
    inputs = [*fields, *args.mask, *(args.magnitude or []), *(args.noise_std or []), args.r2star, args.weights]
    outs = list(args.output)
    if len({str(Path(o).resolve()) for o in outs}) != len(outs):
        raise ValueError("-o/--output: the same output path is given twice")
    for o in outs:
        check_output_path(o, inputs)
    targets = [p for o in outs for p in (o, _sidecar_of(o))]
    if args.save_weights:
        sw = Path(args.save_weights).resolve()
        if any(i is not None and Path(i).resolve() == sw for i in inputs + outs):
            raise ValueError(f"--save-weights: {args.save_weights} is also an input or output; choose another path")
        targets += [sw, sw.with_suffix(".json")]
    _refuse_existing(targets, args.overwrite)
    scans = []
    for k in range(n):   # each scan's voxel size and B0 direction from its own header / sidecar
        scans.append(_load(argparse.Namespace(**{**vars(args), "field": fields[k], "mask": args.mask[k],
                                                 "magnitude": pick(args.magnitude, k),
                                                 "noise_std": pick(args.noise_std, k)})))
    res = adapt_mod.adapt_cli(scans if n > 1 else scans[0], steps=args.steps, weights=args.weights,
                              save_weights=args.save_weights, params=parse_cli_params(args.param), device=args.device,
                              progress=_progress(args.quiet))
    results = res if n > 1 else [res]
    written = [save_result(r, o, scan=sc, inputs=inputs) for r, o, sc in zip(results, outs, scans)]
    saved = f" and adapted weights -> {args.save_weights}" if args.save_weights else ""
    print(f"{results[0].name}: {results[0].seconds:.2f} s on {results[0].device} -> {', '.join(map(str, written))}{saved}",
          file=sys.stderr)
    return 0


def cmd_metrics(args) -> int:
    from .core.io import b0_direction_in_file, direction_to_canonical, read_volume, voxel_sizes
    from .core.metrics import compute_metrics

    x, xaff, _ = read_volume(args.recon, "recon")
    mask, maff, _ = read_volume(args.mask, "mask")
    if mask.shape != x.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match recon shape {x.shape}")
    ref = None
    if args.reference:
        ref, _, _ = read_volume(args.reference, "reference")
        if ref.shape != x.shape:
            raise ValueError(f"reference: shape {ref.shape} does not match recon shape {x.shape}")
    field = vs = b0 = None
    if args.field:
        from .core.io import read_sidecar
        field, faff, finfo = read_volume(args.field, "field")
        if field.shape != x.shape:
            raise ValueError(f"field: shape {field.shape} does not match recon shape {x.shape}")
        vs = voxel_sizes(faff)
        orig = finfo["original_affine"]
        b_file, _ = b0_direction_in_file(orig, read_sidecar(args.field, "field"), args.b0_dir, "field")
        b0 = direction_to_canonical(b_file, orig)
    if ref is None and field is None:
        raise ValueError("metrics: give a REFERENCE χ map and/or --field for the field-consistency residual")
    vals = compute_metrics(x, ref, mask > 0.5, field=field, voxel_size=vs, b0_direction=b0)
    if args.json:
        print(json.dumps(vals))
    else:
        from .core.metrics import METRIC_INFO
        for k, v in vals.items():
            unit = METRIC_INFO.get(k, ("", ""))[1]
            print(f"{k:18s} {v:10.4f} {unit}")
    return 0


def cmd_phantom(args) -> int:
    from .core.sim.phantom import CLINICAL, RESEARCH, make_phantom, oblique_direction, save_phantom

    preset = dict(CLINICAL if args.clinical else RESEARCH)
    if args.shape:
        preset["shape"] = tuple(args.shape)
    if args.voxel_size:
        preset["voxel_size"] = tuple(args.voxel_size)
    out = Path(args.outdir)
    if out.is_dir() and not args.overwrite:
        _refuse_existing(sorted(out.iterdir())[:3], False)
    out.mkdir(parents=True, exist_ok=True)
    shape = "x".join(map(str, preset["shape"]))
    if args.raw:
        from .core.sim.phantom import save_raw_bids

        with _ticking(f"simulating the {shape} head and its echoes (on a 2x finer grid)", args.quiet):
            ph = make_phantom(**preset, b0_direction=oblique_direction(args.oblique, "x"), seed=args.seed,
                              snr=50.0 if args.snr is None else args.snr, honest=True, background=True,
                              keep_echoes=True)
        with _ticking(f"writing BIDS MEGRE and the truth to {out}", args.quiet):
            paths = save_raw_bids(ph, out, phase_units=args.phase_units)
        paths = {k: v for k, v in paths.items() if not k.startswith("echo") or k.startswith("echo1_")}
    else:
        with _ticking(f"simulating the {shape} head", args.quiet):
            ph = make_phantom(**preset, b0_direction=oblique_direction(args.oblique, "x"), seed=args.seed,
                              snr=args.snr)
        paths = save_phantom(ph, out)
    for k, v in paths.items():
        print(f"{k:10s} {v}")
    return 0


@contextmanager
def _ticking(what: str, quiet: bool, every: float = 5.0):
    """Progress for work that reports none: ``what`` on stderr, then the seconds spent every ``every`` s."""
    if quiet:
        yield
        return
    import threading
    import time
    t0, stop = time.perf_counter(), threading.Event()
    print(f"napari-qsm: {what} ...", file=sys.stderr, flush=True)

    def tick():
        while not stop.wait(every):
            print(f"  {what}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    th = threading.Thread(target=tick, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
    print(f"  done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def cmd_methods(args) -> int:
    from .core.params import specs
    from .methods import available_methods, available_steps, import_errors

    def show(name, label, doc, params_cls):
        print(f"{name:8s} {label}: {doc}")
        for s in specs(params_cls):
            rng = ""
            if s.min is not None or s.max is not None:
                rng = f" [{s.min if s.min is not None else ''}..{s.max if s.max is not None else ''}]"
            if s.choices:
                rng = f" {{{', '.join(map(str, s.choices))}}}"
            allow = f" or {'/'.join(s.allow)}" if s.allow else ""
            print(f"    --param {s.name}={s.default!s:<8}{rng}{allow}  {s.doc}")

    for m in available_methods():
        show(m.name, m.label, m.doc, m.params_cls)
    steps = available_steps()
    if steps:
        print("\nSteps from raw echoes to a local field (napari-qsm field) and the maps made beside it (napari-qsm swi):")
        for st in steps:
            show(f"{st.family}:{st.name}", st.label + (" (default)" if st.default else ""), st.doc, st.params_cls)
    for where, err in import_errors().items():
        print(f"napari-qsm: warning: {where} could not be loaded: {err}", file=sys.stderr)
    return 0


def cmd_field(args) -> int:
    from .core.params import parse_cli_params
    from .pipeline import field_folder_paths, make_recipe, write_field_folder

    _refuse_existing(field_folder_paths(args.output).values(), args.overwrite)
    recipe = make_recipe({"fit": args.fit, "mask": args.mask_method, "unwrap": args.unwrap,
                          "background": args.background}, parse_cli_params(args.param))
    from .cli_recon import raw_field
    echoes, run = raw_field(args, args.inputs, recipe, _progress(args.quiet))
    write_field_folder(run, echoes, args.output)
    steps = ", ".join(f"{s['label']} {s['seconds']:.1f} s" for s in run.steps)
    print(run.total.report, file=sys.stderr)   # phase units (why), B0, TE, noise σ (source)
    print(f"local field: {steps} -> {args.output}", file=sys.stderr)
    return 0


BATCH_EPILOG = """inputs per sub-*/[ses-*/]anat: *_echo-N_part-mag|phase_MEGRE.nii.gz with JSON sidecars, or
  <prefix>_localfield.nii.gz (ppm) + <prefix>_mask.nii.gz [+ _magnitude, _noisestd, _R2starmap].
outputs: BIDS_ROOT/derivatives/napari-qsm/sub-*/[ses-*/]anat/<prefix>_desc-<method>_Chimap.nii.gz, the local
  field, mask, magnitude, total field, N_std, R2* (from raw echoes), a JSON sidecar each, batch_summary.tsv.
  A rerun skips scans that are up to date (same input sha256 and settings). Exit status 1 if any scan failed.
cluster: start workers with dask-jobqueue (SLURMCluster / PBSCluster) or `dask scheduler` + `dask worker`,
  then --scheduler tcp://HOST:8786. See napari_qsm.batch."""


def cmd_batch(args) -> int:
    from .batch import run_batch
    from .core.params import parse_cli_params
    if args.scheduler and (args.workers or args.memory_limit or args.threads_per_worker != 1):
        raise ValueError("--scheduler: --workers, --threads-per-worker and --memory-limit configure a local cluster; "
                         "set them where the cluster's workers are started")
    s = run_batch(args.root, method=args.method, params=parse_cli_params(args.param),
                  field_params=parse_cli_params(args.field_param), weights=args.weights, scheduler=args.scheduler,
                  workers=args.workers, threads_per_worker=args.threads_per_worker, memory_limit=args.memory_limit,
                  only=[x for x in args.only.split(",") if x.strip()] if args.only else None, dry_run=args.dry_run,
                  overwrite=args.overwrite, device=args.device, adapt_protocol=args.adapt_protocol, dicom=args.dicom,
                  adapt_params=parse_cli_params(args.adapt_param) or None, echo=not args.quiet)
    return 0 if s.ok else 1


#: the docks `napari-qsm view` opens, by their display names in napari.yaml
VIEW_DOCKS = ("QSM reconstruction", "Adapt network (QSMInvNet+)", "Compare", "Field")


def open_viewer(files=(), sample="phantom_1mm", show=True):
    """A napari viewer with the plugin's docks and the given files (or a sample); returns it."""
    try:
        import napari
    except ImportError:
        raise RuntimeError("napari is not installed; install the plugin with its viewer: "
                           "pip install 'napari-qsm[napari]'") from None
    viewer = napari.Viewer(title="napari-qsm", show=show)
    if files:
        for f in files:
            viewer.open(str(f), plugin="napari-qsm")
    else:
        viewer.open_sample("napari-qsm", sample)
    for name in VIEW_DOCKS:
        viewer.window.add_plugin_dock_widget("napari-qsm", name)
    return viewer


def cmd_view(args) -> int:
    import napari

    for f in args.files:
        if not Path(f).exists():
            raise FileNotFoundError(f"{f}: no such file")
    open_viewer(args.files, args.sample)
    napari.run()
    return 0


def cmd_demo(args) -> int:
    from .demo import OUTPUTS, run_demo
    _refuse_existing([Path(args.outdir) / n for n in OUTPUTS], args.overwrite)
    run_demo(args.outdir, size=args.size, snr=args.snr, device=args.device, methods=args.methods, full=args.full)
    return 0


COMMANDS = {"recon": cmd_recon, "adapt": cmd_adapt, "metrics": cmd_metrics, "phantom": cmd_phantom,
            "methods": cmd_methods, "demo": cmd_demo, "view": cmd_view,
            "field": cmd_field, "batch": cmd_batch}
from .cli_clinic import COMMANDS as _CLINIC_COMMANDS  # noqa: E402
COMMANDS.update(_CLINIC_COMMANDS)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the command's own lines (not 'file:line: UserWarning: ...')."""
    print(f"napari-qsm: warning: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    from .core.progress import Cancelled

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the default display afterwards (in-process callers)
            warnings.showwarning = _show_warning
            return COMMANDS[args.cmd](args)
    except Cancelled:
        print("napari-qsm: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("napari-qsm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"napari-qsm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
