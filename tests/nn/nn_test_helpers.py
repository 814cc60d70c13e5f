"""Shared helpers of the network tests (tests/nn)."""

from __future__ import annotations

import numpy as np


def blob_volume(shape=(32, 32, 32), seed=0):
    """(χ float32 ppm, mask bool): six random spheres inside an ellipsoid centred in ``shape``.

    ``seed`` is a seed or a ``numpy.random.Generator`` (which is drawn from and can be used further).
    """
    rng = np.random.default_rng(seed)
    g = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    mask = (g[0] ** 2 / 14 ** 2 + g[1] ** 2 / 13 ** 2 + g[2] ** 2 / 12 ** 2) < 1
    chi = np.zeros(shape, np.float32)
    for _ in range(6):
        c = rng.uniform(-8, 8, 3)
        r = rng.uniform(2, 5)
        chi += rng.uniform(-0.2, 0.3) * ((g[0] - c[0]) ** 2 + (g[1] - c[1]) ** 2 + (g[2] - c[2]) ** 2 < r * r)
    chi *= mask
    return chi.astype(np.float32), mask


def np_dipole(pshape, voxel_size, b0):
    """D(k) = 1/3 − (k·b̂)²/|k|² on the real-FFT grid of ``pshape`` (fftfreq on the first two axes,
    rfftfreq on the last, physical voxel sizes), D(0) = 0; written out here with numpy, independently of
    napari_qsm.core.dipole. (With an oblique B0 the sign of the Nyquist frequency matters: a full
    complex FFT with fftfreq's −N/2 on the last axis differs by ~0.7 % on a 2x-padded patch.)"""
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    freqs = [np.fft.fftfreq(n, d=d) for n, d in zip(pshape[:-1], voxel_size[:-1])]
    freqs.append(np.fft.rfftfreq(pshape[-1], d=voxel_size[-1]))
    k = np.meshgrid(*freqs, indexing="ij")
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2]
    with np.errstate(invalid="ignore", divide="ignore"):
        D = 1.0 / 3.0 - kb ** 2 / k2
    D[0, 0, 0] = 0.0
    return D


def np_conv(x, K, pshape):
    """Zero-padded (to ``pshape``) k-space product with ``K`` (real-FFT grid), cropped back to x's shape."""
    y = np.fft.irfftn(np.fft.rfftn(x, s=pshape, axes=(0, 1, 2)) * K, s=pshape, axes=(0, 1, 2))
    return y[: x.shape[0], : x.shape[1], : x.shape[2]]


def rel_demeaned(a, b, m):
    """‖(a − ā) − (b − b̄)‖ / ‖b − b̄‖ in the mask (QSM-CI's demeaned NRMSE, as a fraction)."""
    a = a[m] - a[m].mean()
    b = b[m] - b[m].mean()
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def blob_scan(seed=0, shape=(32, 32, 32)):
    """(Scan, χ): the field of :func:`blob_volume` with B0 tilted by 0.2 rad about y, a random magnitude,
    TE 20 ms and 3 T (the small scan of the adaptation tests)."""
    from napari_qsm.core.dipole import forward_field
    from napari_qsm.core.scan import Scan

    rng = np.random.default_rng(seed)
    chi, mask = blob_volume(shape, rng)
    b0 = np.array([np.sin(0.2), 0.0, np.cos(0.2)])
    f = forward_field(chi, (1, 1, 1), b0, device="cpu") * mask
    mag = (1.0 + 0.2 * rng.random(shape)).astype(np.float32)
    return Scan(field=f, mask=mask, magnitude=mag, b0_direction=b0, te=0.02, b0_tesla=3.0), chi


def tiny_checkpoint(path, *, tkd_delta=0.0, head_std=0.0, seed=0, offset=0.0):
    """A tiny QSMInvNet+ checkpoint (width 2, two BN domains, domain 0 marked trained) saved at ``path``.

    ``tkd_delta`` > 0 adds the TKD physics channel (residual output, like the shipped weights);
    ``head_std`` draws the output layer's weights from N(0, head_std²); ``offset`` is added to every
    parameter (distinct bases). Returns ``path``."""
    import torch

    from napari_qsm.nn.train import atomic_torch_save
    from napari_qsm.nn.unet import NetConfig, QSMInvNet

    torch.manual_seed(seed)
    m = QSMInvNet(NetConfig(base_width=2, num_domains=2, tkd_delta=tkd_delta))
    with torch.no_grad():
        if head_std:
            m.head.weight.normal_(0, head_std)
        if offset:
            for p in m.parameters():
                p.add_(offset)
    m.mark_trained(0)
    atomic_torch_save(m.state_dict(), path)
    return path


def dsbn_chi(weights, scan, **params):
    """χ of ``recon --method dsbn --weights WEIGHTS --param reference=none`` on ``scan`` (the network, then the
    dsbn method's data consistency), on the CPU: what an adapted χ must equal."""
    from napari_qsm.methods import reconstruct

    return reconstruct(scan, "dsbn", {"reference": "none", **params}, weights=weights, device="cpu").chi
