"""Where the front end's χ error sits (issue 24): the slab's MEDI error split by what feeds LBV.

    nice -n 10 python benchmarks/field_decompose.py --cache DIR --cases slab --generator phantom shapes [--seed N]

Reads the heads and the default chain's run from bench_field.py's cache (run bench_field.py first) and
runs LBV (the default background step) then MEDI (registry defaults, the chain's magnitude and N_std)
on four inputs, each scored like bench_field.py (demeaned NRMSE over the generator's brain mask,
dropped voxels count as error):

* ``raw / chain mask``: the chain's total field in its brain mask (what the default chain gives);
* ``true total / chain mask``: the generator's true total field in the same mask (the echo fit's and
  the partial-volume voxels' field error removed);
* ``true local / chain mask``: the true local field in the same mask (the background sources inside
  the mask removed too; what is left is the harmonic part of the local field LBV takes away);
* ``true local / true brain``: the same on the generator's brain mask (the chain mask's margin gone);

and the true local field itself (MEDI alone). The steps between the rows are the decomposition.
Writes docs/benchmarks/field_decompose.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_field as B  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("raw/chain", "raw total field, chain mask (the default chain)"),
        ("true/chain", "true total field, chain mask"),
        ("local/chain", "true local field, chain mask"),
        ("local/brain", "true local field, generator's brain mask"),
        ("truth", "true local field, no background removal (MEDI alone)")]


def one(case, gen, cache, key):
    import torch
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import find_step
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    torch.set_num_threads(1)
    bench = {"raw/chain": "lbv/raw", "true/chain": "lbv/true", "truth": "truth"}.get(key)
    if bench and find_step("background").name == "lbv":     # bench_field.py's own runs of the same rows
        chi_p = cache.dir / f"chi_{gen}_{case}_medi_{bench.replace('/', '_')}.json"
        bg_p = cache.dir / f"bg_{gen}_{case}_lbv.json"
        if chi_p.exists() and (key == "truth" or bg_p.exists()):
            c = json.loads(chi_p.read_text())
            loc = 0.0 if key == "truth" else json.loads(bg_p.read_text())[bench.split("/")[1]]["nrmse"]
            return {"row": key, "local_nrmse": loc, "medi_nrmse": c["nrmse"], "coverage": c["coverage"],
                    "from": chi_p.name}
    t = cache.truth(case, gen)
    with open(cache.dir / f"run_{gen}_{case}.pkl", "rb") as f:
        tot, brain, _ = pickle.load(f)
    tb = t.brain
    if key == "truth":
        loc, em = (t.local * tb).astype(np.float32), tb
    else:
        src, mk = key.split("/")
        m = brain if mk == "chain" else tb
        f = {"raw": tot.field, "true": t.total, "local": t.local * tb}[src]
        s = find_step("background")
        loc, em = s.run(np.where(m, f, 0).astype(np.float32), m, s.params_cls(), voxel_size=tot.voxel_size,
                        b0_direction=tot.b0_direction, noise_std=tot.noise_std, device="cpu")
        loc = np.where(em, loc, 0).astype(np.float32)
    scan = Scan(field=loc, mask=em, voxel_size=tot.voxel_size, b0_direction=tot.b0_direction, magnitude=tot.magnitude,
                noise_std=tot.noise_std, r2star=tot.r2star, affine=tot.affine, te=float(tot.delta_te),
                b0_tesla=tot.b0_tesla, name=key)
    c0 = time.process_time()
    chi = np.where(em, reconstruct(scan, "medi", device="cpu").chi, 0).astype(np.float32)
    return {"row": key, "local_nrmse": float(M.nrmse_demeaned(loc, t.local, tb)),
            "medi_nrmse": float(M.nrmse_demeaned(chi, t.chi, tb)), "coverage": float((em & tb).sum() / tb.sum()),
            "cpu_s": round(time.process_time() - c0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True)
    ap.add_argument("--cases", nargs="+", default=["slab"], choices=list(B.CASES))
    ap.add_argument("--generator", nargs="+", default=["phantom", "shapes"], choices=("phantom", "shapes"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    a = ap.parse_args(argv)
    cache = B.Cache(Path(a.cache))
    sys.modules["__main__"].Truth = B.Truth       # bench_field.py (run as a script) pickles its heads as __main__.Truth
    out = Path(a.out)
    pj = out / "field_decompose.json"
    res = json.loads(pj.read_text()) if pj.exists() else {}
    for g in a.generator:
        gen = B.gen_key(g, a.seed)
        for case in a.cases:
            first = sorted(ROWS, key=lambda r: r[0] in ("raw/chain", "true/chain", "truth"))   # bench_field's last
            rows = [cache.json(f"decomp_{gen}_{case}_{k.replace('/', '_')}", lambda k=k: one(case, gen, cache, k))
                    for k, _ in first]
            res[f"{gen} {case}"] = rows
            B.log(gen, case, rows)
            pj.write_text(json.dumps(res, indent=1) + "\n")
    L = ["# Where the front end's χ error sits (issue 24)", "",
         f"Made by `nice -n 10 python benchmarks/field_decompose.py {' '.join(argv if argv is not None else sys.argv[1:])}` "
         "(its docstring says what each row is); heads and the default chain from bench_field.py's cache. LBV (the "
         "default background step), then MEDI (registry defaults, the chain's magnitude and N_std). Demeaned NRMSE % "
         "over the generator's brain mask; voxels a row drops count as error.", "",
         "| head | " + " | ".join(lbl for _, lbl in ROWS) + " |", "|---|" + "---|" * len(ROWS)]
    for head, rows in res.items():
        by = {r["row"]: r for r in rows}
        L.append(f"| {head} | " + " | ".join(
            f"{by[k]['medi_nrmse']:.1f} (local {by[k]['local_nrmse']:.1f}, coverage {by[k]['coverage']:.3f})"
            if k in by else "" for k, _ in ROWS) + " |")
    L += ["", "Reading a row from left to right: raw → true total = the echo fit's and the partial-volume voxels' field "
          "error; true total → true local (chain mask) = background sources inside the chain mask (partial-volume bone "
          "and scalp); true local (chain mask) → true local alone = the harmonic part of the local field that LBV "
          "removes with the chain mask's boundary; chain mask → brain mask = what the mask's margin buys.", ""]
    (out / "field_decompose.md").write_text("\n".join(L))


if __name__ == "__main__":
    main()
