"""Metrics: definitions against hand arithmetic, scikit-image and the physics of the forward model."""

import math

import numpy as np
import pytest
from scipy import ndimage

from napari_qsm.core import metrics as M
from napari_qsm.core.dipole import forward_field
from napari_qsm.core.metrics import (
    METRIC_INFO, compute_metrics, correlation, field_residual, hfen, nrmse, nrmse_demeaned,
    nrmse_detrended, psnr, ssim, xsim,
)

skm = pytest.importorskip("skimage.metrics")

SHAPE = (24, 26, 22)
ORDER = ["psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "correlation"]


def smooth(rng, shape=SHAPE, sigma=2.0, amp=0.1):
    v = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (amp * v / v.std()).astype(np.float32)


def ellipsoid(shape=SHAPE, frac=0.38):
    g = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (frac * n) for n in shape], indexing="ij")
    return sum(a * a for a in g) <= 1.0


@pytest.fixture
def data(rng):
    ref = smooth(rng)
    x = ref + smooth(rng, amp=0.03)
    return x, ref, ellipsoid()


# ---------------------------------------------------------------------------- definitions

def test_identical_inputs(data):
    _, ref, mask = data
    v = compute_metrics(ref, ref, mask)
    assert list(v) == ORDER
    assert all(type(val) is float for val in v.values())
    assert v["psnr"] == math.inf
    for k in ("nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen"):
        assert v[k] == pytest.approx(0.0, abs=1e-9), k
    for k in ("ssim", "xsim", "correlation"):
        assert v[k] == pytest.approx(1.0, abs=1e-12), k
    assert xsim(ref, ref, mask, window="uniform") == pytest.approx(1.0, abs=1e-12)


def test_scaled_input(data):
    _, ref, mask = data
    x = 2 * ref
    assert nrmse(x, ref, mask) == pytest.approx(100.0, rel=1e-9)
    # (2r − 2r̄) − (r − r̄) = r − r̄ for any reference, zero-mean or not
    assert nrmse_demeaned(x, ref, mask) == pytest.approx(100.0, rel=1e-9)
    assert nrmse_demeaned(x + 0.3, ref + 0.05, mask) == pytest.approx(100.0, rel=1e-6)  # float32 inputs
    assert nrmse_detrended(x, ref, mask) == pytest.approx(0.0, abs=1e-6)
    assert nrmse_detrended(-3 * ref + 0.2, ref, mask) == pytest.approx(0.0, abs=1e-4)  # float32 round-off
    assert correlation(x, ref, mask) == pytest.approx(1.0, abs=1e-12)
    assert correlation(-x, ref, mask) == pytest.approx(-1.0, abs=1e-12)
    assert hfen(x, ref, mask) == pytest.approx(100.0, rel=1e-9)
    assert ssim(x, ref, mask) < 0.999  # joint scaling keeps the factor 2 visible
    assert xsim(x, ref, mask) < 0.999


def test_offset_input(data):
    _, ref, mask = data
    x = ref + 0.05
    assert nrmse_demeaned(x, ref, mask) == pytest.approx(0.0, abs=1e-4)  # float32 round-off of x only
    assert nrmse_detrended(x, ref, mask) == pytest.approx(0.0, abs=1e-4)
    assert correlation(x, ref, mask) == pytest.approx(1.0, abs=1e-12)
    ref64 = ref[mask].astype(np.float64)
    expect = 100 * 0.05 * math.sqrt(mask.sum()) / np.linalg.norm(ref64)
    assert nrmse(x, ref, mask) == pytest.approx(expect, rel=1e-5)
    # over the whole volume the (numerically zero-sum) LoG ignores a constant
    full = np.ones(SHAPE, bool)
    assert hfen(x, ref, full) < 0.01
    # ...but inside a mask the offset becomes a step at the mask's edge, which HFEN does see
    assert hfen(x, ref, mask) > 1.0


def test_hand_computed_four_voxels():
    x = np.zeros((3, 3, 2), np.float32)
    r = np.zeros((3, 3, 2), np.float32)
    mask = np.zeros((3, 3, 2), bool)
    idx = [(0, 0, 0), (1, 1, 0), (2, 0, 1), (0, 2, 1)]
    xs, rs = [1.0, 2.0, 4.0, 5.0], [1.0, 3.0, 3.0, 5.0]
    for i, a, b in zip(idx, xs, rs):
        x[i], r[i], mask[i] = a, b, True
    x[2, 2, 0], r[2, 2, 0] = 100.0, -7.0    # outside the mask: must not matter
    x[1, 2, 1] = np.nan
    # plain arithmetic: d = x − r = (0, −1, 1, 0)
    assert nrmse(x, r, mask) == pytest.approx(100 * math.sqrt(2) / math.sqrt(1 + 9 + 9 + 25))
    # x̄ = 3, r̄ = 3: x − x̄ = (−2, −1, 1, 2), r − r̄ = (−2, 0, 0, 2)
    assert nrmse_demeaned(x, r, mask) == pytest.approx(100 * math.sqrt(2) / math.sqrt(8))
    # a = Σ dx·dr / Σ dr² = 8/8 = 1, b = 0: detrended = demeaned here
    assert nrmse_detrended(x, r, mask) == pytest.approx(50.0)
    assert correlation(x, r, mask) == pytest.approx(8 / math.sqrt(10 * 8))
    # RMSE = sqrt(2/4), L = 5 − 1
    assert psnr(x, r, mask) == pytest.approx(20 * math.log10(4 / math.sqrt(0.5)))


def test_detrended_is_a_function_of_correlation(data):
    x, ref, mask = data
    rho = correlation(x, ref, mask)
    assert nrmse_detrended(x, ref, mask) == pytest.approx(100 * math.sqrt(1 - rho ** 2) / abs(rho), rel=1e-9)
    # slope a = 0 (x constant): unbounded error, correlation undefined
    const = np.full(SHAPE, 0.2, np.float32)
    assert nrmse_detrended(const, ref, mask) == math.inf
    assert math.isnan(correlation(const, ref, mask))


def test_psnr_matches_skimage_on_masked_values(data):
    x, ref, mask = data
    xv, rv = x[mask].astype(np.float64), ref[mask].astype(np.float64)
    expect = skm.peak_signal_noise_ratio(rv, xv, data_range=rv.max() - rv.min())
    assert psnr(x, ref, mask) == pytest.approx(expect, rel=1e-9)


def test_hfen_sign_scale_and_definition(data, rng):
    x, ref, mask = data
    err = x - ref
    assert hfen(-ref, ref, mask) == pytest.approx(200.0, rel=1e-9)
    assert hfen(ref + 2 * err, ref, mask) == pytest.approx(2 * hfen(x, ref, mask), rel=1e-9)
    assert hfen(x, ref, mask) != pytest.approx(hfen(ref, x, mask), rel=1e-3)  # normalised by the reference
    # direct definition: LoG over the whole volume of the masked images, norms in the mask
    lx = ndimage.gaussian_laplace(np.where(mask, x, 0).astype(np.float64), 1.5, truncate=7 / 1.5)
    lr = ndimage.gaussian_laplace(np.where(mask, ref, 0).astype(np.float64), 1.5, truncate=7 / 1.5)
    expect = 100 * np.linalg.norm((lx - lr)[mask]) / np.linalg.norm(lr[mask])
    assert hfen(x, ref, mask) == pytest.approx(expect, rel=1e-9)
    # QSM-CI's truncate 5 is available and close
    assert hfen(x, ref, mask, truncate=5) == pytest.approx(expect, rel=0.02)
    # at equal NRMSE, fine-grained error (the LoG band, ~1 rad/voxel) weighs more than smooth error
    full = np.ones(SHAPE, bool)
    fine, coarse = smooth(rng, sigma=1.0, amp=0.02), smooth(rng, sigma=4.0, amp=0.02)
    assert nrmse(ref + fine, ref, full) == pytest.approx(nrmse(ref + coarse, ref, full), rel=0.1)
    assert hfen(ref + fine, ref, full) > 2 * hfen(ref + coarse, ref, full)


def _joint_scale(x, ref, mask):
    lo = min(x[mask].min(), ref[mask].min())
    hi = max(x[mask].max(), ref[mask].max())
    f = lambda v: (np.where(mask, v, 0).astype(np.float64) - lo) * 255.0 / (hi - lo)  # noqa: E731
    return f(x), f(ref)


def test_ssim_matches_skimage_full_mask(rng):
    ref = smooth(rng)
    x = ref + smooth(rng, sigma=1.0, amp=0.05)
    full = np.ones(SHAPE, bool)
    a, b = _joint_scale(x, ref, full)
    _, smap = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=255, full=True)
    assert ssim(x, ref, full) == pytest.approx(smap.mean(), abs=1e-6)
    assert ssim(x, ref) == pytest.approx(smap.mean(), abs=1e-6)   # mask None = whole volume


def test_ssim_matches_skimage_cropped_mean(rng):
    """skimage averages the map away from a 5-voxel border: the same as a mask of the interior."""
    mask = np.zeros(SHAPE, bool)
    mask[5:-5, 5:-5, 5:-5] = True
    ref = smooth(rng) * mask
    x = (ref + smooth(rng, sigma=1.0, amp=0.05)) * mask
    a, b = _joint_scale(x, ref, mask)
    mssim = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255)
    assert ssim(x, ref, mask) == pytest.approx(mssim, abs=1e-9)


def test_xsim_matches_skimage(data):
    x, ref, mask = data
    a = np.where(mask, x, 0).astype(np.float64)
    b = np.where(mask, ref, 0).astype(np.float64)
    common = dict(data_range=1.0, K1=0.01, K2=0.001, use_sample_covariance=False, full=True)
    _, gmap = skm.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, **common)
    _, umap = skm.structural_similarity(a, b, win_size=5, **common)
    # skimage's Gaussian is always truncated at 3.5σ (11³); Milovic's default window is 7³
    assert xsim(x, ref, mask, window="gaussian", truncate=3.5) == pytest.approx(gmap[mask].mean(), abs=1e-9)
    assert xsim(x, ref, mask, window="uniform") == pytest.approx(umap[mask].mean(), abs=1e-9)
    # the default is the QSM-CI scorer's uniform 5³ window (not Milovic's Gaussian), also in compute_metrics
    assert xsim(x, ref, mask) == pytest.approx(umap[mask].mean(), abs=1e-9)
    assert compute_metrics(x, ref, mask)["xsim"] == pytest.approx(umap[mask].mean(), abs=1e-9)
    assert xsim(x, ref, mask, window="gaussian") == pytest.approx(gmap[mask].mean(), abs=0.02)
    assert xsim(x, ref, mask, window="gaussian") != xsim(x, ref, mask, window="gaussian", truncate=3.5)


def test_xsim_constants_are_in_ppm(data):
    """XSIM is not scale-invariant (native ppm, fixed C1, C2): tiny χ differences are forgiven."""
    x, ref, mask = data
    assert xsim(x / 100, ref / 100, mask) > xsim(x, ref, mask) + 0.05
    # SSIM rescales jointly to [0, 255], so a common factor changes nothing
    assert ssim(x / 100, ref / 100, mask) == pytest.approx(ssim(x, ref, mask), abs=1e-9)


def test_degradation_lowers_similarity(data, rng):
    _, ref, mask = data
    small = ref + smooth(rng, sigma=1.0, amp=0.01)
    large = ref + smooth(rng, sigma=1.0, amp=0.05)
    a, b = compute_metrics(small, ref, mask), compute_metrics(large, ref, mask)
    for k in ("psnr", "ssim", "xsim", "correlation"):
        assert a[k] > b[k], k
    for k in ("nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen"):
        assert a[k] < b[k], k


def test_values_outside_the_mask_do_not_matter(data):
    x, ref, mask = data
    x2, ref2 = x.copy(), ref.copy()
    x2[~mask] = 7.0
    ref2[~mask] = np.nan
    before, after = compute_metrics(x, ref, mask), compute_metrics(x2, ref2, mask)
    for k in ORDER:
        assert after[k] == pytest.approx(before[k], rel=1e-12, abs=1e-12), k


def test_crop_equals_whole_volume(data):
    """Filtering on the mask's bounding box (+radius) gives the whole-volume result."""
    x, ref, mask = data
    a, b = np.where(mask, x, 0).astype(np.float64), np.where(mask, ref, 0).astype(np.float64)
    gauss = lambda v: ndimage.gaussian_filter(v, 1.5, truncate=2.0)  # noqa: E731
    box = lambda v: ndimage.uniform_filter(v, 5)  # noqa: E731
    assert xsim(x, ref, mask, window="gaussian") == pytest.approx(M._ssim_mean(a, b, mask, 1e-4, 1e-6, gauss), abs=1e-12)
    assert xsim(x, ref, mask) == pytest.approx(M._ssim_mean(a, b, mask, 1e-4, 1e-6, box), abs=1e-12)


def test_inputs_not_modified(data):
    x, ref, mask = data
    copies = [x.copy(), ref.copy(), mask.copy()]
    compute_metrics(x, ref, mask)
    for a, b in zip((x, ref, mask), copies):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------- field residual

@pytest.fixture
def field_case(rng):
    shape = (32, 32, 28)
    mask = ellipsoid(shape, 0.4)
    chi = smooth(rng, shape, amp=0.05) * mask
    vs, b0 = (1.0, 1.0, 1.5), (0.1, 0.2, 1.0)
    field = forward_field(chi, vs, b0, device="cpu") * mask
    return chi, field, mask, vs, b0


def test_field_residual_consistent_chi(field_case):
    chi, field, mask, vs, b0 = field_case
    r = field_residual(chi, field, mask, vs, b0, device="cpu")
    assert r < 1e-3   # float32 round-off only (well below 1 %)
    # an offset of the measured field does not count (both demeaned in the mask)
    assert field_residual(chi, field + 0.01 * mask, mask, vs, b0, device="cpu") < 1e-3
    assert field_residual(chi, field + 0.01 * mask, mask, vs, b0, device="cpu", demean=False) > 1.0


def test_field_residual_zero_chi_is_100(field_case):
    chi, field, mask, vs, b0 = field_case
    assert field_residual(np.zeros_like(chi), field, mask, vs, b0, device="cpu") == pytest.approx(100.0)
    assert field_residual(np.zeros_like(chi), field, mask, vs, b0, device="cpu",
                          demean=False) == pytest.approx(100.0)
    # a wrong B0 direction is inconsistent with the field
    assert field_residual(chi, field, mask, vs, (1.0, 0, 0), device="cpu") > 50


def test_compute_metrics_with_field(field_case, rng):
    chi, field, mask, vs, b0 = field_case
    x = chi + smooth(rng, chi.shape, amp=0.01) * mask
    v = compute_metrics(x, chi, mask, field=field, voxel_size=vs, b0_direction=b0, device="cpu")
    assert list(v) == ORDER + ["field_residual"]
    assert 0 < v["field_residual"] < 100
    only = compute_metrics(x, mask=mask, field=field, voxel_size=vs, b0_direction=b0, device="cpu")
    assert list(only) == ["field_residual"] and only["field_residual"] == v["field_residual"]
    assert list(compute_metrics(x, chi, mask, voxel_size=vs)) == ORDER


# ---------------------------------------------------------------------------- bad input

def test_bad_inputs_raise(data, field_case):
    x, ref, mask = data
    with pytest.raises(ValueError, match=r"ref: shape \(3, 3, 3\) does not match x shape"):
        nrmse(x, np.zeros((3, 3, 3)), mask)
    with pytest.raises(ValueError, match=r"mask: shape .* does not match x shape"):
        ssim(x, ref, mask[:-1])
    with pytest.raises(ValueError, match="mask: is empty"):
        hfen(x, ref, np.zeros(SHAPE, bool))
    bad = x.copy()
    bad[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan
    with pytest.raises(ValueError, match="x: 1 NaN/Inf value"):
        compute_metrics(bad, ref, mask)
    with pytest.raises(ValueError, match="ref: 1 NaN/Inf value"):
        psnr(ref, bad, mask)
    with pytest.raises(ValueError, match="ref: is zero everywhere inside the mask"):
        nrmse(x, np.zeros(SHAPE, np.float32), mask)
    with pytest.raises(ValueError, match="ref: is constant inside the mask"):
        nrmse_demeaned(x, np.full(SHAPE, 0.1, np.float32), mask)
    with pytest.raises(ValueError, match="ref: is constant"):
        psnr(x, np.full(SHAPE, 0.1, np.float32), mask)
    with pytest.raises(ValueError, match="x: expected a 3-D array"):
        nrmse(x[0], ref[0], mask[0])
    with pytest.raises(ValueError, match="window"):
        xsim(x, ref, mask, window="box")
    with pytest.raises(ValueError, match="mask: contains NaN"):
        nrmse(x, ref, np.full(SHAPE, np.nan))
    chi, field, fmask, vs, b0 = field_case
    with pytest.raises(ValueError, match=r"field: shape .* does not match chi shape"):
        field_residual(chi, field[:, :, :-1], fmask, vs, b0)
    with pytest.raises(ValueError, match="field: is constant"):
        field_residual(chi, np.ones_like(field), fmask, vs, b0, device="cpu")
    with pytest.raises(ValueError, match="voxel_size"):
        compute_metrics(chi, field=field, mask=fmask, b0_direction=b0)
    with pytest.raises(ValueError, match="nothing to compute"):
        compute_metrics(chi, mask=fmask)
    with pytest.raises(ValueError, match="b0_direction"):
        field_residual(chi, field, fmask, vs, (0, 0, 0))


def test_numeric_mask_accepted(data):
    x, ref, mask = data
    assert nrmse(x, ref, mask.astype(np.uint8)) == nrmse(x, ref, mask)


def test_metric_info():
    assert set(METRIC_INFO) == set(ORDER) | {"field_residual"}
    for name, (label, unit, higher, line) in METRIC_INFO.items():
        assert isinstance(label, str) and label and isinstance(unit, str)
        assert isinstance(higher, bool) and isinstance(line, str) and line
    assert METRIC_INFO["ssim"][2] and not METRIC_INFO["nrmse"][2]
    assert METRIC_INFO["nrmse"][1] == "%" and METRIC_INFO["psnr"][1] == "dB"
