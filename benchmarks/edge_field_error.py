"""The chain's raw total field at the brain mask's edge voxels against its interior (issue 24, thick slabs).

    python benchmarks/edge_field_error.py --cache DIR > docs/benchmarks/edge_field_error.md

``DIR`` is a ``bench_field.py`` cache holding ``run_GEN_slab.pkl`` (the default chain's total field, N_std and brain
mask) and ``local_GEN_slab_lbvgrid_raw.npz`` (LBV on the scan's grid: its returned mask). *Edge voxels*: the chain's
brain mask minus that returned mask (LBV's Dirichlet layer on the scan's grid: the voxels thin nodes give back);
*interior*: the returned mask. Error: the chain's total field minus the generator's true total field, its median over
the brain mask removed (ppm). Columns: rms error; median |error| / N_std (how far the chain's noise map is from the
error); the true local field's rms in the same voxels (the signal there). *edge ∩ brain* keeps the generator's brain
voxels only; *edge, not brain* is the rest of the edge (CSF, skull, the mask's margin), and the part of it in the FOV's first slice.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--heads", nargs="+", default=["phantom", "shapes", "phantom-s1", "shapes-s1"])
    args = ap.parse_args(argv)
    import bench_field as B

    cache = B.open_cache(args.cache)
    print("# The raw total field at the brain mask's edge voxels (0.75×0.75×3 mm slabs)\n")
    print(f"Made by `python benchmarks/edge_field_error.py --cache DIR --heads {' '.join(args.heads)}` (its docstring "
          "says what each column is).\n")
    print("| head | region | voxels | rms error (ppm) | median abs error / N_std | true local field rms (ppm) |")
    print("|---|---|---|---|---|---|")
    for gen in args.heads:
        with open(cache.dir / f"run_{gen}_slab.pkl", "rb") as f:
            tot, brain_mask, _ = pickle.load(f)
        t = cache.truth("slab", gen)
        bm, br = brain_mask.astype(bool), t.brain.astype(bool)
        inner = np.load(cache.dir / f"local_{gen}_slab_lbvgrid_raw.npz")["mask"].astype(bool)
        err = tot.field - t.total
        err -= np.median(err[bm])
        edge = bm & ~inner
        z0 = np.zeros(bm.shape, bool)
        z0[:, :, 0] = True                                            # the FOV's first slice
        for name, sel in (("interior", inner), ("edge", edge), ("edge ∩ brain", edge & br),
                          ("edge, not brain", edge & ~br), ("edge, not brain, FOV slice 0", edge & ~br & z0)):
            e = err[sel]
            if not sel.any():
                continue
            loc = f"{np.sqrt(np.mean(t.local[sel] ** 2)):.4f}" if "not brain" not in name else "(not brain)"
            print(f"| {gen} | {name} | {int(sel.sum())} | {np.sqrt(np.mean(e ** 2)):.4f} | "
                  f"{np.median(np.abs(e) / tot.noise_std[sel]):.2f} | {loc} |", flush=True)
    print("\nReading (session 12's run): in the brain's edge voxels the phantom's raw total field is off by 0.021–0.022 "
          "ppm rms, more than the local field there (0.016–0.018), where the shapes head's is off by 0.009–0.012 "
          "(local 0.019–0.021): the phantom's brain sits on sinuses and mastoids. N_std underestimates the edge's "
          "error 3.2–3.4× (0.8–1.6× inside), so MEDI weighs those voxels as if they were interior ones.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
