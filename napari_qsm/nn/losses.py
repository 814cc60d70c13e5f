"""Losses of QSMInvNet+ (DESIGN.md "The method") and the λ(t) schedule.

* ``L_S = ‖χ_S − χ_truth‖₂`` on labelled synthetic patches. Implemented as the mean squared error
  over all voxels of the patch (χ·mask on both sides; the network's output is masked), i.e.
  ‖·‖₂² / N, in the network's scaled χ units (χ_ppm · chi_scale) unless told otherwise.
* ``L_T = ‖W_t (e^{i d∗χ_t} − e^{i f_t})‖₂`` on unlabelled scans: χ_t in ppm is convolved with the
  dipole kernel d of the patch's voxel size and B0 direction (zero-padded FFT, D(0) = 0, the core
  convention) to a field in ppm; both fields become phases by multiplying with ``phase_per_ppm``
  (2π·γ̄·B0·TE·1e-6; default 3 T and TE = 20 ms → 16.05 rad/ppm, see
  :func:`napari_qsm.nn.synth.phase_per_ppm`). W_t = mask / σ_f (σ_f the field noise std in ppm,
  or 1 when unknown), normalised to mean 1 inside the mask (as MEDI's m). Returned as
  ‖·‖₂² / (number of mask voxels). Since |e^{ia} − e^{ib}|² = 2 − 2cos(a − b) it is computed
  in that real form (same value, cheaper, exact gradients).
* ``R = ‖w_G ∘ ∇χ‖₁ / #mask`` (:func:`loss_edge_tv`): MEDI's morphology prior on a batch, forward
  differences per mm (Neumann boundary: the last difference along each axis is 0), w_G = 1 where
  the magnitude has no edge (see :func:`napari_qsm.core.medi.gradient_mask`), summed over the
  voxels of the mask. χ in ppm, so R is in ppm/mm.
* λ(t): :class:`LambdaSchedule` — 0 for ``warmup`` steps, then a linear (or cosine, or
  exponential) rise to ``lam_max`` over ``ramp`` steps, constant after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..core.dipole import dipole_kernel, fast_shape


def loss_supervised(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_S: mean squared error (pred and target masked when a mask is given)."""
    if mask is not None:
        pred = pred * mask
        target = target * mask
    return torch.mean((pred - target) ** 2)


class DipoleOperator:
    """d ∗ χ for torch tensors (N, 1, X, Y, Z) with zero padding; kernels cached per geometry."""

    def __init__(self, pad_factor: float = 2.0, max_cache: int = 16):
        self.pad_factor = pad_factor
        self.max_cache = max_cache
        self._cache: dict = {}

    def kernel(self, shape, voxel_size, b0_direction, device) -> tuple[torch.Tensor, tuple]:
        key = (tuple(shape), tuple(round(float(v), 6) for v in voxel_size),
               tuple(round(float(v), 9) for v in b0_direction), str(device))
        if key not in self._cache:
            if len(self._cache) >= self.max_cache:
                self._cache.pop(next(iter(self._cache)))
            pshape = fast_shape(shape, self.pad_factor)
            D = dipole_kernel(pshape, voxel_size, b0_direction, device=device)
            self._cache[key] = (D, pshape)
        return self._cache[key]

    def __call__(self, chi: torch.Tensor, voxel_size, b0_direction) -> torch.Tensor:
        shape = tuple(chi.shape[-3:])
        D, pshape = self.kernel(shape, voxel_size, b0_direction, chi.device)
        X = torch.fft.rfftn(chi, s=pshape, dim=(-3, -2, -1))   # zero-pads at the end of each axis
        y = torch.fft.irfftn(X * D, s=pshape, dim=(-3, -2, -1))
        return y[..., : shape[0], : shape[1], : shape[2]]


_DEFAULT_OP = DipoleOperator()


def noise_weights(mask: torch.Tensor, noise_std: torch.Tensor | None = None) -> torch.Tensor:
    """W_t = mask / σ (σ = noise std, or 1), normalised to mean 1 inside the mask, per sample."""
    m = (mask > 0.5).to(mask.dtype)
    if noise_std is None:
        w = m
    else:
        w = m / torch.clamp(noise_std, min=1e-8)
        w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    dims = tuple(range(1, w.ndim))
    mean = w.sum(dim=dims, keepdim=True) / torch.clamp(m.sum(dim=dims, keepdim=True), min=1.0)
    return w / torch.clamp(mean, min=1e-12)


def loss_field(chi_ppm: torch.Tensor, field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size, b0_direction,
               weights: torch.Tensor | None = None, phase_per_ppm: float = 16.05, op: DipoleOperator | None = None,
               noise_std: torch.Tensor | None = None) -> torch.Tensor:
    """L_T = ‖W (e^{i φ(d∗χ)} − e^{i φ(f)})‖₂² / #mask with φ(x) = phase_per_ppm · x.

    ``chi_ppm``, ``field_ppm``, ``mask``: (N, 1, X, Y, Z) (or 3-D). ``weights`` (W_t) overrides
    the default :func:`noise_weights` of ``mask`` and ``noise_std``. All samples of the batch
    share ``voxel_size`` and ``b0_direction``.
    """
    op = op or _DEFAULT_OP
    if weights is None:
        weights = noise_weights(mask, noise_std)
    model_field = op(chi_ppm, voxel_size, b0_direction)
    diff = phase_per_ppm * (model_field - field_ppm)
    r2 = 2.0 - 2.0 * torch.cos(diff)          # = |e^{iφ1} − e^{iφ2}|²
    n = torch.clamp((mask > 0.5).sum(), min=1).to(chi_ppm.dtype)
    return (weights * weights * r2).sum() / n


def loss_edge_tv(chi_ppm: torch.Tensor, wg: torch.Tensor, mask: torch.Tensor, voxel_size) -> torch.Tensor:
    """R = Σ_mask Σ_axes |w_G,a · ∂_a χ| / #mask for ``chi_ppm`` and ``mask`` (N, 1, X, Y, Z), ``wg`` (N, 3, X, Y, Z).

    ∂_a is the forward difference divided by the voxel size (0 on the last plane of each axis), as
    :func:`napari_qsm.core.medi.gradient`, which cannot serve here: it writes into a preallocated
    tensor (``out=``), which autograd does not support, and takes one unbatched volume.
    ``wg`` is 1 where gradients are penalised (no magnitude edge).
    """
    m = (mask > 0.5).to(chi_ppm.dtype)
    total = chi_ppm.new_zeros(())
    for a in range(3):
        ax = 2 + a
        n = chi_ppm.shape[ax]
        if n < 2:
            continue
        d = (chi_ppm.narrow(ax, 1, n - 1) - chi_ppm.narrow(ax, 0, n - 1)) / float(voxel_size[a])
        w = wg[:, a:a + 1].narrow(ax, 0, n - 1) * m.narrow(ax, 0, n - 1)
        total = total + (w * d).abs().sum()
    return total / torch.clamp(m.sum(), min=1.0)


@dataclass
class LambdaSchedule:
    """λ(t): 0 during ``warmup``, then rises to ``lam_max`` over ``ramp`` steps (linear/cosine/exp)."""

    lam_max: float = 1.0
    ramp: int = 100
    warmup: int = 0
    kind: str = "linear"   # linear | cosine | exp
    lam_min: float = 0.0   # start value of the ramp (exp needs > 0; default lam_max/100 then)

    def __call__(self, step: int) -> float:
        t = step - self.warmup
        if t < 0:
            return 0.0
        if self.ramp <= 0 or t >= self.ramp:
            return float(self.lam_max)
        u = t / self.ramp
        lo = self.lam_min
        if self.kind == "linear":
            return float(lo + (self.lam_max - lo) * u)
        if self.kind == "cosine":
            return float(lo + (self.lam_max - lo) * 0.5 * (1 - math.cos(math.pi * u)))
        if self.kind == "exp":
            lo = lo if lo > 0 else self.lam_max / 100.0
            return float(lo * (self.lam_max / lo) ** u)
        raise ValueError(f"lambda schedule: unknown kind {self.kind!r} (linear, cosine, exp)")

    def to_dict(self) -> dict:
        return asdict(self)
