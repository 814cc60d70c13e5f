"""HD-QSM: hybrid data fidelity TV inversion (Milovic et al.): an L1 data term, then an L2 data term.

Stage 1 (robust to phase outliers and background-removal errors), ``iters_l1`` ADMM iterations of
    argmin_x ‖W(D∗x − f)‖₁ + α‖∇x‖₁,
stage 2, ``iters_l2`` iterations started from stage 1's variables, of
    argmin_x ½‖W(D∗x − f)‖² + α‖∇x‖₁.
Splitting z = ∇x (penalty μ1) and y = D∗x − f (penalty μ2), scaled duals s1, s2:
    x ← F⁻¹[(μ1 F∇ᴴ(z − s1) + μ2 D·F(y + f − s2)) / (μ1 L + μ2 D²)]
    z ← shrink(∇x + s1, α/μ1)
    y ← shrink(D∗x − f + s2, W/μ2)                   (stage 1: L1)
    y ← μ2(D∗x − f + s2)/(W² + μ2)                   (stage 2: L2)
W = 1/N_std (else the magnitude) normalised to mean 1 in the mask, 0 outside (no data there).
Defaults α 1e-4, μ1 1e-2 (= 100 α), μ2 1, 20 + 80 iterations (QSM-CI's HD-QSM defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..method import Method
from ..params import param
from ..progress import Reporter
from .admm import Grid, check_inputs, data_weight, shrink


@dataclass
class HDQSMParams:
    alpha: float = param(1e-4, "α weighting ‖∇χ‖₁ (field in ppm)", min=0.0, max=1.0, short="α")
    mu1: float = param(1e-2, "ADMM penalty μ1 of the gradient split (100·α)", min=1e-8, max=1e3, short="μ1")
    mu2: float = param(1.0, "ADMM penalty μ2 of the data split", min=1e-6, max=1e3, widget="advanced")
    iters_l1: int = param(20, "iterations with the L1 data term (stage 1)", min=0, max=1000)
    iters_l2: int = param(80, "iterations with the L2 data term (stage 2)", min=0, max=5000)
    weighting: str = param("auto", "data weights W: auto (1/N_std, else magnitude) or mask (uniform)",
                           choices=("auto", "mask"), widget="advanced")
    margin: int = param(8, "voxels kept around the mask's bounding box", min=0, max=64, widget="advanced")
    pad_factor: float = param(1.0, "FFT grid = fast size ≥ pad_factor × the box", min=1.0, max=3.0, widget="advanced")


def hdqsm(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, weight=None, alpha=1e-4, mu1=1e-2, mu2=1.0,
          iters_l1=20, iters_l2=80, margin=8, pad_factor=1.0, device="cpu", progress=None, cancel=None,
          return_state=False):
    """HD-QSM (field in ppm → χ in ppm, float32 numpy).

    Parameters
    ----------
    field, mask : ndarray
    voxel_size, b0_direction : sequences of 3 floats
    weight : ndarray, optional
        Data weights W (0 outside the mask); the mask when None.
    alpha, mu1, mu2, iters_l1, iters_l2, margin, pad_factor : see :class:`HDQSMParams`.
    device, progress, cancel : as for :func:`napari_qsm.core.inversion.tv.tv_admm`.
    return_state : bool
        Also return ``(grid, x, W, f)`` tensors (optimality tests).

    Returns
    -------
    (chi, info)

    References
    ----------
    Milovic C et al. HD-QSM: hybrid L1/L2 data fidelity total-variation QSM (the method as entered in
    QSM-CI). Milovic C et al. Fast nonlinear susceptibility
    inversion with variational regularization. MRM 2018;80:814-821 (the ADMM splitting).
    """
    field, mask = check_inputs(field, mask)
    total = int(iters_l1) + int(iters_l2)
    rep = Reporter(progress, cancel, total=max(total, 1), stage="HD-QSM")
    g = Grid(mask, voxel_size, b0_direction, margin=margin, pad_factor=pad_factor, device=device)
    with torch.no_grad():
        W = g.embed(mask.astype("float32") if weight is None else weight * mask)
        f = g.embed(field * mask)
        a = mu1 * g.L + mu2 * g.D * g.D
        iA = torch.where(a > 0, 1.0 / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
        del a
        x = torch.zeros(g.pshape, dtype=torch.float32, device=g.dev)
        z = torch.zeros((3,) + g.pshape, dtype=torch.float32, device=g.dev)
        s1 = torch.zeros_like(z)
        y = -f * (W > 0)                   # D∗0 − f where there is data
        s2 = torch.zeros_like(x)
        W2 = W * W
        for it in range(1, total + 1):
            l1 = it <= iters_l1
            X = (g.fft(g.grad_adj(z - s1)) * mu1 + g.fft(y + f - s2) * (g.D * mu2)) * iA
            x = g.ifft(X)
            r = g.ifft(X * g.D).sub_(f)     # D∗x − f
            del X
            v = g.grad(x).add_(s1)
            z = shrink(v, alpha / mu1)
            s1 = v.sub_(z)
            q = r.add_(s2)
            y = shrink(q, W / mu2) if l1 else q * (mu2 / (W2 + mu2))
            s2 = q.sub_(y)
            rep(it, f"HD-QSM {'L1' if l1 else 'L2'} {it}/{total}")
        info = {"iterations": total, "iters_l1": int(iters_l1), "iters_l2": int(iters_l2), "fft_shape": list(g.pshape)}
        chi = g.extract(x, mask)
    if return_state:
        return chi, info, (g, x, W, f)
    return chi, info


def _run(scan, p: HDQSMParams, *, device, progress=None, cancel=None, **_):
    w, kind = data_weight(scan, scan.mask) if p.weighting == "auto" else (None, "mask")
    chi, info = hdqsm(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, weight=w, alpha=p.alpha, mu1=p.mu1,
                      mu2=p.mu2, iters_l1=p.iters_l1, iters_l2=p.iters_l2, margin=p.margin, pad_factor=p.pad_factor,
                      device=device, progress=progress, cancel=cancel)
    info["data_weighting"] = kind
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "hdqsm", "HD-QSM", HDQSMParams, _run, order=16, short="HD-QSM α={alpha}", long_running=True, uses_magnitude=True,
    doc="Hybrid data fidelity (Milovic): TV inversion with an L1 data term (meant to be less sensitive to outliers) for 20 iterations, "
        "then an L2 data term for 80, by ADMM with closed-form k-space updates."),)
