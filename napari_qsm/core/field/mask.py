"""Brain mask without FSL (step family "mask").

Inputs: ``run(magnitude, params=None, *, quality=None, user_mask=None, voxel_size=(1, 1, 1),
misfit=None, r2star=None, progress=None, cancel=None) -> np.ndarray`` (bool, 3-D).

* ``magnitude``: 3-D combined magnitude, or 4-D echoes (i, j, k, echo), combined here by the
  root sum of squares.
* ``quality``: optional 3-D phase-quality map in [0, 1] (e.g. :func:`napari_qsm.core.field.unwrap.voxel_quality`),
  thresholded by Otsu with ``source="quality"`` (QSMxT's default).
* ``r2star``: optional 3-D R2* (1/s) from the echo fit; with ``source="auto"`` it marks bone.
* ``te``: optional echo times (s) of the magnitude's echoes; with ``r2star``, the shell's dark test is made on
  the proton density (step 4).
* ``misfit``: optional 3-D echo-fit misfit (reduced χ², ``TotalField.misfit``): voxels above
  ``misfit_max`` are left out after the holes are filled, and the holes are filled once more, so
  the exclusion carves the mask's edge (where intra-voxel dephasing next to air and bone makes the
  phase unreliable) but leaves no hole inside the brain.
* ``user_mask``: a mask the user gives always wins: it is returned as is (validated, as bool),
  whatever the parameters.

Method ``threshold`` (``source="auto"``), built for real data (tissue everywhere in the FOV, coil
profiles, bone and scalp next to the brain, veins at the FOV border) and scale-free (no noise σ):

1. Tissue: the combined magnitude above ``signal_fraction`` of the local tissue level, in two passes
   (a global level, the median of Otsu's upper class; then that level smoothed by ``bias_mm`` over
   the first pass's voxels, so receive-coil profiles do not cut the centre of the head), and R2*
   not above ``r2star_factor`` × the tissue median (bone: little signal, short T2*).
2. Opening by ``open_mm`` (at least one voxel) cuts thin bridges to the scalp; the largest component.
3. Holes filled in 3-D, and background components open to the FOV border whose border opening is
   small against their wall (``border_fill``): a vein, the fissure or a haemorrhage cut by the FOV.
   Dark structures inside the brain (veins, iron-rich nuclei, haemorrhage) are holes, so they stay.
4. The outer shell (``edge_mm`` deep, not at the FOV border) is peeled: the CSF rim under the skull
   and the partial-volume bone beyond it (bone carries its own sources, which no background removal
   can handle); with ``edge="dark"`` only its dark and short-T2* voxels (the CSF rim stays). Dark is
   measured on the proton density (``edge_contrast="pd"``, :func:`proton_density`: the magnitude
   extrapolated to TE 0 with the fit's R2*) when R2* and the echo times are given: a partial-volume
   bone or air voxel is dark there by its void fraction, while cortex, which T2* decay makes darker
   than the CSF-lit tissue level at long echo times, is not.
5. Misfit carving, optional closing and erosion, as above.

Morphology uses Euclidean distance transforms with the physical voxel size, so radii are in mm on
anisotropic grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..dipole import check_voxel_size
from ..params import param
from ..progress import Reporter
from ..scan import ScanError
from .steps import Step

__all__ = ["ThresholdMaskParams", "threshold_mask", "otsu_threshold", "dice", "STEPS"]


def otsu_threshold(values, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ScanError("mask: no finite values to threshold")
    hi = float(np.percentile(v, 99.5))
    lo = float(v.min())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(edges[1:][int(np.argmax(between[:-1]))])


def dice(a, b) -> float:
    """Dice coefficient 2|A∩B|/(|A|+|B|) of two boolean volumes."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def _ball(r_mm, vs):
    """The voxel offsets within ``r_mm`` (physical units) as a structuring element; None when it is large
    (then a Euclidean distance transform is faster)."""
    h = [int(np.floor(r_mm / v)) for v in vs]
    if np.prod([2 * k + 1 for k in h]) > 343:
        return None
    g = np.meshgrid(*[np.arange(-k, k + 1) * v for k, v in zip(h, vs)], indexing="ij", sparse=True)
    return sum(x * x for x in g) <= r_mm * r_mm


def _erode(m, r_mm, vs):
    """Voxels whose distance to the nearest background voxel exceeds ``r_mm`` (EDT, or the same by a ball)."""
    if r_mm <= 0:
        return m
    ball = _ball(r_mm, vs)
    if ball is not None:
        return ndimage.binary_erosion(m, structure=ball, border_value=1)
    return ndimage.distance_transform_edt(m, sampling=vs) > r_mm


def _dilate(m, r_mm, vs):
    if r_mm <= 0:
        return m
    ball = _ball(r_mm, vs)
    if ball is not None:
        return ndimage.binary_dilation(m, structure=ball)
    return ndimage.distance_transform_edt(~m, sampling=vs) <= r_mm


def _largest_component(m):
    lab, n = ndimage.label(m)
    if n <= 1:
        return m
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def _fill_from_border(m, structure, border_axes):
    """``m`` with every background component (``structure``-connected) that touches no face of the
    ``border_axes`` filled in: scipy's binary_fill_holes by one labelling pass instead of propagation."""
    lab, n = ndimage.label(~m, structure=structure)
    if n == 0:
        return m
    touch = np.zeros(n + 1, bool)
    for ax in border_axes:
        for end in (0, -1):
            touch[np.take(lab, end, axis=ax)] = True
    touch[0] = True                      # label 0 is the object itself
    return m | ~touch[lab]


def _fill_holes(m):
    cross = ndimage.generate_binary_structure(3, 1)
    m = _fill_from_border(m, cross, (0, 1, 2))
    for ax in range(3):  # holes open to the outside in 3-D but closed within slices (e.g. ventricles cut by the FOV)
        plane = np.zeros((3, 3, 3), bool)
        idx = [slice(None)] * 3
        idx[ax] = 1
        plane[tuple(idx)] = cross[tuple(idx)]   # connectivity within the slices across ``ax`` only
        m = _fill_from_border(m, plane, tuple(a for a in range(3) if a != ax))
    return m


def check_user_mask(user_mask, shape) -> np.ndarray:
    m = np.asarray(user_mask)
    if m.ndim == 4 and m.shape[3] == 1:
        m = m[..., 0]
    if m.shape != tuple(shape):
        raise ScanError(f"user_mask: shape {m.shape} does not match the data {tuple(shape)}")
    if not np.all(np.isfinite(m)):
        raise ScanError("user_mask: contains NaN or Inf")
    m = m > 0.5 if m.dtype != bool else m.copy()
    if not m.any():
        raise ScanError("user_mask: empty (no voxel inside)")
    return m


@dataclass
class ThresholdMaskParams:
    source: str = param("auto", "what marks tissue: signal and R2* (auto; R2* when the fit gives it), the magnitude "
                        "alone, or the phase-quality map (QSMxT's Otsu on the quality)",
                        choices=("auto", "magnitude", "quality"))
    threshold_scale: float = param(1.0, "multiplies the signal threshold (lower keeps more)", min=0.05, max=5.0)
    signal_fraction: float = param(0.25, "tissue: combined magnitude above this fraction of the local tissue level",
                                   min=0.01, max=0.9)
    bias_mm: float = param(25.0, "smoothing (mm) of the local tissue level (receive-coil profiles); 0 = one level",
                           min=0.0, max=200.0)
    r2star_factor: float = param(4.0, "bone and other short-T2* tissue: R2* above this many times the tissue median "
                                 "is left out unless enclosed by brain; 0 = R2* not used", min=0.0, max=100.0)
    open_mm: float = param(2.0, "opening radius (mm, at least one voxel) that cuts thin bridges to the scalp; 0 = none",
                           min=0.0, max=20.0)
    border_fill: float = param(0.25, "fill holes open to the field-of-view border (veins, fissure, lesions cut by the "
                               "FOV) whose border opening is at most this fraction of their wall; 0 = closed holes only",
                               min=0.0, max=10.0)
    edge_mm: float = param(3.0, "depth (mm, at least one voxel) of the mask's outer shell that is checked (the FOV "
                           "border is not an edge); 0 = none", min=0.0, max=20.0)
    edge: str = param("dark", "what leaves the outer shell: its dark or short-T2* voxels (partial-volume bone; the "
                      "source-free CSF rim stays as margin for background removal), or all of it (the CSF rim too)",
                      choices=("dark", "all"))
    edge_fraction: float = param(0.9, "dark in the shell: below this fraction of the local tissue level (bright "
                                 "CSF stays, partial-volume bone goes; chosen on the selection heads, issue 24)",
                                 min=0.0, max=2.0)
    edge_contrast: str = param("pd", "what 'dark' is measured on in the shell: pd = the magnitude extrapolated to "
                               "TE 0 with the fit's R2* (a proton-density deficit: the void fraction of bone or air "
                               "in the voxel, not T2* decay, so cortex is not dark); magnitude = the echoes' combined "
                               "magnitude (T2*-weighted); pd needs R2* and the echo times, else magnitude is used",
                               choices=("pd", "magnitude"))
    close_mm: float = param(0.0, "closing radius (mm) after filling holes; 0 = none", min=0.0, max=20.0)
    erode_mm: float = param(0.0, "final erosion (mm); background removal erodes further", min=0.0, max=20.0)
    misfit_max: float = param(10.0, "leave out edge voxels whose echo-fit misfit (reduced χ²; ≈ 1 for noise) exceeds "
                              "this; 0 = keep them", min=0.0, max=1e6)


def _check_map(name, a, shape):
    if a is None:
        return None
    a = np.asarray(a, np.float32)
    if a.shape != tuple(shape):
        raise ScanError(f"{name}: shape {a.shape} does not match the magnitude {tuple(shape)}")
    return a


def tissue_level(mag, seed, vs, bias_mm):
    """The local tissue level: the magnitude of the ``seed`` voxels smoothed by a Gaussian of ``bias_mm``
    (normalised convolution, so air does not pull it down at the head's edge); one level when 0."""
    ref = float(np.median(mag[seed])) if seed.any() else float(np.max(mag))
    if bias_mm <= 0:
        return np.full(mag.shape, ref, np.float32)
    # smooth on a grid subsampled to about a quarter of σ (the result is smooth at that scale), then interpolate
    step = [max(1, int(bias_mm / v / 4)) for v in vs]
    sub = tuple(slice(None, None, k) for k in step)
    sig = [bias_mm / v / k for v, k in zip(vs, step)]
    num = ndimage.gaussian_filter(np.where(seed, mag, 0)[sub].astype(np.float32), sig, mode="nearest")
    den = ndimage.gaussian_filter(seed[sub].astype(np.float32), sig, mode="nearest")
    small = np.where(den > 0.05, num / np.maximum(den, 1e-6), ref).astype(np.float32)
    if small.shape != mag.shape:
        small = ndimage.zoom(small, [n / m for n, m in zip(mag.shape, small.shape)], order=1, mode="nearest")
    return small


def tissue_candidates(mag, r2star, p: ThresholdMaskParams, vs):
    """Voxels with tissue signal (two passes: a global level from Otsu's upper class, then the local level)
    and, with R2*, without the short T2* of bone. Returns (candidates, facts)."""
    otsu = otsu_threshold(mag)
    upper = mag > otsu
    frac = p.signal_fraction * p.threshold_scale
    seed = mag > frac * float(np.median(mag[upper]))           # pass 1: one level for the whole FOV
    level = tissue_level(mag, seed, vs, p.bias_mm)
    cand = mag > frac * level                                   # pass 2: the local level (coil profiles)
    facts = {"otsu": otsu, "level": level, "seed": seed}
    if r2star is not None and p.r2star_factor > 0 and cand.any():
        r2_med = float(np.median(r2star[cand]))
        facts["r2star_median"] = r2_med
        if r2_med > 0:
            cand &= ~(r2star > p.r2star_factor * r2_med)
    return cand, facts


def proton_density(mag, r2star, te, r2_cap):
    """The combined magnitude extrapolated to TE = 0 with the fit's R2* (a proton-density map times the receive
    profile): M0 = RSS / √Σₙ exp(−2·R2*·TEₙ), the root sum of squares of Mₙ = M0·exp(−R2*·TEₙ) solved for M0.
    R2* is clipped to [0, ``r2_cap``] so that noise-only voxels with a large fitted R2* are not blown up (voxels
    above the cap are marked by their R2* instead).

    T2* decay, not a lack of protons, is what makes grey matter (lower R2* but longer-lived) and white matter
    differ from CSF at long echo times; at TE 0 tissue spans little (proton density about 0.7 white matter, 0.8
    grey matter, 1.0 CSF), and a voxel that is partly bone or air (a void at every echo of a GRE protocol: bone's
    T2* is below 3 ms) is dark by its void fraction.

    References
    ----------
    Whittall et al., MRM 37:34 (1997) and Neeb et al., NeuroImage 31:1156 (2006) (proton density of brain tissue);
    Du & Bydder, NMR Biomed 26:489 (2013) (cortical bone T2* ≈ 0.4–0.5 ms).
    """
    te = np.asarray(te, np.float64).ravel()
    r2 = np.clip(r2star, 0.0, float(r2_cap)).astype(np.float32)
    decay = np.zeros(mag.shape, np.float32)
    for t in te:
        decay += np.exp(np.float32(-2.0 * t) * r2)
    return (mag / np.sqrt(decay)).astype(np.float32)


def _check_te(te):
    if te is None:
        return None
    t = np.asarray(te, np.float64).ravel()
    if t.size == 0 or not np.all(np.isfinite(t)) or np.any(t <= 0) or np.any(t >= 1.0):
        raise ScanError(f"te: expected echo times in seconds in (0, 1), got {te!r}")
    return t


def fill_open_holes(m, ratio):
    """``m`` with the background components filled whose voxels on the FOV border number at most ``ratio`` ×
    their voxels next to ``m``: tubes and sheets cut by the FOV border (a vein, the fissure) are filled,
    the air and scalp around a head are not (they meet the border over a large area)."""
    if ratio <= 0:
        return m
    lab, n = ndimage.label(~m)
    if n == 0:
        return m
    border = np.zeros(m.shape, bool)
    for ax in range(3):
        idx = [slice(None)] * 3
        for end in (0, -1):
            idx[ax] = end
            border[tuple(idx)] = True
    wall = ndimage.binary_dilation(m) & ~m
    n_border = np.bincount(lab[border], minlength=n + 1)
    n_wall = np.bincount(lab[wall], minlength=n + 1)
    fill = n_border <= ratio * n_wall
    fill[0] = False
    return m | fill[lab]


def _shell_contrast(mag, r2star, te, facts, p: ThresholdMaskParams, vs):
    """(image, its local tissue level) on which the shell's dark test is made: the proton density
    (:func:`proton_density`) with ``edge_contrast="pd"`` when R2* and the echo times are given, else the magnitude."""
    r2_med = facts.get("r2star_median")
    if p.edge_contrast == "pd" and te is not None and r2_med:
        pd = proton_density(mag, r2star, te, 2.0 * r2_med)     # above 2× the median R2* marks a voxel anyway
        return pd, tissue_level(pd, facts["seed"], vs, p.bias_mm)
    return mag, facts["level"]


def _depth(m, vs):
    """Distance (mm) of each voxel of ``m`` to the nearest voxel outside it, the FOV border not counting as outside
    (the tissue goes on beyond it)."""
    padded = np.pad(m, 1, mode="edge")
    return ndimage.distance_transform_edt(padded, sampling=vs)[1:-1, 1:-1, 1:-1]


def peel_edge(m, p: ThresholdMaskParams, vs, r_open, mag=None, level=None, r2star=None, r2_med=None):
    """``m`` without (part of) its outer shell of depth ``edge_mm`` (the FOV border is not an edge: the
    tissue goes on beyond it), opened and reduced to its largest component.

    In a head the outer edge of the brain-and-CSF component lies on the skull. ``edge="all"`` peels the
    whole shell (the extra-axial CSF rim and the partial-volume bone beyond it); ``edge="dark"`` only its
    voxels darker than ``edge_fraction`` × the local tissue level of ``mag`` (the magnitude, or the proton
    density) or with R2* above twice the tissue median: bone carries its own sources, which no background
    removal can handle, while the CSF rim has none and leaves background removal a margin.
    """
    if p.edge_mm <= 0:
        return m
    shell = m & (_depth(m, vs) <= max(p.edge_mm, min(vs)))
    if p.edge == "dark" and mag is not None:
        dark = mag < p.edge_fraction * level
        if r2star is not None and r2_med:
            dark |= r2star > 2.0 * r2_med
        shell &= dark
    peeled = m & ~shell
    peeled = _dilate(_erode(peeled, r_open, vs), r_open, vs) if r_open > 0 else peeled
    return _largest_component(peeled) if peeled.any() else m


def threshold_mask(magnitude, params: ThresholdMaskParams | None = None, *, quality=None, user_mask=None,
                   voxel_size=(1.0, 1.0, 1.0), misfit=None, r2star=None, te=None, progress=None,
                   cancel=None) -> np.ndarray:
    """Brain mask from signal, R2* and topology; a user mask always wins. See the module docstring.

    Parameters
    ----------
    magnitude : 3-D combined magnitude or 4-D echoes (combined here by the root sum of squares).
    params : :class:`ThresholdMaskParams`.
    quality : optional phase-quality map in [0, 1] (used with ``source="quality"``).
    user_mask : returned as is (validated) when given.
    voxel_size : mm, for radii in mm.
    misfit, r2star : optional echo-fit misfit (reduced χ²) and R2* (1/s) maps.
    te : optional echo times (s) of the echoes behind ``magnitude`` (with ``r2star``: the shell's dark test on
        the proton density, ``edge_contrast="pd"``).
    progress, cancel : see :mod:`napari_qsm.core.progress`.

    Returns
    -------
    numpy.ndarray of bool, the brain mask.

    References
    ----------
    Otsu, IEEE SMC 9:62 (1979). SEPIA (Chan & Marques 2021) refines masks by R2*; QSMxT (Stewart et
    al. 2022) thresholds a phase-quality map in two passes.
    """
    # over 80 lines: the checks of five optional inputs, then the module docstring's steps in order (one reading)
    p = params or ThresholdMaskParams()
    mag = np.asarray(magnitude) if magnitude is not None else None
    if mag is not None:
        if mag.ndim == 4:
            mag = np.sqrt(np.sum(np.abs(mag) ** 2, axis=3, dtype=np.float64)).astype(np.float32)
        if mag.ndim != 3 or mag.size == 0:
            raise ScanError(f"magnitude: expected a 3-D volume or 4-D echoes, got shape {np.shape(magnitude)}")
        if np.iscomplexobj(mag):
            mag = np.abs(mag)
        if not np.all(np.isfinite(mag)):
            raise ScanError("magnitude: contains NaN or Inf")
    shape = mag.shape if mag is not None else (np.shape(quality) if quality is not None else None)
    if user_mask is not None:
        if shape is None:
            shape = np.shape(user_mask)
        return check_user_mask(user_mask, shape)
    vs = check_voxel_size(voxel_size)
    q = _check_map("quality", quality, shape)
    if q is not None and not np.all(np.isfinite(q)):
        raise ScanError("quality: contains NaN or Inf")
    r2 = _check_map("r2star", r2star, shape)
    te = _check_te(te)
    if r2 is not None:
        r2 = np.where(np.isfinite(r2), r2, np.float32(np.inf))
    use_q = p.source == "quality"
    if use_q and q is None:
        raise ScanError("quality: source='quality' needs a phase-quality map")
    if not use_q and mag is None:
        raise ScanError("magnitude: missing (needed to compute a mask; or give a user mask)")
    img = q if use_q else mag.astype(np.float32)
    if float(np.max(img)) <= float(np.min(img)):
        raise ScanError(f"{'quality' if use_q else 'magnitude'}: constant image, nothing to threshold")
    rep = Reporter(progress, cancel, total=4, stage="mask")
    rep(0, "tissue candidates")
    facts = {}
    if use_q:
        m = img > otsu_threshold(img) * p.threshold_scale
    else:
        m, facts = tissue_candidates(img, r2 if p.source == "auto" else None, p, vs)
    rep(1, "opening")
    r_open = max(p.open_mm, min(vs)) if p.open_mm > 0 else 0.0     # a radius under one voxel opens nothing
    m = _dilate(_erode(m, r_open, vs), r_open, vs) if r_open > 0 else m
    if not m.any():
        raise ScanError("mask: nothing left after threshold and opening; lower threshold_scale or open_mm")
    rep(2, "largest component, holes")
    fill = lambda x: _fill_holes(fill_open_holes(_fill_holes(x), p.border_fill))
    m = fill(_largest_component(m))
    if use_q:
        m = fill(peel_edge(m, p, vs, r_open))
    else:
        r2_med = facts.get("r2star_median")
        m = fill(peel_edge(m, p, vs, r_open, *_shell_contrast(img, r2, te, facts, p, vs), r2 if r2_med else None,
                           r2_med))
    if p.close_mm > 0:
        m = fill(_erode(_dilate(m, p.close_mm, vs), p.close_mm, vs))
    mf = _check_map("misfit", misfit, shape)
    if mf is not None and p.misfit_max > 0:
        keep = m & ~(mf > np.float32(p.misfit_max))          # NaN misfit: kept
        if keep.any():
            m = fill(_largest_component(keep))
    rep(3, "erosion")
    m = _erode(m, p.erode_mm, vs)
    if not m.any():
        raise ScanError("mask: empty after erosion; lower erode_mm")
    rep(4, "done")
    return m


STEPS = (
    Step(family="mask", name="threshold", label="Threshold + morphology", params_cls=ThresholdMaskParams,
         run=threshold_mask, default=True, order=0,
         doc="Tissue = signal above a fraction of the local tissue level and R2* below that of bone (or Otsu on the "
             "phase-quality map), opening in mm, largest component, holes filled in 3-D (also those open to the FOV "
             "border: veins, fissure), the outer shell's partial-volume bone peeled (dark on the proton density, the "
             "magnitude extrapolated to TE 0 with R2*: cortex stays), "
             "edge voxels whose echo fit does not hold (misfit > 10) left out; optional closing and erosion in mm. "
             "A user mask always wins."),
)
