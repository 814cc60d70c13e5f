"""Data families of the synthetic pool: heads a network cannot memorise (issue 26).

Every pooled :class:`napari_qsm.nn.synth.Head` comes from one family, drawn per pool slot with the
config's ``families`` weights (a family of weight 0 is never drawn: that is how a family is held out):

* ``procedural`` — whole heads of :func:`napari_qsm.core.sim.phantom.make_phantom` (the original pool);
* ``geometric`` — random spheres, ellipsoids, cylinders and cuboids at random χ, sizes and orientations
  (:func:`napari_qsm.core.sim.shapes.random_sources`, χ as voxel means of a 2x finer grid; DeepQSM,
  Bollmann et al., NeuroImage 195:373, 2019, trained on such shapes alone) on an optional weak texture;
* ``texture`` — smooth random χ: a band-limited random field (correlation length drawn per head) on
  piecewise-constant compartments whose borders are themselves smooth random level sets.

Non-procedural heads live in a random mask (an irregular ellipsoid that may be cut by the field of view
as a slab is), a box of ``family_box`` × the patch (at most the regime's shape), and get a magnitude that
only partly follows χ. With probability ``p_inserts`` any head gets vessel (tubes along random polylines,
paramagnetic) and calcification (small diamagnetic spheres) inserts; lesions are added per patch by
:func:`napari_qsm.nn.synth.sample_pair` on every family. The physics (finer-grid field, dephasing,
echo fit and noise, voxel sizes, B0 tilt) is the patch sampler's and does not depend on the family.

A head is a pure function of (family, seed, regime, config), so the pool stays reproducible per step.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

FAMILIES = ("procedural", "geometric", "texture")


def family_weights(cfg) -> np.ndarray:
    """Probabilities of :data:`FAMILIES` from ``cfg.families`` ({name: weight}); raises on unknown names."""
    fam = dict(cfg.families)
    unknown = set(fam) - set(FAMILIES)
    if unknown:
        raise ValueError(f"synth families: unknown {sorted(unknown)}; expected some of {FAMILIES}")
    w = np.array([max(0.0, float(fam.get(f, 0.0))) for f in FAMILIES])
    if w.sum() <= 0:
        raise ValueError("synth families: every weight is 0")
    return w / w.sum()


def family_of(cfg, k: int) -> str:
    """Family of pool head ``k`` (a function of ``cfg.seed_base`` and ``k`` only)."""
    rng = np.random.default_rng([int(cfg.seed_base), int(k), 13])
    return FAMILIES[int(rng.choice(len(FAMILIES), p=family_weights(cfg)))]


def family_shape(regime, cfg) -> tuple:
    """Grid of a non-procedural head: ``family_box`` × the patch, at most the regime's shape."""
    return tuple(int(min(n, math.ceil(cfg.family_box * p))) for n, p in zip(regime.shape, cfg.patch))


def random_mask(rng, shape, vs) -> np.ndarray:
    """Irregular ellipsoid (semi-axes 0.35-0.65 of the extent, so it may leave the field of view,
    radius modulated by a smooth random field of correlation ~20 mm)."""
    from .synth import _smooth_field

    ext = np.asarray(shape) * np.asarray(vs)
    semi = rng.uniform(0.35, 0.65, 3) * ext
    c = ext / 2 + rng.uniform(-0.08, 0.08, 3) * ext
    g = np.meshgrid(*[(np.arange(n) + 0.5) * d for n, d in zip(shape, vs)], indexing="ij", sparse=True)
    r = np.sqrt(sum(((x - ci) / si) ** 2 for x, ci, si in zip(g, c, semi)))
    r = r / np.clip(1.0 + 0.15 * _smooth_field(rng, shape, vs, 20.0), 0.6, 1.4)
    return r < 1.0


def _magnitude(rng, chi, mask, vs) -> np.ndarray:
    """Magnitude that only partly follows χ: a smooth bias times a darkening by |χ| of random strength."""
    from .synth import _smooth_field

    bias = 1.0 + 0.1 * _smooth_field(rng, chi.shape, vs, 30.0)
    dark = float(rng.uniform(0.1, 0.6)) * np.tanh(np.abs(chi) / 0.3)
    return (np.clip(bias - dark, 0.05, 2.0) * mask).astype(np.float32)


def _texture(rng, shape, vs, cfg) -> np.ndarray:
    """Band-limited random field, std in ``texture_std`` ppm, correlation length in ``texture_sigma_mm``."""
    from .synth import _smooth_field

    sig = float(np.exp(rng.uniform(*np.log(cfg.texture_sigma_mm))))
    return float(rng.uniform(*cfg.texture_std)) * _smooth_field(rng, shape, vs, sig)


def geometric_head(seed: int, regime, cfg):
    """Random geometric sources in a random mask (module docstring)."""
    from ..core.sim.shapes import random_sources
    from .synth import Head

    shape, vs = family_shape(regime, cfg), tuple(float(v) for v in regime.voxel_size)
    rng = np.random.default_rng([int(seed), 1])
    n = int(rng.integers(cfg.geo_shapes[0], cfg.geo_shapes[1] + 1))
    src = random_sources(shape, vs, n_shapes=n, seed=int(rng.integers(2 ** 31)), chi_range=tuple(cfg.geo_chi))
    mask = random_mask(rng, shape, vs)
    chi = src.chi.astype(np.float32)
    labels = np.where(src.mask, 2, 1).astype(np.int16)
    if rng.random() < 0.5:
        chi = chi + np.where(src.mask, 0.0, 0.3 * _texture(rng, shape, vs, cfg)).astype(np.float32)
    chi = (chi * mask).astype(np.float32)
    return Head(chi=chi, mask=mask, magnitude=_magnitude(rng, chi, mask, vs), labels=labels * mask,
                voxel_size=vs, seed=int(seed))


def texture_head(seed: int, regime, cfg):
    """Smooth random χ on smooth random compartments in a random mask (module docstring)."""
    from .synth import Head, _smooth_field

    shape, vs = family_shape(regime, cfg), tuple(float(v) for v in regime.voxel_size)
    rng = np.random.default_rng([int(seed), 2])
    mask = random_mask(rng, shape, vs)
    part = _smooth_field(rng, shape, vs, float(rng.uniform(8.0, 25.0)))
    n_comp = int(rng.integers(1, 5))
    edges = np.quantile(part, np.linspace(0, 1, n_comp + 1)[1:-1]) if n_comp > 1 else []
    labels = (np.digitize(part, edges) + 1).astype(np.int16)
    offsets = rng.uniform(-cfg.texture_offset, cfg.texture_offset, n_comp + 1).astype(np.float32)
    chi = offsets[labels] + _texture(rng, shape, vs, cfg).astype(np.float32)
    chi = (chi * mask).astype(np.float32)
    return Head(chi=chi, mask=mask, magnitude=_magnitude(rng, chi, mask, vs), labels=labels * mask,
                voxel_size=vs, seed=int(seed))


def _soft_alpha(dist_mm, radius, vs):
    """Partial-volume weight of points at distance ``dist_mm`` from a centre line/point of ``radius`` mm."""
    w = 0.35 * float(np.prod(vs) ** (1 / 3))
    return expit(-(dist_mm - radius) / w)


def _grid_box(shape, vs, lo_mm, hi_mm):
    lo = np.maximum(np.floor(np.asarray(lo_mm) / vs).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(hi_mm) / vs).astype(int) + 1, shape)
    if np.any(hi <= lo):
        return None, None
    g = np.meshgrid(*[np.arange(a, b) * d for a, b, d in zip(lo, hi, vs)], indexing="ij")
    return tuple(slice(a, b) for a, b in zip(lo, hi)), np.stack(g, -1).astype(np.float32)


def _blend(head, box, alpha, value, dark):
    """χ ← χ + α(value − χ) and magnitude darkened by ``dark``·α, inside the head's mask only."""
    a = (alpha * head.mask[box]).astype(np.float32)
    head.chi[box] += a * (np.float32(value) - head.chi[box])
    head.magnitude[box] *= 1.0 - np.float32(dark) * a


def _mask_point(head, rng):
    """(voxel size, a random point of the mask in mm) or (voxel size, None) for an empty mask."""
    vs = np.asarray(head.voxel_size, np.float64)
    idx = np.flatnonzero(head.mask)
    if idx.size == 0:
        return vs, None
    return vs, np.array(np.unravel_index(int(idx[rng.integers(idx.size)]), head.mask.shape)) * vs


def add_vessel(head, rng, cfg) -> bool:
    """A paramagnetic tube along a random 2-4 segment polyline through a mask point."""
    vs, p = _mask_point(head, rng)
    if p is None:
        return False
    r = float(rng.uniform(*cfg.vessel_radius_mm))
    chi = float(rng.uniform(*cfg.vessel_chi))
    d = rng.standard_normal(3)
    for _ in range(int(rng.integers(2, 5))):
        d = d / np.linalg.norm(d) + 0.6 * rng.standard_normal(3)
        q = p + d / np.linalg.norm(d) * float(rng.uniform(10.0, 40.0))
        box, g = _grid_box(head.mask.shape, vs, np.minimum(p, q) - r - 2, np.maximum(p, q) + r + 2)
        if box is not None:
            u = (q - p).astype(np.float32)
            t = np.clip(((g - p.astype(np.float32)) @ u) / max(float(u @ u), 1e-6), 0.0, 1.0)
            dist = np.linalg.norm(g - p.astype(np.float32) - t[..., None] * u, axis=-1)
            _blend(head, box, _soft_alpha(dist, r, vs), chi, 0.4)
        p = q
    return True


def add_calcification(head, rng, cfg) -> bool:
    """A small diamagnetic sphere (χ in ``calc_chi``) with a dark magnitude, centred inside the mask."""
    vs, c = _mask_point(head, rng)
    if c is None:
        return False
    r = float(rng.uniform(*cfg.calc_radius_mm))
    box, g = _grid_box(head.mask.shape, vs, c - r - 2, c + r + 2)
    if box is None:
        return False
    _blend(head, box, _soft_alpha(np.linalg.norm(g - c.astype(np.float32), axis=-1), r, vs),
           float(rng.uniform(*cfg.calc_chi)), 0.8)
    return True


def add_inserts(head, rng, cfg) -> dict:
    """Vessel and calcification inserts (in place); returns the counts."""
    nv = int(rng.integers(0, cfg.max_vessels + 1))
    nc = int(rng.integers(0, cfg.max_calcifications + 1))
    made_v = sum(add_vessel(head, rng, cfg) for _ in range(nv))
    made_c = sum(add_calcification(head, rng, cfg) for _ in range(nc))
    return {"vessels": made_v, "calcifications": made_c}


def make_family_head(family: str, seed: int, regime, cfg, device="cpu"):
    """Head of ``family`` (:data:`FAMILIES`) for ``seed`` and ``regime``; inserts with probability
    ``cfg.p_inserts`` (drawn from the seed). A pure function of its arguments."""
    from .synth import make_head

    if family == "procedural":
        head = make_head(seed, regime, device)
    elif family == "geometric":
        head = geometric_head(seed, regime, cfg)
    elif family == "texture":
        head = texture_head(seed, regime, cfg)
    else:
        raise ValueError(f"family: {family!r}, expected one of {FAMILIES}")
    rng = np.random.default_rng([int(seed), 3])
    head.family = family
    head.inserts = add_inserts(head, rng, cfg) if rng.random() < cfg.p_inserts else {}
    return head
