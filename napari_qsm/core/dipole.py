"""Dipole kernel and forward model.

Convention (DESIGN.md): in k-space D(k) = 1/3 − (k·b̂)²/|k|², on the fftfreq grid with physical
voxel sizes (k_i = n_i / (N_i Δ_i)), and D(0) = 0 (MEDI toolbox / QSM.jl convention). The unit
vector b̂ (B0 direction) and the voxel size are given in the scan's own voxel frame (i, j, k).

The forward model field = D ∗ χ (ppm in, ppm out) zero-pads χ to a fast FFT size of at least
``pad_factor`` times each dimension so that no wrap-around enters the field. All numerics run in
torch on a device; real FFTs (rfftn) are used, so the kernel is built on the half grid.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import scipy.fft
import torch

from .device import resolve_device


def unit_vector(b0_direction: Sequence[float]) -> np.ndarray:
    b = np.asarray(b0_direction, dtype=np.float64).reshape(-1)
    if b.shape != (3,) or not np.all(np.isfinite(b)):
        raise ValueError(f"b0_direction: expected 3 finite numbers, got {b0_direction!r}")
    n = np.linalg.norm(b)
    if n < 1e-12:
        raise ValueError("b0_direction: the zero vector has no direction")
    return b / n


def check_voxel_size(voxel_size: Sequence[float]) -> np.ndarray:
    v = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if v.shape != (3,) or not np.all(np.isfinite(v)) or np.any(v <= 0):
        raise ValueError(f"voxel_size: expected 3 positive finite sizes in mm, got {voxel_size!r}")
    return v


def fast_shape(shape: Sequence[int], pad_factor: float = 2.0, multiple: int = 1) -> tuple[int, ...]:
    """Smallest fast FFT size ≥ pad_factor·n in each dimension (optionally a multiple of ``multiple``)."""
    out = []
    for n in shape:
        target = int(np.ceil(n * pad_factor))
        m = scipy.fft.next_fast_len(max(target, 1), real=True)
        while m % multiple:
            m = scipy.fft.next_fast_len(m + 1, real=True)
        out.append(int(m))
    return tuple(out)


def kspace_grid(shape, voxel_size, device=None, dtype=torch.float32, half: bool = True):
    """Spatial frequencies (cycles/mm) as three broadcastable tensors. ``half``: rfft grid on the last axis."""
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    vs = check_voxel_size(voxel_size)
    ks = []
    for ax, (n, d) in enumerate(zip(shape, vs)):
        if half and ax == len(shape) - 1:
            f = np.fft.rfftfreq(n, d=d)
        else:
            f = np.fft.fftfreq(n, d=d)
        view = [1, 1, 1]
        view[ax] = f.size
        ks.append(torch.as_tensor(f, dtype=dtype, device=dev).reshape(view))
    return ks


def half_weights(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """Multiplicity of each rfft half-grid column in the full spectrum (for means over k-space)."""
    n = shape[-1]
    w = torch.full((n // 2 + 1,), 2.0, dtype=dtype, device=device)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def dipole_kernel(shape, voxel_size, b0_direction=(0.0, 0.0, 1.0), device=None,
                  dtype=torch.float32, half: bool = True) -> torch.Tensor:
    """D(k) = 1/3 − (k·b̂)²/|k|², D(0) = 0, on the (r)fft grid of ``shape`` (tensor on ``device``).

    With ``half=True`` the last axis has N//2+1 entries (for torch.fft.rfftn).
    """
    b = unit_vector(b0_direction)
    kx, ky, kz = kspace_grid(shape, voxel_size, device, dtype, half)
    kb = kx * float(b[0]) + ky * float(b[1]) + kz * float(b[2])
    k2 = kx * kx + ky * ky + kz * kz
    k2[0, 0, 0] = 1.0
    d = kb.square_().div_(k2).neg_().add_(1.0 / 3.0)
    d[0, 0, 0] = 0.0
    return d


def kernel_slabs(shape, voxel_size, b0_direction=(0.0, 0.0, 1.0), device=None, dtype=torch.float32,
                 slab: int = 0):
    """Yield ``(i0, i1, D)``: the rfft half-grid dipole kernel in slabs along the first axis.

    Applying a kernel slab by slab keeps the temporaries cache-sized (faster than building the
    whole kernel, and it never holds a second full-size array). ``slab`` 0 picks ~1M elements.
    """
    b = unit_vector(b0_direction)
    kx, ky, kz = kspace_grid(shape, voxel_size, device, dtype, half=True)
    plane = ky.numel() * kz.numel()
    step = slab or max(1, (1 << 20) // plane)
    kyz2 = ky * ky + kz * kz
    kbyz = ky * float(b[1]) + kz * float(b[2])
    for i0 in range(0, shape[0], step):
        i1 = min(shape[0], i0 + step)
        x = kx[i0:i1]
        k2 = kyz2 + x * x
        kb = kbyz + x * float(b[0])
        if i0 == 0:
            k2[0, 0, 0] = 1.0
        d = kb.square_().div_(k2).neg_().add_(1.0 / 3.0)
        if i0 == 0:
            d[0, 0, 0] = 0.0
        yield i0, i1, d


def pad_volume(x: torch.Tensor, shape) -> torch.Tensor:
    """Zero-pad a 3-D tensor at the end of each axis to ``shape``."""
    pads = []
    for n, m in zip(reversed(x.shape[-3:]), reversed(tuple(shape))):
        if m < n:
            raise ValueError(f"pad shape {tuple(shape)} smaller than volume {tuple(x.shape[-3:])}")
        pads += [0, m - n]
    return torch.nn.functional.pad(x, pads)


def crop_volume(x: torch.Tensor, shape) -> torch.Tensor:
    return x[..., : shape[0], : shape[1], : shape[2]]


def convolve_kernel(x: torch.Tensor, kernel: torch.Tensor, padded_shape) -> torch.Tensor:
    """Real 3-D convolution by a real k-space kernel on the padded grid, cropped back (torch in/out)."""
    shape = x.shape[-3:]
    xp = pad_volume(x, padded_shape)
    X = torch.fft.rfftn(xp, s=padded_shape, dim=(-3, -2, -1))
    X *= kernel
    y = torch.fft.irfftn(X, s=padded_shape, dim=(-3, -2, -1))
    return crop_volume(y, shape)


def forward_field(chi, voxel_size, b0_direction=(0.0, 0.0, 1.0), pad_factor: float = 2.0,
                  device="auto") -> np.ndarray:
    """Field (ppm) of a susceptibility map χ (ppm): D ∗ χ with zero padding, numpy float32 out.

    Accepts a numpy array or a torch tensor. ``pad_factor`` ≥ 1; 2 (default) prevents wrap-around.
    """
    dev = resolve_device(device)
    chi_t = torch.as_tensor(np.asarray(chi, dtype=np.float32) if not torch.is_tensor(chi) else chi,
                            dtype=torch.float32, device=dev)
    if chi_t.ndim != 3:
        raise ValueError(f"chi: expected a 3-D array, got shape {tuple(chi_t.shape)}")
    pshape = fast_shape(chi_t.shape, pad_factor)
    D = dipole_kernel(pshape, voxel_size, b0_direction, device=dev)
    with torch.no_grad():
        f = convolve_kernel(chi_t, D, pshape)
    return f.cpu().numpy().astype(np.float32)


def sphere_field(shape, voxel_size, center_mm, radius_mm, dchi, b0_direction=(0.0, 0.0, 1.0)):
    """Analytic field (ppm) of a uniformly magnetised sphere, Lorentz-corrected.

    Outside: Δχ/3 · (R/r)³ · (3cos²θ − 1); inside: 0. Coordinates of voxel centres in mm.
    Used by tests and benchmarks as the physical ground truth of the forward model.
    """
    vs = check_voxel_size(voxel_size)
    b = unit_vector(b0_direction)
    grids = np.meshgrid(*[np.arange(n) * d - c for n, d, c in zip(shape, vs, center_mm)], indexing="ij")
    r2 = sum(g * g for g in grids)
    r = np.sqrt(r2)
    cos = np.where(r > 0, sum(g * bb for g, bb in zip(grids, b)) / np.maximum(r, 1e-12), 0.0)
    out = dchi / 3.0 * (radius_mm / np.maximum(r, 1e-12)) ** 3 * (3 * cos * cos - 1)
    out[r <= radius_mm] = 0.0
    return out.astype(np.float32)


def forward_field_support(chi, voxel_size, b0_direction=(0.0, 0.0, 1.0), support=None, device="auto") -> np.ndarray:
    """D ∗ χ (ppm, D(0) = 0) computed on the bounding box of ``support`` (+2 voxels), 0 outside it.

    For large simulation grids: the box is zero-padded to a fast FFT size of at least 2x and the
    kernel is applied slab by slab in place (:func:`kernel_slabs`), so the peak memory is about one
    padded real and one half-grid complex array. ``support`` None = the whole grid.
    """
    chi = np.asarray(chi)
    box = (slice(None),) * 3
    if support is not None:
        lo_hi = [np.flatnonzero(np.asarray(support).any(axis=tuple(j for j in range(3) if j != k))) for k in range(3)]
        if any(i.size == 0 for i in lo_hi):
            return np.zeros(chi.shape, np.float32)
        box = tuple(slice(max(0, int(i[0]) - 2), int(i[-1]) + 3) for i in lo_hi)
    crop = np.ascontiguousarray(chi[box], np.float32)
    P = fast_shape(crop.shape, 2.0)
    dev = resolve_device(device)
    out = np.zeros(chi.shape, np.float32)
    with torch.no_grad():
        X = torch.fft.rfftn(torch.from_numpy(crop).to(dev), s=P, dim=(0, 1, 2))
        for i0, i1, d in kernel_slabs(P, voxel_size, b0_direction, device=dev):
            X[i0:i1] *= d
        y = torch.fft.irfftn(X, s=P, dim=(0, 1, 2))
        del X
        out[box] = y[:crop.shape[0], :crop.shape[1], :crop.shape[2]].cpu().numpy()
    return out
