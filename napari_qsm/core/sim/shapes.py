"""A second, independent raw-data generator: random geometric χ sources and a simple layered head.

Written apart from :mod:`napari_qsm.core.sim.phantom` (no shared anatomy code) so that a method
tuned on one generator can be checked on the other.

* :func:`random_sources`: spheres, ellipsoids, cylinders and cuboids at random χ, sizes and
  orientations; χ and its field on a 2x finer grid, averaged to the voxels.
* :func:`make_head`: an ellipsoidal head in air — scalp, skull (bone, χ ≈ −2 ppm vs water, short
  T2*), a 2–4 mm CSF rim, brain (grey/white, deep nuclei with high χ and R2*, ventricles, the
  interhemispheric fissure, a haemorrhage), veins (one runs down through the bottom of the field of
  view, which cuts the head as an axial slab does) and optionally an air cavity. Honest signal: χ,
  proton density and R2* on a 2x finer grid, the total field there by the project's forward model
  (:mod:`napari_qsm.core.dipole`, D(0) = 0, zero padding ≥ 2x; the head continues below the field
  of view into the padding), the complex multi-echo signal per fine point averaged within each
  voxel (intra-voxel dephasing), complex Gaussian noise, optionally N receive coils combined by the
  root sum of squares (non-central χ magnitude noise). ``crop=True`` returns a box inside the brain
  (tissue everywhere, no air), as a small in-vivo crop.

χ relative to air for the field (water −9.05 ppm, air +0.36 ppm: tissue = −9.41 ppm + its χ
relative to water; Schenck, Med. Phys. 23:815, 1996); cortical bone about −2 ppm relative to water
(Buch et al., MRM 73:2185, 2015); brain values relative to CSF as in Deistung et al., NeuroImage
65:299 (2013). R2* at 3 T (scaled with B0 for tissue): grey ~18, white ~22, deep nuclei 30–60,
venous blood ~45, CSF ~4 s⁻¹; bone a few hundred s⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Optional

import numpy as np

from ..constants import GAMMA_BAR_HZ_PER_T
from ..dipole import check_voxel_size, forward_field_support, unit_vector

__all__ = ["RawHead", "Sources", "make_head", "random_sources", "HEAD_LABELS", "TISSUE_VS_AIR"]

#: χ of water-like tissue relative to air (ppm): −9.05 − 0.36
TISSUE_VS_AIR = -9.41
HEAD_LABELS = {0: "air", 1: "scalp", 2: "skull", 3: "csf_rim", 4: "white_matter", 5: "grey_matter",
               6: "csf", 7: "deep_nucleus", 8: "vein", 9: "haemorrhage"}
BRAIN = (4, 5, 6, 7, 8, 9)
# label: (χ vs water ppm (lo, hi), proton density, R2* at 3 T (1/s) (lo, hi))
_TISSUE = {1: ((0.0, 0.0), 0.9, (35, 45)), 2: ((-2.2, -1.6), 0.12, (250, 400)), 3: ((0.0, 0.0), 1.0, (3, 5)),
           4: ((-0.04, -0.02), 0.70, (20, 24)), 5: ((0.01, 0.03), 0.85, (16, 20)), 6: ((0.0, 0.0), 1.0, (3, 5)),
           7: ((0.08, 0.20), 0.80, (30, 60)), 8: ((0.30, 0.45), 0.75, (40, 50)), 9: ((0.5, 0.8), 0.70, (100, 150))}


@dataclass
class Sources:
    """Random geometric sources: χ (ppm, voxel mean of the fine grid), its field (ppm, voxel mean of the
    fine-grid field), the support mask (voxels with any fine point inside a shape, dilated by nothing)
    and the shapes drawn (kind, centre mm, size mm, χ)."""

    chi: np.ndarray
    field: np.ndarray
    mask: np.ndarray
    voxel_size: tuple
    b0_direction: np.ndarray
    shapes: list = dc_field(default_factory=list)


@dataclass
class RawHead:
    """Raw multi-echo GRE of :func:`make_head` and its truth (arrays (i, j, k[, echo]), float32).

    magnitude / phase (radians) per echo; te (s); b0_tesla; voxel_size (mm); affine; b0_direction.
    Truth: ``chi`` brain χ relative to CSF inside ``brain_mask`` (0 outside); ``local_field`` the
    field of the brain's own sources inside ``brain_mask`` (ppm); ``total_field`` the field of the
    whole head relative to far air (ppm, everywhere); ``labels`` (:data:`HEAD_LABELS`, the most common
    label of each voxel's fine points); ``noise_sigma`` per channel; ``info`` what was drawn.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    te: tuple
    b0_tesla: float
    voxel_size: tuple
    affine: np.ndarray
    b0_direction: np.ndarray
    chi: np.ndarray
    brain_mask: np.ndarray
    local_field: np.ndarray
    total_field: np.ndarray
    labels: np.ndarray
    noise_sigma: float
    info: dict = dc_field(default_factory=dict)

    def to_echoes(self, name: str = "shapes head"):
        """The echoes as :class:`napari_qsm.core.field.records.Echoes` (the front end's input)."""
        from ..field.records import Echoes

        return Echoes(magnitude=self.magnitude, phase=self.phase, te=tuple(self.te), b0_tesla=self.b0_tesla,
                      affine=self.affine, voxel_size=self.voxel_size, b0_direction=self.b0_direction, name=name)


# ----------------------------------------------------------------------------------------------
# geometry on the fine grid
# ----------------------------------------------------------------------------------------------

def _fine_axes(shape, vs, f, origin_mm=(0.0, 0.0, 0.0)):
    """Coordinates (mm) of the fine points (f per voxel and axis) of voxels 0..n−1, voxel i centred at i·v."""
    return [((np.arange(n * f) + 0.5) / f - 0.5) * v + o for n, v, o in zip(shape, vs, origin_mm)]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _inside(kind, axes, centre, size, rot):
    """Boolean membership of the fine points (open grid ``axes``) in one shape (rotated by ``rot``)."""
    d = [a - c for a, c in zip(axes, centre)]
    q = [sum(rot[j, i] * d[j] for j in range(3)) for i in range(3)]   # coordinates in the shape's frame
    if kind == "sphere":
        return q[0] ** 2 + q[1] ** 2 + q[2] ** 2 <= size[0] ** 2
    if kind == "ellipsoid":
        return (q[0] / size[0]) ** 2 + (q[1] / size[1]) ** 2 + (q[2] / size[2]) ** 2 <= 1.0
    if kind == "cylinder":
        return (q[0] ** 2 + q[1] ** 2 <= size[0] ** 2) & (np.abs(q[2]) <= size[2])
    if kind == "cuboid":
        return (np.abs(q[0]) <= size[0]) & (np.abs(q[1]) <= size[1]) & (np.abs(q[2]) <= size[2])
    raise ValueError(f"shape kind: {kind!r}")


def _tube(axes, p0, p1, r):
    """Points within ``r`` mm of the segment p0–p1 (computed on the segment's bounding box)."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    shape = np.broadcast_shapes(*[a.shape for a in axes])
    out = np.zeros(shape, bool)
    sl = []
    for k, a in enumerate(axes):
        v = a.ravel()
        lo, hi = min(p0[k], p1[k]) - r, max(p0[k], p1[k]) + r
        idx = np.flatnonzero((v >= lo) & (v <= hi))
        if idx.size == 0:
            return out
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    sub = [a[tuple(sl[k] if a.shape[k] > 1 else slice(None) for k in range(3))] for a in axes]
    u = p1 - p0
    d = [a - c for a, c in zip(sub, p0)]
    t = np.clip(sum(di * ui for di, ui in zip(d, u)) / max(float(u @ u), 1e-12), 0.0, 1.0)
    out[tuple(sl)] = sum((di - t * ui) ** 2 for di, ui in zip(d, u)) <= r * r
    return out


def _block_mean(a, f):
    n = a.shape
    return a.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))


def _block_mode(lab, f, n_labels):
    n = lab.shape
    blocks = lab.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f)
    counts = np.stack([(blocks == k).sum(axis=(1, 3, 5)) for k in range(n_labels)], axis=-1)
    return np.argmax(counts, axis=-1).astype(np.uint8)


def random_sources(shape=(48, 48, 48), voxel_size=(1.0, 1.0, 1.0), n_shapes: int = 8, seed: int = 0,
                   chi_range=(-0.2, 0.4), b0_direction=(0.0, 0.0, 1.0), device="cpu",
                   kinds=("sphere", "ellipsoid", "cylinder", "cuboid")) -> Sources:
    """Random geometric χ sources (spheres, ellipsoids, cylinders, cuboids) and their field.

    Parameters
    ----------
    shape, voxel_size : grid (voxels, mm).
    n_shapes : number of shapes; each gets a random kind, χ in ``chi_range`` (ppm), size (2–20 % of
        the field of view) and orientation; later shapes overwrite earlier ones.
    seed : the draw.
    b0_direction, device : forward model (D(0) = 0, zero padding ≥ 2x) on the 2x fine grid.
    kinds : the shape kinds drawn from.

    Returns
    -------
    Sources : χ and field as voxel means of the fine grid; ``mask`` the voxels touched by a shape.
    """
    vs = check_voxel_size(voxel_size)
    b0 = unit_vector(b0_direction)
    rng = np.random.default_rng(seed)
    f = 2
    axes = np.meshgrid(*_fine_axes(shape, vs, f), indexing="ij", sparse=True)
    ext = np.asarray(shape) * vs
    chi_f = np.zeros([n * f for n in shape], np.float32)
    drawn = []
    for _ in range(int(n_shapes)):
        kind = str(rng.choice(list(kinds)))
        size = rng.uniform(0.04, 0.2, 3) * ext.min()
        centre = rng.uniform(0.25, 0.75, 3) * ext - vs / 2
        chi = float(rng.uniform(*chi_range))
        chi_f[_inside(kind, axes, centre, size, _random_rotation(rng))] = chi
        drawn.append({"kind": kind, "centre_mm": centre.round(2).tolist(), "size_mm": size.round(2).tolist(),
                      "chi": round(chi, 4)})
    fld = _block_mean(forward_field_support(chi_f, vs / f, b0, device=device), f)
    mask = _block_mean((chi_f != 0).astype(np.float32), f) > 0
    return Sources(chi=_block_mean(chi_f, f).astype(np.float32), field=fld.astype(np.float32), mask=mask,
                   voxel_size=tuple(float(v) for v in vs), b0_direction=b0, shapes=drawn)


# ----------------------------------------------------------------------------------------------
# the layered head
# ----------------------------------------------------------------------------------------------

def _ellipsoid(axes, c, semi):
    return sum(((a - ci) / max(si, 1e-6)) ** 2 for a, ci, si in zip(axes, c, semi)) <= 1.0


def _head_layout(ext, rng, cavity):
    """The head's geometry (mm) for a field of view of extent ``ext``: centre, semi-axes and the structures."""
    A = np.array([0.40, 0.45, 0.45]) * ext * rng.uniform(0.96, 1.04, 3)
    c = np.array([0.5 * ext[0], 0.5 * ext[1], 0.33 * ext[2]]) + rng.uniform(-2, 2, 3)
    scalp, skull, rim = rng.uniform(4, 6), rng.uniform(5, 7), rng.uniform(2, 4)
    B = A - scalp - skull - rim
    s = rng.uniform(0.9, 1.1, (3, 3))
    nuclei = [((0.22, 0.10, -0.05), (0.08, 0.10, 0.08) * s[0]), ((0.12, -0.05, 0.0), (0.06, 0.12, 0.07) * s[1]),
              ((0.07, -0.10, -0.30), (0.03, 0.04, 0.03) * s[2])]
    sinus = [c + np.array([0.0, (B[1] - 3) * np.cos(t), (B[2] - 3) * np.sin(t)]) for t in np.linspace(0.1, 0.9, 13) * np.pi]
    cortical = []
    for _ in range(3):
        th, ph = rng.uniform(0.15, 0.45) * np.pi, rng.uniform(0, 2 * np.pi)
        p = c + (B - 3) * np.array([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)])
        q = min(sinus, key=lambda s_: float(np.sum((s_ - p) ** 2)))
        cortical.append((p, q, rng.uniform(1.0, 1.5)))
    deep = (c + B * np.array([0.05, -0.15, 0.05]), np.array([c[0] + 0.1 * B[0], c[1] - 0.25 * B[1], -40.0]),
            rng.uniform(2.2, 2.8))
    side = rng.choice([-1.0, 1.0])
    haem = (c + B * np.array([0.42 * side, rng.uniform(-0.2, 0.2), 0.3]), 0.07 * B.min() * rng.uniform(0.9, 1.2))
    cav = (c + A * np.array([0.0, 0.85, -0.45]), A * np.array([0.18, 0.12, 0.12])) if cavity else None
    return dict(A=A, c=c, scalp=scalp, skull=skull, rim=rim, B=B, nuclei=nuclei, sinus=sinus, cortical=cortical,
                deep=deep, haem=haem, cavity=cav)


def _paint_labels(axes, g) -> np.ndarray:
    """Labels (:data:`HEAD_LABELS`) on the fine points."""
    A, c, B = g["A"], g["c"], g["B"]
    shape = np.broadcast_shapes(*[a.shape for a in axes])
    lab = np.zeros(shape, np.uint8)
    lab[_ellipsoid(axes, c, A)] = 1
    lab[_ellipsoid(axes, c, A - g["scalp"])] = 2
    lab[_ellipsoid(axes, c, A - g["scalp"] - g["skull"])] = 3
    brain = _ellipsoid(axes, c, B)
    lab[brain] = 4
    lab[brain & ~_ellipsoid(axes, c, B - 3.0)] = 5                        # cortex: a 3 mm ribbon
    for sx in (-1, 1):                                                      # lateral ventricles
        lab[_ellipsoid(axes, c + B * np.array([0.08 * sx, 0.0, 0.10]), B * np.array([0.05, 0.25, 0.10]))] = 6
    lab[brain & (np.abs(axes[0] - c[0]) < 1.2) & (axes[2] > c[2] + 0.15 * B[2])] = 6   # interhemispheric fissure
    for off, semi in g["nuclei"]:
        for sx in (-1, 1):
            lab[_ellipsoid(axes, c + B * np.array([off[0] * sx, off[1], off[2]]), B * np.asarray(semi))] = 7
    hc, hr = g["haem"]
    lab[_ellipsoid(axes, hc, (hr, hr, hr))] = 9
    vein = np.zeros(shape, bool)
    for p, q in zip(g["sinus"][:-1], g["sinus"][1:]):
        vein |= _tube(axes, p, q, 2.5)
    for p, q, r in g["cortical"]:
        vein |= _tube(axes, p, q, r)
    vein |= _tube(axes, *g["deep"])
    lab[vein & brain] = 8
    if g["cavity"] is not None:
        lab[_ellipsoid(axes, *g["cavity"]) & ((lab == 1) | (lab == 2))] = 0
    return lab


def _properties(lab, rng, b0_tesla):
    """χ (vs water), proton density and R2* per fine point from the labels (values drawn per head)."""
    chi = np.zeros(lab.shape, np.float32)
    pd = np.zeros(lab.shape, np.float32)
    r2 = np.zeros(lab.shape, np.float32)
    drawn = {}
    for k, ((c0, c1), p, (r0, r1)) in _TISSUE.items():
        sel = lab == k
        x, r = float(rng.uniform(c0, c1)), float(rng.uniform(r0, r1))
        r = r if k in (2, 3, 6) else r * b0_tesla / 3.0        # susceptibility-driven R2* grows with B0
        chi[sel], pd[sel], r2[sel] = x, p, r
        drawn[HEAD_LABELS[k]] = {"chi_vs_water": round(x, 4), "pd": p, "r2star": round(r, 2)}
    return chi, pd, r2, drawn


def _coil_sensitivities(axes_c, ext, n_coils, rng):
    """Smooth real receive profiles of ``n_coils`` coils on a ring around the head (None for one channel)."""
    if not n_coils:
        return None
    out = []
    for k in range(int(n_coils)):
        t = 2 * np.pi * k / n_coils + rng.uniform(-0.2, 0.2)
        p = 0.5 * ext + 0.7 * ext * np.array([np.cos(t), np.sin(t), rng.uniform(-0.3, 0.3)])
        d2 = sum((a - pi) ** 2 for a, pi in zip(axes_c, p))
        out.append((1.0 / (1.0 + d2 / (0.5 * ext.mean()) ** 2)).astype(np.float32))
    return out


def _signal(pd_f, r2_f, fld_f, phi0_f, te, b0_tesla, f, nz):
    """Complex echoes (i, j, k, echo) averaged from the fine points of the field of view (the last ``nz``·f
    fine planes along k)."""
    w = np.float32(2 * np.pi * GAMMA_BAR_HZ_PER_T * b0_tesla * 1e-6)
    sl = (slice(None), slice(None), slice(fld_f.shape[2] - nz * f, None))
    pd, r2, fl = pd_f[sl], r2_f[sl], fld_f[sl]
    p0 = np.broadcast_to(phi0_f, fld_f.shape)[sl]
    out = []
    for t in te:
        a = pd * np.exp(np.float32(-t) * r2)
        ph = p0 + (w * np.float32(t)) * fl
        out.append(_block_mean(a * np.cos(ph), f) + 1j * _block_mean(a * np.sin(ph), f))
    return np.stack(out, axis=-1).astype(np.complex64)


def make_head(shape=(96, 96, 96), voxel_size=(2.0, 2.0, 2.0), seed: int = 0, *, te=(0.004, 0.008, 0.012, 0.016, 0.020),
              b0_tesla: float = 3.0, b0_direction=(0.0, 0.0, 1.0), snr: float = 40.0, n_coils: Optional[int] = None,
              cavity: bool = True, crop: bool = False, device="cpu") -> RawHead:
    """A layered ellipsoidal head in air (or a crop of its brain) as raw multi-echo GRE with its truth.

    Parameters
    ----------
    shape, voxel_size : field of view (voxels, mm); the head is sized to it and cut at the bottom.
    seed : the head (thicknesses, χ, R2*, vein paths, lesion side) and the noise.
    te : echo times (s). b0_tesla, b0_direction : the scanner (B0 along the voxel frame's k by default).
    snr : mean first-echo magnitude in the brain / noise σ per channel (and per coil).
    n_coils : None = one channel (Rician magnitude); N = N coils with smooth profiles, magnitude the
        root sum of squares (non-central χ noise), phase of the sensitivity-weighted sum.
    cavity : carve an air cavity (a sinus) out of skull and scalp in front and below.
    crop : return only the voxels centred in a box inside the brain (tissue everywhere, no air; a vein crosses its
        bottom face); the physics is that of the whole head.
    device : torch device of the forward model.

    Returns
    -------
    RawHead : echoes (magnitude, phase in radians) and truth (χ, brain mask, local and total field).

    References
    ----------
    Schenck, Med. Phys. 23:815 (1996); Buch et al., MRM 73:2185 (2015); Deistung et al.,
    NeuroImage 65:299 (2013).
    """
    shape = tuple(int(n) for n in shape)
    vs = check_voxel_size(voxel_size)
    b0 = unit_vector(b0_direction)
    te = tuple(float(t) for t in te)
    rng = np.random.default_rng(seed)
    f = 2
    ext = np.asarray(shape) * vs
    n_ext = max(2, int(round(0.25 * shape[2])))                  # the head continues below the field of view
    g = _head_layout(ext, rng, cavity)
    axes = np.meshgrid(*_fine_axes(shape[:2] + (shape[2] + n_ext,), vs, f, (0.0, 0.0, -n_ext * vs[2])),
                       indexing="ij", sparse=True)
    lab_f = _paint_labels(axes, g)
    chi_w, pd_f, r2_f, drawn = _properties(lab_f, rng, b0_tesla)
    brain_f = np.isin(lab_f, BRAIN)
    vs_f = vs / f
    chi_air = np.where(lab_f > 0, chi_w + np.float32(TISSUE_VS_AIR), 0).astype(np.float32)
    total_f = forward_field_support(chi_air, vs_f, b0, device=device)
    del chi_air
    chi_b = np.where(brain_f, chi_w, 0).astype(np.float32)
    local_f = forward_field_support(chi_b, vs_f, b0, support=brain_f, device=device)
    pd_f *= (1.0 + 0.05 * np.sin(axes[0] / 17.0 + rng.uniform(0, 6)) * np.cos(axes[1] / 23.0)).astype(np.float32)
    phi0_f = (rng.uniform(-np.pi, np.pi) + sum(rng.uniform(-1, 1) * (a / e) for a, e in zip(axes, ext))).astype(np.float32)
    S = _signal(pd_f, r2_f, total_f, phi0_f, te, b0_tesla, f, shape[2])
    fov = (slice(None), slice(None), slice(n_ext * f, None))
    bm = _block_mean(brain_f[fov].astype(np.float32), f) >= 0.5
    labels = _block_mode(lab_f[fov], f, len(HEAD_LABELS))
    chi = np.where(bm, _block_mean(chi_b[fov], f), 0).astype(np.float32)
    local = np.where(bm, _block_mean(local_f[fov], f), 0).astype(np.float32)
    total = _block_mean(total_f[fov], f).astype(np.float32)
    del lab_f, chi_w, pd_f, r2_f, total_f, local_f, chi_b, brain_f
    sigma = float(np.mean(np.abs(S[..., 0][bm]))) / float(snr)
    axes_c = np.meshgrid(*[np.arange(n) * v for n, v in zip(shape, vs)], indexing="ij", sparse=True)
    sens = _coil_sensitivities(axes_c, ext, n_coils, rng)
    noise = lambda: (rng.normal(0, sigma, S.shape) + 1j * rng.normal(0, sigma, S.shape)).astype(np.complex64)
    if sens is None:
        S = S + noise()
        mag, phase = np.abs(S), np.angle(S)
    else:
        coils = [s[..., None] * S + noise() for s in sens]
        mag = np.sqrt(sum(np.abs(x) ** 2 for x in coils))
        phase = np.angle(sum(s[..., None] * x for s, x in zip(sens, coils)))
    affine = np.diag(list(vs) + [1.0])
    box = tuple(slice(None) for _ in range(3))
    if crop:                                     # the voxels centred in a box inside the brain (corners at 0.5·B)
        lo = np.ceil((g["c"] - 0.5 * g["B"]) / vs).astype(int).clip(0)
        hi = np.minimum(np.floor((g["c"] + 0.5 * g["B"]) / vs).astype(int) + 1, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        affine[:3, 3] = lo * vs
    info = {"generator": "napari_qsm.core.sim.shapes.make_head", "seed": int(seed), "shape": list(shape),
            "voxel_size": vs.tolist(), "te": list(te), "b0_tesla": float(b0_tesla), "snr": float(snr),
            "n_coils": n_coils, "cavity": bool(cavity), "crop": [[s.start, s.stop] for s in box] if crop else None,
            "thickness_mm": {k: round(float(g[k]), 2) for k in ("scalp", "skull", "rim")},
            "tissue": drawn, "chi_reference": "brain χ relative to CSF/water; field of χ relative to air"}
    return RawHead(magnitude=mag[box].astype(np.float32), phase=phase[box].astype(np.float32), te=te,
                   b0_tesla=float(b0_tesla), voxel_size=tuple(float(v) for v in vs), affine=affine, b0_direction=b0,
                   chi=chi[box], brain_mask=bm[box], local_field=local[box], total_field=total[box],
                   labels=labels[box], noise_sigma=sigma, info=info)
