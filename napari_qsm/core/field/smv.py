"""Spherical-mean-value background removal: V-SHARP (SHARP when one radius), iSMV and RESHARP.

Every kernel is a voxel-centre ball, as in QSM.jl and QSM.rs: a voxel belongs to the ball of radius r
(mm) when its centre lies within r of the ball's centre in physical units (voxel sizes), and the SMV
kernel S_r is that ball normalised to unit sum. A voxel is inside the mask eroded by r when every
voxel of its ball is in the mask. Radii are bounded by the field of view: no ball may be wider than
the smallest extent of the volume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..dipole import check_voxel_size
from ..params import param
from ..progress import Reporter
from ..scan import ScanError
from .bgtools import RESIDUAL_CHOICES, Conv, SolverReport, cg, check_field_inputs, padded, remove_residual

__all__ = ["ball", "smv_kernel", "VSharpParams", "ISMVParams", "ResharpParams", "vsharp", "ismv", "resharp"]

_RESIDUAL_DOC = ("after removal, fit and subtract a smooth background inside the returned mask: solid harmonics "
                 "(harmonicN) or all polynomials (polyN) of degree ≤ N; none = off")


def ball(voxel_size, radius_mm) -> np.ndarray:
    """The voxel-centre ball: bool array (odd sizes, centred), True where |(i, j, k)·voxel_size| ≤ r."""
    vs = check_voxel_size(voxel_size)
    h = [int(math.floor(radius_mm / d + 1e-9)) for d in vs]
    g = np.meshgrid(*[np.arange(-k, k + 1) * d for k, d in zip(h, vs)], indexing="ij", sparse=True)
    return sum(x * x for x in g) <= radius_mm * radius_mm * (1 + 1e-9)


def smv_kernel(pshape, voxel_size, radius_mm, device) -> torch.Tensor:
    """rfft (real part) on ``pshape`` of the SMV kernel: the voxel-centre :func:`ball`, unit sum, centred at 0."""
    b = ball(voxel_size, radius_mm).astype(np.float64)
    b /= b.sum()
    h = [n // 2 for n in b.shape]
    k = torch.zeros(pshape, dtype=torch.float64, device=device)
    k[: b.shape[0], : b.shape[1], : b.shape[2]] = torch.as_tensor(b, device=device)
    k = torch.roll(k, shifts=tuple(-x for x in h), dims=(0, 1, 2))
    return torch.fft.rfftn(k).real.to(torch.float32)


def _inside(C, Mk, S, n_ball):
    """Voxels whose whole ball is in the mask: S∗mask = 1 (less than half a ball voxel missing)."""
    return C.ifft(Mk * S) > 1.0 - 0.5 / n_ball


def fov_radius(shape, vs) -> float:
    """The largest radius (mm) whose ball fits in the field of view."""
    return 0.5 * min((n - 1) * d for n, d in zip(shape, vs))


def _radii(p, vs, shape):
    bound = fov_radius(shape, vs)
    rmin = min(max(float(p.radius_min), float(np.max(vs))), bound)
    rmax = min(max(float(p.radius_max), rmin), bound)
    r = list(np.arange(rmax, rmin - 1e-6, -float(p.radius_step)))
    if r[-1] > rmin + 1e-6:
        r.append(rmin)
    return [float(x) for x in r]


# --------------------------------------------------------------------------------------- V-SHARP
@dataclass
class VSharpParams:
    radius_max: float = param(12.0, "largest SMV radius (mm; at most half the smallest FOV extent)", min=1.0,
                              max=60.0)
    radius_min: float = param(1.0, "smallest SMV radius (mm; at least the largest voxel size); = radius_max: SHARP",
                              min=0.5, max=60.0)
    radius_step: float = param(1.0, "step between radii (mm)", min=0.25, max=10.0)
    threshold: float = param(0.05, "truncation of 1 − S_rmax in the deconvolution", min=0.001, max=0.5)
    residual: str = param("none", _RESIDUAL_DOC, choices=RESIDUAL_CHOICES)


def vsharp(total_field, mask, params: VSharpParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
           b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """V-SHARP background removal with voxel-centre balls.

    For each radius r from ``radius_max`` down to ``radius_min``, each voxel whose ball of radius r lies in the
    mask (and that no larger ball took) gets the high-pass f − S_r∗f; the result is deconvolved by 1 − S_rmax,
    truncated where |1 − S_rmax| ≤ ``threshold`` (TSVD), and kept on the voxels that some ball fitted.

    Parameters
    ----------
    total_field, mask : ndarray
        Total field (ppm) and brain mask, 3-D.
    params : VSharpParams, optional
    voxel_size : sequence of float
        mm; the balls are physical.

    Returns
    -------
    local : ndarray (float32, ppm; 0 outside ``eroded``), eroded : ndarray of bool

    References
    ----------
    Schweser et al. 2011, NeuroImage 54:2789 (SHARP); Li et al. 2011, NeuroImage 55:1645 (V-SHARP).
    """
    p = params or VSharpParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    dev = resolve_device(device)
    radii = _radii(p, vs, f.shape)
    rep = Reporter(progress, cancel, total=len(radii) + 1, stage="background")
    pshape = padded(f.shape, [math.ceil(radii[0] / d) + 1 for d in vs])
    C = Conv(f.shape, pshape, dev)
    with torch.no_grad():
        ft = torch.as_tensor(f, device=dev)
        F = C.fft(ft)
        Mk = C.fft(m.astype(np.float32))
        mt = torch.as_tensor(m, device=dev)
        hp = torch.zeros(f.shape, dtype=torch.float32, device=dev)
        done = torch.zeros(f.shape, dtype=torch.bool, device=dev)
        S_max = None
        for i, r in enumerate(radii):
            rep(i, f"SMV radius {r:g} mm")
            S = smv_kernel(pshape, vs, r, dev)
            if S_max is None:
                S_max = S
            inside = _inside(C, Mk, S, int(ball(vs, r).sum())) & mt & ~done
            if bool(inside.any()):
                hp[inside] = (ft - C.ifft(F * S))[inside]
                done |= inside
            del S
        if not bool(done.any()):
            raise ScanError(f"mask: no voxel lies {radii[-1]:g} mm inside the mask; the mask is too thin for V-SHARP")
        rep(len(radii), "deconvolution")
        Dk = 1.0 - S_max
        keep = Dk.abs() > p.threshold
        X = C.fft(hp * done)
        X = torch.where(keep, X / torch.where(keep, Dk, torch.ones_like(Dk)), torch.zeros_like(X))
        local = C.ifft(X) * done
    rep(len(radii) + 1, "done")
    em = done.cpu().numpy()
    return remove_residual(local.cpu().numpy(), em, vs, p.residual), em


# --------------------------------------------------------------------------------------- iSMV
@dataclass
class ISMVParams:
    radius: float = param(0.0, "SMV radius (mm); 0 = twice the largest voxel size (QSM.jl's default)", min=0.0,
                          max=60.0)
    tol: float = param(1e-3, "stop when the background's relative change per iteration is below this (QSM.jl 1e-3)",
                       min=1e-8, max=0.1)
    max_iter: int = param(500, "iterations at most (QSM.jl 500)", min=1, max=100000)
    residual: str = param("none", _RESIDUAL_DOC, choices=RESIDUAL_CHOICES)


def ismv(total_field, mask, params: ISMVParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
         b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """Iterative SMV background removal.

    The background f_B has the mean value property inside the mask M₀ eroded by r (f_B = S_r∗f_B there) and
    equals the total field on the rim M \\ M₀ (where the local field is taken as 0). The fixed-point iteration
    f_B ← M₀·(S_r∗f_B) + (M \\ M₀)·f, from f_B = f, runs until ‖Δf_B‖/‖f_B‖ < ``tol`` (a
    :class:`~napari_qsm.core.field.bgtools.ConvergenceWarning` when ``max_iter`` comes first); the local field is
    M₀·(f − f_B). The convolutions are direct (the ball is small).

    Parameters
    ----------
    total_field, mask : ndarray
        Total field (ppm) and brain mask, 3-D.
    params : ISMVParams, optional
    voxel_size : sequence of float
        mm.

    Returns
    -------
    local : ndarray (float32, ppm; 0 outside ``eroded``), eroded : ndarray of bool (M₀)

    References
    ----------
    Wen, Zhou, Wang, Spincemaille 2014, MRM 72:1065 (iSMV); QSM.jl ``ismv`` (r = 2·max voxel size, tol 1e-3,
    500 iterations).
    """
    p = params or ISMVParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    dev = resolve_device(device)
    r = float(p.radius) if p.radius > 0 else 2.0 * float(np.max(vs))
    r = min(max(r, float(np.max(vs))), fov_radius(f.shape, vs))
    b = ball(vs, r)
    rep = Reporter(progress, cancel, total=int(p.max_iter), stage="background")
    if b.sum() <= 125:        # a small ball: direct convolution is cheaper than two FFTs
        w = torch.as_tensor((b / b.sum()).astype(np.float32), device=dev)[None, None]
        pad = tuple(n // 2 for n in b.shape)

        def smv(x):
            return torch.nn.functional.conv3d(x[None, None], w, padding=pad)[0, 0]
    else:
        C = Conv(f.shape, padded(f.shape, [n // 2 + 1 for n in b.shape]), dev)
        S = smv_kernel(C.pshape, vs, r, dev)

        def smv(x):
            return C(x, S)

    with torch.no_grad():
        mt = torch.as_tensor(m, device=dev)
        m0 = (smv(mt.to(torch.float32)) > 1.0 - 0.5 / float(b.sum())) & mt
        if not bool(m0.any()):
            raise ScanError(f"mask: no voxel lies {r:g} mm inside the mask; the mask is too thin for iSMV")
        ft = torch.as_tensor(f, device=dev)
        m0f = m0.to(torch.float32)
        rim = ft * (mt & ~m0).to(torch.float32)
        fb = ft.clone()
        it, rel = 0, float("inf")
        while it < int(p.max_iter):
            it += 1
            new = m0f * smv(fb) + rim
            rel = float(torch.linalg.vector_norm(new - fb)) / (float(torch.linalg.vector_norm(new)) or 1.0)
            fb = new
            rep(it, f"iSMV {it}", change=rel)
            if rel < p.tol:
                break
        rep.check()
        SolverReport("iSMV", it, int(p.max_iter), rel, float(p.tol), rel < p.tol).finish(rep)
        local = (ft - fb) * m0f
    em = m0.cpu().numpy()
    return remove_residual(local.cpu().numpy(), em, vs, p.residual), em


# --------------------------------------------------------------------------------------- RESHARP
@dataclass
class ResharpParams:
    radius: float = param(6.0, "SMV radius (mm); the QSMInvNet+ paper used 6 mm", min=1.0, max=60.0)
    lam: float = param(1e-4, "Tikhonov weight λ on ‖f_L‖² (QSM.rs scale, field in ppm)", min=0.0, max=10.0, cli="lambda")
    tol: float = param(1e-6, "CG relative residual tolerance", min=1e-10, max=1e-1)
    max_iter: int = param(1000, "CG iterations at most (a warning when the tolerance is not reached)", min=1,
                          max=100000)
    residual: str = param("none", _RESIDUAL_DOC, choices=RESIDUAL_CHOICES)


def resharp(total_field, mask, params: ResharpParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
            b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """RESHARP: argmin ‖M(C∗f_L − C∗f)‖² + λ‖f_L‖², C = δ − S_r, by CG to ``tol``.

    Parameters
    ----------
    total_field, mask : ndarray
        Total field (ppm) and brain mask, 3-D.
    params : ResharpParams, optional
    voxel_size : sequence of float
        mm.

    Returns
    -------
    local : ndarray (float32, ppm), eroded : ndarray of bool (the mask eroded by the ball)

    References
    ----------
    Sun & Wilman 2014, MRM 71:1151.
    """
    p = params or ResharpParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    dev = resolve_device(device)
    r = min(max(float(p.radius), float(np.max(vs))), fov_radius(f.shape, vs))
    pshape = padded(f.shape, [math.ceil(r / d) + 1 for d in vs])
    C = Conv(f.shape, pshape, dev)
    rep = Reporter(progress, cancel, total=p.max_iter, stage="background")
    with torch.no_grad():
        S = smv_kernel(pshape, vs, r, dev)
        H = 1.0 - S
        mt = torch.as_tensor(m, device=dev)
        me = _inside(C, C.fft(mt.to(torch.float32)), S, int(ball(vs, r).sum())) & mt
        if not bool(me.any()):
            raise ScanError(f"mask: no voxel lies {r:g} mm inside the mask; lower the RESHARP radius")
        mef = me.to(torch.float32)
        ft = torch.as_tensor(f, device=dev)
        lam = float(p.lam)

        def apply(x):
            return C(mef * C(x, H), H) + lam * x

        b = C(mef * C(ft, H), H)
        x, info = cg(apply, b, torch.zeros_like(ft), p.tol, p.max_iter, rep, "RESHARP CG")
        info.finish(rep)
        local = x * mef
    em = me.cpu().numpy()
    return remove_residual(local.cpu().numpy(), em, vs, p.residual), em
