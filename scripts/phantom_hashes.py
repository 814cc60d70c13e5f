"""Hashes of make_phantom outputs for a few configs (before/after the split of core/sim/phantom.py, issue 23).

Usage: PYTHONPATH=<checkout> python scripts/phantom_hashes.py OUT.json [CONFIG ...]; run once on the old
checkout and once on the new one and compare the two JSON files (every array field and info() hashed).
"""
import dataclasses, hashlib, json, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
import napari_qsm
from napari_qsm.core.sim.phantom import make_phantom, oblique_direction, CLINICAL
print("using", napari_qsm.__file__, file=sys.stderr)

CONFIGS = {
    "ideal_small": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=1),
    "ideal_snr_oblique_nominal": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=2, snr=30.0,
                                      b0_direction=oblique_direction(20, "x"), randomize=False),
    "ideal_clinical_thick": dict(shape=(96, 112, 24), voxel_size=(1.5, 1.5, 6.0), seed=5, snr=40.0),
    "honest_small": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=3, snr=40.0, honest=True),
    "honest_clinical": dict(shape=(96, 112, 24), voxel_size=(1.5, 1.5, 6.0), seed=6, snr=40.0, honest=True,
                            b0_direction=oblique_direction(10, "x")),
    "honest_nonoise_edit": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=7, honest=True, texture=False),
    "raw_background": dict(shape=(48, 56, 48), voxel_size=(3.0, 3.0, 3.0), seed=4, snr=50.0, honest=True,
                           background=True, keep_echoes=True),
    "raw_background_noshim": dict(shape=(40, 48, 40), voxel_size=(3.5, 3.5, 3.5), seed=8, snr=50.0, honest=True,
                                  background=True, shim_order=None, noise_seed=3),
    "demo": dict(shape=(128, 152, 128), voxel_size=(1.25, 1.25, 1.25), seed=0, snr=50.0),
    "honest_1mm": dict(shape=(112, 128, 112), voxel_size=(1.0, 1.0, 1.0), seed=0, snr=40.0, honest=True),
}


def edit(grid):
    grid.chi[grid.labels == 5] += 0.01


def digest(ph):
    out = {}
    for f in dataclasses.fields(ph):
        v = getattr(ph, f.name)
        if isinstance(v, np.ndarray):
            a = np.ascontiguousarray(v)
            out[f.name] = f"{a.dtype}{a.shape}:" + hashlib.sha256(a.tobytes()).hexdigest()[:20]
        else:
            out[f.name] = json.dumps(v, sort_keys=True, default=str)
    out["info"] = hashlib.sha256(json.dumps(ph.info(), sort_keys=True).encode()).hexdigest()[:20]
    return out


names = sys.argv[2:] or list(CONFIGS)
res = {}
for n in names:
    kw = dict(CONFIGS[n])
    if n == "honest_nonoise_edit":
        kw["edit"] = edit
    t = time.time()
    res[n] = digest(make_phantom(device="cpu", **kw))
    print(n, f"{time.time() - t:.1f}s", file=sys.stderr, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1, sort_keys=True)
