"""MEDI-L1: morphology enabled dipole inversion, with the semantics of the Cornell toolbox's MEDI_L1.

Problem (all arrays on the scan grid, χ in radians of phase, see *Scaling* below)::

    χ* = argmin ‖w_G ∘ ∇χ‖₁ + λ ‖m ∘ (e^{i D∗χ} − e^{i f})‖²   [+ (λ_CSF/2) ‖M_CSF (χ − mean_CSF χ)‖²]

* ``m`` (data weight) = mask / N_std with NaN/Inf → 0, normalised to mean 1 in the mask. N_std is
  the scan's noise map (``scan.noise_std``) when present, else ∝ 1/magnitude (phase noise of a
  complex signal is σ/|S|), else m = mask. ``data_weighting="uniform"`` is the toolbox's mode 0:
  m = 1 over the whole field of view (outside the mask too, where the field is 0), so χ is solved on
  the full field of view instead of the mask's bounding box.
* ``w_G`` (gradient mask, the morphology prior) = 1 where the forward-difference gradient of
  magnitude·mask (Neumann boundary, divided by the voxel size) is at most a threshold. The
  threshold starts at 1 % of max(magnitude) and is multiplied by 1.05 (or 0.95) until the number
  of gradient components above it (over all three components) divided by the number of mask
  voxels crosses ``percentage`` (0.9 → about 30 % of the components are edges).
* Gauss-Newton from χ = 0 with the lagged-diffusivity L1 surrogate
  V = 1/√(|w_G ∇χ|² + ε), ε = 1e-6, and the linearised data term; each step solves
  ``[∇ᵀ w_G V w_G ∇ + 2λ Dᵀ m² D (+ λ_CSF P)] dχ = −[∇ᵀ w_G V w_G ∇χ + 2λ Dᵀ(m² sin(D∗χ − f)) (+ λ_CSF Pχ)]``
  by conjugate gradients (relative residual ``cg_tol`` = 0.01, at most ``cg_max_iter`` = 100),
  at most ``max_iter`` = 10 outer steps, stopping when ‖dχ‖/‖χ‖ < ``tol_norm_ratio`` = 0.1.
  (Re(conj(w)·(−i)(w − b0)) with w = m e^{iDχ}, b0 = m e^{if} equals m² sin(Dχ − f), and
  |w|² = m², so every term is real.) ``∇`` is the forward difference with a Neumann boundary and
  ``div = −∇ᵀ`` the backward difference with a Dirichlet boundary (its exact negative adjoint);
  the toolbox's ``bdiv`` is ∇ᵀ itself, so its ``reg`` equals our ``−div(w_G V w_G ∇·)``.
  P is the CSF projection M_CSF(x − mean_CSF x) (symmetric, idempotent); the toolbox adds
  λ_CSF·P to the normal equations, which is the gradient of (λ_CSF/2)‖Px‖².
* Options: ``smv`` (radius in mm, 0 = off; the toolbox's default radius is 5 mm): the mask is
  eroded to SMV(mask) > 0.999 first, and the gradient mask is built on that eroded mask (as the
  toolbox does); D ← (1 − S)·D, f ← f − SMV(f) (masked) and N_std ← √(SMV(N²) + N²); the result is
  zero outside the eroded mask, as in the toolbox.
  ``merit``: after each GN step, voxels whose demeaned complex residual exceeds 6·std get
  N_std ×= (|r|/6σ)² and m, b0 are rebuilt. MEDI+0 (``csf``): see :func:`derive_csf_mask` (R2* < 5 s⁻¹
  central regions as the toolbox when an R2* map is given, else a magnitude rule).
* Magnitude: a 4-D (multi-echo) magnitude (echoes last) is reduced to its first echo
  (:func:`medi_magnitude`): the least T2*-weighted, highest-SNR image, so the gradient mask follows
  tissue boundaries rather than the R2* decay of later echoes. Note that the toolbox's example
  scripts form iMag as the root sum of squares over echoes; ``medi_magnitude(..., combine="rss")``
  gives that.

Grid and FFTs
-------------
χ is estimated on the mask's bounding box plus 4 voxels (plus the SMV radius), free outside the
mask as the toolbox's χ is free over its whole field of view, and returned masked. The dipole
convolutions use real FFTs (rfftn) on a fast size ≥ ``pad_factor`` × that box (zero padding;
``pad_factor`` = 1 is the toolbox's periodic convolution). One CG iteration costs two FFT pairs
(D p, then Dᵀ(2λm²·D p)) plus the finite differences; one GN step adds two more. On a 2 mm phantom
the NRMSE at λ = 1000 was 15.1 % (pad 1.0), 14.6 % (1.25), 14.6 % (1.5) and 14.6 % (2.0), so the
default is 1.25 (half the FFT volume of 1.5).

Scaling (ppm ↔ the toolbox's radians)
-------------------------------------
The toolbox's local field RDF is the phase in radians accumulated over the echo spacing ΔTE of a
multi-echo fit, and χ_ppm = χ_rad / (2π·ΔTE·CF)·1e6 with CF = γ̄·B0. Fields here are in ppm, so
the field is converted with the same factor::

    s = 2π · ΔTE · γ̄ · B0   [rad/ppm],   γ̄ = 42.577478 MHz/T,   f_rad = s · f_ppm,   χ_ppm = χ_rad / s

with ΔTE = ``delta_te`` (default 5 ms, a typical echo spacing of the multi-echo 3 T GRE data the
toolbox's λ = 1000 was tuned on) and B0 = the scan's ``b0_tesla`` or 3 T. At 3 T, s ≈ 4.01 rad/ppm.
For small phases the problem is equivalent to  min ‖w_G∇χ_ppm‖₁ + λ·s ‖m(D∗χ_ppm − f_ppm)‖², so
only the product λ·s matters; ``lambda=auto`` is independent of this choice.

Automatic λ (``lambda=auto``)
-----------------------------
The toolbox's λ = 1000 ignores the noise level (m is normalised to mean 1). ``lambda=auto`` picks λ
from the data with one of two documented rules (``auto_rule``); the default is UPRE, not the
discrepancy principle:

* ``upre`` (default): minimise the unbiased predictive-risk estimate (Mallows' C_p / Stein)
  U(λ) = R(λ) + 2·tr(K·H_λ) − Σ_v κ_v, where R(λ) = ‖m ∘ (e^{iD∗χ_λ} − e^{if})‖² is the weighted data
  residual, κ_v = m_v²·(2 − 2e^{−σ_v²/2}) ≈ m_v²σ_v² the variance of the weighted data noise (σ_v the
  phase noise in radians) and H_λ = 2λ M D A⁻¹ Dᵀ M the influence matrix of the problem linearised at
  χ_λ (A the Gauss-Newton matrix with the lagged weights of χ_λ). tr(K·H) is estimated with one
  Hutchinson probe (one CG solve). U estimates E‖m ∘ D∗(χ_λ − χ_true)‖². Unlike the plain
  discrepancy principle it accounts for the noise the model absorbs: the free magnitude edges
  (w_G = 0) and the unconstrained χ outside the mask give the fit many degrees of freedom, so at a
  good λ the residual is well below the noise energy (about 0.3–0.5 × on the project phantoms).
  Search: λ = 1000, 2000, then factor-2 steps until the minimum is bracketed, then a parabola
  through the three best points in log λ gives λ*, which is solved too and kept when its U is lower.
* ``discrepancy``: R(λ) = τ·Σκ (``discrepancy`` = τ, default 1), by secant steps in log λ.

Every λ of the search is solved from χ = 0 with the same stopping rule as a plain run (MERIT's
weights reset), so the λ are compared at the same convergence, and the returned map is that
from-zero solve of the reported λ: bitwise what ``lambda=<reported λ>`` returns (same device and
threads). R and tr(K·H) are evaluated with the data weights before any MERIT update (the weights
κ refers to). Cost: about ``auto_max_solves`` plain runs plus one CG solve per trace.

σ_v = s·noise_std when the scan carries a noise map (ppm); otherwise σ_v = c/magnitude (or c) with
the scale c estimated robustly from the field itself (median absolute deviation of the field
minus its 3×3×3 mean in the interior of the mask: an upper bound when the field has fine structure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..constants import GAMMA_BAR_MHZ_PER_T
from ..dipole import check_voxel_size, dipole_kernel, fast_shape, unit_vector
from ..method import Method
from ..params import param
from ..progress import Reporter, check_cancel

DEFAULT_B0_TESLA = 3.0
DEFAULT_DELTA_TE = 0.005
EPSILON = 1e-6


@dataclass
class MEDIParams:
    lam: float | str = param(1000.0, "λ weighting the data term (toolbox default 1000) or 'auto' "
                             "(auto_rule: UPRE by default)",
                             min=1e-3, max=1e9, cli="lambda", allow=("auto",), short="λ")
    percentage: float = param(0.9, "gradient-mask share: #edge gradient components / #mask voxels (0.9 → ~30% edges)",
                              min=0.01, max=2.9)
    smv: float = param(0.0, "SMV preconditioning radius in mm (0 = off; the toolbox uses 5 mm when on)", min=0.0, max=20.0)
    merit: bool = param(False, "MERIT: down-weight voxels whose data residual exceeds 6σ after each GN step")
    csf: str = param("off", "MEDI+0 CSF regularisation: off, or auto (CSF = R2* < 5 1/s central regions when the "
                     "scan has an R2* map, else the brightest magnitude; an explicit csf_mask= always wins)",
                     choices=("off", "auto"))
    lambda_csf: float = param(100.0, "λ_CSF of MEDI+0 (regularises χ in CSF to its mean)", min=0.0, max=1e6)
    data_weighting: str = param("auto", "data weight: auto (mask/noise map, else mask·magnitude, else mask) or uniform "
                                "(toolbox mode 0: 1 over the whole field of view)",
                                choices=("auto", "uniform"))
    edge_mask: bool = param(True, "morphology prior: gradient mask w_G from the magnitude (off: plain TV, no magnitude needed)")
    cg_tol: float = param(0.01, "conjugate-gradient relative residual tolerance", min=1e-6, max=0.5)
    cg_max_iter: int = param(100, "conjugate-gradient iterations per Gauss-Newton step (at most)", min=1, max=10000)
    max_iter: int = param(10, "Gauss-Newton iterations (at most)", min=1, max=100)
    tol_norm_ratio: float = param(0.1, "stop when ‖dχ‖/‖χ‖ falls below this", min=1e-6, max=1.0)
    delta_te: float = param(DEFAULT_DELTA_TE, "ΔTE (s) scaling ppm to the toolbox's radians: s = 2π·ΔTE·γ̄·B0",
                            min=1e-4, max=0.2)
    pad_factor: float = param(1.25, "FFT grid = this × the mask bounding box + margin (1 = periodic like the toolbox)",
                              min=1.0, max=3.0)
    auto_rule: str = param("upre", "lambda=auto rule: upre (predicted-risk minimum) or discrepancy (residual = τ·noise)",
                           choices=("upre", "discrepancy"))
    discrepancy: float = param(1.0, "lambda=auto with the discrepancy rule: target residual = this × the noise energy",
                               min=0.05, max=10.0)
    auto_max_solves: int = param(5, "lambda=auto: at most this many solves (each from zero)", min=2, max=20)


# --------------------------------------------------------------------------------------------
# finite differences


def gradient(x: torch.Tensor, voxel_size) -> torch.Tensor:
    """Forward differences / voxel size with a Neumann boundary (last difference 0): shape (3, *x.shape)."""
    vs = check_voxel_size(voxel_size)
    g = x.new_zeros((3,) + tuple(x.shape))
    torch.sub(x[1:], x[:-1], out=g[0, :-1])
    torch.sub(x[:, 1:], x[:, :-1], out=g[1, :, :-1])
    torch.sub(x[:, :, 1:], x[:, :, :-1], out=g[2, :, :, :-1])
    for a in range(3):
        if vs[a] != 1.0:
            g[a] /= float(vs[a])
    return g


def divergence(u: torch.Tensor, voxel_size) -> torch.Tensor:
    """Backward-difference divergence with a Dirichlet boundary: the exact negative adjoint of :func:`gradient`.

    ⟨divergence(u), x⟩ = −⟨u, gradient(x)⟩ for all u (3, ...) and x.
    """
    vs = check_voxel_size(voxel_size)
    out = u.new_zeros(u.shape[1:])
    for a in range(3):
        ua = u[a]
        n = ua.shape[a]
        if n < 2:
            continue
        head = ua.narrow(a, 0, n - 1)
        if vs[a] != 1.0:
            head = head / float(vs[a])
        out.narrow(a, 0, n - 1).add_(head)
        out.narrow(a, 1, n - 1).sub_(head)
    return out


# --------------------------------------------------------------------------------------------
# weights


def gradient_mask(magnitude: torch.Tensor, mask: torch.Tensor, voxel_size, percentage: float = 0.9,
                  max_steps: int = 5000) -> tuple[torch.Tensor, float]:
    """MEDI gradient mask: (w_G bool of shape (3, ...), threshold).

    |∇(magnitude·mask)| per component; threshold from 1 % of max(magnitude), ×1.05 while the share
    #(|∇| > thr) / #mask exceeds ``percentage``, else ×0.95 until it reaches it. w_G = |∇| ≤ thr.
    """
    m = magnitude * mask
    g = gradient(m, voxel_size).abs_()
    nmask = float(mask.sum())
    vals = torch.sort(g.reshape(-1)).values
    total = vals.numel()

    def share(t: float) -> float:
        above = total - int(torch.searchsorted(vals, torch.tensor([t], dtype=vals.dtype, device=vals.device),
                                               right=True)[0])
        return above / nmask

    thr = 0.01 * float(magnitude.max())
    steps = 0
    if share(thr) > percentage:
        while share(thr) > percentage and steps < max_steps:
            thr *= 1.05
            steps += 1
    else:
        while share(thr) < percentage and steps < max_steps and thr > 0:
            thr *= 0.95
            steps += 1
    return g <= thr, float(thr)


def data_weight(mask: torch.Tensor, noise_std: Optional[torch.Tensor], uniform: bool = False) -> torch.Tensor:
    """m = mask / N_std, NaN/Inf → 0, normalised to mean 1 inside the mask (N_std None → m = mask).

    ``uniform``: the toolbox's data-weighting mode 0, m = 1 over the whole grid (mask and N_std ignored).
    """
    maskf = mask.to(torch.float32)
    if uniform:
        return torch.ones_like(maskf)
    if noise_std is None:
        w = maskf.clone()
    else:
        w = maskf / noise_std.to(torch.float32)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
        w = w * maskf
    inside = mask.bool()
    mean = float(w[inside].mean()) if inside.any() else 0.0
    if not mean > 0 or not math.isfinite(mean):
        raise ValueError("noise_std: the data weight mask/N_std is zero everywhere inside the mask "
                         "(noise map infinite, NaN or magnitude zero); check the noise map / magnitude")
    return w / mean


def phase_scale(delta_te: float = DEFAULT_DELTA_TE, b0_tesla: Optional[float] = None) -> float:
    """s = 2π·ΔTE·γ̄·B0 (rad per ppm): the toolbox's radians = s × ppm."""
    b0 = DEFAULT_B0_TESLA if b0_tesla is None else float(b0_tesla)
    return 2.0 * math.pi * float(delta_te) * GAMMA_BAR_MHZ_PER_T * b0


def estimate_noise_scale(field: np.ndarray, mask: np.ndarray, relative: Optional[np.ndarray] = None) -> float:
    """Robust scale c of the field noise σ_v = c·relative_v (relative = 1/magnitude, or 1).

    Finest-scale diagonal Haar detail d = Σ_{2×2×2 cube} ±f / √8 (signs (−1)^{i+j+k}): for white noise
    its standard deviation is the noise σ, while smooth structure (up to mixed third derivatives)
    cancels. d / √(mean of relative² over the cube), over cubes lying inside the mask, gives c
    through the median absolute deviation (× 1.4826). Fine structure left in the field (edges of
    strong sources) is mostly rejected by the median; the estimate errs on the high side.
    """
    f = np.where(mask, field, 0).astype(np.float64)
    m = np.asarray(mask, bool)
    n0, n1, n2 = f.shape
    if min(f.shape) < 2:
        return 0.0
    d = np.zeros((n0 - 1, n1 - 1, n2 - 1))
    inside = np.ones_like(d, bool)
    rel2 = np.zeros_like(d)
    rel = None if relative is None else np.asarray(relative, np.float64)
    for i in (0, 1):
        for j in (0, 1):
            for k in (0, 1):
                sl = (slice(i, n0 - 1 + i), slice(j, n1 - 1 + j), slice(k, n2 - 1 + k))
                d += (-1) ** (i + j + k) * f[sl]
                inside &= m[sl]
                if rel is not None:
                    r = rel[sl]
                    inside &= np.isfinite(r) & (r > 0)
                    rel2 += np.where(np.isfinite(r), r, 0.0) ** 2
    z = d[inside] / math.sqrt(8.0)
    if rel is not None:
        z = z / np.sqrt(rel2[inside] / 8.0)
    if z.size == 0:
        return 0.0
    mad = np.median(np.abs(z - np.median(z)))
    return float(1.4826 * mad)


def medi_magnitude(magnitude, combine: str = "first") -> np.ndarray:
    """The 3-D magnitude MEDI uses from a 3-D or 4-D (echoes last) magnitude, float32.

    ``combine="first"`` (default): the first echo, the least T2*-weighted and highest-SNR image;
    ``"rss"``: root sum of squares over echoes (what the toolbox's example scripts form as iMag;
    it mixes the R2* decay of the later echoes into the magnitude edges).
    """
    a = np.asarray(magnitude)
    if a.ndim == 3:
        return a.astype(np.float32, copy=False)
    if a.ndim != 4:
        raise ValueError(f"magnitude: expected a 3-D volume or 4-D echoes (last axis), got shape {a.shape}")
    if combine == "first":
        return np.abs(a[..., 0]).astype(np.float32)
    if combine == "rss":
        return np.sqrt((np.abs(a).astype(np.float64) ** 2).sum(axis=3)).astype(np.float32)
    raise ValueError(f"combine: expected 'first' or 'rss', got {combine!r}")


CSF_R2STAR_THRESHOLD = 5.0   # s⁻¹, the toolbox's default
CSF_RULE_R2STAR = "R2* < 5 1/s, connected regions meeting the central 30 mm sphere (toolbox rule)"
CSF_RULE_MAGNITUDE = "brightest homogeneous central magnitude (fallback: no R2* map)"


def csf_mask_from_r2star(r2star: np.ndarray, mask: np.ndarray, voxel_size, threshold: float = CSF_R2STAR_THRESHOLD,
                         central_radius: float = 30.0, n_central: int = 2) -> np.ndarray:
    """CSF mask for MEDI+0 from an R2* map (s⁻¹), following the toolbox's rule.

    Candidates: mask voxels with R2* < ``threshold`` (NaN never). The ``n_central`` largest
    26-connected candidate components inside the sphere of ``central_radius`` mm around the mask
    centroid seed the selection; the result is every 26-connected candidate component (over the
    whole mask) that meets one of those seeds — the ventricles, not peripheral sulcal CSF. Returns
    a bool array, possibly empty.
    """
    from scipy import ndimage

    vs = check_voxel_size(voxel_size)
    mask = np.asarray(mask, bool)
    r2 = np.asarray(r2star, np.float32)
    if r2.shape != mask.shape:
        raise ValueError(f"r2star: shape {r2.shape} does not match mask shape {mask.shape}")
    with np.errstate(invalid="ignore"):
        cand = mask & np.isfinite(r2) & (r2 < float(threshold))
    if not cand.any():
        return np.zeros_like(mask)
    idx = np.argwhere(mask)
    c0 = idx.mean(0) * vs
    g = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    d2 = sum((gi * v - c) ** 2 for gi, v, c in zip(g, vs, c0))
    central = cand & (d2 <= float(central_radius) ** 2)
    conn = np.ones((3, 3, 3), bool)
    lab_c, nc = ndimage.label(central, structure=conn)
    if nc == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(lab_c.ravel(), minlength=nc + 1)[1:]
    seeds = np.isin(lab_c, 1 + np.argsort(-sizes, kind="stable")[:max(int(n_central), 1)])
    lab, _ = ndimage.label(cand, structure=conn)
    keep = np.unique(lab[seeds])
    keep = keep[keep > 0]
    return np.isin(lab, keep) & mask


def derive_csf_mask(magnitude: Optional[np.ndarray], mask: np.ndarray, voxel_size, wG: Optional[np.ndarray] = None,
                    bright_percentile: float = 90.0, central_fraction: float = 0.35, *,
                    r2star: Optional[np.ndarray] = None) -> np.ndarray:
    """CSF mask for MEDI+0: from R2* when given (:func:`csf_mask_from_r2star`, the toolbox's rule),
    else derived from a (T2*-weighted) magnitude image.

    The toolbox takes connected R2* < 5 s⁻¹ regions near the brain centre; with only a magnitude
    image the analogue used here is: CSF has the longest T2*, hence the brightest GRE magnitude, and is
    homogeneous. Candidates = mask voxels with magnitude ≥ the ``bright_percentile`` percentile of
    the mask, no magnitude edge in any gradient component (w_G), at least 3 mm from the mask
    boundary; keep connected components of ≥ 20 voxels whose centroid lies within
    ``central_fraction`` of the mask's half-extent (per axis, in mm) of the mask centroid (the
    ventricles). Returns a bool array, possibly empty.
    """
    from scipy import ndimage

    if r2star is not None:
        return csf_mask_from_r2star(r2star, mask, voxel_size)
    if magnitude is None:
        raise ValueError("csf: deriving a CSF mask needs an R2* map (r2star=) or a magnitude image")
    vs = check_voxel_size(voxel_size)
    mask = np.asarray(mask, bool)
    mag = np.asarray(magnitude, np.float32)
    thr = np.percentile(mag[mask], bright_percentile)
    cand = mask & (mag >= thr)
    if wG is not None:
        cand &= np.all(wG, axis=0)
    dist = ndimage.distance_transform_edt(mask, sampling=vs)
    cand &= dist >= 3.0
    lab, n = ndimage.label(cand)
    if n == 0:
        return np.zeros_like(mask)
    idx = np.argwhere(mask)
    c0 = idx.mean(0) * vs
    half = (idx.max(0) - idx.min(0) + 1) * vs / 2
    sizes = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
    cents = ndimage.center_of_mass(cand, lab, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    for i, (sz, ct) in enumerate(zip(sizes, cents), start=1):
        if sz >= 20 and np.all(np.abs(np.asarray(ct) * vs - c0) <= central_fraction * half):
            keep[i] = True
    return keep[lab]


# --------------------------------------------------------------------------------------------
# the solver


def _bbox(mask: np.ndarray, margin: int):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _sphere_kernel(pshape, voxel_size, radius, device) -> torch.Tensor:
    """Real rfft spectrum of the normalised sphere (radius mm) centred at the origin of the padded grid."""
    vs = check_voxel_size(voxel_size)
    axes = []
    for n, d in zip(pshape, vs):
        i = np.arange(n)
        i = np.where(i > n // 2, i - n, i) * d
        axes.append(i)
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    sph = (r2 <= radius * radius).astype(np.float32)
    sph /= sph.sum()
    return torch.fft.rfftn(torch.as_tensor(sph, device=device)).real.contiguous()


class _Problem:
    """Tensors and operators of one MEDI problem on the cropped grid (χ in radians)."""

    def __init__(self, f_rad, mask, wG, noise, csf, voxel_size, b0_direction, pad_factor, smv, device,
                 reporter: Reporter, uniform: bool = False):
        self.dev = device
        self.uniform = bool(uniform)
        self.vs = tuple(float(v) for v in voxel_size)
        self.shape = tuple(f_rad.shape)
        self.pshape = fast_shape(self.shape, pad_factor)
        self.rep = reporter
        t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)
        self.D = dipole_kernel(self.pshape, voxel_size, b0_direction, device=device)
        mask_t = t(mask, torch.bool)
        f = t(f_rad) * mask_t
        noise_t = bad = None
        if noise is not None:
            noise_t = t(noise).abs()
            bad = mask_t & ~torch.isfinite(noise_t)     # weight 0 (e.g. magnitude 0 → N_std = ∞)
            fin = noise_t[mask_t & ~bad]
            fill = float(fin.max()) if fin.numel() else 1.0
            noise_t = torch.where(bad, torch.full_like(noise_t, fill), noise_t)
            noise_t = torch.where(mask_t, noise_t, torch.zeros_like(noise_t))
        self.S = None
        if smv > 0:
            self.S = _sphere_kernel(self.pshape, voxel_size, smv, device)
            mask_t = self._conv(mask_t.float(), self.S) > 0.999
            if not mask_t.any():
                raise ValueError(f"smv: a radius of {smv} mm erodes the whole mask; use a smaller radius")
            self.D = self.D * (1.0 - self.S)
            f = (f - self._conv(f, self.S)) * mask_t
            if noise_t is not None:
                noise_t = torch.sqrt(self._conv(noise_t * noise_t, self.S).clamp_min(0) + noise_t * noise_t)
        if noise_t is not None:
            noise_t = torch.where(bad, torch.full_like(noise_t, float("inf")), noise_t)
        self.mask = mask_t
        self.f = f
        self.noise = noise_t          # N_std after SMV (None → uniform)
        self.base_noise = noise_t
        self.merit_flagged = None     # voxels MERIT has down-weighted in the current solve
        self.wG = None if wG is None else t(wG, torch.bool)
        self.csf = None if csf is None else t(csf, torch.bool)
        if self.csf is not None and not self.csf.any():
            self.csf = None
        self.set_weight(noise_t)

    # ---- building blocks
    def _conv(self, x, K):
        X = torch.fft.rfftn(x, s=self.pshape)
        X *= K
        y = torch.fft.irfftn(X, s=self.pshape)
        return y[: self.shape[0], : self.shape[1], : self.shape[2]]

    def Dconv(self, x):
        if getattr(self, "_Dc", None) is None or self._Dc_src is not self.D:
            # complex copy of the real kernel: complex×complex multiplies faster than complex×real in torch
            self._Dc = self.D.to(torch.complex64)
            self._Dc_src = self.D
        return self._conv(x, self._Dc)

    def set_weight(self, noise):
        self.m = data_weight(self.mask, noise, self.uniform)
        self.m2 = self.m * self.m

    def grad(self, x):
        return gradient(x, self.vs)

    def wgrad(self, x):
        g = self.grad(x)
        if self.wG is not None:
            g *= self.wG
        return g

    def lagged_weights(self, x):
        """W = w_G·V·w_G / h² per component, V = 1/√(|w_G∇χ|² + ε) (w_G binary; h the voxel size)."""
        gx = self.wgrad(x)
        W = torch.rsqrt(gx.square_().add_(EPSILON))
        del gx
        if self.wG is not None:
            W.mul_(self.wG)
        for a in range(3):
            if self.vs[a] != 1.0:
                W[a] /= self.vs[a] ** 2
        return W

    def reg_op(self, x, W):
        """∇ᵀ(W' ∘ ∇x) = −div(W' ∘ ∇x) with W' = w_G·V·w_G; ``W`` from :meth:`lagged_weights` (÷h²).

        Unit forward differences d_a (only the n−1 interior ones; the Neumann last one is 0) times
        W_a, then ∇ᵀ: out[i] += u[i−1], out[i] −= u[i]. Equal to ``-divergence(W'·gradient(x))``.
        """
        out = torch.zeros_like(x)
        for a in range(3):
            n = x.shape[a]
            if n < 2:
                continue
            d = x.narrow(a, 1, n - 1) - x.narrow(a, 0, n - 1)
            d *= W[a].narrow(a, 0, n - 1)
            out.narrow(a, 1, n - 1).add_(d)
            out.narrow(a, 0, n - 1).sub_(d)
        return out

    def csf_op(self, x):
        """P x = M_CSF (x − mean_CSF x)."""
        mu = x[self.csf].mean()
        return (x - mu) * self.csf

    def costs(self, x, Dx=None):
        if Dx is None:
            Dx = self.Dconv(x)
        reg = float(self.wgrad(x).abs_().sum(dtype=torch.float64))
        data = float((self.m2 * (2.0 - 2.0 * torch.cos(Dx - self.f))).sum(dtype=torch.float64))
        return reg, data

    def noise_energy(self, sigma):
        """E_noise = Σ m² (2 − 2 e^{−σ²/2}) with σ (rad) a tensor or a scalar."""
        if not torch.is_tensor(sigma):
            sigma = torch.full_like(self.m, float(sigma))
        e = self.m2 * (2.0 - 2.0 * torch.exp(-0.5 * sigma * sigma))
        return float(e[self.mask].sum(dtype=torch.float64))

    # ---- conjugate gradients
    def cg(self, A, b, tol, max_iter, label):
        x = torch.zeros_like(b)
        r = b.clone()
        d = r.clone()
        delta = float(torch.dot(r.reshape(-1), r.reshape(-1)))
        delta0 = delta
        it = 0
        if delta0 == 0.0:
            return x, 0, 0.0
        while it < max_iter and delta > tol * tol * delta0:
            q = A(d)
            dq = float(torch.dot(d.reshape(-1), q.reshape(-1)))
            if not dq > 0:
                break
            alpha = delta / dq
            x.add_(d, alpha=alpha)
            r.sub_(q, alpha=alpha)
            old = delta
            delta = float(torch.dot(r.reshape(-1), r.reshape(-1)))
            d.mul_(delta / old).add_(r)
            it += 1
            self.rep.cg_report(it, math.sqrt(delta / delta0), label)
        return x, it, math.sqrt(delta / delta0)

    # ---- one Gauss-Newton solve
    def reset_weights(self):
        """Undo MERIT's updates: the data weights of the input noise map (what a fresh problem has)."""
        if self.noise is not self.base_noise:
            self.noise = self.base_noise
            self.set_weight(self.base_noise)
        self.merit_flagged = None

    def solve(self, lam, lambda_csf, x0, *, cg_tol, cg_max_iter, max_iter, tol_norm_ratio, merit, label=""):
        self.reset_weights()
        x = torch.zeros(self.shape, dtype=torch.float32, device=self.dev) if x0 is None else x0.clone()
        hist = {"norm_ratio": [], "cost": [], "cost_reg": [], "cost_data": [], "cg_iters": [], "cg_residual": []}
        use_csf = self.csf is not None and lambda_csf > 0
        ratio = math.inf
        it = 0
        Dx = None  # D∗χ of the current χ (kept from the cost evaluation of the previous step)
        while ratio > tol_norm_ratio and it < max_iter:
            it += 1
            W = self.lagged_weights(x)
            if Dx is None:
                Dx = self.Dconv(x)
            b = self.reg_op(x, W)
            b += self.Dconv(self.m2 * torch.sin(Dx - self.f)).mul_(2.0 * lam)
            if use_csf:
                b += self.csf_op(x).mul_(lambda_csf)
            del Dx

            m2s = self.m2 * (2.0 * lam)

            def A(p):
                out = self.reg_op(p, W)
                out += self.Dconv(m2s * self.Dconv(p))
                if use_csf:
                    out += self.csf_op(p).mul_(lambda_csf)
                return out

            self.rep.gn = it
            dx, cg_it, cg_res = self.cg(A, b.neg_(), cg_tol, cg_max_iter, label)
            del b, W, A, m2s
            nx = float(torch.linalg.vector_norm(x))
            ndx = float(torch.linalg.vector_norm(dx))
            ratio = ndx / nx if nx > 0 else math.inf
            x += dx
            del dx
            Dx = self.Dconv(x)
            reg, data = self.costs(x, Dx)
            if use_csf:
                pc = self.csf_op(x)
                reg_csf = 0.5 * lambda_csf * float((pc * pc).sum(dtype=torch.float64))
            else:
                reg_csf = 0.0
            cost = reg + lam * data + reg_csf
            for k, v in (("norm_ratio", ratio), ("cost", cost), ("cost_reg", reg), ("cost_data", data),
                         ("cg_iters", cg_it), ("cg_residual", cg_res)):
                hist[k].append(v)
            if merit:
                self._merit(Dx)
            self.rep.gn_report(it, max_iter, ratio, cost, reg, data, x, label)
        hist["gn_iters"] = it
        if merit:
            hist["merit_voxels"] = 0 if self.merit_flagged is None else int(self.merit_flagged.sum())
        return x, hist

    def _merit(self, Dx):
        """Toolbox MERIT: inflate N_std where the demeaned residual exceeds 6 std."""
        wres = self.m * torch.exp(1j * Dx) - self.m * torch.exp(1j * self.f)
        inside = self.mask
        wres = wres - wres[inside].mean()
        factor = 6.0 * float(wres[inside].abs().std())
        if not factor > 0:
            return
        scale = (wres.abs() / factor).clamp_min(1.0)
        flagged = (scale > 1.0) & inside
        self.merit_flagged = flagged if self.merit_flagged is None else (self.merit_flagged | flagged)
        base = self.noise if self.noise is not None else self.mask.float()
        # the toolbox updates its N_std before SMV and re-applies SMV; with the SMV-transformed map
        # stored here the update is applied to it directly (the same up to the SMV smoothing of N²)
        noise = torch.where(inside, base * scale * scale, base)
        self.noise = noise
        self.set_weight(noise)


class _MEDIReporter(Reporter):
    """Progress after every CG iteration (residual) and every GN iteration (costs, preview)."""

    def __init__(self, progress, cancel, total, to_ppm=None):
        super().__init__(progress, cancel, total=total, stage="MEDI")
        self.gn = 0
        self.cg_total = 0
        self.to_ppm = to_ppm
        self.last = {}

    def cg_report(self, it, res, label):
        self.cg_total += 1
        self(self.gn - 1, f"MEDI{label} GN {self.gn}/{self.total}, CG {it}", cg_residual=res, **self.last)

    def gn_report(self, it, max_iter, ratio, cost, reg, data, x, label):
        self.last = {"cost": cost}
        preview = self.to_ppm(x) if (self.progress is not None and self.to_ppm is not None) else None
        self(it, f"MEDI{label} GN {it}/{max_iter} done: ‖dχ‖/‖χ‖={ratio:.3g}", preview=preview,
             cost=cost, cost_reg=reg, cost_data=data, norm_ratio=ratio)


def medi_l1(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, magnitude=None, noise_std=None,
            r2star=None, lam=1000.0, percentage=0.9, smv=0.0, merit=False, csf_mask=None, csf="off", lambda_csf=100.0,
            data_weighting="auto", edge_mask=True, cg_tol=0.01, cg_max_iter=100, max_iter=10,
            tol_norm_ratio=0.1, delta_te=DEFAULT_DELTA_TE, b0_tesla=None, pad_factor=1.25, auto_rule="upre",
            discrepancy=1.0, auto_max_solves=5, device="cpu", progress=None, cancel=None, return_info=False):
    """MEDI-L1 on numpy arrays (field in ppm → χ in ppm, float32). See the module docstring.

    ``lam``: a number or "auto". ``csf_mask``: optional bool array (MEDI+0 on when given; it always
    wins); ``csf="auto"`` derives one (:func:`derive_csf_mask`): from ``r2star`` (s⁻¹) when given,
    else from the magnitude; ``info["csf_rule"]`` says which. ``magnitude`` may be 4-D (echoes
    last): the first echo is used (:func:`medi_magnitude`). Returns χ, or
    (χ, info) with ``return_info`` (history per GN iteration, λ used, thresholds, λ search).
    """
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    field = np.asarray(field, np.float32)
    mask = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    vs = tuple(float(v) for v in check_voxel_size(voxel_size))
    b0 = unit_vector(b0_direction)
    if field.ndim != 3:
        raise ValueError(f"field: expected a 3-D volume, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match field shape {field.shape}")
    if not mask.any():
        raise ValueError("mask: empty; expected a brain mask with at least one voxel")
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("field: NaN or Inf inside the mask")
    if magnitude is not None:
        if np.ndim(magnitude) == 4:
            magnitude = medi_magnitude(magnitude, "first")
        magnitude = np.asarray(magnitude, np.float32)
        if magnitude.shape != field.shape:
            raise ValueError(f"magnitude: shape {magnitude.shape} does not match field shape {field.shape}")
        if not np.all(np.isfinite(magnitude[mask])):
            raise ValueError("magnitude: NaN or Inf inside the mask")
        if not np.any(magnitude[mask] != 0):
            raise ValueError("magnitude: all zero inside the mask; MEDI needs a real magnitude image "
                             "(or pass no magnitude and set edge_mask=false)")
    if r2star is not None:
        r2star = np.asarray(r2star, np.float32)
        if r2star.shape != field.shape:
            raise ValueError(f"r2star: shape {r2star.shape} does not match field shape {field.shape}")
    needs_mag = edge_mask or (csf == "auto" and csf_mask is None and r2star is None)
    if needs_mag and magnitude is None:
        what = "gradient mask (edge_mask=true)" if edge_mask else "CSF mask derivation (csf=auto)"
        raise ValueError(f"magnitude: MEDI's {what} needs a magnitude image; pass magnitude= (--magnitude), "
                         "or set edge_mask=false / csf=off")
    if noise_std is not None:
        noise_std = np.asarray(noise_std, np.float32)
        if noise_std.ndim == 0:
            noise_std = np.full(field.shape, float(noise_std), np.float32)
        if noise_std.shape != field.shape:
            raise ValueError(f"noise_std: shape {noise_std.shape} does not match field shape {field.shape}")
    if csf_mask is not None:
        csf_mask = np.asarray(csf_mask, bool)
        if csf_mask.shape != field.shape:
            raise ValueError(f"csf_mask: shape {csf_mask.shape} does not match field shape {field.shape}")
    auto = isinstance(lam, str)
    if auto and lam.lower() != "auto":
        raise ValueError(f"lambda: expected a positive number or 'auto', got {lam!r}")
    if not auto and not (float(lam) > 0):
        raise ValueError(f"lambda: expected a positive number or 'auto', got {lam!r}")

    s = phase_scale(delta_te, b0_tesla)
    rep = _MEDIReporter(progress, cancel, total=max_iter)
    check_cancel(cancel)

    # crop to the mask bounding box (+ margin): χ is estimated there (free outside the mask, as in
    # the toolbox), the FFT grid is pad_factor × that box.
    margin = 4 + (int(math.ceil(smv / min(vs))) if smv > 0 else 0)
    uniform = data_weighting == "uniform"
    # toolbox mode 0: m = 1 over the whole field of view, so the problem is the whole field of view
    box = tuple(slice(0, n) for n in field.shape) if uniform else _bbox(mask, margin)
    mask_c = mask[box]
    f_c = np.where(mask_c, field[box], 0.0).astype(np.float32) * s
    mag_c = None if magnitude is None else magnitude[box]

    # data weighting: N_std (arbitrary units for m; ppm when known, for lambda=auto)
    noise_kind = "uniform"
    noise_c = None
    if data_weighting == "auto":
        if noise_std is not None:
            noise_c = noise_std[box]
            noise_kind = "noise_std"
        elif magnitude is not None:
            with np.errstate(divide="ignore"):
                noise_c = np.where(mag_c > 0, 1.0 / np.abs(mag_c), np.inf).astype(np.float32)
            noise_kind = "1/magnitude"
    if uniform:
        noise_kind = "uniform (1 over the field of view)"
    info = {"phase_scale_rad_per_ppm": s, "data_weighting": noise_kind, "crop": [[b.start, b.stop] for b in box]}

    # the problem first: with SMV its mask is the eroded one, on which the gradient mask is built
    prob = _Problem(f_c, mask_c, None, noise_c, None, vs, b0, pad_factor, smv, dev, rep, uniform=uniform)
    info["fft_shape"] = list(prob.pshape)
    wG = None
    if edge_mask:
        mt = torch.as_tensor(mag_c, device=dev)
        wG_t, thr = gradient_mask(mt, prob.mask.float(), vs, percentage)
        info["gradient_threshold"] = thr
        info["edge_share"] = float(1.0 - wG_t[:, prob.mask].float().mean())
        prob.wG = wG_t
        wG = wG_t.cpu().numpy()
        del mt
    check_cancel(cancel)

    csf_c = None
    if csf_mask is not None:
        csf_c = csf_mask[box] & mask_c
        info["csf_source"] = "given"
        info["csf_rule"] = "given (csf_mask)"
    elif csf == "auto":
        r2_c = None if r2star is None else r2star[box]
        csf_c = derive_csf_mask(mag_c, mask_c, vs, wG, r2star=r2_c)
        info["csf_source"] = "derived from R2*" if r2_c is not None else "derived from magnitude"
        info["csf_rule"] = CSF_RULE_R2STAR if r2_c is not None else CSF_RULE_MAGNITUDE
        if not csf_c.any():
            what = ("no R2* < 5 1/s region near the brain centre" if r2_c is not None
                    else "no bright homogeneous central region in the magnitude")
            raise ValueError(f"csf: could not derive a CSF mask ({what}); supply csf_mask= or set csf=off")
    if csf_c is not None:
        info["csf_voxels"] = int(csf_c.sum())
        prob.csf = torch.as_tensor(np.ascontiguousarray(csf_c), dtype=torch.bool, device=dev)
        if not prob.csf.any():
            prob.csf = None
    rep.to_ppm = lambda x: _to_full(x, prob, s, box, field.shape)
    kw = dict(cg_tol=cg_tol, cg_max_iter=cg_max_iter, max_iter=max_iter, tol_norm_ratio=tol_norm_ratio, merit=merit)
    lcsf = float(lambda_csf) if csf_c is not None else 0.0

    if not auto:
        x, hist = prob.solve(float(lam), lcsf, None, **kw)
        info["lambda"] = float(lam)
    else:
        sigma = _noise_sigma_rad(prob, "noise_std" if noise_std is not None else noise_kind, noise_std, magnitude,
                                 field, mask, box, s, smv)
        if auto_rule == "upre":
            x, hist, search = _auto_lambda_upre(prob, lcsf, sigma, auto_max_solves, kw)
        elif auto_rule == "discrepancy":
            x, hist, search = _auto_lambda(prob, lcsf, sigma, discrepancy, auto_max_solves, kw)
        else:
            raise ValueError(f"auto_rule: expected 'upre' or 'discrepancy', got {auto_rule!r}")
        info["lambda"] = search["lambda"]
        info["lambda_search"] = search
    info["history"] = hist
    if merit:
        info["merit_voxels"] = hist.get("merit_voxels", 0)
    reg, data = prob.costs(x)
    info["residual"] = data
    chi = _to_full(x, prob, s, box, field.shape)
    if csf_c is not None:
        inside = prob.mask.cpu().numpy()
        ref = float(chi[box][csf_c & inside].mean()) if (csf_c & inside).any() else 0.0
        full_in = np.zeros(field.shape, bool)
        full_in[box] = inside
        chi[full_in] -= ref
        info["csf_reference_ppm"] = ref
    if smv > 0:
        em = np.zeros(field.shape, bool)
        em[box] = prob.mask.cpu().numpy()
        info["mask"] = em
    return (chi, info) if return_info else chi


def _to_full(x, prob, s, box, shape):
    out = np.zeros(shape, np.float32)
    out[box] = ((x * prob.mask) / s).cpu().numpy()
    return out


def _noise_sigma_rad(prob, kind, noise_std, magnitude, field, mask, box, s, smv):
    """Per-voxel phase-noise σ (rad, cropped grid tensor) for lambda=auto (UPRE or discrepancy)."""
    if kind == "noise_std":
        sig = np.abs(noise_std[box]).astype(np.float32) * s
    else:
        rel = None
        if magnitude is not None:
            with np.errstate(divide="ignore"):
                rel = np.where(magnitude > 0, 1.0 / np.abs(magnitude), np.inf)
        c = estimate_noise_scale(field, mask, rel)
        sig = (c * (rel[box] if rel is not None else np.ones(prob.shape))).astype(np.float32) * s
    t = torch.as_tensor(np.where(np.isfinite(sig), sig, 0.0).astype(np.float32), device=prob.dev)
    if smv > 0 and prob.S is not None:
        t = torch.sqrt(prob._conv(t * t, prob.S).clamp_min(0) + t * t)
    return t


def _trace_KH(prob, lam, lcsf, x, kappa, tol=0.05, max_iter=40, seed=0):
    """Hutchinson estimate of tr(K·H), H = 2λ M D A⁻¹ Dᵀ M the influence matrix of the linearised
    problem at χ (A = ∇ᵀ w_G V w_G ∇ + 2λ Dᵀ M² D [+ λ_CSF P], lagged weights V of χ), K = diag(κ) the
    noise variance of the weighted data: z Rademacher, v = Dᵀ(M √κ z), tr ≈ 2λ vᵀ A⁻¹ v (one CG solve;
    the quadratic form converges much faster than the solution, hence the loose tolerance).
    """
    W = prob.lagged_weights(x)
    use_csf = prob.csf is not None and lcsf > 0

    def A(p):
        out = prob.reg_op(p, W)
        out += prob.Dconv(prob.m2 * prob.Dconv(p)).mul_(2.0 * lam)
        if use_csf:
            out += prob.csf_op(p).mul_(lcsf)
        return out

    g = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randint(0, 2, prob.shape, generator=g, dtype=torch.int8).to(prob.dev, torch.float32) * 2 - 1)
    v = prob.Dconv(prob.m * torch.sqrt(kappa) * z)
    y, it, _ = prob.cg(A, v, tol, max_iter, f" λ={lam:.3g} trace")
    return 2.0 * lam * float(torch.dot(v.reshape(-1), y.reshape(-1))), it


def _auto_lambda_upre(prob, lcsf, sigma, max_solves, kw):
    """λ minimising the unbiased predictive-risk estimate U(λ) = R(λ) + 2·tr(K·H_λ) − Σκ.

    R is the weighted data residual, κ_v = m_v²σ_v² the weighted noise variance (phase noise σ_v in
    radians) and H_λ the influence matrix of the problem linearised at χ_λ (trace by Hutchinson, one
    probe: with ~10⁵–10⁶ voxels its relative error is < 1 %). U estimates E‖m∘(D∗(χ_λ − χ_true))‖²
    (Mallows' C_p / Stein's risk for the weighted data). Search in log λ from 1000 with factor-2 steps
    until the minimum is bracketed, then a parabola through the best three points gives λ*, which is
    solved and evaluated too when the budget allows. Every solve starts from χ = 0 with the plain
    run's stopping rule, so all λ are compared at the same convergence and the returned χ is the
    from-zero solve of the returned λ (what ``lambda=<λ>`` gives).
    """
    prob.reset_weights()
    kappa = prob.m2 * (2.0 - 2.0 * torch.exp(-0.5 * sigma * sigma))
    kappa = torch.where(prob.mask, kappa, torch.zeros_like(kappa))
    e_noise = float(kappa.sum(dtype=torch.float64))
    if not e_noise > 0:
        raise ValueError("lambda=auto: the expected noise energy is zero (no noise information); give a number")
    evals = {}   # log λ -> dict
    best = {}    # the evaluation with the lowest U so far, with its χ (only that χ is kept)

    def evaluate(lam):
        x, hist = prob.solve(lam, lcsf, None, label=f" λ={lam:.3g}", **kw)
        prob.reset_weights()          # R and the trace with the weights κ refers to
        _, R = prob.costs(x)
        tr, tr_it = _trace_KH(prob, lam, lcsf, x, kappa)
        U = R + 2.0 * tr - e_noise
        e = {"lambda": lam, "residual": R, "trace": tr, "upre": U, "gn_iters": hist["gn_iters"],
             "cg_iters": sum(hist["cg_iters"]) + tr_it}
        evals[math.log(lam)] = e
        if not best or U < best["upre"]:
            best.clear()
            best.update(e, x=x, hist=hist)
        return e

    grid = lambda k: 1000.0 * 2.0 ** k     # the coarse grid, exact powers of two times 1000
    kmin = kmax = 0
    evaluate(grid(0))
    solves = 1
    if solves < max_solves:
        kmax = 1
        evaluate(grid(1))
        solves += 1
    while solves < max_solves:             # bracket the minimum; a parabola solve uses what budget is left
        keys = sorted(evals)
        lbest = min(keys, key=lambda t: evals[t]["upre"])
        if lbest == keys[0]:
            kmin -= 1
            evaluate(grid(kmin))
        elif lbest == keys[-1]:
            kmax += 1
            evaluate(grid(kmax))
        else:
            break
        solves += 1
    keys = sorted(evals)
    lbest = min(keys, key=lambda t: evals[t]["upre"])
    i = keys.index(lbest)
    if 0 < i < len(keys) - 1 and solves < max_solves:  # bracketed: parabola through (log λ, U) of the best three
        (a, fa), (b, fb), (c, fc) = [(k, evals[k]["upre"]) for k in keys[i - 1:i + 2]]
        den = (b - a) * (fb - fc) - (b - c) * (fb - fa)
        if den != 0:
            ls = b - 0.5 * ((b - a) ** 2 * (fb - fc) - (b - c) ** 2 * (fb - fa)) / den
            ls = min(max(ls, a), c)
            if abs(ls - b) > math.log(1.15):
                evaluate(math.exp(ls))
                solves += 1
    search = {"rule": "upre", "lambda": best["lambda"], "noise_energy": e_noise,
              "tried": [dict(evals[t]) for t in sorted(evals)]}
    return best["x"], best["hist"], search


def _auto_lambda(prob, lcsf, sigma, tau, max_solves, kw):
    """Discrepancy principle: find λ with R(λ) = τ·E_noise by secant steps in log-log; each λ solved
    from χ = 0 (so the returned χ is what ``lambda=<λ>`` gives)."""
    prob.reset_weights()
    target = tau * prob.noise_energy(sigma)
    if not target > 0:
        raise ValueError("lambda=auto: the expected noise energy is zero (no noise information); give a number")
    lam = 1000.0
    tried = []  # (log λ, log R/target)
    best = None
    for k in range(max_solves):
        x, hist = prob.solve(lam, lcsf, None, label=f" λ={lam:.3g}", **kw)
        prob.reset_weights()
        _, R = prob.costs(x)
        g = math.log(max(R, 1e-30) / target)
        tried.append((math.log(lam), g, R, hist["gn_iters"], sum(hist["cg_iters"])))
        if best is None or abs(g) < abs(best[1]):
            best = (lam, g, x, hist)
        del x
        if abs(g) < math.log(1.1) or k == max_solves - 1:
            break
        # next λ: secant through the two nearest points that bracket or the last two; slope < 0
        if len(tried) == 1:
            slope = -1.0
        else:
            (l1, g1, *_), (l2, g2, *_) = tried[-2], tried[-1]
            slope = (g2 - g1) / (l2 - l1) if l2 != l1 else -1.0
            if not slope < -0.05:
                slope = -1.0
        lo = [t for t in tried if t[1] > 0]   # residual too large → λ too small
        hi = [t for t in tried if t[1] < 0]
        step = -g / slope
        step = max(-math.log(30.0), min(math.log(30.0), step))
        nl = math.log(lam) + step
        if lo and hi:  # keep inside the bracket
            a = max(t[0] for t in lo)
            b = min(t[0] for t in hi)
            if not (a < nl < b):
                nl = 0.5 * (a + b)
        lam = math.exp(nl)
    lam_b, g_b, x_b, hist_b = best
    search = {"rule": "discrepancy", "lambda": lam_b, "target_residual": target, "tau": tau,
              "tried": [{"lambda": math.exp(t[0]), "residual": t[2], "log_ratio": t[1], "gn_iters": t[3],
                         "cg_iters": t[4]} for t in tried]}
    return x_b, hist_b, search


def _run(scan, p: MEDIParams, *, device, progress=None, cancel=None, csf_mask=None, **_):
    chi, info = medi_l1(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, magnitude=scan.magnitude,
                        noise_std=getattr(scan, "noise_std", None), r2star=getattr(scan, "r2star", None),
                        lam=p.lam, percentage=p.percentage,
                        smv=p.smv, merit=p.merit, csf_mask=csf_mask, csf=p.csf, lambda_csf=p.lambda_csf,
                        data_weighting=p.data_weighting, edge_mask=p.edge_mask, cg_tol=p.cg_tol,
                        cg_max_iter=p.cg_max_iter, max_iter=p.max_iter, tol_norm_ratio=p.tol_norm_ratio,
                        delta_te=p.delta_te, b0_tesla=getattr(scan, "b0_tesla", None), pad_factor=p.pad_factor,
                        auto_rule=p.auto_rule, discrepancy=p.discrepancy, auto_max_solves=p.auto_max_solves, device=device,
                        progress=progress, cancel=cancel, return_info=True)
    hist = info["history"]
    extras = {"lambda": info["lambda"], "gn_iterations": hist["gn_iters"], "cg_iterations": list(hist["cg_iters"]),
              "cost": list(hist["cost"]), "norm_ratio": list(hist["norm_ratio"]),
              "data_residual": info["residual"], "phase_scale_rad_per_ppm": info["phase_scale_rad_per_ppm"],
              "data_weighting": info["data_weighting"], "fft_shape": info["fft_shape"]}
    for k in ("gradient_threshold", "edge_share", "csf_voxels", "csf_source", "csf_rule", "csf_reference_ppm",
              "merit_voxels"):
        if k in info:
            extras[k] = info[k]
    if "lambda_search" in info:
        extras["lambda_search"] = info["lambda_search"]
    if "mask" in info:
        extras["mask"] = info["mask"]
    return {"chi": chi, "extras": extras}


METHODS = (Method(
    "medi", "MEDI-L1", MEDIParams, _run, order=20, short="MEDI λ={lambda}", uses_magnitude=True, long_running=True,
    doc="Morphology enabled dipole inversion (Cornell MEDI_L1 semantics): L1 of the gradient outside magnitude "
        "edges + λ·nonlinear data fidelity, Gauss-Newton with CG. lambda=auto picks λ by UPRE "
        "(or the discrepancy principle with auto_rule=discrepancy)."),)
