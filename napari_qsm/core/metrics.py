"""Image-quality metrics for susceptibility maps, as the QSM challenges define them.

Every metric compares a reconstruction ``x`` with a reference ``ref`` (both χ in ppm, 3-D) inside a
boolean ``mask``, except :func:`field_residual`, which needs no reference: it checks how well χ
explains the measured field. Sources of the definitions:

* 2016 QSM reconstruction challenge (Langkammer et al., MRM 2018): RMSE(%), HFEN, SSIM.
* QSM challenge 2.0 (Bilgic et al., MRM 2021) and the QSM-CI scorer: demeaned and detrended NRMSE,
  HFEN over the whole volume with norms in the mask, XSIM with uniform windows, correlation.
* XSIM (Milovic et al., ISMRM 2022 / MRM 2024): SSIM in native ppm, L = 1, K = (0.01, 0.001).

Choices made here (each one is repeated in the function that makes it):

* Only voxels inside the mask ever influence a score. Before any filtering (HFEN, SSIM, XSIM) both
  images are set to 0 outside the mask, as the challenge data were; NaN/Inf outside the mask are
  therefore harmless, while NaN/Inf inside it raise ``ValueError`` naming the input.
* Filtered metrics use scipy.ndimage with ``mode="reflect"`` (scikit-image's choice); the boundary
  mode only matters where the mask touches the edge of the array. The filters run on the bounding
  box of the mask plus the filter radius, which gives exactly the whole-volume result.
* Arithmetic is float64 throughout; results are python floats.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim", "correlation",
    "field_residual", "compute_metrics", "METRIC_INFO", "REFERENCE_METRICS",
]

# name -> (label, unit, higher_is_better, one-line definition)
METRIC_INFO: dict[str, tuple[str, str, bool, str]] = {
    "psnr": ("PSNR", "dB", True,
             "20·log10(L/RMSE) in the mask, L = max(ref) − min(ref) in the mask"),
    "nrmse": ("NRMSE", "%", False,
              "100·‖x − ref‖/‖ref‖ in the mask (2016 challenge RMSE)"),
    "nrmse_demeaned": ("NRMSE (demeaned)", "%", False,
                       "100·‖(x − x̄) − (ref − r̄)‖/‖ref − r̄‖, means over the mask "
                       "(QSM challenge 2.0)"),
    "nrmse_detrended": ("NRMSE (detrended)", "%", False,
                        "demeaned NRMSE of (x − b)/a after the least-squares fit x ≈ a·ref + b "
                        "(QSM challenge 2.0)"),
    "hfen": ("HFEN", "%", False,
             "100·‖LoG(x) − LoG(ref)‖/‖LoG(ref)‖ in the mask, LoG σ 1.5 voxels, 15³ support"),
    "ssim": ("SSIM", "", True,
             "2016 challenge SSIM: images jointly scaled to [0, 255], Gaussian σ 1.5, K (0.01, 0.03)"),
    "xsim": ("XSIM", "", True,
             "SSIM in native ppm, L = 1 ppm, K (0.01, 0.001), uniform 5³ window (QSM-CI scorer)"),
    "correlation": ("Correlation", "", True, "Pearson correlation of x and ref in the mask"),
    "field_residual": ("Field residual", "%", False,
                       "100·‖D∗χ − field‖/‖field‖ in the mask, both demeaned in the mask "
                       "(no reference needed)"),
}

# Metrics that need a reference, in the order compute_metrics returns them.
REFERENCE_METRICS = ("psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim",
                     "correlation")

HFEN_SIGMA = 1.5
HFEN_TRUNCATE = 7.0 / 1.5       # scipy radius int(4.67·1.5 + 0.5) = 7 → 15³ LoG, as the 2016 challenge
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5             # radius 5 → 11³ Gaussian window (Wang et al. 2004 / scikit-image)
SSIM_K = (0.01, 0.03)
SSIM_L = 255.0
XSIM_K = (0.01, 0.001)
XSIM_L = 1.0                    # ppm
XSIM_TRUNCATE = 2.0             # radius 3 → 7³ Gaussian window (Milovic's compute_xsim, sw = 3)
XSIM_UNIFORM_SIZE = 5           # QSM-CI scorer


# ----------------------------------------------------------------------------------------------
# validation and shared preparation

def _as_volume(a, name: str) -> np.ndarray:
    if a is None:
        raise ValueError(f"{name}: expected a 3-D array, got None")
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected a 3-D array, got shape {arr.shape}")
    if np.iscomplexobj(arr) or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    return arr


def _same_shape(arr: np.ndarray, name: str, shape, against: str) -> None:
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: shape {arr.shape} does not match {against} shape {tuple(shape)}")


def _as_mask(mask, shape, against: str = "x") -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.ndim != 3:
        raise ValueError(f"mask: expected a 3-D array, got shape {m.shape}")
    _same_shape(m, "mask", shape, against)
    if m.dtype != bool:
        if np.iscomplexobj(m) or not np.issubdtype(m.dtype, np.number):
            raise ValueError(f"mask: expected a boolean (or 0/1) array, got dtype {m.dtype}")
        if not np.all(np.isfinite(m)):
            raise ValueError("mask: contains NaN/Inf; expected a boolean (or 0/1) array")
        m = m != 0
    if not m.any():
        raise ValueError("mask: is empty (no voxel selected); metrics need at least one voxel")
    return m


def _masked_values(arr: np.ndarray, m: np.ndarray, name: str) -> np.ndarray:
    v = arr[m].astype(np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} NaN/Inf value(s) inside the mask")
    return v


def _bbox(m: np.ndarray, margin: int) -> tuple[slice, ...]:
    out = []
    for ax in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != ax)
        idx = np.flatnonzero(np.any(m, axis=other))
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, m.shape[ax])
        out.append(slice(lo, hi))
    return tuple(out)


def _parallel(funcs: Sequence[Callable[[], np.ndarray]]) -> list:
    """Run independent ndimage filters on up to two threads (scipy releases the GIL in them)."""
    workers = min(2, os.cpu_count() or 1, len(funcs))
    if workers <= 1:
        return [f() for f in funcs]
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(lambda f: f(), funcs))


class _Pair:
    """A validated (x, ref, mask) triple: float64 values in the mask and cropped, masked volumes."""

    def __init__(self, x, ref, mask, x_name: str = "x", ref_name: str = "ref"):
        x = _as_volume(x, x_name)
        ref = _as_volume(ref, ref_name)
        _same_shape(ref, ref_name, x.shape, x_name)
        self.m = _as_mask(mask, x.shape, x_name)
        self.x_name, self.ref_name = x_name, ref_name
        self.xv = _masked_values(x, self.m, x_name)
        self.rv = _masked_values(ref, self.m, ref_name)
        if not np.any(self.rv):
            raise ValueError(f"{ref_name}: is zero everywhere inside the mask (zero reference energy)")
        self._crops: dict[int, tuple] = {}
        self._stats = None

    # means and centred values, computed once
    def centred(self):
        if self._stats is None:
            dx = self.xv - self.xv.mean()
            dr = self.rv - self.rv.mean()
            self._stats = (dx, dr, float(np.dot(dr, dr)))
        return self._stats

    def need_spread(self, what: str) -> None:
        if self.centred()[2] == 0.0:
            raise ValueError(f"{self.ref_name}: is constant inside the mask, so {what} is undefined "
                             "(zero reference energy after removing the mean)")

    def volumes(self, radius: int):
        """(x, ref, mask) cropped to the mask's bounding box + ``radius``; x, ref float64, 0 outside the mask."""
        for r, v in self._crops.items():
            if r >= radius:
                return v
        box = _bbox(self.m, radius)
        mc = self.m[box]
        xc = np.zeros(mc.shape, np.float64)
        rc = np.zeros(mc.shape, np.float64)
        xc[mc] = self.xv
        rc[mc] = self.rv
        self._crops = {radius: (xc, rc, mc)}  # keep one crop only (memory)
        return self._crops[radius]


def _radius(sigma: float, truncate: float) -> int:
    return int(float(truncate) * float(sigma) + 0.5)  # scipy.ndimage's Gaussian radius


def _ratio(num: float, den: float) -> float:
    return float(100.0 * num / den)


# ----------------------------------------------------------------------------------------------
# metrics against a reference

def psnr(x, ref, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: 20·log10(L / RMSE), everything inside the mask.

    RMSE = sqrt(mean((x − ref)²)) over the mask voxels and the peak L = max(ref) − min(ref) over the
    mask voxels, i.e. the reference's dynamic range (scikit-image's ``data_range``), which suits χ
    maps with negative values better than max|ref|. Identical images give ``inf``. Raises
    ``ValueError`` when the reference is constant in the mask (L = 0).
    """
    p = _Pair(x, ref, mask)
    return _psnr(p)


def _psnr(p: _Pair) -> float:
    p.need_spread("PSNR's peak (the reference's dynamic range)")
    peak = float(p.rv.max() - p.rv.min())
    mse = float(np.mean(np.square(p.xv - p.rv)))
    if mse == 0.0:
        return float("inf")
    return float(20.0 * np.log10(peak / np.sqrt(mse)))


def nrmse(x, ref, mask=None) -> float:
    """Normalised RMS error in %: 100·‖x − ref‖₂ / ‖ref‖₂ over the mask voxels.

    The "RMSE" of the 2016 QSM reconstruction challenge (Langkammer et al. 2018). Not offset-free:
    a constant shift of x counts as error (see :func:`nrmse_demeaned`).
    """
    return _nrmse(_Pair(x, ref, mask))


def _nrmse(p: _Pair) -> float:
    return _ratio(np.linalg.norm(p.xv - p.rv), np.linalg.norm(p.rv))


def nrmse_demeaned(x, ref, mask=None) -> float:
    """Demeaned NRMSE in %: 100·‖(x − x̄) − (ref − r̄)‖₂ / ‖ref − r̄‖₂, means over the mask.

    The NRMSE of QSM challenge 2.0 (Bilgic et al. 2021) and of the QSM-CI scorer; insensitive to the
    arbitrary constant offset of χ. x = ref + c gives 0; x = 2·ref gives 100 for any reference.
    """
    return _nrmse_demeaned(_Pair(x, ref, mask))


def _nrmse_demeaned(p: _Pair) -> float:
    p.need_spread("the demeaned NRMSE")
    dx, dr, rr = p.centred()
    return _ratio(np.linalg.norm(dx - dr), np.sqrt(rr))


def nrmse_detrended(x, ref, mask=None) -> float:
    """Detrended NRMSE in % (QSM challenge 2.0): NRMSE after undoing a linear trend.

    Fit x ≈ a·ref + b by least squares over the mask voxels (a = cov(x, ref)/var(ref),
    b = x̄ − a·r̄), then return the demeaned NRMSE of (x − b)/a against ref:
    100·‖(x − b)/a − ref‖ / ‖ref − r̄‖ (the mean of (x − b)/a equals r̄). It ignores global scaling
    (e.g. TKD's underestimation) and offsets, and equals 100·sqrt(1 − ρ²)/|ρ| with ρ the Pearson
    correlation. A negative slope is undone like a positive one. When x does not vary with ref
    at all (a = 0, e.g. a constant x) the result is ``inf``.
    """
    return _nrmse_detrended(_Pair(x, ref, mask))


def _nrmse_detrended(p: _Pair) -> float:
    p.need_spread("the detrended NRMSE")
    dx, dr, rr = p.centred()
    a = float(np.dot(dx, dr)) / rr
    if a == 0.0:
        return float("inf")
    b = float(p.xv.mean()) - a * float(p.rv.mean())
    y = (p.xv - b) / a
    return _ratio(np.linalg.norm((y - y.mean()) - dr), np.sqrt(rr))


def hfen(x, ref, mask=None, *, sigma: float = HFEN_SIGMA, truncate: float = HFEN_TRUNCATE) -> float:
    """High-frequency error norm in %: 100·‖LoG(x) − LoG(ref)‖₂ / ‖LoG(ref)‖₂, norms in the mask.

    LoG = ``scipy.ndimage.gaussian_laplace`` with σ = 1.5 voxels (2016 challenge and QSM-CI). Default
    ``truncate`` = 7/1.5 ≈ 4.67 gives a radius of 7 voxels, i.e. the 15³ support of the 2016
    challenge; the QSM-CI scorer uses ``truncate=5`` (17³). The filter runs over the whole volume
    (boundary mode "reflect") on images first set to 0 outside the mask (as the challenge data
    were), and the norms are taken over the mask voxels. scipy's kernel is (numerically) zero-sum
    like MATLAB's LoG; its overall scale cancels in the ratio. HFEN is linear in the error:
    x = 2·ref → 100, x = −ref → 200.
    """
    return _hfen(_Pair(x, ref, mask), sigma, truncate)


def _hfen(p: _Pair, sigma: float, truncate: float) -> float:
    xc, rc, mc = p.volumes(_radius(sigma, truncate))
    diff = xc - rc  # LoG is linear: LoG(x) − LoG(ref) = LoG(x − ref)
    log_d, log_r = _parallel([
        lambda: ndimage.gaussian_laplace(diff, sigma, mode="reflect", truncate=truncate),
        lambda: ndimage.gaussian_laplace(rc, sigma, mode="reflect", truncate=truncate),
    ])
    den = np.linalg.norm(log_r[mc])
    if den == 0.0:
        raise ValueError(f"{p.ref_name}: its Laplacian-of-Gaussian is zero inside the mask, so HFEN is undefined")
    return _ratio(np.linalg.norm(log_d[mc]), den)


def _ssim_mean(a: np.ndarray, b: np.ndarray, m: np.ndarray, c1: float, c2: float, filt) -> float:
    """Mean over ``m`` of the SSIM map (2μaμb + C1)(2σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2)).

    Local statistics are ``filt``-weighted means (population (co)variances, no N/(N−1) factor).
    The map needs only μa² + μb², μaμb, σa² + σb² and σab, so it is built from four filtered
    volumes of s = a + b and d = a − b instead of five: with p = filt(s), q = filt(d),
    μa² + μb² = (p² + q²)/2, 2μaμb = (p² − q²)/2, and likewise for the second moments.
    """
    s = a + b
    d = a - b
    fs, fd, fss, fdd = _parallel([lambda: filt(s), lambda: filt(d), lambda: filt(s * s), lambda: filt(d * d)])
    del s, d
    p, q = fs[m], fd[m]
    pp, qq = p * p, q * q
    mu2 = 0.5 * (pp + qq)          # μa² + μb²
    mu_ab2 = 0.5 * (pp - qq)       # 2μaμb
    ss, dd = fss[m], fdd[m]
    var = 0.5 * (ss + dd) - mu2    # σa² + σb²
    cov2 = 0.5 * (ss - dd) - mu_ab2  # 2σab
    out = ((mu_ab2 + c1) * (cov2 + c2)) / ((mu2 + c1) * (var + c2))
    return float(np.mean(out))


def ssim(x, ref, mask=None, *, sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> float:
    """Structural similarity as in the 2016 QSM reconstruction challenge.

    1. Both images are set to 0 outside the mask.
    2. Both are shifted and scaled by the SAME affine map, built from the joint minimum and maximum of
       x and ref over the mask voxels: v ↦ 255·(v − min)/(max − min). Inside the mask both then lie
       in [0, 255]. A joint map (rather than one per image) keeps the relative scaling of the two
       images, so x = 2·ref is not scored as perfect, and it is symmetric in x and ref.
    3. SSIM map with a Gaussian window σ = 1.5 voxels (``truncate`` 3.5 → 11³, as Wang et al. 2004 and
       scikit-image), K = (0.01, 0.03), L = 255, i.e. C1 = (0.01·255)², C2 = (0.03·255)²; population
       (co)variances; boundary mode "reflect".
    4. The score is the mean of the map over the mask voxels.

    With an all-True mask this equals the mean of the full map of
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, full=True)`` on the scaled images.
    """
    return _ssim(_Pair(x, ref, mask), sigma, truncate)


def _ssim(p: _Pair, sigma: float, truncate: float) -> float:
    lo = min(float(p.xv.min()), float(p.rv.min()))
    hi = max(float(p.xv.max()), float(p.rv.max()))
    scale = SSIM_L / (hi - lo) if hi > lo else 1.0
    xc, rc, mc = p.volumes(_radius(sigma, truncate))
    a = (xc - lo) * scale
    b = (rc - lo) * scale
    c1, c2 = (SSIM_K[0] * SSIM_L) ** 2, (SSIM_K[1] * SSIM_L) ** 2

    def filt(v):
        return ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=truncate)

    return _ssim_mean(a, b, mc, c1, c2, filt)


def xsim(x, ref, mask=None, window: str = "uniform", *, sigma: float = SSIM_SIGMA,
         truncate: float = XSIM_TRUNCATE, size: int = XSIM_UNIFORM_SIZE) -> float:
    """XSIM: structural similarity for QSM (Milovic et al. 2022), in native ppm.

    No rescaling: the images (set to 0 outside the mask) are compared in ppm with L = 1 ppm,
    K1 = 0.01, K2 = 0.001, i.e. C1 = 1e-4 and C2 = 1e-6; population (co)variances; boundary mode
    "reflect"; the score is the mean of the SSIM map over the mask voxels.

    ``window``:
      * ``"uniform"`` (default): a ``size``³ box window, ``size`` = 5, as the QSM-CI scorer
        (``qsm_eval.py``) and QSM challenge 2.0 report it.
      * ``"gaussian"``: Milovic's original, a Gaussian σ = 1.5 voxels on a 7³ support
        (``truncate`` = 2, his ``sw = [3 3 3]``); label it "XSIM (Gaussian window)" when reported.
    """
    return _xsim(_Pair(x, ref, mask), window, sigma, truncate, size)


def _xsim(p: _Pair, window: str, sigma: float, truncate: float, size: int) -> float:
    c1, c2 = (XSIM_K[0] * XSIM_L) ** 2, (XSIM_K[1] * XSIM_L) ** 2
    if window == "gaussian":
        radius = _radius(sigma, truncate)

        def filt(v):
            return ndimage.gaussian_filter(v, sigma, mode="reflect", truncate=truncate)
    elif window == "uniform":
        size = int(size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"size: the uniform window needs an odd size ≥ 1, got {size}")
        radius = size // 2

        def filt(v):
            return ndimage.uniform_filter(v, size, mode="reflect")
    else:
        raise ValueError(f"window: expected 'gaussian' or 'uniform', got {window!r}")
    xc, rc, mc = p.volumes(radius)
    return _ssim_mean(xc, rc, mc, c1, c2, filt)


def correlation(x, ref, mask=None) -> float:
    """Pearson correlation coefficient of x and ref over the mask voxels.

    NaN when x is constant in the mask (the coefficient is undefined); ``ValueError`` when ref is.
    """
    return _correlation(_Pair(x, ref, mask))


def _correlation(p: _Pair) -> float:
    p.need_spread("the correlation")
    dx, dr, rr = p.centred()
    xx = float(np.dot(dx, dx))
    if xx == 0.0:
        return float("nan")
    return float(np.clip(np.dot(dx, dr) / np.sqrt(xx * rr), -1.0, 1.0))


# ----------------------------------------------------------------------------------------------
# reference-free

def field_residual(chi, field, mask=None, voxel_size=None, b0_direction=None, device="auto", *,
                   demean: bool = True) -> float:
    """Field-consistency residual in %: how much of the measured field χ fails to explain.

    100·‖D∗χ − f‖₂ / ‖f‖₂ over the mask voxels, with f the measured (local) field in ppm and D∗χ
    the project's forward model (:func:`napari_qsm.core.dipole.forward_field`, zero-padded 2x, D(0) = 0).
    χ is set to 0 outside the mask first: the local field is modelled as coming from the tissue in
    the mask, and values a method leaves outside it do not count.

    With ``demean=True`` (default) both D∗χ and f are demeaned over the mask before comparing. A
    measured local field carries an arbitrary constant (background-field removal and referencing
    leave it undetermined, and D(0) = 0 makes the model's own offset a convention), so an offset
    alone should not count as inconsistency. χ = 0 gives 100; χ whose forward field equals f in
    the mask gives ~0. Needs no reference χ.
    """
    from .dipole import check_voxel_size, forward_field, unit_vector

    chi = _as_volume(chi, "chi")
    field = _as_volume(field, "field")
    _same_shape(field, "field", chi.shape, "chi")
    m = _as_mask(mask, chi.shape, "chi")
    if voxel_size is None:
        raise ValueError("voxel_size: required for the field residual (3 sizes in mm)")
    if b0_direction is None:
        raise ValueError("b0_direction: required for the field residual (a 3-vector)")
    vs = check_voxel_size(voxel_size)
    b0 = unit_vector(b0_direction)
    chi_v = _masked_values(chi, m, "chi")
    f = _masked_values(field, m, "field")
    chi_m = np.zeros(chi.shape, np.float32)
    chi_m[m] = chi_v
    pred = forward_field(chi_m, vs, b0, device=device)[m].astype(np.float64)
    if demean:
        f = f - f.mean()
        pred -= pred.mean()
    den = np.linalg.norm(f)
    if den == 0.0:
        what = "constant" if demean else "zero"
        raise ValueError(f"field: is {what} inside the mask, so the field residual is undefined")
    return _ratio(np.linalg.norm(pred - f), den)


# ----------------------------------------------------------------------------------------------

def compute_metrics(x, ref=None, mask=None, field=None, voxel_size=None, b0_direction=None, *,
                    device="auto") -> dict[str, float]:
    """Every metric that the inputs allow, as ``{name: float}`` in a fixed order.

    With ``ref``: "psnr", "nrmse", "nrmse_demeaned", "nrmse_detrended", "hfen", "ssim", "xsim",
    "correlation" (defaults of the individual functions). With ``field``, ``voxel_size`` and
    ``b0_direction``: "field_residual" last. ``mask`` None means the whole volume. Raises
    ``ValueError`` for bad inputs, when ``field`` comes without its geometry, or when there is
    nothing to compute. Labels, units and directions are in :data:`METRIC_INFO`.
    """
    if ref is None and field is None:
        raise ValueError("compute_metrics: nothing to compute; give ref (a reference χ) and/or field "
                         "with voxel_size and b0_direction")
    if field is not None and (voxel_size is None or b0_direction is None):
        missing = " and ".join(n for n, v in (("voxel_size", voxel_size), ("b0_direction", b0_direction))
                               if v is None)
        raise ValueError(f"{missing}: required with field for the field residual")
    out: dict[str, float] = {}
    if ref is not None:
        p = _Pair(x, ref, mask)
        out["psnr"] = _psnr(p)
        out["nrmse"] = _nrmse(p)
        out["nrmse_demeaned"] = _nrmse_demeaned(p)
        out["nrmse_detrended"] = _nrmse_detrended(p)
        out["hfen"] = _hfen(p, HFEN_SIGMA, HFEN_TRUNCATE)
        out["ssim"] = _ssim(p, SSIM_SIGMA, SSIM_TRUNCATE)
        out["xsim"] = _xsim(p, "uniform", SSIM_SIGMA, XSIM_TRUNCATE, XSIM_UNIFORM_SIZE)
        out["correlation"] = _correlation(p)
        del p
    if field is not None:
        out["field_residual"] = field_residual(x, field, mask, voxel_size, b0_direction, device=device)
    return {k: float(v) for k, v in out.items()}
