"""Every inversion on the honest 1 mm head: demeaned NRMSE, HFEN, XSIM, seconds, peak memory.

Writes docs/benchmarks/inversions.md and inversions.json.

    nice -n 10 python benchmarks/bench_inversions.py               # 1 mm 160×192×160, SNR 40, seed 0 (reported)
    nice -n 10 python benchmarks/bench_inversions.py --select      # + TV λ sweep on the selection head (seed 1)
    nice -n 10 python benchmarks/bench_inversions.py --quick       # 2 mm 80×96×80

Each method runs in its own process (`--worker`) through the registry (`napari_qsm.methods.reconstruct`,
default parameters, reference = mean of the mask), so seconds are the method's own wall time and the
peak memory is that process's VmHWM minus its size after loading the inputs. Results are cached in
--cache; delete it to start afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_qsm.core import metrics as M  # noqa: E402

METHODS = ("tkd", "tsvd", "tv", "rts", "hdqsm", "whqsm", "ndi", "ilsqr", "medi", "dsbn")
#: table rows that are a registered method with other parameters
ROWS = {"whqsm": ("hdqsm", {"weak_harmonic": True})}
TV_LAMBDAS = (5e-5, 1e-4, 2e-4, 4e-4)
#: other defaults checked on the selection head (method, parameters); the first of each method is its default
SELECT_VARIANTS = (("ilsqr", {}), ("ilsqr", {"weighting": "laplacian"}), ("ilsqr", {"weighting": "both"}),
                   ("ilsqr", {"weighting": "mask"}), ("ilsqr", {"weighting": "laplacian", "threshold": 0.1}),
                   ("hdqsm", {}), ("whqsm", {}), ("whqsm", {"beta": 1500.0, "mu_h": 30.0}))


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def phantom_npz(cache: Path, shape, vs, seed, snr) -> Path:
    p = cache / f"head_{'x'.join(map(str, shape))}_{vs[0]:g}mm_seed{seed}_snr{snr:g}.npz"
    if not p.exists():
        from napari_qsm.core.sim.phantom import make_phantom
        log("phantom", p.name)
        ph = make_phantom(shape, vs, seed=seed, snr=snr, honest=True)
        tmp = p.with_suffix(".tmp.npz")
        np.savez(tmp, field=ph.field, mask=ph.mask, chi=ph.chi, magnitude=ph.magnitude, noise_std=ph.noise_std,
                 voxel_size=np.asarray(ph.voxel_size), b0=np.asarray(ph.b0_direction), te=ph.te, b0_tesla=ph.b0_tesla)
        os.replace(tmp, p)
    return p


def worker(npz: str, method: str, params: str, out: str, threads: int) -> None:
    """Run one method in this process; print JSON (seconds, peak MB, baseline MB)."""
    import torch

    torch.set_num_threads(threads)
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
        return float("nan")

    d = np.load(npz)
    scan = Scan(field=d["field"], mask=d["mask"], voxel_size=tuple(d["voxel_size"]), b0_direction=d["b0"],
                magnitude=d["magnitude"], noise_std=d["noise_std"], te=float(d["te"]), b0_tesla=float(d["b0_tesla"]))
    base = hwm()
    fft_pair = _fft_pair_seconds(scan.shape)
    fft_pair_cpu = _fft_pair_seconds(scan.shape, clock=time.process_time)
    cpu0 = time.process_time()
    res = reconstruct(scan, method, json.loads(params), device="cpu")
    cpu = time.process_time() - cpu0
    np.save(out, res.chi)
    extras = {k: v for k, v in res.extras.items() if isinstance(v, (int, float, str))}
    print(json.dumps({"seconds": res.seconds, "cpu_seconds": cpu, "fft_pair_s": fft_pair, "fft_pair_cpu_s": fft_pair_cpu, "peak_mb": hwm() - base, "base_mb": base, "extras": extras,
                      "load": os.getloadavg()[0]}))


def _fft_pair_seconds(shape, reps=3, clock=time.perf_counter) -> float:
    """Fastest of ``reps`` rfftn + irfftn pairs of the scan's volume at a fast FFT size (the machine's speed now),
    by ``clock`` (wall time, or time.process_time for CPU seconds over all threads)."""
    import torch

    from napari_qsm.core.dipole import fast_shape

    x = torch.randn(fast_shape(shape, 1.0))
    best = float("inf")
    for _ in range(reps):
        t = clock()
        torch.fft.irfftn(torch.fft.rfftn(x), s=x.shape)
        best = min(best, clock() - t)
    return best


def run(npz: Path, cache: Path, method: str, params: dict, threads: int) -> dict:
    if method in ROWS:
        method, params = ROWS[method][0], {**ROWS[method][1], **params}
    key = method + "".join(f"_{k}{v}" for k, v in sorted(params.items()))
    meta, chi_p = cache / f"{npz.stem}_{key}.json", cache / f"{npz.stem}_{key}.npy"
    if not meta.exists():
        load0 = os.getloadavg()[0]
        log("run", method, params)
        out = subprocess.run([sys.executable, __file__, "--worker", str(npz), method, json.dumps(params), str(chi_p),
                              str(threads)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["load_before"] = load0
        meta.write_text(json.dumps(r))
    r = json.loads(meta.read_text())
    r.setdefault("measured", time.strftime("%Y-%m-%d %H:%M", time.gmtime(meta.stat().st_mtime)))
    r["chi"] = np.load(chi_p)
    return r


def scores(chi, truth, mask) -> dict:
    ref = np.where(mask, truth - truth[mask].mean(), 0.0).astype(np.float32)   # the truth referenced like the methods
    return {"nrmse": M.nrmse_demeaned(chi, truth, mask), "hfen": M.hfen(chi, truth, mask),
            "xsim": M.xsim(chi, ref, mask), "mean": float(chi[mask].mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=5, metavar=("NPZ", "METHOD", "PARAMS", "OUT", "THREADS"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--select", action="store_true", help="TV λ sweep on the selection head (seed 1)")
    ap.add_argument("--select-only", nargs="*", default=None, metavar="METHOD",
                    help="run only these methods' SELECT_VARIANTS on the selection head (no TV sweep, no report)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snr", type=float, default=40.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/napari_qsm_bench_inversions")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = ap.parse_args(argv)
    if args.worker:
        npz, method, params, out, threads = args.worker
        return worker(npz, method, params, out, int(threads))
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    shape, vs = ((80, 96, 80), (2.0,) * 3) if args.quick else ((160, 192, 160), (1.0,) * 3)
    sel, variants = {}, {}
    if args.select or args.select_only is not None:
        npz_s = phantom_npz(cache, shape, vs, 1, args.snr)
        d = np.load(npz_s)
        for m, prm in SELECT_VARIANTS:
            if args.select_only and m not in args.select_only:
                continue
            r = run(npz_s, cache, m, prm, args.threads)
            key = m + "".join(f" {k}={v}" for k, v in prm.items())
            variants[key] = {**scores(r["chi"], d["chi"], d["mask"]), "seconds": r["seconds"],
                             "fft_pairs": r["seconds"] / r["fft_pair_s"]}
            log("select", key, variants[key])
        if args.select_only is not None:
            (cache / "select_variants.json").write_text(json.dumps(variants, indent=1))
            return
    if args.select:
        npz_s = phantom_npz(cache, shape, vs, 1, args.snr)
        d = np.load(npz_s)
        for lam in TV_LAMBDAS:
            r = run(npz_s, cache, "tv", {"lambda": lam, "rho": 100 * lam}, args.threads)
            sel[lam] = {**scores(r["chi"], d["chi"], d["mask"]), "seconds": r["seconds"]}
            log("select tv", lam, sel[lam])
    npz = phantom_npz(cache, shape, vs, args.seed, args.snr)
    d = np.load(npz)
    rows = {}
    for m in args.methods:
        r = run(npz, cache, m, {}, args.threads)
        rows[m] = {**scores(r["chi"], d["chi"], d["mask"]),
                   **{k: r.get(k, float("nan")) for k in ("seconds", "cpu_seconds", "peak_mb", "load", "load_before",
                                                          "fft_pair_s", "fft_pair_cpu_s")}, "measured": r["measured"], "extras": r["extras"]}
        log(m, {k: v for k, v in rows[m].items() if k != "extras"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inversions.json").write_text(json.dumps({"rows": rows, "select": {str(k): v for k, v in sel.items()},
                                                     "select_variants": variants}, indent=1, default=float))
    write_md(out / "inversions.md", rows, sel, shape, vs, args, d, variants)


def write_md(path, rows, sel, shape, vs, args, d, variants=None):
    cpu = platform.processor() or platform.machine()
    L = ["# Inversions on the honest head", "",
         f"Phantom: `make_phantom({shape}, {vs}, seed={args.seed}, snr={args.snr:g}, honest=True)` (the same honest "
         "simulation as medi.md: χ and field on a 2x finer grid, multi-echo complex GRE averaged per voxel with noise, "
         "field and N_std fitted from the echoes, magnitude edges only partly matching χ). Mask voxels: "
         f"{int(d['mask'].sum())}.",
         "Every method through `napari_qsm.methods.reconstruct` with its default parameters and the default χ "
         "reference (mean of the mask = 0), each in its own process with "
         f"{args.threads} torch threads on {os.cpu_count()} cores ({cpu}); the machine was shared with other jobs: "
         "the load average before and during each run is given. Metrics (QSM-CI definitions, "
         "`napari_qsm.core.metrics`): demeaned NRMSE, HFEN (LoG σ 1.5), XSIM (uniform 5³ windows) against the truth "
         "referenced to its own mask mean. FFT pairs: seconds divided by the time of one rfftn + irfftn pair of "
         "the 160×192×160 volume measured in the same process just before the run (the method's cost in units "
         "that carry over to other machines and loads). Peak memory: VmHWM of the run minus the process after loading inputs.",
         "", f"Regenerate: `nice -n 10 python benchmarks/bench_inversions.py{' --quick' if args.quick else ''} --select`", "",
         "CPU s: process time of the run (both threads; recorded since 2026-12-06 08:20, – before); CPU FFT pairs: CPU s "
         "divided by the CPU time of one FFT pair measured the same way (robust to the load, unlike the wall-time "
         "ratio, since waiting for a core costs no CPU time). Measured: when the "
         "row's run finished (UTC; rows are cached, so one table can hold runs from different sessions and loads).", "",
         "| method | demeaned NRMSE % | HFEN % | XSIM | seconds | CPU s | FFT pairs | CPU FFT pairs | peak MB | load | "
         "measured | notes |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in sorted(rows.items(), key=lambda t: t[1]["nrmse"]):
        ex = r["extras"]
        note = ", ".join(f"{k}={ex[k]:.3g}" if isinstance(ex[k], float) else f"{k}={ex[k]}"
                         for k in ("iterations", "lambda", "rho_final", "weak_harmonic") if k in ex)
        cpu = "–" if not np.isfinite(r["cpu_seconds"]) else f"{r['cpu_seconds']:.0f}"
        cpu_pairs = "–" if not np.isfinite(r["fft_pair_cpu_s"]) else f"{r['cpu_seconds'] / r['fft_pair_cpu_s']:.0f}"
        L.append(f"| {m} | {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['xsim']:.3f} | {r['seconds']:.1f} | {cpu} | "
                 f"{r['seconds'] / r['fft_pair_s']:.0f} | {cpu_pairs} | {r['peak_mb']:.0f} | {r['load_before']:.1f}/{r['load']:.1f} | "
                 f"{r['measured']} | {note} |")
    if sel:
        L += ["", f"## TV λ chosen on a selection head (seed 1, not the reported seed {args.seed})", "",
              "| λ (ρ = 100λ) | demeaned NRMSE % | HFEN % | XSIM | seconds |", "|---|---|---|---|---|"]
        for lam, r in sel.items():
            L.append(f"| {lam:g} | {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['xsim']:.3f} | {r['seconds']:.1f} |")
    if variants:
        L += ["", f"## Other defaults checked on the selection head (seed 1, not the reported seed {args.seed})", "",
              "| method, parameters (first row of each method = its default) | demeaned NRMSE % | HFEN % | XSIM |",
              "|---|---|---|---|"]
        for key, r in variants.items():
            L.append(f"| {key} | {r['nrmse']:.1f} | {r['hfen']:.1f} | {r['xsim']:.3f} |")
    path.write_text("\n".join(L) + "\n")
    log("wrote", path)


if __name__ == "__main__":
    main()
