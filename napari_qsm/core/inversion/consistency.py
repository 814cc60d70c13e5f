"""Data consistency: bring a prior χ (e.g. a network's output) back to agreement with the measured field.

    χ* = argmin_x ‖W·(D∗x − f)‖²  +  μ‖x − χ₀‖²        (W: data weights, zero outside the mask)

solved by conjugate gradients on the normal equations (DᴴW²D + μI)x = DᴴW²f + μχ₀, started at χ₀.
This is the data-consistency step of model-based deep learning (MoDL, Aggarwal 2019; for QSM the
learned proximal network of Lai 2020): the prior fills the ill-conditioned cone of D, where the field
says nothing, and the data decide where they are informative. μ → ∞ returns χ₀; μ → 0 and many
iterations give the (mask-weighted) least-squares inverse. Each iteration costs two FFT pairs on the
mask's bounding box grown by a margin, zero-padded for a linear (not periodic) convolution; χ lives on
that box only (a χ free in the periodic padding can explain the field with sources that are not there).
"""

from __future__ import annotations

import numpy as np
import torch

from ..dipole import convolve_kernel, dipole_kernel, fast_shape, unit_vector
from ..field.bgtools import cg
from ..progress import Reporter
from .admm import bbox, check_inputs


def data_consistency(field, mask, chi0, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, weight=None, mu=0.003,
                     iterations=10, tol=1e-6, margin=8, pad_factor=1.2, device="cpu", progress=None, cancel=None,
                     return_info=False):
    """χ (ppm) closest to ``chi0`` that explains the field: CG on the weighted, anchored normal equations.

    Parameters
    ----------
    field, mask : ndarray
        Local field (ppm) and brain mask, same 3-D shape.
    chi0 : ndarray
        The prior χ (ppm), same shape; the CG starts from it.
    voxel_size, b0_direction : sequences of 3 floats
        mm, and the unit B0 vector in the voxel frame.
    weight : ndarray, optional
        Data weights W (e.g. 1/N_std normalised to mean 1 in the mask,
        :func:`napari_qsm.core.inversion.admm.data_weight`); the mask when None. Zero outside the mask.
    mu : float
        Weight of ‖x − χ₀‖² (field in ppm, W of mean 1). Larger keeps more of the prior.
    iterations : int
        CG iterations (0 returns ``chi0`` in the mask). Few iterations from χ₀ also act as a regulariser.
    tol : float
        Stop early when ‖r‖/‖b‖ of the normal equations falls below ``tol``.
    margin, pad_factor : int, float
        χ lives on the mask's bounding box grown by ``margin`` voxels; the FFT grid is a fast size
        ≥ ``pad_factor`` × the box (zero padding: 1.2 keeps the wrap-around of D∗χ small; 1.0, a
        periodic box, was 3-4 points worse on the selection set of src_models/validate_families.py).
    device : torch.device or str
    progress, cancel : callable, token
        One report per iteration; cancel is checked every iteration.
    return_info : bool
        Also return a dict (iterations, relative residual of the normal equations).

    Returns
    -------
    chi : ndarray (float32, zero outside the mask), or (chi, info).

    References
    ----------
    Aggarwal HK, Mani MP, Jacob M. MoDL: model-based deep learning architecture for inverse problems.
    IEEE Trans Med Imaging 2019;38:394-405.
    Lai KW, Aggarwal M, van Zijl P, Li X, Sulam J. Learned proximal networks for quantitative
    susceptibility mapping. MICCAI 2020, LNCS 12262:125-135.
    """
    field, mask = check_inputs(field, mask)
    chi0 = np.asarray(chi0, np.float32)
    if chi0.shape != mask.shape:
        raise ValueError(f"chi0: shape {chi0.shape} does not match field shape {mask.shape}")
    if not mu > 0:
        raise ValueError(f"mu: expected > 0, got {mu}")
    w = mask.astype(np.float32) if weight is None else np.where(mask, np.asarray(weight, np.float32), 0.0)
    rep = Reporter(progress, cancel, total=int(iterations), stage="data consistency")
    box = bbox(mask, margin)
    shape = tuple(b.stop - b.start for b in box)
    pshape = fast_shape(shape, pad_factor)
    dev = device if isinstance(device, torch.device) else torch.device(device)
    D = dipole_kernel(pshape, voxel_size, unit_vector(b0_direction), device=dev)
    as_t = lambda a: torch.as_tensor(np.ascontiguousarray(a[box], dtype=np.float32), device=dev)

    def conv(v):   # D∗v on the box: zero-padded, cropped back (self-adjoint: D is real and even)
        return convolve_kernel(v, D, pshape)

    with torch.no_grad():
        w2 = as_t(w).square_()
        x0 = as_t(np.where(mask, chi0, 0.0))

        def normal(v):
            return conv(w2 * conv(v)).add_(v, alpha=mu)

        b = conv(w2 * as_t(field * mask)).add_(x0, alpha=mu)
        rep(0, f"CG 0/{iterations}")
        x, solver = cg(normal, b, x0, tol, int(iterations), rep=rep, label="CG")
        it, rel = solver.iterations, solver.residual
        rep(int(iterations), f"done: ‖r‖/‖b‖={rel:.3g}", residual=rel)
        chi = np.zeros(mask.shape, np.float32)
        chi[box] = x.cpu().numpy()
        chi[~mask] = 0.0
    info = {"iterations": it, "relative_residual": rel, "mu": float(mu), "fft_shape": list(pshape)}
    return (chi, info) if return_info else chi
