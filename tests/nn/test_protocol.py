"""Protocol adaptation (napari_qsm.nn.adapt.adapt_protocol, ``napari-qsm adapt F1 F2 ...``): patches from several
scans, each with its own voxel size and B0 direction (its own dipole kernel), one checkpoint for all."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import napari_qsm.nn.adaptation.loop as adapt_loop
from napari_qsm.cli import main
from napari_qsm.core.dipole import forward_field
from napari_qsm.core.scan import Scan
from napari_qsm.nn.adapt import AdaptParams, adapt, adapt_protocol, save_adapted
from nn_test_helpers import blob_volume, dsbn_chi, tiny_checkpoint

SHAPE = (32, 32, 32)
SMALL_HEAD = ((32, 40, 32), (4.5, 4.5, 4.5))
B0_A = np.array([np.sin(0.2), 0.0, np.cos(0.2)])
B0_B = np.array([1.0, 0.0, 0.0])            # far from A: a shared kernel would be badly wrong


def _scan(seed, b0, vs, name):
    rng = np.random.default_rng(seed)
    chi, mask = blob_volume(SHAPE, rng)
    f = forward_field(chi, vs, b0, device="cpu") * mask
    mag = (1.0 + 0.2 * rng.random(SHAPE)).astype(np.float32)
    return Scan(field=f, mask=mask, magnitude=mag, voxel_size=vs, b0_direction=b0, te=0.02, b0_tesla=3.0, name=name)


@pytest.fixture(scope="module")
def scans():
    return [_scan(0, B0_A, (1.0, 1.0, 1.0), "a"), _scan(5, B0_B, (1.0, 1.0, 1.5), "b")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("proto") / "tiny_plus_tkd.pt", tkd_delta=0.1, head_std=0.05)


def P(**kw):
    return AdaptParams(**{"steps": 4, "patch": 32, "synth_patch": 32, "lr": 3e-3, "seed": 0, "scan_batch": 2, **kw})


def test_each_patch_uses_its_own_scans_kernel(scans, base, monkeypatch):
    """Spy on the data term: every call gets the voxel size and B0 direction of the scan its field patch came
    from (a 32³ patch on a 32³ scan is the whole field, so the patch says which scan it is)."""
    calls = []
    real = adapt_loop.loss_field

    def spy(chi, f, mask, voxel_size, b0_direction, **kw):
        calls.append((f.detach().numpy().copy(), tuple(voxel_size), np.asarray(b0_direction, float)))
        return real(chi, f, mask, voxel_size, b0_direction, **kw)

    monkeypatch.setattr(adapt_loop, "loss_field", spy)
    res = adapt_protocol(scans, P(steps=6, mode="finetune"), weights=base, device="cpu")
    seen = set()
    for f, vs, b0 in calls:
        for k, sc in enumerate(scans):
            if all(np.array_equal(f[j, 0], sc.field * sc.mask) for j in range(f.shape[0])):
                assert vs == tuple(sc.voxel_size) and np.allclose(b0, sc.b0_direction), f"scan {k}: wrong kernel"
                seen.add(k)
                break
        else:
            raise AssertionError("a data-term call mixed patches of two scans")
    assert seen == {0, 1}
    assert [s["fingerprint"] for s in res.info["scans"]] == [sc.fingerprint() for sc in scans]
    assert len(res.chis) == 2 and all(c.shape == SHAPE for c in res.chis)


def test_one_checkpoint_with_both_fingerprints_serves_both(scans, base, tmp_path):
    res = adapt(scans, P(), weights=base, device="cpu", synth_regime=SMALL_HEAD)
    out = save_adapted(res, tmp_path / "site.pt", base, scans)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["scan_fingerprints"] == [sc.fingerprint() for sc in scans] and card["scan_fingerprint"] is None
    assert len(card["scans"]) == 2 and "2 scans of one protocol" in card["model"]
    for sc, chi in zip(scans, res.chis):   # recon --method dsbn --weights SITE.pt: the network, then the DC
        np.testing.assert_allclose(dsbn_chi(out, sc), chi, atol=1e-6)
    with pytest.raises(ValueError, match="fingerprint"):
        save_adapted(res, tmp_path / "other.pt", base, scans[::-1])
    assert not (tmp_path / "other.pt").exists()


@pytest.mark.slow
def test_a_list_of_one_scan_is_the_single_scan_run(scans, base):
    a = adapt(scans[0], P(scan_batch=1), weights=base, device="cpu", synth_regime=SMALL_HEAD)
    b = adapt([scans[0]], P(scan_batch=1), weights=base, device="cpu", synth_regime=SMALL_HEAD)
    np.testing.assert_array_equal(a.chi, b.chi)
    assert a.scan_fingerprint == scans[0].fingerprint()


def test_bad_protocol_inputs(scans, base, tmp_path):
    with pytest.raises(ValueError, match="twice"):
        adapt([scans[0], scans[0]], P(), weights=base, device="cpu")
    with pytest.raises(ValueError, match="non-empty"):
        adapt_protocol([], P(), weights=base, device="cpu")
    tiny = Scan(field=scans[1].field, mask=np.zeros(SHAPE, bool) | (np.arange(32)[:, None, None] == 16)
                & (np.arange(32)[None, :, None] < 3) & (np.arange(32)[None, None, :] < 3),
                voxel_size=scans[1].voxel_size, b0_direction=B0_B, name="tiny")
    with pytest.raises(ValueError, match=r"scan 2 \(tiny\): mask"):
        adapt([scans[0], tiny], P(), weights=base, device="cpu")


def _write(sc, d, k):
    A = np.diag(list(sc.voxel_size) + [1.0])
    fp, mp = d / f"f{k}.nii.gz", d / f"m{k}.nii.gz"
    nib.save(nib.Nifti1Image(sc.field, A), str(fp))
    nib.save(nib.Nifti1Image(sc.mask.astype(np.uint8), A), str(mp))
    (d / f"f{k}.json").write_text(json.dumps({"B0Direction": [float(v) for v in sc.b0_direction]}))
    return str(fp), str(mp)


def test_cli_multi_field_adapt_then_recon(scans, base, tmp_path):
    (f0, m0), (f1, m1) = _write(scans[0], tmp_path, 0), _write(scans[1], tmp_path, 1)
    o0, o1, w = tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz", tmp_path / "site.pt"
    assert main(["adapt", f0, f1, "--mask", m0, m1, "--steps", "2", "--weights", str(base), "--param", "patch=32",
                 "--param", "synth_patch=32", "--param", "mode=finetune", "--device", "cpu", "--save-weights", str(w),
                 "-q", "-o", str(o0), str(o1)]) == 0
    card = json.loads(w.with_suffix(".json").read_text())
    assert card["scan_fingerprints"] == [sc.fingerprint() for sc in scans]   # geometry from each file's own header
    o2 = tmp_path / "r1.nii.gz"
    # the adapted network, then the data consistency, as adapt's own χ (both with their defaults)
    assert main(["recon", f1, "--mask", m1, "--method", "dsbn", "--weights", str(w), "--device", "cpu", "-q",
                 "-o", str(o2)]) == 0
    np.testing.assert_allclose(np.asarray(nib.load(str(o1)).dataobj), np.asarray(nib.load(str(o2)).dataobj), atol=1e-6)


def test_cli_mismatched_counts_write_nothing(scans, base, tmp_path, capsys):
    (f0, m0), (f1, m1) = _write(scans[0], tmp_path, 0), _write(scans[1], tmp_path, 1)
    before = sorted(p.name for p in tmp_path.iterdir())
    o0, o1, w = tmp_path / "c0.nii.gz", tmp_path / "c1.nii.gz", tmp_path / "site.pt"
    for argv, what in ((["--mask", m0], "--mask: 1 file"), (["--mask", m0, m1, "--magnitude", f0], "--magnitude: 1"),
                       (["--mask", m0, m1, "--b0-dir", "0", "0", "1"], "--b0-dir")):
        outs = [str(o0)] if what == "-o" else [str(o0), str(o1)]
        rc = main(["adapt", f0, f1, *argv, "--weights", str(base), "--device", "cpu", "--save-weights", str(w), "-q",
                   "-o", *outs])
        assert rc == 2 and what in capsys.readouterr().err
    rc = main(["adapt", f0, f1, "--mask", m0, m1, "--weights", str(base), "--device", "cpu", "-q", "-o", str(o0)])
    assert rc == 2 and "-o/--output: 1 file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
