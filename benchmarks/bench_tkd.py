"""TKD speed and memory against the physical limit: one forward+inverse real FFT pair of the padded volume.

    python benchmarks/bench_tkd.py [--shape 256 256 160] [--repeats 3]

Each measurement runs in a fresh subprocess so that peak memory (ru_maxrss) belongs to it alone.
Writes docs/benchmarks/tkd.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, resource, sys, time
import numpy as np, torch
from napari_qsm.core.dipole import fast_shape, pad_volume
from napari_qsm.core.inversion.tkd import truncated_inversion
shape = tuple(json.loads(sys.argv[2])); reps = int(sys.argv[3]); what = sys.argv[1]
rng = np.random.default_rng(0)
field = (rng.standard_normal(shape) * 0.02).astype(np.float32)
mask = np.ones(shape, bool)
pshape = fast_shape(shape, 2.0)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for r in range(reps + 1):
    t0 = time.perf_counter()
    if what == "fft":
        with torch.no_grad():
            x = pad_volume(torch.from_numpy(field), pshape)
            X = torch.fft.rfftn(x)
            y = torch.fft.irfftn(X, s=pshape)
            out = y[: shape[0], : shape[1], : shape[2]].numpy().copy()
    else:
        out, _ = truncated_inversion(field, mask, (1, 1, 1), (0, 0, 1), 0.15, what, False, 2.0, torch.device("cpu"))
    if r:  # first run warms up
        times.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"what": what, "median": sorted(times)[len(times) // 2], "min": min(times),
                  "peak_mb": peak / 1024, "base_mb": base / 1024, "padded": pshape, "threads": torch.get_num_threads()}))
'''


def child(what, shape, reps):
    out = subprocess.run([sys.executable, "-c", CHILD, what, json.dumps(shape), str(reps)], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cli_time(shape):
    """Wall time of `napari-qsm recon --method tkd` on NIfTI files, interpreter start and imports included."""
    import nibabel as nib
    import numpy as np
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        nib.save(nib.Nifti1Image((rng.standard_normal(shape) * 0.02).astype(np.float32), np.eye(4)), f"{d}/f.nii.gz")
        nib.save(nib.Nifti1Image(np.ones(shape, np.uint8), np.eye(4)), f"{d}/m.nii.gz")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "napari_qsm.cli", "recon", f"{d}/f.nii.gz", "--mask", f"{d}/m.nii.gz",
                        "--method", "tkd", "-q", "-o", f"{d}/chi.nii.gz"], check=True, cwd=ROOT)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import napari_qsm.cli, napari_qsm.core.io, napari_qsm.core.inversion.tkd"],
                       check=True, cwd=ROOT)
        imports = time.perf_counter() - t0
    return total, imports


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs=3, type=int, default=[256, 256, 160])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = list(args.shape)
    fft = child("fft", shape, args.repeats)
    tkd = child("tkd", shape, args.repeats)
    tsvd = child("tsvd", shape, args.repeats)
    total, imports = cli_time(shape)
    lines = [
        "# TKD benchmark",
        "",
        f"Volume {shape[0]}×{shape[1]}×{shape[2]}, padded to {fft['padded'][0]}×{fft['padded'][1]}×{fft['padded'][2]} "
        f"(2×, fast FFT sizes); CPU, {fft['threads']} torch threads; {platform.processor() or platform.machine()}; "
        f"median of {args.repeats} runs after one warm-up, each kind in its own process.",
        "",
        "| what | seconds | × FFT pair | peak memory (MB) |",
        "|---|---|---|---|",
    ]
    for r, name in ((fft, "one rfftn + irfftn pair of the padded volume (limit)"), (tkd, "TKD (δ = 0.15)"),
                    (tsvd, "TSVD (δ = 0.15)")):
        lines.append(f"| {name} | {r['median']:.3f} | {r['median'] / fft['median']:.2f} | {r['peak_mb']:.0f} |")
    lines += ["", f"`napari-qsm recon --method tkd` on NIfTI files, total wall time including interpreter start, "
              f"imports, gzip read and write: **{total:.2f} s** (of which bare imports {imports:.2f} s).", "",
              "Regenerate: `python benchmarks/bench_tkd.py`", ""]
    out = ROOT / "docs" / "benchmarks" / "tkd.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
