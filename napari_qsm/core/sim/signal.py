"""Honest signal physics of the procedural phantoms: fine grid, background field, echoes, noise and echo fit.

The model (fields on a 2x finer grid, intra-voxel dephasing, noise estimated from the echoes) is
described in docs/phantom.md ("Idealised and honest modes", "Head in air").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import expit

from ..constants import GAMMA_BAR_HZ_PER_T as GAMMA_BAR
from ..device import resolve_device
from ..dipole import check_voxel_size, convolve_padded, fast_shape, forward_field_support
from .anatomy import BRAIN_LABELS, _Anatomy
from .geometry import _SmoothNoise, _ellipsoid_sdf, _euler
from .paint import _axes_mm, _label_mode, _paint_grid, _receive_bias, _supersampling, _texture

_HONEST_FACTOR = 2  # honest mode: fine points per voxel along each axis

# Head in air (background=True): SI volume susceptibilities (ppm; Schenck, Med. Phys. 23:815, 1996)
CHI_WATER = -9.05
CHI_AIR = 0.36
#: soft tissue / CSF / brain relative to air (ppm): the source of the background field
TISSUE_VS_AIR = CHI_WATER - CHI_AIR
#: skull relative to water (ppm): cortical bone ≈ −2 (Buch et al., MRM 2015), diploë less; nominal, range
SKULL_VS_WATER = (-2.0, -1.5, -1.0)
_NECK_EXTENSION_MM = 80.0  # the neck continues this far below the field of view (into the padding)
# air cavities: (name, centre, semi-axes (mm), Euler angles (deg), bilateral) in the head frame like _NECK;
# they replace skull and scalp only (labels 14, 15)
_CAVITIES = [
    ("frontal_sinus", (0.0, 70.0, -12.0), (18.0, 9.0, 13.0), (-25.0, 0.0, 0.0), False),
    ("ethmoid_nasal", (0.0, 46.0, -44.0), (12.0, 20.0, 10.0), (0.0, 0.0, 0.0), False),
    ("sphenoid_sinus", (0.0, 16.0, -54.0), (14.0, 12.0, 11.0), (0.0, 0.0, 0.0), False),
    ("mastoid", (42.0, -18.0, -40.0), (10.0, 14.0, 10.0), (0.0, 0.0, 0.0), True),
]


@dataclass(frozen=True)
class EchoProtocol:
    """Multi-echo GRE timing of the honest simulation: ``n_echoes`` echoes at TE1 + n·ΔTE (seconds)."""

    n_echoes: int
    te1: float
    delta_te: float
    name: str = ""

    @property
    def echo_times(self) -> tuple[float, ...]:
        return tuple(float(self.te1 + n * self.delta_te) for n in range(int(self.n_echoes)))

    def check(self) -> "EchoProtocol":
        if int(self.n_echoes) < 2 or not (self.te1 > 0 and self.delta_te > 0):
            raise ValueError(f"echo_protocol: expected at least 2 echoes and positive TE1 and ΔTE, got {self!r}")
        return self


#: the clinical multi-echo protocol of the QSMInvNet+ paper's clinical data: 7 echoes, TE1 12.6 ms, ΔTE 4.1 ms
CLINICAL_ECHOES = EchoProtocol(7, 0.0126, 0.0041, "clinical")
#: a research protocol typical of 1 mm isotropic 3 T multi-echo GRE: 5 echoes, TE1 4 ms, ΔTE 4 ms
RESEARCH_ECHOES = EchoProtocol(5, 0.004, 0.004, "research")


def default_echo_protocol(voxel_size) -> EchoProtocol:
    """The clinical protocol for thick-slice voxels (longest edge ≥ 2× the shortest), else the research one."""
    vs = check_voxel_size(voxel_size)
    return CLINICAL_ECHOES if float(vs.max()) >= 2.0 * float(vs.min()) else RESEARCH_ECHOES


@dataclass
class PhantomGrid:
    """The painted grid that ``make_phantom(honest=True, edit=...)`` hands to ``edit`` before the physics.

    ``factor`` sample points per voxel along each axis (2 in honest mode): ``shape`` is the voxel
    grid times ``factor`` and ``voxel_size`` the voxel size divided by it. ``edit`` may change
    ``chi`` (ppm), ``pd`` (proton density times receive bias, a.u.) and ``r2s`` (1/s) in place or
    replace them with arrays of the same shape; ``labels`` and ``mask`` are for reading (with
    ``background=True`` the air cavities are already carved: PD 0 there, labels unchanged).
    """

    shape: tuple
    voxel_size: tuple
    factor: int
    chi: np.ndarray
    pd: np.ndarray
    r2s: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f×f blocks (the voxel average of the fine grid)."""
    if f == 1:
        return a
    n = a.shape
    return a.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))


def _carve_cavities(anat, rng, randomize, ax_mm, lab_f, pd_f, cav_f) -> list:
    """Air cavities (``_CAVITIES``) on the fine grid: skull/scalp points inside become air (PD 0, ``cav_f``).

    The fine labels are left as they are, so the voxel labels and the brain mask are exactly those
    of the same head without cavities; voxels that are mostly cavity are then labelled 0 (air).

    Evaluated in the anatomy's template frame (they follow the head's pose and elastic
    displacement), each in its own bounding box. Returns the cavities as drawn (JSON-friendly).
    """
    out = []
    for name, c, a, e, bilateral in _CAVITIES:
        for side in ((1.0, -1.0) if bilateral else (1.0,)):
            cc = np.asarray(c, np.float64) * [side, 1.0, 1.0]
            aa = np.asarray(a, np.float64)
            if randomize:
                cc = cc + np.clip(rng.normal(0.0, 1.5, 3), -3.0, 3.0)
                aa = aa * rng.uniform(0.85, 1.15, 3)
            if name == "frontal_sinus":  # in the frontal bone: anchored to the frontal pole at its height
                cen, semi = anat.cerebrum.centre, anat.cerebrum.semi
                q = min(0.95, abs((cc[2] - cen[2]) / semi[2]))
                cc[1] = cen[1] + semi[1] * math.sqrt(1.0 - q * q) + anat.csf_layer + 0.5 * anat.skull
            ee = np.asarray(e, np.float64) * [1.0, side, side]
            rot = _euler(ee)
            ext = np.abs(rot) @ aa + 1.0
            ulo, uhi = anat.head_bbox(cc - ext, cc + ext)
            sl = []
            for k in range(3):
                x = ax_mm[k]
                i0 = int(np.searchsorted(x, ulo[k] - 1.0, side="left"))
                i1 = int(np.searchsorted(x, uhi[k] + 1.0, side="right"))
                sl.append(slice(i0, max(i0, i1)))
            sl = tuple(sl)
            n_air = 0
            if all(s.stop > s.start for s in sl):
                P = anat.template_coords([ax_mm[k][sl[k]] for k in range(3)])
                inside = _ellipsoid_sdf(P, cc, aa, rot) < 0
                del P
                lab = lab_f[sl]
                inside &= (lab == 14) | (lab == 15)
                n_air = int(inside.sum())
                pd_f[sl][inside] = 0.0
                cav_f[sl] |= inside
            label = name if not bilateral else f"{name}_{'right' if side > 0 else 'left'}"
            out.append({"name": label, "centre_mm": [round(float(v), 1) for v in cc],
                        "semi_axes_mm": [round(float(v), 1) for v in aa], "fine_points": n_air})
    return out


_SHIM_BASIS = ("1", "x", "y", "z", "xy", "xz", "yz", "x²−y²", "2z²−x²−y²")
_SHIM_TERMS = {0: 1, 1: 4, 2: 9}
_SHIM_R0 = 100.0  # mm: the coordinates of the shim basis are divided by it


def _shim_basis(x, y, z, n_terms):
    """Solid harmonics up to 2nd order (every term has zero Laplacian) at coordinates x, y, z (units of r0)."""
    one = np.ones(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), np.float64)
    terms = (one, x + 0 * one, y + 0 * one, z + 0 * one, x * y, x * z, y * z, x * x - y * y, 2 * z * z - x * x - y * y)
    return terms[:n_terms]


def _shim(fld_f, fld_vox, mask, order, vs, f):
    """Remove (in place, on the fine grid) the least-squares solid-harmonic fit of ``fld_vox`` in ``mask``."""
    n_terms = _SHIM_TERMS[int(order)]
    if not mask.any():
        return np.zeros(n_terms)
    shape = mask.shape
    ax = [((np.arange(n) - (n - 1) / 2.0) * d / _SHIM_R0) for n, d in zip(shape, vs)]
    idx = np.nonzero(mask)   # the basis at the mask's voxels only (the same values as on the whole grid)
    A = np.stack(_shim_basis(ax[0][idx[0]], ax[1][idx[1]], ax[2][idx[2]], n_terms), axis=1)
    coef = np.linalg.lstsq(A, fld_vox[idx].astype(np.float64), rcond=None)[0]
    fshape = fld_f.shape
    fax = [((np.arange(n) - (n - 1) / 2.0) * (d / f) / _SHIM_R0) for n, d in zip(fshape, vs)]
    for i in range(fshape[0]):  # plane by plane: no full-size temporaries
        terms = _shim_basis(fax[0][i], fax[1][:, None], fax[2][None, :], n_terms)
        fld_f[i] -= sum(c * t for c, t in zip(coef, terms)).astype(np.float32)
    return coef


def _head_field(src, vs_f, b0, device, extend_mm: float = _NECK_EXTENSION_MM) -> np.ndarray:
    """D ∗ src (ppm, D(0) = 0) over the whole fine grid; src is χ relative to air (0 = air).

    The whole field of view is zero-padded to a fast FFT size ≥ 2x on every axis (zero = the air
    around the head continues outside it). Where the sources touch the bottom face (the neck
    leaves the field of view) the bottom slice is continued ``extend_mm`` into the padding (at most
    half of the padding), so the cut adds no air interface the body lacks. The convolution runs one
    axis at a time (:func:`~napari_qsm.core.dipole.convolve_padded`): the peak is about one
    half-spectrum of the fine grid, not the padded grid (issue 23: 4.6 → 1.5 GB at 1 mm).
    """
    n = src.shape
    P = fast_shape(n, 2.0)
    ext = 0
    if np.any(src[:, :, 0]):  # the neck leaves through the bottom face: continue it below
        ext = max(0, min(int(round(extend_mm / float(vs_f[2]))), (P[2] - n[2]) // 2))
    return convolve_padded(src, P, vs_f, b0, device=resolve_device(device), extend_last=ext)


def _background_sigma(S: np.ndarray) -> float:
    """Noise σ (per real/imaginary channel) from the eight corner blocks of the field of view.

    As a user would: in air |S|² averages 2σ²; the median over the corners ignores a corner that
    happens to hold signal. ``S`` is (i, j, k, echo) complex.
    """
    n = S.shape[:3]
    b = [max(2, k // 8) for k in n]
    vals = []
    for corner in np.ndindex(2, 2, 2):
        sl = tuple(slice(0, bb) if c == 0 else slice(k - bb, k) for c, bb, k in zip(corner, b, n))
        blk = S[sl]
        vals.append(float(np.mean(blk.real.astype(np.float64) ** 2 + blk.imag.astype(np.float64) ** 2)) / 2.0)
    return float(np.sqrt(np.median(vals)))


def _fit_echoes(S: np.ndarray, protocol: EchoProtocol, b0_tesla: float, sigma: float | None):
    """Field (ppm), R2* (1/s), RSS magnitude and N_std (ppm) of multi-echo complex data (i, j, k, echo).

    Phase: echo-to-echo complex ratios arg(S_{n+1}·conj(S_n)) accumulated from arg(S_0) (temporal
    unwrapping, no spatial unwrapping needed while |Δφ| < π per ΔTE), then the weighted least-squares
    line φ_n = φ0 + n·Δφ with weights |S_n|² (the phase variance of echo n is σ²/|S_n|²).
    N_std is the MEDI nonlinear-fit formula √(a11/(a11·a22 − a12²)), a11 = Σ|S_n|², a12 = Σ n|S_n|²,
    a22 = Σ n²|S_n|², times the channel noise σ (that is the standard deviation of the fitted Δφ),
    in ppm: / (2π·γ̄·B0·ΔTE)·1e6, capped at π rad. R2*: the same weighted line through log|S_n|.

    Kept rather than :func:`napari_qsm.core.field.fit.fit_linear` (issue 23): that fit works in TE
    (rad/s) instead of the echo index, unwraps against a Hermitian-sum prediction, clips R2* at 500
    (here 1000) 1/s and so gives other float32 roundings — field, N_std and R2* differ in ~75–99 % of
    the mask voxels by up to 2.6e-6 (relative) on the honest 3.5 mm, 1.5x1.5x6 mm and 1 mm phantoms
    (scripts/fit_compare.py); replacing it would change every honest phantom and the training data.
    """
    N = S.shape[-1]
    n = np.arange(N, dtype=np.float32)
    mag = np.abs(S).astype(np.float32)
    w = mag * mag
    phi = np.empty(mag.shape, np.float32)
    phi[..., 0] = np.angle(S[..., 0])
    for k in range(N - 1):
        phi[..., k + 1] = phi[..., k] + np.angle(S[..., k + 1] * np.conj(S[..., k]))
    a11 = w.sum(-1)
    a12 = (w * n).sum(-1)
    a22 = (w * n * n).sum(-1)
    det = a11 * a22 - a12 * a12
    ok = det > np.float32(1e-30) * np.maximum(a11 * a22, np.float32(1e-30))
    safe = np.where(ok, det, np.float32(1.0))
    b1 = (w * phi).sum(-1)
    b2 = (w * n * phi).sum(-1)
    del phi
    ppm_per_rad = 1e6 / (2.0 * np.pi * GAMMA_BAR * float(b0_tesla) * float(protocol.delta_te))
    field = np.where(ok, (a11 * b2 - a12 * b1) / safe, 0.0).astype(np.float32) * np.float32(ppm_per_rad)
    logm = np.log(np.maximum(mag, np.float32(1e-12)))
    c1 = (w * logm).sum(-1)
    c2 = (w * n * logm).sum(-1)
    del logm
    slope = np.where(ok, (a11 * c2 - a12 * c1) / safe, 0.0)
    r2star = np.clip(-slope / float(protocol.delta_te), 0.0, 1000.0).astype(np.float32)
    rss = np.sqrt(a11).astype(np.float32)
    noise_std = None
    if sigma is not None:
        nrad = np.where(ok, np.float32(sigma) * np.sqrt(a11 / safe), np.float32(np.pi))
        noise_std = (np.minimum(nrad, np.float32(np.pi)) * np.float32(ppm_per_rad)).astype(np.float32)
    return field, r2star, rss, noise_std


def _silent_veins(anat: _Anatomy, rng_vein) -> list:
    """Veins without a magnitude edge: each non-sinus vein with probability 1/2 (at least one)."""
    n_tubes = len(anat.tubes)
    silent = [t for t in range(1, n_tubes) if rng_vein.random() < 0.5]
    if not silent and n_tubes > 1:
        silent = [int(rng_vein.integers(1, n_tubes))]
    return silent


def _air_cavities(seed, randomize, anat, ax_mm, lab_f, pd_f, shape, f):
    """Head in air: the χ relative to air and the air cavities carved out of skull and scalp (own random
    stream: the rest of the head is unchanged). Returns (cavities, background χ, voxel cavity mask, fine mask)."""
    rng_bg = np.random.default_rng(np.random.SeedSequence([seed, 20240611, 3]))
    skull = float(rng_bg.uniform(SKULL_VS_WATER[0], SKULL_VS_WATER[2])) if randomize else SKULL_VS_WATER[1]
    bg_chi = {"reference": "air", "tissue": round(TISSUE_VS_AIR, 4), "skull": round(TISSUE_VS_AIR + skull, 4),
              "air": 0.0, "water_si": CHI_WATER, "air_si": CHI_AIR,
              "brain": "tissue + chi (brain χ relative to CSF)"}
    cav_f = np.zeros(lab_f.shape, bool)
    cavities = _carve_cavities(anat, rng_bg, randomize, ax_mm, lab_f, pd_f, cav_f)
    n0_, n1_, n2_ = shape
    cavity_mask = cav_f.reshape(n0_, f, n1_, f, n2_, f).any(axis=(1, 3, 5))
    return cavities, bg_chi, cavity_mask, cav_f


def _chi_only(chi_f, tissue_f, deep_f, texture, randomize, rng_tex, rng_iron, fshape, fvs, s_fit, tex_amp, ax_mm):
    """χ-only structure (no magnitude change), in place: texture and iron gradients inside deep grey matter."""
    if texture:
        tex = _texture(rng_tex, fshape, fvs, s_fit, tex_amp, ax_mm)
        tex *= tissue_f
        chi_f += tex
        del tex
    iron_amp = float(rng_iron.uniform(0.015, 0.03)) if randomize else 0.02
    iron = _SmoothNoise(rng_iron, sigma=5.0, spacing=2.5).sample(ax_mm)
    iron *= deep_f
    iron *= np.float32(iron_amp)
    chi_f += iron


def _magnitude_only(pd_f, r2s_f, tissue_f, lab_f, rng_mtex, rng_wmh, fshape, fvs, ax_mm) -> list:
    """Magnitude-only structure, in place: own PD and R2* texture, white-matter-hyperintensity-like PD blobs.

    Returns the blobs (centre, radius, PD gain; JSON-friendly)."""
    mtex = _SmoothNoise(rng_mtex, sigma=2.5, spacing=1.25).sample(ax_mm)
    mtex *= tissue_f
    mtex *= np.float32(0.03)   # in place: the same float32 operations as pd_f *= 1 + 0.03·mtex
    mtex += 1.0
    pd_f *= mtex
    mtex = _SmoothNoise(rng_mtex, sigma=5.0, spacing=2.5).sample(ax_mm)
    mtex *= tissue_f
    mtex *= np.float32(1.5)
    r2s_f += mtex
    del mtex
    wm_idx = np.flatnonzero(lab_f == 1)
    n_wmh = int(rng_wmh.integers(3, 7))
    wmh = []
    for _ in range(n_wmh if wm_idx.size else 0):
        c = np.array(np.unravel_index(int(wm_idx[rng_wmh.integers(wm_idx.size)]), fshape), np.float64)
        r = float(rng_wmh.uniform(2.0, 5.0))
        gain = float(rng_wmh.uniform(0.12, 0.25))
        ext = (r + 2.0) / fvs
        sl = tuple(slice(max(0, int(np.floor(c[k] - ext[k]))), min(fshape[k], int(np.ceil(c[k] + ext[k])) + 1))
                   for k in range(3))
        gr = np.meshgrid(*[(np.arange(s.start, s.stop) - c[k]) * fvs[k] for k, s in enumerate(sl)],
                         indexing="ij", sparse=True)
        a = expit(-(np.sqrt(sum(x * x for x in gr)) - r) / 0.5).astype(np.float32)
        pd_f[sl] *= 1.0 + np.float32(gain) * a * (lab_f[sl] == 1)
        wmh.append({"centre_mm": [round(float(v), 1) for v in (c - (np.array(fshape) - 1) / 2) * fvs],
                    "radius_mm": round(r, 2), "pd_gain": round(gain, 3)})
    return wmh


def _apply_edit(edit, fshape, fvs, f, chi_f, pd_f, r2s_f, lab_f, mask_f):
    """Hand the fine :class:`PhantomGrid` to ``edit``; returns its (possibly replaced) χ, PD and R2*."""
    grid = PhantomGrid(shape=fshape, voxel_size=tuple(float(v) for v in fvs), factor=f, chi=chi_f, pd=pd_f,
                       r2s=r2s_f, labels=lab_f, mask=mask_f)
    edit(grid)
    chi_f = np.asarray(grid.chi, np.float32)
    pd_f = np.asarray(grid.pd, np.float32)
    r2s_f = np.asarray(grid.r2s, np.float32)
    for nm, a in (("chi", chi_f), ("pd", pd_f), ("r2s", r2s_f)):
        if a.shape != fshape:
            raise ValueError(f"edit: PhantomGrid.{nm} changed shape to {a.shape}, expected {fshape}")
    return chi_f, pd_f, r2s_f


def _voxel_truth(chi_f, lab_f, cav_f, shape, f):
    """Voxel grid: χ truth (voxel mean, 0 outside the mask), labels (mode of the f³ sub-points), mask."""
    chi = _block_mean(chi_f, f).astype(np.float32)
    n0, n1, n2 = shape
    lab_sub = lab_f.reshape(n0, f, n1, f, n2, f).transpose(0, 2, 4, 1, 3, 5).reshape(n0, n1, n2, f ** 3)
    labels = _label_mode(lab_sub).astype(np.int16)
    del lab_sub
    if cav_f is not None:  # voxels that are mostly air cavity (never brain: cavities replace skull/scalp only)
        labels[(_block_mean(cav_f.astype(np.float32), f) >= 0.5) & np.isin(labels, (14, 15))] = 0
    mask = np.isin(labels, BRAIN_LABELS)
    chi[~mask] = 0.0
    return chi, labels, mask


def _total_field(src_bg, fvs, b0, device, mask, shim_order, vs, f, bg_chi):
    """The fine total field of the head in air (``src_bg``: χ relative to air, brain χ included), shimmed.

    Records the shim in ``bg_chi``; returns (fine field, voxel-mean total field)."""
    fld_f = _head_field(src_bg, fvs, b0, device)
    if shim_order is not None:  # the scanner's shim (harmonic: the local field is unchanged)
        coef = _shim(fld_f, _block_mean(fld_f, f), mask, shim_order, vs, f)
        bg_chi["shim"] = {"order": int(shim_order), "coefficients_ppm": [round(float(c), 5) for c in coef],
                          "basis": list(_SHIM_BASIS[:_SHIM_TERMS[shim_order]]), "r0_mm": _SHIM_R0}
    return fld_f, _block_mean(fld_f, f).astype(np.float32)


def _simulate_echoes(shape, f, ax_mm, pd_f, r2s_f, fld_f, tes, b0_tesla, rng_phase) -> np.ndarray:
    """Complex multi-echo signal per fine point, averaged within each voxel (intra-voxel dephasing)."""
    n0, n1, n2 = shape
    rad_per_ppm_s = 2.0 * np.pi * GAMMA_BAR * float(b0_tesla) * 1e-6  # rad per (ppm·s)
    phase_noise = _SmoothNoise(rng_phase, sigma=40.0, spacing=10.0)
    phi_c = float(rng_phase.uniform(-np.pi, np.pi))
    S = np.empty(shape + (len(tes),), np.complex64)
    rows = max(1, int(2_000_000 // max(n1 * n2 * f ** 3, 1)))
    for i0 in range(0, n0, rows):
        i1 = min(n0, i0 + rows)
        a0, a1 = i0 * f, i1 * f
        phi0 = np.float32(phi_c) + np.float32(0.8 * np.pi) * phase_noise.sample([ax_mm[0][a0:a1], ax_mm[1], ax_mm[2]])
        pdc, r2c, fc = pd_f[a0:a1], r2s_f[a0:a1], fld_f[a0:a1]
        for e, t in enumerate(tes):
            m = pdc * np.exp(-np.float32(t) * r2c)
            ph = phi0 + np.float32(rad_per_ppm_s * t) * fc
            S[i0:i1, ..., e] = _block_mean(m * np.cos(ph), f) + 1j * _block_mean(m * np.sin(ph), f)
    return S


def _add_noise(S, mask, snr, rng_noise, shape):
    """Complex Gaussian noise of σ = mean echo-1 magnitude in the mask / snr, in place; returns the σ a user
    estimates from the corners of the field of view (None without ``snr``)."""
    if snr is None:
        return None
    m1 = np.abs(S[..., 0])
    mean_mag = float(m1[mask].mean()) if mask.any() else float(m1.mean())
    sig = np.float32((mean_mag if mean_mag > 0 else 1.0) / float(snr))
    for e in range(S.shape[-1]):
        S[..., e] += sig * (rng_noise.standard_normal(shape, np.float32)
                            + 1j * rng_noise.standard_normal(shape, np.float32))
    return _background_sigma(S)


def _make_honest(shape, vs, b0, seed, snr, texture, randomize, b0_tesla, device, anat, s_fit, props, tex_amp,
                 rng_tex, rng_noise, protocol, edit, keep_echoes, background=False, shim_order=2) -> dict:
    """The honest phantom (docs/phantom.md, "Idealised and honest modes"): the :class:`Phantom` fields it sets.

    The steps run in a fixed order, each random stream used by one step, so the arrays are a function
    of the arguments alone; ``del`` frees each fine-grid array as soon as it is used (peak memory).
    """
    f = _HONEST_FACTOR
    fshape = tuple(f * n for n in shape)
    fvs = vs / f
    rng_vein, rng_iron, rng_wmh, rng_mtex, rng_phase = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, 20240611, 1]).spawn(5))
    silent = _silent_veins(anat, rng_vein)
    # thick voxels: the fine grid already halves them, so half the usual supersampling keeps the
    # same number of samples per voxel along the thick axis as the idealised phantom
    sub = tuple(max(1, k // f) for k in _supersampling(fvs))
    g = _paint_grid(anat, fshape, fvs, s_fit, props, te=None, silent_veins=silent, sub=sub)
    chi_f, pd_f, r2s_f, lab_f, tissue_f, deep_f = (g[k] for k in ("chi", "pd", "r2s", "labels", "tissue", "deep"))
    del g
    mask_f = np.isin(lab_f, BRAIN_LABELS)
    ax_mm = _axes_mm(fshape, fvs, s_fit)
    cavities, bg_chi, cavity_mask, cav_f = [], {}, None, None
    if background:
        cavities, bg_chi, cavity_mask, cav_f = _air_cavities(seed, randomize, anat, ax_mm, lab_f, pd_f, shape, f)
    _chi_only(chi_f, tissue_f, deep_f, texture, randomize, rng_tex, rng_iron, fshape, fvs, s_fit, tex_amp, ax_mm)
    del deep_f
    wmh = _magnitude_only(pd_f, r2s_f, tissue_f, lab_f, rng_mtex, rng_wmh, fshape, fvs, ax_mm)
    del tissue_f
    _receive_bias(rng_tex, ax_mm, apply_to=pd_f)
    chi_f[~mask_f] = 0.0
    if edit is not None:
        chi_f, pd_f, r2s_f = _apply_edit(edit, fshape, fvs, f, chi_f, pd_f, r2s_f, lab_f, mask_f)
    np.maximum(pd_f, 0.0, out=pd_f)
    np.maximum(r2s_f, 0.0, out=r2s_f)
    src_bg = None
    if background:  # χ relative to air on the fine grid (tissue −9.41, skull a bit lower, air 0)
        src_bg = np.where((lab_f > 0) & ~cav_f, np.float32(TISSUE_VS_AIR), np.float32(0.0)).astype(np.float32, copy=False)
        src_bg[(lab_f == 14) & ~cav_f] += np.float32(bg_chi["skull"] - TISSUE_VS_AIR)
    chi, labels, mask = _voxel_truth(chi_f, lab_f, cav_f, shape, f)
    del lab_f, cav_f
    # field on the fine grid (D(0) = 0, ≥ 2x padding), then the voxel mean as the true local field
    support = mask_f | np.repeat(np.repeat(np.repeat(mask, f, 0), f, 1), f, 2)
    del mask_f
    fld_f = forward_field_support(chi_f, fvs, b0, support, device)
    del support
    true_field = (_block_mean(fld_f, f) * mask).astype(np.float32)
    true_local, true_total = true_field, true_field
    if background:  # the total field of the head in air: brain χ + tissue/skull/air, over the whole FOV
        src_bg += chi_f
        del chi_f, fld_f
        fld_f, true_total = _total_field(src_bg, fvs, b0, device, mask, shim_order, vs, f, bg_chi)
        del src_bg
        true_field = (true_total * mask).astype(np.float32)
    else:
        del chi_f
    tes = protocol.echo_times
    S = _simulate_echoes(shape, f, ax_mm, pd_f, r2s_f, fld_f, tes, b0_tesla, rng_phase)
    del pd_f, r2s_f, fld_f
    sigma = _add_noise(S, mask, snr, rng_noise, shape)
    fld, r2star, rss, noise_std = _fit_echoes(S, protocol, b0_tesla, sigma)
    fld *= mask
    return dict(chi=chi, field=fld.astype(np.float32), mask=mask, magnitude=rss, labels=labels,
                noise_std=noise_std, te=float(protocol.delta_te), simulation="honest", true_field=true_field,
                r2star=r2star, echo_times=tes, echo_protocol=protocol.name, noise_sigma=sigma,
                echoes=S if keep_echoes else None, silent_veins=len(silent), wmh=wmh, background=bool(background),
                true_local_field=true_local, true_total_field=true_total, cavities=cavities,
                background_chi=bg_chi, cavity_mask=cavity_mask)
