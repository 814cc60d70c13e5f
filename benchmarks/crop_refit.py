"""The through-origin refit on tissue-only crops with three short echoes (issue 24, the real in vivo crop's class).

    nice -n 10 python benchmarks/crop_refit.py [--seeds 0 1] > docs/benchmarks/crop_refit.md

Heads: ``core/sim/shapes.make_head(..., crop=True)`` — a box inside the brain of the independent shapes head, tissue
everywhere (no air in the field of view, a vein crossing its bottom face), 1.2 mm isotropic (a 128×150×120 head
FOV), 3 echoes at TE 4 / 8 / 12 ms, 3 T, SNR 40, one channel (Rician) or 8 coils (root-sum-of-squares magnitude,
non-central χ noise). This class (no air, few short echoes, a scanner's coil combination) was never used to choose
the refit or its σ (chosen on bench_field's slab heads, 7 echoes from 12.6 ms). Default chain (fit, mask, unwrap,
LBV) with the fit's ``refit`` = origin (the default) or none (the chain before), then MEDI with its defaults
(weak-harmonic auto: on). Columns: the chain mask's coverage of the crop's brain; rms error (ppm) of the total field
against the generator's true total field in the brain ∩ mask (median removed); demeaned NRMSE % of the local field
over the brain voxels LBV returns; demeaned NRMSE % of MEDI's χ over the brain (dropped voxels count as error).
``--voxel-size`` and ``--lbv-refine`` (session 12) run the same crops on thick slices with LBV on thin nodes or on
the scan's grid; the table before them (1.2 mm, refine has no effect on cubic voxels) is unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--voxel-size", type=float, nargs=3, default=[1.2, 1.2, 1.2], metavar="MM",
                    help="the head's voxel size; the FOV stays 153.6×180×144 mm (e.g. 0.8 0.8 1.6: thick slices)")
    ap.add_argument("--refits", nargs="+", default=["origin", "none"], choices=("origin", "none"))
    ap.add_argument("--lbv-refine", nargs="+", default=["auto"], choices=("auto", "off"),
                    help="LBV's refine (thin nodes on thick slices; the scan's grid with off)")
    args = ap.parse_args(argv)
    vs = tuple(args.voxel_size)
    shape = tuple(int(round(f / v)) for f, v in zip((153.6, 180.0, 144.0), vs))
    torch.set_num_threads(2)
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.core.sim.shapes import make_head
    from napari_qsm.methods import reconstruct

    print("# The through-origin refit on tissue-only crops, 3 echoes at TE 4/8/12 ms\n")
    print(f"Made by `nice -n 10 python benchmarks/crop_refit.py --seeds {' '.join(map(str, args.seeds))} "
          f"--voxel-size {' '.join(f'{v:g}' for v in vs)} --refits {' '.join(args.refits)} --lbv-refine "
          f"{' '.join(args.lbv_refine)}` (its docstring says how). Never used for a choice.\n")
    print("| seed | coils | crop (voxels) | refit | LBV refine | brain in mask | brain LBV returns | total field error "
          "(ppm) | local field % | MEDI χ % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for coils in (None, 8):
            h = make_head(shape, vs, seed=seed, te=(0.004, 0.008, 0.012), snr=40.0,
                          n_coils=coils, crop=True)
            echoes, brain = h.to_echoes(), h.brain_mask.astype(bool)
            for refit in args.refits:
                for refine in args.lbv_refine:
                    run = local_field(echoes, FieldRecipe(background="lbv", params={
                        "fit": {"refit": refit}, "background": {"refine": refine}}), device="cpu")
                    s = run.scan
                    m = s.mask.astype(bool)
                    both = run.brain_mask.astype(bool) & brain
                    err = (run.total.field - h.total_field)[both]
                    err -= np.median(err)
                    chi = reconstruct(s, "medi", {}, device="cpu").chi * m
                    print(f"| {seed} | {coils or 1} | {'×'.join(map(str, brain.shape))} | {refit} | {refine} | "
                          f"{both.sum() / brain.sum():.3f} | {(m & brain).sum() / brain.sum():.3f} | "
                          f"{np.sqrt(np.mean(err ** 2)):.4f} | {M.nrmse_demeaned(s.field, h.local_field, brain & m):.1f} | "
                          f"{M.nrmse_demeaned(chi, h.chi, brain):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
