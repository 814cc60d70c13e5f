"""The through-origin refit next to a receive-phase singularity (a vortex of a coil combination), issue 24.

    python benchmarks/refit_vortex.py

The small two-compartment scene of tests/core/field/test_refit.py (a wrapping field, a curved receive phase, a
block of two-compartment voxels, 7 echoes from 12.6 ms), with and without a phase vortex arctan2(j − 5.3, i − 17.7)
added to every echo (a singularity of the receive phase, as a poor coil combination leaves). The chain's total field
(whole-FOV mask) with ``refit`` origin (default) and none; error against the true field (ppm, median removed): rms
within 3 voxels of the vortex's core, rms elsewhere outside the two-compartment block, and the block's mean bias.
Prints a Markdown table.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "core" / "field"))


def main() -> int:
    import test_refit as T
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field

    ech, f, pv = T._scene()
    i, j, _ = np.meshgrid(*[np.arange(n, dtype=float) for n in f.shape], indexing="ij")
    vortex = np.arctan2(j - 5.3, i - 17.7)
    core = (i - 17.7) ** 2 + (j - 5.3) ** 2 < 9
    with_vortex = dataclasses.replace(ech, phase=np.angle(np.exp(1j * (ech.phase + vortex[..., None]))).astype(np.float32))
    print("| receive phase | refit | error near the core (ppm rms) | elsewhere (ppm rms) | two-compartment bias (ppm) |")
    print("|---|---|---|---|---|")
    for name, e in (("smooth", ech), ("with a vortex", with_vortex)):
        for refit in ("origin", "none"):
            run = local_field(e, FieldRecipe(params={"fit": {"refit": refit}}), mask=np.ones(f.shape, bool),
                              device="cpu")
            err = T._err(run.total.field, f)
            print(f"| {name} | {refit} | {np.sqrt(np.mean(err[core] ** 2)):.4f} | "
                  f"{np.sqrt(np.mean(err[~core & ~pv] ** 2)):.4f} | {float(err[pv].mean()):+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
