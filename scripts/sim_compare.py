"""Before/after check of the simulators' arrays (issue 23: the fine-grid forward model and the painting
now run in blocks). Run ``save`` in each checkout, then ``compare``:

    PYTHONPATH=/work/main python scripts/sim_compare.py save /tmp/before.npz
    PYTHONPATH=$PWD       python scripts/sim_compare.py save /tmp/after.npz
    python scripts/sim_compare.py compare /tmp/before.npz /tmp/after.npz

Cases: the raw clinical slab (0.75×0.75×3 mm, head in air, seed 1), an honest 1.5 mm head without
background (the brain-support forward model), and the shapes generator's head in air (2 mm and a
crop). One torch thread. Prints per array: bit-identical or the max abs difference and max |before|.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np


def cases():
    from napari_qsm.core.sim.phantom import CLINICAL, make_phantom
    from napari_qsm.core.sim.shapes import make_head
    yield "slab_raw", make_phantom(**CLINICAL, seed=1, snr=50.0, honest=True, background=True, keep_echoes=True,
                                   device="cpu")
    yield "honest_1p5mm", make_phantom(shape=(104, 128, 104), voxel_size=(1.5, 1.5, 1.5), seed=2, snr=40.0,
                                       honest=True, device="cpu")
    yield "shapes_head", make_head(shape=(80, 96, 80), voxel_size=(2.0, 2.0, 2.0), seed=3, device="cpu")
    yield "shapes_crop", make_head(shape=(64, 64, 48), voxel_size=(1.0, 1.0, 1.0), seed=4, crop=True, device="cpu")


def arrays(obj, prefix=""):
    items = (obj.items() if isinstance(obj, dict) else
             ((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else ())
    for k, v in items:
        if isinstance(v, np.ndarray) and v.dtype != object:
            yield prefix + k, v
        elif isinstance(v, dict) or dataclasses.is_dataclass(v):
            yield from arrays(v, prefix + k + ".")


def save(path):
    import torch
    torch.set_num_threads(1)
    out = {}
    for name, obj in cases():
        for k, v in arrays(obj):
            out[f"{name}:{k}"] = v
    np.savez(path, **out)


def compare(a_path, b_path) -> int:
    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    for k in sorted(set(a.files) | set(b.files)):
        if k not in a.files or k not in b.files or a[k].shape != b[k].shape:
            print(f"{k}: missing or reshaped")
            bad = 1
            continue
        x, y = a[k], b[k]
        if np.array_equal(x, y, equal_nan=True):
            print(f"{k}: bit-identical")
            continue
        if np.iscomplexobj(x):
            d, m = np.abs(x - y).max(), np.abs(x).max()
        else:
            d, m = np.abs(x.astype(np.float64) - y).max(), np.abs(x.astype(np.float64)).max()
        print(f"{k}: max |diff| {d:.3g} (max |before| {m:.3g}, ratio {d / max(m, 1e-30):.2g})")
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
