"""The network, the adaptation and the data consistency on one demo-sized phantom (issue 26's open point).

    python benchmarks/bench_adapt_consistency.py [SEED] [SNR]      # default: seed 5 (not the demo's 0), SNR 100

Prints demeaned NRMSE and HFEN of: the raw network (dsbn, consistency=0), the dsbn method (network + data
consistency), the demo's short adaptation (20 BatchNorm steps) with consistency=0 (the adapted network alone)
and with its default (the adapted network followed by the same data consistency as dsbn, what the adaptation
returns since issue 26). One torch thread.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    seed = int(argv[0]) if argv else 5
    snr = float(argv[1]) if len(argv) > 1 else 100.0
    torch.set_num_threads(1)
    from napari_qsm import demo
    from napari_qsm.core import metrics as M
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    ph = demo._phantom("small", snr, seed=seed)
    scan = Scan(field=ph.field, mask=ph.mask, magnitude=ph.magnitude, noise_std=getattr(ph, "noise_std", None),
                voxel_size=ph.voxel_size, b0_direction=ph.b0_direction)

    def score(x):
        return f"{M.nrmse_demeaned(x, ph.chi, ph.mask):.2f} % / HFEN {M.hfen(x, ph.chi, ph.mask):.2f} %"

    net = reconstruct(scan, "dsbn", {"consistency": 0}, device="cpu").chi
    dsbn = reconstruct(scan, "dsbn", {}, device="cpu").chi
    quick = demo.QUICK_PARAMS["dsbn_adapt"]
    adapted = reconstruct(scan, "dsbn_adapt", dict(quick, consistency=0), device="cpu").chi
    adapted_dc = reconstruct(scan, "dsbn_adapt", quick, device="cpu").chi
    for name, x in (("network", net), ("network + DC (dsbn)", dsbn), ("adapted (consistency=0)", adapted),
                    ("adapted + DC (default)", adapted_dc)):
        print(f"{name}: {score(x)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
