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
METHODS = ("vsharp", "ismv", "resharp", "pdf", "lbv")
#: measured on this scene: background left inside the returned mask (demeaned relative norm) and local-field NRMSE
#: vsharp 0.39 % / 7.0 % (voxel-centre balls; 0.17 % / 3.0 % with the earlier partial-volume ball), ismv 0.30 % / 20.2 %, resharp 0.05 % / 11.6 %, pdf 0.38 % / 13.6 % (30 CG iterations per grid, 2 coarse
#: levels; 0.19 % / 12.0 % with 100 and 1), lbv 1.22 % / 12.4 % (mask kept 83/70/100/68 %)
LOCAL_NRMSE_MAX = {"vsharp": 0.09, "ismv": 0.30, "resharp": 0.25, "pdf": 0.20, "lbv": 0.20}


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
    assert set(steps) == set(METHODS) and steps["lbv"].default and not steps["vsharp"].default
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


# ------------------------------------------------------------------------------------ issue 24
SHAPE_A, VS_A = (70, 84, 30), (2.0, 2.0, 5.0)        # anisotropic voxels: the same head, 2.5x thicker slices
#: measured on 2×2×5 mm (background left / local-field NRMSE): vsharp 3.5 % / 60 %, ismv 7.1 % / 71 %, resharp
#: 6.6 % / 95 %, pdf 1.1 % / 31 %, lbv (7-point) 1.4 % / 12.6 % with 2 layers peeled, 23.5 % local-field NRMSE with
#: the whole mask (the default: the voxels next to the boundary carry the largest error). A voxel-centre ball on such voxels has unequal
#: second moments along the axes, so its mean of a harmonic field is not the centre value: the SMV methods leave
#: background there (the reason the earlier kernel weighted partial voxels); LBV and PDF handle the voxel shape.
ANISO_LOCAL_MAX = {"vsharp": 0.75, "ismv": 0.85, "resharp": 1.1, "pdf": 0.40, "lbv": 0.27}
#: harmonic field left (3 mm / 2×2×5 mm): every method < 0.01 % at 3 mm but PDF 0.16 %; 2×2×5 mm: vsharp 0.40 %,
#: ismv 1.6 %, resharp 3.7 %, pdf 0.23 %, lbv < 0.01 %
HARMONIC_LEFT_MAX = {"vsharp": 0.01, "ismv": 0.03, "resharp": 0.06, "pdf": 0.005, "lbv": 0.001}
LOCAL = [((10, 10, 5), 6, 0.2), ((-15, -20, 0), 5, 0.3), ((5, -30, 15), 4, -0.2), ((-20, 25, -10), 8, 0.1)]


@pytest.fixture(scope="module")
def scene_aniso():
    mask = _mask(SHAPE_A, VS_A)
    return mask, _spheres(BACKGROUND, SHAPE_A, VS_A), _spheres(LOCAL, SHAPE_A, VS_A)


def _harmonic(shape, vs):
    """A harmonic polynomial (∇² = 0) of a few tenths of a ppm across the brain: what far sources and shims leave."""
    g = np.meshgrid(*[(np.arange(n) * d - c) / 50.0 for n, d, c in zip(shape, vs, _centre(shape, vs))], indexing="ij")
    return (0.5 * (g[0] ** 2 - g[1] ** 2) + 0.3 * g[0] * g[2] + 0.2 * g[1]
            - 0.4 * (g[2] ** 2 - 0.5 * (g[0] ** 2 + g[1] ** 2))).astype(np.float32)


def test_smv_ball_is_the_voxel_centre_ball():
    """QSM.jl / QSM.rs balls: a voxel belongs when its centre is within r (mm); every member weighs the same.
    (The earlier kernel weighted each voxel by the fraction of its volume inside the sphere.)"""
    vs, r = (0.75, 0.75, 3.0), 3.0
    S = bgm.smv_kernel((16, 16, 8), vs, r, "cpu")
    k = np.fft.irfftn(S.numpy().astype(np.complex128), s=(16, 16, 8), axes=(0, 1, 2))
    k = np.roll(k, (8, 8, 4), axis=(0, 1, 2))
    g = np.meshgrid(*[(np.arange(n) - c) * d for n, c, d in zip((16, 16, 8), (8, 8, 4), vs)], indexing="ij")
    inside = sum(x * x for x in g) <= r * r + 1e-9
    assert inside[:, :, 4].sum() == 49 and inside[8, 8, 3] and inside[8, 8, 5] and inside[:, :, 3].sum() == 1
    assert np.allclose(k[inside], 1.0 / inside.sum(), atol=1e-6) and np.allclose(k[~inside], 0.0, atol=1e-6)


def test_sharp_erosion_is_the_ball_erosion(scene_aniso, one_torch_thread):
    """SHARP (one radius) keeps exactly the voxels whose whole voxel-centre ball lies in the mask."""
    from scipy import ndimage

    from napari_qsm.core.field.smv import ball
    mask, bg, loc = scene_aniso
    r = 8.0
    _, m = bgm.vsharp((bg + loc) * mask, mask, bgm.VSharpParams(radius_min=r, radius_max=r), voxel_size=VS_A,
                      device="cpu")
    expected = ndimage.binary_erosion(mask, ball(VS_A, r), border_value=0)
    assert m.sum() > 0.3 * mask.sum()
    assert np.array_equal(m, expected), int((m ^ expected).sum())


def test_radii_are_bounded_by_the_field_of_view(one_torch_thread):
    """A radius wider than the volume is cut to the largest ball that fits in the field of view (10 mm here)."""
    from napari_qsm.core.field.smv import _radii, fov_radius
    shape, vs = (21, 23, 11), (1.0, 1.0, 2.0)
    mask = np.ones(shape, bool)
    f = _harmonic(shape, vs)
    local, m = bgm.vsharp(f, mask, bgm.VSharpParams(radius_max=60.0, radius_min=60.0), voxel_size=vs, device="cpu")
    assert m.sum() >= 1 and m[10, 11, 5] and np.all(np.isfinite(local))
    assert fov_radius(shape, vs) == 10.0 and max(_radii(bgm.VSharpParams(radius_max=60.0), vs, shape)) == 10.0


@pytest.mark.parametrize("name", METHODS)
def test_anisotropic_voxels_outside_removed_inside_kept(scene_aniso, name, one_torch_thread):
    """The analytic scene on 2×2×5 mm voxels: the outside spheres' field goes, the inside spheres' field stays."""
    mask, bg, loc = scene_aniso
    # LBV on the scan's grid here; on thin nodes (its default) the same scene is in test_lbv_refine.py
    kw = {"params": bgm.LBVParams(refine="off")} if name == "lbv" else {}
    local, m = bgm.__dict__[name]((bg + loc) * mask, mask, voxel_size=VS_A, device="cpu", **kw)
    assert m.sum() > 0.5 * mask.sum() and not np.any(m & ~mask)
    err = _rel(local - loc, loc, m)
    assert err < ANISO_LOCAL_MAX[name], f"{name}: local-field NRMSE {100 * err:.1f} % on 2×2×5 mm voxels"
    assert _rel(bg + loc, loc, m) > 5


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("aniso", [False, True])
def test_harmonic_functions_are_removed(name, aniso, one_torch_thread):
    shape, vs = (SHAPE_A, VS_A) if aniso else (SHAPE, VS)
    mask = _mask(shape, vs)
    h = _harmonic(shape, vs)
    local, m = bgm.__dict__[name](h * mask, mask, voxel_size=vs, device="cpu")
    left = _rel(local, h, m)
    assert left < HARMONIC_LEFT_MAX[name], f"{name}: {100 * left:.2f} % of a harmonic field left"


def test_lbv_fourth_order_stencil_on_anisotropic_voxels(scene_aniso, one_torch_thread):
    """The 7-point Laplacian's error on a harmonic background grows with the slice thickness; the 19-point
    (Mehrstellen) Laplacian cancels it to fourth order (on the scan's grid: thin nodes make the voxels near cubes)."""
    mask, bg, _ = scene_aniso
    l7, m7 = bgm.lbv(bg * mask, mask, bgm.LBVParams(stencil=7, refine="off"), voxel_size=VS_A)
    l19, m19 = bgm.lbv(bg * mask, mask, bgm.LBVParams(stencil=19, refine="off"), voxel_size=VS_A)
    both = m7 & m19
    r7, r19 = _rel(l7, bg, both), _rel(l19, bg, both)
    assert r19 < r7 / 3, (r7, r19)


@pytest.mark.parametrize("name,params", [("ismv", bgm.ISMVParams(max_iter=2)), ("resharp", bgm.ResharpParams(max_iter=2)),
                                         ("pdf", bgm.PDFParams(max_iter=2)), ("lbv", bgm.LBVParams(max_iter=2))])
def test_solvers_report_non_convergence(scene, name, params, one_torch_thread):
    mask, bg, loc = scene
    seen = []
    with pytest.warns(bgm.ConvergenceWarning, match="did not converge"):
        bgm.__dict__[name]((bg + loc) * mask, mask, params, voxel_size=VS, device="cpu", progress=seen.append)
    assert any("did not converge" in p.message for p in seen)


@pytest.mark.parametrize("name", ["ismv", "resharp", "lbv"])
def test_solvers_converge_with_their_defaults(scene, name, one_torch_thread):
    import warnings
    mask, bg, loc = scene
    with warnings.catch_warnings():
        warnings.simplefilter("error", bgm.ConvergenceWarning)
        bgm.__dict__[name]((bg + loc) * mask, mask, voxel_size=VS, device="cpu")


def test_pipeline_records_non_convergence_in_the_step(scene, one_torch_thread):
    from napari_qsm.core.constants import GAMMA_BAR_MHZ_PER_T
    from napari_qsm.core.field.pipeline import FieldRecipe, local_field
    from napari_qsm.core.field.records import Echoes

    mask, bg, loc = scene
    te = (0.004, 0.008, 0.012)
    f = (0.1 * bg + loc) * mask                          # small enough not to wrap over ΔTE
    ph = np.stack([2 * np.pi * GAMMA_BAR_MHZ_PER_T * 3.0 * t * f for t in te], axis=-1)
    echoes = Echoes(magnitude=np.where(mask[..., None], 1.0, 0.05) * np.ones(len(te)), phase=np.angle(np.exp(1j * ph)),
                    te=te, b0_tesla=3.0, voxel_size=VS)
    run = local_field(echoes, FieldRecipe(background="lbv", params={"background": {"max_iter": 2}}), mask=mask,
                      device="cpu")
    step = [s for s in run.steps if s["family"] == "background"][0]
    assert any("did not converge" in w for w in step.get("warnings", []))


def test_residual_removal_bases():
    from napari_qsm.core.field.bgtools import remove_residual, residual_basis
    for n in (1, 2, 3):
        assert len(residual_basis(n, True)) == (n + 1) ** 2
    mask = _mask()
    h = _harmonic(SHAPE, VS)
    g = np.meshgrid(*[(np.arange(n) * d - c) / 50.0 for n, d, c in zip(SHAPE, VS, _centre())], indexing="ij")
    r2 = (g[0] ** 2 + g[1] ** 2 + g[2] ** 2).astype(np.float32)        # not harmonic: ∇² r² = 6
    assert _rel(remove_residual(h * mask, mask, VS, "harmonic2"), h, mask) < 1e-4
    assert _rel(remove_residual(r2 * mask, mask, VS, "poly2"), r2, mask) < 1e-4
    assert _rel(remove_residual(r2 * mask, mask, VS, "harmonic2"), r2, mask) > 0.5   # a local field's r² stays
    local, m = bgm.vsharp((h + 0.0) * mask, mask, bgm.VSharpParams(residual="harmonic2"), voxel_size=VS, device="cpu")
    assert np.abs(local[m]).max() < 1e-4 * np.abs(h[m]).max() + 1e-6


def test_lbv_result_does_not_depend_on_the_grid_around_the_mask(one_torch_thread):
    """LBV works in the mask's bounding box: the same head padded by empty space anywhere gives the same local field
    (on the scan's grid and on thin nodes)."""
    shape, vs = (26, 30, 12), (2.0, 2.0, 5.0)
    mask = _mask(shape, vs)
    f = (_spheres(BACKGROUND, shape, vs) + _spheres(LOCAL, shape, vs)) * mask
    pad = ((7, 3), (0, 11), (4, 2))
    for refine in ("off", "auto"):
        l0, m0 = bgm.lbv(f, mask, bgm.LBVParams(refine=refine), voxel_size=vs)
        l1, m1 = bgm.lbv(np.pad(f, pad), np.pad(mask, pad), bgm.LBVParams(refine=refine), voxel_size=vs)
        assert np.array_equal(np.pad(m0, pad), m1) and m0.sum() > 0.5 * mask.sum()
        assert np.allclose(np.pad(l0, pad), l1, atol=1e-6)
