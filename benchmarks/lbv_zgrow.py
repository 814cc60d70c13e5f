"""LBV's boundary moved one slice beyond the brain mask's top and bottom, from raw echoes (issue 24).

    nice -n 10 python benchmarks/lbv_zgrow.py --cache DIR [--heads phantom shapes phantom-s1 shapes-s1]

On the 3 mm slab, LBV's Dirichlet layer (local field 0, dropped from the returned mask) is a 3 mm slice of the
brain's top and bottom. ``slab_chi.md`` found that LBV of the TRUE total field on the chain's mask grown by one
slice in z gains MEDI-WH 4.8 / 8.2 points (phantom / shapes, seed 0). This asks whether the same works from the
raw echoes: the default chain (fit, refit, mask, unwrap, LBV) once as the user gets it, and once with its own
brain mask grown by one voxel along z (the user-mask path: unwrapped and LBV on the grown mask, so the layer
lies in the new slice, whose voxels are partial-volume with CSF, bone or air). MEDI with the weak-harmonic term,
demeaned NRMSE % over the generator's brain (dropped voxels count as error) and the coverage. The heads are
bench_field.py's slab heads read from its cache (``truth_{head}_slab.pkl``; bench_field makes them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="bench_field.py's cache (its slab heads)")
    ap.add_argument("--heads", nargs="+", default=["phantom", "shapes", "phantom-s1", "shapes-s1"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from scipy import ndimage

    import bench_field as B
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.methods import reconstruct

    sys.modules["__main__"].Truth = B.Truth          # the cache's pickles name bench_field's Truth
    z = np.zeros((3, 3, 3), bool)
    z[1, 1, :] = True
    print("| head | default: coverage / MEDI-WH | mask grown one slice in z: coverage / MEDI-WH |")
    print("|---|---|---|")
    for head in args.heads:
        t = B.Cache(Path(args.cache)).truth("slab", head)
        base = local_field(t.echoes, FieldRecipe(background="lbv"), device="cpu")
        grown = ndimage.binary_dilation(base.brain_mask, z) | base.brain_mask
        cells = []
        for run in (base, local_field(t.echoes, FieldRecipe(background="lbv"), mask=grown, device="cpu")):
            s = run.scan
            m = s.mask.astype(bool)
            x = reconstruct(s, "medi", {"weak_harmonic": "on"}, device="cpu").chi * m
            cells.append(f"{(m & t.brain).sum() / t.brain.sum():.3f} / {M.nrmse_demeaned(x, t.chi, t.brain):.1f}")
        print(f"| {head} slab | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
