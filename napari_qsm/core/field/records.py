"""The two records that flow through the front end: :class:`Echoes` (raw multi-echo GRE) and
:class:`TotalField` (the echo fit's output).

Both are small frozen dataclasses validated once at construction; arrays are float32 in the
canonical voxel frame (i, j, k) of ``nib.as_closest_canonical``; ``voxel_size`` (mm) and
``b0_direction`` (unit vector, scanner z in voxel coordinates, from the affine via
:func:`napari_qsm.core.io.b0_from_affine` unless given) are in that same frame. ``nifti_info``
(original affine, orientation, header; see :func:`napari_qsm.core.io.read_volume`) lets results be
written back on the input's grid with :func:`napari_qsm.core.io.save_volume`.

Units: TE in seconds, B0 in tesla, phase in radians, fields and N_std in ppm of B0, R2* in 1/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from ..constants import GAMMA_BAR_MHZ_PER_T
from ..io import b0_from_affine, voxel_sizes
from ..scan import ScanError

__all__ = ["Echoes", "TotalField", "GAMMA_BAR_MHZ_PER_T"]


def _arr4(name: str, a, n_echo: Optional[int] = None) -> np.ndarray:
    if a is None:
        raise ScanError(f"{name}: missing")
    a = np.asarray(a)
    if np.iscomplexobj(a):
        raise ScanError(f"{name}: complex array given; expected real values (use Echoes.from_complex)")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.size == 0:
        raise ScanError(f"{name}: expected a 4-D array (i, j, k, echo), got shape {a.shape}")
    if n_echo is not None and a.shape[3] != n_echo:
        raise ScanError(f"{name}: {a.shape[3]} echoes, expected {n_echo}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise ScanError(f"{name}: {bad} NaN/Inf values; expected finite numbers")
    return a


def _arr3(name: str, a, shape, dtype=np.float32, optional: bool = False) -> Optional[np.ndarray]:
    if a is None:
        if optional:
            return None
        raise ScanError(f"{name}: missing")
    a = np.asarray(a)
    if a.shape != tuple(shape):
        raise ScanError(f"{name}: shape {a.shape} does not match the echoes' {tuple(shape)}")
    a = np.ascontiguousarray(a, dtype=dtype)
    if dtype != bool and not np.all(np.isfinite(a)):
        raise ScanError(f"{name}: NaN/Inf values; expected finite numbers")
    return a


def _geometry(shape3, affine, voxel_size, b0_direction):
    aff = None if affine is None else np.asarray(affine, dtype=np.float64)
    if aff is not None and aff.shape != (4, 4):
        raise ScanError(f"affine: expected 4x4, got shape {aff.shape}")
    if voxel_size is None:
        vs = voxel_sizes(aff) if aff is not None else np.ones(3)
    else:
        vs = np.asarray(voxel_size, dtype=np.float64).reshape(-1)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ScanError(f"voxel_size: expected three positive numbers (mm), got {voxel_size!r}")
    if b0_direction is None:
        b = b0_from_affine(aff) if aff is not None else np.array([0.0, 0.0, 1.0])
    else:
        b = np.asarray(b0_direction, dtype=np.float64).reshape(-1)
        if b.shape != (3,) or not np.all(np.isfinite(b)) or np.linalg.norm(b) == 0:
            raise ScanError(f"b0_direction: expected three finite numbers, not all zero, got {b0_direction!r}")
        b = b / np.linalg.norm(b)
    if aff is None:
        aff = np.diag(list(vs) + [1.0])
    return aff, tuple(float(v) for v in vs), b


@dataclass(frozen=True, eq=False)
class Echoes:
    """Multi-echo GRE data in the canonical voxel frame.

    magnitude, phase: (i, j, k, echo) float32; phase in radians (already scaled, sign applied).
    te: echo times (s), strictly increasing. b0_tesla: field strength (T).
    affine: canonical affine; voxel_size (mm) and b0_direction default to the affine's.
    vendor: facts found while loading (manufacturer, phase_units and how they were found,
    phase scale factor, header scaling, b0/te sources, warnings) — reported, never guessed silently.
    sources: the input paths. nifti_info: for writing results back on the input's grid.
    """

    magnitude: np.ndarray
    phase: np.ndarray
    te: tuple
    b0_tesla: float
    affine: Optional[np.ndarray] = None
    voxel_size: Optional[tuple] = None
    b0_direction: Optional[np.ndarray] = None
    vendor: dict = field(default_factory=dict)
    sources: tuple = ()
    nifti_info: Optional[dict] = None
    name: str = "echoes"

    def __post_init__(self) -> None:
        mag = _arr4("magnitude", self.magnitude)
        ph = _arr4("phase", self.phase)
        if ph.shape[3] != mag.shape[3]:
            raise ScanError(f"phase: {ph.shape[3]} echoes but magnitude has {mag.shape[3]}; expected one phase "
                            "per magnitude echo")
        if ph.shape != mag.shape:
            raise ScanError(f"phase: shape {ph.shape} does not match the magnitude's {mag.shape}")
        if np.any(mag < 0):
            raise ScanError("magnitude: negative values; expected magnitudes >= 0")
        for e in range(mag.shape[3]):
            if not np.any(mag[..., e]):
                raise ScanError(f"magnitude: echo {e + 1} is all zero")
        try:
            te = tuple(float(t) for t in np.asarray(self.te, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise ScanError(f"te: expected numbers (seconds), got {self.te!r}") from None
        if len(te) != mag.shape[3]:
            raise ScanError(f"te: {len(te)} echo times for {mag.shape[3]} echoes")
        if not all(np.isfinite(t) and t > 0 for t in te):
            raise ScanError(f"te: expected positive finite echo times in seconds, got {te}")
        if any(b <= a for a, b in zip(te, te[1:])):
            raise ScanError(f"te: echo times must be strictly increasing, got {te}")
        if max(te) > 1.0:
            raise ScanError(f"te: {te} look like milliseconds; expected seconds")
        try:
            b0 = float(self.b0_tesla)
        except (TypeError, ValueError):
            raise ScanError(f"b0_tesla: expected a number (tesla), got {self.b0_tesla!r}") from None
        if not np.isfinite(b0) or b0 <= 0:
            raise ScanError(f"b0_tesla: expected a positive field strength in tesla, got {self.b0_tesla!r}")
        aff, vs, bdir = _geometry(mag.shape[:3], self.affine, self.voxel_size, self.b0_direction)
        for k, v in (("magnitude", mag), ("phase", ph), ("te", te), ("b0_tesla", b0), ("affine", aff),
                     ("voxel_size", vs), ("b0_direction", bdir), ("vendor", dict(self.vendor or {})),
                     ("sources", tuple(str(s) for s in (self.sources or ())))):
            object.__setattr__(self, k, v)

    @classmethod
    def from_complex(cls, data, te, b0_tesla, **kw) -> "Echoes":
        """From complex echoes (i, j, k, echo)."""
        d = np.asarray(data)
        if d.ndim == 3:
            d = d[..., None]
        if not np.all(np.isfinite(d)):
            raise ScanError("echoes: NaN/Inf values in the complex data")
        return cls(magnitude=np.abs(d).astype(np.float32), phase=np.angle(d).astype(np.float32), te=te,
                   b0_tesla=b0_tesla, **kw)

    @property
    def shape(self) -> tuple:
        return tuple(self.magnitude.shape[:3])

    @property
    def n_echoes(self) -> int:
        return int(self.magnitude.shape[3])

    def complex(self) -> np.ndarray:
        """Complex echoes (i, j, k, echo), complex64."""
        return (self.magnitude * np.exp(1j * self.phase)).astype(np.complex64)

    def with_phase(self, phase, **vendor_notes) -> "Echoes":
        """A copy with another phase (e.g. offsets removed); vendor notes are added."""
        v = dict(self.vendor)
        v.update(vendor_notes)
        return replace(self, phase=phase, vendor=v)

    def info(self) -> dict:
        """JSON-friendly description (for provenance)."""
        return {"name": self.name, "shape": list(self.shape), "n_echoes": self.n_echoes,
                "te": list(self.te), "b0_tesla": self.b0_tesla, "voxel_size": list(self.voxel_size),
                "b0_direction": [float(x) for x in self.b0_direction], "vendor": dict(self.vendor),
                "sources": list(self.sources)}


@dataclass(frozen=True, eq=False)
class TotalField:
    """The echo fit's output, on the echoes' grid.

    field: total field (ppm of B0). noise_std: its standard deviation (ppm). r2star: 1/s.
    magnitude: combined magnitude (root sum of squares over echoes). mask: optional (bool).
    wrapped: True when ``field`` may hold 2π wraps of the phase ``field · rad_per_ppm`` (the fit
    was made from wrapped phase; spatial unwrapping comes next), period ``wrap_period_ppm``.
    phase_offset: the removed/fitted receive-phase offset (rad), when known.
    misfit: the fit's reduced χ² per voxel (≈ 1 for noise only), when the fit had more than 2 echoes.
    provenance: method, parameters, noise σ and its source, seconds, the echoes' info.
    """

    field: np.ndarray
    noise_std: np.ndarray
    r2star: np.ndarray
    magnitude: np.ndarray
    te: tuple
    b0_tesla: float
    delta_te: float
    mask: Optional[np.ndarray] = None
    wrapped: bool = False
    phase_offset: Optional[np.ndarray] = None
    affine: Optional[np.ndarray] = None
    voxel_size: Optional[tuple] = None
    b0_direction: Optional[np.ndarray] = None
    nifti_info: Optional[dict] = None
    name: str = "field"
    provenance: dict = field(default_factory=dict)
    #: the echo fit's misfit per voxel: weighted squared phase residual / (σ²·(echoes − 2)), about 1 where
    #: the phase is linear in TE; large where it is not (intra-voxel dephasing, noise, flow). None: unknown
    misfit: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        f = np.asarray(self.field)
        if f.ndim != 3 or f.size == 0:
            raise ScanError(f"field: expected a 3-D volume, got shape {f.shape}")
        shape = f.shape
        object.__setattr__(self, "field", _arr3("field", f, shape))
        for k in ("noise_std", "r2star", "magnitude"):
            object.__setattr__(self, k, _arr3(k, getattr(self, k), shape))
        object.__setattr__(self, "mask", _arr3("mask", self.mask, shape, dtype=bool, optional=True))
        object.__setattr__(self, "phase_offset", _arr3("phase_offset", self.phase_offset, shape, optional=True))
        object.__setattr__(self, "misfit", _arr3("misfit", self.misfit, shape, optional=True))
        b0 = float(self.b0_tesla)
        dte = float(self.delta_te)
        if not (np.isfinite(b0) and b0 > 0):
            raise ScanError(f"b0_tesla: expected a positive field strength in tesla, got {self.b0_tesla!r}")
        if not (np.isfinite(dte) and dte > 0):
            raise ScanError(f"delta_te: expected a positive echo spacing in seconds, got {self.delta_te!r}")
        aff, vs, bdir = _geometry(shape, self.affine, self.voxel_size, self.b0_direction)
        for k, v in (("b0_tesla", b0), ("delta_te", dte), ("te", tuple(float(t) for t in self.te)),
                     ("affine", aff), ("voxel_size", vs), ("b0_direction", bdir), ("wrapped", bool(self.wrapped)),
                     ("provenance", dict(self.provenance or {}))):
            object.__setattr__(self, k, v)

    @property
    def shape(self) -> tuple:
        return tuple(self.field.shape)

    @property
    def report(self) -> str:
        """One line: phase units and why, B0, TE, noise σ and its source (the fit's ``provenance["report"]``)."""
        return str(self.provenance.get("report", ""))

    @property
    def rad_per_ppm(self) -> float:
        """Phase (rad) accumulated over ΔTE by 1 ppm: 2π·γ̄·B0·ΔTE (γ̄ in Hz/T)."""
        return float(2.0 * np.pi * GAMMA_BAR_MHZ_PER_T * self.b0_tesla * self.delta_te)

    @property
    def wrap_period_ppm(self) -> float:
        """Field difference (ppm) that is one 2π wrap of the phase over ΔTE: 1/(γ̄·B0·ΔTE)."""
        return float(2.0 * np.pi / self.rad_per_ppm)

    def replace(self, **changes) -> "TotalField":
        return replace(self, **changes)
