"""Multi-echo SWI in the manner of CLEAR-SWI, its minimum-intensity projection, and NumART2*.

SWI (Eckstein et al. 2021, CLEAR-SWI; Haacke et al. 2004): the echoes' magnitudes are combined, the
unwrapped multi-echo field is high-pass filtered (the field minus its Gaussian-smoothed version,
normalised inside the mask so the edge does not bleed in), expressed as phase at a reference echo
time, and turned into a phase mask that darkens paramagnetic sources (veins): ``(1 − φ/π)`` for
phase in the paramagnetic direction, clipped to [0, 1], raised to a power (4 as published); SWI is
the combined magnitude times that mask. The minIP is a sliding minimum over a slab along the
third (head-foot in the canonical frame) axis.

NumART2* (Hagberg et al. 2002): T2* = ∫S dTE / (S(TE₁) − S(TEₙ)), the integral by the trapezoid
rule over the echoes, defined where the signal decays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from .constants import GAMMA_BAR_HZ_PER_T
from .field.steps import Step
from .params import param, params_to_dict
from .scan import ScanError

__all__ = ["STEPS", "SWIParams", "SWIResult", "combine_magnitude", "highpass_field", "phase_mask", "swi",
           "min_ip", "numart2star"]


@dataclass
class SWIParams:
    """Parameters of the multi-echo SWI."""

    highpass_mm: float = param(4.0, "σ of the Gaussian removed from the field (high-pass), mm", min=0.5, max=50.0)
    power: int = param(4, "power of the phase mask (4 as in Haacke 2004 and CLEAR-SWI)", min=1, max=10)
    magnitude: str = param("rss", "how echoes' magnitudes are combined: rss (root sum of squares) or "
                           "te (each echo weighted by its TE: more T2* contrast)", choices=("rss", "te"))
    reference_te: float = param(0.0, "echo time (s) at which the phase is shown; 0 = the mean TE",
                                min=0.0, max=1.0)
    minip_mm: float = param(8.0, "thickness of the minimum-intensity projection slab, mm", min=0.0,
                            max=100.0)


@dataclass
class SWIResult:
    swi: np.ndarray           # combined magnitude × phase mask
    min_ip: np.ndarray        # sliding minIP of swi
    magnitude: np.ndarray     # combined magnitude
    phase_hp: np.ndarray      # high-passed phase at the reference TE (rad)
    mask_weight: np.ndarray   # the phase mask in [0, 1]
    t2star_ms: np.ndarray     # NumART2* (ms), 0 where undefined
    r2star: np.ndarray        # 1/T2* (1/s), 0 where undefined
    provenance: dict


def combine_magnitude(magnitude: np.ndarray, te, how: str = "rss") -> np.ndarray:
    """Combine echo magnitudes (…, echo): root sum of squares, or TE-weighted root sum of squares."""
    m = np.asarray(magnitude, np.float32)
    if how == "rss":
        return np.sqrt(np.sum(m * m, axis=-1)).astype(np.float32)
    if how == "te":
        w = np.asarray(te, np.float32) / np.float32(np.max(te))
        return np.sqrt(np.sum((m * w) ** 2, axis=-1) / np.sum(w * w)).astype(np.float32)
    raise ValueError(f"magnitude: expected 'rss' or 'te', got {how!r}")


def highpass_field(field: np.ndarray, mask: np.ndarray, voxel_size, sigma_mm: float) -> np.ndarray:
    """Field minus its Gaussian low-pass (σ in mm), the low-pass normalised by the smoothed mask."""
    m = np.asarray(mask, bool)
    f = np.where(m, field, 0).astype(np.float64)
    sig = [sigma_mm / float(v) for v in voxel_size]
    num = ndimage.gaussian_filter(f, sig, mode="constant")
    den = ndimage.gaussian_filter(m.astype(np.float64), sig, mode="constant")
    low = np.divide(num, den, out=np.zeros_like(num), where=den > 1e-3)
    return np.where(m, f - low, 0).astype(np.float32)


def phase_mask(phase: np.ndarray, power: int = 4) -> np.ndarray:
    """Haacke's negative phase mask: 1 for φ ≥ 0, (1 + φ/π) for −π < φ < 0, 0 below −π; to ``power``."""
    w = np.clip(1.0 + np.minimum(np.asarray(phase, np.float32), 0) / np.float32(np.pi), 0.0, 1.0)
    return (w ** int(power)).astype(np.float32)


def min_ip(volume: np.ndarray, voxel_size, slab_mm: float, axis: int = 2) -> np.ndarray:
    """Sliding minimum-intensity projection over ``slab_mm`` along ``axis`` (same shape as the input)."""
    n = max(1, int(round(slab_mm / float(voxel_size[axis]))))
    if n <= 1:
        return np.asarray(volume, np.float32).copy()
    return ndimage.minimum_filter1d(np.asarray(volume, np.float32), size=n, axis=axis, mode="nearest")


def numart2star(magnitude: np.ndarray, te) -> tuple[np.ndarray, np.ndarray]:
    """NumART2*: T2* (ms) and R2* (1/s) from ≥ 2 echo magnitudes; 0 where the signal does not decay."""
    m = np.asarray(magnitude, np.float64)
    t = np.asarray(te, np.float64)
    if m.ndim != 4 or m.shape[-1] != t.size or t.size < 2:
        raise ScanError(f"magnitude: expected (i, j, k, echo) with {t.size} echoes, got shape {m.shape}")
    if np.any(np.diff(t) <= 0):
        raise ScanError(f"te: echo times must increase, got {t.tolist()}")
    integral = (np.trapezoid if hasattr(np, "trapezoid") else np.trapz)(m, t, axis=-1)  # numpy < 2: trapz
    decay = m[..., 0] - m[..., -1]
    ok = (decay > 0) & (integral > 0)
    t2 = np.zeros(m.shape[:3])
    t2[ok] = integral[ok] / decay[ok]
    t2 = np.minimum(t2, 1.0)  # at most 1 s: beyond it the echoes cannot resolve the decay
    r2 = np.zeros_like(t2)
    r2[t2 > 0] = 1.0 / t2[t2 > 0]
    return (t2 * 1e3).astype(np.float32), r2.astype(np.float32)


def swi(magnitude: np.ndarray, field_ppm: np.ndarray, mask: np.ndarray, te, b0_tesla: float, voxel_size,
        params: Optional[SWIParams] = None) -> SWIResult:
    """CLEAR-SWI-style SWI from echo magnitudes and the unwrapped total field.

    Parameters
    ----------
    magnitude : ndarray (i, j, k, echo)
        The echoes' magnitudes.
    field_ppm : ndarray (i, j, k)
        Unwrapped total field in ppm of B0 (the front end's fit and unwrapping), paramagnetic > 0.
    mask : ndarray of bool (i, j, k)
        Where the field is trusted (tissue); outside it the phase mask is 1 (magnitude only).
    te : sequence of float
        Echo times (s).
    b0_tesla : float
        Field strength (T).
    voxel_size : sequence of 3 floats
        mm, in the arrays' voxel order.
    params : SWIParams

    Returns
    -------
    SWIResult

    References
    ----------
    Haacke EM et al. Susceptibility weighted imaging (SWI). Magn Reson Med 2004;52:612-618.
    Eckstein K et al. Improved susceptibility weighted imaging at ultra-high field using bipolar
    multi-echo acquisition and optimized image processing: CLEAR-SWI. NeuroImage 2021;237:118175.
    Hagberg GE et al. Real-time quantification of T2* changes using multiecho planar imaging and
    numerical methods. Magn Reson Med 2002;48:877-882.
    """
    p = params or SWIParams()
    te = np.asarray(te, np.float64)
    mag4 = np.asarray(magnitude, np.float32)
    if mag4.ndim == 3:
        mag4 = mag4[..., None]
    if mag4.shape[:3] != np.shape(field_ppm) or mag4.shape[-1] != te.size:
        raise ScanError(f"swi: magnitude {mag4.shape} does not match the field {np.shape(field_ppm)} "
                        f"and {te.size} echo times")
    if not (np.isfinite(b0_tesla) and b0_tesla > 0):
        raise ScanError(f"b0_tesla: expected a positive field strength in tesla, got {b0_tesla!r}")
    te_ref = float(p.reference_te) if p.reference_te > 0 else float(np.mean(te))
    combined = combine_magnitude(mag4, te, p.magnitude)
    hp = highpass_field(field_ppm, mask, voxel_size, p.highpass_mm)
    # paramagnetic (positive field here) must darken: SWI's phase convention is the opposite sign
    phase = (-2.0 * np.pi * GAMMA_BAR_HZ_PER_T * float(b0_tesla) * te_ref * 1e-6 * hp).astype(np.float32)
    weight = np.where(mask, phase_mask(phase, p.power), 1.0).astype(np.float32)
    image = (combined * weight).astype(np.float32)
    if te.size >= 2:
        t2, r2 = numart2star(mag4, te)
    else:
        t2 = r2 = np.zeros(image.shape, np.float32)
    prov = {"method": "swi", "parameters": params_to_dict(p),
            "reference_te": te_ref, "b0_tesla": float(b0_tesla), "echo_times": te.tolist(),
            "references": ["Haacke 2004 (phase mask)", "Eckstein 2021 (CLEAR-SWI)", "Hagberg 2002 (NumART2*)"]}
    return SWIResult(swi=image, min_ip=min_ip(image, voxel_size, p.minip_mm), magnitude=combined,
                     phase_hp=np.where(mask, phase, 0).astype(np.float32), mask_weight=weight,
                     t2star_ms=t2, r2star=r2, provenance=prov)


STEPS = (Step(family="swi", name="clear-swi", label="CLEAR-SWI", params_cls=SWIParams, run=swi, default=True,
              doc="Multi-echo SWI after CLEAR-SWI (Eckstein 2021): combined magnitude × Haacke's phase mask of the "
                  "high-passed unwrapped field, a sliding minIP over a slab, and NumART2* T2*/R2*."),)
