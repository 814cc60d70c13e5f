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
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.core.sim.shapes import make_head
    from napari_qsm.methods import reconstruct

    print("# The through-origin refit on tissue-only crops, 3 echoes at TE 4/8/12 ms\n")
    print(f"Made by `nice -n 10 python benchmarks/crop_refit.py --seeds {' '.join(map(str, args.seeds))}` (its "
          "docstring says how). Never used for a choice.\n")
    print("| seed | coils | crop (voxels) | refit | brain in mask | total field error (ppm) | local field % | "
          "MEDI χ % |")
    print("|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        for coils in (None, 8):
            h = make_head((128, 150, 120), (1.2, 1.2, 1.2), seed=seed, te=(0.004, 0.008, 0.012), snr=40.0,
                          n_coils=coils, crop=True)
            echoes, brain = h.to_echoes(), h.brain_mask.astype(bool)
            for refit in ("origin", "none"):
                run = local_field(echoes, FieldRecipe(background="lbv", params={"fit": {"refit": refit}}),
                                  device="cpu")
                s = run.scan
                m = s.mask.astype(bool)
                both = run.brain_mask.astype(bool) & brain
                err = (run.total.field - h.total_field)[both]
                err -= np.median(err)
                chi = reconstruct(s, "medi", {}, device="cpu").chi * m
                print(f"| {seed} | {coils or 1} | {'×'.join(map(str, brain.shape))} | {refit} | "
                      f"{both.sum() / brain.sum():.3f} | {np.sqrt(np.mean(err ** 2)):.4f} | "
                      f"{M.nrmse_demeaned(s.field, h.local_field, brain & m):.1f} | "
                      f"{M.nrmse_demeaned(chi, h.chi, brain):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
