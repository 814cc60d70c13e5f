"""Total field inversion (TFI): χ of the brain straight from the total field, no background removal.

Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI) method for
quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315. Semantics of the MEDI
toolbox's ``TFI_L1`` as published (not its code)::

    y* = argmin ‖w_G ∘ ∇(P y)‖₁ + λ ‖m ∘ (e^{i D∗(P y)} − e^{i f})‖²,     χ = P y*

* ``f``: the TOTAL field (unwrapped; ``total_field.nii.gz`` of ``napari-qsm field``, ppm), scaled to
  the toolbox's radians as MEDI does (s = 2π·ΔTE·γ̄·B0, :func:`~.medi.phase_scale`).
* χ is one map of brain AND background sources (air, bone, tissue outside the brain) over the whole
  field of view; the dipole convolution is zero-padded to ``pad_factor`` × the field of view.
* What TFI needs: the brain mask M (``scan.mask``), where the total field is trusted (unwrapped)
  and where χ is returned; optionally a larger region of support Ω ⊇ M where the field is also
  trusted (``support=``, e.g. the head/tissue mask with reliable phase; default Ω = M). The data
  weight m = Ω/N_std (N_std = the noise map, else 1/magnitude, else 1), normalised to mean 1 in Ω;
  outside Ω there is no data and χ there is shaped by the prior and by the field it must explain in Ω.
* Preconditioner P = 1 in M and ``precond`` (P_B, default 30 as in the paper) outside M: a change of
  variables that leaves the minimiser unchanged but lets the few CG iterations reach the large
  background susceptibilities (|χ_B| ≫ |χ_brain|) as fast as the brain's.
* Prior: the MEDI morphology prior, w_G = 0 on the magnitude edges of magnitude·Ω (percentage 0.9,
  :func:`~.medi_solver.gradient_mask`), which include Ω's own boundary; w_G = 1 elsewhere.
* Solver: MEDI's Gauss-Newton with the lagged L1 surrogate and CG in the variable y (stop at
  ‖dy‖/‖y‖ < ``tol_norm_ratio``), :class:`~.medi_solver.Problem` with ``P``.
* Output: χ (ppm) in M, referenced to its mean over M (``reference="mean"``) or as solved ("none"); through the
  registry the method returns it as solved and the common ``reference`` option (:mod:`napari_qsm.core.method`)
  applies the reference, as for every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..dipole import check_voxel_size, unit_vector
from ..field.steps import Step
from ..method import Method
from ..params import param
from ..progress import check_cancel
from .medi import DEFAULT_DELTA_TE, medi_magnitude, phase_scale
from .medi_solver import GNReporter, Problem, gradient_mask


@dataclass
class TFIParams:
    lam: float = param(1000.0, "λ weighting the data term (the toolbox's scale, as MEDI)", min=1e-3, max=1e9,
                       cli="lambda", short="λ")
    precond: float = param(30.0, "preconditioner P_B outside the brain mask (P = 1 inside; Liu 2017: 30)",
                           min=1.0, max=1000.0, short="P_B")
    percentage: float = param(0.9, "gradient-mask share: #edge gradient components / #support voxels", min=0.01,
                              max=2.9)
    edge_mask: bool = param(True, "morphology prior: gradient mask from the magnitude (off: plain TV)")
    cg_tol: float = param(0.01, "conjugate-gradient relative residual tolerance", min=1e-6, max=0.5)
    cg_max_iter: int = param(100, "conjugate-gradient iterations per Gauss-Newton step (at most)", min=1, max=10000)
    max_iter: int = param(10, "Gauss-Newton iterations (at most)", min=1, max=100)
    tol_norm_ratio: float = param(0.1, "stop when ‖dy‖/‖y‖ falls below this", min=1e-6, max=1.0)
    delta_te: float = param(DEFAULT_DELTA_TE, "ΔTE (s) scaling ppm to the toolbox's radians: s = 2π·ΔTE·γ̄·B0",
                            min=1e-4, max=0.2)
    pad_factor: float = param(1.25, "FFT grid = this × the field of view (zero padding)", min=1.0, max=3.0)


def _check(field, mask, support, magnitude, noise_std, edge_mask):
    field = np.asarray(field, np.float32)
    if field.ndim != 3:
        raise ValueError(f"field: expected a 3-D total field, got shape {field.shape}")
    mask = np.asarray(mask).astype(bool)
    if mask.shape != field.shape:
        raise ValueError(f"mask: shape {mask.shape} does not match field shape {field.shape}")
    if not mask.any():
        raise ValueError("mask: empty; expected a brain mask with at least one voxel")
    support = mask if support is None else (np.asarray(support).astype(bool) | mask)
    if support.shape != field.shape:
        raise ValueError(f"support: shape {support.shape} does not match field shape {field.shape}")
    if not np.all(np.isfinite(field[support])):
        raise ValueError("field: NaN or Inf inside the mask/support (TFI needs the unwrapped total field there)")
    if magnitude is not None:
        magnitude = medi_magnitude(magnitude) if np.ndim(magnitude) == 4 else np.asarray(magnitude, np.float32)
        if magnitude.shape != field.shape:
            raise ValueError(f"magnitude: shape {magnitude.shape} does not match field shape {field.shape}")
        if not np.any(magnitude[support] != 0):
            raise ValueError("magnitude: all zero inside the mask; TFI's edge prior needs a magnitude image")
    elif edge_mask:
        raise ValueError("magnitude: TFI's gradient mask (edge_mask=true) needs a magnitude image; pass "
                         "magnitude= (--magnitude) or set edge_mask=false")
    if noise_std is not None:
        noise_std = np.asarray(noise_std, np.float32)
        if noise_std.shape != field.shape:
            raise ValueError(f"noise_std: shape {noise_std.shape} does not match field shape {field.shape}")
    return field, mask, support, magnitude, noise_std


def tfi(field, mask, voxel_size, b0_direction=(0.0, 0.0, 1.0), *, support=None, magnitude=None, noise_std=None,
        lam=1000.0, precond=30.0, percentage=0.9, edge_mask=True, reference="mean", cg_tol=0.01, cg_max_iter=100,
        max_iter=10, tol_norm_ratio=0.1, delta_te=DEFAULT_DELTA_TE, b0_tesla=None, pad_factor=1.25, device="cpu",
        progress=None, cancel=None, return_info=False):
    """Preconditioned total field inversion (see the module docstring).

    Parameters
    ----------
    field : (X, Y, Z) array
        Total field (ppm), unwrapped, trusted in ``mask`` (and ``support``); values elsewhere are ignored.
    mask : (X, Y, Z) bool array
        Brain mask M: P = 1 there, χ returned there.
    voxel_size, b0_direction : 3 floats
        Voxel size (mm) and B0 direction in the voxel frame.
    support : bool array, optional
        Region Ω ⊇ M where the total field is also trusted (data weight); default M.
    magnitude, noise_std : arrays, optional
        Magnitude (3-D, or 4-D echoes last: first echo) for the edge prior; noise map N_std (ppm).
    lam, precond, percentage, edge_mask, cg_tol, cg_max_iter, max_iter, tol_norm_ratio, delta_te,
    pad_factor : see :class:`TFIParams`.
    reference : {"mean", "none"}
        χ's mean over M set to 0, or χ as solved.
    b0_tesla : float, optional
        B0 for the phase scale (default 3 T).
    device, progress, cancel :
        Torch device; a :class:`~napari_qsm.core.progress.Progress` callback; a cancel token.
    return_info : bool
        Also return a dict (λ, history per GN step, gradient threshold, FFT shape, reference).

    Returns
    -------
    chi : (X, Y, Z) float32 array
        χ (ppm) inside M, 0 outside; or ``(chi, info)``.

    References
    ----------
    Liu Z et al. Preconditioned total field inversion (TFI) method for quantitative susceptibility
    mapping. Magn Reson Med 2017;78:303-315.
    """
    dev = device if isinstance(device, torch.device) else torch.device(device or "cpu")
    field, mask, support, magnitude, noise_std = _check(field, mask, support, magnitude, noise_std, edge_mask)
    vs = tuple(float(v) for v in check_voxel_size(voxel_size))
    b0 = unit_vector(b0_direction)
    if not float(lam) > 0:
        raise ValueError(f"lambda: expected a positive number, got {lam!r}")
    if reference not in ("mean", "none"):
        raise ValueError(f"reference: expected 'mean' or 'none', got {reference!r}")
    s = phase_scale(delta_te, b0_tesla)
    rep = GNReporter(progress, cancel, total=max_iter, stage="TFI")
    check_cancel(cancel)
    f_rad = np.where(support, field, 0.0).astype(np.float32) * s
    noise, kind = noise_std, "noise_std"
    if noise is None and magnitude is not None:
        with np.errstate(divide="ignore"):
            noise, kind = np.where(magnitude > 0, 1.0 / np.abs(magnitude), np.inf).astype(np.float32), "1/magnitude"
    elif noise is None:
        kind = "uniform"
    prob = Problem(f_rad, support, None, noise, None, vs, b0, pad_factor, 0.0, dev, rep)
    brain = torch.as_tensor(mask, device=dev)
    prob.P = torch.where(brain, 1.0, float(precond)).to(torch.float32)
    prob.linear = True
    info = {"phase_scale_rad_per_ppm": s, "data_weighting": kind, "fft_shape": list(prob.pshape),
            "precond": float(precond), "support_voxels": int(support.sum()), "lambda": float(lam)}
    if edge_mask:
        wG, thr = gradient_mask(torch.as_tensor(magnitude, device=dev), prob.mask.float(), vs, percentage)
        prob.wG = wG
        info["gradient_threshold"] = thr
        info["edge_share"] = float(1.0 - wG[:, prob.mask].float().mean())
    check_cancel(cancel)

    def to_ppm(x):
        return np.where(mask, (x / s).cpu().numpy(), 0).astype(np.float32)

    rep.to_ppm = to_ppm
    x, hist = prob.solve(float(lam), 0.0, None, cg_tol=cg_tol, cg_max_iter=cg_max_iter, max_iter=max_iter,
                         tol_norm_ratio=tol_norm_ratio, merit=False)
    info["history"] = hist
    info["residual"] = prob.costs(x)[1]
    chi = to_ppm(x)
    ref = float(chi[mask].mean()) if reference == "mean" else 0.0
    chi[mask] -= ref
    info["reference"] = {"kind": reference, "offset_ppm": ref}
    return (chi, info) if return_info else chi


def _run(scan, p: TFIParams, *, device, progress=None, cancel=None, support=None, **_):
    chi, info = tfi(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, support=support,
                    magnitude=scan.magnitude, noise_std=getattr(scan, "noise_std", None), lam=p.lam,
                    precond=p.precond, percentage=p.percentage, edge_mask=p.edge_mask, reference="none",
                    cg_tol=p.cg_tol, cg_max_iter=p.cg_max_iter, max_iter=p.max_iter, tol_norm_ratio=p.tol_norm_ratio,
                    delta_te=p.delta_te, b0_tesla=getattr(scan, "b0_tesla", None), pad_factor=p.pad_factor,
                    device=device, progress=progress, cancel=cancel, return_info=True)
    h = info["history"]
    extras = {"field_kind": "total", "lambda": info["lambda"], "precond": info["precond"],
              "gn_iterations": h["gn_iters"], "converged": h["converged"], "cg_iterations": list(h["cg_iters"]),
              "norm_ratio": list(h["norm_ratio"]), "cost": list(h["cost"]), "data_residual": info["residual"],
              "data_weighting": info["data_weighting"], "fft_shape": info["fft_shape"]}
    for k in ("gradient_threshold", "edge_share"):
        if k in info:
            extras[k] = info[k]
    return {"chi": chi, "extras": extras}


@dataclass
class _KeepTotalParams:
    """No parameters: the total field is kept as it is."""


def _keep_total(field, mask, p, **_):
    return np.where(mask, field, 0).astype(np.float32), np.asarray(mask, bool)


#: the "background removal" a raw-echo pipeline runs before a method that takes the total field
#: (``Method.field_kind == "total"``): none, the unwrapped total field and the un-eroded brain mask go on.
KEEP_TOTAL_FIELD = Step(family="background", name="none", label="none (total field kept for TFI)",
                        params_cls=_KeepTotalParams, run=_keep_total,
                        doc="No background removal: the method fits brain and background sources together.")


METHODS = (Method(
    "tfi", "TFI", TFIParams, _run, order=50, short="TFI λ={lambda}", uses_magnitude=True, long_running=True,
    field_kind="total",
    doc="Total field inversion (Liu 2017, preconditioned; MEDI toolbox TFI_L1 semantics): takes the TOTAL "
        "field (unwrapped) and the brain mask, fits brain and background χ together with P = 1 in the brain and "
        "30 outside, MEDI's magnitude-edge L1 prior and Gauss-Newton/CG; no background removal step."),)
