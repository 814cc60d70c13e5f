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

WH-QSM (``weak_harmonic=True``, Milovic et al. 2019): the model becomes f = D∗χ + φ with φ a residual
background field, harmonic inside the mask, penalised by (β/2)‖M ∇²φ‖² (M the mask). With
y = D∗x + φ − f and the split h = −∇²φ (symbol L; penalty μh, scaled dual sh), each iteration adds
    φ ← F⁻¹[(μ2 F(y + f − s2) − μ2 D·F x + μh L·F(h − sh)) / (μ2 + μh L²)]
    h ← μh(−∇²φ + sh)/(μh + βM),   sh ← sh − ∇²φ − h
(the x-update sees f − φ, s2 is updated with the new φ), as in Milovic's WH_nlTV. Defaults β 150 and
μh = β/50 = 3 (FANSI's WH_nlTV documentation). Two more FFT pairs per iteration.
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
    weak_harmonic: bool = param(False, "WH-QSM: also fit a residual background field φ with ‖M∇²φ‖² small "
                                "(Milovic 2019), for local fields with background-removal remnants")
    beta: float = param(150.0, "WH-QSM: β weighting ‖M∇²φ‖² (FANSI default 150; 0 would leave φ free)",
                        min=1e-3, max=1e6, short="β")
    mu_h: float = param(3.0, "WH-QSM: ADMM penalty μh of the Laplacian split (FANSI default 3, i.e. β/50 at the "
                        "default β; set it with β)", min=1e-6, max=1e6, widget="advanced")


class _Harmonic:
    """WH-QSM's residual background φ, its Laplacian split h = −∇²φ and the scaled dual sh (padded grid)."""

    def __init__(self, g: Grid, beta: float, mu_h: float, mu2: float):
        self.g, self.mu_h, self.mu2 = g, mu_h, mu2
        self.phi = torch.zeros(g.pshape, dtype=torch.float32, device=g.dev)
        self.h = torch.zeros_like(self.phi)
        self.sh = torch.zeros_like(self.phi)
        self.shrink_h = mu_h / (mu_h + beta * g.mask.float())
        self.den = mu2 + mu_h * g.L * g.L

    def update(self, y_f_s2: torch.Tensor, DX: torch.Tensor) -> torch.Tensor:
        """φ given y + f − s2 (image) and D·F x (half spectrum); then h and sh. Returns φ."""
        g = self.g
        P = (g.fft(y_f_s2).sub_(DX)).mul_(self.mu2).add_(g.fft(self.h - self.sh).mul_(g.L), alpha=self.mu_h)
        P.div_(self.den)
        self.phi = g.ifft(P)
        v = g.ifft(P.mul_(g.L)).add_(self.sh)      # −∇²φ + sh (L is the symbol of −∇²; h splits −∇²φ)
        self.h = v * self.shrink_h
        self.sh = v.sub_(self.h)
        return self.phi


def hdqsm(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, weight=None, alpha=1e-4, mu1=1e-2, mu2=1.0,
          iters_l1=20, iters_l2=80, margin=8, pad_factor=1.0, weak_harmonic=False, beta=150.0, mu_h=3.0,
          device="cpu", progress=None, cancel=None, return_state=False):
    """HD-QSM (field in ppm → χ in ppm, float32 numpy).

    Parameters
    ----------
    field, mask : ndarray
    voxel_size, b0_direction : sequences of 3 floats
    weight : ndarray, optional
        Data weights W (0 outside the mask); the mask when None.
    alpha, mu1, mu2, iters_l1, iters_l2, margin, pad_factor : see :class:`HDQSMParams`.
    weak_harmonic, beta, mu_h : bool, float, float
        WH-QSM: fit a residual background field jointly (see the module docstring).
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
    Milovic C, Bilgic B, Zhao B, Langkammer C, Tejos C, Acosta-Cabronero J. Weak-harmonic regularization
    for quantitative susceptibility mapping. MRM 2019;81:1399-1411 (WH-QSM).
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
        wh = _Harmonic(g, beta, mu_h, mu2) if weak_harmonic else None
        name = "WH-QSM" if weak_harmonic else "HD-QSM"
        for it in range(1, total + 1):
            l1 = it <= iters_l1
            d = y + f - s2 if wh is None else (y + f - s2).sub_(wh.phi)
            X = (g.fft(g.grad_adj(z - s1)) * mu1 + g.fft(d) * (g.D * mu2)) * iA
            x = g.ifft(X)
            DX = X.mul_(g.D)
            r = g.ifft(DX).sub_(f)          # D∗x − f
            v = g.grad(x).add_(s1)
            z = shrink(v, alpha / mu1)
            s1 = v.sub_(z)
            if wh is None:
                q = r.add_(s2)
                y = shrink(q, W / mu2) if l1 else q * (mu2 / (W2 + mu2))
                s2 = q.sub_(y)
            else:                           # y with the previous φ, then φ, then s2 with the new φ (WH_nlTV's order)
                q = (r + wh.phi).add_(s2)
                y = shrink(q, W / mu2) if l1 else q * (mu2 / (W2 + mu2))
                phi = wh.update((y + f).sub_(s2), DX)
                s2 = s2.add_(r).add_(phi).sub_(y)
            del X, DX
            rep(it, f"{name} {'L1' if l1 else 'L2'} {it}/{total}")
        info = {"iterations": total, "iters_l1": int(iters_l1), "iters_l2": int(iters_l2), "fft_shape": list(g.pshape),
                "weak_harmonic": bool(weak_harmonic)}
        chi = g.extract(x, mask)
    if return_state:
        return chi, info, (g, x, W, f) if wh is None else (g, x, W, f, wh.phi)
    return chi, info


def _run(scan, p: HDQSMParams, *, device, progress=None, cancel=None, **_):
    w, kind = data_weight(scan, scan.mask) if p.weighting == "auto" else (None, "mask")
    chi, info = hdqsm(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, weight=w, alpha=p.alpha, mu1=p.mu1,
                      mu2=p.mu2, iters_l1=p.iters_l1, iters_l2=p.iters_l2, margin=p.margin, pad_factor=p.pad_factor,
                      weak_harmonic=p.weak_harmonic, beta=p.beta, mu_h=p.mu_h, device=device, progress=progress,
                      cancel=cancel)
    info["data_weighting"] = kind
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "hdqsm", "HD-QSM", HDQSMParams, _run, order=16, short="HD-QSM α={alpha}", long_running=True, uses_magnitude=True,
    doc="Hybrid data fidelity (Milovic): TV inversion with an L1 data term (meant to be less sensitive to outliers) for 20 iterations, "
        "then an L2 data term for 80, by ADMM with closed-form k-space updates. The weak-harmonic option (WH-QSM, "
        "Milovic 2019) also fits a residual background field, for local fields with background-removal remnants."),)
