"""LBV's time and memory on the scan's grid and on thin nodes (issue 24, session 12).

    python benchmarks/lbv_cost.py --cache DIR [--heads phantom:slab phantom:head1mm] > docs/benchmarks/lbv_cost.md

``DIR`` is a ``bench_field.py`` cache (``run_GEN_CASE.pkl``: the default chain's total field and brain mask). Each
LBV call in a fresh subprocess, one thread: wall seconds, and peak memory above the inputs (tracemalloc: numpy and
scipy arrays are traced). For scale: the sparse Laplacian alone takes 7 × 12 bytes per interior node (float64
values, int32 columns), 0.08 KB, × the nodes per voxel.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(cache: str, head: str, refine: str) -> None:
    import pickle
    import time
    import tracemalloc

    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_field as B

    from napari_qsm.core.field.lbv import LBVParams, lbv, refine_factors

    B.open_cache(cache)
    gen, case = head.split(":")
    with open(Path(cache) / f"run_{gen}_{case}.pkl", "rb") as f:
        tot, brain, _ = pickle.load(f)
    m = brain.astype(bool)
    field = np.where(m, tot.field, 0).astype(np.float32)
    vs = tot.voxel_size
    del tot
    tracemalloc.start()
    t0 = time.perf_counter()
    _, out = lbv(field, m, LBVParams(refine=refine), voxel_size=vs)
    sec = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    fac = refine_factors(vs) if refine == "auto" else (1, 1, 1)
    print(json.dumps({"seconds": sec, "peak_mb": peak / 2 ** 20, "mask": int(m.sum()), "nodes": int(np.prod(fac)),
                      "returned": int(out.sum()), "shape": list(m.shape), "voxel_size": list(vs)}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--heads", nargs="+", default=["phantom:slab", "phantom:head1mm"])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.cache, *a.worker)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    print("# LBV's time and memory: the scan's grid against thin nodes\n")
    print(f"Made by `python benchmarks/lbv_cost.py --cache DIR --heads {' '.join(a.heads)}` (its docstring says how; "
          f"1 thread, load {os.getloadavg()[0]:.1f} at the start).\n")
    print("| head | grid | mask voxels | nodes per voxel | refine | seconds | peak MB above inputs | KB per mask voxel |")
    print("|---|---|---|---|---|---|---|---|")
    for head in a.heads:
        for refine in ("off", "auto"):
            out = subprocess.run([sys.executable, __file__, "--cache", a.cache, "--worker", head, refine],
                                 capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            grid = "×".join(map(str, r["shape"])) + " at " + "×".join(f"{v:g}" for v in r["voxel_size"]) + " mm"
            print(f"| {head} | {grid} | {r['mask']} | {r['nodes']} | {refine} | {r['seconds']:.1f} | "
                  f"{r['peak_mb']:.0f} | {r['peak_mb'] / r['mask'] * 1024:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
