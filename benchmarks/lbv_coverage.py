"""Where the brain goes missing on bench_adapt's tilted heads: the mask step or LBV's boundary (issue 24).

    nice -n 10 python benchmarks/lbv_coverage.py [--cases 0 1 2] > docs/benchmarks/lbv_coverage.md

The heads are ``bench_adapt.make_case(i, pipeline="lbv")``'s (clinical slabs 192×224×48 at 0.75×0.75×3 mm,
7 echoes, B0 tilted 10–20°, in air with skull and sinuses; see ``peel_by_method.py``). For each, the default
chain (fit, mask, unwrap, LBV peel 0) once; the coverage (fraction of the phantom's brain) of the chain's
brain mask and of the mask LBV returns (its Dirichlet boundary layer is dropped: local field 0 there), then
MEDI with the residual background φ (``weak_harmonic=on``, the default for chain fields), demeaned NRMSE %
over the whole brain (dropped voxels count as error, χ = 0 there):

* *default*: as the user gets it;
* *covered only*: the same χ scored on the brain voxels LBV returns;
* *oracle fill*: the dropped brain voxels given the true χ (plus the mean offset): what the dropped layer
  costs at most;
* *nearest fill*: the dropped voxels given the nearest returned voxel's χ (a naive extrapolation);
* *layer weight 0*: MEDI-WH on the whole brain mask with LBV's dropped layer in it at data weight 0
  (N_std infinite there): χ in the layer from the regulariser and the dipole field it must explain inside;
* *LBV on the mask dilated by one voxel*: the chain run with its own brain mask dilated by one voxel
  (6-connected) as the user mask, so that LBV's boundary layer lies outside the brain mask and the returned
  mask is about the brain mask; its boundary values are then the partial-volume voxels around the brain.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lbv-refine", default="off", choices=("off", "auto"),
                    help="LBV's refine: off (the scan's grid, as the committed tables were made, before session 12) "
                    "or auto (thin nodes, the default since; lbv_refine.md has those numbers)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from scipy import ndimage

    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.methods import reconstruct
    from peel_by_method import case_echoes

    def medi_wh(scan):
        return reconstruct(scan, "medi", {"weak_harmonic": "on"}, device="cpu").chi * scan.mask

    print("# Brain coverage on the tilted heads: mask step against LBV's boundary layer\n")
    print(f"Made by `nice -n 10 python benchmarks/lbv_coverage.py --cases {' '.join(map(str, args.cases))} "
          f"--lbv-refine {args.lbv_refine}` "
          "(its docstring says what each column is). MEDI with φ (`weak_harmonic=on`), demeaned NRMSE % over the "
          "phantom's brain.\n")
    print("| case | brain in the chain's brain mask | brain in LBV's returned mask | MEDI-WH default | covered only "
          "| oracle fill | nearest fill | layer weight 0: all / covered | LBV on the mask dilated by 1 voxel: coverage / MEDI-WH |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in args.cases:
        t0 = time.time()
        echoes, ph, chi = case_echoes(i)
        brain = ph.mask.astype(bool)
        recipe = FieldRecipe(background="lbv", params={"background": {"refine": args.lbv_refine}})
        run = local_field(echoes, recipe, device="cpu")
        m = run.scan.mask.astype(bool)
        x = medi_wh(run.scan)
        offset = x[m & brain].mean() - chi[m & brain].mean()
        idx = ndimage.distance_transform_edt(~m, return_distances=False, return_indices=True)
        layer = run.brain_mask.astype(bool) & ~m
        s0 = copy.copy(run.scan)
        s0.mask = run.brain_mask.astype(bool)
        s0.noise_std = np.where(layer, np.inf, run.scan.noise_std).astype(np.float32)
        x0 = medi_wh(s0)
        dil = local_field(echoes, recipe, mask=ndimage.binary_dilation(run.brain_mask),
                          device="cpu")
        md = dil.scan.mask.astype(bool)
        xd = medi_wh(dil.scan)

        def cov(a):
            return f"{(a & brain).sum() / brain.sum():.3f}"

        cells = [cov(run.brain_mask.astype(bool)), cov(m), f"{M.nrmse_demeaned(x, chi, brain):.1f}",
                 f"{M.nrmse_demeaned(x, chi, brain & m):.1f}",
                 f"{M.nrmse_demeaned(np.where(m, x, chi + offset), chi, brain):.1f}",
                 f"{M.nrmse_demeaned(np.where(m, x, x[tuple(idx)]), chi, brain):.1f}",
                 f"{M.nrmse_demeaned(x0, chi, brain):.1f} / {M.nrmse_demeaned(x0, chi, brain & m):.1f}",
                 f"{cov(md)} / {M.nrmse_demeaned(xd, chi, brain):.1f}"]
        print(f"| {i} | " + " | ".join(cells) + " |", flush=True)
        print(f"  case {i}: {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
