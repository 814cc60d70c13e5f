"""LBV's dropped boundary layer given to MEDI at data weight 0, on bench_field's heads (issue 24).

    nice -n 10 python benchmarks/lbv_layer.py --cache DIR [--heads phantom:slab shapes:slab ...] > docs/benchmarks/lbv_layer.md

``DIR`` is a ``bench_field.py`` cache that holds, per head, the default chain's run (``run_GEN_CASE.pkl``: the total
field and the chain's brain mask) and LBV's local field of it (``local_GEN_CASE_lbv_raw.npz``: the local field and
the mask LBV returns, without its one-voxel Dirichlet layer); make it with
``bench_field.py --cases C --generator G --seed S --background lbv --medi 1 --cache DIR``.

Per head, MEDI with the residual background φ (``weak_harmonic=on``, the default for chain fields), demeaned NRMSE %
over the generator's brain (voxels a variant does not return count as error, χ = 0 there):

* *default*: on LBV's returned mask, as the chain gives it today;
* *layer weight 0*: on the chain's brain mask, with LBV's dropped layer in it at data weight 0 (N_std infinite
  there): χ in the layer comes from the regulariser and from the dipole field it must explain inside;
* the same two on the true local field's side are not needed: the layer carries no data in either.

Seed 0 heads choose, seed 1 heads report (bench_field's convention); ``lbv_coverage.py`` measured the same variant
on bench_adapt's tilted heads.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

HEADS = ["phantom:head1mm", "phantom:slab", "shapes:slab", "phantom-s1:slab", "shapes-s1:slab"]


def layer_scan(scan, brain_mask, local_mask):
    """``scan`` on the chain's brain mask with LBV's dropped layer at data weight 0 (N_std infinite there)."""
    layer = brain_mask & ~local_mask
    s = copy.copy(scan)
    s.mask = brain_mask
    s.noise_std = np.where(layer, np.inf, scan.noise_std).astype(np.float32)
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--heads", nargs="+", default=HEADS, metavar="GEN:CASE")
    ap.add_argument("--key", default="lbv", help="bench_field's background row whose local field is used: lbv (its "
                    "default, thin nodes since session 12) or lbvgrid (LBV on the scan's grid, as this table was run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from bench_field import open_cache

    from napari_qsm.core import metrics as M
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    cache = open_cache(args.cache)

    def medi_wh(scan):
        t0 = time.perf_counter()
        x = reconstruct(scan, "medi", {"weak_harmonic": "on"}, device="cpu").chi * scan.mask
        return x, time.perf_counter() - t0

    print("# LBV's boundary layer at data weight 0 in MEDI, on bench_field's heads\n")
    print(f"Made by `nice -n 10 python benchmarks/lbv_layer.py --cache DIR --heads {' '.join(args.heads)}` on a "
          "bench_field cache with the session-11 refit (its docstring says what each column is). MEDI with φ "
          "(`weak_harmonic=on`), demeaned NRMSE % over the generator's brain; seed 0 chooses, seed 1 reports.\n")
    print("| head | brain in the chain's brain mask | brain in LBV's returned mask | MEDI-WH default | "
          "layer weight 0: all / covered | seconds default / layer |")
    print("|---|---|---|---|---|---|")
    for h in args.heads:
        gen, case = h.split(":")
        with open(cache.dir / f"run_{gen}_{case}.pkl", "rb") as f:
            tot, brain_mask, _ = pickle.load(f)
        t = cache.truth(case, gen)
        d = np.load(cache.dir / f"local_{gen}_{case}_{args.key}_raw.npz")
        em = d["mask"].astype(bool)
        bm = brain_mask.astype(bool)
        common = dict(voxel_size=tot.voxel_size, b0_direction=tot.b0_direction, magnitude=tot.magnitude,
                      noise_std=tot.noise_std, r2star=tot.r2star, affine=tot.affine, te=float(tot.delta_te),
                      b0_tesla=tot.b0_tesla)
        scan = Scan(field=d["local"], mask=em, name="lbv/raw", **common)
        x, s0 = medi_wh(scan)
        x0, s1 = medi_wh(layer_scan(scan, bm, em))
        brain = t.brain.astype(bool)

        def cov(a):
            return f"{(a & brain).sum() / brain.sum():.3f}"

        cells = [cov(bm), cov(em), f"{M.nrmse_demeaned(x, t.chi, brain):.1f}",
                 f"{M.nrmse_demeaned(x0, t.chi, brain):.1f} / {M.nrmse_demeaned(x0, t.chi, brain & em):.1f}",
                 f"{s0:.0f} / {s1:.0f}"]
        print(f"| {gen} {case} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
