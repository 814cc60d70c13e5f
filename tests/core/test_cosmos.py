"""COSMOS: exactness on full noise-free fields, far below single-orientation TKD, registry and errors."""

import numpy as np
import pytest

from napari_qsm.core.inversion.cosmos import cosmos
from napari_qsm.core.dipole import forward_field
from napari_qsm.methods import get_method, reconstruct
from napari_qsm.core.metrics import nrmse_demeaned as nrmse
from napari_qsm.core.scan import Scan
from napari_qsm.core.inversion.tkd import truncated_inversion


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def three_orientations():
    from napari_qsm.core.sim.phantom import make_phantom, oblique_direction

    ph = make_phantom((40, 48, 40), (3.5, 3.5, 3.5), seed=7, snr=None)
    dirs = [np.array([0.0, 0.0, 1.0]), oblique_direction(25, "x"), oblique_direction(25, "y")]
    fields = [forward_field(ph.chi, ph.voxel_size, d, device="cpu") for d in dirs]
    return ph, dirs, fields


def _scans(ph, dirs, fields, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for d, f in zip(dirs, fields):
        f = f + noise * rng.standard_normal(f.shape).astype(np.float32)
        out.append(Scan(field=f, mask=ph.mask, voxel_size=ph.voxel_size, b0_direction=d))
    return out


def test_cosmos_exact_on_full_noise_free_fields(three_orientations):
    ph, dirs, fields = three_orientations
    chi, info = cosmos(_scans(ph, dirs, fields), device="cpu", mask_fields=False, return_info=True)
    assert nrmse(chi, ph.chi, ph.mask) < 3.0       # only the field cut at the FOV edge is missing
    assert info["min_sum_D2"] > 0.01               # three orientations leave no common null cone
    assert np.all(chi[~ph.mask] == 0)


def test_cosmos_far_below_single_orientation_tkd(three_orientations):
    ph, dirs, fields = three_orientations
    scans = _scans(ph, dirs, fields)
    tkd, _ = truncated_inversion(scans[0].field * ph.mask, ph.mask, ph.voxel_size, dirs[0], 0.15, device="cpu")
    e_tkd = nrmse(tkd, ph.chi, ph.mask)
    e_closed = nrmse(cosmos(scans, refine=0, device="cpu"), ph.chi, ph.mask)
    e_cos = nrmse(cosmos(scans, device="cpu"), ph.chi, ph.mask)       # masked fields, refined (default)
    assert e_closed < 0.75 * e_tkd
    assert e_cos < 0.25 * e_tkd and e_cos < 8.0, (e_cos, e_tkd)
    # with noise it stays far below TKD
    noisy = _scans(ph, dirs, fields, noise=0.002)
    e_noisy = nrmse(cosmos(noisy, device="cpu"), ph.chi, ph.mask)
    tkd_noisy, _ = truncated_inversion(noisy[0].field * ph.mask, ph.mask, ph.voxel_size, dirs[0], 0.15, device="cpu")
    assert e_noisy < 0.5 * nrmse(tkd_noisy, ph.chi, ph.mask)


def test_cosmos_registry_takes_scans_extra(three_orientations):
    ph, dirs, fields = three_orientations
    scans = _scans(ph, dirs, fields)
    m = get_method("cosmos")
    assert m.multi_scan and m.label == "COSMOS"
    res = reconstruct(scans[0], "cosmos", {"refine": 2}, device="cpu", scans=scans)          # main scan included
    res2 = reconstruct(scans[0], "cosmos", {"refine": 2}, device="cpu", scans=scans[1:])     # or not
    np.testing.assert_allclose(res.chi, res2.chi, atol=1e-6)
    assert res.extras["orientations"] == 3
    with pytest.raises(ValueError, match="scans"):
        reconstruct(scans[0], "cosmos", device="cpu")


def test_cosmos_bad_inputs(three_orientations):
    ph, dirs, fields = three_orientations
    scans = _scans(ph, dirs, fields)
    with pytest.raises(ValueError, match="at least 2"):
        cosmos(scans[:1])
    with pytest.raises(ValueError, match="B0 direction"):
        cosmos([scans[0], Scan(field=fields[1], mask=ph.mask, voxel_size=ph.voxel_size, b0_direction=dirs[0])])
    small = Scan(field=fields[1][:-1], mask=ph.mask[:-1], voxel_size=ph.voxel_size, b0_direction=dirs[1])
    with pytest.raises(ValueError, match="shape"):
        cosmos([scans[0], small])
    other_vs = Scan(field=fields[1], mask=ph.mask, voxel_size=(3.5, 3.5, 3.0), b0_direction=dirs[1])
    with pytest.raises(ValueError, match="voxel size"):
        cosmos([scans[0], other_vs])


def test_cosmos_refine_transforms_chi_once_per_step(three_orientations, monkeypatch):
    """Each refinement step needs D_i·χ for every orientation: one rfftn of χ serves them all (it was
    taken once per orientation), plus one per residual; the result is the same numbers."""
    import torch
    ph, dirs, fields = three_orientations
    scans = _scans(ph, dirs, fields)
    ref = cosmos(scans, refine=2, device="cpu")
    calls = []
    real = torch.fft.rfftn
    monkeypatch.setattr(torch.fft, "rfftn", lambda *a, **k: calls.append(1) or real(*a, **k))
    chi = cosmos(scans, refine=2, device="cpu")
    n = len(scans)
    assert len(calls) == n + 2 * (1 + n)        # closed form: one per field; each step: χ once, each residual
    np.testing.assert_array_equal(chi, ref)
