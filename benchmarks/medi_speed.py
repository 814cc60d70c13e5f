"""MEDI speed on the honest 1 mm head (issue 25): default and lambda=auto, before and after, as ratios to one FFT pair.

Run through ``bench_medi.py``::

    nice -n 10 python benchmarks/bench_medi.py --speed after --threads 1
    nice -n 10 python benchmarks/bench_medi.py --speed before --code /tmp/before --threads 1   # another checkout
    nice -n 10 python benchmarks/bench_medi.py --speed after --speed-runs default             # only λ = 1000

Every run is its own process (``--code`` on its PYTHONPATH, ``--threads`` torch threads), so its peak memory
(VmHWM) is its own. The process times one FFT pair of the padded volume, rfftn + irfftn of a real tensor of the
FFT grid MEDI reports, 7 times before and 7 times after the MEDI run, and keeps the fastest (the one the other
jobs on the machine disturbed least). Results go to speed.json in the cache, χ to speed_<label>_<run>_<threads>t.npy,
and every stored label is tabulated in docs/benchmarks/medi_speed.md with the χ difference to the label given by
``--speed-reference`` (default "before").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RUNS = {"default": 1000.0, "auto": "auto"}
NOTES = "## Findings"

WORKER = r"""
import json, os, sys, time
import numpy as np, torch
torch.set_num_threads({threads})
from napari_qsm.core.inversion.medi import medi_l1

def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return float(line.split()[1]) / 1024

def pair(pshape, n=7):
    x = torch.randn(pshape)
    out = []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        torch.fft.irfftn(torch.fft.rfftn(x), s=pshape)
        out.append((time.perf_counter() - t, time.process_time() - c))
    return out

d = np.load({npz!r})
kw = dict(magnitude=d['mag'], noise_std=d['noise'], b0_tesla=float(d['b0t']), lam={lam!r}, device='cpu', return_info=True)
_, probe = medi_l1(d['field'], d['mask'], (1, 1, 1), d['b0d'], **{{**kw, 'lam': 1000.0, 'max_iter': 1, 'cg_max_iter': 1}})
pshape = tuple(probe['fft_shape'])
pairs = pair(pshape)
base = hwm()
load0 = os.getloadavg()[0]
t, c = time.perf_counter(), time.process_time()
chi, info = medi_l1(d['field'], d['mask'], (1, 1, 1), d['b0d'], **kw)
sec, cpu = time.perf_counter() - t, time.process_time() - c
load1 = os.getloadavg()[0]
peak = hwm()
pairs += pair(pshape)
np.save({chi_path!r}, chi)
h = info['history']
search = info.get('lambda_search')
cg = sum(h['cg_iters'])
if search:
    cg = sum(t['cg_iters'] for t in search['tried']) + search.get('final', {{}}).get('cg_iters', 0)
print(json.dumps({{'seconds': sec, 'cpu_seconds': cpu, 'fft_pair': min(p[0] for p in pairs),
                  'fft_pair_cpu': min(p[1] for p in pairs), 'fft_shape': list(pshape), 'cg': cg,
                  'gn': h['gn_iters'], 'lambda': info['lambda'], 'peak_mb': peak, 'inputs_mb': base,
                  'load': [load0, load1], 'threads': torch.get_num_threads(), 'search': search}}, default=float))
"""


def head_npz(cache: Path) -> Path:
    npz = cache / "speed_head_1mm.npz"
    if not npz.exists():
        from napari_qsm.core.sim.phantom import make_phantom

        ph = make_phantom((160, 192, 160), (1.0, 1.0, 1.0), seed=0, snr=40, honest=True, device="cpu")
        np.savez(npz, field=ph.field, mask=ph.mask, mag=ph.magnitude, noise=ph.noise_std, chi=ph.chi,
                 b0t=ph.b0_tesla, b0d=np.asarray(ph.b0_direction))
    return npz


def run_one(npz: Path, cache: Path, code: Path, label: str, run: str, threads: int) -> dict:
    chi_path = cache / f"speed_{label}_{run}_{threads}t.npy"
    code_txt = WORKER.format(threads=threads, npz=str(npz), lam=RUNS[run], chi_path=str(chi_path))
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run([sys.executable, "-c", code_txt], capture_output=True, text=True, env=env, cwd=str(code))
    if out.returncode:
        raise RuntimeError(out.stderr)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["code"] = str(code)
    r["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return r


def speed(args, root: Path, log) -> None:
    """Run the requested speed runs under ``args.speed`` and rewrite medi_speed.md from every stored label."""
    from napari_qsm.core import metrics as M

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    npz = head_npz(cache)
    path = cache / "speed.json"
    allruns = json.loads(path.read_text()) if path.exists() else {}
    code = Path(args.code).resolve() if args.code else root
    for run in [r for r in args.speed_runs.split(",") if r != "none"]:   # none: only rewrite the table
        log("speed", args.speed, run, f"{args.threads} threads", code)
        r = run_one(npz, cache, code, args.speed, run, args.threads)
        allruns = json.loads(path.read_text()) if path.exists() else {}
        allruns.setdefault(args.speed, {})[f"{run} {args.threads}t"] = r
        path.write_text(json.dumps(allruns, indent=1))
        log("speed", args.speed, run, f"{r['seconds']:.0f} s wall, {r['cpu_seconds']:.0f} s CPU, {r['cg']} CG")
    d = np.load(npz)
    md = Path(args.out, "medi_speed.md")
    md.parent.mkdir(parents=True, exist_ok=True)
    notes = ""   # the hand-written findings below the table are kept
    if md.exists() and NOTES in md.read_text():
        notes = NOTES + md.read_text().split(NOTES, 1)[1]
    md.write_text(table(allruns, d, cache, args.speed_reference, M) + ("\n" + notes if notes else ""))


def table(allruns: dict, d, cache: Path, ref_label: str, M) -> str:
    mask = d["mask"].astype(bool)
    # the fastest single-thread FFT pair (CPU) of any run: about its idle wall time
    idle = min((r["fft_pair_cpu"] for runs in allruns.values() for r in runs.values() if r["threads"] == 1),
               default=float("nan"))
    rows = []
    for label, runs in allruns.items():
        for key, r in sorted(runs.items()):
            run, thr = key.split()
            chi = np.load(cache / f"speed_{label}_{run}_{thr}.npy")
            ref_path = cache / f"speed_{ref_label}_{run}_{thr}.npy"
            nrmse = M.nrmse_demeaned(chi, d["chi"], mask)
            if ref_path.exists() and label != ref_label:
                ref = np.load(ref_path)
                diff = (chi - ref)[mask]
                dcell = (f"{M.nrmse_demeaned(ref, d['chi'], mask):.2f} → {nrmse:.2f} | "
                         f"{np.abs(diff).max():.2g} / {np.sqrt(np.mean(diff ** 2)):.2g}")
            else:
                dcell = f"{nrmse:.2f} | –"
            ratio = r["cpu_seconds"] / r["fft_pair_cpu"]
            rows.append(f"| {label} | {run} | {r['threads']} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
                        f"{r['fft_pair'] * 1e3:.0f} / {r['fft_pair_cpu'] * 1e3:.0f} | "
                        f"{r['seconds'] / r['fft_pair']:.0f} | {ratio:.0f} | "
                        f"{f'**{ratio * idle:.0f}**' if r['threads'] == 1 else '–'} | "
                        f"{r['gn']} | {r['cg']} | {r['lambda']:.0f} | {dcell} | {r['peak_mb']:.0f} | "
                        f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    shape = next(iter(next(iter(allruns.values())).values()))["fft_shape"]
    lines = [
        "# MEDI speed on the 1 mm head", "",
        "Honest 1 mm head `make_phantom((160, 192, 160), (1, 1, 1), seed=0, snr=40, honest=True)`, `medi_l1` with the "
        "scan's noise map and magnitude, CPU, each run its own process. MEDI crops to the mask's bounding box + 4 "
        f"voxels (140×156×137) and runs its FFTs on {'×'.join(map(str, shape))}.", "",
        "* **FFT pair**: rfftn + irfftn of a real tensor of that FFT grid, timed 14 times in the same process (7 before, "
        "7 after the run); the fastest is kept, wall / CPU ms. The ratios divide the run's wall (CPU) seconds by it: "
        "the portable figure, since the pair and the run slow down together when the machine is shared.",
        "* **idle est. s** = CPU ratio × the fastest single-thread FFT pair (CPU) of any run "
        f"({idle * 1e3:.0f} ms): the wall time of the run on one thread of this CPU with nobody else on it, hence an "
        "upper bound for two threads (given for the single-thread runs). The machine was never idle during these runs (load column: 1-min average "
        "before / after the run, on 2 cores), so the wall seconds are upper bounds that mean little.",
        f"* **NRMSE**: demeaned, % inside the mask, vs the truth; for a label other than `{ref_label}` it is given as "
        f"`{ref_label}` → this label, and Δχ is the max / rms |χ − χ_{ref_label}| in ppm inside the mask.",
        "* CG counts every CG iteration, those of the UPRE traces and of the final from-zero solve included.", "",
        "| code | run | threads | wall s | CPU s | FFT pair ms (wall / CPU) | × FFT pair (wall) | × FFT pair (CPU) | "
        "idle est. s | GN | CG | λ | NRMSE % | max / rms Δχ ppm | peak MB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    lines += ["", "Regenerate: `nice -n 10 python benchmarks/bench_medi.py --speed LABEL [--code DIR] [--threads N] "
                  "[--speed-runs default,auto]` (one label per checkout; `before` = a `git archive` of the commit "
                  "before the change on `--code`).", ""]
    return "\n".join(lines)
