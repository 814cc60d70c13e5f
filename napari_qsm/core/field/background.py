"""Background field removal (step family "background").

Inputs of every method: ``run(total_field, mask, params=None, *, voxel_size=(1, 1, 1),
b0_direction=(0, 0, 1), noise_std=None, device="auto", progress=None, cancel=None)
-> (local_field, eroded_mask)``: the total field (ppm, unwrapped, 3-D) and the brain mask in; the
local field (ppm, float32, 0 outside) and the mask it is valid on (bool) out. FFT work runs in
torch on ``device`` with zero padding (the helpers of :mod:`napari_qsm.core.dipole`).

Methods and their conventions
-----------------------------
``vsharp`` (default): V-SHARP (Li et al. 2011; QSMxT's default). For spherical mean value
kernels S_r (normalised balls) from ``radius_max`` (12 mm) down to ``radius_min`` (1 mm, at
least the largest voxel size) in ``radius_step`` (1 mm) steps, each voxel takes the high-pass
f − S_r∗f of the largest r whose ball fits in the mask (S_r∗mask > 0.999). The result is
deconvolved with the largest kernel, dividing by 1 − S_rmax where |1 − S_rmax| > ``threshold``
(0.05) and zeroing the rest (truncated SVD), and masked with the mask eroded by the smallest
radius. The mean inside the mask (a constant) is lost, as with every SHARP-type method.

``resharp``: RESHARP (Sun & Wilman 2014): argmin_f_L ‖M(C∗f_L − C∗f)‖² + λ‖f_L‖², C = δ − S_r
the SMV high-pass (r = ``radius``, 6 mm as in the QSMInvNet+ paper), M the mask eroded by r.
Normal equations (CᵀMC + λI) f_L = CᵀMC f solved by conjugate gradients (tol 1e-6, 30 iterations).
λ convention: the field in ppm, C with unit-sum S (so C∗f is in ppm), both terms plain sums of
squares over the voxels (no normalisation by the voxel count), λ multiplying ‖f_L‖² over the field
of view. Default 1e-4, the value QSM.rs ships (REFERENCES.md); that QSM.rs scales its two terms
exactly like this is our reading, not verified against its code. The MEDI toolbox's α = 0.01 is a
different scale.

``pdf``: projection onto dipole fields (Liu et al. 2011, the MEDI toolbox's PDF). The background is
the field of a susceptibility χ_b outside the mask: χ_b = argmin ‖W·M(f − D∗((1−M)χ_b))‖², W =
1/N_std normalised to mean 1 in the mask (1 without N_std), solved by CG on the normal equations
(tol 1e-5 as the toolbox), D the dipole kernel of :mod:`napari_qsm.core.dipole` (D(0) = 0) on a
grid padded by ``pad_factor`` (1 = the field of view, as the toolbox). No regularisation beyond
early stopping. Speed: the CG is first run on 2x and 4x coarser grids (``coarse_levels`` = 2, block
means of field, mask and weights), each solution, repeated onto the next finer grid, starting its
CG; the CG is capped at ``max_iter`` = 30 iterations per grid; dot products are float32 BLAS dots.
The toolbox's bound is √N (``max_iter=0``): 2217 iterations for a 160×192×160 volume, tens of
minutes on a 2-core CPU, and tol 1e-5 is not reached before it. On the raw 1 mm head (160×192×160,
fitted total field, 1 thread, load ~14): 30 iterations after 2 coarse levels took 23 s for a
local-field NRMSE of 43.2 %, 100 after 1 level 68 s for 43.8 %, 15 after 2 levels 14 s for 44.3 %
(the version before took 338 s for 100 iterations: float64 copies for every dot product).

``lbv``: Laplacian boundary value (Zhou et al. 2014): ∇²f_L = ∇²f inside the mask with f_L = 0 on
its boundary (the mask voxels with a face neighbour outside), i.e. the background is the harmonic
function that equals f on the boundary. The 7-point Laplacian with physical voxel sizes on the
interior voxels is solved by scipy.sparse conjugate gradients (tol 1e-6 relative residual); no
regularisation. ``peel`` layers are then removed from the mask (the boundary values are the least
reliable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch
from scipy import ndimage

from ..device import resolve_device
from ..dipole import check_voxel_size, crop_volume, dipole_kernel, fast_shape, pad_volume, unit_vector
from ..params import param
from ..progress import Reporter, check_cancel
from ..scan import ScanError
from .steps import Step

__all__ = ["VSharpParams", "ResharpParams", "PDFParams", "LBVParams", "vsharp", "resharp", "pdf", "lbv",
           "smv_kernel", "STEPS"]


# --------------------------------------------------------------------------------------- helpers
def check_field_inputs(total_field, mask, noise_std=None):
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


def _padded(shape, margin_vox):
    return tuple(int(scipy.fft.next_fast_len(int(n + m), real=True)) for n, m in zip(shape, margin_vox))


def smv_kernel(pshape, voxel_size, radius_mm, device, sub: int = 5) -> torch.Tensor:
    """rfft of the normalised ball of radius ``radius_mm`` (centred at the origin, wrapped), real, on ``pshape``.

    Each voxel is weighted by the fraction of its volume inside the sphere (``sub``³ sample points
    per voxel), so the kernel's second moments are nearly isotropic even on anisotropic grids and
    its mean of a harmonic field stays the centre value (a plain voxel-centre ball on 1.5x1.5x4 mm
    voxels left 3.8 % of an analytic background after a 12 mm SHARP step).
    """
    vs = check_voxel_size(voxel_size)
    h = [int(math.ceil(radius_mm / d + 0.5)) for d in vs]
    off = (np.arange(sub) + 0.5) / sub - 0.5
    g = np.meshgrid(*[((np.arange(-k, k + 1)[:, None] + off[None, :]) * d).ravel() for k, d in zip(h, vs)],
                    indexing="ij", sparse=True)
    inside = (sum(x * x for x in g) <= radius_mm * radius_mm).astype(np.float64)
    n = [2 * k + 1 for k in h]
    ball = inside.reshape(n[0], sub, n[1], sub, n[2], sub).sum(axis=(1, 3, 5))
    ball /= ball.sum()
    k = torch.zeros(pshape, dtype=torch.float64, device=device)
    k[: ball.shape[0], : ball.shape[1], : ball.shape[2]] = torch.as_tensor(ball, device=device)
    k = torch.roll(k, shifts=tuple(-x for x in h), dims=(0, 1, 2))
    return torch.fft.rfftn(k).real.to(torch.float32)


class _Conv:
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


def _radii(p, vs):
    rmin = max(float(p.radius_min), float(np.max(vs)))
    rmax = max(float(p.radius_max), rmin)
    r = list(np.arange(rmax, rmin - 1e-6, -float(p.radius_step)))
    if r[-1] > rmin + 1e-6:
        r.append(rmin)
    return [float(x) for x in r]


# --------------------------------------------------------------------------------------- V-SHARP
@dataclass
class VSharpParams:
    radius_max: float = param(12.0, "largest SMV radius (mm)", min=1.0, max=30.0)
    radius_min: float = param(1.0, "smallest SMV radius (mm; at least the largest voxel size is used)", min=0.5, max=30.0)
    radius_step: float = param(1.0, "step between radii (mm)", min=0.25, max=10.0)
    threshold: float = param(0.05, "truncation of 1 − S_rmax in the deconvolution", min=0.001, max=0.5)


def vsharp(total_field, mask, params: VSharpParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
           b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """V-SHARP background removal; returns (local field ppm, eroded mask). See the module docstring."""
    p = params or VSharpParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    dev = resolve_device(device)
    radii = _radii(p, vs)
    rep = Reporter(progress, cancel, total=len(radii) + 1, stage="background")
    pshape = _padded(f.shape, [math.ceil(radii[0] / d) + 1 for d in vs])
    C = _Conv(f.shape, pshape, dev)
    with torch.no_grad():
        F = C.fft(f)
        Mk = C.fft(m.astype(np.float32))
        mt = torch.as_tensor(m, device=dev)
        hp = torch.zeros(f.shape, dtype=torch.float32, device=dev)
        done = torch.zeros(f.shape, dtype=torch.bool, device=dev)
        S_max = None
        for i, r in enumerate(radii):
            rep(i, f"SMV radius {r:g} mm")
            S = smv_kernel(pshape, vs, r, dev)
            if S_max is None:
                S_max = S
            inside = (C.ifft(Mk * S) > 0.999) & mt & ~done
            if bool(inside.any()):
                hp[inside] = (torch.as_tensor(f, device=dev) - C.ifft(F * S))[inside]
                done |= inside
            del S
        if not bool(done.any()):
            raise ScanError(f"mask: no voxel lies {radii[-1]:g} mm inside the mask; the mask is too thin for V-SHARP")
        rep(len(radii), "deconvolution")
        Dk = 1.0 - S_max
        keep = Dk.abs() > p.threshold
        X = C.fft(hp * done)
        X = torch.where(keep, X / torch.where(keep, Dk, torch.ones_like(Dk)), torch.zeros_like(X))
        local = C.ifft(X) * done
    rep(len(radii) + 1, "done")
    return local.cpu().numpy().astype(np.float32), done.cpu().numpy()


# --------------------------------------------------------------------------------------- RESHARP
@dataclass
class ResharpParams:
    radius: float = param(6.0, "SMV radius (mm); the QSMInvNet+ paper used 6 mm", min=1.0, max=30.0)
    lam: float = param(1e-4, "Tikhonov weight λ on ‖f_L‖² (QSM.rs scale, field in ppm)", min=0.0, max=10.0, cli="lambda")
    tol: float = param(1e-6, "CG relative residual tolerance", min=1e-10, max=1e-1)
    max_iter: int = param(30, "CG iterations at most", min=1, max=1000)


def _dot(a, b) -> float:
    """⟨a, b⟩ of two float32 tensors (BLAS dot: no float64 copies of the volumes; relative error ~1e-5)."""
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _cg(apply, b, x0, tol, max_iter, rep=None, label="CG", total_stage=None):
    """Conjugate gradients for an SPD operator on torch tensors (float32 vectors and dot products, in place)."""
    x = x0.clone()
    r = b.clone() if not bool(x.any()) else b - apply(x)
    pdir = r.clone()
    rs = _dot(r, r)
    bn = math.sqrt(_dot(b, b)) or 1.0
    it = 0
    for it in range(1, max_iter + 1):
        Ap = apply(pdir)
        pAp = _dot(pdir, Ap)
        if pAp <= 0:
            break
        a = rs / pAp
        x.add_(pdir, alpha=a)
        r.add_(Ap, alpha=-a)
        del Ap
        rs_new = _dot(r, r)
        rel = math.sqrt(max(rs_new, 0.0)) / bn
        if rep is not None:
            rep(it, f"{label} {it}", residual=rel)
        if rel < tol:
            break
        pdir.mul_(rs_new / rs).add_(r)
        rs = rs_new
    return x, it


def resharp(total_field, mask, params: ResharpParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
            b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """RESHARP background removal; returns (local field ppm, eroded mask). See the module docstring."""
    p = params or ResharpParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    dev = resolve_device(device)
    r = max(float(p.radius), float(np.max(vs)))
    pshape = _padded(f.shape, [math.ceil(r / d) + 1 for d in vs])
    C = _Conv(f.shape, pshape, dev)
    rep = Reporter(progress, cancel, total=p.max_iter, stage="background")
    with torch.no_grad():
        S = smv_kernel(pshape, vs, r, dev)
        H = 1.0 - S
        me = (C(torch.as_tensor(m, dtype=torch.float32, device=dev), S) > 0.999) & torch.as_tensor(m, device=dev)
        if not bool(me.any()):
            raise ScanError(f"mask: no voxel lies {r:g} mm inside the mask; lower the RESHARP radius")
        mef = me.to(torch.float32)
        ft = torch.as_tensor(f, device=dev)
        lam = float(p.lam)

        def apply(x):
            return C(mef * C(x, H), H) + lam * x

        b = C(mef * C(ft, H), H)
        x, _ = _cg(apply, b, torch.zeros_like(ft), p.tol, p.max_iter, rep, "RESHARP CG")
        local = x * mef
    return local.cpu().numpy().astype(np.float32), me.cpu().numpy()


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
    C = _Conv(f.shape, pshape, dev)
    D = dipole_kernel(pshape, vs, b0, device=dev)
    out = torch.as_tensor(~m, dtype=torch.float32, device=dev)
    w2t = torch.as_tensor(w2 * m, dtype=torch.float32, device=dev)
    ft = torch.as_tensor(f, device=dev)

    def apply(x):   # x stays outside the mask (b, x0 and every CG direction are masked by ``out``)
        return out * C(w2t * C(x, D), D)

    b = out * C(w2t * ft, D)
    x0 = torch.zeros_like(ft) if x0 is None else x0 * out
    x, _ = _cg(apply, b, x0, tol, max_iter, rep, "PDF CG")
    return x * out


def pdf(total_field, mask, params: PDFParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
        b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """Projection onto dipole fields; returns (local field ppm, mask). See the module docstring."""
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
        bg = _Conv(f.shape, pshape, dev)(x, dipole_kernel(pshape, vs, b0, device=dev))
        local = (torch.as_tensor(f, device=dev) - bg) * torch.as_tensor(m, dtype=torch.float32, device=dev)
    return local.cpu().numpy().astype(np.float32), m


# --------------------------------------------------------------------------------------- LBV
@dataclass
class LBVParams:
    tol: float = param(1e-6, "CG relative residual tolerance", min=1e-12, max=1e-1)
    max_iter: int = param(3000, "CG iterations at most", min=1, max=100000)
    peel: int = param(2, "boundary layers (voxels) removed from the returned mask", min=0, max=20)


def lbv(total_field, mask, params: LBVParams | None = None, *, voxel_size=(1.0, 1.0, 1.0),
        b0_direction=(0.0, 0.0, 1.0), noise_std=None, device="auto", progress=None, cancel=None):
    """Laplacian boundary value background removal; returns (local field ppm, peeled mask)."""
    p = params or LBVParams()
    f, m, _ = check_field_inputs(total_field, mask)
    vs = check_voxel_size(voxel_size)
    rep = Reporter(progress, cancel, total=p.max_iter, stage="background")
    struct = ndimage.generate_binary_structure(3, 1)
    inner = ndimage.binary_erosion(m, struct, border_value=0)
    if not inner.any():
        raise ScanError("mask: no interior voxel (every mask voxel touches the outside); LBV needs a solid mask")
    shape = f.shape
    idx = np.full(shape, -1, np.int64)
    nin = int(inner.sum())
    idx[inner] = np.arange(nin)
    fd = f.astype(np.float64)
    rows, cols, vals = [], [], []
    diag = np.zeros(nin)
    rhs = np.zeros(nin)  # −∇²f at the interior voxels (uses the boundary values of f)
    for ax, d in enumerate(vs):
        w = 1.0 / (d * d)
        for sgn in (1, -1):
            nb = np.roll(idx, -sgn, axis=ax)      # index of the neighbour at +sgn along ax
            fnb = np.roll(fd, -sgn, axis=ax)
            sel = inner
            diag += w
            rhs += w * (fd[sel] - fnb[sel])
            j = nb[sel]
            ok = j >= 0                            # interior neighbour: off-diagonal entry
            rows.append(np.arange(nin)[ok])
            cols.append(j[ok])
            vals.append(np.full(int(ok.sum()), -w))
    A = sp.csr_matrix((np.concatenate(vals + [diag]),
                       (np.concatenate(rows + [np.arange(nin)]), np.concatenate(cols + [np.arange(nin)]))),
                      shape=(nin, nin))
    count = [0]

    def cb(_x):
        count[0] += 1
        if count[0] % 20 == 0:
            rep(count[0], f"LBV CG {count[0]}")

    x, info = spla.cg(A, rhs, rtol=p.tol, maxiter=p.max_iter, callback=cb)
    check_cancel(cancel)
    local = np.zeros(shape, np.float32)
    local[inner] = x.astype(np.float32)
    out_mask = inner
    if p.peel > 0:
        out_mask = ndimage.binary_erosion(inner, struct, iterations=int(p.peel), border_value=0)
        if not out_mask.any():
            out_mask = inner
    return (local * out_mask).astype(np.float32), out_mask


STEPS = (
    Step(family="background", name="vsharp", label="V-SHARP", params_cls=VSharpParams, run=vsharp, default=True,
         order=0,
         doc="V-SHARP: SMV high-pass with the largest ball (12 mm down to 1 mm) that fits at each voxel, deconvolved "
             "by 1 − S_12mm with truncation 0.05 (TSVD). No λ: the only regularisation is that truncation. The mask "
             "is eroded by the smallest radius; the mean field is lost."),
    Step(family="background", name="resharp", label="RESHARP", params_cls=ResharpParams, run=resharp, order=10,
         exact=False,
         doc="RESHARP: argmin ‖M(C∗f_L − C∗f)‖² + λ‖f_L‖², C = δ − SMV (6 mm, the paper's radius), CG. λ = 1e-4 in "
             "QSM.rs's scale: field in ppm, unit-sum SMV, λ on the unnormalised squared norm over the field of view."),
    Step(family="background", name="pdf", label="PDF", params_cls=PDFParams, run=pdf, order=20,
         doc="Projection onto dipole fields: background = field of a χ outside the mask fitted by CG (tol 1e-5 as "
             "the MEDI toolbox; ≤ 30 iterations per grid after 4x and 2x coarser warm starts, max_iter=0 restores "
             "the toolbox's √N), weighted by 1/N_std when given; dipole kernel D(0) = 0. No regularisation beyond early "
             "stopping."),
    Step(family="background", name="lbv", label="LBV", params_cls=LBVParams, run=lbv, order=30,
         doc="Laplacian boundary value: ∇²f_L = ∇²f inside the mask, f_L = 0 on its boundary (7-point Laplacian, "
             "sparse CG, tol 1e-6). No regularisation; 2 boundary layers peeled."),
)
