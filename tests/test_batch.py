"""napari-qsm batch: a BIDS dataset on a real Dask LocalCluster (2 worker processes, 1 thread each).

One small honest raw phantom (4 mm voxels) is written as three subjects; a fourth subject has a
truncated phase echo. One cluster serves the whole module.
"""

import json
import os
import shutil
import signal
import threading
import time

import nibabel as nib
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a 2-process cluster and a phantom: ~20 s idle in all

from napari_qsm.batch import discover, output_paths, run_batch, sha256_file, warm_worker  # noqa: E402
from napari_qsm.cli import main  # noqa: E402

GOOD = ["sub-01", "sub-02", "sub-03"]


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    from napari_qsm.core.sim.phantom import make_phantom, save_raw_bids

    root = tmp_path_factory.mktemp("bids") / "raw"
    ph = make_phantom(shape=(32, 40, 32), voxel_size=(4, 4, 4), seed=2, snr=50.0, honest=True, background=True,
                      keep_echoes=True, device="cpu")
    for s in ("01", "02", "03", "04"):
        save_raw_bids(ph, root, subject=s)
    shutil.rmtree(root / "truth")
    for p in (root / "sub-02" / "anat").glob("*.nii.gz"):  # sub-02: the head mirrored left-right (another scan)
        img = nib.load(str(p))
        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.asarray(img.dataobj)[::-1]), img.affine, img.header), str(p))
    bad = root / "sub-04" / "anat" / "sub-04_echo-2_part-phase_MEGRE.nii.gz"
    bad.write_bytes(bad.read_bytes()[:300])  # a truncated file: the loader cannot read it
    return root


@pytest.fixture
def dataset(template, tmp_path):
    root = tmp_path / "ds"
    shutil.copytree(template, root)
    return root


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=40)
    c = Client(cluster)
    c.run(warm_worker)  # imports torch and the registry once per worker
    yield c
    c.close()
    cluster.close()


def _tmp_files(root):
    return [p for p in root.rglob(".tmp-*")]


def test_batch_isolates_a_corrupt_scan_resumes_and_equals_recon(dataset, client, tmp_path, one_torch_thread,
                                                                capsys, monkeypatch):
    assert [s.id for s in discover(dataset)] == GOOD + ["sub-04"]
    s = run_batch(dataset, method="tkd", client=client, device="cpu")
    by = {r["scan"]: r for r in s.rows}
    assert [r["scan"] for r in s.done] == GOOD
    assert [r["scan"] for r in s.failed] == ["sub-04"] and not s.ok
    assert by["sub-04"]["step"] == "load" and "sub-04_echo-2_part-phase_MEGRE" in by["sub-04"]["error"]
    assert all(0 < by[k]["field_residual"] < 100 for k in GOOD)
    assert not _tmp_files(dataset)
    deriv = dataset / "derivatives" / "napari-qsm"
    assert not (deriv / "sub-04").exists() or not any((deriv / "sub-04").rglob("*Chimap*"))  # nothing of it
    tsv = (deriv / "batch_summary.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:4] == ["scan", "kind", "status", "seconds"]
    assert [ln.split("\t")[2] for ln in tsv[1:]] == ["done"] * 3 + ["failed"]
    desc = json.loads((deriv / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "napari-qsm"

    scans = {x.id: x for x in discover(dataset)}
    for sub in GOOD:
        out = output_paths(dataset, scans[sub], "tkd")
        assert out["chi"].name == f"{sub}_desc-tkd_Chimap.nii.gz" and out["chi"].parent == deriv / sub / "anat"
        for k, p in out.items():
            side_of = p.with_name(p.name.replace(".nii.gz", ".json"))
            assert p.exists() and (k == "report" or side_of.exists()), p
        assert out["report"].read_bytes()[:4] == b"\x89PNG"  # the one-page report beside the χ map
        assert json.loads(out["minIP"].with_name(f"{sub}_minIP.json").read_text())["Units"] == "a.u."
        side = json.loads(out["chi"].with_name(f"{sub}_desc-tkd_Chimap.json").read_text())
        assert side["method"] == "tkd" and side["version"] and side["seconds"] > 0 and side["device"] == "cpu"
        assert side["scan_id"] == sub and side["scan"]["b0_tesla"] == pytest.approx(3.0, rel=0.01)
        echo1 = f"{sub}/anat/{sub}_echo-1_part-mag_MEGRE.nii.gz"
        assert side["input_sha256"][echo1] == sha256_file(dataset / echo1)
        assert side["recon_command"].startswith("OMP_NUM_THREADS=1 napari-qsm recon")
        # the same χ as `napari-qsm recon` on the written field files, bit for bit (one torch thread, as the workers)
        ref = tmp_path / f"{sub}_recon.nii.gz"
        f = {k: str(out[k]) for k in ("localfield", "mask", "magnitude", "noisestd", "R2starmap")}
        assert main(["recon", f["localfield"], "--mask", f["mask"], "--magnitude", f["magnitude"], "--noise-std",
                     f["noisestd"], "--r2star", f["R2starmap"], "--method", "tkd", "--device", "cpu", "-q",
                     "-o", str(ref)]) == 0
        a, b = nib.load(str(ref)), nib.load(str(out["chi"]))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.array_equal(a.affine, b.affine)
    chi_before = {p: p.stat().st_mtime_ns for p in deriv.rglob("*_Chimap.nii.gz")}

    # the CLI on the running scheduler: the done scans are skipped, the corrupt one fails again -> exit status 1
    capsys.readouterr()
    assert main(["batch", str(dataset), "--method", "tkd", "--scheduler", client.scheduler.address,
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "1 failed" in err and "sub-04" in err and "up to date: 3" in err

    # a rerun of the complete scans skips them all without starting a cluster (one would fail here)
    import distributed

    def no_cluster(*a, **k):
        raise AssertionError("a rerun of up-to-date scans started a cluster")

    with monkeypatch.context() as mp:
        mp.setattr(distributed, "LocalCluster", no_cluster)
        mp.setattr(distributed, "Client", no_cluster)
        s2 = run_batch(dataset, method="tkd", only=["sub-01", "02", "sub-03"], device="cpu", echo=False)
    assert [r["status"] for r in s2.rows] == ["skipped"] * 3 and s2.workers == 0 and s2.ok
    assert {p: p.stat().st_mtime_ns for p in deriv.rglob("*_Chimap.nii.gz")} == chi_before

    # another method reuses the field outputs; a changed input is recomputed
    lf = deriv / "sub-01" / "anat" / "sub-01_localfield.nii.gz"
    lf_time = lf.stat().st_mtime_ns
    side = dataset / "sub-02" / "anat" / "sub-02_echo-1_part-mag_MEGRE.json"
    side.write_text(side.read_text().replace("procedural head phantom", "procedural head phantom (edited)"))
    seen = []
    s3 = run_batch(dataset, method="tsvd", only=["sub-01"], client=client, device="cpu", echo=False,
                   progress=seen.append, dicom=True)
    assert [r["status"] for r in s3.rows] == ["done"] and lf.stat().st_mtime_ns == lf_time
    assert len(list((deriv / "sub-01" / "anat" / "sub-01_desc-tsvd_Chimap_dicom").glob("*.dcm"))) == 32
    assert [(p.step, p.total) for p in seen] == [(1, 1)] and "sub-01 done" in seen[0].message
    s4 = run_batch(dataset, method="tkd", only=["sub-02", "sub-03"], client=client, device="cpu", echo=False)
    assert [r["status"] for r in s4.rows] == ["done", "skipped"]

    # a local field as input (the names batch writes): same χ as from the raw echoes
    root2 = tmp_path / "fields"
    anat2 = root2 / "sub-01" / "anat"
    anat2.mkdir(parents=True)
    for k in ("localfield", "mask", "magnitude", "noisestd", "R2starmap"):
        shutil.copy(deriv / "sub-01" / "anat" / f"sub-01_{k}.nii.gz", anat2)
    s5 = run_batch(root2, method="tkd", client=client, device="cpu", echo=False)
    assert [(r["kind"], r["status"]) for r in s5.rows] == [("field", "done")]
    a = nib.load(str(root2 / "derivatives/napari-qsm/sub-01/anat/sub-01_desc-tkd_Chimap.nii.gz")).get_fdata()
    b = nib.load(str(deriv / "sub-01" / "anat" / "sub-01_desc-tkd_Chimap.nii.gz")).get_fdata()
    assert np.array_equal(a, b)
    assert not _tmp_files(dataset) and not _tmp_files(root2)


def test_a_killed_worker_has_its_scan_retried(dataset, client):
    shutil.rmtree(dataset / "sub-04")
    pids = client.run(os.getpid)  # {worker address: pid}
    killed = {}

    def killer():
        t_end = time.time() + 60
        while time.time() < t_end and not killed:
            for addr, keys in client.processing().items():
                ours = [k for k in keys if str(k).startswith("qsm-")]
                if ours and addr in pids:
                    os.kill(pids[addr], signal.SIGKILL)  # as the kernel's out-of-memory killer would
                    killed.update(addr=addr, pid=pids[addr], key=str(ours[0]))
                    return
            time.sleep(0.01)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    s = run_batch(dataset, method="tkd", client=client, device="cpu", echo=False)
    th.join(5)
    assert killed, "no task was seen running"
    assert [r["status"] for r in s.rows] == ["done"] * 3
    rerun = next(r for r in s.rows if killed["key"].startswith(f"qsm-{r['scan']}-"))
    assert not rerun["worker"].endswith(f":{killed['pid']}")  # finished by a live worker
    assert not _tmp_files(dataset)
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_dry_run_and_bad_arguments(dataset, capsys):
    s = run_batch(dataset, method="tkd", dry_run=True)
    assert s.dry_run and [r["status"] for r in s.rows] == ["planned"] * 4
    assert not (dataset / "derivatives").exists()
    assert "to run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown method"):
        run_batch(dataset, method="nope")
    with pytest.raises(ValueError, match="sub-09"):
        run_batch(dataset, method="tkd", only=["sub-09"])
    with pytest.raises(ValueError, match="threshold"):
        run_batch(dataset, method="tkd", params={"threshold": "7"})
    with pytest.raises(ValueError, match="no parameter"):
        run_batch(dataset, method="tkd", field_params={"background.nope": 3})
    assert main(["batch", str(dataset), "--method", "tkd", "--scheduler", "tcp://x:1", "--workers", "2"]) == 2
    assert not (dataset / "derivatives").exists()


def test_adapt_protocol_once_then_dsbn_on_every_scan(dataset, client, tmp_path, one_torch_thread):
    shutil.rmtree(dataset / "sub-04")
    kw = dict(method="dsbn", client=client, device="cpu", echo=False, adapt_protocol=True,
              adapt_params={"steps": 1}, only=["sub-01", "sub-02"])
    s = run_batch(dataset, **kw)
    assert [r["status"] for r in s.rows] == ["done", "done"], s.rows
    deriv = dataset / "derivatives" / "napari-qsm"
    (ckpt,) = (deriv / "adapted").glob("protocol-*.pt")
    card = json.loads(ckpt.with_suffix(".json").read_text())
    assert card["batch"]["scans"] == ["sub-01", "sub-02"] and len(card["scan_fingerprints"]) == 2
    chi = deriv / "sub-02" / "anat" / "sub-02_desc-dsbn_Chimap.nii.gz"
    side = json.loads(chi.with_name("sub-02_desc-dsbn_Chimap.json").read_text())
    assert f"--weights {ckpt}" in side["recon_command"] and side["weights_sha256"] == sha256_file(ckpt)
    f = {k: str(deriv / "sub-02" / "anat" / f"sub-02_{k}.nii.gz") for k in ("localfield", "mask", "magnitude",
                                                                            "noisestd", "R2starmap")}
    ref = tmp_path / "ref.nii.gz"
    assert main(["recon", f["localfield"], "--mask", f["mask"], "--magnitude", f["magnitude"], "--noise-std",
                 f["noisestd"], "--r2star", f["R2starmap"], "--method", "dsbn", "--weights", str(ckpt),
                 "--device", "cpu", "-q", "-o", str(ref)]) == 0
    assert np.array_equal(np.asarray(nib.load(str(ref)).dataobj), np.asarray(nib.load(str(chi)).dataobj))
    # the same cohort again: the checkpoint and every χ are reused
    mtime = ckpt.stat().st_mtime_ns
    s2 = run_batch(dataset, **kw)
    assert [r["status"] for r in s2.rows] == ["skipped", "skipped"] and ckpt.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="--method dsbn"):
        run_batch(dataset, method="tkd", adapt_protocol=True)


def test_discover_sessions_runs_and_incomplete_scans(tmp_path):
    def touch(rel):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")

    for run in (1, 2):
        for e in (1, 2):
            for part in ("mag", "phase"):
                touch(f"sub-01/ses-a/anat/sub-01_ses-a_run-{run}_echo-{e}_part-{part}_MEGRE.nii.gz")
    touch("sub-02/anat/sub-02_echo-1_part-mag_MEGRE.nii.gz")      # no phase
    touch("sub-03/anat/sub-03_localfield.nii.gz")                # no mask
    touch("sub-04/anat/sub-04_acq-x_localfield.nii.gz")
    touch("sub-04/anat/sub-04_acq-x_mask.nii.gz")
    touch("derivatives/napari-qsm/sub-05/anat/sub-05_localfield.nii.gz")  # derivatives are not inputs
    found = {s.id: s for s in discover(tmp_path)}
    assert list(found) == ["sub-01_ses-a_run-1", "sub-01_ses-a_run-2", "sub-02", "sub-03", "sub-04_acq-x"]
    r1 = found["sub-01_ses-a_run-1"]
    assert r1.session == "ses-a" and [p.name for p in r1.inputs["phase"]] == [
        "sub-01_ses-a_run-1_echo-1_part-phase_MEGRE.nii.gz", "sub-01_ses-a_run-1_echo-2_part-phase_MEGRE.nii.gz"]
    assert output_paths(tmp_path, r1, "medi")["chi"] == (tmp_path / "derivatives/napari-qsm/sub-01/ses-a/anat/"
                                                         "sub-01_ses-a_run-1_desc-medi_Chimap.nii.gz")
    assert "phase echoes []" in found["sub-02"].problem and "no sub-03_mask" in found["sub-03"].problem
    assert found["sub-04_acq-x"].kind == "field" and not found["sub-04_acq-x"].problem
    assert [s.id for s in discover(tmp_path, only=["04"])] == ["sub-04_acq-x"]


def test_batch_imports_no_qt_and_no_napari():
    import subprocess
    import sys

    code = ("import sys, napari_qsm.batch, napari_qsm.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_failing_field_step_is_named_by_its_family(raw_bids_head):
    """The batch reports which front-end step failed: local_field records the family on the exception
    (it used to be found by the name of a frame in the traceback)."""
    from napari_qsm.batch.tasks import _failing_field_step
    from napari_qsm.core.field.load import load_echoes
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.core.field.steps import Step

    def broken(*a, **k):
        raise RuntimeError("boom")    # no family in the message

    vs = FieldRecipe().step("background")
    recipe = FieldRecipe(background=Step("background", "broken", "Broken", vs.params_cls, run=broken))
    with pytest.raises(RuntimeError, match="boom") as info:
        local_field(load_echoes(str(raw_bids_head)), recipe, device="cpu")
    assert info.value.field_step == "background"
    assert _failing_field_step(info.value) == "field:background"
    assert _failing_field_step(ValueError("mask: empty")) == "field:mask"   # an input check outside the steps
    assert _failing_field_step(ValueError("something else")) == "field"


def test_batch_field_suffixes_name_every_pipeline_map_once():
    """One description per map (pipeline.FIELD_MAPS); the batch only names the BIDS suffix, the local
    field (the set's marker) last."""
    from napari_qsm.batch.discovery import FIELD_SUFFIXES
    from napari_qsm.pipeline import FIELD_MAPS
    assert sorted(FIELD_SUFFIXES.values()) == sorted(FIELD_MAPS) and list(FIELD_SUFFIXES)[-1] == "localfield"
