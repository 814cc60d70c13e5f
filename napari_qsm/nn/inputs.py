"""The network input of QSMInvNet(+), built the same way for training, inference and adaptation.

* Channel 0: local field (ppm) · mask · ``field_scale``; channel 1: the brain mask (0/1). This is
  the input of the paper (DESIGN.md, "The method").
* Optional channel 2 (checkpoints with ``tkd_delta > 0``): the TKD estimate of the same field,
  χ_TKD = F⁻¹[D⁻¹_δ · F[field·mask]] · mask · ``chi_scale`` (:func:`napari_qsm.core.inversion.tkd.truncated_inversion`,
  zero-padded 2x, δ = ``tkd_delta``), computed with the scan's own voxel size and B0 direction. It
  has no trainable parameter; the network then predicts a correction added to it (see
  :class:`napari_qsm.nn.unet.QSMInvNet`). It is computed on the whole volume (or the whole
  self-consistent training patch) before any tiling or patch cropping.
"""

from __future__ import annotations

import numpy as np

from ..core.inversion.tkd import truncated_inversion
from .unet import NetConfig


def tkd_channel(field, mask, voxel_size, b0_direction, delta: float, device=None) -> np.ndarray:
    """χ_TKD (ppm, float32, masked) used as the physics input channel."""
    if voxel_size is None or b0_direction is None:
        raise ValueError("this checkpoint has a TKD input channel: voxel_size and b0_direction are required")
    chi, _ = truncated_inversion(np.asarray(field, np.float32), np.asarray(mask) > 0.5, tuple(voxel_size),
                                 tuple(np.asarray(b0_direction, float)), threshold=float(delta), device=device)
    return chi


def network_input(field, mask, cfg: NetConfig, voxel_size=None, b0_direction=None, tkd=None,
                  device=None) -> np.ndarray:
    """(C, X, Y, Z) float32 input of one volume or patch; ``tkd`` (ppm) is reused when given."""
    m = (np.asarray(mask) > 0.5)
    f = np.where(m, np.asarray(field, np.float32), 0.0).astype(np.float32)
    chans = [f * np.float32(cfg.field_scale), m.astype(np.float32)]
    if cfg.tkd_delta > 0:
        if tkd is None:
            tkd = tkd_channel(f, m, voxel_size, b0_direction, cfg.tkd_delta, device=device)
        chans.append(np.where(m, tkd, 0.0).astype(np.float32) * np.float32(cfg.chi_scale))
    return np.stack(chans).astype(np.float32, copy=False)
