"""Front-end benchmark (issue 13): raw multi-echo GRE → total field → local field → χ.

Writes docs/benchmarks/field.md and field.json.

    nice -n 10 python benchmarks/bench_field.py                        # accuracy + timing, 1 mm head and clinical slab
    nice -n 10 python benchmarks/bench_field.py --part accuracy        # only the accuracy tables (1 torch thread)
    nice -n 10 python benchmarks/bench_field.py --part timing --threads 2
    nice -n 10 python benchmarks/bench_field.py --cases quick          # 2.5 mm head only (minutes)

Cases (honest raw phantoms, ``make_phantom(..., honest=True, background=True, keep_echoes=True,
shim_order=2)``, seed 0, SNR 50: the head in air with sinuses and mastoids, tissue −9.41 ppm
against air, 2nd-order shim, fields on a 2x finer grid, intra-voxel dephasing, receive phase,
complex noise):

* ``head1mm``: 160×192×160, 1 mm, 5 echoes (TE1 4 ms, ΔTE 4 ms), 3 T;
* ``slab``: 192×224×48, 0.75×0.75×3 mm, 7 echoes (TE1 12.6 ms, ΔTE 4.1 ms), 3 T (the QSMInvNet+
  paper's clinical protocol);
* ``quick``: 64×76×64, 2.5 mm, 5 echoes (the napari sample "raw_head").

Accuracy (1 torch thread): the default chain (linear fit with MCPC-3D-S, threshold mask on the
phase quality and the fit's misfit, quality-guided unwrapping) once, then every background method
on its total field and brain mask — what ``local_field(echoes, FieldRecipe(background=M))`` does.
Local-field NRMSE: QSM-CI's, demeaned, inside (the method's eroded mask ∩ the phantom's brain
mask), against the phantom's true local field (the voxel mean of the fine-grid field of the
brain's own χ relative to CSF, nothing outside the brain), demeaned in the same voxels. Next to it
the same method on the phantom's TRUE total field in the same brain mask (what background removal
alone costs). χ: inversions from the registry (``napari_qsm.methods.reconstruct``, default
parameters) on the pipeline's Scan and on a Scan holding the true local field in the true brain
mask (with the pipeline's magnitude and N_std); demeaned NRMSE and XSIM against the phantom's χ
inside (both raw chains' eroded masks ∩ the brain mask).

Timing: every step in its own subprocess (inputs saved by the accuracy part), wall and CPU
seconds, and the step's peak memory: the peak RSS (VmHWM, reset after the inputs are loaded by
writing 5 to /proc/self/clear_refs) minus the RSS with the inputs loaded; the whole default chain
end to end from the echoes too.

Intermediate results are cached in --cache (default /tmp/napari_qsm_bench_field); delete it to
start afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {
    "head1mm": dict(shape=(160, 192, 160), voxel_size=(1.0, 1.0, 1.0), protocol="research",
                    label="1 mm head, 160×192×160, 5 echoes (TE1 4 ms, ΔTE 4 ms)"),
    "slab": dict(shape=(192, 224, 48), voxel_size=(0.75, 0.75, 3.0), protocol="clinical",
                 label="clinical slab, 0.75×0.75×3 mm, 192×224×48, 7 echoes (TE1 12.6 ms, ΔTE 4.1 ms)"),
    "quick": dict(shape=(64, 76, 64), voxel_size=(2.5, 2.5, 2.5), protocol="research",
                  label="2.5 mm head, 64×76×64, 5 echoes (TE1 4 ms, ΔTE 4 ms)"),
}
BACKGROUND = [("vsharp", {}, "V-SHARP (12→1 mm, 0.05)"), ("resharp", {}, "RESHARP (6 mm, λ 1e-4)"),
              ("resharp", {"radius": 12.0}, "RESHARP (12 mm, λ 1e-4)"), ("pdf", {}, "PDF (30 it./grid, 2 coarse)"),
              ("lbv", {}, "LBV (tol 1e-6, peel 2)")]
INVERSIONS = ("tkd", "dsbn", "medi")
CHAINS = ("vsharp", "resharp")          # their eroded masks ∩ the brain mask = where χ is scored
EXTRA_CHAINS = ("lbv",)                 # scored in the same voxels (LBV's own peeled mask contains them)
TIMED_STEPS = [("fit", "linear"), ("fit", "nonlinear"), ("mask", "threshold"), ("unwrap", "quality"),
               ("unwrap", "laplacian"), ("background", "vsharp"), ("background", "resharp"), ("background", "pdf"),
               ("background", "lbv"), ("pipeline", "default")]
PEERS = {"QSM-CI local field (1 mm head)": "SHARP 36.3, V-SHARP 42.6 (9 s), LBV 42.4 (21 s), PDF 44.5 (263 s), "
                                           "tuned RESHARP (12 mm, 1e-4) 20.7 % NRMSE",
         "QSM-CI χ (1 mm head)": "TV on the true local field ~27 %; 48–58 after background removal; 68–77 from raw "
                                "phase (best pipeline 68.3 %)",
         "ROMEO": "31 echoes of 208×208×96 in 9 s; 9–33 s"}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _status_mb(key: str) -> float:
    """VmRSS / VmHWM of this process (MB) from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Reset the process's peak RSS (VmHWM) to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Cache:
    def __init__(self, folder: Path):
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)

    def json(self, key, fn):
        p = self.dir / f"{key}.json"
        if p.exists():
            return json.loads(p.read_text())
        out = fn()
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=float))
        os.replace(tmp, p)
        return out

    def phantom(self, case):
        p = self.dir / f"phantom_{case}.pkl"
        if p.exists():
            with open(p, "rb") as f:
                return pickle.load(f)
        from napari_qsm.core.sim.phantom import CLINICAL_ECHOES, RESEARCH_ECHOES, make_phantom
        c = CASES[case]
        log(f"{case}: making the phantom")
        ph = make_phantom(c["shape"], c["voxel_size"], seed=0, snr=50.0, honest=True, background=True,
                          keep_echoes=True, shim_order=2, device="cpu",
                          echo_protocol=CLINICAL_ECHOES if c["protocol"] == "clinical" else RESEARCH_ECHOES)
        tmp = p.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(ph, f, protocol=4)
        os.replace(tmp, p)
        return ph


def _nrmse(x, ref, m):
    from napari_qsm.core import metrics as M
    return float(M.nrmse_demeaned(x, ref, m))


# ------------------------------------------------------------------------------------------- accuracy
def accuracy(case, cache: Cache):
    import torch
    from napari_qsm.core.field.pipeline import FieldRecipe, find_step, local_field
    from napari_qsm.core.field.unwrap import residual_jumps
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    torch.set_num_threads(1)
    ph = cache.phantom(case)
    out = {"case": case, "label": CASES[case]["label"]}
    inputs = cache.dir / f"inputs_{case}.npz"
    log(f"{case}: default chain (fit, mask, unwrap, V-SHARP)")
    t0 = time.perf_counter()
    run = local_field(ph.to_echoes(), FieldRecipe(), device="cpu")
    out["default_chain_seconds"] = round(time.perf_counter() - t0, 2)
    out["default_chain_steps"] = {s["family"] + "/" + s["name"]: s["seconds"] for s in run.steps}
    tot, brain = run.total, run.brain_mask
    if not inputs.exists():
        from napari_qsm.core.field.fit import fit_linear
        wrapped = fit_linear(ph.to_echoes(), device="cpu")
        np.savez(inputs.with_suffix(".tmp.npz"), wrapped=wrapped.field, magnitude=tot.magnitude,
                 misfit=wrapped.misfit, noise_std=tot.noise_std, total=tot.field, brain=brain,
                 rad_per_ppm=tot.rad_per_ppm, voxel_size=np.array(tot.voxel_size),
                 b0_direction=np.asarray(tot.b0_direction))
        os.replace(inputs.with_suffix(".tmp.npz"), inputs)
    # total field against the truth
    per = tot.wrap_period_ppm
    err = tot.field - ph.true_total_field
    err -= np.median(err[brain])
    both = brain & ph.mask
    out["total_field"] = {
        "wrap_period_ppm": per,
        "two_pi_error_voxels_in_mask": int(np.count_nonzero(np.round(err / per)[brain])),
        "residual_face_jumps_in_mask": residual_jumps(tot.field * np.float32(tot.rad_per_ppm), brain),
        "median_abs_error_ppm": float(np.median(np.abs(err[brain]))),
        "rms_error_ppm": float(np.sqrt(np.mean(err[brain] ** 2))),
        "p99_abs_error_ppm": float(np.percentile(np.abs(err[brain]), 99)),
        "median_noise_std_ppm": float(np.median(tot.noise_std[brain])),
        "true_total_range_in_brain_ppm": [float(ph.true_total_field[ph.mask].min()),
                                          float(ph.true_total_field[ph.mask].max())],
        "mask_voxels": int(brain.sum()), "true_mask_voxels": int(ph.mask.sum()),
        "mask_dice": float(2 * both.sum() / (brain.sum() + ph.mask.sum())),
    }
    log(f"{case}: total field {out['total_field']}")
    # background methods
    rows = []
    for name, params, label in BACKGROUND:
        key = f"bg_{case}_{name}_{'_'.join(f'{k}{v:g}' for k, v in params.items()) or 'default'}"

        def one(name=name, params=params, label=label):
            s = find_step("background", name)
            p = FieldRecipe(background=name, params={"background": params}).record("background")
            kw = dict(voxel_size=tot.voxel_size, b0_direction=tot.b0_direction, noise_std=tot.noise_std, device="cpu")
            t = time.perf_counter()
            loc, em = s.run(tot.field, brain, p, **kw)
            sec = time.perf_counter() - t
            oracle, emo = s.run(ph.true_total_field * brain, brain, p, **kw)
            np.savez_compressed(cache.dir / f"local_{case}_{name}_{'_'.join(map(str, params.values())) or 'd'}.npz",
                                local=loc, mask=em)
            return {"method": name, "params": params, "label": label, "seconds": round(sec, 2),
                    "nrmse_raw": _nrmse(loc, ph.true_local_field, em & ph.mask),
                    "nrmse_true_total": _nrmse(oracle, ph.true_local_field, emo & ph.mask),
                    "eroded_voxels": int(em.sum())}
        r = cache.json(key, one)
        log(f"{case}: {label}: raw {r['nrmse_raw']:.1f} %, true total {r['nrmse_true_total']:.1f} %, {r['seconds']} s")
        rows.append(r)
    out["background"] = rows
    # χ
    d = {c: np.load(cache.dir / f"local_{case}_{c}_d.npz") for c in CHAINS + EXTRA_CHAINS}
    eval_mask = ph.mask.copy()
    for c in CHAINS:
        eval_mask &= d[c]["mask"]
    common = dict(voxel_size=tot.voxel_size, b0_direction=tot.b0_direction, magnitude=tot.magnitude,
                  noise_std=tot.noise_std, r2star=tot.r2star, affine=tot.affine, te=float(tot.delta_te),
                  b0_tesla=tot.b0_tesla)
    scans = {c: Scan(field=d[c]["local"], mask=d[c]["mask"], name=f"raw {c}", **common) for c in CHAINS + EXTRA_CHAINS}
    out["chi_eval_outside_lbv_mask"] = int((eval_mask & ~d["lbv"]["mask"]).sum())
    scans["truth"] = Scan(field=(ph.true_local_field * ph.mask).astype(np.float32), mask=ph.mask,
                          name="true local field", **common)
    from napari_qsm.core import metrics as M
    chi_rows = []
    for inv in INVERSIONS:
        for src in ("truth",) + CHAINS + EXTRA_CHAINS:
            key = f"chi_{case}_{inv}_{src}"

            def one(inv=inv, src=src):
                log(f"{case}: {inv} on {src}")
                t = time.perf_counter()
                try:
                    res = reconstruct(scans[src], inv, device="cpu")
                except Exception as e:  # noqa: BLE001 - recorded in the table
                    return {"inversion": inv, "source": src, "error": f"{type(e).__name__}: {e}"}
                sec = time.perf_counter() - t
                return {"inversion": inv, "source": src, "seconds": round(sec, 1), "title": res.title,
                        "nrmse": float(M.nrmse_demeaned(res.chi, ph.chi, eval_mask)),
                        "xsim": float(M.xsim(res.chi, ph.chi, eval_mask))}
            r = cache.json(key, one)
            log(f"{case}: χ {r}")
            chi_rows.append(r)
    out["chi"] = chi_rows
    out["chi_eval_voxels"] = int(eval_mask.sum())
    return out


# ------------------------------------------------------------------------------------------- timing
def worker(case, family, name, cache_dir, threads):
    """One step in this process; prints a JSON line with seconds and memory."""
    import torch
    torch.set_num_threads(int(threads))
    from napari_qsm.core.field.pipeline import find_step, local_field
    from napari_qsm.core.field.unwrap import voxel_quality

    d = dict(np.load(Path(cache_dir) / f"inputs_{case}.npz"))
    vs = tuple(float(v) for v in d["voxel_size"])
    b0 = d["b0_direction"]
    echoes = None
    if family in ("fit", "mask", "pipeline"):
        with open(Path(cache_dir) / f"phantom_{case}.pkl", "rb") as f:
            ph = pickle.load(f)
        echoes = ph.to_echoes()
        del ph
    import gc
    gc.collect()
    reset = _reset_peak()
    base = _status_mb("VmRSS")
    t, c = time.perf_counter(), time.process_time()
    if family == "pipeline":
        local_field(echoes, device="cpu")
    else:
        s = find_step(family, name)
        p = s.params_cls()
        if family == "fit":
            s.run(echoes, p, device="cpu")
        elif family == "mask":
            q = voxel_quality(echoes.phase[..., :2], echoes.magnitude[..., :2], echoes.te[:2])
            s.run(d["magnitude"], p, quality=q, voxel_size=vs, misfit=d["misfit"])
        elif family == "unwrap":
            s.run(d["wrapped"] * np.float32(d["rad_per_ppm"]), p, magnitude=d["magnitude"], mask=d["brain"],
                  voxel_size=vs, device="cpu")
        else:
            s.run(d["total"], d["brain"], p, voxel_size=vs, b0_direction=b0, noise_std=d["noise_std"], device="cpu")
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    peak = _status_mb("VmHWM") if reset else _maxrss_mb()
    print(json.dumps({"case": case, "step": f"{family}/{name}", "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                      "peak_rss_mb": round(_maxrss_mb()), "step_rss_mb": round(peak - base), "inputs_rss_mb": round(base),
                      "peak_reset": reset, "threads": int(threads)}))


def timing(case, cache: Cache, threads):
    rows = []
    for fam, name in TIMED_STEPS:
        key = f"time_{case}_{fam}_{name}_t{threads}"

        def one(fam=fam, name=name):
            log(f"{case}: timing {fam}/{name} ({threads} threads)")
            cmd = [sys.executable, __file__, "--worker", case, fam, name, "--cache", str(cache.dir),
                   "--threads", str(threads)]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                return {"step": f"{fam}/{name}", "error": r.stderr.strip().splitlines()[-1:]}
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["load_before"] = os.getloadavg()[0]
            return res
        r = cache.json(key, one)
        log(f"{case}: {r}")
        rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------- report
def _f(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def summary_table(results) -> list:
    """The headline table (also in the README): per case, 2π errors, local-field NRMSE per method, χ."""
    acc_all = results.get("accuracy", {})
    if not acc_all:
        return []
    L = ["## Summary", "",
         "Local-field NRMSE % (demeaned; from raw echoes / from the true total field), χ NRMSE % of MEDI "
         "(raw → V-SHARP → MEDI / raw → LBV → MEDI / MEDI on the true local field), default chain seconds (fit, "
         "mask, unwrap, V-SHARP; timing part).", "",
         "| case | 2π-error voxels | V-SHARP | RESHARP 6 mm | RESHARP 12 mm | PDF | LBV | MEDI χ | default chain s |",
         "|---|---|---|---|---|---|---|---|---|"]
    for case, acc in acc_all.items():
        bg = {(r["method"], r["params"].get("radius", 0)): r for r in acc["background"]}
        cell = lambda k: (f"{bg[k]['nrmse_raw']:.1f} / {bg[k]['nrmse_true_total']:.1f}" if k in bg else "")  # noqa: E731
        chi = {(r["inversion"], r["source"]): r for r in acc["chi"]}
        medi = " / ".join(f"{chi[('medi', k)]['nrmse']:.1f}" if "nrmse" in chi.get(("medi", k), {}) else "–"
                          for k in ("vsharp", "lbv", "truth"))
        t = {r.get("step"): r for r in results.get("timing", {}).get(case, [])}
        tp = t.get("pipeline/default", {})
        secs = f"{tp['seconds']:.0f} ({tp['threads']} threads)" if "seconds" in tp else ""
        L.append(f"| {acc['label']} | {acc['total_field']['two_pi_error_voxels_in_mask']} | {cell(('vsharp', 0))} | "
                 f"{cell(('resharp', 0))} | {cell(('resharp', 12.0))} | {cell(('pdf', 0))} | {cell(('lbv', 0))} | "
                 f"{medi} | {secs} |")
    return L


def write_report(results, path_md: Path, path_json: Path, cmdline: str):
    path_json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    L = ["# Front end: raw echoes → local field → χ (issue 13)", "",
         f"Made by `{cmdline}` (`benchmarks/bench_field.py`; full run: "
         "`nice -n 10 python benchmarks/bench_field.py`, then "
         "`nice -n 10 python benchmarks/bench_field.py --part timing --threads 2`). Numbers in field.json.",
         f"Machine: {results['machine']}.", "",
         "Phantoms: honest raw heads in air (`make_phantom(honest=True, background=True, keep_echoes=True, "
         "shim_order=2)`, seed 0, SNR 50): sinuses and mastoids, tissue −9.41 ppm against air, 2nd-order shim, "
         "fields on a 2x finer grid, intra-voxel dephasing, a smooth receive phase, complex noise. The chain is "
         "the default one: MCPC-3D-S + linear fit (echoes unwrapped in time against the Hermitian-sum prediction), "
         "threshold mask on the phase-quality map with misfit > 10 edge voxels left out, quality-guided "
         "(maximum-spanning-tree) unwrapping with the 26-neighbour 2π check, then each background method.", ""]
    L += summary_table(results) + [""]
    for case, acc in results.get("accuracy", {}).items():
        L += [f"## {acc['label']}", ""]
        tf = acc["total_field"]
        L += [f"Total field: {tf['two_pi_error_voxels_in_mask']} voxels with a 2π error and "
              f"{tf['residual_face_jumps_in_mask']} neighbour jumps > π inside the brain mask "
              f"({tf['mask_voxels']} voxels, Dice {tf['mask_dice']:.3f} against the phantom's brain); error median "
              f"{tf['median_abs_error_ppm']:.4f} ppm, RMS {tf['rms_error_ppm']:.4f} ppm, 99th percentile "
              f"{tf['p99_abs_error_ppm']:.3f} ppm (median N_std {tf['median_noise_std_ppm']:.4f} ppm; the true total "
              f"field spans {tf['true_total_range_in_brain_ppm'][0]:.2f}…{tf['true_total_range_in_brain_ppm'][1]:.2f} "
              f"ppm in the brain, wrap period over ΔTE {tf['wrap_period_ppm']:.2f} ppm). Default chain "
              f"{acc['default_chain_seconds']} s in the accuracy run (1 thread, loaded).", "",
              "Local-field NRMSE (%, demeaned, QSM-CI) inside the method's eroded mask ∩ the phantom's brain mask. "
              "Truth: the voxel mean of the fine-grid field of the brain's own χ (relative to CSF; no source "
              "outside the brain), demeaned in the same voxels. *raw*: from the simulated echoes through the chain; "
              "*true total*: the same method on the phantom's true total field in the same brain mask.", "",
              "| method | raw → local | true total → local | s (1 thread, loaded) | eroded mask voxels |",
              "|---|---|---|---|---|"]
        for r in acc["background"]:
            L.append(f"| {r['label']} | {_f(r['nrmse_raw'])} | {_f(r['nrmse_true_total'])} | {_f(r['seconds'])} | "
                     f"{r['eroded_voxels']} |")
        L += ["", f"χ NRMSE (%, demeaned) / XSIM against the phantom's χ inside both raw chains' eroded masks ∩ the "
              f"brain mask ({acc['chi_eval_voxels']} voxels). Inversions from the registry with default parameters "
              "(TKD δ 0.15, MEDI λ 1000 with N_std weights, QSMInvNet+ `dsbn` shipped weights); *true local field*: "
              "the phantom's true local field in its brain mask with the pipeline's magnitude and N_std. "
              f"LBV's peeled mask leaves out {acc.get('chi_eval_outside_lbv_mask', 0)} of these voxels (its χ is 0 "
              "there and counts as error).", "",
              "| inversion | true local field | raw → V-SHARP → | raw → RESHARP 6 mm → | raw → LBV → |",
              "|---|---|---|---|---|"]
        by = {(r["inversion"], r["source"]): r for r in acc["chi"]}
        for inv in INVERSIONS:
            cells = []
            for src in ("truth",) + CHAINS + EXTRA_CHAINS:
                r = by.get((inv, src))
                if r is None:
                    cells.append("")
                elif "error" in r:
                    cells.append("failed: " + r["error"][:60])
                else:
                    cells.append(f"{r['nrmse']:.1f} / {r['xsim']:.3f} ({r['seconds']:.0f} s)")
            L.append(f"| {inv} | " + " | ".join(cells) + " |")
        L.append("")
    for case, rows in results.get("timing", {}).items():
        L += [f"## Timing: {CASES[case]['label']}", "",
              "Each step in its own subprocess with its inputs loaded first; step peak = the peak RSS during the "
              "step (VmHWM reset after loading) minus the RSS with the inputs loaded (torch and numpy allocations "
              "both count); inputs = that RSS (Python, torch, the phantom's echoes or the step's input maps). "
              "`pipeline/default` = `local_field(echoes)` end to end (fit, quality map, mask, unwrap, V-SHARP). "
              "Loaded machine: upper bounds; the 1-minute load average when each step started is given.", "",
              "| step | wall s | CPU s | step peak MB | inputs MB | threads | load |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                L.append(f"| {r['step']} | failed: {r['error']} | | | | | |")
                continue
            L.append(f"| {r['step']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['step_rss_mb']} | "
                     f"{r.get('inputs_rss_mb', '')} | {r['threads']} | {r.get('load_before', 0):.1f} |")
        L.append("")
    L += ["## Peers", ""] + [f"- {k}: {v}." for k, v in PEERS.items()] + [""]
    path_md.write_text("\n".join(L))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["head1mm", "slab"], choices=list(CASES))
    ap.add_argument("--part", choices=("all", "accuracy", "timing"), default="all")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timing part")
    ap.add_argument("--cache", default="/tmp/napari_qsm_bench_field")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "FAMILY", "NAME"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker, a.cache, a.threads)
        return
    cache = Cache(Path(a.cache))
    out = Path(a.out)
    pj = out / "field.json"
    results = json.loads(pj.read_text()) if pj.exists() else {}
    import torch
    results["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
                          f"work (load {os.getloadavg()[0]:.1f} at the start), torch {torch.__version__}")
    cmdline = "nice -n 10 python benchmarks/bench_field.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for case in a.cases:
        if a.part in ("all", "accuracy"):
            results.setdefault("accuracy", {})[case] = accuracy(case, cache)
            write_report(results, out / "field.md", pj, cmdline.strip())
        if a.part in ("all", "timing"):
            if not (cache.dir / f"inputs_{case}.npz").exists():
                raise SystemExit(f"timing {case}: run the accuracy part first (it saves the step inputs)")
            results.setdefault("timing", {})[case] = timing(case, cache, a.threads)
            write_report(results, out / "field.md", pj, cmdline.strip())
    log("wrote", out / "field.md")


if __name__ == "__main__":
    main()
