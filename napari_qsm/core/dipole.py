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
    """Real 3-D convolution by a k-space kernel on the zero-padded grid, cropped back (torch in/out).

    ``x`` is (..., n0, n1, n2), zero-padded at the end of each axis to ``padded_shape``; ``kernel`` is the
    kernel's half spectrum on that grid (real or complex; a complex copy of a real kernel multiplies faster).
    The inverse transform is pruned to the crop: ifft along the first axis and keep the crop's rows, ifft
    along the second and keep its columns, then irfft along the last. The same numbers as
    ``irfftn(rfftn(x) · kernel)[crop]`` up to float rounding, with the transforms along the later axes
    skipping the rows the crop throws away (about 20 % of a CG iteration on the 1 mm head). Returns a view
    of the cropped block (not contiguous).
    """
    n0, n1, n2 = x.shape[-3:]
    X = torch.fft.rfftn(x, s=tuple(padded_shape), dim=(-3, -2, -1))
    X *= kernel
    Y = torch.fft.ifft(X, dim=-3)[..., :n0, :, :]
    del X
    Y = torch.fft.ifft(Y, dim=-2)[..., :n1, :]
    return torch.fft.irfft(Y, n=int(padded_shape[2]), dim=-1)[..., :n2]


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

    For large simulation grids: the box is zero-padded to a fast FFT size of at least 2x and
    convolved by :func:`convolve_padded` (one axis at a time, never a padded array in memory).
    ``support`` None = the whole grid.
    """
    chi = np.asarray(chi)
    box = (slice(None),) * 3
    if support is not None:
        lo_hi = [np.flatnonzero(np.asarray(support).any(axis=tuple(j for j in range(3) if j != k))) for k in range(3)]
        if any(i.size == 0 for i in lo_hi):
            return np.zeros(chi.shape, np.float32)
        box = tuple(slice(max(0, int(i[0]) - 2), int(i[-1]) + 3) for i in lo_hi)
    crop = chi[box]
    out = np.zeros(chi.shape, np.float32)
    convolve_padded(crop, fast_shape(crop.shape, 2.0), voxel_size, b0_direction, device=device, out=out[box])
    return out


def _kernel_columns(P, voxel_size, b0_direction, c0, c1, device):
    """The rfft half-grid dipole kernel of padded shape ``P`` at last-axis columns c0:c1 (as :func:`kernel_slabs`)."""
    b = unit_vector(b0_direction)
    kx, ky, kz = kspace_grid(P, voxel_size, device, torch.float32, half=True)
    z = kz[..., c0:c1]
    k2 = kx * kx + (ky * ky + z * z)
    kb = kx * float(b[0]) + (ky * float(b[1]) + z * float(b[2]))
    if c0 == 0:
        k2[0, 0, 0] = 1.0
    d = kb.square_().div_(k2).neg_().add_(1.0 / 3.0)
    if c0 == 0:
        d[0, 0, 0] = 0.0
    return d


def convolve_padded(src, P, voxel_size, b0_direction=(0.0, 0.0, 1.0), device="auto", extend_last: int = 0,
                    chunk_mb: float = 16.0, out=None) -> np.ndarray:
    """D ∗ src with ``src`` zero-padded to ``P`` (D(0) = 0), on ``src``'s grid; float32 numpy in and out.

    The same numbers as ``irfftn(rfftn(padded) · D)`` up to float32 round-off, without ever holding a
    padded array: real FFT along the last axis row block by row block (only the ``src`` rows are
    non-zero), then per block of k-space columns the FFTs along the other two axes, the kernel and their
    inverses, cropped to ``src``'s rows (written back in place), then the inverse real FFT row block by
    row block. The peak is one half-spectrum of ``src`` (n0·n1·(P2//2+1) complex) plus ~``chunk_mb`` MB
    blocks.

    Parameters
    ----------
    src : ndarray, shape (n0, n1, n2)
        The source (e.g. χ in ppm).
    P : tuple of int
        Padded shape, ≥ ``src.shape`` on every axis (zero padding at the end of each axis).
    voxel_size, b0_direction : the kernel's grid (mm) and B0 direction in the voxel frame.
    device : str or torch.device
    extend_last : int
        The padding's last ``extend_last`` points along the last axis (just below index 0, periodically)
        repeat the ``src[:, :, 0]`` plane (a body that leaves the field of view through that face).
    chunk_mb : float
        Size of the working blocks.
    out : ndarray or None
        A float32 array (or view) of ``src``'s shape to write the field into.

    Returns
    -------
    ndarray, float32, ``src.shape``
        The field (in ``src``'s units, ppm for χ in ppm).

    References
    ----------
    .. [1] Salomir R, de Senneville BD, Moonen CT. A fast calculation method for magnetic field
           inhomogeneity due to an arbitrary distribution of bulk susceptibility. Concepts Magn Reson
           19B:26-34 (2003).
    """
    n0, n1, n2 = src.shape
    P0, P1, P2 = (int(v) for v in P)
    if P0 < n0 or P1 < n1 or P2 < n2 or not 0 <= int(extend_last) <= P2 - n2:
        raise ValueError(f"P: padded shape {tuple(P)} must cover {src.shape} (and extend_last {extend_last})")
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    H = P2 // 2 + 1
    blk = float(chunk_mb) * 2 ** 20
    rows = max(1, int(blk // (4 * n1 * P2)))
    cols = max(1, int(blk // (8 * P0 * P1)))
    if out is None:
        out = np.empty((n0, n1, n2), np.float32)
    elif out.shape != (n0, n1, n2) or out.dtype != np.float32:
        raise ValueError(f"out: expected a float32 array of shape {src.shape}, got {out.dtype} {out.shape}")
    with torch.no_grad():
        A = torch.empty((n0, n1, H), dtype=torch.complex64, device=dev)
        for i0 in range(0, n0, rows):
            i1 = min(n0, i0 + rows)
            x = torch.zeros((i1 - i0, n1, P2), dtype=torch.float32, device=dev)
            x[:, :, :n2] = torch.from_numpy(np.ascontiguousarray(src[i0:i1], np.float32)).to(dev)
            if extend_last:
                x[:, :, P2 - int(extend_last):] = x[:, :, 0:1]
            A[i0:i1] = torch.fft.rfft(x, dim=2)
            del x
        for c0 in range(0, H, cols):
            c1 = min(H, c0 + cols)
            X = torch.fft.fft(torch.fft.fft(A[:, :, c0:c1], n=P1, dim=1), n=P0, dim=0)
            X *= _kernel_columns((P0, P1, P2), voxel_size, b0_direction, c0, c1, dev)
            A[:, :, c0:c1] = torch.fft.ifft(torch.fft.ifft(X, dim=0)[:n0], dim=1)[:, :n1]
            del X
        for i0 in range(0, n0, rows):
            i1 = min(n0, i0 + rows)
            out[i0:i1] = torch.fft.irfft(A[i0:i1], n=P2, dim=2)[:, :, :n2].cpu().numpy()
        del A
    return out
