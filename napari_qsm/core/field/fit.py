"""Echo fit (family "fit"): multi-echo complex signal → total field (ppm), N_std (ppm), R2* (1/s).

Inputs of the family: ``run(echoes: Echoes, params, *, unwrapped_phase=None, mask=None,
progress=None, cancel=None, device="auto") -> TotalField``.

Phase-offset removal, MCPC-3D-S (Eckstein et al., MRM 2018), :func:`mcpc3ds`:
  1. Hermitian inner product of the first two echoes, H = S₂·conj(S₁): its phase is the field's
     phase evolution over ΔTE = TE₂ − TE₁, free of the receive-phase offset φ₀.
  2. Phase evolution up to TE₁: (TE₁/ΔTE)·unwrap(arg H). When TE₁/ΔTE is an integer k the
     wrapped arg H times k is exact modulo 2π (no unwrapping needed); otherwise arg H is unwrapped
     spatially here (Laplacian estimate made congruent to the wrapped phase: exact where the
     Laplacian's harmonic error stays below π; an error there only leaves a smooth residual
     offset, the field slope is untouched).
  3. φ₀ = arg(S₁·e^{−i·evolution}), smoothed as the complex |H|^{1/2}·e^{iφ₀} with a Gaussian of σ
     ``offset_sigma_mm`` (MriResearchTools' mcpc3ds default is σ = [10, 10, 5] voxels; here 10 mm
     in physical units), in torch on ``device`` (FFT, zero-padded by 3σ).
  4. φ₀ is removed from every echo: S_n·e^{−iφ₀}.
  The smoothing leaves a residual where φ₀ varies within σ (object edges, a non-smooth receive
  phase). It only matters for ``intercept="zero"``: with the default free intercept the field,
  N_std and R2* do not depend on the offsets at all (they are differences between echoes). On the
  honest phantom (2.5 mm, 5 echoes, SNR 40) the through-origin field's RMS error was 0.014 ppm at
  σ = 10 mm and 0.0022 ppm at σ = 2.5 mm, against 0.0032 ppm for the free intercept.

Field estimators:

* "linear" (default), :func:`fit_linear`. Phase per echo: temporally unwrapped from the echoes
  (φ₁ = arg S₁, φ_{n+1} = φ_n + arg(S_{n+1}·conj S_n); exact while |ω·(TE_{n+1} − TE_n)| < π) or
  the given spatially unwrapped phase. Weighted least squares with the inverse phase variance
  |M_n|² as weight (var φ_n = σ²/|M_n|²): ``intercept="fit"`` (default) fits φ_n = φ(TE₁) + ω·(TE_n − TE₁)
  (the offset is free: robust to any residual offset; the weighted TE spread is the lever);
  ``intercept="zero"`` fits φ_n = ω·TE_n through the origin after offset removal (weights
  |M_n|²·TE_n² on φ_n/TE_n: lower noise, uses TE₁ as lever; the 2π ambiguity of echo 1 is resolved
  with the slope of the free fit). N_std = σ·√(Σw/(Σw·Σwτ² − (Σwτ)²)) (free) or σ/√(Σw·TE²) (zero)
  in rad/s → ppm. From the temporally unwrapped phase the field may still hold wraps of
  2π/ΔTE where |ω·ΔTE| > π (``TotalField.wrapped`` is True: unwrap ``field·rad_per_ppm`` spatially);
  with ``intercept="zero"`` such wraps are not clean, so use it only where the field needs no
  spatial unwrapping or with an unwrapped phase.
* "nonlinear", :func:`fit_nonlinear`: the MEDI toolbox's nonlinear complex fit. Gauss-Newton on
  s_n = |M_n|·e^{i(φ₀ + ω·τ_n)}, τ_n = (TE_n − TE₁)/ΔTE (the echo index for even spacing),
  started from arg(S₂·conj S₁) and arg S₁, ≤ ``max_iter`` (30) iterations, stopping when the
  field update relative to the field over all voxels ‖δω‖/‖ω‖ < ``tol`` (1e-4; MEDI's rule,
  ``stop="global"``) or, with ``stop="voxel"``, when every voxel's own |δ|/|p| < tol; voxels whose own
  update is below tol leave the working set early (speed only). N_std = σ·√(a11/(a11·a22 − a12²)), a11 = Σ|M|², a12 = Σ τ|M|²,
  a22 = Σ τ²|M|² (MEDI's formula times the channel noise σ, so that it is a standard deviation),
  in ppm. The fitted field is WRAPPED per voxel to ω·ΔTE ∈ (−π, π] (``wrapped`` = True): it needs
  spatial unwrapping.

In the chain (:func:`napari_qsm.core.field.pipeline.local_field`) the linear fit's spatially unwrapped field is
refitted through the origin (``refit="origin"``, default; :mod:`napari_qsm.core.field.refit`): the offset from
all echoes' residual phase against the unwrapped field, smoothed by ``refit_sigma_mm`` with the cut window's bias
removed, then φ_n = ω·TE_n with each echo's 2π ambiguity from the unwrapped field. Next to veins and other strong
sources the voxel's compartments dephase and the free slope over late echoes follows the long-lived one; the phase
anchored at TE 0 is nearer the voxel-mean field (issue 24, shapes slab: brain field error 0.0068 → 0.0040 ppm;
``benchmarks/field_raw_error.py``).

Both: the misfit (reduced χ² of the phase fit, Σ|M_n|²·r_n²/(σ²·dof), about 1 where the phase is
linear in TE; ``TotalField.misfit``) marks voxels whose phase cannot be trusted — intra-voxel
dephasing at the brain's edge next to air and bone, signal voids — and lets the mask leave them
out. Where it exceeds ``misfit_noise`` (3: noise alone passes it in about 3 % of voxels with 5
echoes and 1 % with 7), N_std is multiplied by √misfit (:func:`misfit_noise_std`), so that the
inversions' data weights 1/N_std follow the voxel's own residual scatter (issue 24: on the 3 mm
clinical slab, MEDI χ from raw echoes 78.5 → 71.8 % on the phantom, 61.9 → 52.5 % on the shapes
head; unchanged at 1 mm; docs/benchmarks/field.md). R2* from the weighted (|M_n|²) log-linear fit of the magnitudes, clipped to [0, r2star_max]
(500 1/s); combined magnitude = root sum of squares over echoes (MEDI's iMag). Noise σ per
real/imaginary channel: ``noise_sigma`` when given, else :func:`.noise.estimate_noise_sigma`: the
FOV corners only when they test as air (χ statistics of a sum-of-squares magnitude with N
channels, low level, no decay and no correlation over the echoes, agreement with the residual),
else the fit's residual energy Σ|M_n|²·r_n² (median over bright voxels / median of χ² with the fit's
degrees of freedom). Its value, source and the tests are in the provenance (``noise_sigma``,
``noise_sigma_source``, ``noise_tests``); ``provenance["report"]`` is one line with the phase units
(and why), B0, TE and σ, for the console and the Field dock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..device import resolve_device
from ..params import check_params, params_to_dict, param
from ..progress import Reporter
from ..scan import ScanError
from .facts import input_report
from .noise import estimate_noise_sigma
from .records import GAMMA_BAR_MHZ_PER_T, Echoes, TotalField
from .steps import Step

__all__ = ["LinearFitParams", "NonlinearFitParams", "fit_linear", "fit_nonlinear", "mcpc3ds", "misfit_noise_std",
           "estimate_noise_sigma", "STEPS"]

_OFFSETS = ("mcpc3ds", "none")


@dataclass
class LinearFitParams:
    offsets: str = param("mcpc3ds", "receive-phase offset removal before the fit (MCPC-3D-S, Eckstein 2018)",
                         choices=_OFFSETS)
    offset_sigma_mm: float = param(10.0, "MCPC-3D-S: Gaussian σ (mm) smoothing the phase offset", min=0.5, max=50.0)
    intercept: str = param("fit", "fit: φ = φ(TE1) + ω·(TE − TE1) (robust); zero: φ = ω·TE after offset removal",
                           choices=("fit", "zero"))
    noise_sigma: float = param(0.0, "complex noise σ per channel (magnitude units); 0 = estimate", min=0.0)
    r2star_max: float = param(500.0, "R2* clip (1/s)", min=1.0, max=5000.0)
    misfit_noise: float = param(3.0, "where the fit's misfit (reduced χ²) exceeds this, N_std × √misfit: the slope's "
                                "standard error from the voxel's own residual scatter (partial volume, intra-voxel "
                                "dephasing); 0 = N_std from σ alone", min=0.0, max=1e6)
    refit: str = param("origin", "after spatial unwrapping (the chain): origin = refit the field through the origin, "
                       "φ = ω·TE after removing the receive-phase offset (from all echoes' residual phase against the unwrapped "
                       "field, smoothed), each echo's 2π ambiguity from the unwrapped field "
                       "(the phase anchored at TE 0 is less biased by intra-voxel dephasing next to veins than the "
                       "slope over late echoes; refit.py); none = keep the free-intercept slope",
                       choices=("origin", "none"))
    refit_sigma_mm: float = param(2.5, "refit: Gaussian σ (mm) smoothing the refit's receive-phase offset (a smooth receive "
                                  "phase bends within a larger σ)", min=0.5, max=50.0)


@dataclass
class NonlinearFitParams:
    max_iter: int = param(30, "Gauss-Newton iterations at most (MEDI: 30)", min=1, max=200)
    tol: float = param(1e-4, "relative update that stops the fit (MEDI: 1e-4)", min=1e-8, max=1e-1)
    stop: str = param("global", "global: ‖δω‖/‖ω‖ over all voxels < tol (MEDI); voxel: every voxel's |δ|/|p| < tol",
                      choices=("global", "voxel"))
    offsets: str = param("none", "receive-phase offset removal first (the fit has its own φ0)", choices=_OFFSETS)
    offset_sigma_mm: float = param(10.0, "MCPC-3D-S: Gaussian σ (mm) smoothing the phase offset", min=0.5, max=50.0)
    noise_sigma: float = param(0.0, "complex noise σ per channel (magnitude units); 0 = estimate", min=0.0)
    r2star_max: float = param(500.0, "R2* clip (1/s)", min=1.0, max=5000.0)
    misfit_noise: float = param(3.0, "where the fit's misfit (reduced χ²) exceeds this, N_std × √misfit: the slope's "
                                "standard error from the voxel's own residual scatter (partial volume, intra-voxel "
                                "dephasing); 0 = N_std from σ alone", min=0.0, max=1e6)


# ----------------------------------------------------------------------------------------------- helpers

def _wrap(x):
    """Wrap to [−π, π] (x − 2π·round(x/2π))."""
    x = np.asarray(x, dtype=np.float32)
    return x - np.float32(2 * np.pi) * np.rint(x * np.float32(0.5 / np.pi))


def _ppm_per_rad_s(b0: float) -> float:
    """ppm per (rad/s): ω/(2π) Hz / (γ̄·B0) with γ̄ in MHz/T."""
    return 1.0 / (2.0 * np.pi * GAMMA_BAR_MHZ_PER_T * float(b0))


def _check_echoes(echoes, need: int = 2) -> None:
    if not isinstance(echoes, Echoes):
        raise ScanError(f"echoes: expected an Echoes record (load_echoes), got {type(echoes).__name__}")
    if echoes.n_echoes < need:
        raise ScanError(f"echoes: the echo fit needs at least {need} echoes, got {echoes.n_echoes}")


def _gauss_smooth_complex(z: np.ndarray, sigma_vox, device) -> np.ndarray:
    """Gaussian smoothing of a complex volume by FFT in torch, zero-padded by 3σ (no wrap-around)."""
    dev = resolve_device(device)
    pad = [int(np.ceil(3 * s)) for s in sigma_vox]
    shape = [n + 2 * p for n, p in zip(z.shape, pad)]
    x = torch.zeros(shape, dtype=torch.complex64, device=dev)
    x[pad[0]:pad[0] + z.shape[0], pad[1]:pad[1] + z.shape[1], pad[2]:pad[2] + z.shape[2]] = torch.from_numpy(
        np.ascontiguousarray(z, dtype=np.complex64)).to(dev)
    X = torch.fft.fftn(x)
    del x
    for ax, (n, s) in enumerate(zip(shape, sigma_vox)):
        f = torch.fft.fftfreq(n, device=dev)
        g = torch.exp(-2.0 * (np.pi * s * f) ** 2).to(torch.complex64)
        sh = [1, 1, 1]
        sh[ax] = n
        X *= g.reshape(sh)
    y = torch.fft.ifftn(X)
    del X
    return y[pad[0]:pad[0] + z.shape[0], pad[1]:pad[1] + z.shape[1], pad[2]:pad[2] + z.shape[2]].cpu().numpy()


def _laplacian_unwrap(phi: np.ndarray, voxel_size, device) -> np.ndarray:
    """Wrapped phase → spatially unwrapped, congruent to the input (φ + 2πk).

    The Laplacian estimate ∇⁻²[cos φ·∇² sin φ − sin φ·∇² cos φ] (discrete Laplacian by FFT on the
    volume zero-padded by a quarter of each side) fixes k = round((estimate − φ)/2π); exact where the estimate is within π of the truth.
    """
    dev = resolve_device(device)
    pad = [max(4, n // 4) for n in phi.shape]
    shape = [n + 2 * p for n, p in zip(phi.shape, pad)]
    sl = tuple(slice(p, p + n) for p, n in zip(pad, phi.shape))
    ph = torch.zeros(shape, dtype=torch.float32, device=dev)
    ph[sl] = torch.from_numpy(np.ascontiguousarray(phi, np.float32)).to(dev)
    lap_k = torch.zeros(shape, dtype=torch.float32, device=dev)
    for ax, (n, h) in enumerate(zip(shape, voxel_size)):
        k = torch.arange(n, device=dev, dtype=torch.float32)
        term = (2.0 * torch.cos(2.0 * np.pi * k / n) - 2.0) / float(h) ** 2
        sh = [1, 1, 1]
        sh[ax] = n
        lap_k = lap_k + term.reshape(sh)

    def lap(a):
        return torch.fft.ifftn(torch.fft.fftn(a) * lap_k).real

    c, s = torch.cos(ph), torch.sin(ph)
    rhs = c * lap(s) - s * lap(c)
    del c, s
    R = torch.fft.fftn(rhs)
    inv = torch.where(lap_k != 0, 1.0 / torch.where(lap_k != 0, lap_k, torch.ones_like(lap_k)), torch.zeros_like(lap_k))
    est = torch.fft.ifftn(R * inv).real[sl].cpu().numpy()
    return (phi + 2 * np.pi * np.round((est - phi) / (2 * np.pi))).astype(np.float32)


def mcpc3ds(echoes: Echoes, sigma_mm: float = 10.0, *, device="auto") -> tuple[Echoes, np.ndarray]:
    """MCPC-3D-S phase-offset removal (module docstring). Returns (corrected echoes, offset φ₀ rad)."""
    _check_echoes(echoes)
    te1, te2 = echoes.te[0], echoes.te[1]
    dte = te2 - te1
    hip_phase = _wrap(echoes.phase[..., 1] - echoes.phase[..., 0])
    hip_mag = np.sqrt(echoes.magnitude[..., 0] * echoes.magnitude[..., 1])
    ratio = te1 / dte
    k = round(ratio)
    if abs(ratio - k) < 1e-3:
        evolution = np.float32(k) * hip_phase
        how = f"TE1/ΔTE = {k} (integer): no unwrapping"
    else:
        evolution = np.float32(ratio) * _laplacian_unwrap(hip_phase, echoes.voxel_size, device)
        how = f"TE1/ΔTE = {ratio:.4g}: arg(S2·conj S1) unwrapped (Laplacian, congruent)"
    po = _wrap(echoes.phase[..., 0] - evolution)
    sig = [float(sigma_mm) / v for v in echoes.voxel_size]
    sm = _gauss_smooth_complex(np.sqrt(hip_mag) * np.exp(1j * po), sig, device)
    po_s = np.angle(sm).astype(np.float32)
    phase = _wrap(echoes.phase - po_s[..., None])
    out = echoes.with_phase(phase, phase_offsets=f"MCPC-3D-S (σ {sigma_mm} mm; {how})")
    return out, po_s


def _noise(params, ech, resid_sq_w, dof):
    """(σ, source, details): the parameter when given, else :func:`.noise.estimate_noise_sigma`."""
    if params.noise_sigma > 0:
        return float(params.noise_sigma), "parameter", {}
    est = estimate_noise_sigma(ech.magnitude, resid_sq_w, dof)
    return est.sigma, est.source, est.details


def _misfit(resid_sq_w, sigma, dof):
    """Reduced χ² of the phase fit per voxel: Σ|M_n|²·r_n² / (σ²·dof) (≈ 1 for noise only); None when dof < 1."""
    if dof < 1 or not sigma > 0:
        return None
    return (resid_sq_w / np.float32(float(sigma) ** 2 * dof)).astype(np.float32)


def misfit_noise_std(noise_std, misfit, threshold):
    """N_std × √misfit where the misfit exceeds ``threshold`` (0 = off): the standard error of the fitted slope
    from the voxel's own residual scatter, which there exceeds what σ predicts (the phase is not linear in TE:
    partial volume, intra-voxel dephasing). Below the threshold (noise, whose reduced χ² scatters about 1) N_std is
    unchanged. NaN misfit: unchanged.

    References
    ----------
    The regression standard error of a slope, s_b = √(RSS/dof / Σw(τ − τ̄)²) (any statistics text); MEDI's
    ``merit`` option raises N_std by the inversion residual in the same way (Liu et al. 2013, MRM 69:467).
    """
    if misfit is None or not threshold > 0:
        return noise_std
    big = np.nan_to_num(misfit, nan=0.0) > np.float32(threshold)
    return np.where(big, noise_std * np.sqrt(np.where(big, misfit, 1.0)), noise_std).astype(np.float32)


def _r2star(mag, w, tau, a11, a12, det, ok, rmax):
    logm = np.log(np.maximum(mag, np.float32(1e-30)))
    c1 = (w * logm).sum(-1)
    c2 = (w * logm) @ tau
    del logm
    slope = np.where(ok, (a11 * c2 - a12 * c1) / np.where(ok, det, 1), 0)
    return np.clip(-slope, 0.0, float(rmax)).astype(np.float32)


def _prov(method, params, echoes, noise, t0, extra=None):
    sigma, sigma_src, details = noise
    p = {"step": "fit", "method": method, "params": params_to_dict(params), "noise_sigma": float(sigma),
         "noise_sigma_source": sigma_src, "noise_tests": details, "seconds": round(time.perf_counter() - t0, 3),
         "echoes": echoes.info()}
    p.update(extra or {})
    p["report"] = input_report(echoes.vendor, echoes.b0_tesla, echoes.te, sigma, sigma_src)
    return p


def _prepare(echoes, params, device, rep):
    po = None
    if params.offsets == "mcpc3ds":
        rep(0, "MCPC-3D-S phase offsets")
        echoes, po = mcpc3ds(echoes, params.offset_sigma_mm, device=device)
    return echoes, po


# ----------------------------------------------------------------------------------------------- linear

def _even_spacing(te) -> bool:
    d = np.diff(np.asarray(te, np.float64))
    return bool(d.size and np.all(np.abs(d - d[0]) <= 1e-3 * d[0]))


def _temporal_unwrap(phase, mag, te):
    """Echo phases (i, j, k, echo) made continuous in TE; returns (φ, how).

    Evenly spaced echoes: every echo is unwrapped against the prediction φ₁ + ω̂·(TE_n − TE₁) of
    the wrapped Hermitian-sum estimate ω̂·ΔTE = arg Σ_n S_{n+1}·conj S_n (all echo pairs, weighted
    by |S_n||S_{n+1}|). A 2π error of ω̂·ΔTE then adds exactly 2π·n to echo n, so the fitted field
    is the true one plus a whole number of wrap periods (a clean wrap that spatial unwrapping
    removes). Successive-echo differences are not: where |ω·ΔTE| is near π, noise wraps some of
    them and not others and the fit lands a fraction of a period off (the 2π errors next to the
    air cavities of issue 13). Uneven spacing: successive differences (exact while |ω·ΔTE_n| < π).
    """
    E = phase.shape[3]
    phi = np.empty(phase.shape, np.float32)
    phi[..., 0] = phase[..., 0]
    if _even_spacing(te) and E > 2:
        hr = np.zeros(phase.shape[:3], np.float32)
        hi = np.zeros(phase.shape[:3], np.float32)
        for n in range(E - 1):
            d = phase[..., n + 1] - phase[..., n]
            a = mag[..., n + 1] * mag[..., n]
            hr += a * np.cos(d)
            hi += a * np.sin(d)
        step = np.arctan2(hi, hr).astype(np.float32)   # ω̂·ΔTE, wrapped
        del hr, hi
        for n in range(1, E):
            pred = phase[..., 0] + np.float32(n) * step
            phi[..., n] = pred + _wrap(phase[..., n] - pred)
        return phi, "temporally unwrapped against the Hermitian-sum prediction arg Σ S_{n+1}·conj S_n"
    for n in range(E - 1):
        phi[..., n + 1] = phi[..., n] + _wrap(phase[..., n + 1] - phase[..., n])
    return phi, "temporally unwrapped (successive echo ratios)"


def fit_linear(echoes: Echoes, params: Optional[LinearFitParams] = None, *, unwrapped_phase=None, mask=None,
               progress=None, cancel=None, device="auto") -> TotalField:
    """Weighted linear fit of the temporally (or given spatially) unwrapped phase (module docstring)."""
    t0 = time.perf_counter()
    params = params or LinearFitParams()
    check_params(params)
    _check_echoes(echoes)
    rep = Reporter(progress, cancel, total=4, stage="fit linear")
    if params.intercept == "zero" and params.offsets == "none" and unwrapped_phase is None:
        raise ValueError("fit linear: intercept='zero' needs the receive-phase offsets removed (offsets='mcpc3ds') "
                         "or an unwrapped phase without offsets")
    ech, po = _prepare(echoes, params, device, rep)
    E = ech.n_echoes
    te = np.asarray(ech.te, np.float64)
    tau = (te - te[0]).astype(np.float32)
    mag = ech.magnitude
    w = mag * mag
    rep(1, "phase")
    if unwrapped_phase is not None:
        phi = np.asarray(unwrapped_phase, dtype=np.float32)
        if phi.shape != mag.shape:
            raise ScanError(f"unwrapped_phase: shape {phi.shape} does not match the echoes' {mag.shape}")
        if not np.all(np.isfinite(phi)):
            raise ScanError("unwrapped_phase: NaN/Inf values; expected finite radians")
        if po is not None and params.intercept == "zero":
            phi = phi - po[..., None]
        wrapped = False
    else:
        phi, temporal = _temporal_unwrap(ech.phase, mag, te)
        wrapped = True
    rep(2, "fit")
    a11 = w.sum(-1)
    a12 = w @ tau
    a22 = w @ (tau * tau)
    det = a11 * a22 - a12 * a12
    ok = det > np.float32(1e-6) * np.maximum(a11 * a22, np.float32(1e-30))
    safe = np.where(ok, det, np.float32(1))
    wp = w * phi
    b1 = wp.sum(-1)
    b2 = wp @ tau
    del wp
    omega = np.where(ok, (a11 * b2 - a12 * b1) / safe, 0).astype(np.float32)        # rad/s
    icpt = np.where(a11 > 0, (b1 - a12 * omega) / np.where(a11 > 0, a11, 1), 0).astype(np.float32)
    var_unit = np.where(ok, a11 / safe, np.inf)                                          # per σ², (rad/s)²
    model = lambda: icpt[..., None] + omega[..., None] * tau  # noqa: E731
    if params.intercept == "zero":
        tt = te.astype(np.float32)
        if unwrapped_phase is None:   # resolve echo 1's 2π ambiguity with the free fit's slope
            k1 = np.rint((omega * tt[0] - phi[..., 0]) / np.float32(2 * np.pi)).astype(np.float32)
            phi = phi + np.float32(2 * np.pi) * k1[..., None]
        s_tt = w @ (tt * tt)
        okz = s_tt > 0
        omega = np.where(okz, ((w * phi) @ tt) / np.where(okz, s_tt, 1), 0).astype(np.float32)
        var_unit = np.where(okz, 1.0 / np.where(okz, s_tt, 1), np.inf)
        model = lambda: omega[..., None] * tt  # noqa: E731
    rep(3, "noise, R2*")
    r = phi - model()
    resid_sq_w = (w * r * r).sum(-1)
    del r
    dof = E - 2 + (1 if params.intercept == "zero" else 0)   # E − 2 (free intercept) or E − 1 (through the origin)
    noise = _noise(params, ech, resid_sq_w, dof)
    sigma = noise[0]
    misfit = _misfit(resid_sq_w, sigma, dof)
    del resid_sq_w
    ppm = _ppm_per_rad_s(ech.b0_tesla)
    dte = float(te[1] - te[0])
    cap = np.float32(np.pi / dte)
    nstd = np.float32(sigma) * np.sqrt(var_unit).astype(np.float32)
    nstd = np.minimum(misfit_noise_std(nstd, misfit, params.misfit_noise), cap) * np.float32(ppm)
    r2 = _r2star(mag, w, tau, a11, a12, det, ok, params.r2star_max)
    rss = np.sqrt(a11).astype(np.float32)
    field = (omega * np.float32(ppm)).astype(np.float32)
    rep(4, "done")
    return TotalField(field=field, noise_std=nstd.astype(np.float32), r2star=r2, magnitude=rss, te=ech.te,
                      b0_tesla=ech.b0_tesla, delta_te=dte, mask=mask, wrapped=wrapped, phase_offset=po,
                      affine=ech.affine, voxel_size=ech.voxel_size, b0_direction=ech.b0_direction,
                      nifti_info=ech.nifti_info, name=ech.name, misfit=misfit,
                      provenance=_prov("linear", params, ech, noise, t0,
                                       {"phase": "unwrapped (given)" if unwrapped_phase is not None
                                        else temporal, "wrapped": wrapped}))


# ----------------------------------------------------------------------------------------------- nonlinear

def fit_nonlinear(echoes: Echoes, params: Optional[NonlinearFitParams] = None, *, mask=None, progress=None,
                  cancel=None, device="auto") -> TotalField:
    """The MEDI toolbox's nonlinear complex fit (module docstring). The field is wrapped to ω·ΔTE ∈ (−π, π]."""
    t0 = time.perf_counter()
    params = params or NonlinearFitParams()
    check_params(params)
    _check_echoes(echoes)
    rep = Reporter(progress, cancel, total=params.max_iter + 2, stage="fit nonlinear")
    ech, po = _prepare(echoes, params, device, rep)
    E = ech.n_echoes
    te = np.asarray(ech.te, np.float64)
    dte = float(te[1] - te[0])
    tau = ((te - te[0]) / dte).astype(np.float32)
    mag = ech.magnitude
    w = mag * mag
    a11 = w.sum(-1)
    a12 = (w * tau).sum(-1)
    a22 = (w * tau * tau).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det > np.float32(1e-6) * np.maximum(a11 * a22, np.float32(1e-30))
    shape = ech.shape
    p0 = ech.phase[..., 0].copy()
    p1 = _wrap(ech.phase[..., 1] - ech.phase[..., 0])
    dev = resolve_device(device)
    P0, P1 = p0.reshape(-1), p1.reshape(-1)
    idx_np = np.flatnonzero(ok)                            # voxels being fitted (compacted as they converge)
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dev)  # noqa: E731
    idx = torch.from_numpy(idx_np).to(dev)
    A_ph = T(ech.phase.reshape(-1, E)[idx_np])
    A_w = T(w.reshape(-1, E)[idx_np])
    d = det.reshape(-1)[idx_np]
    h11, h12, h22 = T(a22.reshape(-1)[idx_np] / d), T(-a12.reshape(-1)[idx_np] / d), T(a11.reshape(-1)[idx_np] / d)
    del d
    q0, q1 = T(P0[idx_np]), T(P1[idx_np])
    tau_t = T(tau)
    out0, out1 = T(P0), T(P1)
    it_done, n_unconverged, global_rel = 0, int(idx_np.size), float("nan")
    frozen_sq = torch.zeros((), dtype=torch.float32, device=dev)   # Σ p1² of voxels dropped from the working set
    for it in range(params.max_iter):
        rep(it + 1, f"Gauss-Newton {it + 1}/{params.max_iter}", active=int(idx.numel()))
        if idx.numel() == 0:
            break
        s = torch.sin(A_ph - q0[:, None] - q1[:, None] * tau_t)
        s *= A_w
        g0 = s.sum(-1)
        g1 = s @ tau_t
        del s
        d0 = h11 * g0 + h12 * g1
        d1 = h12 * g0 + h22 * g1
        q0 += d0
        q1 += d1
        it_done = it + 1
        live = torch.sqrt(d0 * d0 + d1 * d1) >= params.tol * torch.clamp(torch.sqrt(q0 * q0 + q1 * q1), min=1e-6)
        n_live = int(live.sum())
        n_unconverged = n_live
        global_rel = float(torch.sqrt((d1 * d1).sum() / torch.clamp(frozen_sq + (q1 * q1).sum(), min=1e-30)))
        if params.stop == "global" and global_rel < params.tol:
            break
        if n_live < live.numel():
            done = ~live
            out0[idx[done]], out1[idx[done]] = q0[done], q1[done]
            if n_live < 0.8 * live.numel():   # compact the working set
                frozen_sq = frozen_sq + (q1[done] * q1[done]).sum()
                idx, A_ph, A_w = idx[live], A_ph[live], A_w[live]
                h11, h12, h22, q0, q1 = h11[live], h12[live], h22[live], q0[live], q1[live]
    out0[idx], out1[idx] = q0, q1
    P0, P1 = out0.cpu().numpy(), out1.cpu().numpy()
    del A_ph, A_w, out0, out1
    p0 = _wrap(P0.reshape(shape))
    p1 = _wrap(P1.reshape(shape))
    rep(params.max_iter + 1, "noise, R2*")
    safe = np.where(ok, det, np.float32(1))
    r = _wrap(ech.phase - p0[..., None] - p1[..., None] * tau)
    resid_sq_w = (w * r * r).sum(-1)
    del r
    noise = _noise(params, ech, resid_sq_w, E - 2)
    sigma = noise[0]
    misfit = _misfit(resid_sq_w, sigma, E - 2)
    del resid_sq_w
    nrad = np.where(ok, np.float32(sigma) * np.sqrt(np.where(ok, a11 / safe, 0)), np.float32(np.pi))
    ppm_per_rad = _ppm_per_rad_s(ech.b0_tesla) / dte
    nrad = misfit_noise_std(nrad, misfit, params.misfit_noise)
    nstd = (np.minimum(nrad, np.float32(np.pi)) * np.float32(ppm_per_rad)).astype(np.float32)
    field = (p1 * np.float32(ppm_per_rad)).astype(np.float32)
    r2 = _r2star(mag, w, (tau * np.float32(dte)), a11, a12 * np.float32(dte), det * np.float32(dte * dte), ok,
                 params.r2star_max)
    rss = np.sqrt(a11).astype(np.float32)
    rep(params.max_iter + 2, "done")
    return TotalField(field=field, noise_std=nstd, r2star=r2, magnitude=rss, te=ech.te, b0_tesla=ech.b0_tesla,
                      delta_te=dte, mask=mask, wrapped=True, phase_offset=po, affine=ech.affine,
                      voxel_size=ech.voxel_size, b0_direction=ech.b0_direction, nifti_info=ech.nifti_info,
                      name=ech.name, misfit=misfit,
                      provenance=_prov("nonlinear", params, ech, noise, t0,
                                       {"iterations": it_done, "unconverged_voxels": n_unconverged,
                                        "final_relative_update": global_rel,
                                        "wrapped": True}))


STEPS = (
    Step(family="fit", name="linear", label="Linear fit (temporal unwrapping)", params_cls=LinearFitParams,
         run=fit_linear, default=True, order=0,
         doc="MCPC-3D-S phase offsets (Eckstein 2018), then a |M|²-weighted line through the temporally "
             "unwrapped echo phases (successive-echo ratios; or a given spatially unwrapped phase): total field "
             "(ppm), N_std (ppm, from the weights and the noise σ), R2* (weighted log-linear, [0, 500] 1/s). "
             "From wrapped echoes the field may hold wraps of 1/(γ̄·B0·ΔTE) ppm where |ω·ΔTE| > π: unwrap it."),
    Step(family="fit", name="nonlinear", label="Nonlinear complex fit (MEDI)", params_cls=NonlinearFitParams,
         run=fit_nonlinear, order=1,
         doc="The MEDI toolbox's nonlinear complex fit: Gauss-Newton on |M|·e^{i(φ0 + ω·n)} (≤ 30 iterations, "
             "relative tolerance 1e-4), N_std = σ·√(a11/(a11·a22 − a12²)) in ppm, R2* log-linear. The field is "
             "WRAPPED per voxel (ω·ΔTE in (−π, π]) and needs spatial unwrapping; N_std and R2* do not."),
)
