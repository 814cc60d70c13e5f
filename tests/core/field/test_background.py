"""Background field removal against analytic fields (napari_qsm.core.field.background).

Fields are the analytic fields of uniformly magnetised spheres (napari_qsm.core.dipole.sphere_field),
not the discrete dipole kernel that PDF uses, so no method is favoured by construction.
"""

import numpy as np
import pytest

from napari_qsm.core.dipole import sphere_field
from napari_qsm.core.field import background as bgm
from napari_qsm.core.scan import ScanError

SHAPE = (52, 60, 52)
VS = (3.0, 3.0, 3.0)
METHODS = ("vsharp", "resharp", "pdf", "lbv")
#: measured on this scene: background left inside the returned mask (demeaned relative norm) and local-field NRMSE
#: vsharp 0.17 % / 3.0 %, resharp 0.05 % / 11.6 %, pdf 0.38 % / 13.6 % (30 CG iterations per grid, 2 coarse
#: levels; 0.19 % / 12.0 % with 100 and 1), lbv 1.22 % / 12.4 % (mask kept 83/70/100/68 %)
LOCAL_NRMSE_MAX = {"vsharp": 0.06, "resharp": 0.25, "pdf": 0.20, "lbv": 0.20}


def _centre(shape=SHAPE, vs=VS):
    return [(n - 1) / 2 * d for n, d in zip(shape, vs)]


def _mask(shape=SHAPE, vs=VS):
    g = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(shape, vs, _centre(shape, vs))], indexing="ij")
    return (g[0] / 62) ** 2 + (g[1] / 75) ** 2 + (g[2] / 58) ** 2 < 1


def _spheres(items, shape=SHAPE, vs=VS):
    out = np.zeros(shape, np.float32)
    for cen, r, dchi in items:
        out += sphere_field(shape, vs, [a + b for a, b in zip(_centre(shape, vs), cen)], r, dchi)
    return out


BACKGROUND = [((0, 62, -50), 12, -9.0), ((70, 0, -35), 8, -9.0), ((-70, 0, -35), 8, -9.0)]


@pytest.fixture(scope="module")
def scene():
    mask = _mask()
    # air-like sources (Δχ −9 ppm) outside the brain: a frontal sinus and two ear canals; several ppm at the edge
    bg = _spheres(BACKGROUND)
    # sources inside the brain: four small spheres of a few tenths of a ppm
    loc = _spheres([((10, 10, 5), 6, 0.2), ((-15, -20, 0), 5, 0.3), ((5, -30, 15), 4, -0.2), ((-20, 25, -10), 8, 0.1)])
    assert not np.any(mask & (_spheres([((0, 62, -50), 12, 1.0)]) == 0) & (np.abs(bg) > 10))
    assert np.abs(bg[mask]).max() > 1.5 and np.abs(loc[mask]).max() < 0.2
    return mask, bg, loc


def _rel(a, b, m):
    a = a[m] - a[m].mean()
    b = b[m] - b[m].mean()
    return float(np.linalg.norm(a) / np.linalg.norm(b))


def _run(name, field, mask, **kw):
    return getattr(bgm, name)(field * mask, mask, voxel_size=VS, device="cpu", **kw)


@pytest.mark.parametrize("name", METHODS)
def test_outside_sources_are_removed(scene, name, one_torch_thread):
    mask, bg, _ = scene
    local, m = _run(name, bg, mask)
    assert local.dtype == np.float32 and m.dtype == bool and local.shape == SHAPE
    assert m.sum() > 0.6 * mask.sum() and not np.any(m & ~mask)
    assert np.all(local[~m] == 0)
    left = _rel(local, bg, m)
    # LBV's 7-point Laplacian is second order: 1.2 % at these 3 mm voxels (see the convergence test)
    assert left < (0.015 if name == "lbv" else 0.01), f"{name}: {100 * left:.2f} % of the background left"


def test_lbv_residual_is_second_order_in_the_voxel_size(scene, one_torch_thread):
    """LBV's residual background is the 7-point Laplacian's truncation error: O(h²). Measured 1.22 % at 3 mm and
    2.0 % at 4 mm (ratio 1.7, (4/3)² = 1.78), so about 0.14 % at 1 mm, well below 1 %."""
    mask, bg, _ = scene
    local, m = _run("lbv", bg, mask)
    r3 = _rel(local, bg, m)
    shape4, vs4 = (39, 45, 39), (4.0, 4.0, 4.0)
    mask4 = _mask(shape4, vs4)
    bg4 = _spheres(BACKGROUND, shape4, vs4)
    l4, m4 = bgm.lbv(bg4 * mask4, mask4, voxel_size=vs4)
    r4 = _rel(l4, bg4, m4)
    assert 1.4 < r4 / r3 < 2.4, (r3, r4)
    assert r3 * (1.0 / 3.0) ** 2 < 0.01


@pytest.mark.parametrize("name", METHODS)
def test_local_field_is_kept(scene, name, one_torch_thread):
    mask, bg, loc = scene
    local, m = _run(name, bg + loc, mask)
    err = _rel(local - loc, loc, m)
    assert err < LOCAL_NRMSE_MAX[name], f"{name}: local-field NRMSE {100 * err:.1f} %"
    # the check can fail: handing back the total field is far off
    assert _rel(bg + loc, loc, m) > 5


def test_vsharp_uses_the_largest_fitting_kernel_and_its_erosion(scene, one_torch_thread):
    mask, bg, loc = scene
    _, m1 = _run("vsharp", bg + loc, mask, params=bgm.VSharpParams(radius_min=3.0))
    _, m2 = _run("vsharp", bg + loc, mask, params=bgm.VSharpParams(radius_min=9.0))
    assert m2.sum() < m1.sum() < mask.sum()
    # one ball kernel: the normalised ball has unit sum (S(0) = 1)
    S = bgm.smv_kernel((16, 16, 16), VS, 6.0, "cpu")
    assert abs(float(S[0, 0, 0]) - 1.0) < 1e-6


def test_pdf_noise_weighting_downweights_bad_voxels(scene, one_torch_thread):
    """Voxels with a large error and a matching large N_std must not drive the fitted background."""
    mask, bg, loc = scene
    g = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    bad = mask & (g[0] > 38)                         # a slab of the brain with corrupted phase
    corrupt = (bg + loc + np.where(bad, 3.0, 0.0)).astype(np.float32)
    nstd = np.where(bad, 100.0, 0.01).astype(np.float32)
    good = mask & (g[0] < 30)
    p = bgm.PDFParams(max_iter=60)
    lw, _ = bgm.pdf(corrupt * mask, mask, p, voxel_size=VS, noise_std=nstd, device="cpu")
    lu, _ = bgm.pdf(corrupt * mask, mask, bgm.PDFParams(max_iter=60, use_noise=False), voxel_size=VS,
                    noise_std=nstd, device="cpu")
    assert _rel(lw - loc, loc, good) < 0.5 * _rel(lu - loc, loc, good)


def test_bad_inputs_and_steps():
    f = np.zeros((8, 8, 8), np.float32)
    m = np.ones((8, 8, 8), bool)
    with pytest.raises(ScanError, match="mask"):
        bgm.vsharp(f, np.zeros((8, 8, 8), bool))
    with pytest.raises(ScanError, match="mask"):
        bgm.lbv(f, np.ones((8, 8, 9), bool))
    with pytest.raises(ScanError, match="total_field"):
        bgm.pdf(np.full((8, 8, 8), np.nan, np.float32), m)
    with pytest.raises(ScanError, match="noise_std"):
        bgm.pdf(f, m, noise_std=np.zeros((8, 8, 8)))
    with pytest.raises(ScanError, match="total_field"):
        bgm.resharp(np.zeros((8, 8)), m)
    steps = {s.name: s for s in bgm.STEPS}
    assert set(steps) == set(METHODS) and steps["vsharp"].default
    assert all(s.family == "background" for s in steps.values())
    assert "1e-4" in steps["resharp"].doc and "QSM.rs" in steps["resharp"].doc


@pytest.mark.parametrize("name", METHODS)
def test_progress_and_cancel(scene, name, one_torch_thread):
    from napari_qsm.core.progress import Cancelled, CancelToken

    mask, bg, _ = scene
    seen = []
    token = CancelToken()

    def progress(p):
        seen.append(p)
        if len(seen) == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        _run(name, bg, mask, progress=progress, cancel=token)
    assert len(seen) == 2 and seen[0].stage == "background"
