"""LBV on thin nodes for thick slices (``LBVParams.refine``; napari_qsm.core.field.lbv).

On 1×1×3 mm voxels LBV's Dirichlet layer (f_L = 0, dropped) is every voxel whose slice neighbour is outside the
mask: at the top and bottom of a brain that is a band several millimetres of cortex wide. On nodes about 1 mm apart
the boundary stays at the measured voxel centres and an edge voxel keeps its inner nodes. Fields are analytic
(uniformly magnetised spheres, :func:`napari_qsm.core.dipole.sphere_field`), not the dipole kernel MEDI uses.
"""

import numpy as np
import pytest

from napari_qsm.core.dipole import sphere_field
from napari_qsm.core.field.lbv import LBVParams, coarsen, lbv, refine_factors, subdivide

SHAPE, VS = (96, 112, 28), (1.0, 1.0, 3.0)


def test_nodes_per_voxel():
    """Odd counts (the voxel centre is a node), about the finest side apart, only for sides ≥ 1.5× the finest."""
    assert refine_factors((0.75, 0.75, 3.0)) == (1, 1, 5)
    assert refine_factors((1.0, 1.0, 3.0)) == (1, 1, 3)
    assert refine_factors((1.0, 1.0, 2.0)) == (1, 1, 3)
    assert refine_factors((0.47, 0.47, 1.0)) == (1, 1, 3)
    assert refine_factors((1.0, 1.0, 1.4)) == (1, 1, 1)
    assert refine_factors((1.0, 1.0, 1.0)) == (1, 1, 1)
    assert refine_factors((3.0, 1.0, 1.0)) == (3, 1, 1)
    assert refine_factors((0.5, 0.5, 6.0)) == (1, 1, 5)          # at most 5


def test_nodes_hold_the_measured_centres_and_interpolate_between_them():
    m = np.zeros((4, 5, 9), bool)
    m[1:3, 1:4, 1:8] = True               # columns of 7 voxels
    m[3, 2, 4] = True                     # a voxel with no neighbour along z
    x, y, z = np.meshgrid(*[np.arange(n, dtype=float) for n in m.shape], indexing="ij")
    f = (0.3 * x - 0.2 * y + 0.5 * z + 0.1 * z * z).astype(np.float32)
    ff, mf = subdivide(f, m, (1, 1, 3))
    assert ff.shape == mf.shape == (4, 5, 27)
    zf = (np.arange(27) - 1) / 3.0                       # node i of voxel j sits at j + (i − 1)/3
    exact = 0.3 * x[:, :, :1] - 0.2 * y[:, :, :1] + 0.5 * zf + 0.1 * zf * zf
    assert np.array_equal(ff[:, :, 1::3], np.where(m, f, 0))            # centre nodes: the measured values
    both = np.repeat(m & np.roll(m, 1, 2) & np.roll(m, -1, 2), 3, axis=2)
    assert np.abs(ff - exact)[both].max() < 1e-5                        # two neighbours: exact for quadratics
    # the mask's edge along z is at the edge voxels' centres: no node beyond them, none outside the mask
    assert mf[1, 2].nonzero()[0].tolist() == list(range(4, 23))
    assert not np.any(mf & ~np.repeat(m, 3, axis=2))
    assert mf[3, 2].nonzero()[0].tolist() == [13]                       # alone: its centre only
    # an edge voxel's inner node: the line to its neighbour (interpolation, never extrapolation)
    assert abs(ff[1, 2, 5] - (f[1, 2, 1] + (f[1, 2, 2] - f[1, 2, 1]) / 3)) < 1e-5
    with pytest.raises(ValueError, match="odd"):
        subdivide(f, m, (1, 1, 4))


def test_coarsen_averages_each_voxels_interior_nodes():
    rng = np.random.default_rng(1)
    fine = rng.standard_normal((2, 3, 12)).astype(np.float32)
    inner = rng.random((2, 3, 12)) > 0.4
    inner[0, 0, :3] = False
    c, cm = coarsen(fine, inner, (1, 1, 3))
    want = np.where(inner, fine, 0).reshape(2, 3, 4, 3).sum(-1) / np.maximum(inner.reshape(2, 3, 4, 3).sum(-1), 1)
    assert np.allclose(c, np.where(cm, want, 0)) and np.array_equal(cm, inner.reshape(2, 3, 4, 3).any(-1))
    assert not cm[0, 0, 0] and c[0, 0, 0] == 0


def _slab_scene(background):
    """A 1×1×3 mm ellipsoid brain (80×96×72 mm) with six χ spheres, two just under its top and bottom, and a
    background from −9 ppm spheres: far away, or next to the brain (a sinus below, an air pocket above)."""
    cen = [(n - 1) / 2 * d for n, d in zip(SHAPE, VS)]
    g = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(SHAPE, VS, cen)], indexing="ij")
    mask = (g[0] / 40) ** 2 + (g[1] / 48) ** 2 + (g[2] / 36) ** 2 < 1
    field, chi = np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32)
    for c, r, d in [((0, 0, 27), 6, 0.3), ((10, -15, -27), 6, -0.3), ((-15, 10, 0), 8, 0.2), ((20, 20, 10), 5, 0.3),
                    ((-25, -20, 20), 5, 0.2), ((25, 0, -20), 6, 0.25)]:
        field += sphere_field(SHAPE, VS, [a + b for a, b in zip(cen, c)], r, d)
        chi += d * (sum((gi - ci) ** 2 for gi, ci in zip(g, c)) <= r * r)
    far = [((0, 0, -90), 25, -9.0), ((60, 40, 70), 20, -9.0)]
    near = [((0, 30, -52), 12, -9.0), ((0, 0, 60), 15, -9.0)]
    for c, r, d in (far if background == "far" else near):
        field += sphere_field(SHAPE, VS, [a + b for a, b in zip(cen, c)], r, d)
    noise = 0.002 * np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    return (field + noise) * mask, mask, chi


@pytest.mark.parametrize("background", ["far", "near"])
def test_thin_nodes_keep_the_brains_cap_and_chi_gains(background, one_torch_thread):
    """MEDI-WH χ over the whole brain (voxels LBV drops count as error): measured 48.9 % on the scan's grid and
    42.0 / 42.1 % (far / near background) on thin nodes; coverage 0.870 → 0.952."""
    from napari_qsm.core import metrics as M
    from napari_qsm.core.scan import Scan
    from napari_qsm.methods import reconstruct

    total, mask, chi = _slab_scene(background)
    out = {}
    for refine in ("off", "auto"):
        local, m = lbv(total, mask, LBVParams(refine=refine), voxel_size=VS)
        scan = Scan(field=local, mask=m, voxel_size=VS, noise_std=np.full(SHAPE, 0.002, np.float32),
                    magnitude=mask.astype(np.float32))
        x = reconstruct(scan, "medi", {"weak_harmonic": "on"}, device="cpu").chi * m
        out[refine] = (m, float(M.nrmse_demeaned(x, chi, mask)))
    (m0, e0), (m1, e1) = out["off"], out["auto"]
    assert not np.any(m0 & ~m1) and not np.any(m1 & ~mask)          # every voxel the scan's grid keeps, and more
    assert m0.sum() < 0.88 * mask.sum() and m1.sum() > 0.94 * mask.sum()
    assert e1 < e0 - 4.0, (e0, e1)


def test_thin_nodes_leave_a_harmonic_background_and_cost_little_inside(one_torch_thread):
    """Near strong sources under-resolved along the thick axis (−9 ppm spheres touching the brain on 2×2×5 mm) the
    interpolation between centres leaks some background: on the voxels the scan's grid keeps, local-field NRMSE
    23.5 % there and 29.8 % on thin nodes (the price of the cap; χ still gains on the slab scene above)."""
    from test_background import BACKGROUND, LOCAL, SHAPE_A, VS_A, _harmonic, _mask, _rel, _spheres

    mask = _mask(SHAPE_A, VS_A)
    bg, loc = _spheres(BACKGROUND, SHAPE_A, VS_A), _spheres(LOCAL, SHAPE_A, VS_A)
    l0, m0 = lbv((bg + loc) * mask, mask, LBVParams(refine="off"), voxel_size=VS_A)
    l1, m1 = lbv((bg + loc) * mask, mask, voxel_size=VS_A)
    e0, e1 = _rel(l0 - loc, loc, m0), _rel(l1 - loc, loc, m0)
    assert e0 < 0.27 and e1 < 0.33, (e0, e1)
    h = _harmonic(SHAPE_A, VS_A)
    lh, mh = lbv(h * mask, mask, voxel_size=VS_A)
    assert _rel(lh, h, mh) < 0.001                                     # quadratics are interpolated exactly


def test_nodes_stay_within_a_memory_budget(monkeypatch):
    """Two thick axes would multiply the nodes (0.5×2×2 mm: 5×5 per voxel); the largest count is lowered until the
    mask's nodes fit the budget, and LBV says so."""
    import napari_qsm.core.field.lbv as L

    assert refine_factors((0.5, 2.0, 2.0)) == (1, 5, 5)
    assert refine_factors((0.5, 2.0, 2.0), mask_voxels=1_000_000) == (1, 3, 5)       # 15 M nodes ≤ 20 M
    assert refine_factors((0.5, 2.0, 2.0), mask_voxels=10_000_000) == (1, 1, 1)
    monkeypatch.setattr(L, "MAX_NODES", 1000)
    m = np.zeros((12, 12, 10), bool)
    m[2:10, 2:10, 2:8] = True                                                  # 384 voxels: 1 node each fits
    with pytest.warns(RuntimeWarning, match="refine=off"):
        _, out = lbv(np.zeros(m.shape, np.float32), m, voxel_size=(1.0, 1.0, 3.0))
    assert out.sum() == 6 * 6 * 4                                              # the scan grid's interior
