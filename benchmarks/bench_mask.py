"""Mask benchmark (issue 24): brain mask and χ from raw echoes on two independent generators.

Two stages, so that the same echoes run through any version of the code:

    python benchmarks/bench_mask.py make CASE DIR       # echoes + truth → DIR/CASE.npz (needs this branch)
    python benchmarks/bench_mask.py run DIR/CASE.npz    # default field chain → MEDI; prints one JSON line
    python benchmarks/bench_mask.py make masks DIR      # the small mask cases → DIR/masks.npz (needs this branch)
    python benchmarks/bench_mask.py masks DIR/masks.npz # the mask step alone on them; prints one JSON line each

Cases: ``shapes2mm`` (napari_qsm.core.sim.shapes.make_head, 96³, 2 mm, seed 1, SNR 40, one channel),
``phantom1mm`` (core.sim.phantom.make_phantom, 160×192×160, 1 mm, seed 0, SNR 50, honest, head in air,
2nd-order shim, 5 echoes), ``phantom2p5`` (64×76×64, 2.5 mm, the same otherwise).
``run`` reports: mask Dice against the true brain, voxels of the mask outside the brain and on
bone, the eroded mask's coverage of the brain, and MEDI χ's demeaned NRMSE (%) in the true brain
mask (χ = 0 where the chain's eroded mask dropped a voxel: counted as error) and in
(true brain ∩ eroded mask). Default chain and MEDI parameters, CPU, one torch thread.

Mask cases (``masks``; the default fit, then the default mask step with the phase quality, misfit
and R2* as the pipeline gives them): heads in air (shapes 64³ at 3 mm, seed 1; phantom 64×72×64 at
2.5 mm, seed 3, SNR 40) and tissue-only crops (shapes ``crop=True`` at 2.5 mm, seed 2; a 24×28×24
box inside the phantom's brain; the shapes crop with 8 coils combined by the root sum of squares). Reported: Dice with the true brain, FOV kept, voxels outside the
brain, bone and CSF-rim voxels kept (label of the majority of the voxel), vein voxels kept.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch


def make(case: str, path: str) -> None:
    if case == "shapes2mm":
        from napari_qsm.core.sim.shapes import make_head
        h = make_head((96, 96, 96), (2.0, 2.0, 2.0), seed=1, snr=40.0)
        out = dict(magnitude=h.magnitude, phase=h.phase, te=np.asarray(h.te), b0=h.b0_tesla,
                   voxel_size=np.asarray(h.voxel_size), affine=h.affine, chi=h.chi, mask=h.brain_mask,
                   bone=h.labels == 2)
    else:
        from napari_qsm.core.sim.phantom import make_phantom
        shape, vs = ((160, 192, 160), 1.0) if case == "phantom1mm" else ((64, 76, 64), 2.5)
        ph = make_phantom(shape, (vs,) * 3, seed=0, snr=50.0, honest=True, background=True, keep_echoes=True,
                          shim_order=2, device="cpu")
        out = dict(magnitude=np.abs(ph.echoes), phase=np.angle(ph.echoes), te=np.asarray(ph.echo_times),
                   b0=ph.b0_tesla, voxel_size=np.asarray(ph.voxel_size), affine=ph.affine, chi=ph.chi,
                   mask=ph.mask, bone=ph.labels == 14)
    np.savez_compressed(path, **out)


def make_masks(path: str) -> None:
    from napari_qsm.core.sim.phantom import make_phantom
    from napari_qsm.core.sim.shapes import make_head
    out = {}

    def put(name, mag, phase, te, vs, brain, bone, rim, vein):
        for k, v in dict(mag=mag, phase=phase, te=np.asarray(te), vs=np.asarray(vs), brain=brain, bone=bone,
                         rim=rim, vein=vein).items():
            out[f"{name}__{k}"] = v

    h = make_head((64, 64, 64), (3.0, 3.0, 3.0), seed=1)
    put("shapes_air", h.magnitude, h.phase, h.te, h.voxel_size, h.brain_mask, h.labels == 2, h.labels == 3, h.labels == 8)
    c = make_head((64, 64, 64), (2.5, 2.5, 2.5), seed=2, crop=True, cavity=False, n_coils=8)
    put("shapes_crop", c.magnitude, c.phase, c.te, c.voxel_size, c.brain_mask, c.labels == 2, c.labels == 3, c.labels == 8)
    ph = make_phantom((64, 72, 64), (2.5, 2.5, 2.5), seed=3, snr=40, honest=True, keep_echoes=True, background=True,
                      device="cpu")
    L = ph.labels
    put("phantom_air", np.abs(ph.echoes), np.angle(ph.echoes), ph.echo_times, ph.voxel_size, ph.mask, L == 14, L == 13,
        L == 10)
    c0 = np.argwhere(ph.mask).mean(0).astype(int)
    sl = tuple(slice(a - b, a + b) for a, b in zip(c0, (12, 14, 12)))
    put("phantom_crop", np.abs(ph.echoes[sl]), np.angle(ph.echoes[sl]), ph.echo_times, ph.voxel_size, ph.mask[sl],
        L[sl] == 14, L[sl] == 13, L[sl] == 10)
    np.savez_compressed(path, b0=3.0, **out)


def masks(path: str) -> list:
    import inspect
    from napari_qsm.core.field import unwrap
    from napari_qsm.core.field.pipeline import find_step
    from napari_qsm.core.field.records import Echoes

    d = np.load(path)
    rows = []
    for name in ("shapes_air", "phantom_air", "shapes_crop", "phantom_crop"):
        g = {k: d[f"{name}__{k}"] for k in ("mag", "phase", "te", "vs", "brain", "bone", "rim", "vein")}
        e = Echoes(magnitude=g["mag"], phase=g["phase"], te=tuple(g["te"]), b0_tesla=float(d["b0"]),
                   voxel_size=tuple(g["vs"]))
        total = find_step("fit").run(e, None, device="cpu")
        step = find_step("mask")
        sig = inspect.signature(step.run).parameters
        extra = {k: getattr(total, k) for k in ("misfit", "r2star", "te") if k in sig}
        q = unwrap.voxel_quality(e.phase[..., :2], e.magnitude[..., :2], e.te[:2])
        t0 = time.perf_counter()
        m = step.run(total.magnitude, None, quality=q, voxel_size=total.voxel_size, **extra)
        b = g["brain"]
        rows.append({"case": name, "dice": round(2 * float((m & b).sum()) / float(m.sum() + b.sum()), 3),
                     "fov_kept": round(float(m.mean()), 3), "outside_brain": int((m & ~b).sum()),
                     "bone": f"{int((m & g['bone']).sum())}/{int(g['bone'].sum())}",
                     "csf_rim": f"{int((m & g['rim']).sum())}/{int(g['rim'].sum())}",
                     "vein": f"{int((m & g['vein']).sum())}/{int(g['vein'].sum())}",
                     "seconds": round(time.perf_counter() - t0, 2)})
    return rows


def run(path: str) -> dict:
    from napari_qsm.core.field.pipeline import local_field
    from napari_qsm.core.field.records import Echoes
    from napari_qsm.core.metrics import nrmse_demeaned
    from napari_qsm.methods import reconstruct

    d = np.load(path)
    e = Echoes(magnitude=d["magnitude"], phase=d["phase"], te=tuple(d["te"]), b0_tesla=float(d["b0"]),
               affine=d["affine"], voxel_size=tuple(d["voxel_size"]), name="bench")
    truth, bone, chi_t = d["mask"], d["bone"], d["chi"]
    t0 = time.perf_counter()
    fr = local_field(e, device="cpu")
    t_field = time.perf_counter() - t0
    m, er = fr.brain_mask, fr.scan.mask
    t0 = time.perf_counter()
    chi = reconstruct(fr.scan, "medi", device="cpu").chi
    t_medi = time.perf_counter() - t0
    chi = np.where(er, chi, 0)
    inter = truth & er
    return {"case": path, "dice": round(2 * float((m & truth).sum()) / float(m.sum() + truth.sum()), 4),
            "mask_voxels": int(m.sum()), "outside_brain": int((m & ~truth).sum()), "bone_in_mask": int((m & bone).sum()),
            "eroded_coverage": round(float(inter.sum() / truth.sum()), 4),
            "medi_nrmse_brain": round(float(nrmse_demeaned(chi, chi_t, truth)), 1),
            "medi_nrmse_covered": round(float(nrmse_demeaned(chi, chi_t, inter)), 1),
            "seconds_field": round(t_field, 1), "seconds_medi": round(t_medi, 1)}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "make" and sys.argv[2] == "masks":
        make_masks(str(sys.argv[3]).rstrip("/") + "/masks.npz")
    elif sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "masks":
        for r in masks(sys.argv[2]):
            print(json.dumps(r), flush=True)
    else:
        print(json.dumps(run(sys.argv[2])), flush=True)
