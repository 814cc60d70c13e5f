"""Shared parts of the background-removal steps: input checks, padded FFT convolutions, conjugate
gradients that say when they stop short of their tolerance, and removal of a residual harmonic or
polynomial background inside the mask.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft
import torch

from ..dipole import crop_volume, pad_volume
from ..scan import ScanError

__all__ = ["ConvergenceWarning", "SolverReport", "check_field_inputs", "cg", "remove_residual", "residual_basis",
           "RESIDUAL_CHOICES"]


class ConvergenceWarning(UserWarning):
    """An iterative background solver stopped at its iteration cap before reaching its tolerance."""


@dataclass
class SolverReport:
    """How an iterative solver ended: iterations used, the cap, the final relative residual and the tolerance."""

    solver: str
    iterations: int
    max_iter: int
    residual: float
    tol: float
    converged: bool

    def finish(self, rep=None) -> "SolverReport":
        """Warn (:class:`ConvergenceWarning`, and a progress message) when the tolerance was not reached."""
        if not self.converged:
            msg = (f"{self.solver}: did not converge: relative residual {self.residual:.3g} after {self.iterations} "
                   f"iterations (tolerance {self.tol:g}, max_iter {self.max_iter}); raise max_iter or the tolerance")
            warnings.warn(msg, ConvergenceWarning, stacklevel=3)
            if rep is not None:
                rep(self.iterations, msg)
        return self

    def to_dict(self) -> dict:
        return {k: (float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def check_field_inputs(total_field, mask, noise_std=None):
    """Validate (total field ppm, mask[, N_std]) → float32 field zeroed outside, bool mask, N_std or None."""
    f = np.asarray(total_field)
    if f.ndim == 4 and f.shape[3] == 1:
        f = f[..., 0]
    if f.ndim != 3 or f.size == 0:
        raise ScanError(f"total_field: expected a 3-D volume (ppm), got shape {f.shape}")
    if np.iscomplexobj(f):
        raise ScanError("total_field: complex data given; expected a real field in ppm")
    f = f.astype(np.float32)
    m = np.asarray(mask)
    if m.ndim == 4 and m.shape[3] == 1:
        m = m[..., 0]
    if m.shape != f.shape:
        raise ScanError(f"mask: shape {m.shape} does not match the total field {f.shape}")
    m = m > 0.5 if m.dtype != bool else m.copy()
    if not m.any():
        raise ScanError("mask: empty (no voxel inside); expected a brain mask")
    if not np.all(np.isfinite(f[m])):
        raise ScanError("total_field: contains NaN or Inf inside the mask")
    f = np.where(m, f, np.float32(0.0))
    n = None
    if noise_std is not None:
        n = np.asarray(noise_std, np.float32)
        if n.shape != f.shape:
            raise ScanError(f"noise_std: shape {n.shape} does not match the total field {f.shape}")
        if not np.all(np.isfinite(n[m])) or np.any(n[m] <= 0):
            raise ScanError("noise_std: expected finite positive values (ppm) inside the mask")
    return f, m, n


def padded(shape, margin_vox):
    return tuple(int(scipy.fft.next_fast_len(int(n + m), real=True)) for n, m in zip(shape, margin_vox))


class Conv:
    """Convolutions on one zero-padded grid (torch, real kernels on the rfft half grid)."""

    def __init__(self, shape, pshape, dev):
        self.shape, self.pshape, self.dev = tuple(shape), tuple(pshape), dev

    def fft(self, x):
        t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, np.float32), device=self.dev)
        return torch.fft.rfftn(pad_volume(t.to(torch.float32), self.pshape), s=self.pshape)

    def ifft(self, X):
        return crop_volume(torch.fft.irfftn(X, s=self.pshape), self.shape)

    def __call__(self, x, K):
        return self.ifft(self.fft(x) * K)


def dot(a, b) -> float:
    """⟨a, b⟩ of two float32 tensors (BLAS dot: no float64 copies of the volumes; relative error ~1e-5)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def cg(apply, b, x0, tol, max_iter, rep=None, label="CG"):
    """Conjugate gradients for an SPD operator on torch tensors → (x, :class:`SolverReport`).

    Stops when ‖r‖/‖b‖ < ``tol`` (converged) or after ``max_iter`` iterations (not converged; the
    caller decides whether to warn with :meth:`SolverReport.finish`).
    """
    x = x0.clone()
    r = b.clone() if not bool(x.any()) else b - apply(x)
    pdir = r.clone()
    rs = dot(r, r)
    bn = math.sqrt(dot(b, b)) or 1.0
    rel = math.sqrt(max(rs, 0.0)) / bn
    it = 0
    while rel >= tol and it < max_iter:
        it += 1
        Ap = apply(pdir)
        pAp = dot(pdir, Ap)
        if pAp <= 0:
            break
        a = rs / pAp
        x.add_(pdir, alpha=a)
        r.add_(Ap, alpha=-a)
        del Ap
        rs_new = dot(r, r)
        rel = math.sqrt(max(rs_new, 0.0)) / bn
        if rep is not None:
            rep(it, f"{label} {it}", residual=rel)
        pdir.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return x, SolverReport(label, it, int(max_iter), float(rel), float(tol), bool(rel < tol))


# ------------------------------------------------------------------------ residual background removal
#: ``residual`` parameter values of the background steps: none, or solid harmonics / polynomials up to an order
RESIDUAL_CHOICES = ("none", "harmonic1", "harmonic2", "harmonic3", "poly1", "poly2", "poly3")


def _monomials(order):
    return [e for d in range(order + 1) for e in itertools.product(range(d + 1), repeat=3) if sum(e) == d]


def residual_basis(order: int, harmonic: bool) -> list:
    """Coefficient vectors over :func:`_monomials` (``order``) of the basis: all monomials of degree ≤ order, or
    the harmonic polynomials (solid harmonics, (order+1)² of them: the null space of the Laplacian)."""
    mons = _monomials(order)
    if not harmonic:
        return [np.eye(len(mons))[i] for i in range(len(mons))]
    low = {e: i for i, e in enumerate(_monomials(max(order - 2, 0)))}
    L = np.zeros((len(low), len(mons)))
    for j, (a, b, c) in enumerate(mons):   # ∇² x^a y^b z^c
        for ax, k in enumerate((a, b, c)):
            if k >= 2:
                e = [a, b, c]
                e[ax] -= 2
                L[low[tuple(e)], j] += k * (k - 1)
    _, s, vt = np.linalg.svd(L) if order >= 2 else (None, np.zeros(0), np.eye(len(mons)))
    rank = int(np.sum(s > 1e-9))
    return list(vt[rank:])


def remove_residual(local, mask, voxel_size, kind: str = "none"):
    """Subtract the least-squares fit of a smooth background from ``local`` inside ``mask``.

    Parameters
    ----------
    local : ndarray
        Local field (ppm), 3-D.
    mask : ndarray of bool
        Where the fit is made and the result is valid.
    voxel_size : sequence of float
        Voxel sizes (mm): the basis is in physical coordinates.
    kind : str
        One of :data:`RESIDUAL_CHOICES`: ``harmonicN`` fits the solid harmonics of degree ≤ N (what a background
        source leaves, harmonic inside the brain), ``polyN`` every polynomial of degree ≤ N (also removes the
        non-harmonic low-order part of the true local field), ``none`` returns ``local`` unchanged.

    Returns
    -------
    ndarray
        float32, 0 outside ``mask``.

    References
    ----------
    Harmonic (polynomial) background fits after background removal: e.g. the residual background removal of
    Schweser et al. 2011 (NeuroImage 54:2789) and the spherical-harmonic fit of Wen et al. 2014 (MRM 72:1065).
    """
    if kind not in RESIDUAL_CHOICES:
        raise ScanError(f"residual: expected one of {RESIDUAL_CHOICES}, got {kind!r}")
    out = np.where(mask, local, 0).astype(np.float32)
    if kind == "none" or not mask.any():
        return out
    order = int(kind[-1])
    basis = residual_basis(order, kind.startswith("harmonic"))
    idx = np.nonzero(mask)
    h = max(0.5 * (idx[ax].max() - idx[ax].min()) * float(d) for ax, d in enumerate(voxel_size)) or 1.0
    coords = [(idx[ax] * float(d) - 0.5 * (idx[ax].min() + idx[ax].max()) * float(d)) / h
              for ax, d in enumerate(voxel_size)]   # one isotropic scale (harmonic stays harmonic)
    mons = _monomials(order)
    P = np.stack([coords[0] ** a * coords[1] ** b * coords[2] ** c for a, b, c in mons], axis=1)
    A = P @ np.stack(basis, axis=1)
    y = out[idx].astype(np.float64)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    out[idx] = (y - A @ coef).astype(np.float32)
    return out
