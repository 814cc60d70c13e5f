"""Scan patches of the adaptation: phase scale, noise and edge weights, random patches of one or several scans."""

from __future__ import annotations

import math

import numpy as np
import torch

from ...core import constants
from ..inputs import network_input, tkd_channel
from ..losses import noise_weights
from ..synth import crop_box
from .records import AdaptParams


def _round16(n: int, mult: int = 16) -> int:
    return int(math.ceil(int(n) / mult) * mult)


def scan_patch_shape(scan_shape, patch: int, mult: int = 16) -> tuple:
    """Patch shape on a scan: ``patch`` per axis (multiple of 16), capped to the scan's padded size."""
    p = _round16(patch, mult)
    return tuple(min(p, _round16(n, mult)) for n in scan_shape)


def _rad_per_ppm(scan) -> float:
    """2π·γ̄·B0·TE of ``scan`` (3 T and 20 ms where it does not say; ``None`` = the reference scale)."""
    return constants.rad_per_ppm(getattr(scan, "b0_tesla", None), getattr(scan, "te", None))


def phase_scale(scan, rad_per_ppm="reference") -> float:
    """The phase scale (rad per ppm) of L_T on ``scan`` for the parameter ``rad_per_ppm``.

    ``"reference"`` (default): 16.05 rad/ppm (3 T, 20 ms) on every scan. L_T ≈ scale²·(weighted field
    residual)², so with the scan's own TE (``"auto"``) its weight against L_S and the prior would change
    with the echo spacing: a front-end field fitted over ΔTE = 4.1 ms weighs 24× less than at 20 ms, and
    the λ ramp tuned at 20 ms then lets the prior and L_S pull χ away (pipeline-made slab, case 0 of
    docs/benchmarks/adapt_pipeline_lbv.md: 89.3 % demeaned NRMSE with ``auto`` against 70.7 % with the
    reference; the unadapted network 78.5 %).
    """
    if rad_per_ppm == "reference":
        return _rad_per_ppm(None)
    if rad_per_ppm == "auto":
        return _rad_per_ppm(scan)
    return float(rad_per_ppm)


def _inv_weight(scan, how: str) -> tuple[np.ndarray, str]:
    """σ-like map whose inverse is the noise weighting (1 = uniform), and the kind used."""
    if how in ("auto", "noise") and scan.noise_std is not None:
        return np.where(np.isfinite(scan.noise_std) & (scan.noise_std > 0), scan.noise_std, np.inf).astype(
            np.float32), "noise"
    if how == "noise":
        raise ValueError("weighting: 'noise' needs a noise map (scan.noise_std); use auto, magnitude or mask")
    if how in ("auto", "magnitude") and scan.magnitude is not None:
        mag = np.abs(scan.magnitude).astype(np.float32)
        ref = float(np.median(mag[scan.mask])) if scan.mask.any() else 1.0
        ref = ref if ref > 0 else 1.0
        return (ref / np.maximum(mag, 1e-3 * ref)).astype(np.float32), "magnitude"
    if how == "magnitude":
        raise ValueError("weighting: 'magnitude' needs a magnitude image; use auto or mask")
    return np.ones(scan.shape, np.float32), "mask"


def _edge_weights(scan) -> tuple[np.ndarray, str]:
    """MEDI's gradient mask w_G (3, X, Y, Z) of the whole scan (1 = no magnitude edge), and its kind."""
    from ...core.inversion.medi import MEDIParams, gradient_mask

    if scan.magnitude is None:
        return np.ones((3,) + tuple(scan.shape), bool), "plain TV (no magnitude)"
    mag = torch.from_numpy(np.abs(scan.magnitude).astype(np.float32))
    m = torch.from_numpy(scan.mask.astype(np.float32))
    wg, _ = gradient_mask(mag, m, scan.voxel_size, MEDIParams().percentage)
    return wg.numpy(), "magnitude edges"


def _synth_regime(voxel_size):
    """The training regime with the closest voxel size, else a standard 160x192x160 mm field of view."""
    from ..synth import DEFAULT_REGIMES, Regime

    vs = np.asarray(voxel_size, float)
    best, dist = None, 1e9
    for r in DEFAULT_REGIMES:
        d = float(np.abs(np.log(vs / np.asarray(r.voxel_size, float))).max())
        if d < dist:
            best, dist = r, d
    if best is not None and dist < 0.05:
        return Regime(tuple(best.shape), tuple(best.voxel_size))
    shape = tuple(int(max(32, round(f / v))) for f, v in zip((160.0, 192.0, 160.0), vs))
    return Regime(shape, tuple(float(v) for v in vs))


def _check_scan(scan, p: AdaptParams, pshape) -> None:
    if not np.all(np.isfinite(scan.field[scan.mask])):
        raise ValueError("field: NaN/Inf inside the mask; fix the field or exclude those voxels from the mask")
    if scan.magnitude is not None and not np.all(np.isfinite(scan.magnitude[scan.mask])):
        raise ValueError("magnitude: NaN/Inf inside the mask")
    if p.smv_mm > 0:
        ext = np.asarray(pshape) * np.asarray(scan.voxel_size, float)
        if np.any(ext <= 2.0 * p.smv_mm + np.asarray(scan.voxel_size, float)):
            raise ValueError(f"smv_mm: a sphere of {p.smv_mm} mm does not fit in a scan patch of "
                             f"{tuple(round(float(e), 1) for e in ext)} mm; lower smv_mm or raise patch")
    n = int(scan.mask.sum())
    need = max(512, int(0.02 * np.prod(pshape)))
    if n < need:
        raise ValueError(f"mask: {n} voxels, too small for one adaptation patch of {tuple(pshape)} voxels "
                         f"(need at least {need} mask voxels)")


class _ScanPatches:
    """Random scan patches (network input, field, mask, interior weights) for step t."""

    def __init__(self, scan, p: AdaptParams, net_cfg, mult: int, device=None):
        self.scan = scan
        self.p = p
        self.net_cfg = net_cfg
        # the TKD channel is computed once on the whole scan and cropped, exactly as inference sees it
        self.tkd = (tkd_channel(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, net_cfg.tkd_delta,
                                device=device) if net_cfg.has_tkd else None)
        self.pshape = scan_patch_shape(scan.shape, p.patch, mult)
        self.inv_w, self.weighting = _inv_weight(scan, p.weighting)
        self.idx = np.flatnonzero(scan.mask)
        vs = np.asarray(scan.voxel_size, float)
        self.margin = np.ceil(p.margin_mm / vs).astype(int)
        self.wg = self.edge_kind = None
        if p.tv > 0 and p.mode == "dsbn":
            self.wg, self.edge_kind = _edge_weights(scan)
        self.uw = None
        if p.mode == "uqsm":
            # uQSM's data weight w = magnitude / its maximum in the mask (not renormalised); mask without a magnitude
            if p.weighting in ("auto", "magnitude") and scan.magnitude is not None:
                mag = np.abs(scan.magnitude).astype(np.float32)
                mx = float(mag[scan.mask].max()) if scan.mask.any() else 0.0
                self.uw = (mag / mx if mx > 0 else np.ones_like(mag)).astype(np.float32)
                self.weighting = "magnitude / max in the mask (uQSM)"
            elif p.weighting == "magnitude":
                raise ValueError("weighting: 'magnitude' needs a magnitude image; use auto or mask")
            else:
                self.uw = np.ones(scan.shape, np.float32)
                self.weighting = "mask (uQSM, no magnitude)"
            self.edge_kind = "plain TV (uQSM)"
        # geometry and phase scale of this scan (protocol adaptation: every scan its own dipole kernel)
        self.vs = tuple(float(v) for v in scan.voxel_size)
        self.b0 = np.asarray(scan.b0_direction, float)
        self.ppp = phase_scale(scan, p.rad_per_ppm)

    def starts(self, step: int, k: int) -> np.ndarray:
        rng = np.random.default_rng([int(self.p.seed), int(step), int(k), 23])
        P = np.asarray(self.pshape)
        N = np.asarray(self.scan.shape)
        c = np.array(np.unravel_index(int(self.idx[rng.integers(self.idx.size)]), self.scan.shape))
        start = c - P // 2
        for ax in range(3):
            start[ax] = int(np.clip(start[ax], 0, N[ax] - P[ax])) if N[ax] >= P[ax] else 0
        return start

    def batch(self, step: int, device, ks=None):
        """Tensors of step t: network input, field, L_T mask, L_T noise weights (None with the SMV term:
        :func:`loss_field` builds them on its region), edge weights, prior mask, σ-like map; in uqsm mode the
        last is uQSM's (unnormalised) data weight instead of the σ-like map. ``ks``: the batch slots to draw
        (default all ``scan_batch``)."""
        xs, fs_, ms, ws, gs, ps = [], [], [], [], [], []
        smv = self.p.smv_mm > 0
        for k in (range(self.p.scan_batch) if ks is None else ks):
            st = self.starts(step, k)
            m = crop_box(self.scan.mask, st, self.pshape, False)
            f = crop_box(self.scan.field, st, self.pshape, 0.0) * m
            iw = crop_box(self.inv_w, st, self.pshape, np.inf)
            tk = crop_box(self.tkd, st, self.pshape, 0.0) if self.tkd is not None else None
            xs.append(network_input(f, m, self.net_cfg, tkd=tk))
            fs_.append(f[None])
            ws.append(iw[None] if self.uw is None else crop_box(self.uw, st, self.pshape, 0.0)[None])
            ps.append(m.astype(np.float32)[None])
            if self.wg is not None:
                gs.append(np.stack([crop_box(g, st, self.pshape, False) for g in self.wg]))
            if smv:          # loss_field erodes the patch mask by the sphere (faces included)
                ms.append(m.astype(np.float32)[None])
                continue
            # interior: drop a band along each face that cuts through the volume
            inner = np.ones(self.pshape, bool)
            for ax in range(3):
                N = self.scan.shape[ax]
                lo, hi = st[ax], st[ax] + self.pshape[ax]
                b = int(self.margin[ax])
                sl = [slice(None)] * 3
                if lo > 0 and b > 0:
                    sl[ax] = slice(0, b)
                    inner[tuple(sl)] = False
                if hi < N and b > 0:
                    sl[ax] = slice(self.pshape[ax] - b, None)
                    inner[tuple(sl)] = False
            mi = m & inner
            if not mi.any():      # a patch with no interior brain: fall back to the whole patch
                mi = m
            ms.append(mi.astype(np.float32)[None])
        t = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a), dtype=np.float32)).to(device)
        x, f, mi, iw = t(xs), t(fs_), t(ms), t(ws)
        if self.uw is not None:
            return x, f, mi, iw * mi, None, t(ps) if smv else mi, iw
        w = None if smv else noise_weights(mi, iw)
        # the prior is taken on the L_T region of the old term, on the whole patch mask with the SMV term
        return x, f, mi, w, (t(gs) if gs else None), (t(ps) if smv else mi), iw


class _ProtocolPatches:
    """Scan patches drawn from several scans (protocol adaptation): slot k of step t comes from scan
    ``which(t, k)``; patches of one scan are stacked and evaluated with that scan's geometry. One scan
    gives exactly the single-scan stream of :class:`_ScanPatches`."""

    def __init__(self, scans, p: AdaptParams, net_cfg, mult: int, device=None):
        self.p = p
        self.parts = [_ScanPatches(sc, p, net_cfg, mult, device=device) for sc in scans]
        self.pshape = self.parts[0].pshape
        self.weighting = self.parts[0].weighting
        self.edge_kind = self.parts[0].edge_kind

    def which(self, step: int, k: int) -> int:
        if len(self.parts) == 1:
            return 0
        rng = np.random.default_rng([int(self.p.seed), int(step), int(k), 29])
        return int(rng.integers(len(self.parts)))

    def groups(self, step: int, device):
        """[(scan index, number of patches, tensors of _ScanPatches.batch)] for step t."""
        if len(self.parts) == 1:
            return [(0, self.p.scan_batch, self.parts[0].batch(step, device))]
        by = {}
        for k in range(self.p.scan_batch):
            by.setdefault(self.which(step, k), []).append(k)
        return [(i, len(ks), self.parts[i].batch(step, device, ks)) for i, ks in sorted(by.items())]
