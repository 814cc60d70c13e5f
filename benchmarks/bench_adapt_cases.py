"""Adaptation variants on several cases of bench_adapt, with and without the data consistency (issue 26).

    python benchmarks/bench_adapt_cases.py --cases 5,6,7,8,9 --variants tv=100 tv=0 [--work DIR] [--out DIR]

The cases are bench_adapt's honest clinical slabs (:func:`bench_adapt.make_case`; 5–9 are the protocol-training
cases, the ones defaults may be tuned on; 0–4 are the evaluation cases). Per case: the base network alone and
the dsbn method (base + its data consistency); per AdaptParams variant (``K=V[,K=V]``, the others at their
defaults): the adapted χ as ``adapt`` returns it (network + data consistency) and the adapted network alone
(the same run, ``predict`` of the adapted model). Demeaned NRMSE and HFEN (%, napari_qsm.core.metrics) per case
and their mean; the number of cases where the row beats base + DC. Each (case, variant) is cached in
``work/<network cache key>/vcase{i}.json``; the phantoms in ``work/cases`` (shared with bench_adapt's
``--work``). Writes ``adapt_cases_<cases>.md`` / ``.json`` in ``--out``. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adapt as B  # noqa: E402


def _case_rows(i: int, weights: str, work: Path, variants: list[str]) -> dict:
    from napari_qsm.core.params import make_params, parse_cli_params
    from napari_qsm.methods import reconstruct
    from napari_qsm.nn.adapt import AdaptParams, adapt
    from napari_qsm.nn.infer import load_model, predict

    f = work / B._cache_key(weights) / f"vcase{i}.json"
    rec = json.loads(f.read_text()) if f.exists() else {}
    todo = [v for v in ["base", *variants] if v not in rec]
    if not todo:
        return rec
    scan, chi, _ = B.load_case(i)
    geo = dict(domain="auto", voxel_size=scan.voxel_size, b0_direction=scan.b0_direction)
    for v in todo:
        t, load0 = time.perf_counter(), os.getloadavg()[0]
        if v == "base":
            net, _ = predict(load_model(weights), scan.field, scan.mask, **geo)
            dc = reconstruct(scan, "dsbn", {"reference": "none"}, weights=weights, device="cpu").chi
        else:
            r = adapt(scan, make_params(AdaptParams, parse_cli_params(v.split(","))), weights=weights, device="cpu")
            net, _ = predict(r.model, scan.field, scan.mask, **geo)
            dc = r.chi
        rec[v] = {"dc": B._metrics(dc, chi, scan.mask), "net": B._metrics(net, chi, scan.mask),
                  "seconds": round(time.perf_counter() - t, 1), "load": round(0.5 * (load0 + os.getloadavg()[0]), 1)}
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(rec, indent=1))
        print(i, v, {k: round(rec[v][k]["nrmse_demeaned"], 2) for k in ("dc", "net")}, flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="5,6,7,8,9")
    ap.add_argument("--variants", nargs="+", default=["tv=100", "tv=0"], metavar="K=V[,K=V]")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--work", default="/tmp/bench_adapt")
    ap.add_argument("--out", default=str(B.ROOT / "docs" / "benchmarks"))
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from napari_qsm.core.params import params_to_dict
    from napari_qsm.nn.adapt import AdaptParams
    from napari_qsm.nn.infer import default_weights_path, file_sha256

    weights = str(Path(args.weights).resolve()) if args.weights else str(default_weights_path())
    work = Path(args.work)
    B.CASE_DIR = work / "cases"
    ids = [int(x) for x in args.cases.split(",") if x]
    recs = {i: _case_rows(i, weights, work, args.variants) for i in ids}
    rows = [("base", "dc", "QSMInvNet+ base + DC (the dsbn method)"), ("base", "net", "QSMInvNet+ base, network alone")]
    for v in args.variants:
        rows += [(v, "dc", f"adapted {v} + DC (what adapt returns)"), (v, "net", f"adapted {v}, network alone")]
    ref = [recs[i]["base"]["dc"]["nrmse_demeaned"] for i in ids]
    md = [f"# Adaptation variants on cases {args.cases}, with and without the data consistency", "",
          f"`python benchmarks/bench_adapt_cases.py --cases {args.cases} --variants {' '.join(args.variants)}` "
          f"(weights sha256 {file_sha256(weights)[:16]}…; bench_adapt's honest clinical slabs; other AdaptParams at "
          f"their defaults: {', '.join(f'{k}={v}' for k, v in params_to_dict(AdaptParams()).items())}). Demeaned "
          "NRMSE / HFEN % in the brain mask; \"wins\": cases where the row's demeaned NRMSE is below base + DC's. "
          "Seconds: wall time of the run that made the row (1 torch thread), load: the 1-minute load average "
          "(mean of start and end).", "",
          "| row | " + " | ".join(f"case {i}" for i in ids) + " | mean | wins vs base + DC |",
          "|---|" + "---|" * (len(ids) + 2)]
    summary = {}
    for v, kind, label in rows:
        vals = [recs[i][v][kind] for i in ids]
        nd = np.array([x["nrmse_demeaned"] for x in vals])
        hf = np.array([x["hfen"] for x in vals])
        wins = int((nd < np.array(ref)).sum())
        summary[label] = {"nrmse_demeaned": float(nd.mean()), "hfen": float(hf.mean()), "wins": wins}
        md.append(f"| {label} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(nd, hf))
                  + f" | **{nd.mean():.1f}** / {hf.mean():.1f} | {'–' if (v, kind) == ('base', 'dc') else f'{wins}/{len(ids)}'} |")
    md += ["", "Seconds (load) per case and variant: " + "; ".join(
        f"case {i}: " + ", ".join(f"{v} {recs[i][v]['seconds']} s ({recs[i][v]['load']})" for v in ["base", *args.variants])
        for i in ids) + "."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"adapt_cases_{args.cases.replace(',', '-')}"
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"cases": ids, "variants": args.variants, "summary": summary,
                                                  "per_case": {str(i): recs[i] for i in ids}}, indent=1))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
