"""Geometry of the procedural phantoms: rotations, affines, smooth random fields, signed distances."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..dipole import check_voxel_size, unit_vector

_NOISE_BOX = np.array([115.0, 125.0, 115.0])  # half size (mm) of the fixed grids of random fields


def oblique_direction(angle_deg: float, axis: str = "x") -> np.ndarray:
    """(0, 0, 1) rotated by ``angle_deg`` (right-handed) about voxel axis ``axis`` ("x", "y" or "z")."""
    a = math.radians(float(angle_deg))
    ax = str(axis).lower()
    if ax not in ("x", "y", "z"):
        raise ValueError(f"axis: expected 'x', 'y' or 'z', got {axis!r}")
    return _rotation(ax, a) @ np.array([0.0, 0.0, 1.0])


def affine_for(shape: Sequence[int], voxel_size: Sequence[float], b0_direction) -> np.ndarray:
    """Voxel→scanner (mm) affine whose B0 (scanner z) is ``b0_direction`` in the voxel frame.

    The rotation part is R·diag(voxel_size). R is the smallest rotation with R·b̂ = ẑ, so that
    Rᵀ·(0, 0, 1) = b̂. The translation puts the volume centre at the scanner origin.
    """
    b = unit_vector(b0_direction)
    vs = check_voxel_size(voxel_size)
    ez = np.array([0.0, 0.0, 1.0])
    c = float(b @ ez)
    if c < -1.0 + 1e-12:
        R = np.diag([1.0, -1.0, -1.0])
    else:
        v = np.cross(b, ez)
        vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
        R = np.eye(3) + vx + vx @ vx / (1.0 + c)
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(vs)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    A[:3, 3] = -A[:3, :3] @ centre
    return A


def _rotation(axis: str, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _euler(deg) -> np.ndarray:
    ax, ay, az = (math.radians(float(d)) for d in deg)
    return _rotation("z", az) @ _rotation("y", ay) @ _rotation("x", ax)


def _smin(a, b, k):
    """Polynomial smooth minimum (smooth union of two signed distances)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


_SAMPLE_BLOCK = 1 << 22  # elements per block of _SmoothNoise.sample (16 MB of float32)


class _SmoothNoise:
    """Zero-mean, unit-variance smooth random field on a fixed physical box.

    White noise on a coarse grid (spacing ``spacing`` mm) is Gaussian-filtered (σ ``sigma`` mm)
    and evaluated on rectilinear grids by separable linear interpolation. That is O(N), and the
    result does not depend on the sampling grid, so the same seed gives the same field at any
    resolution.
    """

    def __init__(self, rng: np.random.Generator, sigma: float, spacing: float | None = None,
                 half=_NOISE_BOX):
        self.h = float(spacing or sigma / 2.0)
        half = np.asarray(half, dtype=np.float64)
        n = np.ceil(2 * half / self.h).astype(int) + 1
        c = rng.standard_normal(tuple(n)).astype(np.float32)
        c = ndimage.gaussian_filter(c, sigma / self.h, mode="wrap")
        c /= max(float(c.std()), 1e-12)
        self.c = c
        self.lo = -half
        self.max_abs = float(np.abs(c).max())

    def gradient_norm(self) -> "_SmoothNoise":
        """|∇field| (per mm) as a field on the same grid."""
        out = object.__new__(_SmoothNoise)
        out.h, out.lo = self.h, self.lo
        gr = np.gradient(self.c, self.h)
        out.c = np.sqrt(sum(g * g for g in gr)).astype(np.float32)
        out.max_abs = float(out.c.max())
        return out

    def sample(self, axes) -> np.ndarray:
        """The field on the rectilinear grid ``axes`` (mm, one 1-D array per axis), float32.

        Large grids are filled in blocks of first-axis rows: each value depends only on its own
        coordinates, so the blocks give the same numbers as one pass, with block-sized temporaries
        (issue 23: the fine grid of the 1 mm head is 157 MB per array).
        """
        n = [np.size(a) for a in axes]
        rows = max(1, _SAMPLE_BLOCK // max(int(np.prod(n[1:])), 1))
        if len(axes) != 3 or n[0] <= rows:
            return self._sample(axes)
        x0 = np.asarray(axes[0])
        out = None
        for r0 in range(0, n[0], rows):
            blk = self._sample([x0[r0:r0 + rows], axes[1], axes[2]])
            if out is None:
                out = np.empty(n, blk.dtype)
            out[r0:r0 + rows] = blk
        return out

    def _sample(self, axes) -> np.ndarray:
        out = self.c
        for ax, x in enumerate(axes):
            u = (np.asarray(x, dtype=np.float64) - self.lo[ax]) / self.h
            u = np.clip(u, 0.0, self.c.shape[ax] - 1 - 1e-6)
            i = np.floor(u).astype(np.intp)
            w = (u - i).astype(np.float32)
            a = np.take(out, i, axis=ax)
            b = np.take(out, i + 1, axis=ax)
            shape = [1, 1, 1]
            shape[ax] = -1
            b -= a                     # a + (b − a)·w, in place (the same float32 operations)
            b *= w.reshape(shape)
            a += b
            out = a
        return out


def _ellipsoid_sdf(P, centre, semi, rot=None):
    """Approximate signed distance (mm) to an ellipsoid: (f − 1)/|∇f| with f = |Rᵀ(p−c)/a|."""
    d = [P[k] - np.float32(centre[k]) for k in range(3)]
    if rot is None:
        q = d
    else:
        r = np.asarray(rot, dtype=np.float32)
        q = [r[0, k] * d[0] + r[1, k] * d[1] + r[2, k] * d[2] for k in range(3)]
    a = np.asarray(semi, dtype=np.float32)
    f2 = (q[0] / a[0]) ** 2 + (q[1] / a[1]) ** 2 + (q[2] / a[2]) ** 2
    g2 = (q[0] / a[0] ** 2) ** 2 + (q[1] / a[1] ** 2) ** 2 + (q[2] / a[2] ** 2) ** 2
    f = np.sqrt(f2)
    grad = np.sqrt(g2) / np.maximum(f, np.float32(1e-6))
    grad = np.clip(grad, np.float32(1.0 / a.max()), np.float32(1.0 / a.min()))
    return (f - 1.0) / grad


def _polyline_distance(P, pts):
    """Distance (mm) from points P to a polyline with vertices ``pts`` (m, 3)."""
    best = None
    for a, b in zip(pts[:-1], pts[1:]):
        ab = (b - a).astype(np.float32)
        L2 = float(ab @ ab)
        d0, d1, d2 = P[0] - np.float32(a[0]), P[1] - np.float32(a[1]), P[2] - np.float32(a[2])
        if L2 < 1e-12:
            t = np.float32(0.0)
        else:
            t = np.clip((d0 * ab[0] + d1 * ab[1] + d2 * ab[2]) / np.float32(L2), 0.0, 1.0)
        e2 = (d0 - t * ab[0]) ** 2 + (d1 - t * ab[1]) ** 2 + (d2 - t * ab[2]) ** 2
        best = e2 if best is None else np.minimum(best, e2)
    return np.sqrt(best)
