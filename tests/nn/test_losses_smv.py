"""The adaptation's data term on patches (issue 14 item 1): the SMV high-pass makes L_T exact for a patch.

The measured field inside a patch holds the field of tissue outside the patch; d∗χ_patch cannot
produce it. (1 − S) applied to both fields removes it where the sphere stays inside the patch
(mean-value property of harmonic functions), so the true χ of the patch fits its field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_qsm.core.dipole import forward_field, sphere_field
from napari_qsm.core.sim.phantom import make_phantom
from napari_qsm.nn.losses import field_residual, loss_field
from napari_qsm.nn.synth import crop_box

B0 = np.array([0.1, 0.2, 0.97]) / np.linalg.norm([0.1, 0.2, 0.97])
PPP = 16.05   # rad/ppm at 3 T, 20 ms


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


@pytest.fixture(scope="module")
def clinical_patch():
    """An off-centre 64x64x40 patch of a clinical-like (0.9x0.9x3 mm) phantom and its measured local field."""
    shape, vs, P = (128, 128, 40), (0.9, 0.9, 3.0), (64, 64, 40)
    ph = make_phantom(shape, vs, b0_direction=B0, seed=3, device="cpu")
    chi = ph.chi * ph.mask
    f = forward_field(chi, vs, B0, device="cpu") * ph.mask          # the whole head's field
    st = np.array([10, 10, 0])
    m = crop_box(ph.mask, st, P, False)
    return {"vs": vs, "m": m, "chi": crop_box(chi, st, P, 0.0), "f": crop_box(f, st, P, 0.0) * m,
            "margin": np.ceil(6.0 / np.asarray(vs)).astype(int)}


def test_smv_term_cancels_tissue_outside_the_patch(clinical_patch):
    """True χ of the patch against the measured field of the patch: the old term (unfiltered fields, 6 mm
    band dropped at the cut faces) leaves > 10 % of the demeaned field (the outside sources); the SMV term
    leaves < 1 %, and its loss is < 1 % of the old one."""
    c = clinical_patch
    vs, m, chi, f = c["vs"], c["m"], c["chi"], c["f"]
    inner = np.zeros(m.shape, bool)
    inner[tuple(slice(b, n - b) if k < 2 else slice(None) for k, (b, n) in enumerate(zip(c["margin"], m.shape)))] = True
    mi = m & inner     # (axis 2 spans the whole slab: no cut face there)
    r_old, _, _ = field_residual(t(chi), t(f), t(mi), vs, B0, 0.0)
    r_old = r_old[0, 0].numpy()[mi]
    f_dm = f[mi] - f[mi].mean()
    old_pct = 100 * np.linalg.norm(r_old - r_old.mean()) / np.linalg.norm(f_dm)

    r_new, region, _ = field_residual(t(chi), t(f), t(m), vs, B0, 5.0)
    g = region[0, 0].numpy() > 0
    assert g.sum() > 0.3 * mi.sum()          # the term still sees most of the patch's brain
    assert not (g & ~m).any()
    new_pct = 100 * np.linalg.norm(r_new[0, 0].numpy()[g]) / np.linalg.norm(f[g] - f[g].mean())
    assert old_pct > 10.0, old_pct
    assert new_pct < 1.0, new_pct
    old_loss = float(loss_field(t(chi), t(f), t(mi), vs, B0, phase_per_ppm=PPP))
    new_loss = float(loss_field(t(chi), t(f), t(m), vs, B0, phase_per_ppm=PPP, smv_radius_mm=5.0))
    assert new_loss < 0.01 * old_loss, (new_loss, old_loss)
    # the term still measures misfit inside the patch: a scaled χ costs far more than the truth
    worse = float(loss_field(t(chi * 1.2), t(f), t(m), vs, B0, phase_per_ppm=PPP, smv_radius_mm=5.0))
    assert worse > 20 * new_loss


def test_smv_removes_the_analytic_field_of_an_outside_sphere():
    """Continuous physics, no discrete kernel: the analytic field of a magnetised sphere outside the patch is
    harmonic inside it, so (1 − S)f vanishes in the region (to < 1 % of f there), and stays large for a
    sphere inside the patch whose field the sphere average does not cancel."""
    shape, vs = (40, 40, 24), (1.0, 1.0, 2.0)
    m = np.ones(shape, bool)
    zero = np.zeros(shape, np.float32)
    outside = sphere_field(shape, vs, center_mm=(-8.0, 20.0, 23.0), radius_mm=4.0, dchi=1.0, b0_direction=B0)
    r, region, _ = field_residual(t(zero), t(outside), t(m), vs, B0, 5.0)
    g = region[0, 0].numpy() > 0
    assert g.sum() > 1000
    rr = r[0, 0].numpy()[g]
    assert np.linalg.norm(rr) < 0.01 * np.linalg.norm(outside[g]), (np.linalg.norm(rr), np.linalg.norm(outside[g]))
    inside = sphere_field(shape, vs, center_mm=(20.0, 20.0, 23.0), radius_mm=3.0, dchi=1.0, b0_direction=B0)
    r2, _, _ = field_residual(t(zero), t(inside), t(m), vs, B0, 5.0)
    assert np.linalg.norm(r2[0, 0].numpy()[g]) > 0.3 * np.linalg.norm(inside[g])


def test_smv_region_and_noise_propagation():
    """Region = mask eroded by the sphere, also away from the patch faces; σ becomes √(σ² + S(σ²))."""
    shape, vs, r = (24, 24, 24), (1.0, 1.0, 1.0), 3.0
    m = np.ones(shape, bool)
    sig = np.full(shape, 0.02, np.float32)
    _, region, s = field_residual(t(np.zeros(shape)), t(np.zeros(shape)), t(m), vs, B0, r, noise_std=t(sig))
    g = region[0, 0].numpy() > 0
    # the sphere of radius 3 voxels fits from index 3 to n-4
    assert g[3:21, 3:21, 3:21].all() and not g[:3].any() and not g[21:].any()
    assert np.allclose(s[0, 0].numpy()[g], 0.02 * np.sqrt(2.0), rtol=1e-4)
    assert np.isinf(s[0, 0].numpy()[~g]).all()
    # a hole in the mask erodes the region by the radius around it
    m2 = m.copy()
    m2[12, 12, 12] = False
    _, region2, _ = field_residual(t(np.zeros(shape)), t(np.zeros(shape)), t(m2), vs, B0, r)
    g2 = region2[0, 0].numpy() > 0
    assert not g2[10:15, 12, 12].any() and g2[8, 12, 12]
    # without the high-pass the term is the plain one: region = mask, noise untouched
    _, reg0, s0 = field_residual(t(np.zeros(shape)), t(np.zeros(shape)), t(m2), vs, B0, 0.0, noise_std=t(sig))
    assert torch.equal(reg0 > 0, t(m2) > 0) and torch.equal(s0, t(sig))


def test_smv_loss_gradient_pulls_towards_the_truth(clinical_patch):
    """The loss of the SMV term on the patch falls along −∇ from a perturbed χ towards the true χ."""
    c = clinical_patch
    vs, m, chi, f = c["vs"], c["m"], c["chi"], c["f"]
    x = t(chi * 0.7).requires_grad_(True)
    loss = loss_field(x, t(f), t(m), vs, B0, phase_per_ppm=PPP, smv_radius_mm=5.0)
    loss.backward()
    g = x.grad[0, 0].numpy()
    # the descent direction correlates with the missing 30 % of χ (inside the mask)
    d = (0.3 * chi)[m]
    corr = float(np.dot(-g[m], d) / (np.linalg.norm(g[m]) * np.linalg.norm(d)))
    assert corr > 0.2, corr
