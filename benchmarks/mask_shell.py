"""The mask's outer shell on bench_field.py's heads (issue 24): bone, brain and margin per shell test.

    nice -n 10 python benchmarks/mask_shell.py --cache DIR [--heads phantom:slab shapes:slab phantom:head1mm
        phantom-s1:slab shapes-s1:slab] [--variants edge_contrast=magnitude,edge_fraction=1.0 edge_fraction=0.9]

Reads each head's echo fit (the default chain's ``run_GEN_CASE.pkl``) and echoes from bench_field.py's cache
(run bench_field.py first), draws the generator's labels again (same seed and grid; the cache keeps no labels)
and runs the default mask step with each variant of its parameters (``name=value`` pairs joined by commas;
an empty string is the default). Prints, per head and variant: mask voxels, the fraction of the generator's
brain inside the mask, the skull voxels inside it (a voxel is skull when most of its fine points are) and the
voxels outside the brain (the margin background removal gets).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_field as B  # noqa: E402


def labels(case: str, gen: str):
    """(labels, skull label) of a bench_field head, drawn again by its generator."""
    c = B.CASES[case]
    g, seed = B.split_gen(gen)
    if g == "phantom":
        from napari_qsm.core.sim.phantom import CLINICAL_ECHOES, RESEARCH_ECHOES, make_phantom
        ph = make_phantom(c["shape"], c["voxel_size"], seed=seed, snr=50.0, honest=True, background=True,
                          keep_echoes=False, shim_order=2, device="cpu",
                          echo_protocol=CLINICAL_ECHOES if c["protocol"] == "clinical" else RESEARCH_ECHOES)
        return ph.labels, 14
    from napari_qsm.core.sim.shapes import make_head
    te = (tuple(0.0126 + 0.0041 * i for i in range(7)) if c["protocol"] == "clinical"
          else (0.004, 0.008, 0.012, 0.016, 0.020))
    return make_head(c["shape"], c["voxel_size"], seed=seed, te=te, snr=40.0, device="cpu").labels, 2


def variant(text: str) -> dict:
    out = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=", 1)
        out[k] = v
    return out


def main(argv=None):
    import torch
    from napari_qsm.core.field import unwrap
    from napari_qsm.core.field.pipeline import find_step
    from napari_qsm.core.params import make_params

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--heads", nargs="+", default=["phantom:slab", "shapes:slab", "phantom:head1mm"])
    ap.add_argument("--variants", nargs="+", default=["edge_contrast=magnitude,edge_fraction=1.0", ""])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.modules["__main__"].Truth = B.Truth           # the cache's pickles name bench_field's Truth as __main__'s
    cache = B.Cache(Path(a.cache), readonly=True)
    step = find_step("mask")
    print("| head | mask parameters | mask voxels | brain inside | skull voxels inside | voxels outside the brain |")
    print("|---|---|---|---|---|---|")
    for head in a.heads:
        gen, case = head.split(":")
        with open(cache.dir / f"run_{gen}_{case}.pkl", "rb") as f:
            tot = pickle.load(f)[0]
        t = cache.truth(case, gen)
        lab, skull_label = labels(case, gen)
        skull = lab == skull_label
        e = t.echoes
        q = unwrap.voxel_quality(e.phase[..., :2], e.magnitude[..., :2], e.te[:2])
        for v in a.variants:
            p = make_params(step.params_cls, variant(v))
            m = step.run(tot.magnitude, p, quality=q, voxel_size=tot.voxel_size, misfit=tot.misfit,
                         r2star=tot.r2star, te=tot.te)
            print(f"| {gen} {case} | {v or 'default'} | {int(m.sum())} | {100 * (m & t.brain).sum() / t.brain.sum():.2f} % "
                  f"| {int((m & skull).sum())} ({100 * (m & skull).sum() / skull.sum():.2f} %) "
                  f"| {int((m & ~t.brain).sum())} |", flush=True)


if __name__ == "__main__":
    main()
