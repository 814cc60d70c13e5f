"""LBV's boundary band kept or peeled, per inversion, on the adaptation benchmark's heads in air (issues 24, 26).

    python benchmarks/peel_by_method.py [--cases 0 1 2 3 4] [--methods tkd medi medi_wh dsbn] [--peels 0 2]

The heads are ``bench_adapt.make_case(i, pipeline="lbv")``'s: domain-shifted clinical slabs (192×224×48 at
0.75×0.75×3 mm, 7 echoes, B0 tilted 10–20°, microbleeds, a ring lesion, a calcified plaque) sitting in air with
skull and sinuses. Their raw echoes go through the default chain (fit, mask, unwrap, LBV) once per ``peel``
(LBV's ``peel``: boundary layers removed from the returned mask; the default is 0), then through each method
with its registry defaults (TKD at δ 0.3, the benchmark's best δ; ``medi``: MEDI with ``weak_harmonic=off``, ``medi_wh``: with ``weak_harmonic=on``). Demeaned NRMSE and HFEN % over the
phantom's whole brain, χ = 0 where the chain's mask drops voxels (dropped voxels count as error), and the
coverage (fraction of the brain in the chain's mask). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def case_echoes(i: int):
    """(raw echoes, phantom, χ truth) of bench_adapt's pipeline case ``i`` (its own make_case, intercepted)."""
    import bench_adapt as B
    import napari_qsm.core.field.pipeline as P

    got = {}
    make, run = B.make_phantom, P.local_field

    def keep_phantom(*a, **k):
        got["ph"] = make(*a, **k)
        return got["ph"]

    def keep_echoes(echoes, recipe, **k):
        got["echoes"] = echoes
        return run(echoes, recipe, **k)

    B.make_phantom, P.local_field = keep_phantom, keep_echoes
    try:
        _, chi, _ = B.make_case(i, pipeline="lbv")
    finally:
        B.make_phantom, P.local_field = make, run
    return got["echoes"], got["ph"], chi


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=["tkd", "medi", "medi_wh", "dsbn"])
    ap.add_argument("--peels", type=int, nargs="+", default=[0, 2])
    args = ap.parse_args(argv)
    # "medi" is MEDI without φ: weak_harmonic's default (auto) would turn it on for these local_field() scans
    variants = {"tkd": ("tkd", {"threshold": 0.3}), "medi": ("medi", {"weak_harmonic": "off"}),
                "medi_wh": ("medi", {"weak_harmonic": "on"})}
    torch.set_num_threads(1)
    from napari_qsm.core import metrics as M
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.methods import reconstruct

    print("| case | LBV peel | coverage | " + " | ".join(f"{m} dNRMSE / HFEN" for m in args.methods) + " |")
    print("|---|---|---|" + "---|" * len(args.methods))
    for i in args.cases:
        echoes, ph, chi = case_echoes(i)
        brain = ph.mask.astype(bool)
        for peel in args.peels:
            scan = local_field(echoes, FieldRecipe(background="lbv", params={"background": {"peel": peel}}),
                               device="cpu").scan
            m = scan.mask.astype(bool)
            cells = []
            for meth in args.methods:
                t = time.time()
                name, params = variants.get(meth, (meth, {}))
                x = reconstruct(scan, name, params, device="cpu").chi * m
                cells.append(f"{M.nrmse_demeaned(x, chi, brain):.1f} / {M.hfen(x, chi, brain):.1f}")
                print(f"  case {i} peel {peel} {meth}: {time.time() - t:.0f} s", file=sys.stderr)
            print(f"| {i} | {peel} | {(m & brain).sum() / brain.sum():.3f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
