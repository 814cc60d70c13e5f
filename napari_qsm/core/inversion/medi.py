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
  ``weak_harmonic`` (WH-QSM's model, Milovic et al. 2019, in MEDI's cost): f = D∗χ + φ with a
  residual background φ penalised by λβ‖M∇²φ‖², solved with χ in the same Gauss-Newton/CG
  (:mod:`~.medi_harmonic`); for local fields with background-removal remnants. The record's default
  ``"auto"`` turns it on for a local field made by this package's background removal, as ``scan.source``
  records it (:func:`weak_harmonic_for`), else off.
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
(D p, then Dᵀ(2λm²·D p)) plus the finite differences; one GN step adds two more. The inverse FFTs
are pruned to the box (the transforms along the last two axes skip the padding rows the crop drops).
On a 2 mm phantom the NRMSE at λ = 1000 was 15.1 % (pad 1.0), 14.6 % (1.25), 14.6 % (1.5) and 14.6 %
(2.0), so the default is 1.25 (half the FFT volume of 1.5). On the honest 1 mm head (box
140×156×137) pad 1.0 / 1.1 / 1.25 give FFT grids of 144×160×144 / 160×180×160 / 180×200×180 and
NRMSE 19.40 / 18.94 / 18.80 % (``docs/benchmarks/medi_speed.md``); 1.1 costs about 30 % less.

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

Automatic λ: :mod:`napari_qsm.core.inversion.medi_lambda`.

Progress: one record per Gauss-Newton step (step k of ``max_iter``: ‖dχ‖/‖χ‖, cost, CG iterations, seconds, ETA),
then "converged at GN k, ratio r" or "stopped at max iterations" (:class:`~.medi_solver.GNReporter`); the solver
itself (finite differences, weights, Gauss-Newton/CG) is :mod:`napari_qsm.core.inversion.medi_solver`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .admm import check_inputs
from ..constants import GAMMA_BAR_MHZ_PER_T
from ..dipole import check_voxel_size, unit_vector
from ..method import Method
from ..params import ON_OFF_ALIASES, param
from ..progress import check_cancel
from .medi_lambda import discrepancy_lambda, noise_sigma_rad, upre_lambda
from .admm import bbox
from .medi_solver import (EPSILON, GNReporter, Problem, data_weight, divergence, gradient,  # noqa: F401
                          gradient_mask)
from .medi_lambda import estimate_noise_scale  # noqa: F401  (public, re-exported)
from .medi_harmonic import WeakHarmonic

DEFAULT_B0_TESLA = 3.0
DEFAULT_DELTA_TE = 0.005


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
    weak_harmonic: str = param("auto", "weak-harmonic MEDI (after WH-QSM, Milovic 2019): also fit a residual "
                               "background field φ with ‖M∇²φ‖² small. auto: on for a local field made by this "
                               "package's background removal (its boundary loses part of the local field, φ gives "
                               "it back), off for any other field and with lambda=auto by UPRE; on/off (or "
                               "true/false) force it", choices=("auto", "on", "off"),
                               aliases=ON_OFF_ALIASES)
    beta: float = param(150.0, "weak_harmonic: β, the weight of λ‖M∇²φ‖² relative to the data term (WH-QSM's 150)",
                        min=1e-6, max=1e8, short="β")



def phase_scale(delta_te: float = DEFAULT_DELTA_TE, b0_tesla: Optional[float] = None) -> float:
    """s = 2π·ΔTE·γ̄·B0 (rad per ppm): the toolbox's radians = s × ppm."""
    b0 = DEFAULT_B0_TESLA if b0_tesla is None else float(b0_tesla)
    return 2.0 * math.pi * float(delta_te) * GAMMA_BAR_MHZ_PER_T * b0



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


def medi_l1(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, magnitude=None, noise_std=None,
            r2star=None, lam=1000.0, percentage=0.9, smv=0.0, merit=False, csf_mask=None, csf="off", lambda_csf=100.0,
            data_weighting="auto", edge_mask=True, cg_tol=0.01, cg_max_iter=100, max_iter=10,
            tol_norm_ratio=0.1, delta_te=DEFAULT_DELTA_TE, b0_tesla=None, pad_factor=1.25, auto_rule="upre",
            discrepancy=1.0, auto_max_solves=5, weak_harmonic=False, beta=150.0, device="cpu", progress=None,
            cancel=None, return_info=False):
    """MEDI-L1 on numpy arrays (field in ppm → χ in ppm, float32). See the module docstring.

    ``lam``: a number or "auto". ``csf_mask``: optional bool array (MEDI+0 on when given; it always
    wins); ``csf="auto"`` derives one (:func:`derive_csf_mask`): from ``r2star`` (s⁻¹) when given,
    else from the magnitude; ``info["csf_rule"]`` says which. ``magnitude`` may be 4-D (echoes
    last): the first echo is used (:func:`medi_magnitude`). ``weak_harmonic``: also fit a residual
    background φ penalised by λβ‖M∇²φ‖² (:mod:`~.medi_harmonic`, after Milovic et al. 2019); φ in
    ppm is ``info["harmonic_field"]``. Returns χ, or (χ, info) with ``return_info`` (history per GN
    iteration, λ used, thresholds, λ search).

    References
    ----------
    Liu T et al. Morphology enabled dipole inversion (MEDI) from a single-angle acquisition. MRM
    2011;66:777-783. Milovic C et al. Weak-harmonic regularization for quantitative susceptibility
    mapping. MRM 2019;81:1399-1411 (``weak_harmonic``).
    """
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    mask = np.asarray(mask) > 0.5 if np.asarray(mask).dtype != bool else np.asarray(mask)
    field, mask = check_inputs(field, mask)  # shape, empty mask, NaN/Inf: the errors every inversion gives
    vs = tuple(float(v) for v in check_voxel_size(voxel_size))
    b0 = unit_vector(b0_direction)
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
    if weak_harmonic and auto and auto_rule == "upre":
        raise ValueError("lambda=auto with weak_harmonic: UPRE's trace is derived for χ alone; "
                         "use auto_rule=discrepancy or a numeric lambda")

    s = phase_scale(delta_te, b0_tesla)
    rep = GNReporter(progress, cancel, total=max_iter)
    check_cancel(cancel)

    # crop to the mask bounding box (+ margin): χ is estimated there (free outside the mask, as in
    # the toolbox), the FFT grid is pad_factor × that box.
    margin = 4 + (int(math.ceil(smv / min(vs))) if smv > 0 else 0)
    uniform = data_weighting == "uniform"
    # toolbox mode 0: m = 1 over the whole field of view, so the problem is the whole field of view
    box = tuple(slice(0, n) for n in field.shape) if uniform else bbox(mask, margin)
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
    prob = Problem(f_c, mask_c, None, noise_c, None, vs, b0, pad_factor, smv, dev, rep, uniform=uniform)
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
    if weak_harmonic:
        prob.wh = WeakHarmonic(prob, beta)
    rep.to_ppm = lambda x: _to_full(x, prob, s, box, field.shape)
    kw = dict(cg_tol=cg_tol, cg_max_iter=cg_max_iter, max_iter=max_iter, tol_norm_ratio=tol_norm_ratio, merit=merit)
    lcsf = float(lambda_csf) if csf_c is not None else 0.0

    if not auto:
        x, hist = prob.solve(float(lam), lcsf, None, **kw)
        info["lambda"] = float(lam)
    else:
        sigma = noise_sigma_rad(prob, "noise_std" if noise_std is not None else noise_kind, noise_std, magnitude,
                                 field, mask, box, s, smv)
        if auto_rule == "upre":
            x, hist, search = upre_lambda(prob, lcsf, sigma, auto_max_solves, kw)
        elif auto_rule == "discrepancy":
            x, hist, search = discrepancy_lambda(prob, lcsf, sigma, discrepancy, auto_max_solves, kw)
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
    if prob.wh is not None:
        info["harmonic_field"] = _to_full(prob.wh.phi, prob, s, box, field.shape)
        info["harmonic_cost"] = prob.wh.cost()
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


def background_removal_of(scan) -> Optional[str]:
    """The name of this package's background-removal step that made ``scan``'s local field, or None.

    The fact travels in ``scan.source``: ``"field_steps"`` (:func:`napari_qsm.core.field.pipeline.local_field`,
    in process) or ``"field_facts"["BackgroundRemoval"]`` (the JSON sidecar of ``napari-qsm field``'s
    local_field.nii.gz read by :func:`napari_qsm.core.io.load_scan`, or a Field-dock layer's metadata).
    """
    src = getattr(scan, "source", None) or {}
    for step in src.get("field_steps") or ():
        if isinstance(step, dict) and step.get("family") == "background" and step.get("name"):
            return str(step["name"])
    name = (src.get("field_facts") or {}).get("BackgroundRemoval")
    return str(name) if name else None


def _step_label(name: str) -> str:
    try:   # the step's label ("LBV") when it is a shipped step; lazily: core.field is not needed otherwise
        from ..field.pipeline import find_step
        return find_step("background", name).label
    except Exception:  # noqa: BLE001 - a third-party or renamed step: its name
        return name


def weak_harmonic_for(scan, p: MEDIParams) -> tuple[bool, str]:
    """Whether MEDI fits the residual background φ (``weak_harmonic``) for ``scan``, and why.

    Parameters
    ----------
    scan : Scan
        Its ``source`` tells whether the local field came from this package's background removal
        (:func:`background_removal_of`).
    p : MEDIParams
        ``weak_harmonic``: "on" / "off" force it; "auto" is on for a local field from this package's
        background removal (its boundary takes the harmonic part of the local field near the mask edge, which
        φ gives back: 7–18 points of demeaned NRMSE on the chain's fields, docs/benchmarks/field.md), off for
        any other field (on a field without that loss φ costs 1–10 points), and off when ``lambda=auto``
        uses UPRE (its trace is derived for χ alone).

    Returns
    -------
    (bool, str)
        The decision and a reason for the provenance, e.g. "auto → on: local field from LBV (this
        package's background removal)".

    References
    ----------
    Milovic C et al. Weak-harmonic regularization for quantitative susceptibility mapping. MRM 2019;81:1399-1411.
    """
    mode = p.weak_harmonic
    if mode in ("on", "off"):
        return mode == "on", f"{mode} (given)"
    if mode != "auto":
        raise ValueError(f"weak_harmonic: expected auto, on or off, got {mode!r}")
    step = background_removal_of(scan)
    if step is None:
        return False, "auto → off: the local field's origin is not this package's background removal"
    if isinstance(p.lam, str) and p.auto_rule == "upre":
        return False, (f"auto → off: lambda=auto with UPRE (its trace is derived for χ alone), although the local "
                       f"field is from {_step_label(step)}; use auto_rule=discrepancy or a numeric lambda for φ")
    return True, f"auto → on: local field from {_step_label(step)} (this package's background removal)"


def _run(scan, p: MEDIParams, *, device, progress=None, cancel=None, csf_mask=None, **_):
    wh, wh_reason = weak_harmonic_for(scan, p)
    chi, info = medi_l1(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, magnitude=scan.magnitude,
                        noise_std=getattr(scan, "noise_std", None), r2star=getattr(scan, "r2star", None),
                        lam=p.lam, percentage=p.percentage,
                        smv=p.smv, merit=p.merit, csf_mask=csf_mask, csf=p.csf, lambda_csf=p.lambda_csf,
                        data_weighting=p.data_weighting, edge_mask=p.edge_mask, cg_tol=p.cg_tol,
                        cg_max_iter=p.cg_max_iter, max_iter=p.max_iter, tol_norm_ratio=p.tol_norm_ratio,
                        delta_te=p.delta_te, b0_tesla=getattr(scan, "b0_tesla", None), pad_factor=p.pad_factor,
                        auto_rule=p.auto_rule, discrepancy=p.discrepancy, auto_max_solves=p.auto_max_solves,
                        weak_harmonic=wh, beta=p.beta, device=device,
                        progress=progress, cancel=cancel, return_info=True)
    hist = info["history"]
    extras = {"lambda": info["lambda"], "gn_iterations": hist["gn_iters"], "cg_iterations": list(hist["cg_iters"]),
              "cost": list(hist["cost"]), "norm_ratio": list(hist["norm_ratio"]),
              "data_residual": info["residual"], "phase_scale_rad_per_ppm": info["phase_scale_rad_per_ppm"],
              "data_weighting": info["data_weighting"], "fft_shape": info["fft_shape"], "weak_harmonic": wh_reason}
    if "harmonic_field" in info:
        hf = info["harmonic_field"][np.asarray(scan.mask, bool)]
        extras["harmonic"] = {"beta": p.beta, "harmonic_rms_ppm": float(np.sqrt(np.mean(hf * hf)))}
        extras["harmonic_field"] = info["harmonic_field"]     # φ (ppm) on the scan grid: a layer in the dock
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
        "(or the discrepancy principle with auto_rule=discrepancy). weak_harmonic (auto: on for local fields from this "
        "package's background removal) also fits a residual background field (after WH-QSM, Milovic 2019)."),)
