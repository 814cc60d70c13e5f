"""The refit's offset smoothing σ against the total field's error in the brain (issue 24, selection heads).

    nice -n 10 python benchmarks/refit_sigma.py --cache DIR [--heads phantom shapes] [--sigmas 1.5 2.5 5 10]

The default chain's total field (fit with ``refit="origin"`` and ``refit_sigma_mm`` σ, mask, unwrap; the refit is
applied after unwrapping, see core/field/refit.py) against the generator's true total field: rms error (ppm) over
the generator's brain ∩ the chain's mask, after removing its median there. Heads: bench_field.py's seed-0 slab heads
from its cache (``truth_{head}_slab.pkl``), the selection heads on which σ was chosen. Prints a Markdown table.
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
    ap.add_argument("--cache", required=True)
    ap.add_argument("--heads", nargs="+", default=["phantom", "shapes"])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.5, 2.5, 5.0, 10.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import bench_field as B
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field

    sys.modules["__main__"].Truth = B.Truth          # the cache's pickles name bench_field's Truth
    print("| head | " + " | ".join(f"σ {s:g} mm" for s in args.sigmas) + " | refit none |")
    print("|---|" + "---|" * (len(args.sigmas) + 1))
    for head in args.heads:
        t = B.Cache(Path(args.cache)).truth("slab", head)
        cells = []
        for fit in [{"refit_sigma_mm": s} for s in args.sigmas] + [{"refit": "none"}]:
            run = local_field(t.echoes, FieldRecipe(background="lbv", params={"fit": fit}), device="cpu")
            m = run.brain_mask.astype(bool) & t.brain
            err = run.total.field - t.total
            err = err[m] - np.median(err[m])
            cells.append(f"{np.sqrt(np.mean(err ** 2)):.4f}")
        print(f"| {head} slab | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
