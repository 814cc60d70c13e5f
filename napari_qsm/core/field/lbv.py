"""Laplacian boundary value (LBV) background removal on anisotropic voxels.

∇²f_L = ∇²f inside the mask with f_L = 0 on its boundary: the background is the harmonic function
that equals the total field on the boundary. Two discrete Laplacians with the physical voxel sizes:

* ``stencil=7``: the 7-point Laplacian Σᵢ δᵢ²/hᵢ², second order. Its error on a harmonic background,
  Σᵢ hᵢ²/12·∂ᵢ⁴f, grows with the largest voxel size: on 0.75×0.75×3 mm voxels it is 16× the
  in-plane term.
* ``stencil=19``: the 19-point (faces and edges) "Mehrstellen" Laplacian
  Σᵢ δᵢ² + 1/12·Σᵢ<ⱼ (hᵢ² + hⱼ²)·δᵢ²δⱼ². For a harmonic f, ∂ᵢ⁴f = −Σⱼ≠ᵢ ∂ᵢ²∂ⱼ²f, so the cross terms
  cancel the 7-point error: fourth order for the background on any voxel shape. Its interior voxels
  need all 18 face and edge neighbours in the mask (the boundary is the rest of the mask). Its
  matrix stays positive definite for every voxel shape (the cross terms take at most 2/3 of the
  7-point symbol).

Thick slices (``refine="auto"``, the default): the Dirichlet boundary is the layer of mask voxels with a
neighbour outside, and LBV returns f_L = 0 there. On 0.75×0.75×3 mm voxels a voxel whose slice neighbour is
outside is 3 mm of brain, and where the brain's surface is nearly parallel to the slices (its top and bottom)
that layer is several millimetres of cortex wide: 3.5–4.7 % of the brain on the benchmark slabs. So each thick
voxel is cut into 3 or 5 nodes along that axis (about the finest voxel side apart), the centre node holding the
measured value and the others interpolated between measured centres (parabolas, exact for quadratics;
never extrapolated past an edge voxel's centre), LBV solved on the nodes, and the local field averaged back over each
voxel's interior nodes. The boundary stays at measured voxel centres; an edge voxel keeps the nodes on its inner
side. The cost: where a background is under-resolved along the thick axis (several ppm within 10 mm, an air
sphere at the brain's edge), the interpolation leaks some of it into the local field (``benchmarks/lbv_refine.py``
and ``tests/core/field/test_lbv_refine.py`` give the numbers).
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy import ndimage

from ..dipole import check_voxel_size
from ..params import param
from ..progress import Reporter, check_cancel
from ..scan import ScanError
from .bgtools import RESIDUAL_CHOICES, SolverReport, check_field_inputs, remove_residual

__all__ = ["LBVParams", "lbv", "laplacian_stencil"]


def laplacian_stencil(voxel_size, points: int = 7) -> dict:
    """{offset (di, dj, dk): weight (1/mm²)} of the 7- or 19-point Laplacian on voxels of ``voxel_size``."""
    a = [1.0 / (float(d) ** 2) for d in voxel_size]
    A = sum(a)
    st = {}
    if points == 7:
        st[(0, 0, 0)] = -2.0 * A
        for i in range(3):
            for s in (1, -1):
                o = [0, 0, 0]
                o[i] = s
                st[tuple(o)] = a[i]
        return st
    if points != 19:
        raise ScanError(f"stencil: expected 7 or 19, got {points!r}")
    st[(0, 0, 0)] = -4.0 / 3.0 * A
    for i in range(3):
        for s in (1, -1):
            o = [0, 0, 0]
            o[i] = s
            st[tuple(o)] = a[i] - (a[i] + A) / 6.0
    for i, j in itertools.combinations(range(3), 2):
        for si, sj in itertools.product((1, -1), repeat=2):
            o = [0, 0, 0]
            o[i], o[j] = si, sj
            st[tuple(o)] = (a[i] + a[j]) / 12.0
    return st


@dataclass
class LBVParams:
    tol: float = param(1e-6, "CG relative residual tolerance", min=1e-12, max=1e-1)
    max_iter: int = param(3000, "CG iterations at most (a warning when the tolerance is not reached)", min=1,
                          max=100000)
    peel: int = param(0, "boundary layers (voxels) removed from the returned mask (every dropped brain voxel is lost "
                      "to the inversion)", min=0, max=20)
    stencil: int = param(7, "Laplacian: 7-point (2nd order) or 19-point (4th order on harmonic backgrounds, any "
                         "voxel shape)", choices=(7, 19))
    coarse_levels: int = param(1, "coarser grids (2x along the finer axes) solved first to start the CG; 0 = none",
                               min=0, max=3)
    refine: str = param("auto", "solve on a grid with thick voxels cut into nodes about as far apart as the finest "
                        "voxel side (3 or 5 per voxel, the field between voxel centres interpolated by parabolas), so that the "
                        "Dirichlet boundary stays at measured voxel centres and an edge voxel keeps its inner nodes; "
                        "auto = when a voxel side is ≥ 1.5x the finest; off = the scan's grid", choices=("auto", "off"))
    residual: str = param("none", "after removal, fit and subtract a smooth background inside the returned mask: "
                          "solid harmonics (harmonicN) or all polynomials (polyN) of degree ≤ N; none = off",
                          choices=RESIDUAL_CHOICES)


def _system(f, inner, st):
    """Sparse −L on the interior voxels and the right-hand side −(L f) there (f known on the boundary).

    Built straight into CSR with one slot per stencil point and row (a neighbour on the boundary keeps its slot with
    the value 0 on the diagonal's column): int32 indices, no COO copy, about 100 bytes per interior voxel."""
    nin = int(inner.sum())
    offs = [o for o in st if o != (0, 0, 0)]
    itype = np.int32 if nin * (len(offs) + 1) < 2 ** 31 - 1 else np.int64    # indptr's last entry is nin × slots
    idx = np.full(f.shape, -1, itype)
    idx[inner] = np.arange(nin, dtype=itype)
    fd = f.astype(np.float64)
    cols = np.empty((nin, len(offs) + 1), itype)
    vals = np.empty((nin, len(offs) + 1), np.float64)
    rows = np.arange(nin, dtype=itype)
    cols[:, 0], vals[:, 0] = rows, -st[(0, 0, 0)]
    rhs = -st[(0, 0, 0)] * fd[inner]
    for c, o in enumerate(offs, 1):
        sh = tuple(-x for x in o)
        w = st[o]
        rhs -= w * np.roll(fd, sh, axis=(0, 1, 2))[inner]
        j = np.roll(idx, sh, axis=(0, 1, 2))[inner]
        ok = j >= 0
        cols[:, c] = np.where(ok, j, rows)
        vals[:, c] = np.where(ok, -w, 0.0)
    k = len(offs) + 1
    indptr = np.arange(0, nin * k + 1, k, dtype=itype)
    A = sp.csr_matrix((vals.ravel(), cols.ravel(), indptr), shape=(nin, nin))
    return A, rhs


def _block_mean(a, fac):
    pad = [(0, (-n) % k) for n, k in zip(a.shape, fac)]
    a = np.pad(a, pad)
    sh = [n // k for n, k in zip(a.shape, fac)]
    return a.reshape(sh[0], fac[0], sh[1], fac[1], sh[2], fac[2]).mean(axis=(1, 3, 5))


def _coarse_start(f, m, inner, vs, points, tol, max_iter, levels):
    """The interior values of the LBV solution on a 2x coarser grid (axes at most 1.5x the finest voxel size are
    halved), repeated onto this grid: a start for the CG (its smooth error is gone)."""
    fac = [2 if d <= 1.5 * min(vs) else 1 for d in vs]
    if min(n // k for n, k in zip(f.shape, fac)) < 8:
        return None
    cnt = _block_mean(m.astype(np.float32), fac)
    mc = cnt >= 0.5
    fc = (_block_mean(f * m, fac) / np.maximum(cnt, 1e-6)).astype(np.float32)
    st = laplacian_stencil([d * k for d, k in zip(vs, fac)], points)
    ic = ndimage.binary_erosion(mc, _footprint(st), border_value=0)
    if not ic.any():
        return None
    xc, _ = _solve(fc * mc, mc, ic, [d * k for d, k in zip(vs, fac)], points, tol, max_iter, levels - 1, None)
    up = np.zeros(mc.shape, np.float64)
    up[ic] = xc
    for ax, k in enumerate(fac):
        up = np.repeat(up, k, axis=ax)
    return up[: f.shape[0], : f.shape[1], : f.shape[2]][inner]


def _footprint(st):
    struct = np.zeros((3, 3, 3), bool)
    for o in st:
        struct[o[0] + 1, o[1] + 1, o[2] + 1] = True
    return struct


def _solve(f, m, inner, vs, points, tol, max_iter, levels, rep):
    """CG on the interior (started from the coarse solution when ``levels`` > 0) → (x, SolverReport)."""
    st = laplacian_stencil(vs, points)
    x0 = _coarse_start(f, m, inner, vs, points, tol, max_iter, levels) if levels > 0 else None
    A, rhs = _system(f, inner, st)
    count = [0]

    def cb(_x):
        count[0] += 1
        if rep is not None and count[0] % 20 == 0:
            rep(count[0], f"LBV CG {count[0]}")

    x, info = spla.cg(A, rhs, x0=x0, rtol=tol, maxiter=max_iter, callback=cb)
    bn = float(np.linalg.norm(rhs)) or 1.0
    res = float(np.linalg.norm(rhs - A @ x)) / bn
    return x, SolverReport("LBV CG", count[0], int(max_iter), res, float(tol), info == 0)


#: at most this many mask nodes on thin nodes (about 0.16 KB each at the peak: 3.3 GB); above, fewer nodes per voxel
MAX_NODES = 20_000_000


def refine_factors(voxel_size, cap: int = 5, mask_voxels: int | None = None, max_nodes: int | None = None) -> tuple:
    """Nodes per voxel along each axis for ``refine="auto"``: an odd number (so that the voxel centre is a node) about
    h / h_min when h ≥ 1.5 h_min, at most ``cap``, else 1. 0.75×0.75×3 mm → (1, 1, 5); 1×1×2 and 2×2×5 mm →
    (1, 1, 3); isotropic → (1, 1, 1). With ``mask_voxels``, the largest count is lowered (5 → 3 → 1) until
    ``mask_voxels`` × the product is at most ``max_nodes`` (default :data:`MAX_NODES`)."""
    hmin = min(voxel_size)
    out = []
    for h in voxel_size:
        r = h / hmin
        out.append(1 if r < 1.5 else int(min(cap, max(3, 2 * int(np.floor((r - 1) / 2 + 0.5)) + 1))))
    budget = MAX_NODES if max_nodes is None else int(max_nodes)
    while mask_voxels is not None and int(np.prod(out)) * int(mask_voxels) > budget and max(out) > 1:
        i = int(np.argmax(out))
        out[i] -= 2
    return tuple(out)


def subdivide(f, m, fac):
    """The total field on a grid with ``k = fac[axis]`` nodes per voxel along each cut axis (odd k), at offsets
    (i − k//2)/k of a voxel from its centre. The centre node is the voxel's value (the field at its centre); a node
    between the centre and a mask neighbour's centre is interpolated along that axis: the parabola through the voxel
    and its two neighbours when both are in the mask (exact for quadratics), else the line to the one neighbour on
    its side. Nodes on the side of a voxel with no mask neighbour are left out of the mask: the mask's edge along a
    cut axis is at measured voxel centres, never extrapolated. Returns the fine field (float32) and mask."""
    out, mo = np.where(m, f, 0).astype(np.float64), np.asarray(m, bool)
    for ax, k in enumerate(fac):
        if k == 1:
            continue
        if k % 2 == 0:
            raise ValueError(f"subdivide: nodes per voxel must be odd, got {k}")
        n = out.shape[ax]
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(0, n - 1), slice(1, n)
        lo, hi = tuple(lo), tuple(hi)
        up, has_u = np.zeros_like(out), np.zeros(mo.shape, bool)     # f(j+1) − f(j), both in the mask
        up[lo], has_u[lo] = out[hi] - out[lo], mo[hi] & mo[lo]
        dn, has_d = np.zeros_like(out), np.zeros(mo.shape, bool)     # f(j) − f(j−1)
        dn[hi], has_d[hi] = up[lo], has_u[lo]
        both = has_u & has_d
        slope = np.where(both, 0.5 * (up + dn), np.where(has_u, up, np.where(has_d, dn, 0.0)))
        curv = np.where(both, up - dn, 0.0)
        e = lambda a: np.expand_dims(a, ax + 1)                   # noqa: E731 - the node axis next to ``ax``
        off = ((np.arange(k) - k // 2) / k).reshape([k if i == ax + 1 else 1 for i in range(4)])
        fine = e(out) + e(slope) * off + 0.5 * e(curv) * off * off
        keep = e(mo) & ((off == 0) | ((off > 0) & e(has_u)) | ((off < 0) & e(has_d)))
        sh = [s * (k if i == ax else 1) for i, s in enumerate(mo.shape)]
        out, mo = np.where(keep, fine, 0.0).reshape(sh), keep.reshape(sh)
    return out.astype(np.float32), mo


def coarsen(local, inner, fac):
    """The fine solution back on the scan's grid: the mean over each voxel's interior nodes; a voxel is returned when
    at least one of its nodes is interior."""
    s = _block_mean(np.where(inner, local, 0).astype(np.float64), fac)
    c = _block_mean(inner.astype(np.float64), fac)
    return np.where(c > 0, s / np.where(c > 0, c, 1), 0).astype(np.float32), c > 0


def lbv(total_field, mask, params: LBVParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
        b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """Laplacian boundary value background removal.

    Solves −L f_L = −L f on the interior voxels (f_L = 0 on the boundary) by conjugate gradients to ``tol``
    (a :class:`~napari_qsm.core.field.bgtools.ConvergenceWarning` when ``max_iter`` comes first), then peels
    ``peel`` layers off the interior (the values next to the boundary are the least reliable). With ``refine="auto"``
    it solves on thin nodes along thick voxel sides (the module's docstring says how).

    Parameters
    ----------
    total_field, mask : ndarray
        Total field (ppm) and brain mask, 3-D.
    params : LBVParams, optional
    voxel_size : sequence of float
        mm (the Laplacian's weights).

    Returns
    -------
    local : ndarray (float32, ppm; 0 outside ``peeled``), peeled : ndarray of bool
        On the scan's grid. With ``refine`` on, a voxel is returned when at least one of its nodes is interior (its
        value the mean over those), then ``peel`` layers are removed on the scan's grid.

    References
    ----------
    Zhou, Liu, Spincemaille, Wang 2014, NMR Biomed 27:312 (LBV); Collatz 1960 / Spotz & Carey 1996 for the
    fourth-order compact (Mehrstellen) Laplacian.
    """
    p = params or LBVParams()
    f_full, m_full, _ = check_field_inputs(total_field, mask)
    vs = vs_scan = check_voxel_size(voxel_size)
    if not m_full.any():
        raise ScanError("mask: empty; LBV needs a solid mask")
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(m_full))  # the work stays in the mask's box
    f, m = f_full[box], m_full[box]
    fac = (1, 1, 1)
    if p.refine == "auto":
        fac, want = refine_factors(vs, mask_voxels=int(m.sum())), refine_factors(vs)
        if fac != want:
            warnings.warn(f"background: LBV on thin nodes would need {int(np.prod(want)) * int(m.sum())} nodes for this "
                          f"mask; using {'×'.join(map(str, fac))} nodes per voxel instead of "
                          f"{'×'.join(map(str, want))} (at most {MAX_NODES}); background.refine=off solves on the "
                          "scan's grid", RuntimeWarning, stacklevel=2)
    if fac != (1, 1, 1):
        f, m = subdivide(f, m, fac)
        vs = tuple(d / k for d, k in zip(vs, fac))
    rep = Reporter(progress, cancel, total=p.max_iter, stage="background")
    inner = ndimage.binary_erosion(m, _footprint(laplacian_stencil(vs, int(p.stencil))), border_value=0)
    if not inner.any():
        raise ScanError("mask: no interior voxel (every mask voxel touches the outside); LBV needs a solid mask")
    rep(0, "LBV: building the Laplacian")
    x, info = _solve(f, m, inner, vs, int(p.stencil), float(p.tol), int(p.max_iter), int(p.coarse_levels), rep)
    check_cancel(cancel)
    info.finish(rep)
    local = np.zeros(f.shape, np.float32)
    local[inner] = x.astype(np.float32)
    if fac != (1, 1, 1):
        local, inner = coarsen(local, inner, fac)
        vs = vs_scan
    out_mask = inner
    if p.peel > 0:
        out_mask = ndimage.binary_erosion(inner, ndimage.generate_binary_structure(3, 1), iterations=int(p.peel),
                                          border_value=0)
        if not out_mask.any():
            out_mask = inner
    local_full = np.zeros(m_full.shape, np.float32)
    mask_full = np.zeros(m_full.shape, bool)
    local_full[box], mask_full[box] = local, out_mask
    return remove_residual(local_full, mask_full, vs, p.residual), mask_full
