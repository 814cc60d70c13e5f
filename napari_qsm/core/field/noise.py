"""Noise σ per real/imaginary channel of the echoes, without assuming air in the field of view.

:func:`estimate_noise_sigma` picks, in this order:

1. **FOV corners, only when a test shows they are air.** Each of the eight corner blocks is
   tested (:func:`corner_air_test`): in air the magnitude of a sum-of-squares combination of N
   receive channels is σ·χ_{2N} (Rayleigh for N = 1), so |S|² has mean 2Nσ² and variance 4Nσ⁴,
   hence N = mean²/var and σ² = var/(2·mean) (no N needed; coil-combined magnitudes are
   handled, the old mean(|S|²)/2 is √N too high for them). A block counts as air when (a) its RMS is
   below ``level_max`` (0.3) of the bright-tissue level (99th percentile of echo 1), (b) its mean
   |S|² does not decay over the echoes (last/first within [0.8, 1.25]; tissue decays with R2*),
   (c) echo 1 and the last echo are uncorrelated over the block (|ρ| < 0.2; tissue texture and
   intensity bias are shared by the echoes, noise is not; both bounds widen to three standard
   errors on small blocks) and (d) the effective channel count N
   lies in [0.5, 64]. At least two blocks must pass; σ is their median. When the fit residual
   (below) is available, the corner σ must also agree with it within 25 %: uniform tissue at
   moderate SNR can mimic a many-channel χ distribution, but then its moment estimate is ≈ √2
   times the residual's.
2. **The echo-fit residual** (default when the corners are not air): the complex residual of the
   multi-echo fit with a free magnitude per echo is its component perpendicular to the fitted
   phase, |S_n|·sin(φ_n − φ̂_n); its energy q = Σ_n |S_n|²·r_n² is σ²·χ²_k per voxel with k the
   fit's degrees of freedom (E − 2 for a free intercept). Robust to edges, flow and veins: σ² =
   median(q)/median(χ²_k) over the object (smallest echo magnitude above Otsu's threshold: air,
   whose sum-of-squares floor √(2N)·σ can exceed 5σ, is left out) where that magnitude exceeds 5σ
   (the phase noise is Gaussian there). Needs E ≥ 3 echoes.
3. **A magnitude high-pass** (two echoes, no air): the median absolute second difference of the
   first echo along each axis over the brighter half, σ ≈ median|Δ²|/(0.6745·√6) (noise only;
   texture and edges bias it up; voxel-correlated noise from k-space zero-filling biases it down).
4. Nothing found: σ = 1 (N_std is then relative), reported.

Every estimate is returned with its source and the test values (:class:`NoiseEstimate`).

References
----------
Constantinides, Atalar, McVeigh, MRM 38:852 (1997): signal-to-noise of sum-of-squares magnitudes (χ with
2N degrees of freedom in the background); Aja-Fernández, Tristán-Vega, Alberola-López, MRI 27:1397
(2009): noise estimation in multiple-coil magnitude images (non-central χ). The residual estimator is the
ordinary least-squares one (residual energy over its degrees of freedom), made robust with the median.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import stats

from .mask import otsu_threshold

__all__ = ["NoiseEstimate", "estimate_noise_sigma", "corner_air_test", "residual_sigma", "highpass_sigma"]

_LEVEL_MAX = 0.3        # corner RMS / bright tissue level
_DECAY = (0.8, 1.25)    # mean |S|² last echo / first echo in air
_CORR_MAX = 0.2         # |ρ| between echo 1 and the last echo in air
_N_RANGE = (0.5, 64.0)  # effective receive channels
_AGREE = 0.25           # corner σ vs residual σ
_SNR_MIN = 5.0          # residual: smallest echo magnitude / σ


@dataclass
class NoiseEstimate:
    """σ per real/imaginary channel (magnitude units), where it came from and the tests behind it."""

    sigma: float
    source: str
    details: dict = field(default_factory=dict)


def _corner_blocks(shape):
    b = [max(2, k // 8) for k in shape]
    for corner in np.ndindex(2, 2, 2):
        yield corner, tuple(slice(0, bb) if c == 0 else slice(k - bb, k) for c, bb, k in zip(corner, b, shape))


def corner_air_test(magnitude: np.ndarray) -> list[dict]:
    """Test each corner block of a 4-D magnitude (i, j, k, echo) for air (module docstring).

    Parameters
    ----------
    magnitude : (i, j, k, echo) array, or 3-D (one echo: the decay and correlation tests are skipped).

    Returns
    -------
    list of dict, one per block: ``corner``, ``sigma`` (moment estimate), ``n_channels``, ``rms_rel``,
    ``decay``, ``corr``, ``air`` (bool) and ``why`` (the first failed test, or "air").
    """
    mag = np.asarray(magnitude, np.float32)
    if mag.ndim == 3:
        mag = mag[..., None]
    level = float(np.percentile(mag[..., 0], 99))
    out = []
    for corner, sl in _corner_blocks(mag.shape[:3]):
        blk = mag[sl].astype(np.float64)
        x = blk * blk
        m, v = float(x.mean()), float(x.var())
        row = {"corner": list(corner), "sigma": float(np.sqrt(v / (2 * m))) if m > 0 else 0.0,
               "n_channels": float(m * m / v) if v > 0 else float("inf"),
               "rms_rel": float(np.sqrt(m) / level) if level > 0 else float("inf"), "decay": 1.0, "corr": 0.0}
        E = blk.shape[3]
        if E > 1 and m > 0:
            first, last = x[..., 0].mean(), x[..., -1].mean()
            row["decay"] = float(last / first) if first > 0 else float("inf")
            a, b = blk[..., 0].ravel(), blk[..., -1].ravel()
            sa, sb = a.std(), b.std()
            row["corr"] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb)) if sa > 0 and sb > 0 else 1.0
        nvox = int(np.prod(blk.shape[:3]))
        dec_tol = max(np.log(_DECAY[1]), 3.0 * np.sqrt(2.0 / nvox))   # 3 standard errors of the ratio in air
        corr_tol = max(_CORR_MAX, 3.0 / np.sqrt(nvox))
        if not m > 0 or not v > 0:
            why = "empty (zero-filled or constant)"
        elif row["rms_rel"] >= _LEVEL_MAX:
            why = f"bright: RMS {row['rms_rel']:.2f} of the tissue level (air < {_LEVEL_MAX})"
        elif not abs(np.log(max(row["decay"], 1e-12))) <= dec_tol:
            why = f"decays over the echoes: mean |S|² last/first = {row['decay']:.2f} (air: 1)"
        elif abs(row["corr"]) >= corr_tol:
            why = f"echoes correlated: ρ = {row['corr']:.2f} (air: 0)"
        elif not _N_RANGE[0] <= row["n_channels"] <= _N_RANGE[1]:
            why = f"not χ-distributed noise: N = {row['n_channels']:.3g} channels"
        else:
            why = "air"
        row["air"] = why == "air"
        row["why"] = why
        out.append(row)
    return out


def residual_sigma(resid_energy: np.ndarray, min_magnitude: np.ndarray, dof: int) -> Optional[float]:
    """σ from the echo fit's residual energy q = Σ_n |S_n|²·r_n² (≈ σ²·χ²_dof per voxel).

    Parameters
    ----------
    resid_energy : 3-D, the per-voxel weighted squared phase residual of the fit.
    min_magnitude : 3-D, the smallest echo magnitude of each voxel (selects the object, above Otsu's
        threshold, and in it the voxels where the phase noise is Gaussian: > 5σ).
    dof : residual degrees of freedom per voxel (E − 2 for a free intercept).

    Returns
    -------
    float or None (dof < 1 or no usable voxel). σ² = median(q) / median(χ²_dof).
    """
    if dof < 1:
        return None
    q = np.asarray(resid_energy, np.float64).ravel()
    mm = np.asarray(min_magnitude, np.float64).ravel()
    ok = np.isfinite(q) & np.isfinite(mm) & (mm > 0)
    if not np.any(ok):
        return None
    med_chi2 = float(stats.chi2.ppf(0.5, dof))
    # the object: above Otsu's threshold of the smallest echo magnitude (leaves out air, whose sum-of-squares
    # floor √(2N)·σ of N channels can exceed 5σ); then only voxels with magnitude > 5σ, never more
    obj = ok & (mm > otsu_threshold(mm[ok]))
    if np.count_nonzero(obj) < 10:
        obj = ok
    sel, sigma = obj, None
    for _ in range(3):
        if np.count_nonzero(sel) < 10:
            break
        sigma = float(np.sqrt(np.median(q[sel]) / med_chi2))
        if not sigma > 0:
            return None
        nxt = obj & (mm > _SNR_MIN * sigma)
        if np.count_nonzero(nxt) < 10 or np.array_equal(nxt, sel):
            break
        sel = nxt
    return sigma


def highpass_sigma(magnitude: np.ndarray) -> Optional[float]:
    """σ from the first echo's second differences (median over the brighter half and the three axes)."""
    m = np.asarray(magnitude, np.float32)
    m = m[..., 0] if m.ndim == 4 else m
    if min(m.shape) < 3:
        return None
    bright = m > np.median(m)
    vals = []
    for ax in range(3):
        d2 = np.diff(m, n=2, axis=ax)
        core = [slice(None)] * 3
        core[ax] = slice(1, -1)
        sel = bright[tuple(core)]
        if np.any(sel):
            vals.append(np.abs(d2[sel]))
    if not vals:
        return None
    s = float(np.median(np.concatenate(vals)) / (0.6745 * np.sqrt(6.0)))
    return s if s > 0 else None


def _json_number(v):
    """Rounded floats, None for non-finite ones (strict JSON has no Infinity/NaN)."""
    if isinstance(v, float):
        return round(v, 4) if np.isfinite(v) else None
    return v


def estimate_noise_sigma(magnitude: np.ndarray, resid_energy=None, dof: int = 0) -> NoiseEstimate:
    """σ per channel of multi-echo magnitudes: air corners (tested), else the fit residual, else a high-pass.

    Parameters
    ----------
    magnitude : (i, j, k, echo) magnitudes.
    resid_energy : optional 3-D residual energy Σ|S_n|²·r_n² of the echo fit (see :func:`residual_sigma`).
    dof : its degrees of freedom per voxel.

    Returns
    -------
    NoiseEstimate (sigma, source, details: the corner tests, the residual σ, the channel count).
    """
    mag = np.asarray(magnitude, np.float32)
    if mag.ndim == 3:
        mag = mag[..., None]
    blocks = corner_air_test(mag)
    air = [b for b in blocks if b["air"]]
    res = None
    if resid_energy is not None:
        res = residual_sigma(resid_energy, mag.min(axis=3), dof)
    details = {"corners": [{k: _json_number(v) for k, v in b.items()} for b in blocks],
               "residual_sigma": res, "residual_dof": int(dof)}
    if len(air) >= 2:
        s_air = float(np.median([b["sigma"] for b in air]))
        n_ch = float(np.median([b["n_channels"] for b in air]))
        details.update(corner_sigma=s_air, n_channels=round(n_ch, 2), air_corners=len(air))
        if res is None or abs(s_air / res - 1.0) <= _AGREE:
            agree = "" if res is None else f", agrees with the fit residual's {res:.4g}"
            return NoiseEstimate(s_air, f"FOV corners: {len(air)} of 8 tested as air (χ noise, N ≈ {n_ch:.1f} "
                                        f"channels{agree})", details)
        details["corner_rejected"] = f"corner σ {s_air:.4g} disagrees with the fit residual's {res:.4g}"
    if res is not None and res > 0:
        why = details.get("corner_rejected") or (f"{len(air)} of 8 corners tested as air" if air else
                                                 "no corner is air: " + blocks[0]["why"])
        return NoiseEstimate(res, f"echo-fit residual (median, {dof} dof per voxel; {why})", details)
    hp = highpass_sigma(mag)
    if hp is not None:
        return NoiseEstimate(hp, "magnitude high-pass (median |second difference| of echo 1; no air, too few echoes "
                                 "for a residual)", details)
    return NoiseEstimate(1.0, "none found (no air, too few echoes for a residual): σ = 1, N_std is relative", details)
