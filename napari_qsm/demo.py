"""Headless demo: every registered method on the built-in phantom, a metrics table and a comparison PNG.

``napari-qsm demo [OUTDIR]`` (or ``python -m napari_qsm.demo``). Writes to OUTDIR:
``metrics.md`` / ``metrics.csv`` (NRMSE, HFEN, SSIM, XSIM, ... against the true χ, in the brain
mask) and ``comparison.png`` (axial, coronal and sagittal slices of every result and its difference
to the truth). COSMOS gets two extra simulated orientations (25° about x and about y).
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np


def _phantom(size: str, snr: float, seed: int = 0):
    from .core.sim.phantom import RESEARCH, make_phantom
    if size == "full":
        return make_phantom(**RESEARCH, seed=seed, snr=snr)
    return make_phantom(shape=(128, 152, 128), voxel_size=(1.25, 1.25, 1.25), seed=seed, snr=snr)


#: what the first-run demo changes from the defaults to finish in a few minutes on a 2-core CPU
#: (``full=True`` runs every method with its defaults: the adaptation alone then takes ~4 minutes).
#: The short adaptation changes only the scan domain's BatchNorm (update=bn; the synthetic batches
#: then change nothing the scan's χ depends on, so none are drawn): 20 steps of the default run on
#: all weights ended worse than the unadapted network on the demo phantom (51.1 vs 46.1 % demeaned
#: NRMSE: Adam's first steps at lr 1e-3 move the shared convolutions away from the trained base, and
#: 20 steps do not bring them back), BatchNorm only ends at 45.3 % (40 steps: 45.3 %).
QUICK_PARAMS = {"dsbn_adapt": {"steps": 20, "update": "bn", "synth_batch": 0}}
QUICK_TITLE = f"QSMInvNet+ adapted ({QUICK_PARAMS['dsbn_adapt']['steps']} steps, BatchNorm only)"
QUICK_NOTE = (f"{QUICK_TITLE}: the demo's short run adapts only the scan domain's "
              "BatchNorm (update=bn, synth_batch=0); `napari-qsm demo --full` runs the default adaptation "
              "(120 steps, all weights).")
#: THE time estimate of the demo (printed before it starts, quoted by the README; tests/test_readme.py
#: checks they agree): wall seconds of each stage on this 2-core x86_64 CPU, idle, as the demo's own
#: log reports them (``python benchmarks/bench_demo.py`` prints them per stage). Measured idle on
#: 2026-12-06 (62 s wall for the whole demo; "phantom" includes the start-up). ``dsbn_adapt_full``: the
#: default 120-step adaptation (``--full``), measured 2026-11-29. ``ilsqr`` and ``ndi`` (and a whole run of
#: 66-70 s, with dsbn's data consistency) re-measured idle on 2026-12-06 09:35 (load 1.6-1.9).
EXPECTED_SECONDS = {"phantom": 3, "tkd": 1, "tsvd": 1, "tv": 1, "rts": 2, "hdqsm": 4, "ndi": 11, "ilsqr": 5, "medi": 8,
                    "cosmos": 12, "dsbn": 2, "dsbn_adapt": 17, "dsbn_adapt_full": 270, "figure": 2}
#: a method the table does not know yet (a new or third-party one)
UNKNOWN_METHOD_SECONDS = 20


def expected_seconds(names, full: bool = False, size: str = "small") -> float:
    """Wall time of the demo on an idle 2-core CPU from :data:`EXPECTED_SECONDS` (×3 for the full-size head).

    Parameters
    ----------
    names : sequence of str
        The methods the demo runs.
    full : bool
        ``--full`` (the default adaptation instead of the short one).
    size : {"small", "full"}

    Returns
    -------
    float
        Seconds.
    """
    t = EXPECTED_SECONDS["phantom"] + EXPECTED_SECONDS["figure"]
    for n in names:
        t += EXPECTED_SECONDS.get(n + "_full" if full and n + "_full" in EXPECTED_SECONDS else n,
                                  UNKNOWN_METHOD_SECONDS)
    return t * (3.0 if size == "full" else 1.0)


def run_demo(outdir="demo_output", size="small", snr=40.0, device="auto", methods=None, seed=0,
             quiet=False, full=False) -> dict:
    import matplotlib
    matplotlib.use("Agg")
    from .core.dipole import forward_field
    from .core.metrics import compute_metrics
    from .methods import available_methods, reconstruct
    from .core.sim.phantom import oblique_direction
    from .core.progress import stderr_progress
    from .core.scan import Scan

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    # tfi-medi: the demo phantom gives a local field; a method taking the total field (TFI) runs only when named
    wanted = [m for m in available_methods()
              if (m.name in methods if methods is not None else getattr(m, "field_kind", "local") == "local")]
    est = expected_seconds([m.name for m in wanted], full, size)
    when = f"{est:.0f} s" if est < 120 else f"{est / 60:.0f} min"
    log(f"napari-qsm demo: {len(wanted)} methods on the {size} phantom; expect about {when} on an idle 2-core CPU"
        f"{'' if full else ' (short adaptation; --full for the default 120 steps)'}")
    t0 = time.perf_counter()
    ph = _phantom(size, snr, seed)
    scan = Scan.from_phantom(ph)
    log(f"phantom {ph.chi.shape} at {tuple(ph.voxel_size)} mm, SNR {snr}: {time.perf_counter() - t0:.1f} s")
    results, rows = {}, []
    short_adaptation = False
    for m in wanted:
        extra = {}
        if m.multi_scan:
            rng = np.random.default_rng(seed + 1)
            scans = [scan]
            for axis in ("x", "y"):
                b = oblique_direction(25.0, axis)
                f = forward_field(ph.chi, ph.voxel_size, b, device=device) * ph.mask
                if ph.noise_std is not None:
                    f = f + rng.standard_normal(f.shape).astype(np.float32) * ph.noise_std * ph.mask
                scans.append(Scan(field=f, mask=ph.mask, voxel_size=ph.voxel_size, b0_direction=b,
                                  magnitude=ph.magnitude))
            extra["scans"] = scans
        log(f"running {m.label} ...")
        try:
            params = {} if full else QUICK_PARAMS.get(m.name, {})
            res = reconstruct(scan, m.name, params, device=device,
                              progress=None if quiet else stderr_progress(2.0), **extra)
        except Exception as exc:  # a method that cannot run here is reported, not hidden
            log(f"  {m.label} failed: {exc}")
            rows.append({"method": m.label, "error": str(exc)})
            continue
        if m.name == "dsbn_adapt" and params.get("update") == "bn":  # a name for the table and figure
            res.title = QUICK_TITLE
            short_adaptation = True
        vals = compute_metrics(res.chi, ph.chi, ph.mask, field=scan.field, voxel_size=scan.voxel_size,
                               b0_direction=scan.b0_direction)
        results[res.name] = res
        rows.append({"method": res.name, "seconds": res.seconds, **vals})
        log(f"  {res.name}: NRMSE {vals['nrmse_demeaned']:.1f} % (demeaned), {res.seconds:.1f} s")
    _write_tables(rows, out, note=QUICK_NOTE if short_adaptation else "")
    _comparison_png(ph, results, out / "comparison.png")
    table = (out / "metrics.md").read_text()
    print(table)
    print(f"wrote {out / 'metrics.md'}, {out / 'metrics.csv'}, {out / 'comparison.png'} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    return {"rows": rows, "results": results, "phantom": ph}


#: the files run_demo writes in OUTDIR (``napari-qsm demo`` refuses to replace them without --overwrite)
OUTPUTS = ("metrics.md", "metrics.csv", "comparison.png")
COLUMNS = ["nrmse_demeaned", "nrmse_detrended", "nrmse", "hfen", "ssim", "xsim", "psnr", "correlation",
           "field_residual", "seconds"]


def _write_tables(rows, out: Path, note: str = "") -> None:
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["method"] + COLUMNS + ["error"], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    head = "| method | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['method']} | " + " | ".join(f"{r[c]:.3f}" if c in r else "" for c in COLUMNS) + " |")
    (out / "metrics.md").write_text("\n".join(lines) + "\n\nNRMSE, HFEN, field_residual in %; SSIM, XSIM, "
                                    "correlation unitless; PSNR in dB; seconds of reconstruction. nrmse_demeaned "
                                    "and nrmse_detrended are QSM challenge 2.0's (the field fixes no mean χ); nrmse "
                                    "is the 2016 challenge's; XSIM with QSM-CI's uniform 5³ window.\n"
                                    + (f"\n{note}\n" if note else ""))


def _comparison_png(ph, results: dict, path: Path, limit: float = 0.15, dlimit: float = 0.1) -> None:
    """Axial, coronal and sagittal χ of the truth and every result, and each result's difference to the truth.

    Differences are of the demeaned maps (means over the brain mask: the field fixes no mean χ, so
    every method, COSMOS included, is compared as the challenge metrics do); red = result above the truth.
    """
    import textwrap

    import matplotlib.pyplot as plt

    m = ph.mask
    c = [int(v) for v in np.argwhere(m).mean(axis=0)]
    vs = ph.voxel_size
    cols = [("truth", ph.chi)] + [(k, r.chi) for k, r in results.items()]

    def planes(vol):
        return [(vol[:, :, c[2]].T, vs[1] / vs[0]), (vol[:, c[1], :].T, vs[2] / vs[0]), (vol[c[0], :, :].T, vs[2] / vs[1])]

    def demeaned(vol):
        return np.where(m, vol - float(vol[m].mean()), 0)

    truth0 = demeaned(ph.chi)
    fig, axes = plt.subplots(6, len(cols), figsize=(2.3 * len(cols) + 1.6, 13.5), squeeze=False)
    im_chi = im_diff = None
    for j, (name, vol) in enumerate(cols):
        v = np.where(m, vol, 0)
        d = demeaned(vol) - truth0
        for i, (img, aspect) in enumerate(planes(v)):
            ax = axes[i, j]
            im_chi = ax.imshow(img, cmap="gray", vmin=-limit, vmax=limit, origin="lower", aspect=aspect)
            ax.set_xticks([]), ax.set_yticks([])
        for i, (img, aspect) in enumerate(planes(d)):
            ax = axes[3 + i, j]
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:  # the truth has no difference to itself: show the magnitude image instead
                mag = planes(np.asarray(ph.magnitude))[i][0]
                ax.imshow(mag, cmap="gray", origin="lower", aspect=aspect)
                ax.set_title("magnitude" if i == 0 else "", fontsize=9)
                continue
            im_diff = ax.imshow(img, cmap="RdBu_r", vmin=-dlimit, vmax=dlimit, origin="lower", aspect=aspect)
        axes[0, j].set_title("\n".join(textwrap.wrap(name, 16)), fontsize=9)
    for i, lab in enumerate(["axial χ", "coronal χ", "sagittal χ", "axial Δ", "coronal Δ", "sagittal Δ"]):
        axes[i, 0].set_ylabel(lab)
    fig.suptitle("χ (ppm) and its difference to the truth, both demeaned in the brain (red: result above the truth)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 0.97))
    right = 1 - 1.25 / fig.get_figwidth()
    cax1 = fig.add_axes((right, 0.55, 0.012, 0.35))
    fig.colorbar(im_chi, cax=cax1).set_label("χ (ppm)")
    if im_diff is not None:
        cax2 = fig.add_axes((right, 0.08, 0.012, 0.35))
        fig.colorbar(im_diff, cax=cax2).set_label("result − truth (ppm)")
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    run_demo(*(sys.argv[1:2] or ["demo_output"]))
