"""Wall and CPU seconds of MEDI ``lambda=auto`` on the cached honest 1 mm head of bench_inversions.

    python benchmarks/bench_medi_auto.py THREADS [NPZ]

NPZ defaults to bench_inversions' cached seed-0 head
(/tmp/napari_qsm_bench_inversions/head_160x192x160_1mm_seed0_snr40.npz; run bench_inversions.py first).
Prints threads, wall, CPU seconds, demeaned NRMSE, the chosen λ and the load average.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT = "/tmp/napari_qsm_bench_inversions/head_160x192x160_1mm_seed0_snr40.npz"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    threads = int(argv[0]) if argv else 1
    npz = argv[1] if len(argv) > 1 else DEFAULT
    torch.set_num_threads(threads)
    from napari_qsm.core import metrics as M
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    z = np.load(npz)
    scan = Scan(field=z["field"], mask=z["mask"] > 0, magnitude=z["magnitude"], noise_std=z["noise_std"],
                voxel_size=tuple(z["voxel_size"]), b0_direction=tuple(z["b0"]), te=float(z["te"]),
                b0_tesla=float(z["b0_tesla"]))
    t, c = time.perf_counter(), time.process_time()
    r = reconstruct(scan, "medi", {"lambda": "auto"}, device="cpu")
    print("threads", threads, "wall", round(time.perf_counter() - t, 1), "cpu", round(time.process_time() - c, 1),
          "nrmse", round(float(M.nrmse_demeaned(r.chi, z["chi"], z["mask"] > 0)), 2), "lambda", r.extras.get("lambda"),
          "load", os.getloadavg())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
