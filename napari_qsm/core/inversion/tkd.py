"""Truncated k-space division (TKD) and truncated SVD (TSVD).

χ = F⁻¹[ D⁻¹_δ(k) · F[field] ] · mask with
* TKD (Shmueli et al. 2009; Wharton et al. 2010): D⁻¹_δ = 1/D where |D| > δ, else sign(D)/δ (sign(0) = 0);
* TSVD: D⁻¹_δ = 1/D where |D| > δ, else 0 (what SEPIA calls "TKD").
Threshold δ default 0.15 (QSM.jl, QSM.rs). Optional Schweser et al. (2013) correction divides χ
by c = mean over k-space of D·D⁻¹_δ, compensating the underestimation truncation causes
(neither QSM.jl nor QSM.rs applies it; off by default). D(0) = 0 → the k = 0 term is 0.
The field is zero-padded (default 2x, fast FFT sizes) so nothing wraps around.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..dipole import crop_volume, fast_shape, half_weights, kernel_slabs, pad_volume
from ..method import Method
from ..params import param


@dataclass
class TKDParams:
    threshold: float = param(0.15, "k-space threshold δ on |D| (0.1 simulations, 0.15 default, 0.2-0.4 in vivo)", min=0.01, max=0.66,
                             short="δ")
    correction: bool = param(False, "Schweser correction: divide by the mean of D·D⁻¹_δ over k-space")
    pad_factor: float = param(2.0, "zero-padding factor of the FFT grid (≥1; 2 prevents wrap-around)", min=1.0, max=4.0)


def inverse_kernel(D: torch.Tensor, threshold: float, mode: str = "tkd", inplace: bool = False) -> torch.Tensor:
    """Truncated inverse of the dipole kernel: TKD (sign(D)/δ where |D| ≤ δ, sign(0) = 0) or TSVD (0 there).

    ``inplace=True`` overwrites ``D`` (used slab by slab in :func:`truncated_inversion`).
    """
    if mode not in ("tkd", "tsvd"):
        raise ValueError(f"mode: expected 'tkd' or 'tsvd', got {mode!r}")
    if not inplace:
        D = D.clone()
    small = D.abs() <= threshold
    if mode == "tkd":
        # sign(D)/δ where |D| ≤ δ, with sign(0) = 0: D(0) = 0 (and any exact zero) keeps a zero inverse, so a
        # constant field never leaks into χ's mean (QSM.jl's convention)
        zero = D == 0
        D.masked_fill_(small & (D > 0), threshold).masked_fill_(small & (D < 0), -threshold)
        D.masked_fill_(zero, 1.0).reciprocal_()
        return D.masked_fill_(zero, 0.0)
    D.masked_fill_(small, 1.0).reciprocal_()
    return D.masked_fill_(small, 0.0)


def truncated_inversion(field: np.ndarray, mask: np.ndarray, voxel_size, b0_direction, threshold=0.15,
                        mode="tkd", correction=False, pad_factor=2.0, device=None) -> tuple[np.ndarray, dict]:
    """χ (ppm) by TKD/TSVD; returns (χ, extras) with extras["correction_factor"] when applied."""
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    shape = field.shape
    pshape = fast_shape(shape, pad_factor)
    with torch.no_grad():
        f = torch.as_tensor(np.where(mask, field, 0).astype(np.float32), device=dev)
        F = torch.fft.rfftn(pad_volume(f, pshape), dim=(0, 1, 2))
        del f
        extras = {}
        w = half_weights(pshape, device=dev)
        acc = torch.zeros((), dtype=torch.float64, device=dev)
        for i0, i1, D in kernel_slabs(pshape, voxel_size, b0_direction, device=dev):
            Dinv = inverse_kernel(D, threshold, mode, inplace=not correction)
            if correction:  # Schweser's c = mean over the full k-space of D·D⁻¹_δ (half grid weighted)
                acc += ((D * Dinv) * w).sum(dtype=torch.float64)
            F[i0:i1] *= Dinv
        if correction:
            c = float(acc) / (float(np.prod(pshape[:-1])) * float(w.sum()))
            F /= c
            extras["correction_factor"] = c
        chi = crop_volume(torch.fft.irfftn(F, s=pshape, dim=(0, 1, 2)), shape)
        chi = chi * torch.as_tensor(mask, device=dev)
        out = chi.cpu().numpy().astype(np.float32)
    extras["padded_shape"] = list(pshape)
    return out, extras


def _run(mode):
    def run(scan, p: TKDParams, *, device, progress=None, cancel=None, **_):
        chi, extras = truncated_inversion(scan.field, scan.mask, scan.voxel_size, scan.b0_direction,
                                          threshold=p.threshold, mode=mode, correction=p.correction,
                                          pad_factor=p.pad_factor, device=device)
        return {"chi": chi, "extras": extras}
    return run


METHODS = (
    Method("tkd", "TKD", TKDParams, _run("tkd"), order=10, short="TKD δ={threshold}",
           doc="Truncated k-space division: 1/D, with sign(D)/δ where |D| ≤ δ. Fast, closed form; streaking grows as δ falls."),
    Method("tsvd", "TSVD", TKDParams, _run("tsvd"), order=11, short="TSVD δ={threshold}",
           doc="Truncated SVD: 1/D, with 0 where |D| ≤ δ. Less streaking than TKD, more underestimation."),
)
