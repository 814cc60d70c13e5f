"""The fine-grid dipole convolution of the raw 1 mm phantom: one padded rfftn (before issue 23) against
:func:`napari_qsm.core.dipole.convolve_padded` (one axis at a time). CPU seconds and peak memory.

    python benchmarks/bench_head_field.py [--shape 320 384 320]

Each variant runs in its own process (1 torch thread): CPU seconds (time.process_time), the growth of
the peak RSS during the call (Linux: /proc/self/clear_refs resets the peak), the ratio to one FFT pair
(rfftn + irfftn) of the padded grid timed in the same process, and the max abs difference between the
two fields. The source is the phantom's: a head-sized ellipsoid of χ = −9.41 ppm relative to air that
leaves the field of view through the bottom face (the neck continuation is on).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from napari_qsm.core.dipole import convolve_padded, fast_shape, kernel_slabs
shape, variant, out = tuple(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3]
vs, b0 = (0.5, 0.5, 0.5), (0.0, 0.1736, 0.9848)
g = np.meshgrid(*[(np.arange(n) - n / 2) / (n / 2) for n in shape], indexing="ij", sparse=True)
src = np.where(g[0] ** 2 / 0.8 + g[1] ** 2 / 0.9 + (g[2] - 0.3) ** 2 / 1.8 < 1, np.float32(-9.41), np.float32(0))
P = fast_shape(shape, 2.0)
ext = min(160, (P[2] - shape[2]) // 2)

def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024

def old():
    x = torch.zeros(P, dtype=torch.float32)
    x[:shape[0], :shape[1], :shape[2]] = torch.from_numpy(src)
    x[:shape[0], :shape[1], P[2] - ext:] = x[:shape[0], :shape[1], 0:1]
    X = torch.fft.rfftn(x, dim=(0, 1, 2))
    del x
    for i0, i1, d in kernel_slabs(P, vs, b0, device="cpu"):
        X[i0:i1] *= d
    y = torch.fft.irfftn(X, s=P, dim=(0, 1, 2))
    del X
    return y[:shape[0], :shape[1], :shape[2]].numpy().copy()

def new():
    return convolve_padded(src, P, vs, b0, device="cpu", extend_last=ext)

with torch.no_grad():
    open("/proc/self/clear_refs", "w").write("5")
    base = rss("VmRSS")
    t0 = time.process_time()
    y = old() if variant == "old" else new()
    cpu = time.process_time() - t0
    peak = rss("VmHWM") - base
    np.save(out, y)
    del y
    x = torch.zeros(P, dtype=torch.float32)
    t0 = time.process_time()
    torch.fft.irfftn(torch.fft.rfftn(x), s=P)
    pair = time.process_time() - t0
print(json.dumps({"variant": variant, "cpu_s": round(cpu, 2), "peak_growth_gb": round(peak / 1e9, 3),
                  "fft_pair_cpu_s": round(pair, 2), "fft_pairs": round(cpu / pair, 2), "padded": list(P)}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(320, 384, 320), help="fine grid (1 mm head: 320 384 320)")
    args = ap.parse_args(argv)
    rows, ys = [], {}
    for v in ("old", "new"):
        out = f"/tmp/bench_head_field_{v}.npy"
        r = subprocess.run([sys.executable, "-c", WORKER, json.dumps(list(args.shape)), v, out],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        ys[v] = np.load(out)
    d = float(np.abs(ys["old"] - ys["new"]).max())
    print(f"fine grid {tuple(args.shape)}, padded {tuple(rows[0]['padded'])}; load {open('/proc/loadavg').read().split()[0]}")
    for r in rows:
        print(f"{r['variant']:4s} CPU {r['cpu_s']:7.2f} s = {r['fft_pairs']:5.2f} FFT pairs "
              f"(pair {r['fft_pair_cpu_s']:.2f} s); peak growth {r['peak_growth_gb']:.2f} GB")
    print(f"max |old − new| = {d:.3g} ppm (max |field| {float(np.abs(ys['old']).max()):.3g} ppm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
