"""Weak-harmonic MEDI on the bench_field cache: Gauss-Newton / CG history and NRMSE per variant (issue 24).

    nice -n 10 python benchmarks/medi_wh_diag.py --cache DIR --head phantom:slab --source lbv/raw \
        --variants '' weak_harmonic=true weak_harmonic=true,cg_max_iter=300

DIR is a ``bench_field.py`` cache with the head's chain run (run_*.pkl, truth_*.pkl, local_*.npz). Each variant is
a comma-separated list of MEDI parameters (``--param`` syntax; '' = the registry's defaults). Prints, per variant,
the demeaned NRMSE % over the generator's brain (as bench_field.py scores χ), the GN steps, the CG iterations of
each step, the last stop ratio, the RMS of the fitted harmonic field φ (ppm), its correlation with what the local
field has that the true local field has not (local − true local over the field's mask ∩ the brain; φ models it)
and CPU seconds (1 thread).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True)
    ap.add_argument("--head", default="phantom:slab", help="GENERATOR:CASE as named in the cache (phantom-s1:slab)")
    ap.add_argument("--source", default="lbv/raw", help="truth or KEY/raw|true (a local field in the cache)")
    ap.add_argument("--variants", nargs="+", default=["", "weak_harmonic=true"])
    a = ap.parse_args(argv)
    import torch
    import bench_field as B
    from napari_qsm.core import metrics as M
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    torch.set_num_threads(1)
    sys.modules["__main__"].Truth = B.Truth       # bench_field.py (run as a script) pickles its heads as __main__.Truth
    gen, case = a.head.split(":")
    cache = B.Cache(Path(a.cache), readonly=True)
    t = cache.truth(case, gen)
    with open(cache.dir / f"run_{gen}_{case}.pkl", "rb") as f:
        tot = pickle.load(f)[0]
    if a.source == "truth":
        field, mask = (t.local * t.brain).astype(np.float32), t.brain
    else:
        d = np.load(cache.dir / f"local_{gen}_{case}_{a.source.replace('/', '_')}.npz")
        field, mask = d["local"], d["mask"]
    common = dict(voxel_size=tot.voxel_size, b0_direction=tot.b0_direction, magnitude=tot.magnitude,
                  noise_std=tot.noise_std, r2star=tot.r2star, affine=tot.affine, te=float(tot.delta_te),
                  b0_tesla=tot.b0_tesla)                 # the scan bench_field.py's chi_one builds
    scan = Scan(field=field, mask=mask, name=a.source, **common)
    for v in a.variants:
        params = dict(kv.split("=", 1) for kv in v.split(",") if kv)
        c0 = time.process_time()
        res = reconstruct(scan, "medi", params, device="cpu")
        cpu = time.process_time() - c0
        chi = np.where(mask, res.chi, 0).astype(np.float32)
        e = res.extras
        rms = e.get("harmonic", {}).get("harmonic_rms_ppm", 0.0)
        corr = ""
        if "harmonic_field" in e and a.source != "truth":
            region = mask & t.brain                      # the part of the true local field this local field lacks
            extra = (field - t.local)[region]
            corr = (f", corr(φ, local − true local) {np.corrcoef(e['harmonic_field'][region], extra)[0, 1]:.2f}"
                    f" (rms of the difference {np.sqrt(np.mean(extra * extra)):.4f} ppm)")
        print(f"{a.head} {a.source} [{v or 'defaults'}]: NRMSE {M.nrmse_demeaned(chi, t.chi, t.brain):.1f} %, "
              f"GN {e['gn_iterations']}, CG {e['cg_iterations']}, last ratio {e['norm_ratio'][-1]:.3g}, "
              f"φ rms {rms:.4f} ppm{corr}, {cpu:.0f} CPU s", flush=True)


if __name__ == "__main__":
    main()
