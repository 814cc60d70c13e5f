"""Raw echoes of the head in air → total and local field, against the phantom's truth (issue 13).

The raw head (napari sample "raw_head": 2.5 mm, 64×76×64, 5 echoes TE 4..20 ms, SNR 50, seed 0) has
a background of up to ~2.5 ppm inside the brain next to the air cavities, above the ±0.98 ppm that one
ΔTE of phase holds. Before the fix, ten voxels there kept a 2π error (successive-echo temporal
unwrapping where |ω·ΔTE| ≈ π) and V-SHARP's local field had an NRMSE of 169 %.
"""

import numpy as np
import pytest

from napari_qsm.core.field import background as bgm
from napari_qsm.core.field.fit import fit_linear
from napari_qsm.core.field.pipeline import local_field
from napari_qsm.core.field.unwrap import fix_residual_wraps, residual_jumps
from napari_qsm.core.sim.phantom import make_phantom

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def raw_head(one_torch_thread):
    return make_phantom((64, 76, 64), (2.5, 2.5, 2.5), seed=0, snr=50.0, honest=True, keep_echoes=True,
                        background=True, device="cpu")


def _nrmse(x, ref, m):
    a = x[m] - x[m].mean()
    b = ref[m] - ref[m].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_the_fit_leaves_only_whole_wraps(raw_head):
    """The fitted (still wrapped) field is the truth plus whole wrap periods: spatial unwrapping can be exact."""
    ph = raw_head
    tf = fit_linear(ph.to_echoes(), device="cpu")
    per = tf.wrap_period_ppm
    frac = (tf.field - ph.true_total_field) / per
    frac -= np.round(frac)
    assert tf.misfit is not None and 0.6 < float(np.median(tf.misfit[ph.mask])) < 1.2   # reduced χ² ≈ 1
    # where the echo fit holds (misfit ≤ 10, what the mask keeps): measured max 0.15 period (successive-echo
    # unwrapping: 0.49, with 91 voxels above 0.25). Edge voxels with intra-voxel dephasing reach 0.35: left out.
    ok = ph.mask & (tf.misfit <= 10)
    assert ok.sum() > 0.98 * ph.mask.sum()
    assert np.abs(frac[ok]).max() < 0.25, np.abs(frac[ok]).max()
    assert float(np.abs(ph.true_total_field[ph.mask]).max()) > 0.5 * per + 0.5   # the field does wrap over ΔTE


def test_no_residual_wrap_in_the_final_mask_and_local_field_accuracy(raw_head):
    ph = raw_head
    run = local_field(ph.to_echoes(), device="cpu")
    m = run.brain_mask
    per = run.total.wrap_period_ppm
    err = run.total.field - ph.true_total_field
    err -= np.median(err[m])
    k = np.round(err / per)
    assert int(np.count_nonzero(k[m])) == 0, f"{np.count_nonzero(k[m])} voxels keep a 2π error"
    phase = run.total.field * np.float32(run.total.rad_per_ppm)
    assert residual_jumps(phase, m) == 0
    assert np.median(np.abs(err[m])) < 2 * np.median(run.total.noise_std[m])
    # local field: the default background step, demeaned NRMSE over the phantom's brain with the voxels it drops
    # counted as error (one region for every method), against the truth (the field of the brain's own χ); the same
    # step on the TRUE total field in the same mask is what background removal alone can reach.
    from napari_qsm.core.field.pipeline import find_step
    step = find_step("background")
    nrmse = _nrmse(np.where(run.scan.mask, run.scan.field, 0), ph.true_local_field, ph.mask)
    oracle, em = step.run(ph.true_total_field * m, m, voxel_size=ph.voxel_size, device="cpu")
    nrmse_oracle = _nrmse(np.where(em, oracle, 0), ph.true_local_field, ph.mask)
    print(f"{step.name}: raw {nrmse:.3f}, true total {nrmse_oracle:.3f}")
    assert nrmse < 0.80, nrmse
    assert nrmse < nrmse_oracle + 0.15, (nrmse, nrmse_oracle)


def test_voxel_centre_balls_on_the_raw_head(raw_head):
    """Issue 24: V-SHARP with voxel-centre balls (QSM.jl, QSM.rs) from the true total field of the 2.5 mm head:
    measured 50.0 % local-field NRMSE (own mask) / 51.7 % over the brain; the partial-volume ball gave 63.5 / 68.0 %
    (its erosion and radius choice differ)."""
    ph = raw_head
    run = local_field(ph.to_echoes(), device="cpu")
    m = run.brain_mask
    loc, em = bgm.vsharp(ph.true_total_field * m, m, voxel_size=ph.voxel_size, device="cpu")
    assert _nrmse(np.where(em, loc, 0), ph.true_local_field, ph.mask) < 0.60


def test_jump_check_repairs_a_voxel_hanging_on_one_bad_edge():
    """A 2π error that a spanning tree cannot show on its own edges is caught against the 26 neighbours."""
    g = np.meshgrid(*[np.arange(20.0)] * 3, indexing="ij")
    true = (0.4 * g[0] + 0.3 * g[1] - 0.2 * g[2]).astype(np.float32)
    mask = np.zeros((20, 20, 20), bool)
    mask[4:16, 4:16, 4:16] = True
    mask[10, 10, 16] = True                      # a protrusion on one face
    u = true.copy()
    u[10, 10, 16] += np.float32(2 * np.pi)        # reached through a bad edge
    u[6:8, 6:8, 6:8] -= np.float32(2 * np.pi)     # and a small wrong island
    assert residual_jumps(u * mask, mask, 26) > 0
    fixed, n = fix_residual_wraps(u * mask, mask)
    assert n == 9
    assert np.allclose(fixed[mask], true[mask], atol=1e-4)
    assert residual_jumps(fixed, mask) == 0
    # a smooth field with steps below π is left alone
    same, n0 = fix_residual_wraps(true * mask, mask)
    assert n0 == 0 and np.array_equal(same, true * mask)
