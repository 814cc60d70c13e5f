"""Mask benchmark (issue 24): brain mask and χ from raw echoes on two independent generators.

Two stages, so that the same echoes run through any version of the code:

    python benchmarks/bench_mask.py make CASE DIR       # echoes + truth → DIR/CASE.npz (needs this branch)
    python benchmarks/bench_mask.py run DIR/CASE.npz    # default field chain → MEDI; prints one JSON line

Cases: ``shapes2mm`` (napari_qsm.core.sim.shapes.make_head, 96³, 2 mm, seed 1, SNR 40, one channel),
``phantom1mm`` (core.sim.phantom.make_phantom, 160×192×160, 1 mm, seed 0, SNR 50, honest, head in air,
2nd-order shim, 5 echoes), ``phantom2p5`` (64×76×64, 2.5 mm, the same otherwise).
``run`` reports: mask Dice against the true brain, voxels of the mask outside the brain and on
bone, the eroded mask's coverage of the brain, and MEDI χ's demeaned NRMSE (%) in the true brain
mask (χ = 0 where the chain's eroded mask dropped a voxel: counted as error) and in
(true brain ∩ eroded mask). Default chain and MEDI parameters, CPU, one torch thread.
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
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    else:
        print(json.dumps(run(sys.argv[2])), flush=True)
