"""Where the chain's raw total field differs from the generator's true total field, and what it costs χ (issue 24).

Writes docs/benchmarks/field_raw_error.md (and .json).

    nice -n 10 python benchmarks/field_raw_error.py --cache DIR            # shapes slab, seed 0 (the selection head)

Head: ``shapes`` clinical slab (0.75×0.75×3 mm, 7 echoes TE1 12.6 ms, ΔTE 4.1 ms, SNR 40; bench_field.py's
``slab`` case, its truth cached in DIR as truth_shapes_slab.pkl). The same head is made again with SNR 10¹²
(``make_head(..., snr=1e12)``: the same draws, noise σ ≈ 0): its echo fit separates the error the signal itself
carries (intra-voxel dephasing, partial volume) from noise.

Table 1: the total field's error (rms ppm, the median over brain ∩ mask removed; a noise-free fit compared modulo the
wrap period) by region, for the free-intercept fit (the chain before the refit) and the through-origin refit
(core/field/refit.py, the chain's default now), from the noisy and the noise-free echoes. Regions: the chain's mask;
its brain part; brain voxels within 3 mm of the generator's veins, deep nuclei and haemorrhage (labels 7–9); brain
CSF (ventricles, fissure, label 6); the rest of the brain; the mask's non-brain voxels (CSF rim, skull); slice 0
(the FOV's bottom edge).

Table 2: what each part costs χ. MEDI with the weak-harmonic term (the default for chain fields) on LBV of a
hybrid total field: the true total field in the chain's mask plus the free fit's error only in region R (all
other inputs, N_std included, those of the free-fit chain). R = nothing gives the reachable reference, R = the
mask the chain's χ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TE = tuple(0.0126 + 0.0041 * i for i in range(7))


def _chain(t, refit):
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    run = local_field(t.echoes, FieldRecipe(background="lbv", params={"fit": {"refit": refit}}), device="cpu")
    return run.total, run.brain_mask


def _noise_free(echoes, seed):
    import dataclasses
    from napari_qsm.core.sim.shapes import make_head
    h = make_head((192, 224, 48), (0.75, 0.75, 3.0), seed=seed, te=TE, snr=1e12, device="cpu")
    return dataclasses.replace(echoes, magnitude=h.magnitude, phase=h.phase), h.labels


def _err(field, true, ref, period=None):
    e = field - true
    if period:
        e = e - period * np.round((e - np.median(e[ref])) / period)
    return (e - np.median(e[ref])).astype(np.float32)


def _regions(t, mask, labels):
    from scipy import ndimage as ndi
    b = mask & t.brain
    near = ndi.distance_transform_edt(~np.isin(labels, (7, 8, 9)), sampling=t.voxel_size) <= 3.0
    z0 = np.zeros(mask.shape, bool)
    z0[:, :, 0] = True
    return {"mask": mask, "brain": b, "brain ≤ 3 mm from veins, nuclei, haemorrhage": b & near,
            "brain CSF (ventricles, fissure)": b & (labels == 6) & ~near,
            "rest of the brain": b & ~near & (labels != 6), "non-brain (CSF rim, skull)": mask & ~t.brain,
            "slice 0 (FOV edge)": mask & z0}


def _medi_wh(t, tot, mask, field):
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, find_step
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct
    s = find_step("background", "lbv")
    p = FieldRecipe(background="lbv").record("background")
    loc, em = s.run(np.where(mask, field, 0).astype(np.float32), mask, p, voxel_size=tot.voxel_size,
                    b0_direction=tot.b0_direction, noise_std=tot.noise_std, device="cpu")
    scan = Scan(field=np.where(em, loc, 0).astype(np.float32), mask=em, voxel_size=tot.voxel_size,
                b0_direction=tot.b0_direction, magnitude=tot.magnitude, noise_std=tot.noise_std, r2star=tot.r2star,
                affine=tot.affine, te=float(tot.delta_te), b0_tesla=tot.b0_tesla, name="hybrid")
    chi = np.where(em, reconstruct(scan, "medi", {"weak_harmonic": "on"}, device="cpu").chi, 0)
    return float(M.nrmse_demeaned(chi, t.chi, t.brain))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="bench_field.py's cache (truth_shapes[-sN]_slab.pkl is made there)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import bench_field as B
    sys.modules["__main__"].Truth = B.Truth       # bench_field.py (run as a script) pickles its heads as __main__.Truth
    t0 = time.process_time()
    key = B.gen_key("shapes", a.seed)
    t = B.Cache(Path(a.cache)).truth("slab", key)
    free, mask = _chain(t, "none")
    orig, mask2 = _chain(t, "origin")
    assert np.array_equal(mask, mask2), "the refit must not change the mask"
    nf_echoes, labels = _noise_free(t.echoes, a.seed)
    from napari_qsm.core.field.fit import LinearFitParams, fit_linear
    from napari_qsm.core.field.refit import through_origin
    nf = fit_linear(nf_echoes, LinearFitParams(noise_sigma=free.provenance["noise_sigma"]), device="cpu")
    period = float(free.wrap_period_ppm)
    nf_field = nf.field + period * np.round((free.field - nf.field) / period)      # its wraps as the noisy chain's
    nf_u = nf.replace(field=np.where(mask, nf_field, 0).astype(np.float32), wrapped=False)
    nf_orig = through_origin(nf_echoes, nf_u, mask, device="cpu")
    ref = mask & t.brain
    errs = {"free fit": _err(free.field, t.total, ref), "free fit, noise-free": _err(nf.field, t.total, ref, period),
            "through origin": _err(orig.field, t.total, ref),
            "through origin, noise-free": _err(nf_orig.field, t.total, ref, period)}
    regions = _regions(t, mask, labels)
    rows1 = []
    for name, r in regions.items():
        row = {"region": name, "voxels": int(r.sum()), "nstd_median_free": float(np.median(free.noise_std[r]))}
        row.update({k: float(np.sqrt(np.mean(e[r] ** 2))) for k, e in errs.items()})
        rows1.append(row)
    e_free, e_nf = errs["free fit"], errs["free fit, noise-free"]
    hybrids = [("nothing (reachable reference)", None, e_free), ("the whole mask (the free-fit chain)", "mask", e_free),
               ("non-brain voxels only", "non-brain (CSF rim, skull)", e_free), ("brain only", "brain", e_free),
               ("brain ≤ 3 mm from veins, nuclei, haemorrhage", "brain ≤ 3 mm from veins, nuclei, haemorrhage", e_free),
               ("brain, noise part only (free fit − noise-free fit)", "brain", e_free - e_nf),
               ("brain, noise-free part only", "brain", e_nf)]
    rows2 = []
    for label, reg, e in hybrids:
        r = regions[reg] if reg else np.zeros(mask.shape, bool)
        f = t.total * mask + np.where(r, e, 0)
        rows2.append({"error_in": label, "voxels": int(r.sum()), "medi_wh": _medi_wh(t, free, mask, f)})
        print(rows2[-1], flush=True)
    rows2.append({"error_in": "the whole mask, through-origin refit (N_std still the free fit's)",
                  "voxels": int(mask.sum()), "medi_wh": _medi_wh(t, free, mask, t.total * mask + np.where(
                      mask, errs["through origin"], 0))})
    cpu = time.process_time() - t0
    write(rows1, rows2, a, cpu, key)


def write(rows1, rows2, a, cpu, key):
    cmd = f"nice -n 10 python benchmarks/field_raw_error.py --cache DIR --seed {a.seed}"
    cols = ["free fit", "free fit, noise-free", "through origin", "through origin, noise-free"]
    md = [f"# Where the raw total field goes wrong ({key} slab)", "",
          f"Made by `{cmd}` ({cpu:.0f} CPU s). See the script's docstring for the method.", "",
          "## 1. Total-field error against the generator's true total field (rms ppm)", "",
          "| region | voxels | " + " | ".join(cols) + " | N_std median (free) |", "|---|---" + "|---" * len(cols) + "|---|"]
    for r in rows1:
        md.append(f"| {r['region']} | {r['voxels']} | " + " | ".join(f"{r[c]:.4f}" for c in cols)
                  + f" | {r['nstd_median_free']:.4f} |")
    md += ["", "## 2. What each part of the free fit's error costs χ (MEDI weak-harmonic on LBV, demeaned NRMSE %)",
           "", "| free-fit error added to the true total field in | voxels | MEDI-WH % |", "|---|---|---|"]
    md += [f"| {r['error_in']} | {r['voxels']} | {r['medi_wh']:.1f} |" for r in rows2]
    md += ["", "Reading (of the seed-0 run): the error is in the signal, not the noise (noise-free ≈ noisy columns); it sits next to the "
           "strong sources, where the voxel's compartments dephase and the free slope over the late echoes follows the "
           "long-lived, bright compartment; the large errors of the non-brain edge voxels (skull in slice 0) cost χ "
           "nothing, because MEDI's weak-harmonic term takes up what they do to LBV's boundary. The through-origin "
           "refit anchors the phase at TE 0 and roughly halves the error next to the sources.", ""]
    out = Path(a.out)
    (out / "field_raw_error.md").write_text("\n".join(md))
    (out / "field_raw_error.json").write_text(json.dumps({"table1": rows1, "table2": rows2, "command": cmd,
                                                          "cpu_seconds": cpu}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
