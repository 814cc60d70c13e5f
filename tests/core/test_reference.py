"""One χ reference for every method (none / mean of the mask / CSF), the network included, in the provenance."""

import json
import pickle

import numpy as np
import pytest

from napari_qsm.core.inversion.medi import csf_mask_from_r2star
from napari_qsm.core.inversion.tkd import TKDParams
from napari_qsm.core.method import apply_reference
from napari_qsm.core.params import ParamError, make_params, params_to_dict, specs
from napari_qsm.core.scan import Scan
from napari_qsm.core.sim.phantom import make_phantom
from napari_qsm.methods import available_methods, get_method, reconstruct

# small, fast settings per method (the reference is what is tested, not the inversion)
FAST = {"medi": {"max_iter": 2, "cg_max_iter": 5}, "tv": {"max_iter": 10}, "hdqsm": {"iters_l1": 2, "iters_l2": 4},
        "ndi": {"max_iter": 5}, "rts": {"max_iter": 3}, "dsbn_adapt": {"steps": 1}, "ilsqr": {"max_iter": 5}}


@pytest.fixture(scope="module")
def head():
    ph = make_phantom((48, 56, 48), (3.0, 3.0, 3.0), seed=3, snr=60, honest=True)
    scan = Scan.from_phantom(ph)
    scan.r2star = ph.r2star
    other = make_phantom((48, 56, 48), (3.0, 3.0, 3.0), b0_direction=(0.0, 0.5, 0.866), seed=3, snr=60)
    extra = {"cosmos": {"scans": [Scan.from_phantom(other)]}}
    return scan, extra


def _run(scan, extra, name, reference):
    return reconstruct(scan, name, {**FAST.get(name, {}), "reference": reference}, device="cpu",
                       **extra.get(name, {}))


@pytest.mark.parametrize("name", [m.name for m in available_methods()])
def test_every_method_follows_the_chosen_reference(one_torch_thread, head, name):
    scan, extra = head
    none = _run(scan, extra, name, "none")
    mean = _run(scan, extra, name, "mean")
    m = scan.mask
    # mean: χ's mean in the mask is 0, and it is the unreferenced χ shifted by its own mean (nothing else changed)
    assert abs(float(mean.chi[m].mean())) < 1e-6
    shift = float(none.chi[m].astype(np.float64).mean())
    np.testing.assert_allclose(mean.chi[m], none.chi[m] - shift, atol=2e-5 + 1e-4 * np.abs(none.chi).max())
    assert mean.extras["reference_ppm"] == pytest.approx(shift, abs=1e-6)
    assert none.extras["reference"] == "none" and none.params["reference"] == "none"
    # csf: the mean over the CSF found from R2* (MEDI+0's rule) is 0
    csf = _run(scan, extra, name, "csf")
    region = csf_mask_from_r2star(scan.r2star, m, scan.voxel_size)
    assert region.sum() == csf.extras["reference_voxels"] > 0
    assert abs(float(csf.chi[region].astype(np.float64).mean())) < 1e-6
    assert "R2*" in csf.extras["reference_rule"]
    prov = csf.provenance()
    assert prov["parameters"]["reference"] == "csf" and prov["extras"]["reference"] == "csf"


def test_reference_is_a_parameter_of_every_record():
    for m in available_methods():
        spec = {s.name: s for s in specs(m.params_cls)}["reference"]
        assert spec.default == "mean" and spec.choices == ("none", "mean", "csf")
    with pytest.raises(ParamError, match="reference"):
        make_params(get_method("tkd").params_cls, {"reference": "ventricles"})


def test_record_of_the_base_class_and_pickling():
    cls = get_method("tkd").params_cls
    p = make_params(cls, {"reference": "none", "threshold": 0.2})
    q = pickle.loads(pickle.dumps(p))            # Dask ships records to worker processes
    assert type(q) is cls and params_to_dict(q) == params_to_dict(p)
    scan = Scan(field=np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32) * 0.01,
                mask=np.ones((16, 16, 16)))
    res = reconstruct(scan, "tkd", TKDParams(threshold=0.2))   # the method's own record: default reference
    assert res.params["reference"] == "mean" and abs(float(res.chi.mean())) < 1e-6


def test_csf_reference_needs_r2star_or_magnitude():
    scan = Scan(field=np.zeros((16, 16, 16), np.float32), mask=np.ones((16, 16, 16)))
    with pytest.raises(ValueError, match="reference=csf"):
        reconstruct(scan, "tkd", {"reference": "csf"})
    chi, info = apply_reference(np.ones((4, 4, 4), np.float32), np.ones((4, 4, 4), bool), "csf",
                                csf_mask=np.eye(4, dtype=bool)[:, :, None].repeat(4, 2))
    assert info["reference_ppm"] == 1.0 and np.all(chi == 0)


def test_cli_reference_in_the_sidecar(tmp_path):
    from napari_qsm.cli import main

    d = tmp_path / "ph"
    assert main(["phantom", str(d), "--shape", "32", "32", "32", "--voxel-size", "3", "3", "3", "--seed", "1"]) == 0
    out = tmp_path / "chi_Chimap.nii.gz"
    assert main(["recon", str(d / "field.nii.gz"), "--mask", str(d / "mask.nii.gz"), "--method", "tv",
                 "--param", "reference=none", "--param", "max_iter=3", "-o", str(out)]) == 0
    side = json.loads((tmp_path / "chi_Chimap.json").read_text())
    assert side["parameters"]["reference"] == "none" and side["extras"]["reference"] == "none"
