"""Seeded procedural head phantoms: susceptibility, local field, magnitude, labels and mask.

:func:`make_phantom` is the entry point (tests, sample data, network training, benchmarks). The work
is split by concern: :mod:`.anatomy` (labels, values, shapes), :mod:`.paint` (sampling on a grid),
:mod:`.signal` (honest physics: fine grid, background field, echoes, noise, fit), :mod:`.writers`
(NIfTI and raw BIDS) and :mod:`.geometry`. The model, its values and its references are in
docs/phantom.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field as dc_field

import numpy as np
from scipy import ndimage

from ..constants import GAMMA_BAR_HZ_PER_T
from ..dipole import check_voxel_size, forward_field, unit_vector
from .anatomy import (BRAIN_LABELS, CHI_RANGES, LABEL_NAMES, _R2S_PER_PPM, _Anatomy, _draw_values,
                      _fit_scale)
from .geometry import affine_for, oblique_direction
from .paint import _axes_mm, _paint_grid, _receive_bias, _texture
from .signal import (CHI_AIR, CHI_WATER, CLINICAL_ECHOES, RESEARCH_ECHOES, SKULL_VS_WATER, TISSUE_VS_AIR,
                     EchoProtocol, PhantomGrid, _make_honest, default_echo_protocol)
from .writers import save_phantom, save_raw_bids

__all__ = [
    "Phantom", "make_phantom", "oblique_direction", "save_phantom", "affine_for",
    "CLINICAL", "RESEARCH", "LABEL_NAMES", "BRAIN_LABELS", "CHI_RANGES", "GAMMA_BAR",
    "EchoProtocol", "CLINICAL_ECHOES", "RESEARCH_ECHOES", "default_echo_protocol", "PhantomGrid",
    "edge_agreement", "save_raw_bids", "TISSUE_VS_AIR", "SKULL_VS_WATER", "CHI_WATER", "CHI_AIR",
]

GAMMA_BAR = GAMMA_BAR_HZ_PER_T  # Hz/T (γ/2π of the proton), kept under its old public name

CLINICAL = dict(shape=(192, 224, 48), voxel_size=(0.75, 0.75, 3.0))
RESEARCH = dict(shape=(160, 192, 160), voxel_size=(1.0, 1.0, 1.0))


@dataclass
class Phantom:
    """One generated head (the model and the χ values: docs/phantom.md).

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
    """Generate a seeded procedural head phantom.

    The anatomy is defined in physical millimetres and sampled at the voxel centres, so any matrix,
    voxel size and B0 direction works; the same seed gives the same head at every resolution. The
    model, the χ table and the honest mode are described in docs/phantom.md.

    Parameters
    ----------
    shape : tuple of 3 int
        Matrix size. The head is centred in the field of view and scaled down when the field of
        view is smaller than the head (each axis needs at least about 40 mm).
    voxel_size : tuple of 3 float
        Voxel size in mm.
    b0_direction : array_like of 3 float
        B0 direction in the voxel frame (normalised); the returned affine is consistent with it.
    seed : int
        The head (geometry, values, texture, lesion sites, veins, noise) is a function of it.
    snr : float or None
        Magnitude SNR at the mean in-mask magnitude (honest: of the first echo); None = noise-free.
    texture : bool
        Add smooth χ texture (0.005–0.01 ppm) inside brain tissue.
    randomize : bool
        Draw χ values in their ranges and jitter the anatomy. False keeps the nominal values, pose
        and sizes; the seed still sets the folding, veins, lesion sites, texture and noise.
    te, b0_tesla : float
        Echo time (s) and field strength (T) of the magnitude contrast and noise model (idealised).
    device : str
        Torch device of the forward model ("auto", "cpu", "cuda").
    honest : bool
        False: the *idealised* phantom (field = the discrete forward model of χ on this grid,
        magnitude edges = χ edges, exact noise map). True: the *honest* phantom for benchmarks (χ and
        field on a 2x finer grid, multi-echo complex signal averaged within each voxel, complex noise;
        field, R2*, magnitude and N_std fitted from the echoes as a user gets them).
    echo_protocol : EchoProtocol or None
        Honest only; None = :func:`default_echo_protocol` of ``voxel_size``.
    edit : callable or None
        Honest only; receives the fine :class:`PhantomGrid` before the physics (benchmarks add
        structures the generator does not make).
    keep_echoes : bool
        Honest only; also return the complex echoes (i, j, k, echo) in ``echoes``.
    noise_seed : int or None
        None = the noise follows ``seed``; an int draws an independent noise realisation of the same
        head (e.g. one per orientation of a COSMOS acquisition).
    background : bool
        Honest only; the head sits in air with air cavities and its tissue is a source of a
        background field. ``field`` is then the fitted TOTAL field (wrapped) and the truth is in
        ``true_local_field`` / ``true_total_field``.
    shim_order : {0, 1, 2} or None
        Background only; the least-squares solid-harmonic fit of the total field in the brain mask
        up to this order (2 = a 3 T scanner's shim) is removed before the echoes are made; None = no
        shim. Shim fields are harmonic, so the local field truth does not change.

    Returns
    -------
    Phantom
        χ (ppm, relative to CSF, 0 outside the brain), field (ppm), mask, magnitude, labels,
        noise_std (ppm; None without ``snr``), affine and the truth and facts of the simulation.

    References
    ----------
    .. [1] Deistung A, et al. Toward in vivo histology: a comparison of quantitative susceptibility
           mapping (QSM) with magnitude-, phase-, and R2*-imaging at ultra-high magnetic field
           strength. NeuroImage 65:299-314 (2013).
    .. [2] Marques JP, et al. QSM reconstruction challenge 2.0: a realistic in silico head phantom
           for MRI data simulation and evaluation of susceptibility mapping procedures. Magn Reson
           Med 86:526-542 (2021).
    .. [3] Schenck JF. The role of magnetic susceptibility in magnetic resonance imaging: MRI
           magnetic compatibility of the first and second kinds. Med Phys 23:815-850 (1996).
    """
    shape, vs, b0 = _check_args(shape, voxel_size, b0_direction, snr, te, b0_tesla, honest, edit, keep_echoes,
                                echo_protocol, background, shim_order)
    seed = int(seed)
    ss = np.random.SeedSequence([seed, 20240611])
    rng_anat, rng_val, rng_tex, rng_noise = (np.random.default_rng(s) for s in ss.spawn(4))
    if noise_seed is not None:
        rng_noise = np.random.default_rng(np.random.SeedSequence([seed, 20240611, 2, int(noise_seed)]))
    label_chi, props, tex_amp = _draw_values(rng_val, randomize)
    anat = _Anatomy(rng_anat, randomize)
    s_fit = _fit_scale(shape, vs)
    common = dict(label_names=dict(LABEL_NAMES), voxel_size=tuple(float(v) for v in vs),
                  b0_direction=b0.astype(np.float64), affine=affine_for(shape, vs, b0), b0_tesla=float(b0_tesla),
                  snr=None if snr is None else float(snr), seed=seed, label_chi=label_chi,
                  texture=bool(texture), randomize=bool(randomize))
    if honest:
        protocol = (echo_protocol or default_echo_protocol(vs)).check()
        return Phantom(**_make_honest(shape, vs, b0, seed, snr, texture, randomize, b0_tesla, device, anat, s_fit,
                                      props, tex_amp, rng_tex, rng_noise, protocol, edit, keep_echoes,
                                      bool(background), shim_order), **common)
    return _make_idealised(shape, vs, b0, snr, texture, te, b0_tesla, device, anat, s_fit, props, tex_amp,
                           rng_tex, rng_noise, common)


def _check_args(shape, voxel_size, b0_direction, snr, te, b0_tesla, honest, edit, keep_echoes, echo_protocol,
                background, shim_order):
    """Validated (shape, voxel size, unit B0 direction) of :func:`make_phantom`; errors name the argument."""
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
    return shape, vs, b0


def _make_idealised(shape, vs, b0, snr, texture, te, b0_tesla, device, anat, s_fit, props, tex_amp, rng_tex,
                    rng_noise, common) -> Phantom:
    """The idealised phantom: field = the discrete forward model of χ on this grid, exact noise map."""
    g = _paint_grid(anat, shape, vs, s_fit, props, te=te)
    chi, mag, labels, tissue = g["chi"], g["mag"], g["labels"], g["tissue"]
    del g
    mask = np.isin(labels, BRAIN_LABELS)

    # texture (χ and a matching R2* modulation of the magnitude), smooth receive bias on the magnitude
    ax_mm = _axes_mm(shape, vs, s_fit)
    if texture:
        tex = _texture(rng_tex, shape, vs, s_fit, tex_amp, ax_mm)
        tex *= tissue
        chi += tex
        mag *= np.exp(-np.float32(te * _R2S_PER_PPM) * tex)
        del tex
    chi[~mask] = 0.0
    mag *= _receive_bias(rng_tex, ax_mm)
    mag = np.maximum(mag, 0.0).astype(np.float32)

    # field and noise
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
