"""COSMOS: calculation of susceptibility through multiple orientation sampling (Liu et al. 2009).

Closed-form k-space solution χ̂ = Σ D_i F_i / (Σ D_i² + ε) on the zero-padded grid, refined by
preconditioned data-consistency iterations on the masks (``refine``). The model, the command line and
the B0 direction of each orientation are described in docs/cosmos.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..device import resolve_device
from ..dipole import dipole_kernel, fast_shape
from ..method import Method
from ..params import param
from ..progress import Reporter


@dataclass
class COSMOSParams:
    eps: float = param(1e-4, "Tikhonov ε added to Σ D_i² (only matters where all kernels vanish)", min=0.0, max=1.0)
    pad_factor: float = param(2.0, "zero-padding factor of the FFT grid (≥1; 2 prevents wrap-around)", min=1.0, max=4.0)
    mask_fields: bool = param(True, "zero each field outside its own mask before the inversion")
    refine: int = param(10, "data-consistency iterations for fields known only inside their masks (0 = closed form)",
                        min=0, max=200)


def _check_scans(scans):
    scans = list(scans or [])
    if len(scans) < 2:
        raise ValueError(f"scans: COSMOS needs at least 2 orientations of the same head, got {len(scans)}")
    ref = scans[0]
    for i, s in enumerate(scans[1:], start=1):
        if tuple(s.shape) != tuple(ref.shape):
            raise ValueError(f"scans[{i}]: shape {tuple(s.shape)} does not match scans[0] shape {tuple(ref.shape)}; "
                             "COSMOS needs co-registered field maps on one grid")
        if not np.allclose(s.voxel_size, ref.voxel_size, rtol=1e-4):
            raise ValueError(f"scans[{i}]: voxel size {s.voxel_size} does not match scans[0] {ref.voxel_size}")
    dirs = np.array([np.asarray(s.b0_direction, float) for s in scans])
    for i in range(len(dirs)):
        for j in range(i):
            if abs(float(dirs[i] @ dirs[j])) > 1 - 1e-6:
                srcs = [(getattr(scans[k], "source", None) or {}).get("b0_direction_source") for k in (i, j)]
                hint = ""
                if "header" in srcs:
                    hint = ("; a field registered onto a common grid usually carries that grid's header, so its B0 "
                            "must be given: X Y Z after --orientation FIELD, or a sidecar FIELD.json with "
                            "\"B0Direction\" or \"RegistrationMatrix\"")
                raise ValueError(f"scans[{i}]: B0 direction {np.round(dirs[i], 4).tolist()} (from "
                                 f"{srcs[0] or 'the scan'}) equals that of scans[{j}] (from {srcs[1] or 'the scan'}); "
                                 f"COSMOS needs different orientations{hint}")
    return scans


def cosmos(scans, eps: float = 1e-4, pad_factor: float = 2.0, device="auto", mask_fields: bool = True,
           refine: int = 10, progress=None, cancel=None, return_info: bool = False):
    """χ (ppm, float32) from ≥ 2 co-registered :class:`~napari_qsm.core.scan.Scan` with different B0 directions."""
    scans = _check_scans(scans)
    dev = resolve_device(device)
    rep = Reporter(progress, cancel, total=refine + 1, stage="COSMOS")
    shape = scans[0].shape
    pshape = fast_shape(shape, pad_factor)
    vs = scans[0].voxel_size
    union = np.zeros(shape, bool)
    for s in scans:
        union |= s.mask
    n0, n1, n2 = shape
    with torch.no_grad():
        kernels = [dipole_kernel(pshape, vs, s.b0_direction, device=dev) for s in scans]
        den = torch.zeros_like(kernels[0])
        for D in kernels:
            den.addcmul_(D, D)
        den[0, 0, 0] = float("inf")
        min_den = float(den.min())  # conditioning: smallest Σ D_i² away from k = 0
        den[0, 0, 0] = 1.0
        inv = 1.0 / (den + eps) if eps > 0 else 1.0 / den.clamp_min(1e-12)
        inv[0, 0, 0] = 0.0
        del den
        masks = [torch.as_tensor(s.mask, device=dev) for s in scans] if mask_fields else None
        fields = []
        for i, s in enumerate(scans):
            f = np.where(s.mask, s.field, 0.0) if mask_fields else s.field
            fields.append(torch.as_tensor(np.asarray(f, np.float32), device=dev))

        def closed(fl):
            num = None
            for f, D in zip(fl, kernels):
                F = torch.fft.rfftn(f, s=pshape)
                F *= D
                num = F if num is None else num.add_(F)
            num *= inv
            return torch.fft.irfftn(num, s=pshape)[:n0, :n1, :n2]

        rep(0, "COSMOS closed form")
        chi = closed(fields)
        steps = refine if mask_fields else 0
        hist = []
        for it in range(steps):
            res = []
            X = torch.fft.rfftn(chi, s=pshape)       # once per step: every orientation's D·χ starts from it
            for f, D, M in zip(fields, kernels, masks):
                Dx = torch.fft.irfftn(X * D, s=pshape)[:n0, :n1, :n2]
                res.append((f - Dx) * M)
            del X
            rel = float(torch.sqrt(sum((r * r).sum() for r in res) / sum((f * f).sum() for f in fields)))
            hist.append(rel)
            rep(it + 1, f"COSMOS refine {it + 1}/{steps}", residual=rel)
            chi = chi + closed(res)
        out = (chi.cpu().numpy() * union).astype(np.float32)
    info = {"orientations": len(scans), "min_sum_D2": min_den, "padded_shape": list(pshape),
            "refine_residuals": hist,
            "b0_directions": [np.round(np.asarray(s.b0_direction, float), 6).tolist() for s in scans],
            "b0_sources": [(getattr(s, "source", None) or {}).get("b0_direction_source") for s in scans]}
    return (out, info) if return_info else out


def _run(scan, p: COSMOSParams, *, device, progress=None, cancel=None, scans=None, **_):
    if scans is None:
        raise ValueError("scans: COSMOS needs the other orientations; pass scans=[...] "
                         "(command line: --orientation FIELD [X Y Z], repeated)")
    scans = list(scans)
    if not any(s is scan for s in scans):
        scans = [scan] + scans
    else:  # the main scan first: its grid defines the output
        scans = [scan] + [s for s in scans if s is not scan]
    chi, info = cosmos(scans, eps=p.eps, pad_factor=p.pad_factor, device=device, mask_fields=p.mask_fields,
                       refine=p.refine, progress=progress, cancel=cancel, return_info=True)
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "cosmos", "COSMOS", COSMOSParams, _run, order=30, multi_scan=True,
    doc="Multiple-orientation inversion: χ̂ = Σ D_i F_i / (Σ D_i² + ε) in k-space from ≥ 2 co-registered field maps "
        "with different B0 directions (the reference standard for single-orientation methods)."),)
