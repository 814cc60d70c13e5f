"""QSMInvNet+ benchmark: architecture numbers, inference time / peak memory, training throughput,
achieved GFLOP/s against a plain conv3d, and validation against TKD.

    python benchmarks/bench_nn.py [--weights CKPT] [--skip-validation] [--threads 2]

Writes docs/benchmarks/nn.md and docs/benchmarks/nn.json. Inference is timed in a fresh
subprocess so that its peak resident memory (VmHWM, includes torch and the input arrays) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DOCS = ROOT / "docs" / "benchmarks"

_INFER_CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
torch.set_num_threads(int(sys.argv[4]))
from napari_qsm.nn.infer import load_model, predict
f = np.load(sys.argv[1]); m = np.load(sys.argv[2]); geom = json.loads(sys.argv[6])
w = None if sys.argv[3] == "-" else sys.argv[3]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_model(w, device="cpu")
times = []
for i in range(int(sys.argv[5])):
    t = time.perf_counter(); chi, info = predict(model, f, m, device="cpu", **geom); times.append(time.perf_counter() - t)
# the dsbn method's data consistency after the network, at its defaults (what `--method dsbn` adds)
from napari_qsm.core.inversion.consistency import data_consistency
from napari_qsm.nn.infer import DC_ITERATIONS, DC_MU
dc_times = []
for i in range(int(sys.argv[5])):
    t = time.perf_counter()
    _, dc = data_consistency(f, m, chi, mu=DC_MU, iterations=DC_ITERATIONS, return_info=True, **geom)
    dc_times.append(time.perf_counter() - t)
x = torch.randn(dc["fft_shape"])
t = time.perf_counter()
for _ in range(3):
    torch.fft.irfftn(torch.fft.rfftn(x), s=x.shape)
fft_pair = (time.perf_counter() - t) / 3
def vmhwm():
    # VmHWM is this process's own high-water mark (ru_maxrss would include the parent's RSS at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": times, "dc_seconds": dc_times, "dc": dc, "dc_fft_pair_seconds": fft_pair,
                  "load_average": list(__import__("os").getloadavg()), "rss_before_mb": rss0 / 1024, "peak_rss_mb": vmhwm(), "info": info}))
"""


def conv3d_gflops(threads: int, channels: int = 32, size: int = 64, reps: int = 3) -> float:
    torch.set_num_threads(threads)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1, bias=False).eval()
    x = torch.randn(1, channels, size, size, size)
    with torch.no_grad():
        conv(x)
        best = 1e9
        for _ in range(reps):
            t = time.perf_counter()
            conv(x)
            best = min(best, time.perf_counter() - t)
    flops = 2.0 * 27 * channels * channels * size ** 3
    return flops / best / 1e9


def inference_bench(weights, threads: int, passes: int = 2) -> dict:
    from napari_qsm.core.sim.phantom import RESEARCH, make_phantom, oblique_direction

    ph = make_phantom(RESEARCH["shape"], RESEARCH["voxel_size"], oblique_direction(10, "x"), seed=31, snr=100.0,
                      device="cpu")
    with tempfile.TemporaryDirectory() as d:
        fp, mp = Path(d) / "f.npy", Path(d) / "m.npy"
        np.save(fp, ph.field)
        np.save(mp, ph.mask)
        out = subprocess.run([sys.executable, "-c", _INFER_CHILD, str(fp), str(mp), weights or "-", str(threads), str(passes),
                              json.dumps({"voxel_size": list(ph.voxel_size), "b0_direction": [float(v) for v in ph.b0_direction]})],
                             capture_output=True, text=True, cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["shape"] = list(RESEARCH["shape"])
    return res


def training_throughput(losses_csv: Path, batch: int) -> dict:
    import csv

    p = Path(losses_csv)
    if not p.exists():
        return {}
    with open(p) as fh:
        rows = list(csv.DictReader(fh))
    st = np.array([float(r["step_seconds"]) for r in rows if r.get("step_seconds")])
    ds = np.array([float(r["data_seconds"]) for r in rows if r.get("data_seconds")])
    return {"steps": len(rows), "median_step_seconds": float(np.median(st)), "mean_step_seconds": float(st.mean()),
            "median_data_seconds": float(np.median(ds)) if ds.size else None,
            "patches_per_second_median": batch / float(np.median(st)),
            "wall_seconds": float(rows[-1]["seconds"]) if rows else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-validation", action="store_true")
    ap.add_argument("--also-threads", type=int, default=2, help="one more inference pass with this many threads (0 = skip)")
    ap.add_argument("--quick-validation", action="store_true")
    ap.add_argument("--validation-json", default=None,
                    help="reuse results of `python -m src_models.validate_qsminvnet` instead of recomputing")
    ap.add_argument("--losses", default=str(ROOT / "src_models" / "qsminvnet_plus_losses.csv"),
                    help="losses.csv of the shipped weights' training run (committed copy by default)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from napari_qsm.nn.infer import load_model
    from napari_qsm.nn.unet import count_parameters, flops_per_voxel

    model = load_model(args.weights)
    cfg = model.config
    card = getattr(model, "card", {}) or {}
    fpv = flops_per_voxel(cfg)
    res = {"hardware": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                        "cpus": os.cpu_count(), "torch": torch.__version__,
                        "note": "machine shared with other jobs during the run: timings are upper bounds"},
           "architecture": {"base_width": cfg.base_width, "num_domains": cfg.num_domains,
                            "parameters": count_parameters(model), "forward_flops_per_voxel": fpv["forward"],
                            "train_flops_per_voxel": fpv["train_step"],
                            "checkpoint_bytes": Path(model.weights_path).stat().st_size}}
    print("conv3d microbenchmark ...", flush=True)
    res["conv3d_gflops"] = conv3d_gflops(args.threads)
    print("inference 160x192x160 ...", flush=True)
    inf = inference_bench(args.weights, args.threads)
    pv = int(np.prod(inf["info"]["padded_shape"]))
    inf["achieved_gflops"] = fpv["forward"] * pv / min(inf["seconds"]) / 1e9
    res["inference"] = inf
    if args.also_threads and args.also_threads != args.threads:
        inf2 = inference_bench(args.weights, args.also_threads, passes=1)
        inf2["achieved_gflops"] = fpv["forward"] * pv / min(inf2["seconds"]) / 1e9
        res["inference_other_threads"] = {"threads": args.also_threads, **inf2}
    batch = card.get("training", {}).get("train_config", {}).get("batch_size", 1)
    patch = card.get("training", {}).get("data_recipe", {}).get("patch", [48, 48, 48])
    tr = training_throughput(Path(args.losses), batch)
    if tr:
        tr["achieved_gflops_median"] = fpv["train_step"] * batch * float(np.prod(patch)) / tr["median_step_seconds"] / 1e9
        tr["patch"] = patch
        tr["batch"] = batch
    res["training"] = tr
    if args.validation_json:
        res["validation"] = json.loads(Path(args.validation_json).read_text())
    elif not args.skip_validation:
        from src_models.validate_qsminvnet import CASES, table, validate

        cases = [CASES[0], CASES[2]] if args.quick_validation else CASES
        res["validation"] = validate(args.weights, cases)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "nn.json").write_text(json.dumps(res, indent=2, default=str))
    a, i = res["architecture"], res["inference"]
    lines = [
        "# QSMInvNet+ benchmark",
        "",
        f"Regenerate: `python benchmarks/bench_nn.py` (weights: `{Path(model.weights_path).name}`, "
        f"sha256 `{model.weights_sha256[:16]}…`). CPU: {res['hardware']['cpu']}, {args.threads} threads, "
        f"torch {torch.__version__}. The machine was shared with other jobs (load average well above the "
        "core count), so the times are upper bounds.",
        "",
        "## Architecture",
        "",
        "| base width | domains | parameters | checkpoint | forward FLOP/voxel | train FLOP/voxel |",
        "|---|---|---|---|---|---|",
        f"| {a['base_width']} | {a['num_domains']} | {a['parameters']:,} | {a['checkpoint_bytes'] / 2 ** 20:.1f} MiB | "
        f"{a['forward_flops_per_voxel'] / 1e3:.1f} k | {a['train_flops_per_voxel'] / 1e3:.1f} k |",
        "",
        "## Inference, 1 mm head 160×192×160 (CPU)",
        "",
        "| padded shape | tiles | time (best of 2) | peak RSS | achieved GFLOP/s | plain conv3d GFLOP/s |",
        "|---|---|---|---|---|---|",
        f"| {i['info']['padded_shape']} | {i['info']['tiles']} | {min(i['seconds']):.1f} s | {i['peak_rss_mb'] / 1024:.2f} GB | "
        f"{i['achieved_gflops']:.1f} | {res['conv3d_gflops']:.1f} |",
        "",
        "Targets (issue 4): ≤ 30 s and ≤ 4 GB. Plain conv3d: one Conv3d 32→32, 3³, on 64³ (forward, no grad), "
        f"{args.threads} thread(s).",
        "",
        "The dsbn method follows the network with its data consistency (`core/inversion/consistency.py`, "
        f"{i['dc']['iterations']} CG iterations, μ {i['dc']['mu']}, FFT grid {i['dc']['fft_shape']}):",
        "",
        "| network | data consistency | network + DC (issue 26 target ≤ 10 s) | DC in FFT pairs of its grid | "
        "load average (1, 5, 15 min) |",
        "|---|---|---|---|---|",
        f"| {min(i['seconds']):.1f} s | {min(i['dc_seconds']):.1f} s | {min(i['seconds']) + min(i['dc_seconds']):.1f} s | "
        f"{min(i['dc_seconds']) / i['dc_fft_pair_seconds']:.0f} | {', '.join(f'{v:.1f}' for v in i['load_average'])} |",
        "",
    ]
    if "inference_other_threads" in res:
        o = res["inference_other_threads"]
        lines += [f"With {o['threads']} threads (one pass): {min(o['seconds']):.1f} s, peak RSS {o['peak_rss_mb'] / 1024:.2f} GB, "
                  f"{o['achieved_gflops']:.1f} GFLOP/s. On this contended machine more threads can be slower "
                  "(OpenMP threads wait for each other when another job holds a core).", ""]
    if tr:
        lines += ["## Training throughput (from the shipped run's losses.csv)", "",
                  "| patch | batch | steps | median s/step | patches/s | data s/step (median) | achieved GFLOP/s | wall time |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {'×'.join(map(str, patch))} | {batch} | {tr['steps']} | {tr['median_step_seconds']:.2f} | "
                  f"{tr['patches_per_second_median']:.2f} | {tr['median_data_seconds']:.2f} | "
                  f"{tr['achieved_gflops_median']:.1f} | {tr['wall_seconds'] / 60:.0f} min |", ""]
    if "validation" in res:
        from src_models.validate_qsminvnet import table

        lines += ["## Validation against TKD (unseen phantoms)", "",
                  "Seeds never used in training; TKD at its best threshold per case (oracle). "
                  "`python -m src_models.validate_qsminvnet` regenerates this table.", "",
                  table(res["validation"])]
    (DOCS / "nn.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
