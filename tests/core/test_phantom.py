"""Tests of the procedural head phantom (napari_qsm.core.sim.phantom). Small grids keep them quick."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from napari_qsm.core.dipole import forward_field
from napari_qsm.core.sim.phantom import (
    BRAIN_LABELS, CHI_RANGES, CLINICAL, GAMMA_BAR, LABEL_NAMES, Phantom, make_phantom,
    oblique_direction, save_phantom,
)

SMALL = dict(shape=(64, 72, 64), voxel_size=(2.5, 2.5, 2.5))


@pytest.fixture(scope="module")
def small():
    return make_phantom(**SMALL, seed=3, device="cpu")


@pytest.fixture(scope="module")
def one_mm():
    # 1 mm isotropic; the FOV is a bit smaller than a head, so the head is scaled to fit it
    return make_phantom(shape=(128, 152, 120), voxel_size=(1.0, 1.0, 1.0), seed=11, device="cpu")


@pytest.fixture(scope="module")
def clinical():
    return make_phantom(**CLINICAL, seed=5, device="cpu")


@pytest.fixture(scope="module")
def noisy_pair():
    kw = dict(SMALL, seed=7, device="cpu", b0_direction=oblique_direction(15, "y"))
    return make_phantom(**kw, snr=None), make_phantom(**kw, snr=15.0)


def test_types_and_shapes(small):
    p = small
    assert isinstance(p, Phantom)
    for name in ("chi", "field", "magnitude"):
        arr = getattr(p, name)
        assert arr.dtype == np.float32 and arr.shape == SMALL["shape"], name
        assert np.all(np.isfinite(arr)), name
    assert p.mask.dtype == bool and p.labels.dtype == np.int16
    assert p.noise_std is None and p.snr is None
    assert p.b0_direction.dtype == np.float64 and p.b0_direction.shape == (3,)
    assert p.affine.shape == (4, 4)
    assert p.voxel_size == (2.5, 2.5, 2.5)
    assert p.label_names == LABEL_NAMES
    assert np.array_equal(p.mask, np.isin(p.labels, BRAIN_LABELS))
    info = p.info()
    json.dumps(info)  # JSON-friendly
    for key in ("shape", "voxel_size", "b0_direction", "te", "b0_tesla", "snr", "seed", "label_names", "label_chi"):
        assert key in info
    assert set(info["label_chi"]) == set(LABEL_NAMES.values())


def test_head_fits_and_is_centred(small):
    lab = small.labels
    # no head on the side faces or the top face (the neck leaves through the bottom)
    for face in (lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, -1]):
        assert not face.any()
    com = np.array(ndimage.center_of_mass(small.mask)) - (np.array(lab.shape) - 1) / 2
    assert np.all(np.abs(com * 2.5) < 15.0)  # brain centre within 15 mm of the volume centre
    # magnitude: skull dark, CSF bright, haemorrhage/veins darker than white matter
    med = {n: np.median(small.magnitude[lab == l]) for l, n in LABEL_NAMES.items()}
    assert med["skull"] < 0.3 * med["white_matter"]
    assert med["csf"] > med["cortex"] > med["white_matter"] > med["globus_pallidus"]
    assert med["haemorrhage"] < med["white_matter"] and med["vein"] < med["white_matter"]
    far = ~ndimage.binary_dilation(lab > 0, iterations=3)
    assert np.all(small.magnitude[far] < 0.01 * med["white_matter"])


def test_deterministic():
    kw = dict(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=4, snr=20.0, device="cpu")
    a, b = make_phantom(**kw), make_phantom(**kw)
    for name in ("chi", "field", "mask", "magnitude", "labels", "noise_std", "affine"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.label_chi == b.label_chi


def test_seed_changes_geometry_and_values(small):
    other = make_phantom(**SMALL, seed=4, device="cpu")
    assert other.label_chi != small.label_chi
    differ = np.mean(other.labels != small.labels)
    assert differ > 0.02, differ
    # lesion sites move with the seed
    for lab in (11, 12):
        c0 = np.array(ndimage.center_of_mass(small.labels == lab))
        c1 = np.array(ndimage.center_of_mass(other.labels == lab))
        assert np.linalg.norm((c0 - c1) * 2.5) > 3.0
    assert not np.allclose(other.chi, small.chi)


def test_same_seed_same_head_at_other_resolution(small):
    coarse = make_phantom(shape=(32, 36, 32), voxel_size=(5.0, 5.0, 5.0), seed=3, device="cpu")
    v_small = small.mask.sum() * 2.5 ** 3
    v_coarse = coarse.mask.sum() * 5.0 ** 3
    assert abs(v_coarse / v_small - 1) < 0.05
    assert coarse.label_chi == small.label_chi


def test_brain_and_head_size():
    # a field of view that holds the head unscaled (research preset FOV at 4 mm)
    p = make_phantom(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=0, device="cpu")
    v = p.mask.sum() * 4.0 ** 3
    assert 0.85e6 < v < 1.5e6, v  # mm³; adult brains are ~1.1–1.4 l
    head = np.argwhere(p.labels > 0)
    ext = (head[:, :2].max(0) - head[:, :2].min(0) + 1) * 4.0
    assert 125 <= ext[0] <= 156 and 155 <= ext[1] <= 188, ext  # left-right, anterior-posterior (mm)


def _label_medians(p):
    out = {}
    for lab, name in p.label_names.items():
        m = p.labels == lab
        core = ndimage.binary_erosion(m)  # away from partial-volume edges
        sel = core if core.sum() >= 5 else m
        out[name] = (float(np.median(p.chi[sel])), int(m.sum()))
    return out


def test_all_labels_and_chi_ranges_at_1mm(one_mm):
    p = one_mm
    meds = _label_medians(p)
    for name, (med, count) in meds.items():
        assert count > 0, f"label {name} missing at 1 mm"
        lo, _, hi = CHI_RANGES[name]
        assert lo <= p.label_chi[name] <= hi
        if name in ("extra_axial_csf", "skull", "scalp"):
            assert med == 0.0
            continue
        assert lo - 2e-3 <= med <= hi + 2e-3, (name, med, (lo, hi))
    assert np.all(p.chi[~p.mask] == 0)


def test_all_labels_in_clinical(clinical):
    p = clinical
    assert p.chi.shape == CLINICAL["shape"]
    counts = {name: int((p.labels == lab).sum()) for lab, name in p.label_names.items()}
    assert all(c > 0 for c in counts.values()), counts
    # deep structures exist in several 3 mm slices
    for lab in (4, 5, 6, 7, 8, 9):
        assert np.any(p.labels == lab, axis=(0, 1)).sum() >= 2, LABEL_NAMES[lab]
    # partial volume through the thick slices: values between white matter and globus pallidus
    gp = ndimage.binary_dilation(p.labels == 6, iterations=1) & p.mask
    vals = p.chi[gp]
    wm, gpv = p.label_chi["white_matter"], p.label_chi["globus_pallidus"]
    inter = np.mean((vals > wm + 0.3 * (gpv - wm)) & (vals < wm + 0.7 * (gpv - wm)))
    assert inter > 0.05
    assert np.all(p.chi[~p.mask] == 0)


def test_randomize_false_uses_nominal_values():
    p = make_phantom(**SMALL, seed=2, randomize=False, texture=False, device="cpu")
    for name, (lo, nom, hi) in CHI_RANGES.items():
        assert p.label_chi[name] == nom
    wm = ndimage.binary_erosion(p.labels == 1, iterations=1)
    nominal = CHI_RANGES["white_matter"][1]
    assert np.mean(np.abs(p.chi[wm] - nominal) < 1e-5) > 0.3  # pure white matter (no sub-voxel sulci)
    assert abs(np.median(p.chi[wm]) - nominal) < 2e-3


def test_texture_amplitude(small):
    flat = make_phantom(**SMALL, seed=3, texture=False, device="cpu")
    assert np.array_equal(flat.labels, small.labels)
    wm = ndimage.binary_erosion(small.labels == 1, iterations=2)
    d = (small.chi - flat.chi)[wm]
    assert 0.002 < d.std() < 0.012
    assert abs(d.mean()) < 0.004
    csf = ndimage.binary_erosion(small.labels == 3, iterations=1)
    if csf.any():
        assert np.allclose(small.chi[csf], flat.chi[csf])


def test_field_is_forward_model_times_mask(small):
    ref = forward_field(small.chi, small.voxel_size, small.b0_direction, device="cpu") * small.mask
    assert np.allclose(small.field, ref, atol=1e-7)
    assert np.all(small.field[~small.mask] == 0)


def test_noise_model(noisy_pair):
    clean, noisy = noisy_pair
    assert np.array_equal(clean.chi, noisy.chi) and np.array_equal(clean.labels, noisy.labels)
    m = clean.mask
    std = noisy.noise_std
    assert std.dtype == np.float32 and std.shape == clean.chi.shape and np.all(std > 0)
    # σ_f = min(1, mean_mag / (snr · mag)) / (2π γ̄ B0 TE) · 1e6
    mean_mag = clean.magnitude[m].mean()
    sig_phi = np.minimum(1.0, mean_mag / (15.0 * np.maximum(clean.magnitude, 1e-12)))
    expect = sig_phi / (2 * np.pi * GAMMA_BAR * 3.0 * 0.02) * 1e6
    assert np.allclose(std, expect, rtol=1e-4)
    resid = (noisy.field - clean.field)
    assert np.all(resid[~m] == 0)
    z = resid[m] / std[m]
    assert abs(z.std() - 1.0) < 0.1
    # empirical noise of a homogeneous σ group within 10 %
    band = m & (std > np.percentile(std[m], 40)) & (std < np.percentile(std[m], 60))
    assert abs(resid[band].std() / std[band].mean() - 1) < 0.1
    # darker voxels are noisier
    mag = clean.magnitude
    lo = m & (mag < np.percentile(mag[m], 20))
    hi = m & (mag > np.percentile(mag[m], 80))
    assert resid[lo].std() > 1.3 * resid[hi].std()
    assert np.corrcoef(std[m], mag[m])[0, 1] < 0
    # magnitude carries noise of SNR ~15 at the mean
    assert not np.array_equal(noisy.magnitude, clean.magnitude)
    bg = clean.labels == 0
    assert noisy.magnitude[bg].mean() > 0


@pytest.mark.parametrize("b0", [(0.0, 0.0, 1.0), tuple(oblique_direction(20, "x")), tuple(oblique_direction(-35, "y"))])
def test_affine_consistent_with_b0(b0):
    from napari_qsm.core.sim.phantom import affine_for

    shape, vs = (20, 24, 10), (0.75, 0.75, 3.0)
    A = affine_for(shape, vs, b0)
    cols = A[:3, :3]
    norms = np.linalg.norm(cols, axis=0)
    assert np.allclose(norms, vs)
    R = cols / norms
    assert np.allclose(R.T @ R, np.eye(3), atol=1e-12) and np.linalg.det(R) > 0
    b = np.linalg.inv(R) @ np.array([0.0, 0.0, 1.0])
    assert np.allclose(b, b0, atol=1e-12)
    centre = np.r_[(np.array(shape) - 1) / 2.0, 1.0]
    assert np.allclose(A @ centre, [0, 0, 0, 1], atol=1e-9)


def test_oblique_direction_and_phantom_affine():
    b = oblique_direction(20, "x")
    assert np.allclose(b, [0.0, -np.sin(np.radians(20)), np.cos(np.radians(20))])
    assert np.allclose(np.linalg.norm(b), 1.0)
    assert np.allclose(oblique_direction(90, "y"), [1, 0, 0], atol=1e-12)
    p = make_phantom(shape=(24, 28, 12), voxel_size=(6.0, 6.0, 12.0), seed=1, b0_direction=b, device="cpu")
    R = p.affine[:3, :3] / np.linalg.norm(p.affine[:3, :3], axis=0)
    assert np.allclose(np.linalg.inv(R) @ [0, 0, 1], p.b0_direction)
    assert np.allclose(p.b0_direction, b)
    with pytest.raises(ValueError):
        oblique_direction(10, "w")


def test_bad_inputs():
    with pytest.raises(ValueError):
        make_phantom(shape=(10, 10), voxel_size=(1, 1, 1))
    with pytest.raises(ValueError):
        make_phantom(shape=(10, 10, 10), voxel_size=(1, 0, 1))
    with pytest.raises(ValueError):
        make_phantom(shape=(10, 10, 10), snr=-3)
    with pytest.raises(ValueError, match="too small"):
        make_phantom(shape=(64, 64, 1), voxel_size=(2, 2, 2))


def test_save_phantom_roundtrip(tmp_path, noisy_pair):
    nib = pytest.importorskip("nibabel")
    p = noisy_pair[1]
    paths = save_phantom(p, tmp_path / "ph")
    for name in ("field", "mask", "magnitude", "chi", "labels", "noise_std", "json"):
        assert paths[name].exists(), name
    for name, ref in (("field", p.field), ("magnitude", p.magnitude), ("chi", p.chi),
                      ("labels", p.labels), ("mask", p.mask), ("noise_std", p.noise_std)):
        img = nib.load(str(paths[name]))
        assert np.allclose(img.affine, p.affine, atol=1e-5), name
        data = np.asanyarray(img.dataobj)
        assert data.shape == ref.shape
        assert np.array_equal(data, ref.astype(data.dtype)), name
    assert nib.load(str(paths["mask"])).get_data_dtype() == np.uint8
    assert nib.load(str(paths["labels"])).get_data_dtype() == np.int16
    info = json.loads(paths["json"].read_text())
    assert info["seed"] == 7 and info["snr"] == 15.0
    assert np.allclose(info["b0_direction"], p.b0_direction)
    # B0 read back from the written affine equals the phantom's direction
    A = nib.load(str(paths["field"])).affine
    R = A[:3, :3] / np.linalg.norm(A[:3, :3], axis=0)
    assert np.allclose(np.linalg.inv(R) @ [0, 0, 1], p.b0_direction, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# honest mode (issue 14): finer-grid field, multi-echo fit, fitted noise map, partial magnitude edges
# ----------------------------------------------------------------------------------------------

from napari_qsm.core.sim.phantom import (  # noqa: E402
    CLINICAL_ECHOES, RESEARCH_ECHOES, EchoProtocol, default_echo_protocol, edge_agreement,
)

HONEST = dict(shape=(64, 64, 64), voxel_size=(2.5, 2.5, 2.5), device="cpu", honest=True)


@pytest.fixture(scope="module")
def honest_pair():
    """Noise-free and SNR-40 honest phantoms of one head (the noise stream is separate)."""
    return (make_phantom(**HONEST, seed=3, keep_echoes=True),
            make_phantom(**HONEST, seed=3, snr=40.0, keep_echoes=True))


def _demeaned(a, m):
    v = a[m].astype(np.float64)
    return v - v.mean()


def _rel(a, b, m):
    return np.linalg.norm(_demeaned(a, m) - _demeaned(b, m)) / np.linalg.norm(_demeaned(b, m))


def test_honest_record(honest_pair):
    clean, noisy = honest_pair
    assert clean.simulation == "honest" and make_phantom(**SMALL, seed=3, device="cpu").simulation == "idealised"
    assert clean.echo_times == RESEARCH_ECHOES.echo_times and clean.te == RESEARCH_ECHOES.delta_te
    assert clean.noise_std is None and noisy.noise_std is not None
    for p in honest_pair:
        for name in ("chi", "field", "magnitude", "true_field", "r2star"):
            a = getattr(p, name)
            assert a.dtype == np.float32 and a.shape == HONEST["shape"] and np.all(np.isfinite(a)), name
        assert np.all(p.field[~p.mask] == 0) and np.all(p.chi[~p.mask] == 0)
    assert np.all(noisy.noise_std > 0) and np.all(np.isfinite(noisy.noise_std))
    info = clean.info()
    json.dumps(noisy.info())
    assert info["simulation"] == "honest" and len(info["echo_times"]) == 5
    # same anatomy and χ with and without noise
    assert np.array_equal(clean.chi, noisy.chi) and np.array_equal(clean.labels, noisy.labels)
    # R2* fitted from the echoes is physical: iron-rich pallidum above white matter above CSF
    lab = clean.labels
    med = {n: np.median(clean.r2star[ndimage.binary_erosion(lab == l)]) for l, n in ((1, "wm"), (6, "gp"), (3, "csf"))}
    assert med["gp"] > med["wm"] > med["csf"], med
    # protocols: clinical for thick slices, research otherwise; timing as published / documented
    assert CLINICAL_ECHOES.echo_times[0] == 0.0126 and len(CLINICAL_ECHOES.echo_times) == 7
    assert abs(CLINICAL_ECHOES.echo_times[-1] - (0.0126 + 6 * 0.0041)) < 1e-12
    assert default_echo_protocol((0.75, 0.75, 3.0)) is CLINICAL_ECHOES
    assert default_echo_protocol((1.0, 1.0, 1.0)) is RESEARCH_ECHOES
    with pytest.raises(ValueError):
        make_phantom(**SMALL, echo_protocol=RESEARCH_ECHOES)  # echoes need honest=True
    with pytest.raises(ValueError):
        make_phantom(**HONEST, echo_protocol=EchoProtocol(1, 0.01, 0.01))


def test_honest_field_has_model_error_but_same_low_frequencies(honest_pair):
    """The field is not the inversions' discrete forward model of χ (no inverse crime), yet physically the same."""
    p = honest_pair[0]
    m = p.mask
    discrete = forward_field(p.chi, p.voxel_size, p.b0_direction, device="cpu") * m
    e_true = _rel(p.true_field, discrete, m)
    e_fit = _rel(p.field, discrete, m)
    # measured 7.3 % (true field) and 9.7 % (fitted) on this head
    assert e_true > 0.04 and e_fit > e_true, (e_true, e_fit)
    assert e_fit < 0.2, e_fit
    low = lambda a: ndimage.gaussian_filter(a * m, 2.0)  # noqa: E731
    l_true, l_fit = _rel(low(p.true_field), low(discrete), m), _rel(low(p.field), low(discrete), m)
    # measured 1.2 % and 2.5 %: the model error is high-frequency
    assert l_true < 0.3 * e_true and l_fit < 0.05, (l_true, l_fit)
    # the idealised phantom is the discrete model exactly (that is what honest mode avoids)
    ideal = make_phantom(**SMALL, seed=3, device="cpu")
    ref = forward_field(ideal.chi, ideal.voxel_size, ideal.b0_direction, device="cpu") * ideal.mask
    assert _rel(ideal.field, ref, ideal.mask) < 1e-5


def test_honest_fine_field_matches_sphere_analytics():
    """The fine-grid forward model used by honest mode reproduces the analytic field of a sphere."""
    from napari_qsm.core.dipole import forward_field_support, sphere_field
    from napari_qsm.core.sim.signal import _block_mean

    n, vs = 48, 1.0
    c = (n - 1) / 2 * vs  # sphere centre (mm) in the voxel-centre coordinates i·vs
    x_fine = np.arange(2 * n) * vs / 2 - vs / 4 - c  # the two fine points of voxel i sit at i·vs ∓ vs/4
    g = np.meshgrid(x_fine, x_fine, x_fine, indexing="ij", sparse=True)
    chi_f = (np.sqrt(sum(x * x for x in g)) < 6.0).astype(np.float32) * 0.5
    everywhere = np.ones(chi_f.shape, bool)
    fld = _block_mean(forward_field_support(chi_f, (vs / 2,) * 3, (0.0, 0.0, 1.0), everywhere, "cpu"), 2)
    ref = sphere_field((n,) * 3, (vs,) * 3, (c, c, c), 6.0, 0.5)
    r = np.sqrt(sum(x * x for x in np.meshgrid(*[np.arange(n) * vs - c] * 3, indexing="ij")))
    ring = (r > 8.0) & (r < 18.0)
    err = np.linalg.norm((fld - ref)[ring]) / np.linalg.norm(ref[ring])
    assert err < 0.05, err


def test_honest_noise_map_tracks_fitted_field_noise(honest_pair):
    clean, noisy = honest_pair
    m = clean.mask
    resid = (noisy.field - clean.field)[m]
    std = noisy.noise_std[m]
    assert abs(resid.std() / np.sqrt(np.mean(std ** 2)) - 1) < 0.2
    for lo, hi in ((0, 30), (30, 70), (70, 100)):  # noisier and quieter voxels alike
        a, b = np.percentile(std, [lo, hi])
        band = (std >= a) & (std <= b)
        assert abs(resid[band].std() / np.sqrt(np.mean(std[band] ** 2)) - 1) < 0.2, (lo, hi)
    # σ estimated from the background air is the σ that was added (mean echo-1 magnitude / SNR)
    assert clean.echoes.shape == HONEST["shape"] + (5,) and clean.echoes.dtype == np.complex64
    sig_true = np.abs(clean.echoes[..., 0])[m].mean() / 40.0
    assert abs(noisy.noise_sigma / sig_true - 1) < 0.05
    # the noise is complex Gaussian of that σ on every echo
    d = (noisy.echoes - clean.echoes)[..., -1]
    assert abs(np.std(d.real) / sig_true - 1) < 0.05 and abs(np.std(d.imag) / sig_true - 1) < 0.05


def test_honest_magnitude_does_not_copy_chi(honest_pair):
    """No χ texture in the honest magnitude; its edges match χ's only partly (reported, see docstring)."""
    kw = dict(HONEST, seed=3)
    flat = make_phantom(**kw, texture=False)
    p = honest_pair[0]
    ideal, ideal_flat = make_phantom(**SMALL, seed=3, device="cpu"), make_phantom(**SMALL, seed=3, texture=False,
                                                                                     device="cpu")
    hp = lambda a: a - ndimage.gaussian_filter(a, 2.0)  # noqa: E731

    def tex_corr(a, b):
        wm = ndimage.binary_erosion(a.labels == 1)
        return np.corrcoef(hp(a.chi - b.chi)[wm], hp(a.magnitude)[wm])[0, 1]

    r_ideal, r_honest = tex_corr(ideal, ideal_flat), tex_corr(p, flat)
    assert r_ideal < -0.15 and abs(r_honest) < 0.1, (r_ideal, r_honest)
    share = edge_agreement(p.chi, p.magnitude, p.mask, p.voxel_size)
    assert 0.3 < share < 0.85, share  # above chance (0.3), far from every χ edge
    assert p.silent_veins >= 1 and 3 <= len(p.wmh) <= 6
    # white-matter-hyperintensity-like spots: brighter magnitude, no χ change there
    assert np.array_equal(np.isin(p.labels, BRAIN_LABELS), p.mask)


def test_edge_agreement_definition():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 1.5)
    b = ndimage.gaussian_filter(rng.standard_normal((32, 32, 32)), 1.5)
    m = np.ones(a.shape, bool)
    assert edge_agreement(a, 3 * a + 1, m, (1, 1, 1)) == 1.0
    assert abs(edge_agreement(a, b, m, (1, 1, 1)) - 0.3) < 0.08


def test_honest_deterministic_and_edit_hook():
    kw = dict(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=4, snr=30.0, device="cpu", honest=True)
    a, b = make_phantom(**kw), make_phantom(**kw)
    for name in ("chi", "field", "mask", "magnitude", "labels", "noise_std", "true_field", "r2star"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    other = make_phantom(**dict(kw, seed=5))
    assert not np.array_equal(other.field, a.field)
    # noise_seed: the same head with an independent noise realisation (e.g. COSMOS orientations)
    n1, n2 = make_phantom(**kw, noise_seed=1), make_phantom(**kw, noise_seed=2)
    assert np.array_equal(n1.chi, a.chi) and np.array_equal(n1.true_field, a.true_field)
    clean = make_phantom(**dict(kw, snr=None))
    e0, e1, e2 = ((p.field - clean.field)[a.mask] for p in (a, n1, n2))
    assert min(e0.std(), e1.std(), e2.std()) > 0
    assert abs(np.corrcoef(e1, e2)[0, 1]) < 0.1 and abs(np.corrcoef(e0, e1)[0, 1]) < 0.1, "noise not independent"
    seen = {}

    def edit(g):
        seen["shape"], seen["vs"], seen["factor"] = g.shape, g.voxel_size, g.factor
        g.chi[g.mask] += 0.1  # a constant shift of the brain's χ ...

    e = make_phantom(**kw, edit=edit)
    assert seen == {"shape": (80, 96, 80), "vs": (2.0, 2.0, 2.0), "factor": 2}
    d = (e.chi - a.chi)[a.mask]
    assert abs(np.median(d) - 0.1) < 1e-3  # ... shows in the χ truth
    assert not np.array_equal(e.field, a.field)  # and in the field (the edit comes before the physics)


# ----------------------------------------------------------------------------------------------
# head in air (issue 13): background field of tissue/air/skull and air cavities, raw echoes, truth
# ----------------------------------------------------------------------------------------------

from napari_qsm.core.sim.phantom import TISSUE_VS_AIR, save_raw_bids  # noqa: E402

BG = dict(shape=(40, 48, 40), voxel_size=(4.0, 4.0, 4.0), seed=2, snr=50.0, honest=True, keep_echoes=True,
          device="cpu")


@pytest.fixture(scope="module")
def bg_pair(one_torch_thread):
    """The same head with (head in air, cavities, shim) and without background."""
    return make_phantom(**BG, background=True), make_phantom(**BG)


def _near_far(p):
    d = ndimage.distance_transform_edt(~p.cavity_mask, sampling=p.voxel_size)
    return p.mask & (d <= 6.0), p.mask & (d > 25.0)


def test_background_several_ppm_near_cavities_small_far(bg_pair):
    p, _ = bg_pair
    assert p.background and p.cavity_mask.any() and len(p.cavities) == 5
    assert all(c["fine_points"] > 0 for c in p.cavities)
    assert p.background_chi["tissue"] == pytest.approx(-9.41) and p.background_chi["skull"] < TISSUE_VS_AIR
    assert not (p.cavity_mask & p.mask).any()  # cavities never replace brain
    bg = p.true_total_field - p.true_local_field
    near, far = _near_far(p)
    assert near.sum() > 50 and far.sum() > 1000
    a_near, a_far = np.abs(bg[near]), np.abs(bg[far])
    assert a_near.max() > 2.0 and np.percentile(a_near, 90) > 1.0, (a_near.max(), np.percentile(a_near, 90))
    assert a_far.max() < 1.0 and np.percentile(a_far, 99) < 0.6, a_far.max()
    # without the shim the whole head's shape adds a low-order field of a few ppm across the brain
    raw = make_phantom(**dict(BG, snr=None, keep_echoes=False), background=True, shim_order=None)
    bg_raw = (raw.true_total_field - raw.true_local_field)[far]
    assert np.ptp(bg_raw) > 2.0 and bg_raw.std() > 3 * bg[far].std(), (np.ptp(bg_raw), bg_raw.std(), bg[far].std())


def test_local_truth_is_the_field_of_the_brain_sources_alone(bg_pair):
    p, plain = bg_pair
    # the brain's own sources give exactly the field of the head without background (same fine grid)
    assert np.array_equal(p.chi, plain.chi) and np.array_equal(p.mask, plain.mask)
    assert np.array_equal(p.true_local_field, plain.true_field)
    assert np.array_equal(plain.true_local_field, plain.true_field)
    np.testing.assert_array_equal(p.true_field, p.true_total_field * p.mask)
    # the rest (tissue/air/skull outside and the brain's uniform −9.41 ppm) is harmonic inside the brain
    bg = p.true_total_field - p.true_local_field
    d = ndimage.distance_transform_edt(~p.cavity_mask, sampling=p.voxel_size)
    core = ndimage.binary_erosion(p.mask, iterations=3) & (d > 12.0)

    def lap(a):
        return sum(np.roll(a, 1, k) + np.roll(a, -1, k) for k in range(3)) - 6 * a

    l_bg = np.sqrt(np.mean(lap(bg)[core] ** 2))
    l_loc = np.sqrt(np.mean(lap(p.true_local_field)[core] ** 2))
    assert l_bg < 0.1 * l_loc, (l_bg, l_loc)
    # and the local field is the dipole field of χ (low frequencies agree with the discrete model)
    disc = forward_field(p.chi, p.voxel_size, p.b0_direction, device="cpu") * p.mask
    low = lambda a: ndimage.gaussian_filter(a, 2.0)  # noqa: E731
    assert _rel(low(p.true_local_field), low(disc), ndimage.binary_erosion(p.mask, iterations=2)) < 0.1


def test_background_wraps_in_late_echoes_and_fitted_field(bg_pair):
    p, _ = bg_pair
    near, far = _near_far(p)
    S, tes = p.echoes, p.echo_times
    rad = 2 * np.pi * GAMMA_BAR * p.b0_tesla * 1e-6

    def wrapped_share(e, region):  # voxels whose phase evolution TE1→TE_e is off the principal value by 2πk
        ev = np.angle(S[..., e] * np.conj(S[..., 0]))
        om = rad * p.true_total_field * (tes[e] - tes[0])
        return float(np.mean(np.round((om - ev) / (2 * np.pi))[region] != 0))

    assert wrapped_share(len(tes) - 1, near) > 0.5 > wrapped_share(1, near)
    assert wrapped_share(1, far) < 0.01
    # the delivered field is the fit's: the true total field plus whole wrap periods
    r = (p.field - p.true_field)[p.mask] / p.wrap_period_ppm
    k = np.round(r)
    assert np.mean(np.abs(r - k) < 0.1) > 0.95 and np.sum(k != 0) > 50
    assert p.wrap_period_ppm == pytest.approx(1e6 / (GAMMA_BAR * 3.0 * 0.004))


def test_background_dephasing_and_magnitude(bg_pair):
    p, plain = bg_pair
    near, _ = _near_far(p)
    # intra-voxel dephasing near the cavities raises the fitted R2* well above the tissue's own
    assert np.median(p.r2star[near]) > 2.0 * np.median(plain.r2star[near])
    lab = p.labels
    med = {n: np.median(p.magnitude[lab == l]) for l, n in LABEL_NAMES.items() if (lab == l).any()}
    assert med["scalp"] > 3 * med["skull"] and med["scalp"] > 0.3 * med["white_matter"]
    air = p.cavity_mask & (lab == 0)
    assert air.any() and np.median(p.magnitude[air]) < 0.1 * med["white_matter"]
    assert p.noise_sigma == pytest.approx(plain.noise_sigma, rel=0.1)  # corners are still air


def test_background_deterministic_and_bad_inputs():
    kw = dict(BG, shape=(27, 32, 27), voxel_size=(6.0, 6.0, 6.0), background=True)
    a, b = make_phantom(**kw), make_phantom(**kw)
    for name in ("echoes", "field", "true_total_field", "true_local_field", "cavity_mask", "labels"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.info() == b.info()
    c = make_phantom(**dict(kw, seed=3))
    assert c.cavities != a.cavities and not np.array_equal(c.true_total_field, a.true_total_field)
    with pytest.raises(ValueError, match="honest"):
        make_phantom(shape=(27, 32, 27), voxel_size=(6.0, 6.0, 6.0), background=True)
    with pytest.raises(ValueError, match="shim_order"):
        make_phantom(**dict(kw, shim_order=3))
    with pytest.raises(ValueError, match="keep_echoes"):
        save_raw_bids(dataclasses.replace(a, echoes=None), "unused")


def test_raw_bids_roundtrip_through_load_echoes(bg_pair, tmp_path):
    from napari_qsm.core.field.load import load_echoes

    p, _ = bg_pair
    paths = save_raw_bids(p, tmp_path)
    e = load_echoes(tmp_path / "sub-phantom")
    ref = p.to_echoes()
    assert e.te == pytest.approx(ref.te) and e.b0_tesla == pytest.approx(3.0) and e.vendor["phase_units"] == "rad"
    np.testing.assert_allclose(e.magnitude, ref.magnitude, rtol=1e-6)
    dphi = np.angle(np.exp(1j * (e.phase - ref.phase)))
    assert np.abs(dphi).max() < 1e-5
    np.testing.assert_allclose(e.affine, p.affine, atol=1e-6)
    assert tuple(e.voxel_size) == pytest.approx(p.voxel_size)
    np.testing.assert_allclose(e.b0_direction, p.b0_direction, atol=1e-6)
    import nibabel as nib
    loc = np.asarray(nib.load(str(paths["truth_local_field"])).dataobj)
    np.testing.assert_array_equal(loc, p.true_local_field)
    info = json.loads(paths["truth_json"].read_text())
    assert info["background"] and info["cavities"] == p.cavities
