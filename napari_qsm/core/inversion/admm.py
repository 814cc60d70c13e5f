"""Shared pieces of the k-space splitting solvers (TV-ADMM, RTS, HD-QSM, NDI): grid, operators, LSMR.

The problem lives on the mask's bounding box plus a margin, zero-padded to a fast real-FFT size
(``pad_factor`` × the box). Finite differences are periodic forward differences on that grid, so
∇ᴴ∇ is diagonal in k-space with symbol L(k) = Σ_j (2 − 2cos(2πk_j/N_j))/Δ_j² and the x-updates of
the ADMM solvers are closed form (Bilgic et al. 2014).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..dipole import check_voxel_size, dipole_kernel, fast_shape, half_weights, unit_vector


def bbox(mask: np.ndarray, margin: int, shape=None) -> tuple:
    """Slices of the mask's bounding box grown by ``margin`` voxels (clipped to ``shape``, default the mask's)."""
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape if shape is None else shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def check_inputs(field, mask) -> tuple[np.ndarray, np.ndarray]:
    """Float32 field and bool mask, with the errors the project promises for bad input."""
    field = np.asarray(field, np.float32)
    mask = np.asarray(mask).astype(bool)
    if field.ndim != 3:
        raise ValueError(f"field: expected a 3-D volume, got shape {field.shape}")
    if mask.shape != field.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match field shape {field.shape}")
    if not mask.any():
        raise ValueError("mask: empty; expected a brain mask with at least one voxel")
    if not np.all(np.isfinite(field[mask])):
        raise ValueError("field: NaN or Inf inside the mask")
    return field, mask


def laplace_symbol(pshape, voxel_size, device) -> torch.Tensor:
    """L̂ = Σ_a (2 − 2cos(2πk_a/N_a))/h_a², the symbol of ∇ᴴ∇ = −∇² (periodic forward differences / voxel size) on
    the rfft half grid of ``pshape``."""
    out = None
    for ax, (n, h) in enumerate(zip(pshape, voxel_size)):
        k = np.fft.rfftfreq(n) if ax == 2 else np.fft.fftfreq(n)
        s = torch.as_tensor((2.0 - 2.0 * np.cos(2.0 * math.pi * k)) / (h * h), dtype=torch.float32, device=device)
        view = [1, 1, 1]
        view[ax] = s.numel()
        out = s.reshape(view) if out is None else out + s.reshape(view)
    return out


class Grid:
    """The cropped, padded FFT grid of one problem, with its kernels and operators (torch)."""

    def __init__(self, mask: np.ndarray, voxel_size, b0_direction, *, margin: int = 8, pad_factor: float = 1.0,
                 device="cpu"):
        self.dev = device if isinstance(device, torch.device) else torch.device(device)
        self.full_shape = tuple(mask.shape)
        self.vs = tuple(float(v) for v in check_voxel_size(voxel_size))
        self.box = bbox(mask, margin, mask.shape)
        self.shape = tuple(b.stop - b.start for b in self.box)
        self.pshape = fast_shape(self.shape, pad_factor)
        self.D = dipole_kernel(self.pshape, self.vs, unit_vector(b0_direction), device=self.dev)
        self.L = laplace_symbol(self.pshape, self.vs, self.dev)
        self.hw = half_weights(self.pshape, device=self.dev)   # rfft half-grid multiplicities
        self.mask = self.embed(mask.astype(np.float32)) > 0.5

    # ---- moving between the scan's grid and the padded grid
    def embed(self, a: np.ndarray) -> torch.Tensor:
        """A scan-shaped numpy array, cropped to the box and zero-padded (float32 tensor)."""
        t = torch.zeros(self.pshape, dtype=torch.float32, device=self.dev)
        s = self.shape
        t[:s[0], :s[1], :s[2]] = torch.as_tensor(np.ascontiguousarray(a[self.box], dtype=np.float32), device=self.dev)
        return t

    def extract(self, x: torch.Tensor, mask: np.ndarray) -> np.ndarray:
        """The padded-grid tensor back on the scan's grid, zero outside ``mask`` (float32 numpy)."""
        out = np.zeros(self.full_shape, np.float32)
        s = self.shape
        out[self.box] = x[:s[0], :s[1], :s[2]].cpu().numpy()
        out[~mask] = 0.0
        return out

    # ---- FFTs and operators
    def fft(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(x, dim=(0, 1, 2))

    def ifft(self, X: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(X, s=self.pshape, dim=(0, 1, 2))

    def conv(self, x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """Periodic convolution by a real symbol (e.g. D) on the padded grid."""
        return self.ifft(self.fft(x) * K)

    def grad(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Forward differences (periodic) / voxel size: a (3, *pshape) tensor (written into ``out`` if given)."""
        out = torch.empty((3,) + tuple(x.shape), dtype=x.dtype, device=x.device) if out is None else out
        for ax, d in enumerate(self.vs):
            n = x.shape[ax]
            o = out[ax]
            torch.sub(x.narrow(ax, 1, n - 1), x.narrow(ax, 0, n - 1), out=o.narrow(ax, 0, n - 1))
            torch.sub(x.narrow(ax, 0, 1), x.narrow(ax, n - 1, 1), out=o.narrow(ax, n - 1, 1))
            if d != 1.0:
                o.mul_(1.0 / d)
        return out

    def grad_adj(self, v: torch.Tensor) -> torch.Tensor:
        """∇ᴴ v (the adjoint of :meth:`grad`, i.e. minus the backward-difference divergence)."""
        out = torch.zeros_like(v[0])
        for ax, d in enumerate(self.vs):
            w = v[ax]
            n = w.shape[ax]
            o = out.narrow(ax, 1, n - 1)
            o.add_(w.narrow(ax, 0, n - 1), alpha=1.0 / d)
            out.narrow(ax, 0, 1).add_(w.narrow(ax, n - 1, 1), alpha=1.0 / d)
            out.sub_(w, alpha=1.0 / d)
        return out

    def dot(self, A: torch.Tensor, B: torch.Tensor) -> float:
        """Real inner product of two half spectra, as the full spectra's (Hermitian symmetry weights)."""
        return float((A.real * B.real + A.imag * B.imag).mul(self.hw).sum(dtype=torch.float64))


def shrink(v: torch.Tensor, t) -> torch.Tensor:
    """Soft threshold: sign(v)·max(|v| − t, 0) (``t`` a number or a broadcastable tensor)."""
    return v - torch.clamp(v, min=-t, max=t) if not torch.is_tensor(t) else v - torch.maximum(torch.minimum(v, t), -t)


def lsmr_diagonal(grid: Grid, d: torch.Tensor, b: torch.Tensor, iters: int, cancel_check=None) -> torch.Tensor:
    """``iters`` LSMR iterations (Fong & Saunders 2011, no damping, x₀ = 0) for diag(d)·x = b on a
    half spectrum, with the inner products of the full spectrum (so it is LSMR on the real image-space
    operator F⁻¹ d F). Early stopping is the regulariser (RTS, Kames 2018).

    Parameters
    ----------
    grid : Grid
    d : tensor, real symbol (half grid); b : tensor, complex half spectrum.
    iters : int

    Returns
    -------
    x : tensor, complex half spectrum.

    References
    ----------
    Fong DC-L, Saunders M. LSMR: An iterative algorithm for sparse least-squares problems.
    SIAM J Sci Comput 2011;33:2950-2971.
    """
    nrm = lambda A: math.sqrt(max(grid.dot(A, A), 0.0))
    beta = nrm(b)
    x = torch.zeros_like(b)
    if beta == 0:
        return x
    u = b / beta
    v = d * u
    alpha = nrm(v)
    if alpha == 0:
        return x
    v = v / alpha
    zetabar, alphabar = alpha * beta, alpha
    rho = rhobar = cbar = 1.0
    sbar = 0.0
    h, hbar = v.clone(), torch.zeros_like(b)
    for _ in range(int(iters)):
        if cancel_check is not None:
            cancel_check()
        u = d * v - alpha * u
        beta = nrm(u)
        if beta > 0:
            u = u / beta
        v = d * u - beta * v
        alpha = nrm(v)
        if alpha > 0:
            v = v / alpha
        rhoold = rho
        rho = math.hypot(alphabar, beta)
        c, s = alphabar / rho, beta / rho
        thetanew, alphabar = s * alpha, c * alpha
        rhobarold = rhobar
        thetabar = sbar * rho
        rhobar = math.hypot(cbar * rho, thetanew)
        cbar, sbar = cbar * rho / rhobar, thetanew / rhobar
        zeta, zetabar = cbar * zetabar, -sbar * zetabar
        hbar = h - (thetabar * rho / (rhoold * rhobarold)) * hbar
        x = x + (zeta / (rho * rhobar)) * hbar
        h = v - (thetanew / rho) * h
        if alpha == 0 or beta == 0:
            break
    return x


def data_weight(scan, mask: np.ndarray) -> tuple[np.ndarray, str]:
    """Data weights W for the weighted solvers: 1/N_std (else the magnitude) in the mask, normalised to
    mean 1 there, 0 outside; the mask alone when neither is given. Returns (W, what was used)."""
    noise = getattr(scan, "noise_std", None)
    mag = getattr(scan, "magnitude", None)
    if noise is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(np.abs(noise) > 0, 1.0 / np.abs(noise), 0.0)
        kind = "1/noise_std"
    elif mag is not None:
        w, kind = np.abs(mag).astype(np.float64), "magnitude"
    else:
        return mask.astype(np.float32), "mask"
    w = np.where(mask & np.isfinite(w), w, 0.0)
    mean = w[mask].mean()
    if not mean > 0:
        return mask.astype(np.float32), "mask"
    return (w / mean).astype(np.float32), kind
