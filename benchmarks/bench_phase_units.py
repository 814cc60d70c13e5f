"""Phase units and noise on real-data classes (issue 24): the raw phantom's phase stored four ways.

    napari-qsm phantom RAW --raw                 # the 1 mm head in air (160×192×160, 5 echoes, SNR 50)
    nice -n 10 python benchmarks/bench_phase_units.py RAW OUT [--pythonpath OTHER_CHECKOUT]

From RAW (radian phase) it writes OUT/ph_{rad,siemens,r855,unsigned}: the same echoes with the phase
in radians, signed Siemens integers (−4096..4095), an arbitrary float scale (radians / 855, ±0.0037,
as in a real scan) and unsigned Siemens integers (0..4095), runs ``napari-qsm field`` on each (with
``--pythonpath``: that checkout's code, e.g. the main branch, for a before/after table) and prints per
case the detected units, the noise σ, the mask size, the local-field NRMSE (QSM-CI's, demeaned, over
the eroded mask ∩ the true brain mask, against RAW/truth/local_field) and the slope of the local field
against the truth. Then σ on a tissue-only crop (60×60×40 voxels inside the brain, no air) from the
echo fit. Prints a Markdown table; writes nothing else outside OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

CASES = {
    "rad": (None, None),
    "siemens": (lambda p: np.clip(np.round(p * 4096 / np.pi), -4096, 4095).astype(np.int16), "Siemens"),
    "r855": (lambda p: (p / 855).astype(np.float32), None),
    "unsigned": (lambda p: np.mod(np.round((p + np.pi) * 4096 / (2 * np.pi)), 4096).astype(np.uint16), "Siemens"),
}


def _variant(raw: Path, dst: Path, fn, manufacturer) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(raw / "sub-phantom", dst / "sub-phantom")
    if fn is None:
        return
    for f in sorted((dst / "sub-phantom" / "anat").glob("*part-phase*.nii.gz")):
        img = nib.load(str(f))
        data = fn(np.asarray(img.dataobj, np.float64))
        out = nib.Nifti1Image(data, img.affine)
        out.set_data_dtype(data.dtype)
        nib.save(out, str(f))
        side = f.with_name(f.name.replace(".nii.gz", ".json"))
        d = json.loads(side.read_text())
        d.pop("PhaseUnits", None)
        if manufacturer:
            d["Manufacturer"] = manufacturer
        side.write_text(json.dumps(d))


def _canon(p) -> np.ndarray:
    return np.asarray(nib.as_closest_canonical(nib.load(str(p))).dataobj, np.float32)


def main(argv=None) -> int:
    from napari_qsm.core.metrics import nrmse_demeaned

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pythonpath", help="run napari-qsm field from this checkout instead")
    a = ap.parse_args(argv)
    a.raw, a.out = a.raw.resolve(), a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if a.pythonpath:
        env["PYTHONPATH"] = a.pythonpath
    truth, tm = _canon(a.raw / "truth" / "local_field.nii.gz"), _canon(a.raw / "truth" / "mask.nii.gz") > 0.5
    print("| phase stored as | detected units | σ | mask voxels | local-field NRMSE % | slope vs truth |")
    print("|---|---|---|---|---|---|")
    for name, (fn, man) in CASES.items():
        src, res = a.out / f"ph_{name}", a.out / f"field_{name}"
        _variant(a.raw, src, fn, man)
        if res.exists():
            shutil.rmtree(res)
        run = subprocess.run([sys.executable, "-m", "napari_qsm.cli", "field", str(src / "sub-phantom"), "-o", str(res),
                              "-q"], env=env, capture_output=True, text=True, cwd=a.out)   # cwd: PYTHONPATH wins
        if run.returncode != 0:
            print(f"| {name} | error: {run.stderr.strip().splitlines()[-1][:80]} | | | | |")
            continue
        f, m = _canon(res / "local_field.nii.gz"), _canon(res / "mask.nii.gz") > 0.5
        fj = json.loads((res / "field.json").read_text())
        r = m & tm
        slope = float(np.polyfit(truth[r], f[r], 1)[0])
        print(f"| {name} | {fj['echoes']['vendor'].get('phase_units')} | {fj['fit']['noise_sigma']:.5f} | {int(m.sum())} "
              f"| {nrmse_demeaned(f, truth, r):.2f} | {slope:.3f} |")
    code = ("import numpy as np, torch; torch.set_num_threads(1)\n"
            "from napari_qsm.core.field.load import load_echoes\nfrom napari_qsm.core.field.fit import fit_linear\n"
            "from napari_qsm.core.field.records import Echoes\n"
            f"e = load_echoes({str(a.raw / 'sub-phantom')!r}); n = e.shape\n"
            "sl = tuple(slice(c - h, c + h) for c, h in zip((n[0] // 2, n[1] // 2, n[2] // 2), (30, 30, 20)))\n"
            "c = Echoes(magnitude=e.magnitude[sl], phase=e.phase[sl], te=e.te, b0_tesla=e.b0_tesla, voxel_size=e.voxel_size)\n"
            "tf = fit_linear(c, device='cpu')\n"
            "print(f\"tissue-only crop {c.shape}: σ {tf.provenance['noise_sigma']:.5f} "
            "({tf.provenance['noise_sigma_source'][:40]}…), median N_std {np.median(tf.noise_std):.4f} ppm\")\n")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=a.out)
    print(run.stdout.strip() or run.stderr.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
