"""Background field removal (step family "background").

Inputs of every method: ``run(total_field, mask, params=None, *, voxel_size=(1, 1, 1),
b0_direction=(0, 0, 1), noise_std=None, device="auto", progress=None, cancel=None)
-> (local_field, eroded_mask)``: the total field (ppm, unwrapped, 3-D) and the brain mask in; the
local field (ppm, float32, 0 outside) and the mask it is valid on (bool) out. FFT work runs in
torch on ``device`` with zero padding (the helpers of :mod:`napari_qsm.core.dipole`).

Every iterative solver runs to its tolerance or says that it did not: a
:class:`~napari_qsm.core.field.bgtools.ConvergenceWarning` (the pipeline records it in the step's
entry of field.json) and a progress message. Every method takes ``residual``: an optional fit of
solid harmonics or polynomials subtracted inside the returned mask afterwards.

Methods and their conventions
-----------------------------
``vsharp``, ``ismv``, ``resharp``: spherical mean value methods with voxel-centre balls
(:mod:`napari_qsm.core.field.smv`). V-SHARP (Li et al. 2011): balls from ``radius_max`` (12 mm)
down to ``radius_min`` (at least the largest voxel size), deconvolution by 1 − S_rmax truncated at
0.05; SHARP is V-SHARP with one radius. iSMV (Wen et al. 2014, as QSM.jl: r = 2·max voxel size,
tol 1e-3, 500 iterations). RESHARP (Sun & Wilman 2014): argmin ‖M(C∗f_L − C∗f)‖² + λ‖f_L‖², C = δ − S_r
(r = 6 mm), λ = 1e-4 in QSM.rs's scale (field in ppm, unit-sum S, plain sums of squares; that QSM.rs
scales its two terms exactly like this is our reading, not verified against its code; the MEDI
toolbox's α = 0.01 is a different scale), CG to tol 1e-6.

``pdf``: projection onto dipole fields (Liu et al. 2011, the MEDI toolbox's PDF). The background is
the field of a susceptibility χ_b outside the mask: χ_b = argmin ‖W·M(f − D∗((1−M)χ_b))‖², W =
1/N_std normalised to mean 1 in the mask (1 without N_std), solved by CG on the normal equations
(tol 1e-5 as the toolbox), D the dipole kernel of :mod:`napari_qsm.core.dipole` (D(0) = 0) on a
grid padded by ``pad_factor`` (1 = the field of view, as the toolbox). No regularisation beyond early
stopping. Speed: the CG is first run on 2x and 4x coarser grids (``coarse_levels`` = 2, block
means of field, mask and weights), each solution, repeated onto the next finer grid, starting its
CG; the CG is capped at ``max_iter`` = 30 iterations per grid (early stopping: the tolerance is not
reached and the step says so); dot products are float32 BLAS dots. The toolbox's bound is √N
(``max_iter=0``): 2217 iterations for a 160×192×160 volume, tens of minutes on a 2-core CPU.

``lbv``: Laplacian boundary value (Zhou et al. 2014) with a 7-point or the fourth-order 19-point
Laplacian on the physical voxel sizes (:mod:`napari_qsm.core.field.lbv`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..dipole import check_voxel_size, dipole_kernel, fast_shape, unit_vector
from ..params import param
from ..progress import Reporter
from .bgtools import RESIDUAL_CHOICES, ConvergenceWarning, Conv, cg, check_field_inputs, remove_residual
from .lbv import LBVParams, lbv
from .smv import _RESIDUAL_DOC, ISMVParams, ResharpParams, VSharpParams, ismv, resharp, smv_kernel, vsharp
from .steps import Step

__all__ = ["VSharpParams", "ISMVParams", "ResharpParams", "PDFParams", "LBVParams", "vsharp", "ismv", "resharp",
           "pdf", "lbv", "smv_kernel", "check_field_inputs", "ConvergenceWarning", "STEPS"]


# --------------------------------------------------------------------------------------- PDF
@dataclass
class PDFParams:
    tol: float = param(1e-5, "CG relative residual tolerance (MEDI toolbox 1e-5)", min=1e-10, max=1e-1)
    max_iter: int = param(30, "CG iterations at most (per grid); 0 = √N (N voxels), the MEDI toolbox's bound",
                          min=0, max=100000)
    pad_factor: float = param(1.0, "zero padding of the FFT grid (x each dimension); 1 = the field of view, as the "
                              "MEDI toolbox", min=1.0, max=3.0)
    use_noise: bool = param(True, "weight the data by 1/N_std when a noise map is given")
    coarse_levels: int = param(2, "coarse grids (2x per level) solved first to warm-start the CG; 0 = none",
                               min=0, max=3)
    residual: str = param("none", _RESIDUAL_DOC, choices=RESIDUAL_CHOICES)


def _block_down(a, shape_c):
    """Mean over 2x2x2 blocks (the grid is zero-padded to an even size first)."""
    pad = [(0, 2 * c - n) for n, c in zip(a.shape, shape_c)]
    a = np.pad(a, pad)
    return a.reshape(shape_c[0], 2, shape_c[1], 2, shape_c[2], 2).mean(axis=(1, 3, 5))


def _pdf_solve(f, m, w2, vs, b0, pad_factor, tol, max_iter, dev, x0, rep, coarse):
    """χ outside the mask (torch) whose field best matches f inside it; ``coarse`` levels warm-start the CG."""
    if coarse > 0 and min(f.shape) >= 16:
        shape_c = tuple((n + 1) // 2 for n in f.shape)
        mc = _block_down(m.astype(np.float32), shape_c) >= 0.5
        if mc.any() and (~mc).any():
            w2c = _block_down(w2 * m, shape_c) / np.maximum(_block_down(m.astype(np.float32), shape_c), 1e-6)
            fc = _block_down(f * m, shape_c) / np.maximum(_block_down(m.astype(np.float32), shape_c), 1e-6)
            xc = _pdf_solve((fc * mc).astype(np.float32), mc, (w2c * mc).astype(np.float32), 2 * vs, b0,
                            pad_factor, tol, min(max_iter, int(math.ceil(math.sqrt(fc.size)))), dev, None, None,
                            coarse - 1)
            up = xc.cpu().numpy()
            for ax in range(3):
                up = np.repeat(up, 2, axis=ax)
            x0 = torch.as_tensor(up[: f.shape[0], : f.shape[1], : f.shape[2]].astype(np.float32), device=dev)
    pshape = fast_shape(f.shape, pad_factor)
    C = Conv(f.shape, pshape, dev)
    D = dipole_kernel(pshape, vs, b0, device=dev)
    out = torch.as_tensor(~m, dtype=torch.float32, device=dev)
    w2t = torch.as_tensor(w2 * m, dtype=torch.float32, device=dev)
    ft = torch.as_tensor(f, device=dev)

    def apply(x):   # x stays outside the mask (b, x0 and every CG direction are masked by ``out``)
        return out * C(w2t * C(x, D), D)

    b = out * C(w2t * ft, D)
    x0 = torch.zeros_like(ft) if x0 is None else x0 * out
    x, info = cg(apply, b, x0, tol, max_iter, rep, "PDF CG")
    if rep is not None:       # the finest grid: its residual is the solver's answer
        info.finish(rep)
    return x * out


def pdf(total_field, mask, params: PDFParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
        b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """Projection onto dipole fields; returns (local field ppm, mask). See the module docstring.

    Parameters
    ----------
    total_field, mask : ndarray
        Total field (ppm) and brain mask, 3-D.
    params : PDFParams, optional
    voxel_size, b0_direction : sequences of float
        mm; unit vector in the voxel frame.
    noise_std : ndarray, optional
        N_std (ppm): weights 1/N_std.

    Returns
    -------
    local : ndarray (float32, ppm), mask : ndarray of bool (the input mask)

    References
    ----------
    Liu et al. 2011, NMR Biomed 24:1129.
    """
    p = params or PDFParams()
    f, m, n = check_field_inputs(total_field, mask, noise_std)
    vs = check_voxel_size(voxel_size)
    b0 = unit_vector(b0_direction)
    dev = resolve_device(device)
    max_iter = int(p.max_iter) or int(math.ceil(math.sqrt(f.size)))
    rep = Reporter(progress, cancel, total=max_iter, stage="background")
    w = np.ones(f.shape, np.float32)
    if n is not None and p.use_noise:
        w = np.where(m, 1.0 / n, 0.0).astype(np.float32)
        w /= np.float32(w[m].mean())
    with torch.no_grad():
        x = _pdf_solve(f, m, (w * w).astype(np.float32), vs, b0, p.pad_factor, p.tol, max_iter, dev, None, rep,
                       int(p.coarse_levels))
        pshape = fast_shape(f.shape, p.pad_factor)
        bg = Conv(f.shape, pshape, dev)(x, dipole_kernel(pshape, vs, b0, device=dev))
        local = (torch.as_tensor(f, device=dev) - bg) * torch.as_tensor(m, dtype=torch.float32, device=dev)
    return remove_residual(local.cpu().numpy(), m, vs, p.residual), m


STEPS = (
    Step(family="background", name="vsharp", label="V-SHARP", params_cls=VSharpParams, run=vsharp, order=0,
         doc="V-SHARP: SMV high-pass with the largest voxel-centre ball (12 mm down to 1 mm, at least the largest "
             "voxel size) that fits at each voxel, deconvolved by 1 − S_12mm with truncation 0.05 (TSVD). No λ: the "
             "only regularisation is that truncation. The mask is eroded by the smallest radius; the mean field is "
             "lost. radius_min = radius_max gives SHARP."),
    Step(family="background", name="ismv", label="iSMV", params_cls=ISMVParams, run=ismv, order=5,
         doc="Iterative SMV (Wen et al. 2014, as QSM.jl): the background keeps the mean value property inside the "
             "mask eroded by r = 2·max voxel size and equals the total field on the rim; fixed-point iteration to a "
             "relative change of 1e-3 (500 iterations at most, a warning otherwise)."),
    Step(family="background", name="resharp", label="RESHARP", params_cls=ResharpParams, run=resharp, order=10,
         exact=False,
         doc="RESHARP: argmin ‖M(C∗f_L − C∗f)‖² + λ‖f_L‖², C = δ − SMV (6 mm, the paper's radius), CG. λ = 1e-4 in "
             "QSM.rs's scale: field in ppm, unit-sum SMV, λ on the unnormalised squared norm over the field of view; CG "
             "to tol 1e-6 (1000 iterations at most, a warning otherwise)."),
    Step(family="background", name="pdf", label="PDF", params_cls=PDFParams, run=pdf, order=20,
         doc="Projection onto dipole fields: background = field of a χ outside the mask fitted by CG (tol 1e-5 as "
             "the MEDI toolbox; ≤ 30 iterations per grid after 4x and 2x coarser warm starts, max_iter=0 restores "
             "the toolbox's √N), weighted by 1/N_std when given; dipole kernel D(0) = 0. No regularisation beyond early "
             "stopping."),
    Step(family="background", name="lbv", label="LBV", params_cls=LBVParams, run=lbv, order=30, default=True,
         doc="Laplacian boundary value: ∇²f_L = ∇²f inside the mask, f_L = 0 on its boundary (7-point or fourth-order "
             "19-point Laplacian on the physical voxel sizes, sparse CG to tol 1e-6, started from a 2x coarser solution). "
             "No regularisation; the whole mask is kept (peel 0; the boundary voxels themselves carry f_L = 0)."),
)
