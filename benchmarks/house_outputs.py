"""Hashes of the outputs a structural change must not alter (issue 23): run it on two checkouts, compare.

    PYTHONPATH=/work/main   python benchmarks/house_outputs.py > before.json
    PYTHONPATH=$PWD         python benchmarks/house_outputs.py > after.json
    diff before.json after.json        # empty: the same numbers bit for bit

What is hashed (sha256 of the float32 arrays' bytes, and of each JSON sidecar minus the keys that
record time, host or software version):

* χ of TKD, MEDI and DSBN on the demo phantom (``napari-qsm demo``'s small head, SNR 40, seed 0), CPU;
* the field chain's local field and eroded mask on a raw phantom head (32x40x32 at 4 mm), through
  :func:`napari_qsm.core.field.pipeline.local_field`, ``napari-qsm field`` and ``napari-qsm recon``
  from raw echoes (TKD), and
* a batch run's derivatives (``run_batch`` on two subjects, TKD, an in-process Dask cluster).

Uses only the public API both checkouts share. One torch thread (sums over threads round differently).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

VOLATILE = {"seconds", "field_seconds", "version", "worker", "device", "recon_command", "time", "date",
            "created", "wall_seconds", "Sources", "input_sha256", "outputs", "echoes", "sources", "GeneratedBy"}


def h(arr) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(arr, np.float32)).tobytes()).hexdigest()[:16]


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, str) and ("/tmp" in obj):
        return "<path>"
    return obj


def h_nifti(p: Path) -> str:
    import nibabel as nib
    img = nib.load(str(p))
    return h(np.asarray(img.dataobj)) + ":" + h(img.affine)


def h_json(p: Path) -> str:
    return hashlib.sha256(json.dumps(_clean(json.loads(p.read_text())), sort_keys=True).encode()).hexdigest()[:16]


def demo_chi() -> dict:
    from napari_qsm.core.scan import Scan
    from napari_qsm.core.sim.phantom import make_phantom
    from napari_qsm.methods import reconstruct
    ph = make_phantom(shape=(128, 152, 128), voxel_size=(1.25, 1.25, 1.25), seed=0, snr=40.0)
    scan = Scan.from_phantom(ph)
    return {f"demo_chi_{m}": h(reconstruct(scan, m, {}, device="cpu").chi) for m in ("tkd", "medi", "dsbn")}


def raw_head(root: Path, subjects=("01",)) -> None:
    from napari_qsm.core.sim.phantom import make_phantom, save_raw_bids
    ph = make_phantom(shape=(32, 40, 32), voxel_size=(4, 4, 4), seed=2, snr=50.0, honest=True, background=True,
                      keep_echoes=True, device="cpu")
    for s in subjects:
        save_raw_bids(ph, root, subject=s)


def field_chain(tmp: Path) -> dict:
    from napari_qsm.cli import main
    from napari_qsm.core.field.load import load_echoes
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    root = tmp / "raw"
    raw_head(root)
    anat = root / "sub-01" / "anat"
    out = {}
    for bg in ("vsharp", "pdf"):
        run = local_field(load_echoes(str(anat)), FieldRecipe(background=bg), device="cpu")
        out[f"local_field_{bg}"] = h(run.scan.field)
        out[f"eroded_mask_{bg}"] = h(run.scan.mask)
    assert main(["field", str(anat), "-o", str(tmp / "f"), "--device", "cpu", "-q"]) == 0
    for k in ("local_field", "mask", "magnitude", "total_field", "noise_std", "r2star"):
        out[f"cli_field_{k}"] = h_nifti(tmp / "f" / f"{k}.nii.gz")
    out["cli_field_json"] = h_json(tmp / "f" / "field.json")
    assert main(["recon", str(anat), "--method", "tkd", "-o", str(tmp / "chi.nii.gz"), "--device", "cpu",
                 "-q"]) == 0
    out["cli_recon_raw_tkd"] = h_nifti(tmp / "chi.nii.gz")
    assert main(["recon", str(tmp / "f" / "local_field.nii.gz"), "--mask", str(tmp / "f" / "mask.nii.gz"),
                 "--method", "tkd", "-o", str(tmp / "chi2.nii.gz"), "--device", "cpu", "-q"]) == 0
    out["cli_recon_field_tkd"] = h_nifti(tmp / "chi2.nii.gz")
    return out


def batch(tmp: Path) -> dict:
    from distributed import Client, LocalCluster
    from napari_qsm.batch import run_batch
    root = tmp / "ds"
    raw_head(root, ("01", "02"))
    shutil.rmtree(root / "truth")
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                           silence_logs=40)
    client = Client(cluster)
    try:
        s = run_batch(root, method="tkd", client=client, device="cpu", echo=False)
        assert s.ok, s.failed
    finally:
        client.close()
        cluster.close()
    deriv = root / "derivatives" / "napari-qsm"
    out = {}
    for p in sorted(deriv.rglob("*.nii.gz")):
        out["batch_" + p.name] = h_nifti(p)
    for p in sorted(deriv.rglob("*.json")):
        if p.name != "dataset_description.json":
            out["batch_" + p.name] = h_json(p)
    return out


def main() -> dict:
    import torch
    torch.set_num_threads(1)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        res.update(field_chain(Path(d)))
    with tempfile.TemporaryDirectory() as d:
        res.update(batch(Path(d)))
    if "--no-demo" not in sys.argv:
        res.update(demo_chi())
    return res


if __name__ == "__main__":
    print(json.dumps(main(), indent=1, sort_keys=True))
