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
* ``L_T`` on a patch (``smv_radius_mm`` > 0, what the adaptation uses): the field measured inside a
  patch also contains the field of tissue outside it, which d∗χ_patch cannot produce. Both fields
  are passed through the same spherical-mean-value high-pass (1 − S), S the normalised sphere of
  radius r mm on the voxel grid (as MEDI's SMV option), and the residual is taken only where the
  sphere lies inside the patch's mask (SMV(mask) > 0.999, which also keeps r away from every cut
  face of the patch). Outside sources give a harmonic field there, which (1 − S) removes (mean-value
  property), so the true χ of the patch has a residual ~0 (:func:`field_residual`). The noise std
  becomes √(σ² + S(σ²)) (MEDI's SMV propagation of N_std).
* ``R = ‖w_G ∘ ∇χ‖₁ / #mask`` (:func:`loss_edge_tv`): MEDI's morphology prior on a batch, forward
  differences per mm (Neumann boundary: the last difference along each axis is 0), w_G = 1 where
  the magnitude has no edge (see :func:`napari_qsm.core.inversion.medi.gradient_mask`), summed over the
  voxels of the mask. χ in ppm, so R is in ppm/mm.
* λ(t): :class:`LambdaSchedule` — 0 for ``warmup`` steps, then a linear (or cosine, or
  exponential) rise to ``lam_max`` over ``ramp`` steps, constant after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
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

    def smv(self, pshape, voxel_size, radius_mm: float, device) -> torch.Tensor:
        """rfft spectrum of the normalised sphere S (radius mm) on the padded grid ``pshape`` (cached)."""
        key = ("smv", tuple(pshape), tuple(round(float(v), 6) for v in voxel_size), round(float(radius_mm), 6),
               str(device))
        if key not in self._cache:
            if len(self._cache) >= self.max_cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = sphere_spectrum(pshape, voxel_size, radius_mm, device)
        return self._cache[key]

    def __call__(self, chi: torch.Tensor, voxel_size, b0_direction) -> torch.Tensor:
        shape = tuple(chi.shape[-3:])
        D, pshape = self.kernel(shape, voxel_size, b0_direction, chi.device)
        X = torch.fft.rfftn(chi, s=pshape, dim=(-3, -2, -1))   # zero-pads at the end of each axis
        y = torch.fft.irfftn(X * D, s=pshape, dim=(-3, -2, -1))
        return y[..., : shape[0], : shape[1], : shape[2]]


def sphere_spectrum(pshape, voxel_size, radius_mm: float, device=None) -> torch.Tensor:
    """Real rfft spectrum of the normalised sphere (voxels whose centre lies within ``radius_mm`` of the
    origin, physical voxel sizes, weights summing to 1) centred at the origin of the grid ``pshape``."""
    if not radius_mm > 0:
        raise ValueError(f"smv radius: expected > 0 mm, got {radius_mm}")
    axes = []
    for n, d in zip(pshape, voxel_size):
        i = np.arange(int(n))
        axes.append(np.where(i > n // 2, i - n, i) * float(d))
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    sph = (r2 <= float(radius_mm) ** 2).astype(np.float64)
    sph /= sph.sum()
    # the sphere is symmetric under x → −x, so its spectrum is real
    return torch.fft.rfftn(torch.as_tensor(sph, dtype=torch.float64)).real.to(torch.float32).to(device).contiguous()


def smv_pad_shape(shape, voxel_size, radius_mm: float, pad_factor: float = 2.0) -> tuple:
    """FFT grid for a patch: the dipole operator's padding, and at least one sphere radius of zeros."""
    base = fast_shape(shape, pad_factor)
    need = [int(n) + int(math.ceil(float(radius_mm) / float(d))) + 1 for n, d in zip(shape, voxel_size)]
    return tuple(max(b, fast_shape((m,), 1.0)[0]) for b, m in zip(base, need))


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


def field_residual(chi_ppm: torch.Tensor, field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size, b0_direction,
                   smv_radius_mm: float = 0.0, op: DipoleOperator | None = None,
                   noise_std: torch.Tensor | None = None, threshold: float = 0.999):
    """Field residual (ppm) of χ against a measured field, the region where it is valid, and the noise std.

    ``smv_radius_mm`` = 0: ``(d∗χ − f, mask, noise_std)``. > 0: ``((1 − S)(d∗χ) − (1 − S)f, region,
    √(σ² + S(σ²)))`` with region = mask ∧ (S∗mask > ``threshold``), S the normalised sphere; d∗χ,
    f and the mask are zero beyond the array (the patch), so the region also keeps one radius away
    from its faces. Shapes (N, 1, X, Y, Z) or 3-D; ``field_ppm`` should be 0 outside ``mask``.
    """
    op = op or _DEFAULT_OP
    r = float(smv_radius_mm)
    if not r > 0:
        return op(chi_ppm, voxel_size, b0_direction) - field_ppm, (mask > 0.5).to(chi_ppm.dtype), noise_std
    shape = tuple(chi_ppm.shape[-3:])
    dims = (-3, -2, -1)
    pshape = smv_pad_shape(shape, voxel_size, r, op.pad_factor)
    key = (tuple(shape), tuple(round(float(v), 6) for v in voxel_size),
           tuple(round(float(v), 9) for v in b0_direction), str(chi_ppm.device), "smv-grid", pshape)
    if key not in op._cache:
        if len(op._cache) >= op.max_cache:
            op._cache.pop(next(iter(op._cache)))
        op._cache[key] = dipole_kernel(pshape, voxel_size, b0_direction, device=chi_ppm.device)
    D = op._cache[key]
    S = op.smv(pshape, voxel_size, r, chi_ppm.device)
    hp = 1.0 - S
    crop = lambda y: y[..., : shape[0], : shape[1], : shape[2]]
    conv = lambda a, K: crop(torch.fft.irfftn(torch.fft.rfftn(a, s=pshape, dim=dims) * K, s=pshape, dim=dims))
    m = (mask > 0.5).to(chi_ppm.dtype)
    with torch.no_grad():
        region = m * (conv(m, S) > threshold).to(m.dtype)
        f_hp = conv(field_ppm * m, hp)
        sig = None
        if noise_std is not None:
            var = noise_std.to(chi_ppm.dtype) ** 2
            fin = torch.isfinite(var)
            fill = var[fin & (m > 0)].max() if bool((fin & (m > 0)).any()) else var.new_ones(())
            var = torch.where(fin, var, fill) * m
            sig = torch.sqrt(var + torch.clamp(conv(var, S), min=0.0))
            sig = torch.where(region > 0, sig, torch.full_like(sig, float("inf")))
    model_hp = conv(chi_ppm, D * hp)
    return model_hp - f_hp, region, sig


def loss_field(chi_ppm: torch.Tensor, field_ppm: torch.Tensor, mask: torch.Tensor, voxel_size, b0_direction,
               weights: torch.Tensor | None = None, phase_per_ppm: float = 16.05, op: DipoleOperator | None = None,
               noise_std: torch.Tensor | None = None, smv_radius_mm: float = 0.0,
               normalise: bool = True) -> torch.Tensor:
    """L_T = ‖W (e^{i φ(d∗χ)} − e^{i φ(f)})‖₂² / #mask with φ(x) = phase_per_ppm · x.

    ``chi_ppm``, ``field_ppm``, ``mask``: (N, 1, X, Y, Z) (or 3-D). ``weights`` (W_t) overrides
    the default :func:`noise_weights` of ``mask`` and ``noise_std``. All samples of the batch
    share ``voxel_size`` and ``b0_direction``.

    ``smv_radius_mm`` > 0 (patches): both fields high-passed by (1 − S) and the sum taken over the
    region of :func:`field_residual` (mask eroded by the sphere, away from the patch faces), with
    the propagated noise std; ``weights``, when given, are restricted to that region and
    renormalised to mean 1 in it, unless ``normalise`` is False (uQSM's w = magnitude / max, used as
    given on that region).
    """
    op = op or _DEFAULT_OP
    res, region, sig = field_residual(chi_ppm, field_ppm, mask, voxel_size, b0_direction, smv_radius_mm, op,
                                      noise_std)
    if weights is None:
        weights = noise_weights(region, sig)
    elif not normalise:
        weights = weights * (region > 0.5).to(weights.dtype)
    elif smv_radius_mm > 0:
        weights = noise_weights(region, 1.0 / torch.clamp(weights * region, min=0.0))
    mask = region
    diff = phase_per_ppm * res
    r2 = 2.0 - 2.0 * torch.cos(diff)          # = |e^{iφ1} − e^{iφ2}|²
    n = torch.clamp((mask > 0.5).sum(), min=1).to(chi_ppm.dtype)
    return (weights * weights * r2).sum() / n


def loss_edge_tv(chi_ppm: torch.Tensor, wg: torch.Tensor | None, mask: torch.Tensor, voxel_size) -> torch.Tensor:
    """R = Σ_mask Σ_axes |w_G,a · ∂_a χ| / #mask for ``chi_ppm`` and ``mask`` (N, 1, X, Y, Z), ``wg`` (N, 3, X, Y, Z).

    ∂_a is the forward difference divided by the voxel size (0 on the last plane of each axis), as
    :func:`napari_qsm.core.inversion.medi.gradient`, which cannot serve here: it writes into a preallocated
    tensor (``out=``), which autograd does not support, and takes one unbatched volume.
    ``wg`` is 1 where gradients are penalised (no magnitude edge); None = 1 everywhere (plain TV).
    """
    m = (mask > 0.5).to(chi_ppm.dtype)
    total = chi_ppm.new_zeros(())
    for a in range(3):
        ax = 2 + a
        n = chi_ppm.shape[ax]
        if n < 2:
            continue
        d = (chi_ppm.narrow(ax, 1, n - 1) - chi_ppm.narrow(ax, 0, n - 1)) / float(voxel_size[a])
        w = m.narrow(ax, 0, n - 1) if wg is None else wg[:, a:a + 1].narrow(ax, 0, n - 1) * m.narrow(ax, 0, n - 1)
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
