"""NDI: nonlinear dipole inversion by gradient descent (Polak et al. 2020).

    χ* = argmin_x ‖W(e^{i D∗x} − e^{i φ})‖² + α‖x‖²,   φ = s·f (rad), χ = x/s (ppm)

with s = 2π·γ̄·B0·TE the phase per ppm (the scan's B0 and TE; 3 T and 20 ms when unknown, the
project's reference scale). The gradient is 2[Dᵀ(W² sin(D∗x − φ)) + αx]; each step is
x ← x − τ·[Dᵀ(W² sin(D∗x − φ)) + αx] (τ 2, α 1e-5, 200 iterations as published; early stopping is part
of the regularisation). W: 1/N_std (else the magnitude), normalised to max 1 in the mask after
clipping at its 99th percentile (Polak's normalised magnitude), 0 outside. Two FFT pairs per
iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..constants import rad_per_ppm
from ..method import Method
from ..params import param
from ..progress import Reporter
from .admm import Grid, check_inputs, data_weight

def phase_per_ppm(te=None, b0_tesla=None) -> float:
    """s = 2π·γ̄·B0·TE (rad per ppm) with the reference 3 T / 20 ms for what is unknown
    (:func:`napari_qsm.core.constants.rad_per_ppm`)."""
    return rad_per_ppm(b0_tesla, te)


@dataclass
class NDIParams:
    tau: float = param(2.0, "gradient step τ", min=1e-3, max=10.0, short="τ")
    alpha: float = param(1e-5, "α weighting ‖χ‖² (χ in radians)", min=0.0, max=1.0, short="α")
    max_iter: int = param(200, "gradient-descent iterations", min=1, max=10000)
    tol: float = param(0.0, "stop early when ‖Δx‖/‖x‖ < tol (0: run all iterations, as published)", min=0.0, max=1.0,
                       widget="advanced")
    weighting: str = param("auto", "data weights W: auto (1/N_std, else magnitude) or mask (uniform)",
                           choices=("auto", "mask"), widget="advanced")
    margin: int = param(8, "voxels kept around the mask's bounding box", min=0, max=64, widget="advanced")
    pad_factor: float = param(1.25, "FFT grid = fast size ≥ pad_factor × the box", min=1.0, max=3.0, widget="advanced")


def normalised_weight(w: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """W/max(W) in the mask after clipping at the 99th percentile (so one outlier cannot flatten W)."""
    w = np.where(mask, np.abs(w), 0.0)
    top = np.percentile(w[mask], 99.0)
    if not top > 0:
        return mask.astype(np.float32)
    return (np.minimum(w, top) / top).astype(np.float32)


def ndi(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, weight=None, phase_scale=None, tau=2.0, alpha=1e-5,
        max_iter=200, tol=0.0, margin=8, pad_factor=1.25, device="cpu", progress=None, cancel=None, return_state=False):
    """NDI (field in ppm → χ in ppm, float32 numpy).

    Parameters
    ----------
    field, mask : ndarray
    voxel_size, b0_direction : sequences of 3 floats
    weight : ndarray, optional
        W in [0, 1] (0 outside the mask); the mask when None.
    phase_scale : float, optional
        s in rad/ppm (:func:`phase_per_ppm` of 3 T / 20 ms when None).
    tau, alpha, max_iter, tol, margin, pad_factor : see :class:`NDIParams`.
    device, progress, cancel : as for :func:`napari_qsm.core.inversion.tv.tv_admm`.
    return_state : bool
        Also return ``(grid, x, W, phi)`` tensors (x, φ in radians).

    Returns
    -------
    (chi, info)

    References
    ----------
    Polak D, Chatnuntawech I, Yoon J, et al. Nonlinear dipole inversion (NDI) enables robust
    quantitative susceptibility mapping (QSM). NMR Biomed 2020;33:e4271.
    """
    field, mask = check_inputs(field, mask)
    s = float(phase_scale) if phase_scale else phase_per_ppm()
    rep = Reporter(progress, cancel, total=int(max_iter), stage="NDI")
    g = Grid(mask, voxel_size, b0_direction, margin=margin, pad_factor=pad_factor, device=device)
    with torch.no_grad():
        W2 = g.embed(mask.astype(np.float32) if weight is None else weight * mask).square_()
        phi = g.embed(field * mask * s)
        support = g.mask.float()          # χ is supported in the mask (projected gradient)
        x = torch.zeros(g.pshape, dtype=torch.float32, device=g.dev)
        it, ratio = 0, float("nan")
        for it in range(1, int(max_iter) + 1):
            r = torch.sin(g.conv(x, g.D).sub_(phi)).mul_(W2)
            step = g.conv(r, g.D).add_(x, alpha=alpha).mul_(tau)
            x = (x - step).mul_(support)
            ratio = float(torch.linalg.vector_norm(step) / torch.linalg.vector_norm(x).clamp_min(1e-30))
            rep(it, f"NDI {it}/{max_iter}: ‖Δχ‖/‖χ‖={ratio:.3g}", update=ratio)
            if ratio < tol:
                break
        info = {"iterations": it, "relative_update": ratio, "phase_scale_rad_per_ppm": s, "fft_shape": list(g.pshape)}
        chi = g.extract(x / s, mask)
    if return_state:
        return chi, info, (g, x, W2.sqrt(), phi)
    return chi, info


def _run(scan, p: NDIParams, *, device, progress=None, cancel=None, **_):
    if p.weighting == "auto":
        w, kind = data_weight(scan, scan.mask)
        w = normalised_weight(w, scan.mask)
    else:
        w, kind = None, "mask"
    s = phase_per_ppm(getattr(scan, "te", None), getattr(scan, "b0_tesla", None))
    chi, info = ndi(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, weight=w, phase_scale=s, tau=p.tau,
                    alpha=p.alpha, max_iter=p.max_iter, tol=p.tol, margin=p.margin, pad_factor=p.pad_factor,
                    device=device, progress=progress, cancel=cancel)
    info["data_weighting"] = kind
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "ndi", "NDI", NDIParams, _run, order=17, short="NDI", long_running=True, uses_magnitude=True,
    doc="Nonlinear dipole inversion (Polak 2020): gradient descent on ‖W(e^{iD∗χ} − e^{iφ})‖² + α‖χ‖², "
        "200 steps of τ = 2; robust to phase noise, no tuning of a TV weight."),)
