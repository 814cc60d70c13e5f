"""RTS: rapid two-step dipole inversion (Kames, Wiggermann & Rauscher 2018), QSMxT's default.

Step 1 (well-conditioned cone |D| > δ): a few LSMR iterations (early stopping regularises) on
D·X = F f, χ₁ = F⁻¹X in the mask.
Step 2 (ill-conditioned cone): argmin_x (μ/2)‖M·(F x − F χ₁)‖² + ‖∇x‖₁ with M = 1 where |D| > δ,
else 0, by ADMM (z = ∇x, threshold 1/ρ, closed-form k-space x-update), started from ∇χ₁. When the
primal residual Σ|∇x − z| falls by less than τ = 0.7 in an iteration, ρ grows ×γ = 5 (and the
scaled dual shrinks ÷γ). Stops when ‖x − x_prev‖/‖x‖ < tol, from the second iteration on (the
first, from v = ∇χ₁, returns χ₁ itself: (Mχ̂₁ + ρLχ̂₁)/(M + ρL)). Defaults δ 0.15, 4 LSMR iterations,
μ 1e5, ρ 10, tol 1e-2, 20 iterations (Kames 2018; QSM.jl ``rts``). FFTs are unitary-scaled
(μ weighs image-domain energies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import Method
from ..params import param
from ..progress import Reporter
from .admm import Grid, check_inputs, lsmr_diagonal, shrink


@dataclass
class RTSParams:
    delta: float = param(0.15, "threshold δ on |D| separating the well- from the ill-conditioned cone", min=0.01,
                         max=0.66, short="δ")
    lsmr_iter: int = param(4, "LSMR iterations of step 1 (early stopping regularises)", min=1, max=100)
    mu: float = param(1e5, "μ: weight of the well-conditioned data in step 2", min=1e-3, max=1e9, short="μ")
    rho: float = param(10.0, "initial ADMM penalty ρ of step 2 (TV threshold 1/ρ)", min=1e-3, max=1e6, short="ρ")
    tol: float = param(1e-2, "stop when ‖χ − χ_prev‖/‖χ‖ < tol", min=0.0, max=1.0, widget="advanced")
    max_iter: int = param(20, "maximum ADMM iterations of step 2", min=1, max=1000, widget="advanced")
    margin: int = param(8, "voxels kept around the mask's bounding box", min=0, max=64, widget="advanced")
    pad_factor: float = param(1.0, "FFT grid = fast size ≥ pad_factor × the box", min=1.0, max=3.0, widget="advanced")


def rts(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, delta=0.15, lsmr_iter=4, mu=1e5, rho=10.0, tol=1e-2,
        max_iter=20, tau=0.7, gamma=5.0, margin=8, pad_factor=1.0, device="cpu", progress=None, cancel=None):
    """RTS dipole inversion (field in ppm → χ in ppm, float32 numpy).

    Parameters
    ----------
    field, mask : ndarray
        Local field (ppm) and brain mask.
    voxel_size, b0_direction : sequences of 3 floats
    delta, lsmr_iter, mu, rho, tol, max_iter : see :class:`RTSParams`.
    tau, gamma : float
        ρ grows ×γ when the primal residual falls by less than the factor τ.
    margin, pad_factor, device, progress, cancel : see :func:`napari_qsm.core.inversion.tv.tv_admm`.

    Returns
    -------
    (chi, info) : χ (ppm) and a dict (iterations, final ρ, relative update, step-1 χ is not kept).

    References
    ----------
    Kames C, Wiggermann V, Rauscher A. Rapid two-step dipole inversion for susceptibility mapping
    with sparsity priors. NeuroImage 2018;167:276-283.
    """
    field, mask = check_inputs(field, mask)
    rep = Reporter(progress, cancel, total=int(max_iter) + 1, stage="RTS")
    g = Grid(mask, voxel_size, b0_direction, margin=margin, pad_factor=pad_factor, device=device)
    with torch.no_grad():
        X = lsmr_diagonal(g, g.D, g.fft(g.embed(field * mask)), lsmr_iter, cancel_check=rep.check)
        x = g.ifft(X) * g.mask
        rep(1, f"RTS step 1: {lsmr_iter} LSMR iterations")
        M = (g.D.abs() > delta).float() * mu
        X = g.fft(x)

        def system(rho_):
            a = M + rho_ * g.L
            ia = torch.where(a > 0, 1.0 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
            return ia * M * X, ia * rho_

        F0, iA = system(rho)
        p = torch.zeros((3,) + g.pshape, dtype=torch.float32, device=g.dev)
        v = g.grad(x)                        # v = y − p with y = ∇χ₁, p = 0
        dx = torch.empty_like(v)
        nr, it, ratio = float("inf"), 0, float("nan")
        for it in range(1, int(max_iter) + 1):
            x_prev = x
            x = g.ifft(F0 + g.fft(g.grad_adj(v)) * iA)
            ratio = float(torch.linalg.vector_norm(x - x_prev) / torch.linalg.vector_norm(x).clamp_min(1e-30))
            rep(it + 1, f"RTS step 2, {it}/{max_iter}: ‖Δχ‖/‖χ‖={ratio:.3g}", update=ratio, rho=rho)
            if (ratio < tol and it > 1) or it == max_iter:   # it 1 reproduces χ₁ exactly (v = ∇χ₁): no test
                break
            g.grad(x, out=dx)
            p.add_(dx)                       # p + ∇x
            y = shrink(p, 1.0 / rho)
            p.sub_(y)                        # p ← p + ∇x − y
            v = y.sub(p)                     # v = y − p
            dx.sub_(y)                       # ∇x − y, the primal residual
            nr0, nr = nr, float(torch.linalg.vector_norm(dx, dim=0).sum(dtype=torch.float64))
            if nr > tau * nr0:               # slow progress: stiffen the TV coupling
                rho *= gamma
                p.div_(gamma)
                v = y.sub(p)
                F0, iA = system(rho)
        info = {"iterations": it, "relative_update": ratio, "rho_final": rho, "fft_shape": list(g.pshape)}
        return g.extract(x, mask), info


def _run(scan, p: RTSParams, *, device, progress=None, cancel=None, **_):
    chi, info = rts(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, delta=p.delta, lsmr_iter=p.lsmr_iter,
                    mu=p.mu, rho=p.rho, tol=p.tol, max_iter=p.max_iter, margin=p.margin, pad_factor=p.pad_factor,
                    device=device, progress=progress, cancel=cancel)
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "rts", "RTS", RTSParams, _run, order=15, short="RTS δ={delta}", long_running=True,
    doc="Rapid two-step inversion (Kames 2018; QSMxT's default): LSMR on the well-conditioned cone |D| > δ, then "
        "TV-ADMM fills the ill-conditioned cone."),)
