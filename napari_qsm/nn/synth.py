"""Synthetic training pairs (field, mask) -> χ for QSMInvNet(+).

Recipe (DESIGN.md "The method", issue 4):

1. **Phantom pool.** Whole heads from :func:`napari_qsm.core.sim.phantom.make_phantom` (randomised
   anatomy and χ values, texture on, noise-free) are kept in memory; generating a head costs
   ~3.5 s, so one slot of the pool is replaced by a fresh head every ``refresh_every`` steps. The
   pool content is a pure function of the step (head ``k`` has seed ``seed_base + k``), so a
   resumed run sees the same data. Each head is drawn at one of several voxel-size regimes
   (1 mm isotropic through 0.75x0.75x3 mm clinical slabs).
2. **Random patch** (``patch`` voxels) centred where the brain mask covers at least
   ``min_mask_fraction`` of it; random flips of each axis.
3. **Elastic deformation**: a smooth random displacement (``elastic_amp_mm``, correlation
   ``elastic_sigma_mm``) resamples χ (linear), magnitude (linear) and labels / mask (nearest).
4. **Contrast change**: per compartment (label) χ ← s·χ + o with s ∈ ``contrast_scale`` and
   o ∈ ±``contrast_offset`` ppm; with probability ``p_extreme`` the whole patch is further scaled
   by up to ``extreme_scale`` so values outside the usual range are seen (the inversion is linear).
5. **Fake lesions**: 0..``max_lesions`` spheres, ellipsoids or lobulated blobs (radius
   ``lesion_radius_mm``) of strongly positive or negative χ (|χ| ∈ ``lesion_chi``) inside the mask,
   soft-edged, darkening the magnitude.
6. **Field** = D ∗ (χ·mask) with the core forward model (zero-padded 2x, D(0) = 0) for the patch's
   voxel size and a B0 direction tilted by 0..``tilt_max_deg`` about a random in-plane axis,
   times the mask, plus magnitude-weighted Gaussian noise with the phantom generator's noise model
   (σ_φ = mean_mag/(snr·mag), capped at 1 rad; σ_f = σ_φ / phase_per_ppm), snr log-uniform in
   ``snr_range`` (noise-free with probability ``p_noise_free``).

**Honest mode** (``honest=True``; default off, so on-scan adaptation's synthetic L_S data is unchanged
unless configured). Step 6 is replaced by a forward model that is *not* the inversion's discrete kernel,
mirroring the honest phantoms of :func:`napari_qsm.core.sim.phantom.make_phantom` (``honest=True``) that
validation uses, at the cost of a kernel evaluation instead of a fine-grid FFT:

6h. **Field on a finer grid, voxel-averaged.** The patch χ is taken as piecewise constant over each
   voxel, its field computed on a grid ``honest_factor`` times finer along every axis and averaged
   back over each voxel. For piecewise-constant χ that linear map is diagonal in the coarse k-space,
   :func:`fine_grid_kernel` H(k) = Σ_m |B(k + m/Δ)|² D(k + m/Δ) over the fine grid's aliases of k
   (B = the voxel-average transfer function, Σ_m |B|² = 1, D(0) = 0), so it costs one FFT pair on the
   coarse padded grid like the default. H differs from the discrete D near the Nyquist band, most
   along thick-slice axes.
7h. **Multi-echo complex data and fit.** R2* from χ (``honest_r2_base`` + ``honest_r2_per_ppm``·|χ| s⁻¹,
   drawn per patch), proton density = magnitude·e^{TE·R2*}; the echo protocol of the phantom generator
   for that voxel shape (7 echoes TE1 12.6 ms ΔTE 4.1 ms for thick slices, else 5 echoes TE1 4 ms
   ΔTE 4 ms); intra-voxel dephasing of a linear field gradient across the voxel (|sinc| per axis on
   the magnitude); a random constant transceive phase; complex Gaussian noise of σ = mean echo-1
   magnitude in the mask / snr (snr log-uniform in ``snr_range``); the field, magnitude (RSS) and
   N_std fitted from the echoes with the phantom generator's own fit (successive-echo ratios, a line
   weighted by |S_n|²). ``Sample.field`` is the fitted field × mask, ``Sample.magnitude`` the RSS
   magnitude and ``Sample.noise_std`` the fitted N_std; the label χ is unchanged. Cost ≈ 0.5 s per 64³
   patch on one thread (≈ 0.3 s more than the default).

**Families** (issue 26): the pool's heads come from the families of :mod:`napari_qsm.nn.families`
(procedural heads, random geometric sources, smooth random textures; vessel and calcification inserts)
with the config's ``families`` weights; the default is the procedural pool above, unchanged.

Everything is float32 numpy; :func:`to_tensors` builds the network input
(:mod:`napari_qsm.nn.inputs`) and target (χ·chi_scale) of a batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import numpy as np
import torch
from scipy import ndimage
from scipy.special import expit

from ..core.constants import GAMMA_BAR_HZ_PER_T, REFERENCE_B0_T, REFERENCE_TE_S, rad_per_ppm
from ..core.dipole import forward_field
from .families import family_of, make_family_head
from .inputs import network_input



def phase_per_ppm(b0_tesla: float = REFERENCE_B0_T, te: float = REFERENCE_TE_S) -> float:
    """Radians of phase per ppm of field: 2π·γ̄·B0·TE·1e-6 (16.05 rad/ppm at 3 T, TE 20 ms;
    :func:`napari_qsm.core.constants.rad_per_ppm`)."""
    return rad_per_ppm(b0_tesla, te)


@dataclass
class Regime:
    shape: tuple
    voxel_size: tuple
    weight: float = 1.0


DEFAULT_REGIMES = (
    Regime((160, 192, 160), (1.0, 1.0, 1.0), 0.5),     # research, 1 mm isotropic
    Regime((192, 224, 48), (0.75, 0.75, 3.0), 0.25),   # clinical thick-slice
    Regime((160, 192, 56), (1.0, 1.0, 3.0), 0.125),
    Regime((160, 192, 80), (1.0, 1.0, 2.0), 0.125),
)


@dataclass
class SynthConfig:
    patch: tuple = (64, 64, 48)
    pool_size: int = 12
    refresh_every: int = 40
    seed_base: int = 100_000          # training heads use seeds seed_base + k (validation uses < 1000)
    regimes: tuple = DEFAULT_REGIMES
    tilt_max_deg: float = 25.0
    snr_range: tuple = (40.0, 400.0)
    p_noise_free: float = 0.1
    b0_tesla: float = REFERENCE_B0_T
    te: float = REFERENCE_TE_S
    min_mask_fraction: float = 0.2
    p_flip: float = 0.5
    p_elastic: float = 0.5
    elastic_amp_mm: float = 3.0
    elastic_sigma_mm: float = 12.0
    p_contrast: float = 0.8
    contrast_scale: tuple = (0.4, 2.0)
    contrast_offset: float = 0.04
    p_extreme: float = 0.15
    extreme_scale: float = 3.0
    max_lesions: int = 3
    lesion_chi: tuple = (0.1, 1.5)
    lesion_radius_mm: tuple = (1.5, 8.0)
    # honest mode (module docstring, 6h/7h); off by default
    honest: bool = False
    honest_factor: int = 2            # fine points per voxel along each axis of the forward model
    honest_r2_base: tuple = (12.0, 25.0)    # R2* of tissue (1/s), drawn per patch
    honest_r2_per_ppm: tuple = (50.0, 150.0)  # R2* increase per ppm of |χ| (1/s/ppm), drawn per patch
    honest_dephasing: bool = True
    # data families (napari_qsm.nn.families); the default is the original pool of procedural heads
    families: dict = field(default_factory=lambda: {"procedural": 1.0})
    family_box: float = 1.25          # non-procedural heads: this many patches, at most the regime's shape
    geo_shapes: tuple = (6, 30)       # number of geometric sources per head
    geo_chi: tuple = (-0.3, 0.6)      # their χ (ppm)
    texture_sigma_mm: tuple = (2.0, 15.0)   # correlation length of smooth χ textures
    texture_std: tuple = (0.02, 0.12)       # their std (ppm)
    texture_offset: float = 0.1       # compartment χ offsets of the texture family (± ppm)
    p_inserts: float = 0.0            # probability that a pooled head gets vessel / calcification inserts
    max_vessels: int = 4
    vessel_chi: tuple = (0.15, 0.6)
    vessel_radius_mm: tuple = (0.4, 2.0)
    max_calcifications: int = 3
    calc_chi: tuple = (-2.0, -0.3)
    calc_radius_mm: tuple = (0.5, 3.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["regimes"] = [asdict(r) if not isinstance(r, dict) else r for r in self.regimes]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SynthConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"synth config: unknown keys {sorted(unknown)}")
        d = dict(d)
        if "regimes" in d:
            d["regimes"] = tuple(Regime(tuple(r["shape"]), tuple(r["voxel_size"]), float(r.get("weight", 1.0)))
                                 for r in d["regimes"])
        for k in ("patch", "snr_range", "contrast_scale", "lesion_chi", "lesion_radius_mm", "honest_r2_base",
                  "honest_r2_per_ppm", "geo_shapes", "geo_chi", "texture_sigma_mm", "texture_std", "vessel_chi",
                  "vessel_radius_mm", "calc_chi", "calc_radius_mm"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class Head:
    """One pooled phantom (noise-free, in memory)."""

    chi: np.ndarray
    mask: np.ndarray
    magnitude: np.ndarray
    labels: np.ndarray
    voxel_size: tuple
    seed: int
    family: str = "procedural"
    inserts: dict = field(default_factory=dict)


@dataclass
class Sample:
    field: np.ndarray      # ppm, masked, noisy
    mask: np.ndarray       # float32 0/1
    chi: np.ndarray        # ppm, masked (label)
    magnitude: np.ndarray
    noise_std: np.ndarray  # ppm
    voxel_size: tuple
    b0_direction: np.ndarray
    info: dict = field(default_factory=dict)


def make_head(seed: int, regime: Regime, device="cpu") -> Head:
    from ..core.sim.phantom import make_phantom

    ph = make_phantom(tuple(regime.shape), tuple(regime.voxel_size), (0.0, 0.0, 1.0), seed=int(seed),
                      snr=None, texture=True, randomize=True, device=device)
    return Head(chi=ph.chi.astype(np.float32), mask=ph.mask.astype(bool), magnitude=ph.magnitude.astype(np.float32),
                labels=ph.labels.astype(np.int16), voxel_size=tuple(float(v) for v in ph.voxel_size), seed=int(seed))


class PhantomPool:
    """A pool of heads whose content is a function of the training step (resumable, deterministic)."""

    def __init__(self, cfg: SynthConfig, device="cpu", log=None):
        self.cfg = cfg
        self.device = device
        self.slots: list[Optional[tuple[int, Head]]] = [None] * cfg.pool_size
        self.log = log
        w = np.array([r.weight for r in cfg.regimes], dtype=np.float64)
        self._p = w / w.sum()

    def regime_of(self, k: int) -> Regime:
        rng = np.random.default_rng([self.cfg.seed_base, k, 7])
        return self.cfg.regimes[int(rng.choice(len(self.cfg.regimes), p=self._p))]

    def wanted(self, step: int) -> list[int]:
        n = self.cfg.pool_size + (step // self.cfg.refresh_every if self.cfg.refresh_every > 0 else 0)
        out = []
        for j in range(self.cfg.pool_size):
            k = j + ((n - 1 - j) // self.cfg.pool_size) * self.cfg.pool_size
            out.append(k)
        return out

    def sync(self, step: int, cancel_check=None) -> int:
        """Make the pool hold the heads of ``step``; returns the number of heads generated."""
        made = 0
        for j, k in enumerate(self.wanted(step)):
            if self.slots[j] is not None and self.slots[j][0] == k:
                continue
            if cancel_check is not None:
                cancel_check()
            reg = self.regime_of(k)
            fam = family_of(self.cfg, k)
            head = make_family_head(fam, self.cfg.seed_base + k, reg, self.cfg, self.device)
            self.slots[j] = (k, head)
            made += 1
            if self.log:
                self.log(f"pool slot {j}: head {k} (seed {self.cfg.seed_base + k}) {fam} {reg.voxel_size} mm"
                         + (f" inserts {head.inserts}" if head.inserts else ""))
        return made

    def heads(self) -> list[Head]:
        return [s[1] for s in self.slots if s is not None]


# ----------------------------------------------------------------------------------------------
# augmentations
# ----------------------------------------------------------------------------------------------

def crop_box(a: np.ndarray, start, size, fill=0):
    """Crop ``size`` from ``a`` at ``start`` (may extend outside: filled with ``fill``)."""
    out = np.full(size, fill, dtype=a.dtype)
    src, dst = [], []
    for s, n, N in zip(start, size, a.shape):
        s0, s1 = max(s, 0), min(s + n, N)
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - s, s1 - s))
    out[tuple(dst)] = a[tuple(src)]
    return out


def random_tilt(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """B0 direction tilted from +z by U(0, max_deg) degrees towards a random in-plane azimuth."""
    th = math.radians(float(rng.uniform(0.0, max_deg)))
    ph = float(rng.uniform(0.0, 2 * math.pi))
    return np.array([math.sin(th) * math.cos(ph), math.sin(th) * math.sin(ph), math.cos(th)])


def _smooth_field(rng, shape, vs, sigma_mm):
    """Zero-mean unit-std smooth random field on ``shape`` (correlation ~sigma_mm)."""
    coarse = [max(2, int(math.ceil(n * d / sigma_mm)) + 2) for n, d in zip(shape, vs)]
    c = rng.standard_normal(coarse).astype(np.float32)
    f = ndimage.zoom(c, [n / m for n, m in zip(shape, coarse)], order=3, mode="nearest", grid_mode=True)
    f = f[: shape[0], : shape[1], : shape[2]]
    if f.shape != tuple(shape):
        f = crop_box(f, (0, 0, 0), shape)
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


def _lesion(rng, shape, vs, mask, cfg: SynthConfig):
    """Soft-edged lesion alpha map (sphere, ellipsoid or blob) centred inside the mask."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    c = np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), shape), dtype=np.float32)
    r = float(rng.uniform(*cfg.lesion_radius_mm))
    kind = rng.integers(3)
    if kind == 0:
        semi = np.array([r, r, r])
    else:
        semi = r * rng.uniform(0.5, 1.5, 3)
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    ext = (semi.max() * 1.6 + 2.0) / np.asarray(vs)
    lo = np.maximum(np.floor(c - ext).astype(int), 0)
    hi = np.minimum(np.ceil(c + ext).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None
    g = np.meshgrid(*[(np.arange(a, b) - cc) * d for a, b, cc, d in zip(lo, hi, c, vs)], indexing="ij")
    p = np.stack([x.astype(np.float32) for x in g], -1) @ q.astype(np.float32)
    rr = np.sqrt(((p / semi.astype(np.float32)) ** 2).sum(-1))
    if kind == 2:  # lobulated blob: radius modulated by smooth noise
        mod = _smooth_field(rng, rr.shape, vs, max(r, 2.0))
        rr = rr / np.clip(1.0 + 0.3 * mod, 0.5, 1.6)
    w = 0.35 * float(np.prod(vs) ** (1 / 3)) / r
    a = np.zeros(shape, np.float32)
    a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = expit(-(rr - 1.0) / w)
    return a


def sample_pair(head: Head, rng: np.random.Generator, cfg: SynthConfig, augment: bool = True,
                b0_direction=None, snr="random") -> Sample:
    """One synthetic (field, mask, χ) patch from a pooled head (see the module docstring)."""
    vs = np.asarray(head.voxel_size, dtype=np.float64)
    P = tuple(int(n) for n in cfg.patch)
    # -- random patch location with enough brain ---------------------------------------------
    amp_vox = np.ceil(2.0 * cfg.elastic_amp_mm / vs).astype(int) + 1 if augment else np.zeros(3, int)
    big = tuple(n + 2 * m for n, m in zip(P, amp_vox))
    idx = np.flatnonzero(head.mask)
    for _ in range(20):
        c = np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), head.mask.shape))
        start = c - np.asarray(P) // 2
        # keep the patch inside the volume where the volume is large enough
        for ax in range(3):
            N = head.mask.shape[ax]
            start[ax] = int(np.clip(start[ax], 0, N - P[ax])) if N >= P[ax] else (N - P[ax]) // 2
        m = crop_box(head.mask, start, P)
        if m.mean() >= cfg.min_mask_fraction:
            break
    bstart = start - amp_vox
    chi = crop_box(head.chi, bstart, big)
    mag = crop_box(head.magnitude, bstart, big)
    lab = crop_box(head.labels, bstart, big)
    msk = crop_box(head.mask, bstart, big)
    info = {"seed": head.seed, "family": head.family, "voxel_size": list(head.voxel_size), "start": [int(s) for s in start]}
    # -- elastic deformation -------------------------------------------------------------------
    if augment and rng.random() < cfg.p_elastic:
        grid = np.meshgrid(*[np.arange(n, dtype=np.float32) + m for n, m in zip(P, amp_vox)], indexing="ij")
        amp = float(rng.uniform(0.3, 1.0)) * cfg.elastic_amp_mm
        coords = [g + (amp / d) * _smooth_field(rng, P, vs, cfg.elastic_sigma_mm) for g, d in zip(grid, vs)]
        chi = ndimage.map_coordinates(chi, coords, order=1, mode="nearest").astype(np.float32)
        mag = ndimage.map_coordinates(mag, coords, order=1, mode="nearest").astype(np.float32)
        lab = ndimage.map_coordinates(lab, coords, order=0, mode="nearest").astype(np.int16)
        msk = ndimage.map_coordinates(msk.astype(np.uint8), coords, order=0, mode="nearest").astype(bool)
        info["elastic_mm"] = amp
    else:
        sl = tuple(slice(m, m + n) for m, n in zip(amp_vox, P))
        chi, mag, lab, msk = chi[sl].copy(), mag[sl].copy(), lab[sl].copy(), msk[sl].copy()
    # -- contrast change ------------------------------------------------------------------------
    if augment and rng.random() < cfg.p_contrast:
        out = chi.copy()
        for l in np.unique(lab[msk]):
            sel = lab == l
            s = float(rng.uniform(*cfg.contrast_scale))
            o = float(rng.uniform(-cfg.contrast_offset, cfg.contrast_offset))
            out[sel] = chi[sel] * s + o
        chi = out
        if rng.random() < cfg.p_extreme:
            g = float(rng.uniform(1.0, cfg.extreme_scale))
            chi *= g
            info["extreme_scale"] = g
    # -- fake lesions --------------------------------------------------------------------------
    if augment and cfg.max_lesions > 0:
        n = int(rng.integers(0, cfg.max_lesions + 1))
        for _ in range(n):
            a = _lesion(rng, P, vs, msk, cfg)
            if a is None:
                continue
            v = float(rng.uniform(*cfg.lesion_chi)) * (1.0 if rng.random() < 0.6 else -1.0)
            chi = chi + a * (v - chi)
            mag = mag * (1.0 - 0.6 * a)
        info["lesions"] = n
    # -- flips -----------------------------------------------------------------------------------
    if augment:
        for ax in range(3):
            if rng.random() < cfg.p_flip:
                chi, mag, msk = np.flip(chi, ax), np.flip(mag, ax), np.flip(msk, ax)
    chi = np.ascontiguousarray(chi, dtype=np.float32) * msk
    mag = np.ascontiguousarray(mag, dtype=np.float32)
    msk = np.ascontiguousarray(msk)
    # -- field + noise ---------------------------------------------------------------------------
    b0 = random_tilt(rng, cfg.tilt_max_deg) if b0_direction is None else np.asarray(b0_direction, float)
    if cfg.honest:
        return _honest_field(chi, mag, msk, vs, b0, rng, cfg, snr, info)
    fld = forward_field(chi, tuple(vs), b0, device="cpu") * msk
    ppp = phase_per_ppm(cfg.b0_tesla, cfg.te)
    if snr == "random":
        snr = None if rng.random() < cfg.p_noise_free else float(np.exp(rng.uniform(*np.log(cfg.snr_range))))
    mean_mag = float(mag[msk].mean()) if msk.any() else 1.0
    sig_phi = np.minimum(1.0, mean_mag / (float(snr or 1e4) * np.maximum(mag, 1e-6)))
    noise_std = (sig_phi / ppp).astype(np.float32)
    if snr is not None:
        fld = fld + rng.standard_normal(P).astype(np.float32) * noise_std * msk
    info.update(snr=snr, b0_direction=[float(x) for x in b0])
    return Sample(field=fld.astype(np.float32), mask=msk.astype(np.float32), chi=chi, magnitude=mag,
                  noise_std=noise_std, voxel_size=tuple(float(v) for v in vs), b0_direction=b0, info=info)


# ----------------------------------------------------------------------------------------------
# honest mode: a forward model that is not the inversion's kernel, multi-echo data and fit
# ----------------------------------------------------------------------------------------------

def fine_grid_kernel(shape, voxel_size, b0_direction, factor=2, device="cpu") -> torch.Tensor:
    """k-space kernel (rfft half grid of ``shape``) of "upsample piecewise-constant χ ``factor``× along each
    axis, apply the discrete dipole kernel D (D(0) = 0) on the fine grid, average over each voxel".

    On the coarse periodic grid that operator is diagonal: H(k) = Σ_m Π_j W_f(k_j + m_j/Δ_j) D(k + m/Δ),
    the sum over the fine grid's frequencies that alias to k (wrapped into the fine band), with
    W_f(κ) = |(1/f) Σ_s e^{-2πi κ s Δ/f}|² the voxel-average (= replication) transfer function squared;
    Σ_m W_f = 1, so with D ≡ 1 it is the identity. ``factor`` 1 gives the plain discrete kernel.
    """
    from ..core.dipole import kspace_grid, unit_vector

    b = unit_vector(b0_direction)
    vs = np.asarray(voxel_size, dtype=np.float64)
    fs = (int(factor),) * 3 if np.isscalar(factor) else tuple(int(v) for v in factor)
    ks = kspace_grid(shape, vs, device=device, dtype=torch.float64, half=True)
    H = torch.zeros(tuple(k.numel() for k in ks), dtype=torch.float32, device=device)

    def weight(kk, d, f):
        if f == 1:
            return torch.ones_like(kk)
        x = math.pi * kk * d / f               # half the phase step between fine points
        num = torch.sin(f * x)
        den = f * torch.sin(x)
        w = torch.where(den.abs() < 1e-12, torch.ones_like(x), num / torch.where(den.abs() < 1e-12,
                                                                                  torch.ones_like(den), den))
        return w * w

    alias = []
    for ax, (k, d, f) in enumerate(zip(ks, vs, fs)):
        opts = []
        band = f / (2.0 * d)                    # fine-grid Nyquist (cycles/mm)
        for m in range(f):
            kk = k + m / d
            if ax < 2:   # wrap into the fine band as fftfreq does: [-band, band) ...
                kk = torch.remainder(kk + band, 2.0 * band) - band
            else:        # ... and as rfftfreq does on the last axis: (-band, band]
                kk = band - torch.remainder(band - kk, 2.0 * band)
            opts.append((kk, weight(kk, d, f)))
        alias.append(opts)
    for a0 in alias[0]:
        for a1 in alias[1]:
            for a2 in alias[2]:
                kx, ky, kz = (a[0].to(torch.float32) for a in (a0, a1, a2))
                w = (a0[1] * a1[1] * a2[1]).to(torch.float32)          # broadcast of three 1-D factors
                k2 = kx * kx + ky * ky + kz * kz
                kb = kx * float(b[0]) + ky * float(b[1]) + kz * float(b[2])
                zero = k2 == 0
                k2.masked_fill_(zero, 1.0)
                dk = kb.square_().div_(k2).neg_().add_(1.0 / 3.0).masked_fill_(zero, 0.0)
                H += dk.mul_(w)
    return H


def fine_grid_field(chi, voxel_size, b0_direction, factor=2, pad_factor: float = 2.0) -> np.ndarray:
    """Field (ppm) of χ through :func:`fine_grid_kernel` (zero-padded ``pad_factor``×), numpy float32."""
    from ..core.dipole import convolve_kernel, fast_shape

    x = torch.as_tensor(np.asarray(chi, dtype=np.float32))
    ps = fast_shape(x.shape, pad_factor)
    H = fine_grid_kernel(ps, voxel_size, b0_direction, factor)
    with torch.no_grad():
        return convolve_kernel(x, H, ps).numpy().astype(np.float32)


def _honest_field(chi, mag, msk, vs, b0, rng, cfg: SynthConfig, snr, info) -> Sample:
    """Steps 6h/7h of the module docstring."""
    from ..core.sim.signal import _fit_echoes, default_echo_protocol

    P = chi.shape
    true_field = fine_grid_field(chi, tuple(vs), b0, cfg.honest_factor) * msk
    proto = default_echo_protocol(tuple(vs))
    tes = np.asarray(proto.echo_times, np.float32)
    rad_per_ppm_s = np.float32(2.0 * math.pi * GAMMA_BAR_HZ_PER_T * float(cfg.b0_tesla) * 1e-6)
    r2_base = float(rng.uniform(*cfg.honest_r2_base))
    r2_slope = float(rng.uniform(*cfg.honest_r2_per_ppm))
    r2s = (np.float32(r2_base) + np.float32(r2_slope) * np.abs(chi)).astype(np.float32)
    pd = mag * np.exp(np.float32(cfg.te) * r2s)          # the pooled magnitude is a GRE at TE = cfg.te
    if snr == "random":
        snr = None if rng.random() < cfg.p_noise_free else float(np.exp(rng.uniform(*np.log(cfg.snr_range))))
    phi_c = np.float32(rng.uniform(-math.pi, math.pi))
    deph = None
    if cfg.honest_dephasing:                              # field gradient across a voxel (ppm per voxel)
        deph = [np.gradient(true_field, axis=a).astype(np.float32) * msk for a in range(3)]
    S = np.empty(P + (len(tes),), np.complex64)
    for e, t in enumerate(tes):
        m = pd * np.exp(-t * r2s)
        if deph is not None:
            for g in deph:
                m = m * np.abs(np.sinc(rad_per_ppm_s * t * g / np.float32(2.0 * math.pi))).astype(np.float32)
        ph = phi_c + rad_per_ppm_s * t * true_field
        S[..., e] = m * np.cos(ph) + 1j * (m * np.sin(ph))
    sigma = None
    if snr is not None:
        m1 = np.abs(S[..., 0])
        mean_mag = float(m1[msk].mean()) if msk.any() else float(m1.mean())
        sigma = np.float32((mean_mag if mean_mag > 0 else 1.0) / float(snr))
        noise = rng.standard_normal(P + (len(tes), 2)).astype(np.float32) * sigma
        S += noise[..., 0] + 1j * noise[..., 1]
    fld, _r2, rss, noise_std = _fit_echoes(S, proto, cfg.b0_tesla, float(sigma) if sigma is not None else 1e-6)
    fld = (fld * msk).astype(np.float32)
    info.update(snr=snr, b0_direction=[float(x) for x in b0], honest=True, echo_protocol=proto.name,
                r2_base=r2_base, r2_per_ppm=r2_slope)
    return Sample(field=fld, mask=msk.astype(np.float32), chi=chi, magnitude=rss.astype(np.float32),
                  noise_std=noise_std.astype(np.float32), voxel_size=tuple(float(v) for v in vs),
                  b0_direction=b0, info=info)


def draw_batch(pool: PhantomPool, step: int, batch_size: int, cfg: SynthConfig, seed: int = 0,
               augment: bool = True) -> list[Sample]:
    """The training batch of ``step`` (a pure function of seed, step and pool content)."""
    heads = pool.heads()
    out = []
    for b in range(batch_size):
        rng = np.random.default_rng([int(seed), int(step), b, 11])
        h = heads[int(rng.integers(len(heads)))]
        out.append(sample_pair(h, rng, cfg, augment=augment))
    return out


def to_tensors(samples: list[Sample], net_cfg, device="cpu"):
    """Network input (N, C, ...) of :func:`napari_qsm.nn.inputs.network_input` (field·field_scale·mask,
    mask[, χ_TKD·chi_scale] with the patch's voxel size and B0) and target (N, 1, ...) = χ·chi_scale."""
    x = np.stack([network_input(s.field, s.mask, net_cfg, s.voxel_size, s.b0_direction) for s in samples])
    y = np.stack([(s.chi * s.mask * net_cfg.chi_scale)[None] for s in samples]).astype(np.float32)
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
