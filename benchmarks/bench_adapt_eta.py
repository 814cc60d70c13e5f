"""The adaptation's ETA against the time that actually remained (issue 23).

    python benchmarks/bench_adapt_eta.py [--steps 20] [--size demo|1mm] [--threads 1]

Adapts the shipped QSMInvNet+ to an honest phantom (the demo's 1.25 mm head, or the 1 mm research head)
with the default parameters except ``steps``, and prints after each listed step: the ETA the run printed
(:class:`napari_qsm.nn.adaptation.clock.AdaptClock`), the old ETA (mean step so far × steps left, the
formula before issue 23, recomputed from the same timestamps) and the wall time that actually remained
until ``adapt`` returned. Wall times: note the load average printed with them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", choices=("demo", "1mm"), default="demo")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from napari_qsm.core.scan import Scan
    from napari_qsm.core.sim.phantom import RESEARCH, make_phantom
    from napari_qsm.nn.adapt import adapt

    geo = dict(shape=(128, 152, 128), voxel_size=(1.25, 1.25, 1.25)) if args.size == "demo" else dict(RESEARCH)
    scan = Scan.from_phantom(make_phantom(**geo, seed=1, snr=40.0, honest=True, device="cpu"))
    seen = []
    t_start = time.perf_counter()
    adapt(scan, {"steps": args.steps}, device="cpu", progress=lambda p: seen.append((time.perf_counter(), p)))
    t_end = time.perf_counter()
    steps = [(t, p) for t, p in seen if p.message.startswith("step")]
    print(f"{args.size} head {geo['shape']}, {args.steps} steps, {args.threads} thread(s); load "
          f"{os.getloadavg()[0]:.1f}; whole run {t_end - t_start:.1f} s")
    print("step | ETA printed (s) | old ETA (s) | remained (s) | printed / remained | old / remained")
    first = steps[0][0] if steps else t_start
    for t, p in steps:
        k = p.step
        if k not in (1, 2, 3, 5, 10, args.steps // 2, args.steps - 1, args.steps):
            continue
        rem = t_end - t
        eta = p.losses["eta_s"]
        # the old formula: (now − loop start) / steps done × steps left; the loop start is unknown here,
        # so step 1's time stands for it (the mean over steps 2..k, the same as the new per-step mean)
        old = (t - first) / max(k - 1, 1) * (args.steps - k) if k > 1 else float("nan")
        print(f"{k:4d} | {eta:15.1f} | {old:11.1f} | {rem:12.1f} | {eta / rem:18.2f} | {old / rem:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
