"""Seeded procedural head phantoms: susceptibility, local field, magnitude, labels and mask.

:func:`make_phantom` draws a new head from a seed. Tests, the sample data and the synthetic
training data of the network all use it. The anatomy is defined in physical millimetres and
sampled at the voxel centres, so any matrix size, voxel size and B0 direction works. That
includes 1 mm isotropic research scans and clinical-like 0.75x0.75x3 mm slabs.

Geometry (voxel frame (i, j, k) = left→right, posterior→anterior, inferior→superior, head centred)
-------------------------------------------------------------------------------------------
* The head is about 140 x 172 x 140 mm: scalp, skull, a thin extra-axial CSF layer and the brain
  (cerebrum, cerebellum, brainstem; their smooth union). If the field of view is smaller, the
  whole head is scaled down to fit it on every axis. For partial coverage (a thin slab), generate
  a full field of view and crop it.
* Deep structures sit at approximate MNI positions (scaled by 0.87), each an ellipsoid. Bilateral
  structures are mirrored, with independent jitter on each side.
* Cortex: a 2.5–3 mm ribbon under the brain surface. Sulci are the zero sheets of band-limited
  random noise (about 12–15 mm apart, 5–16 mm deep) and are lined with cortex. The
  interhemispheric fissure and a tentorial CSF sheet divide the brain.
* With ``randomize=True`` the whole head also gets a small random rotation (about 3°), an
  anisotropic scale (±6 %), a shift and a smooth elastic displacement (1–2 mm rms). Each
  structure gets jitter on its centre, axes and angle.
* Veins: a superior-sagittal-sinus-like vessel along the top of the fissure, 3–5 cortical veins on
  random paths across the convexity towards it, and one deep (internal-cerebral-like) vein.
  Radius 1–2 mm.
* One calcification (a sphere of radius 2–4 mm) and one haemorrhage (a lobulated blob of radius
  4–8 mm) at seeded sites in the hemispheres, away from the deep nuclei.
* Partial volume: every compartment is composited with a soft (sigmoid) edge about a quarter of
  a voxel wide. Voxels much longer along one axis (e.g. 3 mm slices) are supersampled along that
  axis (up to 4x) and averaged. Thick slices therefore show partial volume instead of stairs, and
  the deep structures still appear. Labels take the most common label of the subsamples; on a
  tie the smaller (higher-numbered) structure wins.

Susceptibility (ppm; nominal value, randomised range when ``randomize=True``)
-----------------------------------------------------------------------------
=================  ========  ================
white matter        −0.03    −0.045 … −0.02
cortex (grey)       +0.02    +0.01 … +0.03
CSF                  0        0 (reference)
caudate             +0.075   +0.06 … +0.09
putamen             +0.06    +0.04 … +0.08
globus pallidus     +0.175   +0.15 … +0.20
thalamus            +0.025   +0.01 … +0.04
substantia nigra    +0.15    +0.12 … +0.18
red nucleus         +0.13    +0.10 … +0.16
vein                +0.375   +0.30 … +0.45
calcification       −0.15    −0.20 … −0.10
haemorrhage         +0.75    +0.50 … +1.00
=================  ========  ================

These ranges follow approximate in-vivo values reported relative to CSF. For deep grey matter,
white matter and cortex: Deistung et al., NeuroImage 65:299 (2013); Lim et al., NeuroImage 82:449
(2013); Li et al., NeuroImage 55:1645 (2011). The head phantom of the QSM reconstruction challenge
2.0 (Marques et al., MRM 86:526, 2021) uses similar values. For veins (deoxygenated blood):
Haacke et al., AJNR 30:19 (2009) and Fan et al., MRM 72:149 (2014). For calcification (negative)
and haemorrhage: Chen et al., Radiology 270:496 (2014). The ranges are rounded and not fitted to
any single study. Outside the brain mask χ is 0: the phantom models the *local* field only.
``texture=True`` adds smooth zero-mean tissue texture (std 0.005–0.01 ppm, correlation lengths of
about 1.5 mm and 8 mm) inside brain tissue. It is not added to CSF, veins or lesions.

Field, magnitude and noise
--------------------------
``field = forward_field(chi) * mask`` (ppm, D(0) = 0; see :mod:`napari_qsm.core.dipole`).
The magnitude is ``PD·exp(−TE·R2*)`` per compartment (a GRE at 3 T): CSF is bright, grey matter
brighter than white matter, and iron-rich nuclei, veins, calcification and haemorrhage are dark.
R2* follows the χ of iron-rich tissue. The skull is almost black and the scalp is medium-bright.
A smooth coil-sensitivity bias is applied. With ``snr`` given, the magnitude has SNR ``snr`` at
the mean in-mask magnitude and gets Rician noise. The phase noise is
σ_φ(x) = 1 / (snr · mag(x) / mean_mag), capped at 1 rad, computed on the noise-free magnitude.
The field noise is σ_f = σ_φ / (2π·γ̄·B0·TE)·1e6 ppm, with γ̄ = 42.577478 MHz/T. Gaussian noise with
that σ is added to the field inside the mask. ``noise_std`` stores σ_f everywhere: it is finite
and positive, and the field outside the mask has no noise.

Idealised and honest modes
--------------------------
The default (``honest=False``, recorded as ``simulation="idealised"``) is the model above: the
field is the same discrete forward model the inversions use, on the same grid (an inverse crime),
the magnitude carries χ's texture, and ``noise_std`` is the exact σ of the added noise. Sample
data and network training use it; benchmarks should not.

``honest=True`` (``simulation="honest"``) removes those advantages:

* **Model error.** χ, proton density and R2* are painted on a grid 2x finer along each axis
  (thick voxels are further supersampled inside it, to the idealised phantom's sample count). The field is computed there (D(0) = 0,
  zero padding ≥ 2x of the bounding box of the brain). ``chi`` is the voxel mean of the fine χ;
  ``true_field`` the voxel mean of the fine field (inside the mask). On a 64x72x64 2.5 mm head the
  true field differs from the discrete forward model of ``chi`` by 7 % (demeaned relative norm in
  the mask) and by 1.2 % after a Gaussian low-pass (σ 2 voxels); the fitted field by 10 % and 2.5 %.
* **Signal and fit.** Per fine point and echo n the complex GRE signal
  PD·exp(−TE_n·R2*)·exp(i(φ0 + 2π·γ̄·B0·TE_n·field·1e-6)) (φ0 a smooth random transceive phase) is
  averaged within each voxel, which adds intra-voxel dephasing near strong sources. Complex Gaussian
  noise of σ = mean echo-1 magnitude in the mask / ``snr`` is added. The field is then fitted as a
  user would: successive-echo complex ratios give the temporally unwrapped phase, a line in echo
  index weighted by |S_n|² gives Δφ per ΔTE; ``noise_std`` is the MEDI nonlinear-fit formula
  σ·√(a11/(a11·a22 − a12²)) in ppm, with σ estimated from the eight corner blocks of the field of
  view (air), ``noise_sigma``; ``r2star`` is the same weighted line through log|S_n|; ``magnitude``
  is the root-sum-of-squares over echoes (the MEDI toolbox's iMag). ``te`` holds ΔTE, the phase unit
  of the fit. Echo protocols (:class:`EchoProtocol`): ``CLINICAL_ECHOES`` = 7 echoes, TE1 12.6 ms,
  ΔTE 4.1 ms (the paper's clinical data), used for thick-slice voxels; ``RESEARCH_ECHOES`` = 5
  echoes, TE1 4 ms, ΔTE 4 ms, otherwise.
* **Magnitude edges only partly matching χ.** No χ texture in the magnitude (the magnitude has
  its own PD and R2* textures); smooth iron gradients (0.015–0.03 ppm) inside deep grey matter in χ
  only; about half the veins other than the sinus are painted in χ only (``silent_veins``); 3–6
  white-matter-hyperintensity-like PD increases (+12–25 %, radius 2–5 mm, ``wmh``) with no χ change.
  :func:`edge_agreement` (share of the top-10 % χ-gradient voxels inside the top-30 % magnitude
  gradient set, chance = 0.3) measured honest / idealised on seeds 3 and 4: 0.36 / 0.44 and
  0.59 / 0.58 at 2.5 mm, 0.49 / 0.51 and 0.74 / 0.73 at 1.6 mm, 0.69 / 0.62 and 0.78 / 0.76 at
  1.5x1.5x6 mm. The strongest χ edges (lesions, tissue boundaries) keep a magnitude edge in both
  modes; what changes is the weaker structure (texture: correlation of the high-passed magnitude
  with the χ texture in white matter −0.21 idealised, |r| < 0.07 honest; veins; deep-grey iron).
* ``edit`` (a callable) receives the fine :class:`PhantomGrid` before the physics, so benchmarks
  can add lesions or change contrast honestly (on the fine grid, before the forward model).

Head in air: raw data with a background field (``honest=True, background=True``)
--------------------------------------------------------------------------------
The honest phantom above models the brain's *local* field only (χ is 0 outside the brain). With
``background=True`` the whole head becomes a susceptibility source relative to the surrounding
air, and air cavities are carved out of the skull and scalp, so that the raw echoes carry the
background field a scanner sees:

* **χ relative to air** (the reference of the simulated field; SI volume susceptibilities of
  Schenck, Med. Phys. 23:815, 1996): water −9.05 ppm, air +0.36 ppm, so soft tissue, CSF and
  brain are −9.41 ppm (``TISSUE_VS_AIR``) plus the brain's own χ relative to CSF (the table above,
  unchanged). Scalp is taken as water-like. Skull is more diamagnetic: cortical bone is about
  −2 ppm relative to water (Buch et al., MRM 73:2185, 2015; Schenck lists −8.9 … −12.8 ppm for
  bone), and the marrow-filled diploë less, so the skull gets −1.5 ppm relative to water
  (``SKULL_VS_WATER``; drawn in −2.0 … −1.0 with ``randomize``).
* **Air cavities** (χ 0 relative to air, no signal), ellipsoids in the anatomy's frame that only
  replace skull and scalp (never brain or CSF): a frontal sinus in front of and below the frontal
  pole, an ethmoid / nasal cavity under the orbitofrontal cortex, a sphenoid sinus under the
  skull base and, on each side, mastoid air cells / ear canal below the temporal lobe
  (``_CAVITIES``; centres jittered by ≈2 mm and sizes by ±15 % with ``randomize``). The head has
  no face: below the orbitofrontal cortex the skin meets air, as a face would.
* **Field.** Total χ on the 2x fine grid (brain χ + tissue/skull/air), D(0) = 0, zero-padded to
  ≥ 2x of the head's bounding box (zero = air continuing outside the field of view); where the
  neck leaves through the bottom of the field of view its bottom slice is continued 80 mm into the
  padding, so that the cut does not add an air interface the body does not have. The field is
  relative to the far air (a uniform ellipsoid of tissue would have a constant field inside).
  The echoes are made from this total field exactly as above (per fine point, averaged within the
  voxel: intra-voxel dephasing near the cavities), with the same smooth receive phase φ0 and
  complex noise; phases wrap as they come.
* **Truth.** ``chi``: brain χ relative to CSF inside the mask (as without background; χ outside
  the brain is not reported). ``true_local_field``: the voxel mean of the fine-grid field of the
  brain's own sources (``chi``'s fine-grid χ, the same computation as the local-field phantom)
  inside the mask; background removal should return it up to a harmonic function inside the mask
  (the uniform −9.41 ppm of the brain itself adds only a harmonic field inside it).
  ``true_total_field``: the voxel mean of the fine total field over the whole field of view
  (ppm, relative to far air; meaningful where there is signal). ``true_field`` is the truth behind
  ``field``: the total field inside the mask.
* **``field``** stays what the echo fit gives (as without background: successive-echo ratios and
  a weighted line): the *fitted total field* inside the mask, wrapped into ±``wrap_period_ppm``/2
  (``1/(γ̄·B0·ΔTE)``, 1.96 ppm at 3 T and ΔTE 4 ms) where |ω·ΔTE| > π, which near the cavities it
  is. It is not a local field: ``Scan.from_phantom`` still builds a Scan from it (total field,
  mask, RSS magnitude, N_std), but the inversions want the pipeline's local field
  (``phantom.to_echoes()`` → fit → unwrap → background removal) or ``true_local_field``.
  ``phantom.background`` is True and ``info()`` records the susceptibilities and the cavities.
* :func:`save_raw_bids` writes the echoes as a BIDS MEGRE folder (magnitude, phase in radians or
  Siemens integers, JSON sidecars) with the truth next to it; ``napari-qsm phantom OUTDIR --raw``.

Determinism: the same arguments give identical arrays. The random streams are split by purpose
(anatomy, values, texture, noise), so for example ``snr`` does not change the anatomy. The anatomy
depends on the seed, not on the matrix size, so the same seed gives the same head at 1 mm and at
0.75x0.75x3 mm.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

import torch

from ..constants import GAMMA_BAR_HZ_PER_T
from ..device import resolve_device
from ..dipole import check_voxel_size, fast_shape, forward_field, kernel_slabs, unit_vector

__all__ = [
    "Phantom", "make_phantom", "oblique_direction", "save_phantom", "affine_for",
    "CLINICAL", "RESEARCH", "LABEL_NAMES", "BRAIN_LABELS", "CHI_RANGES", "GAMMA_BAR",
    "EchoProtocol", "CLINICAL_ECHOES", "RESEARCH_ECHOES", "default_echo_protocol", "PhantomGrid",
    "edge_agreement", "save_raw_bids", "TISSUE_VS_AIR", "SKULL_VS_WATER", "CHI_WATER", "CHI_AIR",
]

GAMMA_BAR = GAMMA_BAR_HZ_PER_T  # Hz/T (γ/2π of the proton), kept under its old public name

CLINICAL = dict(shape=(192, 224, 48), voxel_size=(0.75, 0.75, 3.0))
RESEARCH = dict(shape=(160, 192, 160), voxel_size=(1.0, 1.0, 1.0))

LABEL_NAMES: dict[int, str] = {
    1: "white_matter", 2: "cortex", 3: "csf", 4: "caudate", 5: "putamen", 6: "globus_pallidus",
    7: "thalamus", 8: "substantia_nigra", 9: "red_nucleus", 10: "vein", 11: "calcification",
    12: "haemorrhage", 13: "extra_axial_csf", 14: "skull", 15: "scalp",
}
#: labels that make up the brain mask (13–15 lie outside it; χ there is 0)
BRAIN_LABELS: tuple[int, ...] = tuple(range(1, 13))
_TISSUE_LABELS = (1, 2, 4, 5, 6, 7, 8, 9)  # where texture is added
_DEEP_LABELS = (4, 5, 6, 7, 8, 9)  # deep grey matter (honest mode: iron gradients inside)
_HONEST_FACTOR = 2  # honest mode: fine points per voxel along each axis

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
_NOISE_BOX = np.array([115.0, 125.0, 115.0])  # half size (mm) of the fixed grids of random fields

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


# ----------------------------------------------------------------------------------------------
# Public helpers
# ----------------------------------------------------------------------------------------------

def oblique_direction(angle_deg: float, axis: str = "x") -> np.ndarray:
    """(0, 0, 1) rotated by ``angle_deg`` (right-handed) about voxel axis ``axis`` ("x", "y" or "z")."""
    a = math.radians(float(angle_deg))
    ax = str(axis).lower()
    if ax not in ("x", "y", "z"):
        raise ValueError(f"axis: expected 'x', 'y' or 'z', got {axis!r}")
    return _rotation(ax, a) @ np.array([0.0, 0.0, 1.0])


def affine_for(shape: Sequence[int], voxel_size: Sequence[float], b0_direction) -> np.ndarray:
    """Voxel→scanner (mm) affine whose B0 (scanner z) is ``b0_direction`` in the voxel frame.

    The rotation part is R·diag(voxel_size). R is the smallest rotation with R·b̂ = ẑ, so that
    Rᵀ·(0, 0, 1) = b̂. The translation puts the volume centre at the scanner origin.
    """
    b = unit_vector(b0_direction)
    vs = check_voxel_size(voxel_size)
    ez = np.array([0.0, 0.0, 1.0])
    c = float(b @ ez)
    if c < -1.0 + 1e-12:
        R = np.diag([1.0, -1.0, -1.0])
    else:
        v = np.cross(b, ez)
        vx = np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])
        R = np.eye(3) + vx + vx @ vx / (1.0 + c)
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(vs)
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    A[:3, 3] = -A[:3, :3] @ centre
    return A


@dataclass
class Phantom:
    """One generated head. See the module docstring for the model and the χ values.

    Arrays are in voxel order (i, j, k). χ and the field are in ppm. ``field`` is the local field
    of ``chi`` inside ``mask`` plus noise when ``snr`` is set. ``label_chi`` is the χ (ppm) used
    for each label name, before texture and partial volume.
    """

    chi: np.ndarray
    field: np.ndarray
    mask: np.ndarray
    magnitude: np.ndarray
    labels: np.ndarray
    label_names: dict
    voxel_size: tuple
    b0_direction: np.ndarray
    affine: np.ndarray
    noise_std: np.ndarray | None
    te: float = 0.02
    b0_tesla: float = 3.0
    snr: float | None = None
    seed: int = 0
    label_chi: dict = dc_field(default_factory=dict)
    texture: bool = True
    randomize: bool = True
    #: "idealised" (field = discrete forward model on this grid, exact noise map) or "honest"
    simulation: str = "idealised"
    #: honest: voxel mean of the fine-grid field inside the mask (ppm), the truth behind ``field``
    true_field: np.ndarray | None = None
    #: honest: R2* (1/s) fitted from the echo magnitudes
    r2star: np.ndarray | None = None
    #: honest: echo times (s) of the simulated acquisition and the protocol's name
    echo_times: tuple = ()
    echo_protocol: str = ""
    #: honest: noise σ per real/imaginary channel estimated from the background (None without noise)
    noise_sigma: float | None = None
    #: honest with ``keep_echoes``: complex echoes (i, j, k, echo)
    echoes: np.ndarray | None = None
    #: honest: number of veins painted in χ only, and the magnitude-only hyperintensities
    silent_veins: int = 0
    wmh: list = dc_field(default_factory=list)
    #: honest: True when the head sits in air with a background field (``field`` is then a fitted TOTAL field)
    background: bool = False
    #: honest: field of the brain's own sources inside the mask (ppm), what background removal should return
    true_local_field: np.ndarray | None = None
    #: honest: local + background field over the whole field of view (ppm, relative to far air)
    true_total_field: np.ndarray | None = None
    #: honest with background: the air cavities (name, centre and semi-axes in mm) and the χ used
    cavities: list = dc_field(default_factory=list)
    background_chi: dict = dc_field(default_factory=dict)
    #: honest with background: voxels holding air of a cavity (any of their fine points)
    cavity_mask: np.ndarray | None = None

    @property
    def shape(self) -> tuple:
        return tuple(int(n) for n in self.chi.shape)

    @property
    def wrap_period_ppm(self) -> float:
        """Field (ppm) of one 2π wrap of the phase over ``te`` (honest: ΔTE): 1/(γ̄·B0·te)·1e6."""
        return float(1e6 / (GAMMA_BAR * float(self.b0_tesla) * float(self.te)))

    def to_echoes(self, name: str = "phantom echoes"):
        """The kept complex echoes as :class:`napari_qsm.core.field.records.Echoes` (the front end's input)."""
        from ..field.records import Echoes

        if self.echoes is None:
            raise ValueError("echoes: this phantom kept none; make it with honest=True, keep_echoes=True")
        return Echoes.from_complex(self.echoes, te=tuple(self.echo_times), b0_tesla=float(self.b0_tesla),
                                   affine=np.asarray(self.affine, np.float64), voxel_size=tuple(self.voxel_size),
                                   b0_direction=np.asarray(self.b0_direction, np.float64), name=name)

    def info(self) -> dict:
        """JSON-friendly description (what :func:`save_phantom` writes to phantom.json)."""
        return {
            "generator": "napari_qsm.core.sim.phantom.make_phantom",
            "shape": list(self.shape),
            "voxel_size": [float(v) for v in self.voxel_size],
            "b0_direction": [float(v) for v in self.b0_direction],
            "te": float(self.te),
            "b0_tesla": float(self.b0_tesla),
            "snr": None if self.snr is None else float(self.snr),
            "seed": int(self.seed),
            "texture": bool(self.texture),
            "randomize": bool(self.randomize),
            "simulation": self.simulation,
            "echo_times": [float(t) for t in self.echo_times],
            "echo_protocol": self.echo_protocol,
            "noise_sigma": None if self.noise_sigma is None else float(self.noise_sigma),
            "silent_veins": int(self.silent_veins),
            "wmh": list(self.wmh),
            "background": bool(self.background),
            "chi_reference": ("brain χ relative to CSF; the simulated field is that of χ relative to air "
                              "(background_chi)" if self.background else "relative to CSF (local field only)"),
            "background_chi": dict(self.background_chi),
            "cavities": list(self.cavities),
            "field_is": ("fitted total field (wrapped, period wrap_period_ppm)" if self.background else
                         ("fitted local field" if self.simulation == "honest" else "local field")),
            "wrap_period_ppm": self.wrap_period_ppm,
            "units": {"chi": "ppm", "field": "ppm", "noise_std": "ppm", "voxel_size": "mm"},
            "label_names": {str(k): v for k, v in sorted(self.label_names.items())},
            "label_chi": {k: float(v) for k, v in self.label_chi.items()},
            "brain_labels": list(BRAIN_LABELS),
            "affine": np.asarray(self.affine, dtype=float).round(10).tolist(),
        }


def save_phantom(phantom: Phantom, outdir) -> dict[str, Path]:
    """Write the phantom as NIfTI (with ``phantom.affine``) plus ``phantom.json``.

    Files: field.nii.gz (ppm), mask.nii.gz (uint8), magnitude.nii.gz, chi.nii.gz (ground truth,
    ppm), labels.nii.gz (int16), noise_std.nii.gz (ppm, only when the phantom has noise),
    true_field.nii.gz (ppm) and r2star.nii.gz (1/s) for honest phantoms (with a background also
    true_local_field.nii.gz and true_total_field.nii.gz), and phantom.json (:meth:`Phantom.info`). Returns {name: path}.
    """
    import nibabel as nib

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "field": phantom.field.astype(np.float32),
        "mask": phantom.mask.astype(np.uint8),
        "magnitude": phantom.magnitude.astype(np.float32),
        "chi": phantom.chi.astype(np.float32),
        "labels": phantom.labels.astype(np.int16),
    }
    if phantom.noise_std is not None:
        arrays["noise_std"] = phantom.noise_std.astype(np.float32)
    names = ("true_field", "r2star") + (("true_local_field", "true_total_field") if phantom.background else ())
    for name in names:
        if getattr(phantom, name, None) is not None:
            arrays[name] = getattr(phantom, name).astype(np.float32)
    paths: dict[str, Path] = {}
    affine = np.asarray(phantom.affine, dtype=np.float64)
    for name, data in arrays.items():
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        p = out / f"{name}.nii.gz"
        tmp = out / f".{name}.tmp.nii.gz"
        nib.save(img, str(tmp))
        tmp.replace(p)
        paths[name] = p
    pj = out / "phantom.json"
    pj.write_text(json.dumps(phantom.info(), indent=2))
    paths["json"] = pj
    return paths


def _save_nifti(data, affine, path: Path) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)
    return path


def save_raw_bids(phantom: Phantom, outdir, phase_units: str = "rad", subject: str = "phantom") -> dict[str, Path]:
    """Write an honest phantom's echoes as a BIDS-like MEGRE folder, with its truth next to it.

    ``OUTDIR/sub-<subject>/anat/sub-<subject>_echo-N_part-mag_MEGRE.nii.gz`` and ``_part-phase_``
    (radians in (−π, π], or Siemens integers −4096..4095 with ``phase_units="siemens"``), each
    with a JSON sidecar (EchoTime s, EchoNumber, MagneticFieldStrength T, ImagingFrequency MHz,
    Manufacturer); ``OUTDIR/dataset_description.json``; the truth in ``OUTDIR/truth/``: chi
    (brain χ relative to CSF, ppm), local_field and total_field (ppm), mask, labels, and
    phantom.json (:meth:`Phantom.info`). Needs ``make_phantom(honest=True, keep_echoes=True)``.
    Returns {name: path}. :func:`napari_qsm.core.field.load.load_echoes` reads the subject folder back.
    """
    if phantom.echoes is None:
        raise ValueError("phantom: no echoes kept; make it with honest=True, keep_echoes=True")
    units = str(phase_units).strip().lower()
    if units not in ("rad", "siemens"):
        raise ValueError(f"phase_units: expected 'rad' or 'siemens', got {phase_units!r}")
    if not subject or not str(subject).isalnum():
        raise ValueError(f"subject: expected a BIDS label (letters and digits), got {subject!r}")
    out = Path(outdir)
    anat = out / f"sub-{subject}" / "anat"
    truth = out / "truth"
    anat.mkdir(parents=True, exist_ok=True)
    truth.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(phantom.affine, dtype=np.float64)
    b0 = float(phantom.b0_tesla)
    paths: dict[str, Path] = {}
    desc = out / "dataset_description.json"
    if not desc.exists():
        desc.write_text(json.dumps({"Name": "napari-qsm procedural raw head phantom", "BIDSVersion": "1.8.0",
                                    "DatasetType": "raw", "GeneratedBy": [{"Name": "napari-qsm phantom --raw"}]},
                                   indent=2))
    paths["dataset_description"] = desc
    for e, te in enumerate(phantom.echo_times):
        S = phantom.echoes[..., e]
        ph = np.angle(S).astype(np.float32)
        if units == "siemens":
            ph = np.clip(np.round(ph * (4096.0 / np.pi)), -4096, 4095).astype(np.int16)
        for part, data in (("mag", np.abs(S).astype(np.float32)), ("phase", ph)):
            stem = f"sub-{subject}_echo-{e + 1}_part-{part}_MEGRE"
            paths[f"echo{e + 1}_{part}"] = _save_nifti(data, affine, anat / f"{stem}.nii.gz")
            side = {"EchoTime": float(te), "EchoNumber": e + 1, "MagneticFieldStrength": b0,
                    "ImagingFrequency": round(b0 * GAMMA_BAR * 1e-6, 6),
                    "Manufacturer": "Siemens" if units == "siemens" else "napari-qsm",
                    "ManufacturersModelName": "procedural head phantom", "MRAcquisitionType": "3D",
                    "ImageType": ["ORIGINAL", "PRIMARY", "M" if part == "mag" else "P"],
                    "PhaseUnits": ("rad" if units == "rad" else "siemens (-4096..4095 = -pi..pi)")
                    if part == "phase" else None}
            side = {k: v for k, v in side.items() if v is not None}
            (anat / f"{stem}.json").write_text(json.dumps(side, indent=2))
    local = phantom.true_local_field if phantom.true_local_field is not None else phantom.true_field
    total = phantom.true_total_field if phantom.true_total_field is not None else phantom.true_field
    for name, data in (("chi", phantom.chi.astype(np.float32)), ("local_field", local),
                       ("total_field", total), ("mask", phantom.mask.astype(np.uint8)),
                       ("labels", phantom.labels.astype(np.int16))):
        if data is not None:
            paths[f"truth_{name}"] = _save_nifti(np.asarray(data), affine, truth / f"{name}.nii.gz")
    pj = truth / "phantom.json"
    pj.write_text(json.dumps(phantom.info(), indent=2))
    paths["truth_json"] = pj
    return paths


# ----------------------------------------------------------------------------------------------
# Small geometry helpers
# ----------------------------------------------------------------------------------------------

def _rotation(axis: str, a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


def _euler(deg) -> np.ndarray:
    ax, ay, az = (math.radians(float(d)) for d in deg)
    return _rotation("z", az) @ _rotation("y", ay) @ _rotation("x", ax)


def _mni(p) -> np.ndarray:
    return _MNI_SCALE * np.asarray(p, dtype=np.float64) + _MNI_SHIFT


def _smin(a, b, k):
    """Polynomial smooth minimum (smooth union of two signed distances)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


class _SmoothNoise:
    """Zero-mean, unit-variance smooth random field on a fixed physical box.

    White noise on a coarse grid (spacing ``spacing`` mm) is Gaussian-filtered (σ ``sigma`` mm)
    and evaluated on rectilinear grids by separable linear interpolation. That is O(N), and the
    result does not depend on the sampling grid, so the same seed gives the same field at any
    resolution.
    """

    def __init__(self, rng: np.random.Generator, sigma: float, spacing: float | None = None,
                 half=_NOISE_BOX):
        self.h = float(spacing or sigma / 2.0)
        half = np.asarray(half, dtype=np.float64)
        n = np.ceil(2 * half / self.h).astype(int) + 1
        c = rng.standard_normal(tuple(n)).astype(np.float32)
        c = ndimage.gaussian_filter(c, sigma / self.h, mode="wrap")
        c /= max(float(c.std()), 1e-12)
        self.c = c
        self.lo = -half
        self.max_abs = float(np.abs(c).max())

    def gradient_norm(self) -> "_SmoothNoise":
        """|∇field| (per mm) as a field on the same grid."""
        out = object.__new__(_SmoothNoise)
        out.h, out.lo = self.h, self.lo
        gr = np.gradient(self.c, self.h)
        out.c = np.sqrt(sum(g * g for g in gr)).astype(np.float32)
        out.max_abs = float(out.c.max())
        return out

    def sample(self, axes) -> np.ndarray:
        out = self.c
        for ax, x in enumerate(axes):
            u = (np.asarray(x, dtype=np.float64) - self.lo[ax]) / self.h
            u = np.clip(u, 0.0, self.c.shape[ax] - 1 - 1e-6)
            i = np.floor(u).astype(np.intp)
            w = (u - i).astype(np.float32)
            a = np.take(out, i, axis=ax)
            b = np.take(out, i + 1, axis=ax)
            shape = [1, 1, 1]
            shape[ax] = -1
            out = a + (b - a) * w.reshape(shape)
        return out


def _ellipsoid_sdf(P, centre, semi, rot=None):
    """Approximate signed distance (mm) to an ellipsoid: (f − 1)/|∇f| with f = |Rᵀ(p−c)/a|."""
    d = [P[k] - np.float32(centre[k]) for k in range(3)]
    if rot is None:
        q = d
    else:
        r = np.asarray(rot, dtype=np.float32)
        q = [r[0, k] * d[0] + r[1, k] * d[1] + r[2, k] * d[2] for k in range(3)]
    a = np.asarray(semi, dtype=np.float32)
    f2 = (q[0] / a[0]) ** 2 + (q[1] / a[1]) ** 2 + (q[2] / a[2]) ** 2
    g2 = (q[0] / a[0] ** 2) ** 2 + (q[1] / a[1] ** 2) ** 2 + (q[2] / a[2] ** 2) ** 2
    f = np.sqrt(f2)
    grad = np.sqrt(g2) / np.maximum(f, np.float32(1e-6))
    grad = np.clip(grad, np.float32(1.0 / a.max()), np.float32(1.0 / a.min()))
    return (f - 1.0) / grad


def _polyline_distance(P, pts):
    """Distance (mm) from points P to a polyline with vertices ``pts`` (m, 3)."""
    best = None
    for a, b in zip(pts[:-1], pts[1:]):
        ab = (b - a).astype(np.float32)
        L2 = float(ab @ ab)
        d0, d1, d2 = P[0] - np.float32(a[0]), P[1] - np.float32(a[1]), P[2] - np.float32(a[2])
        if L2 < 1e-12:
            t = np.float32(0.0)
        else:
            t = np.clip((d0 * ab[0] + d1 * ab[1] + d2 * ab[2]) / np.float32(L2), 0.0, 1.0)
        e2 = (d0 - t * ab[0]) ** 2 + (d1 - t * ab[1]) ** 2 + (d2 - t * ab[2]) ** 2
        best = e2 if best is None else np.minimum(best, e2)
    return np.sqrt(best)


# ----------------------------------------------------------------------------------------------
# The random anatomy
# ----------------------------------------------------------------------------------------------

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

        # cortex and sulci: a ribbon under the surface, sulci at the zero sheets of band-limited noise
        depth = -brain
        g = A.gyri.sample(self.ax_u)
        grad = A.gyri_grad.sample(self.ax_u)
        s_sulc = np.abs(g) / np.maximum(grad, np.float32(0.05))
        del g, grad
        D = np.float32(A.depth_mean) + np.float32(3.0) * A.sulc_depth.sample(self.ax_u)
        D = np.clip(D, 5.0, 16.0)
        thk = np.float32(A.cortex)
        hw, hwf = np.float32(A.sulcus_hw), np.float32(A.fissure_hw)
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

        # ventricles, then deep grey matter
        for s in A.ventricles + A.deep:
            sdf, sl = self.shape_sdf(s)
            if sdf is not None:
                self.paint(s.label, self.alpha(sdf), sl)

        # veins (union per vein, painted once), chunked along the path for small bounding boxes
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

        # lesions
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
        return self


# ----------------------------------------------------------------------------------------------
# make_phantom
# ----------------------------------------------------------------------------------------------

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


def _axes_mm(shape, vs, s_fit):
    """Head-frame mm of the voxel centres of a grid centred on the field of view."""
    return [(np.arange(n) - (n - 1) / 2.0) * d / s_fit for n, d in zip(shape, vs)]


def _paint_grid(anat, shape, vs, s_fit, props, te=None, silent_veins=(), sub=None):
    """Paint the head on the voxel grid (shape, vs): voxel means over the supersampled points.

    Returns chi, labels (mode), tissue (fraction of textured tissue) and, with ``te`` given, the
    magnitude pd·exp(−te·R2*); without ``te``, pd, r2s and deep (fraction of deep grey matter).
    ``sub``: sample points per voxel along each axis (default :func:`_supersampling`).
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

    out = {"chi": np.empty(shape, np.float32), "labels": np.empty(shape, np.int16),
           "tissue": np.empty(shape, np.float32)}
    names = ("mag",) if te is not None else ("pd", "r2s", "deep")
    for nm in names:
        out[nm] = np.empty(shape, np.float32)
    F = int(np.prod(sub))
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
    """Smooth zero-mean χ texture (ppm) with correlation lengths of about 1.5 mm and 8 mm."""
    fine = rng_tex.standard_normal(shape).astype(np.float32)
    fine = ndimage.gaussian_filter(fine, 1.5 / (vs / s_fit), mode="reflect")
    fine /= max(float(fine.std()), 1e-12)
    coarse = _SmoothNoise(rng_tex, sigma=8.0, spacing=4.0).sample(ax_mm)
    return (np.float32(0.6) * fine + np.float32(0.8) * coarse) * np.float32(amp)


def _receive_bias(rng_tex, ax_mm):
    """Smooth coil-sensitivity factor (about 1 ± 0.1, brighter towards the periphery)."""
    bias_noise = _SmoothNoise(rng_tex, sigma=40.0, spacing=10.0).sample(ax_mm)
    r2 = sum((np.asarray(a, np.float32).reshape([-1 if k == i else 1 for k in range(3)]) / np.float32(h)) ** 2
             for i, (a, h) in enumerate(zip(ax_mm, _HEAD_EXTENT)))
    return (1.0 + np.float32(0.08) * bias_noise) * (1.0 + np.float32(0.15) * np.minimum(r2, 1.5))


def _block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over f×f×f blocks (the voxel average of the fine grid)."""
    if f == 1:
        return a
    n = a.shape
    return a.reshape(n[0] // f, f, n[1] // f, f, n[2] // f, f).mean(axis=(1, 3, 5))


def _fine_field(chi_f, vs_f, b0, device, support) -> np.ndarray:
    """D ∗ χ (ppm, D(0) = 0) on the fine grid, computed on the bounding box of ``support`` (+2 points).

    The box is zero-padded to a fast FFT size of at least 2x on every axis, and the kernel is
    applied slab by slab in place, so the peak memory is about one padded real and one half-grid
    complex array. Outside the box (outside the head's brain) the returned field is 0.
    """
    out = np.zeros(chi_f.shape, np.float32)
    lo, hi = [], []
    for k in range(3):
        idx = np.flatnonzero(support.any(axis=tuple(j for j in range(3) if j != k)))
        if idx.size == 0:
            return out
        lo.append(max(0, int(idx[0]) - 2))
        hi.append(min(chi_f.shape[k], int(idx[-1]) + 3))
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = np.ascontiguousarray(chi_f[box], dtype=np.float32)
    P = fast_shape(crop.shape, 2.0)
    dev = resolve_device(device)
    with torch.no_grad():
        x = torch.from_numpy(crop).to(dev)
        X = torch.fft.rfftn(x, s=P, dim=(0, 1, 2))
        del x
        for i0, i1, d in kernel_slabs(P, vs_f, b0, device=dev):
            X[i0:i1] *= d
        y = torch.fft.irfftn(X, s=P, dim=(0, 1, 2))
        del X
        out[box] = y[:crop.shape[0], :crop.shape[1], :crop.shape[2]].cpu().numpy()
    return out


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
    idx = np.nonzero(mask)
    A = np.stack([np.broadcast_to(t, shape)[idx] for t in _shim_basis(
        ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :], n_terms)], axis=1)
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
    half of the padding), so the cut adds no air interface the body lacks. The kernel is applied
    slab by slab in place: the peak is about one padded real and one half-grid complex array.
    """
    n = src.shape
    P = fast_shape(n, 2.0)
    dev = resolve_device(device)
    with torch.no_grad():
        x = torch.zeros(P, dtype=torch.float32, device=dev)
        x[:n[0], :n[1], :n[2]] = torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32))
        if np.any(src[:, :, 0]):  # the neck leaves through the bottom face: continue it below
            ext = min(int(round(extend_mm / float(vs_f[2]))), (P[2] - n[2]) // 2)
            if ext > 0:
                x[:n[0], :n[1], P[2] - ext:] = x[:n[0], :n[1], 0:1]
        X = torch.fft.rfftn(x, dim=(0, 1, 2))
        del x
        for i0, i1, d in kernel_slabs(P, vs_f, b0, device=dev):
            X[i0:i1] *= d
        y = torch.fft.irfftn(X, s=P, dim=(0, 1, 2))
        del X
        out = y[:n[0], :n[1], :n[2]].cpu().numpy().astype(np.float32, copy=True)
        del y
    return out


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


def edge_agreement(chi, magnitude, mask, voxel_size, chi_fraction: float = 0.1,
                   magnitude_fraction: float = 0.3) -> float:
    """Share of the strong χ edges that lie in the magnitude's edge set (0…1).

    Inside the once-eroded mask, the χ edges are the voxels whose forward-difference gradient norm
    (per mm) is in the top ``chi_fraction``; the magnitude edges are the top ``magnitude_fraction``
    of the magnitude's gradient norm (MEDI's gradient mask keeps about 30 %). A magnitude unrelated
    to χ scores about ``magnitude_fraction``; one whose edges are exactly χ's scores 1.
    """
    vs = check_voxel_size(voxel_size)
    region = ndimage.binary_erosion(np.asarray(mask, bool), iterations=1)
    if not region.any():
        raise ValueError("mask: empty after one erosion; nothing to compare")

    def edges(a, frac):
        a = np.asarray(a, np.float64)
        g2 = np.zeros(a.shape)
        for k in range(3):
            d = np.diff(a, axis=k, append=np.take(a, [-1], axis=k)) / vs[k]
            g2 += d * d
        g = np.sqrt(g2)
        return region & (g > np.quantile(g[region], 1.0 - frac))

    e_chi = edges(chi, chi_fraction)
    e_mag = edges(magnitude, magnitude_fraction)
    return float((e_chi & e_mag).sum() / max(int(e_chi.sum()), 1))


def make_phantom(shape=(160, 192, 160), voxel_size=(1.0, 1.0, 1.0), b0_direction=(0, 0, 1), seed=0,
                 snr: float | None = None, texture: bool = True, randomize: bool = True,
                 te: float = 0.02, b0_tesla: float = 3.0, device="auto", honest: bool = False,
                 echo_protocol: EchoProtocol | None = None, edit=None, keep_echoes: bool = False,
                 noise_seed: int | None = None, background: bool = False, shim_order: int | None = 2) -> Phantom:
    """Generate a seeded procedural head phantom (see the module docstring for the model).

    shape / voxel_size (mm): sampling grid. The head is centred in the field of view and scaled
    down if the field of view is smaller than the head.
    b0_direction: unit vector in the voxel frame; the returned affine is consistent with it.
    seed: the head (geometry, values, texture, lesion sites, veins, noise) is a function of it.
    snr: magnitude SNR at the mean in-mask magnitude (honest: of the first echo); None = noise-free.
    texture: add smooth χ texture (0.005–0.01 ppm) inside brain tissue.
    randomize: draw χ values in their ranges and jitter the anatomy. With False the χ values are
    the nominal ones and the anatomy keeps its nominal pose and sizes. The seed still sets the
    cortical folding, the veins, the lesion sites, the texture and the noise.
    te (s), b0_tesla (T): used by the magnitude contrast and the noise model (idealised mode).
    device: torch device for the forward model ("auto", "cpu", "cuda").
    honest: False (default) = the *idealised* phantom: field = the discrete forward model of χ on
    this very grid, magnitude edges = χ edges (texture included), exact noise map. True = the
    *honest* phantom for benchmarks (module docstring, "Honest mode"): χ and the field on a 2x finer
    grid, a multi-echo complex signal averaged within each voxel, complex noise, and the field,
    R2*, magnitude and N_std fitted from the echoes as a user gets them.
    echo_protocol (honest): :class:`EchoProtocol`; None = :func:`default_echo_protocol`.
    edit (honest): callable receiving the fine :class:`PhantomGrid` before the physics, to add
    structures the generator does not make (benchmarks); None = nothing.
    keep_echoes (honest): also return the simulated complex echoes (i, j, k, echo) in ``echoes``.
    noise_seed: None = the noise follows ``seed``; an int draws an independent noise realisation for
    the same head (e.g. one per orientation of a COSMOS acquisition).
    background (honest): the head sits in air with air cavities, its whole tissue a source of a
    background field (module docstring, "Head in air"); ``field`` is then the fitted TOTAL field and
    the truth is in ``true_local_field`` / ``true_total_field``. Without ``keep_echoes`` the echoes
    are still simulated (they are what the fit uses) but not returned.
    shim_order (background): the scanner's shim. The least-squares fit of the total field inside the
    brain mask by the solid harmonics up to this order (0, 1 or 2; 2 = a 3 T scanner's 2nd-order
    shim) is removed before the echoes are made; None = no shim. Shim fields are harmonic, so the
    local field truth does not change.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape: expected 3 positive sizes, got {shape!r}")
    vs = check_voxel_size(voxel_size)
    b0 = unit_vector(b0_direction)
    if snr is not None and not (np.isfinite(snr) and snr > 0):
        raise ValueError(f"snr: expected a positive number or None, got {snr!r}")
    if not (te > 0 and b0_tesla > 0):
        raise ValueError(f"te and b0_tesla must be positive (got te={te!r}, b0_tesla={b0_tesla!r})")
    if not honest and (edit is not None or keep_echoes or echo_protocol is not None):
        raise ValueError("edit, keep_echoes and echo_protocol need honest=True (the idealised phantom has no echoes)")
    if background and not honest:
        raise ValueError("background=True needs honest=True (the idealised phantom models the local field only)")
    if shim_order is not None and shim_order not in (0, 1, 2):
        raise ValueError(f"shim_order: expected 0, 1, 2 or None, got {shim_order!r}")
    seed = int(seed)

    ss = np.random.SeedSequence([seed, 20240611])
    rng_anat, rng_val, rng_tex, rng_noise = (np.random.default_rng(s) for s in ss.spawn(4))
    if noise_seed is not None:
        rng_noise = np.random.default_rng(np.random.SeedSequence([seed, 20240611, 2, int(noise_seed)]))

    # --- values ---------------------------------------------------------------------------
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

    # --- geometry ---------------------------------------------------------------------------
    anat = _Anatomy(rng_anat, randomize)
    fov_half = 0.5 * np.asarray(shape) * vs
    s_fit = float(min(1.0, np.min(fov_half / (_HEAD_EXTENT * 1.06 + 3.0))))  # room for the random scale
    if s_fit < 0.25:
        raise ValueError(
            f"shape x voxel_size: the field of view {tuple(np.round(2 * fov_half, 1))} mm is too small for a "
            f"head (the head is scaled to fit the field of view; each axis needs at least about 40 mm). "
            f"Generate a larger phantom and crop it for partial coverage.")
    common = dict(label_names=dict(LABEL_NAMES), voxel_size=tuple(float(v) for v in vs),
                  b0_direction=b0.astype(np.float64), affine=affine_for(shape, vs, b0), b0_tesla=float(b0_tesla),
                  snr=None if snr is None else float(snr), seed=seed, label_chi=label_chi,
                  texture=bool(texture), randomize=bool(randomize))
    if honest:
        protocol = (echo_protocol or default_echo_protocol(vs)).check()
        return _make_honest(shape, vs, b0, seed, snr, texture, randomize, b0_tesla, device, anat, s_fit, props,
                            tex_amp, rng_tex, rng_noise, protocol, edit, keep_echoes, common, bool(background),
                            shim_order)

    g = _paint_grid(anat, shape, vs, s_fit, props, te=te)
    chi, mag, labels, tissue = g["chi"], g["mag"], g["labels"], g["tissue"]
    del g
    mask = np.isin(labels, BRAIN_LABELS)

    # --- texture (χ and a matching R2* modulation of the magnitude) ----------------------------
    ax_mm = _axes_mm(shape, vs, s_fit)
    if texture:
        tex = _texture(rng_tex, shape, vs, s_fit, tex_amp, ax_mm)
        tex *= tissue
        chi += tex
        mag *= np.exp(-np.float32(te * _R2S_PER_PPM) * tex)
        del tex
    chi[~mask] = 0.0

    # --- smooth receive bias on the magnitude ------------------------------------------------------
    mag *= _receive_bias(rng_tex, ax_mm)
    mag = np.maximum(mag, 0.0).astype(np.float32)

    # --- field and noise -------------------------------------------------------------------------
    fld = forward_field(chi, vs, b0, device=device)
    fld *= mask
    noise_std = None
    if snr is not None:
        mean_mag = float(mag[mask].mean()) if mask.any() else float(mag.mean())
        mean_mag = mean_mag if mean_mag > 0 else 1.0
        sig_phi = np.minimum(1.0, mean_mag / (float(snr) * np.maximum(mag, 1e-12)))
        scale = 1e6 / (2.0 * np.pi * GAMMA_BAR * float(b0_tesla) * float(te))
        noise_std = (sig_phi * scale).astype(np.float32)
        fld += (rng_noise.standard_normal(shape).astype(np.float32) * noise_std) * mask
        sig_m = np.float32(mean_mag / float(snr))
        n1 = rng_noise.standard_normal(shape).astype(np.float32) * sig_m
        n2 = rng_noise.standard_normal(shape).astype(np.float32) * sig_m
        mag = np.sqrt((mag + n1) ** 2 + n2 ** 2).astype(np.float32)

    return Phantom(chi=chi.astype(np.float32), field=fld.astype(np.float32), mask=mask, magnitude=mag,
                   labels=labels.astype(np.int16), noise_std=noise_std, te=float(te), **common)


def _make_honest(shape, vs, b0, seed, snr, texture, randomize, b0_tesla, device, anat, s_fit, props, tex_amp,
                 rng_tex, rng_noise, protocol, edit, keep_echoes, common, background=False, shim_order=2) -> Phantom:
    """The honest phantom (module docstring, "Honest mode")."""
    f = _HONEST_FACTOR
    fshape = tuple(f * n for n in shape)
    fvs = vs / f
    rng_vein, rng_iron, rng_wmh, rng_mtex, rng_phase = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, 20240611, 1]).spawn(5))

    # veins without a magnitude edge: each non-sinus vein with probability 1/2 (at least one)
    n_tubes = len(anat.tubes)
    silent = [t for t in range(1, n_tubes) if rng_vein.random() < 0.5]
    if not silent and n_tubes > 1:
        silent = [int(rng_vein.integers(1, n_tubes))]

    # thick voxels: the fine grid already halves them, so half the usual supersampling keeps the
    # same number of samples per voxel along the thick axis as the idealised phantom
    sub = tuple(max(1, k // f) for k in _supersampling(fvs))
    g = _paint_grid(anat, fshape, fvs, s_fit, props, te=None, silent_veins=silent, sub=sub)
    chi_f, pd_f, r2s_f, lab_f = g["chi"], g["pd"], g["r2s"], g["labels"]
    tissue_f, deep_f = g["tissue"], g["deep"]
    del g
    mask_f = np.isin(lab_f, BRAIN_LABELS)
    ax_mm = _axes_mm(fshape, fvs, s_fit)
    cavities, bg_chi, cavity_mask, cav_f = [], {}, None, None
    if background:  # air cavities out of skull and scalp (own random stream: the rest is unchanged)
        rng_bg = np.random.default_rng(np.random.SeedSequence([seed, 20240611, 3]))
        skull = float(rng_bg.uniform(SKULL_VS_WATER[0], SKULL_VS_WATER[2])) if randomize else SKULL_VS_WATER[1]
        bg_chi = {"reference": "air", "tissue": round(TISSUE_VS_AIR, 4), "skull": round(TISSUE_VS_AIR + skull, 4),
                  "air": 0.0, "water_si": CHI_WATER, "air_si": CHI_AIR,
                  "brain": "tissue + chi (brain χ relative to CSF)"}
        cav_f = np.zeros(fshape, bool)
        cavities = _carve_cavities(anat, rng_bg, randomize, ax_mm, lab_f, pd_f, cav_f)
        n0_, n1_, n2_ = shape
        cavity_mask = cav_f.reshape(n0_, f, n1_, f, n2_, f).any(axis=(1, 3, 5))

    # χ-only structure: texture and iron gradients inside deep grey matter (no magnitude change)
    if texture:
        tex = _texture(rng_tex, fshape, fvs, s_fit, tex_amp, ax_mm)
        tex *= tissue_f
        chi_f += tex
        del tex
    iron_amp = float(rng_iron.uniform(0.015, 0.03)) if randomize else 0.02
    iron = _SmoothNoise(rng_iron, sigma=5.0, spacing=2.5).sample(ax_mm)
    iron *= deep_f
    chi_f += np.float32(iron_amp) * iron
    del iron, deep_f

    # magnitude-only structure: its own PD and R2* texture, white-matter-hyperintensity-like PD blobs
    mtex = _SmoothNoise(rng_mtex, sigma=2.5, spacing=1.25).sample(ax_mm)
    mtex *= tissue_f
    pd_f *= 1.0 + np.float32(0.03) * mtex
    mtex = _SmoothNoise(rng_mtex, sigma=5.0, spacing=2.5).sample(ax_mm)
    mtex *= tissue_f
    r2s_f += np.float32(1.5) * mtex
    del mtex, tissue_f
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
    del wm_idx
    pd_f *= _receive_bias(rng_tex, ax_mm)
    chi_f[~mask_f] = 0.0

    if edit is not None:
        grid = PhantomGrid(shape=fshape, voxel_size=tuple(float(v) for v in fvs), factor=f, chi=chi_f, pd=pd_f,
                           r2s=r2s_f, labels=lab_f, mask=mask_f)
        edit(grid)
        chi_f = np.asarray(grid.chi, np.float32)
        pd_f = np.asarray(grid.pd, np.float32)
        r2s_f = np.asarray(grid.r2s, np.float32)
        for nm, a in (("chi", chi_f), ("pd", pd_f), ("r2s", r2s_f)):
            if a.shape != fshape:
                raise ValueError(f"edit: PhantomGrid.{nm} changed shape to {a.shape}, expected {fshape}")
    np.maximum(pd_f, 0.0, out=pd_f)
    np.maximum(r2s_f, 0.0, out=r2s_f)

    # background=True: χ relative to air on the fine grid (tissue −9.41, skull a bit lower, air 0)
    src_bg = None
    if background:
        src_bg = np.where((lab_f > 0) & ~cav_f, np.float32(TISSUE_VS_AIR), np.float32(0.0)).astype(np.float32)
        src_bg[(lab_f == 14) & ~cav_f] += np.float32(bg_chi["skull"] - TISSUE_VS_AIR)

    # voxel grid: χ truth (voxel mean), labels (mode of the 8 sub-points), mask
    chi = _block_mean(chi_f, f).astype(np.float32)
    n0, n1, n2 = shape
    lab_sub = lab_f.reshape(n0, f, n1, f, n2, f).transpose(0, 2, 4, 1, 3, 5).reshape(n0, n1, n2, f ** 3)
    labels = _label_mode(lab_sub).astype(np.int16)
    del lab_sub, lab_f
    if cav_f is not None:  # voxels that are mostly air cavity (never brain: cavities replace skull/scalp only)
        labels[(_block_mean(cav_f.astype(np.float32), f) >= 0.5) & np.isin(labels, (14, 15))] = 0
        del cav_f
    mask = np.isin(labels, BRAIN_LABELS)
    chi[~mask] = 0.0

    # field on the fine grid (D(0) = 0, ≥ 2x padding), then the voxel mean as the true local field
    support = mask_f | np.repeat(np.repeat(np.repeat(mask, f, 0), f, 1), f, 2)
    del mask_f
    fld_f = _fine_field(chi_f, fvs, b0, device, support)
    del support
    true_field = (_block_mean(fld_f, f) * mask).astype(np.float32)
    true_local, true_total = true_field, true_field
    if background:  # the total field of the head in air: brain χ + tissue/skull/air, over the whole FOV
        src_bg += chi_f
        del chi_f
        fld_f = _head_field(src_bg, fvs, b0, device)
        del src_bg
        if shim_order is not None:  # the scanner's shim (harmonic: the local field is unchanged)
            coef = _shim(fld_f, _block_mean(fld_f, f), mask, shim_order, vs, f)
            bg_chi["shim"] = {"order": int(shim_order), "coefficients_ppm": [round(float(c), 5) for c in coef],
                              "basis": list(_SHIM_BASIS[:_SHIM_TERMS[shim_order]]), "r0_mm": _SHIM_R0}
        true_total = _block_mean(fld_f, f).astype(np.float32)
        true_field = (true_total * mask).astype(np.float32)
    else:
        del chi_f

    # complex multi-echo signal per fine point, averaged within each voxel (intra-voxel dephasing)
    tes = protocol.echo_times
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
    del pd_f, r2s_f, fld_f

    sigma = None
    if snr is not None:
        m1 = np.abs(S[..., 0])
        mean_mag = float(m1[mask].mean()) if mask.any() else float(m1.mean())
        sig = np.float32((mean_mag if mean_mag > 0 else 1.0) / float(snr))
        for e in range(len(tes)):
            S[..., e] += sig * (rng_noise.standard_normal(shape, np.float32)
                                + 1j * rng_noise.standard_normal(shape, np.float32))
        sigma = _background_sigma(S)
    fld, r2star, rss, noise_std = _fit_echoes(S, protocol, b0_tesla, sigma)
    fld *= mask
    return Phantom(chi=chi, field=fld.astype(np.float32), mask=mask, magnitude=rss, labels=labels,
                   noise_std=noise_std, te=float(protocol.delta_te), simulation="honest", true_field=true_field,
                   r2star=r2star, echo_times=tes, echo_protocol=protocol.name, noise_sigma=sigma,
                   echoes=S if keep_echoes else None, silent_veins=len(silent), wmh=wmh, background=bool(background),
                   true_local_field=true_local, true_total_field=true_total, cavities=cavities,
                   background_chi=bg_chi, cavity_mask=cavity_mask, **common)
