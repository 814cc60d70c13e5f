"""Painting the anatomy on a voxel grid: soft-edged compartments, supersampling, labels, texture, receive bias."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit

from .anatomy import _DEEP_LABELS, _HEAD_EXTENT, _TISSUE_LABELS, _Anatomy, _Shape
from .geometry import _SmoothNoise, _ellipsoid_sdf, _polyline_distance, _smin


class _Painter:
    """Composites compartments into the arrays of one rectilinear chunk of sample points."""

    def __init__(self, anat: _Anatomy, ax_u, w: float, props: dict, silent_veins=()):
        self.anat = anat
        self.silent_veins = frozenset(int(i) for i in silent_veins)  # tube indices painted in χ only
        self.ax_u = ax_u
        self.w = np.float32(w)
        self.props = props  # label -> (chi, pd, r2s)
        shape = tuple(len(a) for a in ax_u)
        self.P = anat.template_coords(ax_u)
        self.chi = np.zeros(shape, np.float32)
        self.pd = np.zeros(shape, np.float32)
        self.r2s = np.zeros(shape, np.float32)
        self.lab = np.zeros(shape, np.int16)

    def region(self, lo, hi):
        """Slices of the chunk that can hold template points in [lo, hi] (None if empty)."""
        ulo, uhi = self.anat.head_bbox(lo, hi)
        sl = []
        for k in range(3):
            x = self.ax_u[k]
            i0 = int(np.searchsorted(x, ulo[k] - 1.0, side="left"))
            i1 = int(np.searchsorted(x, uhi[k] + 1.0, side="right"))
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def alpha(self, sdf):
        return expit(-sdf / self.w).astype(np.float32)

    def paint(self, label, alpha, sl=(slice(None),) * 3, chi_only: bool = False):
        chi, pd, r2 = self.props[label]
        a = alpha
        pairs = ((self.chi, chi),) if chi_only else ((self.chi, chi), (self.pd, pd), (self.r2s, r2))
        for arr, v in pairs:
            view = arr[sl]
            view += a * (np.float32(v) - view)
        np.putmask(self.lab[sl], a > 0.5, np.int16(label))

    def shape_sdf(self, s: _Shape, margin=0.0):
        ext = np.abs(s.rot) @ s.semi + margin + 8.0 * float(self.w)
        sl = self.region(s.centre - ext, s.centre + ext)
        if sl is None:
            return None, None
        P = [p[sl] for p in self.P]
        return _ellipsoid_sdf(P, s.centre, s.semi, s.rot), sl

    def run(self):
        """Paint every compartment, outside in: head layers and brain, cortex and CSF, ventricles and deep
        grey matter, veins, lesions (later ones replace earlier ones by their soft alpha)."""
        self._cortex(*self._envelope())
        for s in self.anat.ventricles + self.anat.deep:
            sdf, sl = self.shape_sdf(s)
            if sdf is not None:
                self.paint(s.label, self.alpha(sdf), sl)
        self._veins()
        self._lesions()
        return self

    def _envelope(self):
        """Brain envelope (smooth union of cerebrum, cerebellum and brainstem), scalp, skull, extra-axial CSF
        and white matter; returns the signed distances the cortex needs."""
        A = self.anat
        P = self.P
        w = float(self.w)
        r_skull_in = A.csf_layer
        r_skull_out = r_skull_in + A.skull
        r_head = r_skull_out + A.scalp
        reach = r_head + 12.0 + 8.0 * w  # beyond this the smaller parts no longer shape the head

        # brain envelope: smooth union of cerebrum, cerebellum and brainstem (each evaluated in its box)
        d_cer = _ellipsoid_sdf(P, A.cerebrum.centre, A.cerebrum.semi)
        brain = d_cer.copy()
        d_cbl, sl_cbl = self.shape_sdf(A.cerebellum, margin=reach)
        if sl_cbl is not None:
            brain[sl_cbl] = _smin(brain[sl_cbl], d_cbl, 6.0)
        d_stem, sl_stem = self.shape_sdf(A.brainstem, margin=reach)
        if sl_stem is not None:
            brain[sl_stem] = _smin(brain[sl_stem], d_stem, 5.0)

        # extracranial layers as offsets of the brain surface (+ neck)
        head = brain - np.float32(r_head)
        d_neck, sl_neck = self.shape_sdf(A.neck, margin=12.0)
        if sl_neck is not None:
            head[sl_neck] = _smin(head[sl_neck], d_neck, 12.0)
        del d_neck
        self.paint(15, self.alpha(head))
        del head
        self.paint(14, self.alpha(brain - np.float32(r_skull_out)))
        self.paint(13, self.alpha(brain - np.float32(r_skull_in)))
        self.paint(1, self.alpha(brain))
        return brain, d_cer, d_cbl, sl_cbl, d_stem, sl_stem

    def _cortex(self, brain, d_cer, d_cbl, sl_cbl, d_stem, sl_stem):
        """Cortical ribbon and sulcal CSF, the interhemispheric fissure and the tentorium."""
        A = self.anat
        P = self.P
        w = float(self.w)
        thk = np.float32(A.cortex)
        hw, hwf = np.float32(A.sulcus_hw), np.float32(A.fissure_hw)
        # cortex and sulci: a ribbon under the surface, sulci at the zero sheets of band-limited noise
        depth = -brain
        g = A.gyri.sample(self.ax_u)
        grad = A.gyri_grad.sample(self.ax_u)
        s_sulc = np.abs(g) / np.maximum(grad, np.float32(0.05))
        del g, grad
        D = np.float32(A.depth_mean) + np.float32(3.0) * A.sulc_depth.sample(self.ax_u)
        D = np.clip(D, 5.0, 16.0)
        sdf_ctx = np.minimum(depth - thk, np.maximum(s_sulc - hw - thk, depth - D - thk))
        sdf_csf = np.maximum(s_sulc - hw, depth - D)
        del s_sulc, D, depth

        # interhemispheric fissure (outside the callosal core), only near the midline
        half = float(hwf + thk) + 8.0 * w + 4.0
        lo = A.cerebrum.centre - A.cerebrum.semi
        hi = A.cerebrum.centre + A.cerebrum.semi
        sl = self.region([-half - 1.5, lo[1], lo[2]], [half + 1.5, hi[1], hi[2]])
        if sl is not None:
            Pl = [p[sl] for p in P]
            ax = [self.ax_u[k][sl[k]] for k in range(3)]
            s_fis = np.abs(Pl[0] - A.fissure.sample(ax))
            outside_core = -_ellipsoid_sdf(Pl, A.core.centre, A.core.semi)
            dc = d_cer[sl]
            f_ctx = np.maximum(np.maximum(s_fis - hwf - thk, outside_core - thk), dc)
            f_csf = np.maximum(np.maximum(s_fis - hwf, outside_core), dc)
            np.minimum(sdf_ctx[sl], f_ctx, out=sdf_ctx[sl])
            np.minimum(sdf_csf[sl], f_csf, out=sdf_csf[sl])
            del s_fis, outside_core, f_ctx, f_csf

        # tentorium: CSF sheet where cerebrum and cerebellum meet (not in the brainstem)
        if sl_cbl is not None:
            Pl = [p[sl_cbl] for p in P]
            s_tent = np.abs(d_cer[sl_cbl] - d_cbl) * np.float32(0.5)
            stem_out = -_ellipsoid_sdf(Pl, A.brainstem.centre, A.brainstem.semi, A.brainstem.rot)
            np.minimum(sdf_ctx[sl_cbl], np.maximum(s_tent - hw - thk, stem_out - thk), out=sdf_ctx[sl_cbl])
            np.minimum(sdf_csf[sl_cbl], np.maximum(s_tent - hw, stem_out), out=sdf_csf[sl_cbl])
            del s_tent, stem_out
        np.maximum(sdf_ctx, brain, out=sdf_ctx)
        np.maximum(sdf_csf, brain, out=sdf_csf)
        a_ctx = self.alpha(sdf_ctx)
        a_csf = self.alpha(sdf_csf)
        del sdf_ctx, sdf_csf
        # no cortex on the brainstem: fade out where the brainstem is the nearest part of the brain
        if sl_stem is not None:
            Pl = [p[sl_stem] for p in P]
            other = np.minimum(d_cer[sl_stem], _ellipsoid_sdf(Pl, A.cerebellum.centre, A.cerebellum.semi,
                                                                A.cerebellum.rot))
            allow = expit((d_stem - other) / np.float32(2.0)).astype(np.float32)
            a_ctx[sl_stem] *= allow
            a_csf[sl_stem] *= allow
            del other, allow
        self.paint(2, a_ctx)
        self.paint(3, a_csf)
        del a_ctx, a_csf, d_cer, d_cbl, d_stem, brain

    def _veins(self):
        """Veins: union per vein, painted once, chunked along the path for small bounding boxes."""
        A, P, w = self.anat, self.P, float(self.w)
        for t_idx, tube in enumerate(A.tubes):
            pieces = []
            pts = tube.pts
            for j in range(0, len(pts) - 1, 6):
                seg = pts[j:j + 7]
                m = tube.radius + 8.0 * w + 0.5
                sl = self.region(seg.min(0) - m, seg.max(0) + m)
                if sl is not None:
                    pieces.append((seg, sl))
            if not pieces:
                continue
            box = tuple(slice(min(sl[k].start for _, sl in pieces), max(sl[k].stop for _, sl in pieces))
                        for k in range(3))
            acc = np.zeros(tuple(b.stop - b.start for b in box), np.float32)
            for seg, sl in pieces:
                Pl = [p[sl] for p in P]
                a = self.alpha(_polyline_distance(Pl, seg) - np.float32(tube.radius))
                local = tuple(slice(sl[k].start - box[k].start, sl[k].stop - box[k].start) for k in range(3))
                np.maximum(acc[local], a, out=acc[local])
            self.paint(10, acc, box, chi_only=t_idx in self.silent_veins)

    def _lesions(self):
        """Calcification and haemorrhage: lobulated blobs."""
        A, P, w = self.anat, self.P, float(self.w)
        for label, c, radius, lob, quad in A.lesions:
            ext = np.full(3, radius * 1.6 + 8.0 * w)
            sl = self.region(c - ext, c + ext)
            if sl is None:
                continue
            q = [P[k][sl] - np.float32(c[k]) for k in range(3)]
            r = np.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
            rr = np.maximum(r, np.float32(1e-6))
            reff = np.ones_like(r)
            for n, wt in lob:
                reff += np.float32(wt) * (q[0] * n[0] + q[1] * n[1] + q[2] * n[2]) / rr
            n, wt = quad
            cosq = (q[0] * n[0] + q[1] * n[1] + q[2] * n[2]) / rr
            reff += np.float32(wt) * (cosq * cosq - np.float32(1.0 / 3.0))
            self.paint(label, self.alpha(r - np.float32(radius) * reff), sl)


def _label_mode(lab_sub: np.ndarray) -> np.ndarray:
    """Most common label along the last axis; ties go to the higher label (smaller structure)."""
    F = lab_sub.shape[-1]
    if F == 1:
        return lab_sub[..., 0]
    best = None
    best_score = None
    for j in range(F):
        lj = lab_sub[..., j]
        cnt = np.zeros(lj.shape, np.int16)
        for k in range(F):
            cnt += lab_sub[..., k] == lj
        score = cnt * np.int16(64) + lj
        if best is None:
            best, best_score = lj.copy(), score
        else:
            upd = score > best_score
            best[upd] = lj[upd]
            best_score = np.maximum(best_score, score)
    return best


def _supersampling(vs: np.ndarray) -> tuple[int, ...]:
    dmin = float(vs.min())
    out = []
    for d in vs:
        r = d / dmin
        out.append(int(min(4, max(1, round(r)))) if r >= 1.5 else 1)
    return tuple(out)


def _axes_mm(shape, vs, s_fit):
    """Head-frame mm of the voxel centres of a grid centred on the field of view."""
    return [(np.arange(n) - (n - 1) / 2.0) * d / s_fit for n, d in zip(shape, vs)]


def _paint_grid(anat, shape, vs, s_fit, props, te=None, silent_veins=(), sub=None):
    """Paint the head on the voxel grid (shape, vs): voxel means over the supersampled points.

    Returns chi, labels (mode), tissue (fraction of textured tissue) and, with ``te`` given, the
    magnitude pd·exp(−te·R2*); without ``te``, pd, r2s and deep (fraction of deep grey matter).
    ``sub``: sample points per voxel along each axis (default :func:`_supersampling`). With one
    sample per voxel the fractions are 0 or 1 and are returned as bool (a quarter of the memory;
    multiplying by them gives the same numbers).
    """
    sub = _supersampling(vs) if sub is None else tuple(int(v) for v in sub)
    eff = vs / np.asarray(sub)
    w = 0.25 * float(np.prod(eff) ** (1.0 / 3.0))  # sigmoid width (mm) ≈ partial-volume slope
    axes_x = []
    for n, d, f in zip(shape, vs, sub):
        centres = (np.arange(n) - (n - 1) / 2.0) * d
        offs = ((np.arange(f) + 0.5) / f - 0.5) * d
        axes_x.append((centres[:, None] + offs[None, :]).reshape(-1))
    ax_u = [x / s_fit for x in axes_x]  # head-frame mm (scaled to fit the FOV)

    F = int(np.prod(sub))
    frac = np.float32 if F > 1 else np.bool_
    out = {"chi": np.empty(shape, np.float32), "labels": np.empty(shape, np.int16), "tissue": np.empty(shape, frac)}
    names = ("mag",) if te is not None else ("pd", "r2s", "deep")
    for nm in names:
        out[nm] = np.empty(shape, frac if nm == "deep" else np.float32)
    plane = len(ax_u[1]) * len(ax_u[2])
    step = max(1, int(1_500_000 // max(plane * sub[0], 1)))
    tissue_lut = np.zeros(32, np.float32)
    tissue_lut[list(_TISSUE_LABELS)] = 1.0
    deep_lut = np.zeros(32, np.float32)
    deep_lut[list(_DEEP_LABELS)] = 1.0
    for i0 in range(0, shape[0], step):
        i1 = min(shape[0], i0 + step)
        ax = [ax_u[0][i0 * sub[0]:i1 * sub[0]], ax_u[1], ax_u[2]]
        p = _Painter(anat, ax, w / s_fit, props, silent_veins).run()
        n0 = i1 - i0
        red = (n0, sub[0], shape[1], sub[1], shape[2], sub[2])

        def down(a):
            return a.reshape(red).mean(axis=(1, 3, 5)) if F > 1 else a

        out["chi"][i0:i1] = down(p.chi)
        if te is not None:
            out["mag"][i0:i1] = down(p.pd * np.exp(-np.float32(te) * p.r2s))
        else:
            out["pd"][i0:i1] = down(p.pd)
            out["r2s"][i0:i1] = down(p.r2s)
            out["deep"][i0:i1] = down(deep_lut[p.lab])
        out["tissue"][i0:i1] = down(tissue_lut[p.lab])
        if F > 1:
            lab_sub = p.lab.reshape(red).transpose(0, 2, 4, 1, 3, 5).reshape(n0, shape[1], shape[2], F)
            out["labels"][i0:i1] = _label_mode(lab_sub)
        else:
            out["labels"][i0:i1] = p.lab
        del p
    return out


def _texture(rng_tex, shape, vs, s_fit, amp, ax_mm):
    """Smooth zero-mean χ texture (ppm) with correlation lengths of about 1.5 mm and 8 mm.

    Computed in place and in blocks (the same numbers as whole-array expressions: the normal draws are
    one stream, the operations the same float32 ones), so the peak is about one array of ``shape``.
    """
    fine = _normal_f32(rng_tex, shape)
    ndimage.gaussian_filter(fine, 1.5 / (vs / s_fit), mode="reflect", output=fine)
    fine /= max(float(fine.std()), 1e-12)
    coarse = _SmoothNoise(rng_tex, sigma=8.0, spacing=4.0)
    fine *= np.float32(0.6)
    rows = _block_rows(shape)
    for r0 in range(0, shape[0], rows):   # (0.6·fine + 0.8·coarse)·amp, block by block
        c = coarse.sample([ax_mm[0][r0:r0 + rows], ax_mm[1], ax_mm[2]])
        c *= np.float32(0.8)
        blk = fine[r0:r0 + rows]
        blk += c
        blk *= np.float32(amp)
    return fine


def _block_rows(shape, block: int = 1 << 22) -> int:
    """First-axis rows of ``shape`` in a block of about ``block`` elements."""
    return max(1, block // max(int(np.prod(shape[1:])), 1))


def _normal_f32(rng, shape) -> np.ndarray:
    """``rng.standard_normal(shape).astype(np.float32)`` without the float64 array (drawn in blocks: the
    generator's stream is the same)."""
    out = np.empty(shape, np.float32)
    flat = out.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.size, step):
        flat[i:i + step] = rng.standard_normal(min(step, flat.size - i))
    return out


def _receive_bias(rng_tex, ax_mm, apply_to=None):
    """Smooth coil-sensitivity factor (about 1 ± 0.1, brighter towards the periphery).

    ``apply_to``: multiply that array (on the ``ax_mm`` grid) by the factor in place, block by block,
    and return it (the same numbers as ``apply_to * _receive_bias(...)`` without a full-size factor).
    """
    noise = _SmoothNoise(rng_tex, sigma=40.0, spacing=10.0)

    def factor(ax0):
        axes = [ax0, ax_mm[1], ax_mm[2]]
        bias_noise = noise.sample(axes)
        r2 = sum((np.asarray(a, np.float32).reshape([-1 if k == i else 1 for k in range(3)]) / np.float32(h)) ** 2
                 for i, (a, h) in enumerate(zip(axes, _HEAD_EXTENT)))
        return (1.0 + np.float32(0.08) * bias_noise) * (1.0 + np.float32(0.15) * np.minimum(r2, 1.5))

    if apply_to is None:
        return factor(ax_mm[0])
    rows = _block_rows(apply_to.shape)
    for r0 in range(0, apply_to.shape[0], rows):
        apply_to[r0:r0 + rows] *= factor(ax_mm[0][r0:r0 + rows])
    return apply_to
