"""On-scan adaptation benchmark: QSMInvNet+ adapted vs its baselines on domain-shifted phantoms.

    python benchmarks/bench_adapt.py [--weights CKPT] [--cases 5] [--out docs/benchmarks]

Writes ``docs/benchmarks/adapt.md`` (table in the paper's format, mean ± sd over the cases: PSNR,
NRMSE, HFEN, SSIM, XSIM; timings; peak memory), ``adapt_steps.png`` (NRMSE vs adaptation steps)
and ``adapt_results.json`` (every number). Per-case results are cached in ``--work`` so an
interrupted run resumes; ``--jobs 2`` splits the cases over two processes.

Cases (never seen in training: training heads use seeds ≥ 100000, validation 1-2): clinical-like
0.75x0.75x3 mm 192x224x48 slabs from :func:`napari_qsm.core.sim.phantom.make_phantom` (seeds 901…),
B0 tilted 10-20° about varying axes, magnitude-weighted noise (SNR 40-120) and a contrast unlike
the training data: per-compartment χ rescaled (deep grey matter ×1.3-1.8, white matter ×0.5-1.5),
a global scale (0.6-1.6) and added lesions the generator does not make (clusters of 1-mm
microbleeds at +1.5-3 ppm, a ring-shaped lesion, a large negative calcified plaque). The phantoms
are honest (``make_phantom(honest=True)``): the domain shift is applied on a 2x finer grid, the
field is computed there, a 7-echo clinical GRE signal (TE1 12.6 ms, ΔTE 4.1 ms) is averaged per
voxel with complex noise, and the scan gets the field, RSS magnitude and N_std fitted from the
echoes; the magnitude's edges only partly match χ's. ``make_case(i, honest=False)`` is the former
idealised case (field = the inversions' own forward model of χ).

Methods: TKD (the one threshold with the best mean NRMSE over the cases, from a sweep), MEDI-L1
(registered method "medi", defaults; and with ``edge_mask=false``, i.e. plain TV without the
magnitude's edges), QSMInvNet fine-tune (one shared BN, L_T only, same
budget), QSMInvNet+ base (shipped weights, no adaptation: the network alone, and the dsbn method = the network
followed by its data consistency), QSMInvNet+ adapted (default AdaptParams: its χ goes through the same data
consistency; the adapted network alone is also scored), protocol adaptation (χ of unseen scans by the dsbn method
with the site checkpoint, and by that network alone). Metrics from :func:`napari_qsm.core.metrics.compute_metrics`
inside the mask.

Re-measuring without the slow classic rows: ``--no-medi --no-uqsm --no-finetune --jobs 1 --reuse
docs/benchmarks/adapt_results.json`` takes every MEDI row of that earlier run (the network rows only when that
run had the same weights and AdaptParams) and reports how far this run's TKD and unadapted network are from it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import expit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_qsm.core.dipole import forward_field  # noqa: E402
from napari_qsm.core.sim.phantom import GAMMA_BAR, LABEL_NAMES, RESEARCH, make_phantom  # noqa: E402
from napari_qsm.core.scan import Scan  # noqa: E402

CLINICAL_SHAPE = (192, 224, 48)
CLINICAL_VS = (0.75, 0.75, 3.0)
METRICS = ("psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim")
PROTOCOL_TRAIN = (5, 6, 7, 8, 9)   # protocol adaptation: 5 scans of the same protocol the evaluation never uses
TKD_THRESHOLDS = (0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3)
CURVE_STEPS = (0, 25, 50, 100, 200, 400)
MEDI_TV = "MEDI without magnitude edges (plain TV)"
MEDI_AUTO = "MEDI (λ = auto)"
#: label → MEDIParams overrides. "MEDI" is MEDI without the residual background φ, explicitly: its default
#: weak_harmonic=auto would be on for a freshly made pipeline case (its Scan carries the background step) and off
#: for the same case read back from the case cache, so one label would mean two methods (peel_by_method.md
#: measures the weak-harmonic variant on these heads). λ = auto (UPRE) resolves auto to off by itself.
MEDI_RUNS = {"MEDI": {"weak_harmonic": "off"}, MEDI_AUTO: {"lambda": "auto"}}
MEDI_EXTRA = {MEDI_TV: {"edge_mask": False}}               # --medi-tv: the former plain-TV row


def _label(name):
    return [k for k, v in LABEL_NAMES.items() if v == name][0]


def _ball(shape, vs, centre, r_mm):
    g = np.meshgrid(*[(np.arange(n) - c) * d for n, c, d in zip(shape, centre, vs)], indexing="ij", sparse=True)
    return np.sqrt(sum(x * x for x in g))


def make_case(i: int, shape=CLINICAL_SHAPE, voxel_size=CLINICAL_VS, honest: bool = True, pipeline: str | None = None):
    """Domain-shifted clinical-like phantom number i -> (Scan, χ truth, description).

    ``pipeline`` (a background-removal step name, e.g. "lbv"): the same head sits in air with air
    cavities (``make_phantom(background=True)``), and the scan is what the front end makes of its raw
    echoes (:func:`napari_qsm.core.field.pipeline.local_field`: echo fit, brain mask, unwrapping, that
    background removal) — local field, eroded mask, magnitude and N_std all from the pipeline. Metrics
    are then taken inside the pipeline's mask ∩ the phantom's brain (:data:`_TRUTH_MASKS`).

    Honest (default): :func:`make_phantom` with ``honest=True`` and the domain shift applied by its
    ``edit`` hook on the 2x finer grid before the physics, so the field comes from a finer grid than
    the inversions use, the 7-echo clinical signal is simulated with complex noise, and the scan
    carries the fitted field, the RSS magnitude and the N_std estimated by the echo fit.
    ``honest=False`` gives the former idealised case (:func:`make_case_idealised`).
    """
    if not honest:
        return make_case_idealised(i, shape, voxel_size)
    rng = np.random.default_rng([4242, i])
    seed = 901 + i
    tilt = float(rng.uniform(10.0, 20.0))
    az = float(rng.uniform(0, 2 * math.pi))
    th = math.radians(tilt)
    b0 = np.array([math.sin(th) * math.cos(az), math.sin(th) * math.sin(az), math.cos(th)])
    deep = float(rng.uniform(1.3, 1.8))
    wm = float(rng.uniform(0.5, 1.5))
    glob = float(rng.uniform(0.6, 1.6))
    snr = float(np.random.default_rng([4244, i]).uniform(40.0, 120.0))
    shift = {}

    def edit(g):  # on the fine grid (g.shape, g.voxel_size), before the field and the echoes are simulated
        chi, lab, mask, gvs = g.chi, g.labels, g.mask, np.asarray(g.voxel_size, float)
        # -- contrast unlike training ---------------------------------------------------------------
        for name in ("caudate", "putamen", "globus_pallidus", "substantia_nigra", "red_nucleus", "thalamus"):
            chi[lab == _label(name)] *= deep
        chi[lab == _label("white_matter")] *= wm
        chi *= glob
        # -- lesions the generator does not make (darkening through R2*, the plaque also through PD) ------
        idx = np.flatnonzero(mask & np.isin(lab, [_label("white_matter"), _label("cortex")]))
        centre = lambda: np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), g.shape), float)  # noqa: E731
        n_mb = int(rng.integers(6, 14))
        c0 = centre()
        for _ in range(n_mb):  # microbleed cluster around one site
            c = c0 + rng.normal(0, 12.0, 3) / gvs
            d = _ball(g.shape, gvs, c, 1.0)
            a = (np.clip(1.5 - d / 1.0, 0, 1) * (d < 2.0)).astype(np.float32)
            v = float(rng.uniform(1.5, 3.0))
            chi += a * (v - chi)
            g.r2s += np.float32(250.0) * a
        c = centre()  # ring lesion (paramagnetic rim, diamagnetic core)
        d = _ball(g.shape, gvs, c, 0)
        R = float(rng.uniform(6.0, 10.0))
        rim = np.exp(-((d - R) / 1.2) ** 2).astype(np.float32)
        core = (d < R - 2).astype(np.float32)
        chi += 0.4 * rim - 0.05 * core
        g.r2s += np.float32(40.0) * rim
        c = centre()  # calcified plaque: flat ellipsoid, strongly negative, low proton density
        gr = np.meshgrid(*[(np.arange(n) - cc) * dd for n, cc, dd in zip(g.shape, c, gvs)], indexing="ij", sparse=True)
        e = (gr[0] / 9.0) ** 2 + (gr[1] / 5.0) ** 2 + (gr[2] / 3.0) ** 2
        a = expit(-(e - 1) / 0.15).astype(np.float32)
        chi += a * (np.float32(-0.5) - chi)
        g.pd *= 1 - 0.7 * a
        g.r2s += np.float32(60.0) * a
        chi[~mask] = 0.0
        shift["microbleeds"] = n_mb

    if pipeline:   # the head in air, raw echoes → the front end (fit, mask, unwrap, background removal)
        from napari_qsm.core.field.pipeline import FieldRecipe, local_field
        from napari_qsm.core.metrics import nrmse_demeaned

        ph = make_phantom(shape, voxel_size, b0, seed=seed, snr=snr, texture=True, randomize=True, device="cpu",
                          honest=True, edit=edit, background=True, keep_echoes=True)
        run = local_field(ph.to_echoes(name=f"case{i}"), FieldRecipe(background=pipeline), device="cpu")
        scan = run.scan
        scan.name = f"case{i}"
        both = scan.mask & ph.mask
        desc = {"case": i, "seed": seed, "simulation": "honest, head in air, pipeline local field",
                "pipeline": [f"{st['family']}: {st['label']}" for st in run.steps],
                "echo_times_ms": [round(t * 1e3, 2) for t in ph.echo_times],
                "tilt_deg": round(tilt, 1), "snr": round(snr, 1), "deep_gm_scale": round(deep, 2),
                "wm_scale": round(wm, 2), "global_scale": round(glob, 2), "microbleeds": shift["microbleeds"],
                "chi_range": [round(float(ph.chi[ph.mask].min()), 3), round(float(ph.chi[ph.mask].max()), 3)],
                "mask_voxels": int(scan.mask.sum()), "true_mask_voxels": int(ph.mask.sum()),
                "evaluated_voxels": int(both.sum()),
                "local_field_nrmse_demeaned": round(nrmse_demeaned(scan.field, ph.true_local_field, both), 2)}
        _TRUTH_MASKS[id(ph.chi)] = (ph.chi, ph.mask)
        return scan, ph.chi, desc
    ph = make_phantom(shape, voxel_size, b0, seed=seed, snr=snr, texture=True, randomize=True, device="cpu",
                      honest=True, edit=edit)
    chi, mask = ph.chi, ph.mask
    # te: the adaptation's phase scale stays at the former 20 ms (3 T); the field itself is the 7-echo fit
    scan = Scan(field=ph.field, mask=mask, voxel_size=voxel_size, b0_direction=b0, magnitude=ph.magnitude,
                noise_std=ph.noise_std, te=0.02, b0_tesla=3.0, name=f"case{i}")
    desc = {"case": i, "seed": seed, "simulation": "honest", "echo_times_ms": [round(t * 1e3, 2) for t in ph.echo_times],
            "tilt_deg": round(tilt, 1), "snr": round(snr, 1), "deep_gm_scale": round(deep, 2),
            "wm_scale": round(wm, 2), "global_scale": round(glob, 2), "microbleeds": shift["microbleeds"],
            "chi_range": [round(float(chi[mask].min()), 3), round(float(chi[mask].max()), 3)]}
    return scan, chi, desc


CASE_DIR = None   # set by main(): work/cases, phantoms cached there (each honest case takes a minute to simulate)
PIPELINE = None   # set by main() from --pipeline: the background-removal step of pipeline-made local fields


def load_case(i: int):
    """:func:`make_case` (honest, clinical) through the on-disk cache ``work/cases/case{i}.npz``."""
    if CASE_DIR is None:
        return make_case(i, pipeline=PIPELINE)
    f = CASE_DIR / f"case{i}.npz"
    if f.exists():
        z = np.load(f)
        desc = json.loads(str(z["desc"]))
        scan = Scan(field=z["field"], mask=z["mask"], voxel_size=CLINICAL_VS, b0_direction=z["b0"],
                    magnitude=z["magnitude"], noise_std=z["noise_std"], te=float(z["te"]) if "te" in z else 0.02,
                    b0_tesla=3.0, name=f"case{i}")
        chi = z["chi"]
        if "true_mask" in z:
            _TRUTH_MASKS[id(chi)] = (chi, z["true_mask"])
        return scan, chi, desc
    CASE_DIR.mkdir(parents=True, exist_ok=True)
    while not _lock(CASE_DIR, f"case{i}-gen"):   # another process is simulating it: wait for its file
        time.sleep(5)
        if f.exists():
            return load_case(i)
    if f.exists():
        return load_case(i)
    scan, chi, desc = make_case(i, pipeline=PIPELINE)
    tmp = CASE_DIR / f".tmp-case{i}-{os.getpid()}.npz"
    extra = {"te": scan.te, "true_mask": _TRUTH_MASKS[id(chi)][1]} if PIPELINE else {}
    np.savez(tmp, field=scan.field, mask=scan.mask, b0=np.asarray(scan.b0_direction), magnitude=scan.magnitude,
             noise_std=scan.noise_std, chi=chi, desc=json.dumps(desc), **extra)
    os.replace(tmp, f)
    return scan, chi, desc


def make_case_idealised(i: int, shape=CLINICAL_SHAPE, voxel_size=CLINICAL_VS):
    """The former idealised case i (field = the discrete forward model of χ on the voxel grid, exact noise)."""
    rng = np.random.default_rng([4242, i])
    seed = 901 + i
    tilt = float(rng.uniform(10.0, 20.0))
    az = float(rng.uniform(0, 2 * math.pi))
    th = math.radians(tilt)
    b0 = np.array([math.sin(th) * math.cos(az), math.sin(th) * math.sin(az), math.cos(th)])
    ph = make_phantom(shape, voxel_size, b0, seed=seed, snr=None, texture=True, randomize=True, device="cpu")
    chi = ph.chi.copy()
    mask = ph.mask
    lab = ph.labels
    mag = ph.magnitude.copy()
    vs = np.asarray(voxel_size, float)
    # -- contrast unlike training -----------------------------------------------------------------
    deep = float(rng.uniform(1.3, 1.8))
    for name in ("caudate", "putamen", "globus_pallidus", "substantia_nigra", "red_nucleus", "thalamus"):
        sel = lab == _label(name)
        chi[sel] *= deep
    wm = float(rng.uniform(0.5, 1.5))
    chi[lab == _label("white_matter")] *= wm
    glob = float(rng.uniform(0.6, 1.6))
    chi *= glob
    # -- lesions the generator does not make ----------------------------------------------------
    idx = np.flatnonzero(mask & np.isin(lab, [_label("white_matter"), _label("cortex")]))
    centre = lambda: np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), shape), float)
    n_mb = int(rng.integers(6, 14))
    c0 = centre()
    for _ in range(n_mb):  # microbleed cluster around one site
        c = c0 + rng.normal(0, 12.0, 3) / vs
        d = _ball(shape, vs, c, 1.0)
        a = np.clip(1.5 - d / 1.0, 0, 1) * (d < 2.0)
        v = float(rng.uniform(1.5, 3.0))
        chi = chi + a * (v - chi)
        mag *= 1 - 0.8 * a
    c = centre()  # ring lesion (paramagnetic rim, diamagnetic core)
    d = _ball(shape, vs, c, 0)
    R = float(rng.uniform(6.0, 10.0))
    rim = np.exp(-((d - R) / 1.2) ** 2)
    core = (d < R - 2).astype(np.float32)
    chi = chi + 0.4 * rim - 0.05 * core
    mag *= 1 - 0.4 * rim
    c = centre()  # calcified plaque: flat ellipsoid, strongly negative
    g = np.meshgrid(*[(np.arange(n) - cc) * dd for n, cc, dd in zip(shape, c, vs)], indexing="ij", sparse=True)
    e = (g[0] / 9.0) ** 2 + (g[1] / 5.0) ** 2 + (g[2] / 3.0) ** 2
    a = expit(-(e - 1) / 0.15)   # logistic edge, without overflow warnings far from the plaque
    chi = chi + a * (-0.5 - chi)
    mag *= 1 - 0.7 * a
    chi = (chi * mask).astype(np.float32)
    # -- field + noise (phantom noise model) ----------------------------------------------------------
    snr = float(rng.uniform(40.0, 120.0))
    fld = forward_field(chi, voxel_size, b0, device="cpu") * mask
    mean_mag = float(mag[mask].mean())
    sig_phi = np.minimum(1.0, mean_mag / (snr * np.maximum(mag, 1e-6)))
    noise_std = (sig_phi / (2 * math.pi * GAMMA_BAR * 3.0 * 0.02 * 1e-6)).astype(np.float32)
    nrng = np.random.default_rng([4243, i])
    fld = (fld + nrng.standard_normal(shape).astype(np.float32) * noise_std * mask).astype(np.float32)
    sm = mean_mag / snr
    mag_n = np.sqrt((mag + nrng.standard_normal(shape) * sm) ** 2 + (nrng.standard_normal(shape) * sm) ** 2)
    scan = Scan(field=fld, mask=mask, voxel_size=voxel_size, b0_direction=b0, magnitude=mag_n.astype(np.float32),
                te=0.02, b0_tesla=3.0, name=f"case{i}")
    desc = {"case": i, "seed": seed, "tilt_deg": round(tilt, 1), "snr": round(snr, 1), "deep_gm_scale": round(deep, 2),
            "wm_scale": round(wm, 2), "global_scale": round(glob, 2), "microbleeds": n_mb,
            "chi_range": [round(float(chi[mask].min()), 3), round(float(chi[mask].max()), 3)]}
    return scan, chi, desc


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------

_TRUTH_MASKS: dict = {}   # id(χ truth) → (χ truth, the phantom's brain mask), pipeline cases only


def _metrics(x, chi, mask):
    """Metrics inside ``mask`` (the scan's), intersected with the phantom's brain for pipeline cases."""
    from napari_qsm.core.metrics import compute_metrics

    held = _TRUTH_MASKS.get(id(chi))
    if held is not None and held[0] is chi:
        mask = np.asarray(mask, bool) & held[1]
    m = compute_metrics(x, chi, mask)
    return {k: float(m[k]) for k in METRICS}


def _volume_lt(x, scan) -> float:
    """L_T of a χ map over the whole scan (the adaptation's loss and default phase scale: 3 T / 20 ms)."""
    import torch

    from napari_qsm.nn.adapt import _inv_weight, phase_scale
    from napari_qsm.nn.losses import loss_field, noise_weights

    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    m = t(scan.mask)
    w = noise_weights(m, t(_inv_weight(scan, "auto")[0]))
    with torch.no_grad():
        return float(loss_field(t(x), t(scan.field), m, scan.voxel_size, scan.b0_direction, weights=w,
                                phase_per_ppm=phase_scale(scan)))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reused(i: int, work: Path) -> dict:
    """Rows of case i taken from an earlier run of this benchmark (``--reuse RESULTS.json``: same phantoms, weights
    and parameters, so the same numbers; NRMSE detrended, added since, is missing there): work/reuse{i}.json."""
    f = work / f"reuse{i}.json"
    return json.loads(f.read_text())["methods"] if f.exists() else {}


def seed_reuse(results: Path, work: Path, weights: str, source: str) -> None:
    """Take the MEDI rows (λ = 1000, λ = auto, plain TV: independent of the network) of an earlier
    adapt_results.json into work/reuse{i}.json, with that run's TKD sweep and unadapted-network row for
    :func:`reuse_drift`; and its base, fine-tune and single-scan adapted rows into the network cache
    (case{i}_{base,finetune,dsbn}.json) only when it records the same network cache key (base weights sha and
    default AdaptParams) and this run has not computed them. Refuses when the earlier TKD or base rows differ
    from what this run has already computed."""
    old = json.loads(Path(results).read_text())
    wdir = work / _cache_key(weights)
    wdir.mkdir(parents=True, exist_ok=True)
    same_net = old.get("net_cache_key") == _cache_key(weights)
    for c in old["cases"]:
        i = c["desc"]["case"]
        checks = []
        if (work / f"classic{i}.json").exists():
            new = json.loads((work / f"classic{i}.json").read_text())["tkd_sweep"]
            checks += [(new[t]["nrmse"], c["tkd_sweep"][t]["nrmse"]) for t in new if t in c["tkd_sweep"]]
        if (wdir / f"case{i}_base.json").exists():
            new = json.loads((wdir / f"case{i}_base.json").read_text())["methods"]["QSMInvNet+ base"]
            checks.append((new["nrmse"], c["methods"]["QSMInvNet+ base"]["nrmse"]))
        bad = [(a, b) for a, b in checks if abs(a - b) > 1e-3]   # points; the report gives the drift
        if bad:
            raise SystemExit(f"--reuse {results}: case {i} differs from this run ({bad[0]}); not reused")
        medi = {k: dict(c["methods"][k], reused_from=c["methods"][k].get("reused_from") or source)
                for k in (*MEDI_RUNS, *MEDI_EXTRA) if k in c["methods"]}
        if medi:
            (work / f"reuse{i}.json").write_text(json.dumps(
                {"source": source, "methods": medi, "tkd_sweep": c["tkd_sweep"],
                 "base": c["methods"].get("QSMInvNet+ base")}, indent=1))
        for tag, label in NET_LABELS.items():
            ft = wdir / f"case{i}_{tag}.json"
            if same_net and label in c["methods"] and not ft.exists():
                extra = {"L_T_volume_truth": c.get("L_T_volume_truth")} if tag == "base" else {}
                ft.write_text(json.dumps({"methods": {label: dict(c["methods"][label], reused_from=source)}, **extra},
                                         indent=1))


def reuse_drift(cases: list[dict], work: Path) -> dict | None:
    """How far this run's TKD sweep and unadapted network (demeaned NRMSE, points) are from the run whose MEDI rows
    were reused (the phantoms, the echo fit and the N_std estimate may have changed since): the largest absolute
    differences over the cases, or None when nothing was reused."""
    tkd, base = [], []
    for c in cases:
        f = work / f"reuse{c['desc']['case']}.json"
        if not f.exists():
            continue
        r = json.loads(f.read_text())
        tkd += [abs(c["tkd_sweep"][t]["nrmse_demeaned"] - v["nrmse_demeaned"]) for t, v in r.get("tkd_sweep", {}).items()
                if t in c["tkd_sweep"]]
        if r.get("base") and "QSMInvNet+ base" in c["methods"]:
            base.append(abs(c["methods"]["QSMInvNet+ base"]["nrmse_demeaned"] - r["base"]["nrmse_demeaned"]))
    if not tkd:
        return None
    return {"tkd": max(tkd), "base": max(base) if base else None}


def run_classic(i: int, work: Path, medi: bool = True) -> dict:
    """TKD sweep and MEDI of case i (independent of the network weights; cached in work/classic{i}.json)."""
    import torch

    from napari_qsm.methods import available_methods, reconstruct
    from napari_qsm.core.inversion.tkd import truncated_inversion

    out = work / f"classic{i}.json"
    rec = json.loads(out.read_text()) if out.exists() else None
    medi = medi and "medi" in [m.name for m in available_methods()]
    if rec is not None and not (medi and any(k not in rec["methods"] and k not in _reused(i, work) for k in MEDI_RUNS)):
        return rec
    scan, chi, desc = load_case(i)
    mask = scan.mask
    if rec is None:
        rec = {"desc": desc, "tkd_sweep": {}, "methods": {}}
        for th in TKD_THRESHOLDS:
            t = time.perf_counter()
            x, _ = truncated_inversion(scan.field, mask, scan.voxel_size, scan.b0_direction, threshold=th,
                                       device=torch.device("cpu"))
            rec["tkd_sweep"][str(th)] = {**_metrics(x, chi, mask), "seconds": round(time.perf_counter() - t, 2)}
        out.write_text(json.dumps(rec, indent=1))   # TKD cached before the (long) MEDI runs
    reused = _reused(i, work)
    for label, kw in MEDI_RUNS.items() if medi else ():
        if label not in rec["methods"] and label not in reused:   # only what the cache lacks
            t = time.perf_counter()
            r = reconstruct(scan, "medi", kw, device="cpu")
            rec["methods"][label] = {**_metrics(r.chi, chi, mask), "seconds": round(time.perf_counter() - t, 1),
                                     "lambda": (r.extras or {}).get("lambda")}
            out.write_text(json.dumps(rec, indent=1))   # each MEDI run cached as soon as it is done
    rec["peak_mb"] = max(rec.get("peak_mb", 0), round(_peak_mb(), 0))
    out.write_text(json.dumps(rec, indent=1))
    return rec


NET_LABELS = {"base": "QSMInvNet+ base", "finetune": "QSMInvNet fine-tune", "dsbn": "QSMInvNet+ adapted"}
BASE_DC = "QSMInvNet+ base + DC"               # the dsbn method: the unadapted network, then its data consistency
ADAPTED_NET = "QSMInvNet+ adapted, network alone"   # the adapted network without the data consistency


def run_case(i: int, weights: str, work: Path, medi: bool = True, steps: int | None = None,
             classic: bool = True, methods=("base", "finetune", "dsbn")) -> dict:
    """Network results of case i merged with the classic ones (``classic=False``: without computing the
    classic ones; their own job does). Each network row is cached on its own,
    work/<weights sha + AdaptParams>/case{i}_{base|finetune|dsbn}.json, so separate jobs can fill them."""
    from napari_qsm.methods import reconstruct
    from napari_qsm.nn.adapt import AdaptParams, adapt
    from napari_qsm.nn.infer import load_model, predict

    classic = run_classic(i, work, medi) if classic else {"desc": None, "tkd_sweep": {}, "methods": {}}
    wdir = work / _cache_key(weights)
    wdir.mkdir(parents=True, exist_ok=True)
    rec = {"methods": {}}
    for what in methods:
        out = wdir / f"case{i}_{what}.json"
        if out.exists():
            r = json.loads(out.read_text())
            rec["methods"].update(r["methods"])
            rec.update({k: v for k, v in r.items() if k != "methods"})
            continue
        scan, chi, desc = load_case(i)
        mask = scan.mask
        r = {"methods": {}}
        if what == "base":   # QSMInvNet+ base (no adaptation: what the shipped network gives on this scan)
            t = time.perf_counter()
            model = load_model(weights)
            x, _ = predict(model, scan.field, mask, domain="auto", voxel_size=scan.voxel_size,
                           b0_direction=scan.b0_direction)
            r["methods"][NET_LABELS[what]] = {**_metrics(x, chi, mask), "seconds": round(time.perf_counter() - t, 1),
                                              "L_T_volume": _volume_lt(x, scan)}
            r["L_T_volume_truth"] = _volume_lt(chi, scan)
            t = time.perf_counter()   # the dsbn method (network + data consistency, its defaults), before referencing
            xd = reconstruct(scan, "dsbn", {"reference": "none"}, weights=weights, device="cpu").chi
            r["methods"][BASE_DC] = {**_metrics(xd, chi, mask), "seconds": round(time.perf_counter() - t, 1),
                                     "L_T_volume": _volume_lt(xd, scan)}
        else:                # QSMInvNet fine-tune / QSMInvNet+ adapted, default parameters (same budget)
            kw = {"mode": what} if steps is None else {"mode": what, "steps": steps}
            ad = adapt(scan, AdaptParams(**kw), weights=weights, device="cpu")
            lt = ad.losses("L_T")
            if what == "dsbn":   # the adapted network alone (its χ before the data consistency)
                xn, _ = predict(ad.model, scan.field, mask, domain="auto", voxel_size=scan.voxel_size,
                                b0_direction=scan.b0_direction)
                r["methods"][ADAPTED_NET] = {**_metrics(xn, chi, mask), "L_T_volume": _volume_lt(xn, scan)}
            r["methods"][NET_LABELS[what]] = {
                **_metrics(ad.chi, chi, mask), "seconds": round(ad.seconds, 1), "steps": ad.step,
                "step_seconds": float(np.mean([h["step_seconds"] for h in ad.history])),
                "L_T_first": float(lt[0]), "L_T_last": float(lt[-1]),
                "L_T_first5": float(lt[:5].mean()), "L_T_last5": float(lt[-5:].mean()),
                "L_T_volume": _volume_lt(ad.chi, scan), "load": round(os.getloadavg()[0], 1)}
        r["peak_mb"] = round(_peak_mb(), 0)
        out.write_text(json.dumps(r, indent=1))
        rec["methods"].update(r["methods"])
        rec.update({k: v for k, v in r.items() if k != "methods"})
    merged = {"desc": classic["desc"], "tkd_sweep": classic["tkd_sweep"], "L_T_volume_truth": rec.get("L_T_volume_truth"),
              "methods": {**classic["methods"], **rec["methods"]},
              "peak_mb": max(classic.get("peak_mb", 0), rec.get("peak_mb", 0))}
    return merged


def merged_case(i: int, weights: str, work: Path) -> dict | None:
    """Every cached result of case i (classic, network, uQSM, protocol), without computing anything."""
    wdir = work / _cache_key(weights)
    parts = [work / f"classic{i}.json", *[wdir / f"case{i}_{w}.json" for w in NET_LABELS],
             wdir / f"protocol{i}.json"]
    uq = {work / _uqsm_key(weights, rad) / f"case{i}.json": label for label, rad in UQSM_RUNS.items()}
    if not parts[0].exists():
        return None
    rec = json.loads(parts[0].read_text())
    rec["methods"] = {**_reused(i, work), **rec.get("methods", {})}
    for f in parts[1:] + list(uq):
        if f.exists():
            r = json.loads(f.read_text())
            if f in uq:   # the cache file names its row by the label it was made with; the key says which run it is
                r["methods"] = {uq[f]: next(iter(r["methods"].values()))}
            rec["methods"].update(r.get("methods", {}))
            for k in ("L_T_volume_truth",):
                if k in r:
                    rec[k] = r[k]
            rec["peak_mb"] = max(rec.get("peak_mb", 0), r.get("peak_mb", 0))
    return rec


UQSM = "uQSM (same budget)"
UQSM_SCAN = "uQSM (same budget, L_T phase at the scan's own TE)"   # rad_per_ppm=auto, the former default
UQSM_RUNS = {UQSM: "reference", UQSM_SCAN: "auto"}
PROTO = "QSMInvNet+ adapted (protocol, unseen scans)"
PROTO_NET = "QSMInvNet+ adapted (protocol, unseen scans), network alone"


def _uqsm_key(weights, rad_per_ppm: str = "reference") -> str:
    """Cache folder of the uQSM rows: the architecture (not the base's weights, which uQSM never uses) and the
    AdaptParams (defaults, with ``rad_per_ppm``)."""
    from napari_qsm.core.params import params_to_dict
    from napari_qsm.nn.adapt import AdaptParams
    from napari_qsm.nn.infer import load_model

    cfg = load_model(weights).config.to_dict()
    d = json.dumps([cfg, params_to_dict(AdaptParams(mode="uqsm", rad_per_ppm=rad_per_ppm))], sort_keys=True, default=str)
    return f"uqsm-{hashlib.sha256(d.encode()).hexdigest()[:12]}"


def run_uqsm(i: int, weights: str, work: Path, steps: int | None = None, rad_per_ppm: str = "reference") -> dict:
    """uQSM on case i with the default budget (cached in work/uqsm-<key>/case{i}.json); ``rad_per_ppm="auto"``:
    the L_T phase at the scan's own TE (the row :data:`UQSM_SCAN`)."""
    from napari_qsm.nn.adapt import AdaptParams, adapt

    label = UQSM if rad_per_ppm == "reference" else UQSM_SCAN
    out = work / _uqsm_key(weights, rad_per_ppm) / f"case{i}.json"
    if out.exists():
        rec = json.loads(out.read_text())
        rec["methods"] = {label: next(iter(rec["methods"].values()))}
        return rec
    out.parent.mkdir(parents=True, exist_ok=True)
    scan, chi, desc = load_case(i)
    kw = {"mode": "uqsm", "rad_per_ppm": rad_per_ppm} if steps is None else {"mode": "uqsm", "steps": steps,
                                                                             "rad_per_ppm": rad_per_ppm}
    r = adapt(scan, AdaptParams(**kw), weights=weights, device="cpu")
    lt = r.losses("L_T")
    rec = {"methods": {label: {**_metrics(r.chi, chi, scan.mask), "seconds": round(r.seconds, 1), "steps": r.step,
                              "step_seconds": float(np.mean([h["step_seconds"] for h in r.history])),
                              "L_T_first5": float(lt[:5].mean()), "L_T_last5": float(lt[-5:].mean()),
                              "L_T_volume": _volume_lt(r.chi, scan)}},
           "peak_mb": round(_peak_mb(), 0)}
    out.write_text(json.dumps(rec, indent=1))
    return rec


def run_protocol(weights: str, work: Path, eval_ids, train_ids=PROTOCOL_TRAIN, steps: int | None = None) -> dict:
    """Protocol adaptation on the scans ``train_ids`` (one checkpoint, default AdaptParams), then whole-volume
    inference with that checkpoint on the held-out scans ``eval_ids`` it never saw (cached:
    work/<key>/protocol-<train ids>.pt and protocol{i}.json per evaluated case)."""
    from napari_qsm.methods import reconstruct
    from napari_qsm.nn.adapt import AdaptParams, adapt_protocol, save_adapted
    from napari_qsm.nn.infer import load_model, predict

    wdir = work / _cache_key(weights)
    wdir.mkdir(parents=True, exist_ok=True)
    tag = "-".join(str(t) for t in train_ids)
    ck = wdir / f"protocol-{tag}.pt"
    if not ck.exists():
        scans = [load_case(t)[0] for t in train_ids]
        kw = {} if steps is None else {"steps": steps}
        r = adapt_protocol(scans, AdaptParams(**kw), weights=weights, device="cpu")
        save_adapted(r, ck, weights, scans)
        lt = r.losses("L_T")
        (wdir / f"protocol-{tag}-run.json").write_text(json.dumps(
            {"train_cases": list(train_ids), "seconds": round(r.seconds, 1), "steps": r.step,
             "step_seconds": float(np.mean([h["step_seconds"] for h in r.history])),
             "L_T_first5": float(lt[:5].mean()), "L_T_last5": float(lt[-5:].mean()),
             "peak_mb": round(_peak_mb(), 0)}, indent=1))
        del scans, r
    run = json.loads((wdir / f"protocol-{tag}-run.json").read_text())
    model = None
    for i in eval_ids:
        if i in train_ids:
            raise ValueError(f"protocol: case {i} is one the adaptation saw; evaluate on held-out cases only")
        out = wdir / f"protocol{i}.json"
        if out.exists():
            continue
        model = model or load_model(ck)
        scan, chi, desc = load_case(i)
        x, _ = predict(model, scan.field, scan.mask, domain="auto", voxel_size=scan.voxel_size,
                       b0_direction=scan.b0_direction)
        t = time.perf_counter()   # recon --method dsbn --weights SITE.pt: the network, then the data consistency
        xd = reconstruct(scan, "dsbn", {"reference": "none"}, weights=str(ck), device="cpu").chi
        rec = {"methods": {PROTO: {**_metrics(xd, chi, scan.mask), "seconds": round(time.perf_counter() - t, 1),
                                   "adapt_seconds": run["seconds"], "train_cases": list(train_ids),
                                   "L_T_volume": _volume_lt(xd, scan)},
                           PROTO_NET: {**_metrics(x, chi, scan.mask), "L_T_volume": _volume_lt(x, scan)}}}
        out.write_text(json.dumps(rec, indent=1))
    return run


def run_curve(weights: str, work: Path, case: int = 0, steps: int = max(CURVE_STEPS), modes=("dsbn",)) -> dict:
    """NRMSE after 0, 25, 50, 100, 200 steps of one run per mode (λ ramp over `steps`)."""
    from napari_qsm.nn.adapt import AdaptParams, adapt
    from napari_qsm.nn.infer import load_model, predict

    out = work / _cache_key(weights) / f"curve{case}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        return json.loads(out.read_text())
    scan, chi, desc = load_case(case)
    model = load_model(weights)
    x, _ = predict(model, scan.field, scan.mask, domain="auto", voxel_size=scan.voxel_size,
                   b0_direction=scan.b0_direction)
    rec = {"case": case, "steps": steps, "curves": {}}
    for mode in modes:
        pts = {0: _metrics(x, chi, scan.mask)}

        def prog(pr):
            if pr.preview is not None and pr.step in CURVE_STEPS:
                pts[pr.step] = _metrics(pr.preview, chi, scan.mask)

        t = time.perf_counter()
        r = adapt(scan, AdaptParams(mode=mode, steps=steps, preview_every=25), weights=weights, device="cpu",
                  progress=prog)
        rec["curves"][mode] = {"nrmse": {str(k): v["nrmse"] for k, v in sorted(pts.items())},
                               "hfen": {str(k): v["hfen"] for k, v in sorted(pts.items())},
                               "L_T": r.losses("L_T").tolist(), "L_S": r.losses("L_S").tolist(),
                               "seconds": round(time.perf_counter() - t, 1),
                               "step_seconds": float(np.mean([h["step_seconds"] for h in r.history]))}
    rec["peak_mb"] = round(_peak_mb(), 0)
    out.write_text(json.dumps(rec, indent=1))
    return rec


TIMING_SCANS = {"clinical": ("timing.json", {}),
                "1mm": ("timing_1mm.json", {"shape": RESEARCH["shape"], "voxel_size": RESEARCH["voxel_size"]}),
                "protocol": ("timing_protocol.json", {})}


def run_timing(weights: str, work: Path, which: str = "clinical") -> dict:
    """Default adaptation (dsbn) of case 0 (clinical slab, or the 1 mm 160×192×160 head), alone in its process:
    wall time and peak memory."""
    from napari_qsm.nn.adapt import AdaptParams, adapt

    name, kw = TIMING_SCANS[which]
    out = work / _cache_key(weights) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        return json.loads(out.read_text())
    if which == "protocol":
        rec = _time_protocol(weights, work)
        out.write_text(json.dumps(rec, indent=1))
        return rec
    scan, chi, desc = make_case(0, **kw)
    base_mb = _peak_mb()
    t = time.perf_counter()
    r = adapt(scan, AdaptParams(), weights=weights, device="cpu")
    rec = {"shape": list(scan.shape), "voxel_size": list(scan.voxel_size), "steps": r.step,
           "seconds": round(time.perf_counter() - t, 1),
           "step_seconds": float(np.mean([h["step_seconds"] for h in r.history])),
           "peak_mb": round(_peak_mb(), 0), "peak_mb_before": round(base_mb, 0),
           "threads": __import__("torch").get_num_threads()}
    out.write_text(json.dumps(rec, indent=1))
    return rec


def _time_protocol(weights: str, work: Path) -> dict:
    """Alone in its process, all threads: protocol adaptation on the PROTOCOL_TRAIN scans (default AdaptParams),
    then inference with the adapted checkpoint on held-out case 0, in-process (``reconstruct``) and through the
    command line (``napari-qsm recon --method dsbn --weights SITE.pt`` on NIfTI files: interpreter start, imports,
    reading, writing)."""
    import tempfile

    import torch

    from napari_qsm.core.io import save_volume
    from napari_qsm.methods import reconstruct
    from napari_qsm.nn.adapt import AdaptParams, adapt_protocol, save_adapted

    scans = [load_case(t)[0] for t in PROTOCOL_TRAIN]
    base_mb = _peak_mb()
    t = time.perf_counter()
    r = adapt_protocol(scans, AdaptParams(), weights=weights, device="cpu")
    adapt_s = time.perf_counter() - t
    rec = {"scans": len(scans), "shape": list(scans[0].shape), "voxel_size": list(scans[0].voxel_size),
           "steps": r.step, "seconds": round(adapt_s, 1),
           "step_seconds": float(np.mean([h["step_seconds"] for h in r.history])),
           "peak_mb": round(_peak_mb(), 0), "peak_mb_before": round(base_mb, 0), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as d:
        ck = save_adapted(r, Path(d) / "site.pt", weights, scans)
        del scans, r
        scan, chi, desc = load_case(0)
        times = []
        for _ in range(3):   # the first call pays for the model load and torch's first-use costs
            t = time.perf_counter()
            reconstruct(scan, "dsbn", device="cpu", weights=str(ck))
            times.append(time.perf_counter() - t)
        rec["infer_seconds"] = [round(x, 2) for x in times]
        f, m = Path(d) / "field.nii.gz", Path(d) / "mask.nii.gz"
        aff = np.diag([*map(float, scan.voxel_size), 1.0])
        save_volume(scan.field, f, aff)
        save_volume(scan.mask, m, aff, dtype=np.uint8)
        cli = [sys.executable, "-m", "napari_qsm.cli", "recon", str(f), "--mask", str(m), "--method", "dsbn",
               "--b0-dir", *map(str, scan.b0_direction), "--weights", str(ck), "-o", str(Path(d) / "chi.nii.gz")]
        t = time.perf_counter()
        subprocess.run(cli, check=True, capture_output=True)
        rec["cli_seconds"] = round(time.perf_counter() - t, 2)
    return rec


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------

SHOWN = {"MEDI": "MEDI (λ = 1000, toolbox default)", "QSMInvNet+ adapted": "QSMInvNet+ adapted (one scan) + DC",
         "QSMInvNet+ base": "QSMInvNet+ base, network alone", BASE_DC: "QSMInvNet+ base + DC (the dsbn method)",
         ADAPTED_NET: "QSMInvNet+ adapted (one scan), network alone", PROTO: "QSMInvNet+ adapted (protocol, unseen scans) + DC"}
ORDER = ["MEDI", MEDI_AUTO, MEDI_TV, "QSMInvNet fine-tune", "QSMInvNet+ base", BASE_DC, ADAPTED_NET, "QSMInvNet+ adapted",
         PROTO_NET, PROTO, UQSM, UQSM_SCAN]


def _ordering(rows: dict, tkd_label: str, ids: dict) -> list[str]:
    """The paper's ordering, measured: each adapted row against each competitor on NRMSE (demeaned and
    raw) and HFEN: means, difference and the number of cases won (on the cases both rows have)."""
    lines = []
    rivals = [("QSMInvNet fine-tune", "fine-tune"), (UQSM, "uQSM"), (UQSM_SCAN, "uQSM (phase at the scan's TE)"),
              ("QSMInvNet+ base", "base (network alone)"), (BASE_DC, "base + DC (dsbn)"), (tkd_label, "TKD"),
              (MEDI_AUTO, "MEDI λ=auto"), ("MEDI", "MEDI λ=1000")]
    for ours, short in (("QSMInvNet+ adapted", "adapted (one scan) + DC"), (PROTO, "adapted (protocol, unseen) + DC")):
        if ours not in rows:
            continue
        for rv, rshort in rivals:
            if rv not in rows:
                continue
            common = [c for c in ids[ours] if c in ids[rv]]
            if not common:
                continue
            pick = lambda n, k: np.array([x[k] for c, x in zip(ids[n], rows[n]) if c in common])  # noqa: E731
            parts, better = [], []
            for k, name in (("nrmse_demeaned", "NRMSE demeaned"), ("nrmse", "NRMSE"), ("hfen", "HFEN")):
                a, b = pick(ours, k), pick(rv, k)
                wins = int((a < b).sum())
                better.append(a.mean() < b.mean())
                parts.append(f"{name} {a.mean():.1f} vs {b.mean():.1f} ({a.mean() - b.mean():+.1f}, better in {wins}/{len(a)})")
            verdict = "beats" if all(better) else "does not beat"
            lines.append(f"- {short} **{verdict}** {rshort} on all three: " + "; ".join(parts) + ".")
    return lines


def assemble(cases: list[dict], curve: dict | None, timing: dict | None, weights: str, out: Path, cmd: str,
             proto: dict | None = None, pipeline: str | None = None, drift: dict | None = None) -> str:
    stem = f"adapt_pipeline_{pipeline}" if pipeline else "adapt"
    # TKD: the threshold with the best mean NRMSE over the cases
    ths = list(cases[0]["tkd_sweep"])
    best = min(ths, key=lambda t: np.mean([c["tkd_sweep"][t]["nrmse"] for c in cases]))
    tkd_label = f"TKD (δ = {best}, best mean NRMSE of {', '.join(ths)})"
    rows = {tkd_label: [c["tkd_sweep"][best] for c in cases]}
    ids = {tkd_label: [c["desc"]["case"] for c in cases]}
    names = [n for n in ORDER if any(n in c["methods"] for c in cases)]
    for n in names:   # a row that a cut-short run has on some cases only says on how many
        rows[n] = [c["methods"][n] for c in cases if n in c["methods"]]
        ids[n] = [c["desc"]["case"] for c in cases if n in c["methods"]]
    arrow = {"psnr": "PSNR ↑", "nrmse": "NRMSE ↓", "nrmse_demeaned": "NRMSE demeaned ↓",
             "nrmse_detrended": "NRMSE detrended ↓", "hfen": "HFEN ↓", "ssim": "SSIM ↑", "xsim": "XSIM ↑"}
    lines = ["| method | " + " | ".join(arrow[k] for k in METRICS) + " | seconds |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    summary = {}
    for n, vals in rows.items():
        cells = []
        summary[n] = {}
        for k in METRICS:
            v = np.array([x.get(k, np.nan) for x in vals], float)
            summary[n][k] = (float(v.mean()), float(v.std()))
            cells.append(f"{v.mean():.3f} ± {v.std():.3f}" if k in ("ssim", "xsim") else f"{v.mean():.2f} ± {v.std():.2f}")
        secs = [x.get("seconds") for x in vals if x.get("seconds") is not None]
        sec = f"{np.mean(secs):.1f}" if secs else "<1"
        if n == PROTO and vals and vals[0].get("adapt_seconds"):
            sec = f"{sec} (+ {vals[0]['adapt_seconds']:.0f} once per protocol)"
        lab = SHOWN.get(n, n)
        if any(x.get("reused_from") for x in vals):
            lab += " †"
        if len(vals) < len(cases):
            lab += f" — {len(vals)} of {len(cases)} cases ({', '.join(map(str, ids[n]))})"
        if n == MEDI_AUTO:
            lams = [x.get("lambda") for x in vals if x.get("lambda")]
            if lams:
                lab += f" (chose λ {', '.join(f'{v:.3g}' for v in lams)})"
        cells.append(sec)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    per_case = ["| case | tilt ° | SNR | deep GM × | WM × | global × | TKD | " + " | ".join(
        SHOWN.get(n, n) for n in names) + " |", "|---|" * 1 + "---|" * (6 + len(names))]
    for c in cases:
        d = c["desc"]
        cells = [str(d["case"]), str(d["tilt_deg"]), str(d["snr"]), str(d["deep_gm_scale"]), str(d["wm_scale"]),
                 str(d["global_scale"]), f"{c['tkd_sweep'][best]['nrmse_demeaned']:.1f}"]
        cells += [f"{c['methods'][n]['nrmse_demeaned']:.1f}" if n in c["methods"] else "–" for n in names]
        per_case.append("| " + " | ".join(cells) + " |")
    ad = [c["methods"].get("QSMInvNet+ adapted") for c in cases]
    ft = [c["methods"].get("QSMInvNet fine-tune") for c in cases]
    uq = [c["methods"].get(UQSM) for c in cases]
    lt_text = ""
    if all(ad) and all(ft) and all("L_T_volume" in c["methods"].get("QSMInvNet+ base", {}) for c in cases):
        lt_text = ("Whole-scan L_T (the adaptation loss evaluated on the full volume; truth in brackets), base → fine-tune / "
                   "adapted: " + "; ".join(
                       f"{c['methods']['QSMInvNet+ base']['L_T_volume']:.4g} → "
                       f"{c['methods']['QSMInvNet fine-tune']['L_T_volume']:.4g} / "
                       f"{c['methods']['QSMInvNet+ adapted']['L_T_volume']:.4g} ({c.get('L_T_volume_truth') or float('nan'):.4g})"
                       for c in cases) + ". ")
    if all(ad):
        lt_text += (
"Per-step L_T on the random patches (mean of the first 5 → last 5 steps, adapted; λ rises meanwhile): "
                   + ", ".join(f"{a['L_T_first5']:.4g} → {a['L_T_last5']:.4g}" for a in ad) + ". ")
    if any(u and "L_T_first5" in u for u in uq):
        lt_text += ("uQSM's own loss (magnitude/max weighted L_T, first 5 → last 5 steps): "
                    + ", ".join(f"{u['L_T_first5']:.3g} → {u['L_T_last5']:.3g}" for u in uq if u and "L_T_first5" in u)
                    + ".")
    from napari_qsm.core.params import params_to_dict
    from napari_qsm.nn.adapt import AdaptParams
    up = params_to_dict(AdaptParams(mode="uqsm"))
    ptxt = ""
    if proto:
        ptxt = (f"QSMInvNet+ adapted (protocol): one checkpoint adapted with the default `AdaptParams` "
                f"({proto['steps']} steps, {proto['step_seconds']:.2f} s/step, {proto['seconds']:.0f} s in all in the benchmark run, beside another job) "
                f"on cases {', '.join(map(str, proto['train_cases']))} — {len(proto['train_cases'])} other scans of the same protocol "
                f"(same generator, other seeds, B0 tilts and contrast shifts), each patch with its own scan's dipole "
                f"kernel — then `recon --method dsbn --weights SITE.pt` (the network, then its data consistency) on the evaluation cases "
                f"0–{len(cases) - 1}, which the adaptation never saw.")
    title = "# Adaptation benchmark: the paper's table (TKD, MEDI, QSMInvNet, QSMInvNet+, uQSM)"
    if pipeline:
        title += f", on local fields made by the pipeline (raw echoes → {pipeline.upper()})"
    md = [title, "",
          f"Regenerate: `{cmd}` (per-case results cached in `--work`, so an interrupted run resumes; "
          "`--report-only` rewrites this page from the cache).", "",
          f"Base checkpoint: `{_shown(weights)}` (sha256 {_sha(weights)[:16]}…).", "",
          f"{len(cases)} domain-shifted clinical-like phantoms (192×224×48 at 0.75×0.75×3 mm, B0 tilted 10–20°, "
          "echo-1 SNR 40–120, deep grey matter ×1.3–1.8, white matter ×0.5–1.5, global χ ×0.6–1.6, "
          "microbleed clusters at +1.5–3 ppm, a ring lesion and a −0.5 ppm calcified plaque — none of which the training "
          "generator produces; seeds 901+ never used in training). Honest phantoms (`make_phantom(honest=True)`), not "
          "the idealised ones: χ and field on a 2x finer grid (model error), 7-echo clinical GRE signal (TE1 12.6 ms, "
          "ΔTE 4.1 ms) averaged per voxel with complex noise, field and N_std fitted from the echoes (the scans carry "
          "the fitted N_std, not the exact noise map), RSS magnitude whose edges only partly match χ's. Metrics inside "
          "the brain mask against the true χ (napari_qsm.core.metrics, QSM-CI definitions: PSNR dB, NRMSE % (2016 "
          "challenge, not demeaned), NRMSE demeaned % (QSM challenge 2.0), NRMSE detrended % (after fitting χ = a·χ_true + b), "
          "HFEN % (LoG σ 1.5), SSIM (2016 challenge), XSIM (uniform 5³ window, QSM-CI)); mean ± sd over the cases.", "",
          "Same budget for the three adaptations: the default `AdaptParams` (120 steps, one 64³-capped scan patch "
          "per step, lr 1e-3): QSMInvNet fine-tune = one shared BN (the base's synthetic one), L_T only; QSMInvNet+ "
          "adapted = DSBN, synthetic L_S on domain 0 + λ·L_T + MEDI's edge prior on domain 1; uQSM = `mode=uqsm`: the "
          f"same U-Net from random initialisation (seed 0), no normalisation, input {up['uqsm_input']} "
          "(field, mask and the TKD channel: step 0 is TKD), trained on the scan alone with L_T weighted by "
          f"magnitude/max (the same exact SMV patch form) + {up['uqsm_tv']}·TV, no labels, no synthetic data. "
          "MEDI λ = auto: the UPRE rule (`--param lambda=auto`). L_T's phase scale (every adaptation): the default "
          "`rad_per_ppm=reference`, 16.05 rad/ppm (3 T, 20 ms) on every scan; uQSM is also run with the phase at the "
          "scan's own TE (`rad_per_ppm=auto`, the published form): on the phantom cases te = 20 ms, so both uQSM rows "
          "are the same run; on pipeline-made fields te = ΔTE = 4.1 ms, which weighs L_T 24× less against uQSM's TV.",
          "",
          "Data consistency (DC): the dsbn method follows the network with `consistency` CG steps on "
          "‖W(D∗χ − f)‖² + μ‖χ − χ_network‖² (defaults 10 steps, μ 0.003, W = 1/N_std), and since issue 26 the "
          "adaptation's χ goes through the same step (`AdaptParams.consistency`, the same defaults); rows marked "
          "\"network alone\" are the same networks without it (`consistency=0`). Every adaptation row of a run made "
          "after that change includes it.", ""]
    if pipeline:
        d0 = cases[0]["desc"]
        md += [f"**Local fields from the pipeline, not from the phantom.** Each case's head sits in air with air "
               f"cavities, skull and a 2nd-order shim (`make_phantom(honest=True, background=True)`: tissue −9.41 ppm "
               f"against air), and the scans are what the front end makes of the raw echoes with "
               f"`local_field(echoes, FieldRecipe(background=\"{pipeline}\"))` — {'; '.join(d0.get('pipeline', []))} — "
               f"as `napari-qsm recon BIDS_FOLDER --background {pipeline}` would: local field, eroded mask, magnitude and "
               f"N_std all from the pipeline, so every method also inherits the background-removal error. Metrics inside "
               f"the pipeline's mask ∩ the phantom's brain. Local-field NRMSE (demeaned, against the phantom's true local "
               f"field) per case: " + ", ".join(f"{c['desc']['local_field_nrmse_demeaned']:.1f} %" for c in cases)
               + "; evaluated voxels " + ", ".join(str(c['desc']['evaluated_voxels']) for c in cases)
               + f" (phantom brain {', '.join(str(c['desc']['true_mask_voxels']) for c in cases)}).", ""]
    if ptxt:
        md += [ptxt, ""]
    src = sorted({x["reused_from"] for v in rows.values() for x in v if x.get("reused_from")})
    if src:
        reused = sorted({n for n, v in rows.items() if any(x.get("reused_from") for x in v)})
        how = ("" if drift is None else
               f" This run's TKD sweep differs from that run's by at most {drift['tkd']:.2g} points of demeaned NRMSE"
               + ("" if drift.get("base") is None else
                  f", its unadapted network by at most {drift['base']:.2g} points")
               + " (the phantoms, the echo fit and its N_std estimate may have changed since; MEDI uses the N_std).")
        md += [f"† Taken from an earlier run of this benchmark ({', '.join(src)}), not recomputed (MEDI λ = auto takes "
               f"~900 s per case on this CPU): {', '.join(SHOWN.get(n, n) for n in reused)}. The same phantoms "
               f"(seeds, shifts, lesions); MEDI does not depend on the network.{how}", ""]
    md += [table, "", "Seconds: wall time of the run that made the row (the runs beside each other on a shared, loaded "
           "2-core CPU: upper bounds). What the numbers say, and what is missing: [adapt_notes.md](adapt_notes.md).", "",
           "NRMSE demeaned per case (%):", "", "\n".join(per_case), "",
           "## The paper's ordering, measured", "", *_ordering(rows, tkd_label, ids), "", lt_text, ""]
    if timing:
        md += ["## Timing and memory (this 2-core CPU)", "",
               f"- Default adaptation (`napari-qsm adapt`, {timing['steps']} steps) of the clinical-size scan "
               f"{tuple(timing['shape'])} at {tuple(timing['voxel_size'])} mm: **{timing['seconds']:.0f} s total** "
               f"(synthetic head generation, {timing['steps']} steps at {timing['step_seconds']:.2f} s/step, whole-volume "
               f"inference), torch threads {timing['threads']}; peak resident memory {timing['peak_mb']:.0f} MB.",
               ]
        h = timing.get("head_1mm")
        if h:
            md.append(f"- The same default adaptation of a 1 mm head {tuple(h['shape'])}: **{h['seconds']:.0f} s total** "
                      f"({h['steps']} steps at {h['step_seconds']:.2f} s/step), torch threads {h['threads']}; peak "
                      f"resident memory {h['peak_mb']:.0f} MB.")
        pt = timing.get("protocol")
        if pt:
            md.append(f"- Protocol adaptation (`napari-qsm adapt F1 … F{pt['scans']} --mask M1 … M{pt['scans']}`, default "
                      f"parameters) on {pt['scans']} clinical-size scans {tuple(pt['shape'])}: **{pt['seconds']:.0f} s "
                      f"total** ({pt['steps']} steps at {pt['step_seconds']:.2f} s/step, then χ of every scan), torch "
                      f"threads {pt['threads']}; peak resident memory {pt['peak_mb']:.0f} MB. Then χ of a new scan with "
                      f"the adapted checkpoint: **{min(pt['infer_seconds']):.1f} s** in-process (`reconstruct(scan, "
                      f"'dsbn', weights=SITE.pt)`; calls: {', '.join(f'{x:.1f}' for x in pt['infer_seconds'])} s, the "
                      f"first loads the model), **{pt['cli_seconds']:.1f} s** as `napari-qsm recon --method dsbn "
                      f"--weights SITE.pt` from NIfTI to NIfTI (interpreter start and imports included).")
        if all(ad) and all(ft):
            md.append(f"- In the benchmark runs (cases in parallel processes, so slower): adapted "
                      f"{np.mean([a['step_seconds'] for a in ad]):.2f} s/step, {np.mean([a['seconds'] for a in ad]):.0f} s "
                      f"per case; fine-tune {np.mean([a['step_seconds'] for a in ft]):.2f} s/step. Peak memory of a case "
                      f"process (TKD, MEDI, base, both adaptations): {max(c['peak_mb'] for c in cases):.0f} MB.")
        md.append("")
    if curve:
        md += ["## Quality vs steps", "", f"Case {curve['case']}, one run of {curve['steps']} steps per mode "
               "(λ ramp over the run), χ evaluated at the preview steps:", "", "![NRMSE vs steps](adapt_steps.png)", "",
               "| steps | " + " | ".join(curve["curves"]) + " |", "|---|" + "---|" * len(curve["curves"])]
        for s in CURVE_STEPS:
            md.append(f"| {s} | " + " | ".join(f"{v['nrmse'].get(str(s), float('nan')):.2f}" for v in curve["curves"].values()) + " |")
        for mode, v in curve["curves"].items():
            lt = np.array(v["L_T"])
            if len(lt) >= 40:
                md.append(f"- {mode}: per-step L_T (random patches), mean of steps 1-20 {lt[:20].mean():.4g} → "
                          f"steps {len(lt) - 19}-{len(lt)} {lt[-20:].mean():.4g}; {v['step_seconds']:.2f} s/step in this run.")
        md.append("")
        _plot_curve(curve, out / "adapt_steps.png")
    (out / f"{stem}.md").write_text("\n".join(md))
    (out / f"{stem}_results.json").write_text(json.dumps({"summary": summary, "tkd_best": best, "cases": cases,
                                                        "net_cache_key": _cache_key(weights), "reuse_drift": drift,
                                                        "protocol": proto, "curve": curve, "timing": timing,
                                                        "ordering": _ordering(rows, tkd_label, ids)}, indent=1))
    return table


def _sha(path) -> str:
    from napari_qsm.nn.infer import file_sha256
    return file_sha256(path)


def _shown(path) -> str:
    """A path as the report shows it: relative to the repository when inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if ROOT in p.parents else str(p)


def _cache_key(weights) -> str:
    """Cache folder of network results: base weights sha + the default AdaptParams (a new default = a new run)."""
    from napari_qsm.core.params import params_to_dict
    from napari_qsm.nn.adapt import AdaptParams

    d = json.dumps(params_to_dict(AdaptParams()), sort_keys=True, default=str)
    return f"{_sha(weights)[:16]}-{hashlib.sha256(d.encode()).hexdigest()[:8]}"


def _plot_curve(curve: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    lab = {"dsbn": "QSMInvNet+ adapted (DSBN)", "finetune": "QSMInvNet fine-tune"}
    for mode, v in curve["curves"].items():
        s = sorted(int(k) for k in v["nrmse"])
        (ln,) = a1.plot(s, [v["nrmse"][str(k)] for k in s], "o-", label=lab.get(mode, mode))
        lt = np.array(v["L_T"])
        a2.plot(np.arange(1, len(lt) + 1), lt, alpha=0.25, color=ln.get_color())
        n = 10
        if len(lt) >= n:
            a2.plot(np.arange(n, len(lt) + 1), np.convolve(lt, np.ones(n) / n, "valid"), color=ln.get_color(),
                    label=f"L_T {lab.get(mode, mode)}")
    for k, v in (curve.get("reference") or {}).items():
        a1.axhline(v, ls="--", lw=1, color="gray")
        a1.text(0, v, k, fontsize=8, va="bottom")
    a1.set_xlabel("adaptation steps")
    a1.set_ylabel("NRMSE (%)")
    a1.set_title(f"case {curve['case']}: NRMSE vs steps")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("L_T (mean of 10)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_variants(weights: str, case: int, variants: list[str], out: Path, work: Path | None = None) -> int:
    """NRMSE/HFEN of the base network and of one adaptation per AdaptParams variant on one case.

    Each variant's row is cached in ``work/<cache key>/variants{case}.json`` (the result of a seed is
    deterministic), so a longer list reruns only the new variants."""
    from napari_qsm.core.params import make_params, params_to_dict, parse_cli_params
    from napari_qsm.nn.adapt import AdaptParams, adapt
    from napari_qsm.nn.infer import file_sha256, load_model, predict

    scan, chi, desc = load_case(case)
    model = load_model(weights)
    x, _ = predict(model, scan.field, scan.mask, domain="auto", voxel_size=scan.voxel_size,
                   b0_direction=scan.b0_direction)
    rows = [{"variant": "base (no adaptation)", **_metrics(x, chi, scan.mask), "seconds": None}]
    cache_file = None if work is None else work / _cache_key(weights) / f"variants{case}.json"
    cache = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.exists() else {}
    for v in variants:
        if v not in cache:
            p = make_params(AdaptParams, parse_cli_params(v.split(",")))
            t, load0 = time.perf_counter(), os.getloadavg()[0]
            r = adapt(scan, p, weights=weights, device="cpu")
            cache[v] = {"variant": v, **_metrics(r.chi, chi, scan.mask), "seconds": round(time.perf_counter() - t, 1),
                        "load": round(0.5 * (load0 + os.getloadavg()[0]), 1)}
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cache_file.write_text(json.dumps(cache, indent=1))
        rows.append(cache[v])
        print(rows[-1], flush=True)
    md = [f"# Adaptation variants on case {case}", "",
          f"`python benchmarks/bench_adapt.py --variant-case {case} --variants {' '.join(variants)}` "
          f"(weights sha256 {file_sha256(weights)[:16]}…; other AdaptParams at their defaults: "
          f"{', '.join(f'{k}={v}' for k, v in params_to_dict(AdaptParams()).items())}). Seconds: wall time of the "
          f"run that made the row (rows come from the cache in --work; a run beside other jobs is slower), load: "
          f"the 1-minute load average of the machine (mean of start and end of the run; 2 cores = busy). NRMSE "
          f"demeaned: QSM-CI's definition (both maps demeaned in the mask); NRMSE: the 2016 challenge's (not "
          f"demeaned); HFEN as in docs/benchmarks/adapt.md.", "",
          "| variant | NRMSE demeaned % | NRMSE % | HFEN % | SSIM | seconds | load |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['nrmse_demeaned']:.2f} | {r['nrmse']:.2f} | {r['hfen']:.2f} | {r['ssim']:.4f} "
           f"| {r['seconds'] or ''} | {r.get('load') or ''} |" for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapt_variants.md").write_text("\n".join(md) + "\n")
    (out / "adapt_variants.json").write_text(json.dumps({"case": case, "rows": rows}, indent=1))
    print("\n".join(md))
    return 0


def _lock(work: Path, name: str) -> bool:
    """Claim job ``name`` (work/locks/NAME.pid); False when a live process holds it."""
    d = work / "locks"
    d.mkdir(parents=True, exist_ok=True)
    f = d / (name.replace(",", "_").replace("/", "_") + ".pid")
    for _ in range(2):
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        except FileExistsError:
            try:
                pid = int(f.read_text() or 0)
                os.kill(pid, 0)
                return False          # held by a live process
            except (ValueError, ProcessLookupError, PermissionError):
                f.unlink(missing_ok=True)   # stale lock of a finished or killed job
    return False


def main(argv=None) -> int:
    global CASE_DIR, PIPELINE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="base checkpoint (default: the shipped weights)")
    ap.add_argument("--cases", type=int, default=5, help="evaluation cases 0..N-1")
    ap.add_argument("--protocol-train", default=",".join(str(t) for t in PROTOCOL_TRAIN),
                    help="cases the protocol adaptation uses (never evaluated; default 5,6,7,8,9)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--work", default=None, help="cache of per-case results (default /tmp/bench_adapt, "
                    "/tmp/bench_adapt-pipeline-NAME with --pipeline)")
    ap.add_argument("--pipeline", metavar="BACKGROUND", default=None,
                    help="local fields made by the front end from the raw echoes of heads in air, with this "
                         "background-removal step (e.g. lbv); writes adapt_pipeline_BACKGROUND.md")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--no-medi", action="store_true")
    ap.add_argument("--no-uqsm", action="store_true")
    ap.add_argument("--no-protocol", action="store_true")
    ap.add_argument("--no-finetune", action="store_true", help="without the QSMInvNet fine-tune rows")
    ap.add_argument("--curve", action="store_true", help="also the NRMSE-vs-steps curve (a 400-step run, ~20 min)")
    ap.add_argument("--timing", action="store_true",
                    help="also time the default adaptation alone (clinical slab and 1 mm head, all threads)")
    ap.add_argument("--classic-only", action="store_true",
                    help="only TKD and MEDI of every case (independent of the weights; cached for later runs)")
    ap.add_argument("--report-only", action="store_true", help="only assemble the report from the cache")
    ap.add_argument("--reuse", metavar="RESULTS.json", help="take the MEDI (λ = 1000), base, fine-tune and single-scan "
                    "adapted rows from an earlier adapt_results.json of the same weights instead of recomputing them "
                    "(marked † in the report)")
    ap.add_argument("--reuse-source", default="", help="how the report names --reuse (e.g. a commit)")
    ap.add_argument("--steps", type=int, default=None, help="override the default adaptation steps")
    ap.add_argument("--curve-modes", default="dsbn", help="comma-separated modes of the steps curve (dsbn,finetune)")
    ap.add_argument("--variants", nargs="+", default=None, metavar="K=V[,K=V]",
                    help="instead of the benchmark: adapt case --variant-case once per AdaptParams variant "
                         "(e.g. lr=1e-4 update=bn,lr=1e-3) and write adapt_variants.{md,json}")
    ap.add_argument("--variant-case", type=int, default=0)
    ap.add_argument("--worker", choices=["case", "classic", "tkd", "curve", "timing", "uqsm", "protocol"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--ids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--net", default="base,finetune,dsbn", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from napari_qsm.nn.infer import default_weights_path
    weights = str(Path(args.weights).resolve()) if args.weights else str(default_weights_path())
    PIPELINE = args.pipeline
    work = Path(args.work or ("/tmp/bench_adapt" + (f"-pipeline-{args.pipeline}" if args.pipeline else "")))
    work.mkdir(parents=True, exist_ok=True)
    CASE_DIR = work / "cases"
    train = tuple(int(t) for t in args.protocol_train.split(",") if t)
    evals = list(range(args.cases))
    if set(train) & set(evals):
        raise SystemExit(f"--protocol-train {args.protocol_train}: overlaps the evaluation cases 0..{args.cases - 1}")
    if args.variants:
        return run_variants(weights, args.variant_case, args.variants, Path(args.out), work)
    if args.worker:
        if not _lock(work, f"{args.worker}-{args.ids}-{args.net if args.worker == 'case' else ''}"):
            return 0     # the same job is running in another process (another invocation of this script)
        import torch
        torch.set_num_threads(args.threads)
        ids = [int(x) for x in args.ids.split(",") if x] if args.worker != "timing" else []
        if args.worker == "case":
            for i in ids:
                run_case(i, weights, work, medi=not args.no_medi, steps=args.steps, classic=False,
                         methods=tuple(args.net.split(",")))
        elif args.worker in ("classic", "tkd"):
            for i in ids:
                run_classic(i, work, medi=not args.no_medi and args.worker == "classic")
        elif args.worker == "uqsm":
            for rad in UQSM_RUNS.values():
                for i in ids:
                    run_uqsm(i, weights, work, steps=args.steps, rad_per_ppm=rad)
        elif args.worker == "protocol":
            run_protocol(weights, work, ids, train, steps=args.steps)
        elif args.worker == "curve":
            run_curve(weights, work, modes=tuple(args.curve_modes.split(",")))
        else:
            run_timing(weights, work, args.ids or "clinical")
        return 0
    t0 = time.perf_counter()
    if args.reuse:
        seed_reuse(Path(args.reuse), work, weights, args.reuse_source or args.reuse)
    if not args.report_only:
        # by priority, so that a run cut short still has whole rows: the adapted network and its protocol
        # form first, then uQSM, the fine-tune baseline, and the classic methods (TKD before MEDI)
        jobs = []
        if not args.classic_only:
            if not args.no_protocol:      # the longest job first
                jobs.append(["protocol", ",".join(map(str, evals)), ""])
            if args.curve:
                jobs.append(["curve", "", ""])
            for i in evals:
                jobs += [["tkd", str(i), ""], ["case", str(i), "base,dsbn"]]
                if not args.no_uqsm:
                    jobs.append(["uqsm", str(i), ""])
            if not args.no_finetune:
                jobs += [["case", str(i), "finetune"] for i in evals]
        jobs += [["classic", str(i), ""] for i in evals]
        base = [sys.executable, __file__, "--weights", weights, "--work", str(work), "--threads", str(args.threads),
                "--curve-modes", args.curve_modes, "--protocol-train", args.protocol_train]
        if args.no_medi:
            base.append("--no-medi")
        if args.pipeline:
            base += ["--pipeline", args.pipeline]
        if args.steps is not None:
            base += ["--steps", str(args.steps)]
        pending, procs = list(jobs), []
        while pending or procs:
            while pending and len(procs) < args.jobs:
                kind, ids, net = pending.pop(0)
                procs.append(subprocess.Popen(base + ["--worker", kind, "--ids", ids] + (["--net", net] if net else [])))
            time.sleep(2)
            for p in list(procs):
                if p.poll() is not None:
                    if p.returncode:
                        print(f"worker failed: {p.args}", file=sys.stderr)
                    procs.remove(p)
        if args.classic_only:
            return 0
        # timing alone at the end (nothing else of ours running), with the default thread count
        if args.timing:
            for which in TIMING_SCANS:
                subprocess.run([sys.executable, __file__, "--weights", weights, "--work", str(work), "--threads",
                                str(os.cpu_count() or 1), "--worker", "timing", "--ids", which])
    wdir = work / _cache_key(weights)
    cases = [c for c in (merged_case(i, weights, work) for i in evals) if c is not None]
    if not cases:
        print("no cached case results yet", file=sys.stderr)
        return 1
    curve = json.loads((wdir / "curve0.json").read_text()) if (wdir / "curve0.json").exists() else None
    timing = json.loads((wdir / "timing.json").read_text()) if (wdir / "timing.json").exists() else None
    if timing and (wdir / "timing_1mm.json").exists():
        timing["head_1mm"] = json.loads((wdir / "timing_1mm.json").read_text())
    if timing and (wdir / "timing_protocol.json").exists():
        timing["protocol"] = json.loads((wdir / "timing_protocol.json").read_text())
    tag = "-".join(str(t) for t in train)
    proto = json.loads((wdir / f"protocol-{tag}-run.json").read_text()) if (wdir / f"protocol-{tag}-run.json").exists() else None
    if curve and cases:
        c0 = [c for c in cases if c["desc"]["case"] == curve["case"]]
        if c0:
            best = min(c0[0]["tkd_sweep"], key=lambda t: c0[0]["tkd_sweep"][t]["nrmse"])
            curve["reference"] = {f"TKD best ({best})": c0[0]["tkd_sweep"][best]["nrmse"]}
            if "MEDI" in c0[0]["methods"]:
                curve["reference"]["MEDI"] = c0[0]["methods"]["MEDI"]["nrmse"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = ("python benchmarks/bench_adapt.py" + (f" --weights {args.weights}" if args.weights else "")
           + (f" --pipeline {args.pipeline}" if args.pipeline else "")
           + (" --no-medi" if args.no_medi else "") + (" --no-uqsm" if args.no_uqsm else "")
           + (" --no-finetune" if args.no_finetune else "") + (" --no-protocol" if args.no_protocol else "")
           + (f" --jobs {args.jobs}" if args.jobs != 2 else "")
           + (f" --reuse {args.reuse}" if args.reuse else "")
           + (f" --protocol-train {args.protocol_train}" if tuple(map(int, args.protocol_train.split(","))) != PROTOCOL_TRAIN
              else ""))
    print(assemble(cases, curve, timing, weights, out, cmd, proto=proto, pipeline=args.pipeline,
                   drift=reuse_drift(cases, work)))
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
