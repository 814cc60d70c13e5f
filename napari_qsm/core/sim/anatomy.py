"""The random head anatomy of the procedural phantoms: labels, χ and magnitude values, shapes, veins, lesions.

Geometry and values are described in docs/phantom.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import _SmoothNoise, _euler


LABEL_NAMES: dict[int, str] = {
    1: "white_matter", 2: "cortex", 3: "csf", 4: "caudate", 5: "putamen", 6: "globus_pallidus",
    7: "thalamus", 8: "substantia_nigra", 9: "red_nucleus", 10: "vein", 11: "calcification",
    12: "haemorrhage", 13: "extra_axial_csf", 14: "skull", 15: "scalp",
}
#: labels that make up the brain mask (13–15 lie outside it; χ there is 0)
BRAIN_LABELS: tuple[int, ...] = tuple(range(1, 13))
_TISSUE_LABELS = (1, 2, 4, 5, 6, 7, 8, 9)  # where texture is added
_DEEP_LABELS = (4, 5, 6, 7, 8, 9)  # deep grey matter (honest mode: iron gradients inside)

#: χ (ppm) per label: (low, nominal, high). Values are drawn uniformly in [low, high] when randomising.
CHI_RANGES: dict[str, tuple[float, float, float]] = {
    "white_matter": (-0.045, -0.03, -0.02),
    "cortex": (0.01, 0.02, 0.03),
    "csf": (0.0, 0.0, 0.0),
    "caudate": (0.06, 0.075, 0.09),
    "putamen": (0.04, 0.06, 0.08),
    "globus_pallidus": (0.15, 0.175, 0.20),
    "thalamus": (0.01, 0.025, 0.04),
    "substantia_nigra": (0.12, 0.15, 0.18),
    "red_nucleus": (0.10, 0.13, 0.16),
    "vein": (0.30, 0.375, 0.45),
    "calcification": (-0.20, -0.15, -0.10),
    "haemorrhage": (0.50, 0.75, 1.00),
    "extra_axial_csf": (0.0, 0.0, 0.0),
    "skull": (0.0, 0.0, 0.0),
    "scalp": (0.0, 0.0, 0.0),
}

# Magnitude model per label: proton density (a.u.) and R2* (1/s) at 3 T (nominal).
_PD = {1: 0.69, 2: 0.80, 3: 1.0, 4: 0.78, 5: 0.78, 6: 0.76, 7: 0.74, 8: 0.76, 9: 0.76,
       10: 0.85, 11: 0.25, 12: 0.75, 13: 1.0, 14: 0.06, 15: 0.85}
_R2S = {1: 21.0, 2: 15.0, 3: 3.0, 13: 3.0, 10: 55.0, 11: 80.0, 12: 100.0, 14: 250.0, 15: 30.0}
_R2S_PER_PPM = 150.0  # 1/s per ppm of iron-related χ in deep grey matter
_R2S_DEEP_BASE = 14.0

# Anatomy in approximate MNI millimetres (right hemisphere, x > 0), mapped into the head frame.
_MNI_SCALE = 0.87
_MNI_SHIFT = np.array([0.0, 15.0, -8.0])
_HEAD_EXTENT = np.array([70.0, 86.0, 70.0])  # half extent (mm) the fit-to-FOV scale is based on

# (label, centre, semi-axes, Euler angles in degrees about x, y, z) – right side, mirrored to the left
_DEEP = [
    (4, (13.0, 14.0, 9.0), (5.0, 8.5, 9.0), (0.0, 0.0, -10.0)),      # caudate head
    (4, (16.0, -6.0, 19.0), (3.5, 13.0, 4.5), (-12.0, 0.0, -10.0)),  # caudate body
    (5, (25.0, 2.0, 1.0), (5.5, 14.0, 9.0), (0.0, 0.0, -8.0)),       # putamen
    (6, (19.0, -3.0, -1.0), (3.5, 8.0, 5.0), (0.0, 0.0, -10.0)),     # globus pallidus
    (7, (11.0, -18.0, 7.0), (7.5, 14.0, 8.0), (0.0, 0.0, 18.0)),     # thalamus
    (8, (11.0, -17.0, -11.0), (3.0, 8.0, 2.8), (0.0, 0.0, 35.0)),    # substantia nigra
    (9, (5.0, -20.0, -8.0), (3.5, 4.0, 4.0), (0.0, 0.0, 0.0)),       # red nucleus
]
_VENTRICLES = [
    ((9.0, -10.0, 20.0), (5.0, 24.0, 6.0), (-8.0, 0.0, -5.0)),   # body of the lateral ventricle
    ((9.0, 14.0, 12.0), (4.0, 10.0, 8.0), (0.0, 0.0, -10.0)),    # frontal horn
    ((22.0, -38.0, 12.0), (5.0, 14.0, 7.0), (0.0, 0.0, 25.0)),   # atrium / occipital horn
]
_THIRD_VENTRICLE = ((0.0, -12.0, 2.0), (1.5, 13.0, 8.0))
_CEREBRUM = ((0.0, -17.0, 15.0), (68.0, 86.0, 62.0))
_CEREBELLUM = ((0.0, -60.0, -38.0), (50.0, 30.0, 22.0))
_BRAINSTEM = ((0.0, -26.0, -38.0), (13.0, 14.0, 32.0), (-20.0, 0.0, 0.0))
_CORE = ((0.0, -10.0, 5.0), (25.0, 60.0, 28.0))  # no interhemispheric fissure inside (corpus callosum etc.)
_NECK = ((0.0, -25.0, -95.0), (48.0, 52.0, 60.0))  # head frame (not MNI)


def _mni(p) -> np.ndarray:
    return _MNI_SCALE * np.asarray(p, dtype=np.float64) + _MNI_SHIFT


def _draw_values(rng_val: np.random.Generator, randomize: bool) -> tuple[dict, dict, float]:
    """χ per label name, (χ, PD, R2*) per label and the χ texture amplitude, drawn from ``rng_val``."""
    label_chi = {}
    for name, (lo, nom, hi) in CHI_RANGES.items():
        label_chi[name] = float(rng_val.uniform(lo, hi)) if (randomize and hi > lo) else float(nom)
    props = {}
    for lab, name in LABEL_NAMES.items():
        chi_v = label_chi[name] if lab in BRAIN_LABELS else 0.0
        pd = _PD[lab] * (float(rng_val.uniform(0.95, 1.05)) if randomize else 1.0)
        if lab in _R2S:
            r2 = _R2S[lab]
        else:  # iron-rich deep grey matter: R2* follows χ
            r2 = _R2S_DEEP_BASE + _R2S_PER_PPM * max(chi_v, 0.0)
        r2 *= float(rng_val.uniform(0.95, 1.05)) if randomize else 1.0
        props[lab] = (chi_v, pd, r2)
    tex_amp = float(rng_val.uniform(0.005, 0.01)) if randomize else 0.0075
    return label_chi, props, tex_amp


def _fit_scale(shape, vs) -> float:
    """Scale (≤ 1) that fits the head into the field of view ``shape`` x ``vs`` (mm)."""
    fov_half = 0.5 * np.asarray(shape) * vs
    s_fit = float(min(1.0, np.min(fov_half / (_HEAD_EXTENT * 1.06 + 3.0))))  # room for the random scale
    if s_fit < 0.25:
        raise ValueError(
            f"shape x voxel_size: the field of view {tuple(np.round(2 * fov_half, 1))} mm is too small for a "
            f"head (the head is scaled to fit the field of view; each axis needs at least about 40 mm). "
            f"Generate a larger phantom and crop it for partial coverage.")
    return s_fit


@dataclass
class _Shape:
    label: int
    centre: np.ndarray
    semi: np.ndarray
    rot: np.ndarray


@dataclass
class _Tube:
    label: int
    pts: np.ndarray   # (m, 3) head-frame mm
    radius: float


class _Anatomy:
    """Every random choice of one head. Geometry is in the head frame (mm, origin at head centre)."""

    def __init__(self, rng: np.random.Generator, randomize: bool):
        self.randomize = randomize
        R = rng if randomize else None

        def jit(sd, size=None, lim=None):
            if R is None:
                return np.zeros(size) if size is not None else 0.0
            v = R.normal(0.0, sd, size)
            return np.clip(v, -lim, lim) if lim is not None else v

        def uni(lo, hi, nominal=None):
            if R is None:
                return 0.5 * (lo + hi) if nominal is None else nominal
            return float(R.uniform(lo, hi))

        # head frame -> template frame: global rotation, scale, shift and elastic displacement
        self.rot = _euler(jit(2.0, 3, 4.0)) if randomize else np.eye(3)
        self.scale = np.array([uni(0.94, 1.06, 1.0) for _ in range(3)])
        self.shift = jit(1.5, 3, 3.0)
        self.disp_amp = uni(1.0, 1.8, 0.0)
        # random streams that exist regardless of ``randomize`` (the seed always matters)
        self.disp = [_SmoothNoise(rng, sigma=18.0, spacing=6.0) for _ in range(3)] if randomize else None
        self.gyri = _SmoothNoise(rng, sigma=3.4, spacing=1.7)
        self.gyri_grad = self.gyri.gradient_norm()
        self.sulc_depth = _SmoothNoise(rng, sigma=12.0, spacing=6.0)
        self.fissure = _SmoothNoise(rng, sigma=15.0, spacing=6.0)

        # thicknesses (mm)
        self.cortex = uni(2.5, 3.0, 2.75)
        self.sulcus_hw = uni(0.6, 0.8, 0.7)
        self.fissure_hw = uni(0.9, 1.3, 1.1)
        self.depth_mean = uni(9.0, 12.0, 10.5)
        self.csf_layer = uni(1.5, 2.5, 2.0)
        self.skull = uni(4.0, 6.0, 5.0)
        self.scalp = uni(3.0, 5.0, 4.0)

        # brain envelope
        s_brain = np.array([uni(0.96, 1.04, 1.0) for _ in range(3)])
        c, a = _CEREBRUM
        self.cerebrum = _Shape(1, _mni(c) + jit(1.0, 3, 2.0), _MNI_SCALE * np.array(a) * s_brain, np.eye(3))
        c, a = _CEREBELLUM
        self.cerebellum = _Shape(1, _mni(c) + jit(1.5, 3, 3.0),
                                 _MNI_SCALE * np.array(a) * s_brain * [uni(0.92, 1.08, 1.0) for _ in range(3)],
                                 _euler(jit(3.0, 3, 6.0)))
        c, a, e = _BRAINSTEM
        self.brainstem = _Shape(1, _mni(c) + jit(1.0, 3, 2.0), _MNI_SCALE * np.array(a),
                                _euler(np.asarray(e) + jit(3.0, 3, 6.0)))
        c, a = _CORE
        self.core = _Shape(0, _mni(c), _MNI_SCALE * np.array(a), np.eye(3))
        c, a = _NECK
        self.neck = _Shape(15, np.array(c) + jit(2.0, 3, 4.0), np.array(a), np.eye(3))

        # deep structures and ventricles: shared (both sides) + independent jitter
        self.deep: list[_Shape] = []
        for label, c, a, e in _DEEP:
            self.deep += self._bilateral(label, c, a, e, jit)
        self.ventricles: list[_Shape] = []
        vscale = uni(0.8, 1.3, 1.0)  # ventricle size varies a lot between people
        for c, a, e in _VENTRICLES:
            a = np.asarray(a) * [1.0 + 0.8 * (vscale - 1.0), 1.0, 1.0 + 0.5 * (vscale - 1.0)]
            self.ventricles += self._bilateral(3, c, a, e, jit)
        c, a = _THIRD_VENTRICLE
        self.ventricles.append(_Shape(3, _mni(c) + [0, *jit(0.8, 2, 1.5)], _MNI_SCALE * np.array(a) * [vscale, 1, 1],
                                      np.eye(3)))

        # veins
        self.tubes: list[_Tube] = []
        self._make_veins(rng, uni)

        # lesions
        self.lesions: list[tuple] = []
        self._make_lesions(rng, uni)

    # -- construction helpers -----------------------------------------------------------------
    def _bilateral(self, label, c, a, e, jit):
        c = np.asarray(c, dtype=np.float64)
        a = np.asarray(a, dtype=np.float64)
        e = np.asarray(e, dtype=np.float64)
        c_shared = jit(1.0, 3, 2.0)
        a_shared = 1.0 + jit(0.05, 3, 0.1)
        e_shared = jit(3.0, 3, 6.0)
        out = []
        for side in (1.0, -1.0):
            cc = _mni(c * [side, 1, 1]) + c_shared * [side, 1, 1] + jit(0.6, 3, 1.2)
            aa = _MNI_SCALE * a * a_shared * (1.0 + jit(0.03, 3, 0.06))
            ee = e + e_shared + jit(1.5, 3, 3.0)
            ee = ee * [1, side, side]  # mirror: angles about y and z change sign
            out.append(_Shape(label, cc, aa, _euler(ee)))
        return out

    def _on_cerebrum(self, theta, phi, depth):
        """Point on the cerebrum ellipsoid shrunk by ``depth`` mm (θ polar from +z, φ from +x)."""
        c, a = self.cerebrum.centre, self.cerebrum.semi
        u = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
        return c + u * (a - depth)

    def _make_veins(self, rng, uni):
        # sagittal-sinus-like vein: along the midline top, frontal -> occipital
        r = uni(1.5, 2.0, 1.75)
        t0 = math.radians(uni(45.0, 60.0, 52.0))  # from anterior (polar angle about +z)
        t1 = math.radians(uni(105.0, 120.0, 112.0))
        th = np.linspace(-t0, t1, 48)  # negative: anterior (+y), positive: posterior
        theta = np.abs(th)
        phi = np.where(th < 0, np.pi / 2, -np.pi / 2)
        pts = self._on_cerebrum(theta, phi, r + 0.9)
        pts[:, 0] = rng.normal(0.0, 0.2) + 0.3 * np.sin(np.linspace(0, 3, 48) + rng.uniform(0, 6))
        self.tubes.append(_Tube(10, pts, r))
        # cortical veins running up the convexity towards the midline
        n = int(rng.integers(3, 6))
        for _ in range(n):
            side = 1.0 if rng.random() < 0.5 else -1.0
            r = float(rng.uniform(1.0, 1.5))
            th_a = rng.uniform(math.radians(65), math.radians(95))
            ph_a = rng.uniform(math.radians(-60), math.radians(60)) + (0 if side > 0 else np.pi)
            th_b = rng.uniform(math.radians(12), math.radians(25))
            ph_b = rng.uniform(math.radians(-50), math.radians(50)) + (0 if side > 0 else np.pi)
            t = np.linspace(0.0, 1.0, 40)
            wig = rng.uniform(0.05, 0.12) * np.sin(2 * np.pi * rng.uniform(0.7, 1.6) * t + rng.uniform(0, 6)) * np.sin(np.pi * t)
            theta = th_a + (th_b - th_a) * t
            phi = ph_a + (ph_b - ph_a) * t + wig
            self.tubes.append(_Tube(10, self._on_cerebrum(theta, phi, r + 0.7), r))
        # deep midline vein (internal-cerebral / great-cerebral-vein-like)
        r = float(rng.uniform(1.0, 1.4))
        ctrl = np.array([[0, 6, 15], [0, -10, 18], [0, -28, 17], [0, -42, 11], [0, -50, 2]], dtype=float)
        ctrl[:, 1:] += rng.normal(0.0, 1.0, (5, 2))
        t = np.linspace(0, 1, 30)
        tc = np.linspace(0, 1, len(ctrl))
        pts = np.stack([np.interp(t, tc, ctrl[:, k]) for k in range(3)], -1)
        pts = ndimage.gaussian_filter1d(pts, 2.0, axis=0, mode="nearest")
        self.tubes.append(_Tube(10, _mni(pts), r))

    def _make_lesions(self, rng, uni):
        keep = [(s.centre, float(s.semi.max())) for s in self.deep + self.ventricles]
        keep += [(p, tube.radius) for tube in self.tubes for p in tube.pts[::3]]
        cer = self.cerebrum
        placed = []
        for label, rmin, rmax in ((12, 4.0, 8.0), (11, 2.0, 4.0)):
            radius = float(rng.uniform(rmin, rmax))
            for _ in range(400):
                u = rng.normal(size=3)
                u /= np.linalg.norm(u)
                frac = rng.uniform(0.25, 0.75)
                p = cer.centre + u * cer.semi * frac
                p[2] = max(p[2], cer.centre[2] - 0.35 * cer.semi[2])  # keep out of the skull base
                ok = all(np.linalg.norm(p - c) > radius + rr + 3.0 for c, rr in keep)
                ok = ok and all(np.linalg.norm(p - c) > radius + rr + 5.0 for c, rr in placed)
                if ok:
                    break
            placed.append((p, radius))
            if label == 12:
                lob = [(rng.normal(size=3), rng.uniform(-0.15, 0.15)) for _ in range(3)]
                lob = [(n / np.linalg.norm(n), w) for n, w in lob]
                quad = (rng.normal(size=3), rng.uniform(-0.2, 0.2))
                quad = (quad[0] / np.linalg.norm(quad[0]), quad[1])
            else:
                lob, quad = [], (np.array([0.0, 0.0, 1.0]), 0.0)
            self.lesions.append((label, p, radius, lob, quad))

    # -- evaluation ---------------------------------------------------------------------------
    def template_coords(self, ax_u):
        """Template coordinates (3 float32 arrays) at the rectilinear grid ``ax_u`` (head mm)."""
        shape = tuple(len(a) for a in ax_u)
        U = [np.asarray(a, dtype=np.float32).reshape([-1 if k == i else 1 for k in range(3)])
             for i, a in enumerate(ax_u)]
        M = (self.rot / self.scale[:, None]).astype(np.float32)  # p = M (u - shift) + disp
        d = [U[k] - np.float32(self.shift[k]) for k in range(3)]
        P = []
        for i in range(3):
            p = M[i, 0] * d[0] + M[i, 1] * d[1] + M[i, 2] * d[2]
            p = np.broadcast_to(p, shape).astype(np.float32)
            if self.disp is not None:
                p += np.float32(self.disp_amp) * self.disp[i].sample(ax_u)
            P.append(p)
        return P

    def head_bbox(self, lo, hi):
        """Head-frame box containing every point whose template coordinate lies in [lo, hi]."""
        D = self.disp_amp * max(n.max_abs for n in self.disp) if self.disp is not None else 0.0
        lo = np.asarray(lo) - D
        hi = np.asarray(hi) + D
        M = self.rot / self.scale[:, None]
        Minv = np.linalg.inv(M)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        u = corners @ Minv.T + self.shift
        return u.min(0), u.max(0)
