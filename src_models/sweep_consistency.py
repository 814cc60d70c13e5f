"""The sweep that chose the dsbn method's data-consistency defaults (issue 26), on the SELECTION set only.

    python -m src_models.sweep_consistency [--mu 0.001 0.003 0.01] [--iterations 5 10 20 40] [--pad 1.0 1.2 1.5]
        [--weighted] [--head NPZ]

For every selection case of :mod:`src_models.validate_families`: the shipped network's χ, then
:func:`napari_qsm.core.inversion.consistency.data_consistency` for each (μ, padding, iterations); prints
the mean demeaned NRMSE / HFEN / XSIM and the CPU seconds of each setting (1 thread), with TKD at its
best δ and the raw network for reference. ``--weighted``: 1/N_std data weights (as the dsbn method when
the scan has a noise map). ``--head NPZ``: the cached whole head of benchmarks/bench_inversions.py (its
selection head is ``.../head_160x192x160_1mm_seed1_snr40.npz``) instead of the selection crops. The chosen setting is written into
:data:`napari_qsm.nn.infer.DC_ITERATIONS` / :data:`~napari_qsm.nn.infer.DC_MU` by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np
import torch

from src_models.validate_families import _Case, cases, make_case
from src_models.validate_qsminvnet import best_tkd, metrics


def _cases(head):
    """(name, case) pairs: the selection crops, or one cached bench_inversions head."""
    if head is None:
        for c in cases("selection"):
            yield c["name"], _Case(make_case(c))
        return
    from types import SimpleNamespace

    z = np.load(head)
    yield Path(head).name, SimpleNamespace(field=z["field"], mask=z["mask"] > 0, chi=z["chi"],
                                           noise_std=z["noise_std"], voxel_size=tuple(z["voxel_size"]),
                                           b0_direction=tuple(z["b0"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mu", type=float, nargs="+", default=[0.001, 0.003, 0.01])
    ap.add_argument("--iterations", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--pad", type=float, nargs="+", default=[1.0, 1.2, 1.5])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--weighted", action="store_true", help="1/N_std data weights")
    ap.add_argument("--head", default=None, help="a bench_inversions head (.npz) instead of the selection crops")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from napari_qsm.core.inversion.consistency import data_consistency
    from napari_qsm.nn.infer import load_model, predict

    from napari_qsm.nn.infer import consistency_weight

    model = load_model(args.weights)
    rows = {}
    for name, ph in _cases(args.head):
        chi_nn, _ = predict(model, ph.field, ph.mask, voxel_size=ph.voxel_size, b0_direction=ph.b0_direction)
        if args.head is None:
            rows.setdefault("TKD best δ", []).append(best_tkd(ph)[1])
        rows.setdefault("network", []).append(metrics(chi_nn, ph))
        w = consistency_weight(ph.noise_std, ph.mask)[0] if args.weighted else None
        for mu, pad, it in itertools.product(args.mu, args.pad, args.iterations):
            t = time.process_time()
            x = data_consistency(ph.field, ph.mask, chi_nn, ph.voxel_size, ph.b0_direction, weight=w, mu=mu,
                                 iterations=it, pad_factor=pad)
            m = dict(metrics(x, ph), cpu_seconds=time.process_time() - t)
            rows.setdefault(f"μ {mu}, pad {pad}, {it} iterations", []).append(m)
        print(f"{name} done", flush=True)
    print("| setting | demeaned NRMSE % | HFEN % | XSIM | CPU s (1 thread) |\n|---|---|---|---|---|")
    for name, ms in rows.items():
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ("nrmse_demeaned", "hfen", "xsim")}
        cpu = np.mean([m.get("cpu_seconds", np.nan) for m in ms])
        print(f"| {name} | {mean['nrmse_demeaned']:.2f} | {mean['hfen']:.2f} | {mean['xsim']:.3f} | {cpu:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
