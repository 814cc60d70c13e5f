"""uQSM (napari_qsm.nn.adapt, mode="uqsm"): the same U-Net from random initialisation, no DSBN, physics loss only."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_qsm.cli import main
from napari_qsm.methods import available_methods
from napari_qsm.nn.adapt import AdaptParams, adapt, save_adapted
from napari_qsm.nn.losses import loss_field
from nn_test_helpers import blob_scan, dsbn_chi, tiny_checkpoint

SHAPE = (32, 32, 32)


def _scan(seed=0):
    return blob_scan(seed, SHAPE)


def _base(path, seed, tkd=0.1):
    return tiny_checkpoint(path, tkd_delta=tkd, head_std=0.05, seed=seed, offset=0.01 * seed)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("uqsm_base")
    return _base(d / "a.pt", 0), _base(d / "b.pt", 7)


@pytest.fixture(scope="module")
def scan():
    return _scan()[0]


def P(**kw):
    return AdaptParams(**{"mode": "uqsm", "steps": 3, "patch": 32, "lr": 3e-3, "seed": 0, **kw})


def _volume_lt(chi, scan):
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]  # noqa: E731
    w = scan.magnitude / scan.magnitude[scan.mask].max()
    with torch.no_grad():
        return float(loss_field(t(chi), t(scan.field), t(scan.mask), scan.voxel_size, scan.b0_direction,
                                weights=t(w), smv_radius_mm=5.0, normalise=False))


@pytest.mark.slow
def test_uqsm_trains_from_scratch_without_dsbn_and_reduces_the_data_term(scan, bases):
    res = adapt(scan, P(steps=12, uqsm_tv=0.0, consistency=0), weights=bases[0], device="cpu")   # the network's χ
    m = res.model
    assert m.num_domains == 1 and not any(".bns.1." in k for k in m.state_dict())
    # no normalisation: every BatchNorm is the identity (fixed statistics), only scale/bias train
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            assert not mod.training
            assert torch.all(mod.running_mean == 0)
            assert torch.allclose(mod.running_var, torch.full_like(mod.running_var, 1 - mod.eps))
    base_w = torch.load(str(bases[0]), weights_only=True)["down.0.conv.weight"]
    assert not torch.allclose(m.state_dict()["down.0.conv.weight"], base_w)
    # the physics loss falls: per step and on the whole scan (step 0 = TKD: the output layer starts at zero)
    lt = res.losses("L_T")
    assert np.all(np.isfinite(lt)) and lt[-3:].mean() < 0.95 * lt[:3].mean()
    assert np.all(res.losses("lambda") == 1.0)
    zero = adapt(scan, P(steps=0, consistency=0), weights=bases[0], device="cpu")
    assert _volume_lt(res.chi, scan) < 0.95 * _volume_lt(zero.chi, scan)
    assert res.info["normalisation"] == "none" and res.info["input"] == "field, mask, TKD"
    assert res.info["weighting"].startswith("magnitude / max")


def test_uqsm_uses_none_of_the_base_weights(scan, bases):
    """Random initialisation: another base of the same architecture gives exactly the same network."""
    a = adapt(scan, P(steps=2), weights=bases[0], device="cpu")
    b = adapt(scan, P(steps=2), weights=bases[1], device="cpu")
    np.testing.assert_array_equal(a.chi, b.chi)
    assert np.isfinite(a.losses("TV")).all()
    c = adapt(scan, P(steps=2, seed=1), weights=bases[0], device="cpu")
    assert not np.array_equal(a.chi, c.chi)     # the seed sets the initialisation


def test_uqsm_field_input_and_single_bn(scan, bases):
    res = adapt(scan, P(uqsm_input="field", uqsm_norm="bn"), weights=bases[0], device="cpu")
    cfg = res.model.config
    assert cfg.in_channels == 2 and not cfg.has_tkd and cfg.num_domains == 1
    bn = res.model.down[0].norm.bns[0]
    assert not torch.all(bn.running_mean == 0)   # a real BatchNorm that saw the scan's statistics
    assert np.isfinite(res.chi).all()


def test_uqsm_checkpoint_reconstructs_and_says_what_it_is(scan, bases, tmp_path):
    res = adapt(scan, P(), weights=bases[0], device="cpu")
    out = save_adapted(res, tmp_path / "u.pt", scan=scan)
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["mode"] == "uqsm" and card["base_weights"] is None and card["scan_fingerprints"] == [scan.fingerprint()]
    assert "uQSM" in card["model"]
    np.testing.assert_array_equal(dsbn_chi(out, scan), res.chi)   # the network, then the data consistency


def test_uqsm_is_a_cli_mode_not_a_new_method(scan, bases, tmp_path):
    assert "uqsm" not in [m.name for m in available_methods()]   # a mode of dsbn_adapt: the method list is unchanged
    A = np.diag([1.0, 1.0, 1.0, 1.0])
    fp, mp, o = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz", tmp_path / "u_Chimap.nii.gz"
    nib.save(nib.Nifti1Image(scan.field, A), str(fp))
    nib.save(nib.Nifti1Image(scan.mask.astype(np.uint8), A), str(mp))
    b0 = [str(v) for v in scan.b0_direction]
    w = tmp_path / "u.pt"
    assert main(["adapt", str(fp), "--mask", str(mp), "--steps", "2", "--weights", str(bases[0]), "--param", "mode=uqsm",
                 "--param", "patch=32", "--device", "cpu", "--b0-dir", *b0, "--save-weights", str(w), "-q",
                 "-o", str(o)]) == 0
    side = json.loads(o.with_name("u_Chimap.json").read_text()) if o.with_name("u_Chimap.json").exists() else None
    assert o.exists() and w.exists()
    assert json.loads(w.with_suffix(".json").read_text())["mode"] == "uqsm"
    if side is not None:
        assert "uqsm" in json.dumps(side)
