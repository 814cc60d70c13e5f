"""Refit of the spatially unwrapped total field through the origin (the default chain's last fit stage).

Why: the free-intercept line of :func:`napari_qsm.core.field.fit.fit_linear` measures the phase's slope
over the echoes, TE₁ … TE_N. Where the field varies within a voxel (next to veins, nuclei, a haemorrhage,
at the brain's edge) the voxel's signal is a sum of compartments, S(t) = Σ_k a_k·e^{−R2*_k·t}·e^{iωf_k·t}.
Its phase starts at the receive offset with slope ω·Σa_k f_k/Σa_k (proton-density weighted) and bends as
the compartments dephase and the short-T2* ones decay: the slope over late echoes (TE₁ = 12.6 ms on a
clinical slab) follows the bright, long-lived compartments, not the voxel's mean field that the dipole
model of voxel-mean χ predicts. The phase itself is anchored at TE 0: once the receive-phase offset is
removed it is 0 there for every compartment, so the line through the origin, φ_n = ω·TE_n, averages the
frequency over [0, TE_n] and is pulled far less by late-echo dephasing. It also has the smaller noise
(TE₁ becomes a lever).

How: with the unwrapped free-intercept field ω_u, every echo's residual phase wrap(φ_n − ω_u·TE_n) is the
receive-phase offset φ₀ plus noise (plus the bend where the phase is not linear in TE). Their complex sum over
the echoes (weights |M_n|²) is the voxel's offset; it is smoothed in the mask by a Gaussian of ``sigma_mm``
(normalised: outside the mask counts nothing), with the smoothing's first-order bias removed where its window
is cut by the mask's edge or the FOV border (:func:`smooth_phase`; exact for a linear phase). This is
MCPC-3D-S's idea (Eckstein 2018: the offset is the phase extrapolated to TE 0, smoothed) made from all echoes
and without unwrapping arg(S₂·conj S₁) again (with TE₁/ΔTE not an integer that unwrapping's 2π errors move the
offset by 2π·frac(TE₁/ΔTE)). Then each echo's 2π ambiguity comes from ω_u (residual r_n = wrap(φ_n − φ₀ −
ω_u·TE_n), valid while ω_u is within π/TE_n of the truth) and ω = ω_u + Σw·r_n·TE_n / Σw·TE_n² with
w = |M_n|² (inverse phase variance). A global error of ω_u by whole wrap periods 2π/ΔTE stays a constant
field offset (harmless for background removal). N_std = σ/√(Σw·TE_n²), times √misfit where the
through-origin misfit (dof E − 1) exceeds ``misfit_noise``
(:func:`napari_qsm.core.field.fit.misfit_noise_std`).

Measured (issue 24, ``benchmarks/bench_field.py``, docs/benchmarks/field.md): on the clinical 0.75×0.75×3 mm
slab the raw total field's error in the brain (noise-free echoes of the ``shapes`` head: 0.0065 ppm, of it
0.030 ppm rms within 3 mm of veins, nuclei and the haemorrhage) is what separated the chain's χ from the
reachable reference; that error is the free slope's dephasing bias, not noise (``benchmarks/field_raw_error.py``).

References
----------
Eckstein et al., MRM 79:2996 (2018) (MCPC-3D-S); Dymerska et al., MRM 85:2294 (2021) (ROMEO's B0 from the
offset-free phase, φ_n/TE_n weighted by |M_n|·TE_n); Sati et al., NeuroImage 77:268 (2013) and Yablonskiy &
Haacke, MRM 32:749 (1994) (non-linear phase evolution of voxels with several compartments).
"""

from __future__ import annotations

import time

import numpy as np

from .fit import _gauss_smooth_complex, _ppm_per_rad_s, _wrap, misfit_noise_std
from .records import Echoes, TotalField

__all__ = ["through_origin", "smooth_phase"]


def _smooth_gradient(zw: np.ndarray, ax: int, h: float, sig, device) -> np.ndarray:
    """Gradient (rad/mm) of the phase of ``zw`` (= w·e^{iφ}) along ``ax``: the angle of the Gaussian-smoothed
    products of neighbours zw(x+1)·conj zw(x) (the data's own wrapped differences, weighted by both voxels), so it
    holds up to the edge of the weights (the smoothed phase's own gradient carries the cut window's bias there)."""
    n = zw.shape[ax]
    if n < 2:
        return np.zeros(zw.shape, np.float32)
    prod = np.zeros(zw.shape, np.complex64)
    idx = [slice(None)] * 3
    idx[ax] = slice(0, n - 1)
    prod[tuple(idx)] = np.take(zw, range(1, n), axis=ax) * np.conj(np.take(zw, range(n - 1), axis=ax))
    return (np.angle(_gauss_smooth_complex(prod, sig, device)) / np.float32(h)).astype(np.float32)


def smooth_phase(phase, weight, sigma_mm: float, voxel_size, device="auto") -> np.ndarray:
    """A phase map smoothed by a Gaussian (σ in mm), weighted, with the window's first-order bias removed.

    ``angle(G∗(w·e^{iφ}))`` is φ(x) + ∇φ·c(x) for a phase that is linear over the window, where
    c = G∗(w·x)/G∗w − x is the offset (mm) of the weighted window's centroid from the voxel: zero deep inside the
    weights, up to about σ where the window is cut (the mask's edge, the FOV border). Returned: the smoothed
    phase minus ∇φ·c, ∇ from the data's neighbour differences smoothed alike (:func:`_smooth_gradient`); exact for
    a linear phase. Where the weights vanish (G∗w below 1e-6 of its maximum) the result is the uncorrected smoothed
    phase.

    Parameters
    ----------
    phase : 3-D phase (rad). weight : 3-D weights ≥ 0 (0 = not used). sigma_mm : Gaussian σ (mm).
    voxel_size : mm. device : torch device of the FFT smoothing.

    Returns
    -------
    numpy.ndarray, float32: the smoothed phase wrapped to [−π, π].

    References
    ----------
    Knutsson & Westin, CVPR 1993 (normalised convolution; the first-order term corrected here).
    """
    vs = [float(v) for v in voxel_size]
    sig = [float(sigma_mm) / v for v in vs]
    w = np.asarray(weight, np.float32)
    zw = (w * np.exp(1j * np.asarray(phase, np.float32))).astype(np.complex64)
    z = _gauss_smooth_complex(zw, sig, device)
    den = _gauss_smooth_complex(w.astype(np.complex64), sig, device).real
    good = den > np.float32(1e-6) * max(float(den.max()), 1e-30)
    out = np.angle(z).astype(np.float32)
    for ax, h in enumerate(vs):
        x = np.arange(w.shape[ax], dtype=np.float32).reshape([-1 if a == ax else 1 for a in range(3)])
        num = _gauss_smooth_complex((w * x).astype(np.complex64), sig, device).real
        c = np.where(good, num / np.where(good, den, 1) - x, 0).astype(np.float32) * np.float32(h)
        out -= _smooth_gradient(zw, ax, h, sig, device) * c
    return _wrap(out)


def through_origin(echoes: Echoes, total: TotalField, mask, *, sigma_mm: float = 2.5, misfit_noise: float = 3.0,
                   device="auto") -> TotalField:
    """The unwrapped total field refitted through the origin after phase-offset removal (module docstring).

    Parameters
    ----------
    echoes : the raw echoes the fit ran on.
    total : the fit's total field, spatially unwrapped (``wrapped`` False), with its noise σ in
        ``provenance["noise_sigma"]``.
    mask : bool volume; the refit is made there, the field and N_std elsewhere are kept.
    sigma_mm : Gaussian σ (mm) smoothing the receive-phase offset.
    misfit_noise : N_std × √misfit where the through-origin misfit exceeds it (0 = off).
    device : torch device of the offset smoothing.

    Returns
    -------
    TotalField : field, N_std and misfit replaced in ``mask``; ``provenance["refit"]`` says what was done.

    References
    ----------
    Eckstein et al., MRM 79:2996 (2018); Dymerska et al., MRM 85:2294 (2021).
    """
    t0 = time.perf_counter()
    if total.wrapped:
        raise ValueError("through_origin: the total field must be spatially unwrapped first (wrapped is True)")
    m = np.asarray(mask, bool)
    if m.shape != total.shape or not m.any():
        raise ValueError(f"through_origin: mask of shape {m.shape} with {int(m.sum())} voxels; expected a non-empty "
                         f"mask of shape {total.shape}")
    sigma = float(total.provenance.get("noise_sigma", 0.0))
    te = np.asarray(echoes.te, np.float32)
    rad_s = np.float32(1.0 / _ppm_per_rad_s(echoes.b0_tesla))          # (rad/s) per ppm
    w_u = total.field[m] * rad_s
    w = echoes.magnitude[m] ** 2
    phase = echoes.phase[m]
    r = phase - w_u[:, None] * te                                      # offset + noise (mod 2π)
    z = (w * np.cos(r)).sum(-1) + 1j * (w * np.sin(r)).sum(-1)
    off_v = np.zeros(total.shape, np.float32)
    wt = np.zeros(total.shape, np.float32)
    off_v[m] = np.angle(z)
    wt[m] = np.sqrt(np.abs(z))
    po = smooth_phase(off_v, wt, sigma_mm, total.voxel_size, device)[m]
    del z, off_v, wt
    r = _wrap(phase - po[:, None] - w_u[:, None] * te)
    stt = w @ (te * te)
    ok = stt > 0
    dw = np.where(ok, ((w * r) @ te) / np.where(ok, stt, 1), 0).astype(np.float32)
    res = r - dw[:, None] * te
    rss = (w * res * res).sum(-1)
    del r, res
    dof = len(te) - 1
    misfit = (rss / np.float32(sigma * sigma * dof)).astype(np.float32) if sigma > 0 and dof >= 1 else None
    nstd = np.where(ok, np.float32(sigma) / np.sqrt(np.where(ok, stt, 1)), np.inf).astype(np.float32)
    nstd = misfit_noise_std(nstd, misfit, misfit_noise)
    cap = np.float32(np.pi / float(total.delta_te))
    field = total.field.copy()
    field[m] = (w_u + dw) / rad_s
    noise_std = total.noise_std.copy()
    noise_std[m] = np.minimum(nstd, cap) / rad_s
    mf = None
    if total.misfit is not None and misfit is not None:
        mf = total.misfit.copy()
        mf[m] = misfit
    shift = dw / rad_s
    prov = dict(total.provenance)
    prov["refit"] = {"model": "through the origin after offset removal (φ_n = ω·TE_n); offset = the echoes' "
                              "residual phase against the unwrapped free-intercept field, smoothed; 2π ambiguity "
                              "from that field", "offset_sigma_mm": float(sigma_mm), "misfit_noise": float(misfit_noise),
                     "field_change_ppm_rms": float(np.sqrt(np.mean((shift - np.median(shift)) ** 2))),
                     "seconds": round(time.perf_counter() - t0, 3)}
    return total.replace(field=field.astype(np.float32), noise_std=noise_std.astype(np.float32), misfit=mf,
                         provenance=prov)
