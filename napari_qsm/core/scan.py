"""Scan: the inputs of a reconstruction, validated once.

A :class:`Scan` holds the local field (ppm), brain mask, optional magnitude, noise map (ppm) and
R2* map (s⁻¹, from the echo fit; MEDI+0 finds CSF in it), voxel
size (mm) and B0 direction (unit vector), all in the scan's own voxel frame (i, j, k) after
``nib.as_closest_canonical``; plus the affine and the source description for provenance.
Validation errors name the input and say what was expected. Inputs are never modified: the
scan keeps its own float32 / bool copies.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .dipole import check_voxel_size, unit_vector


class ScanError(ValueError):
    """Invalid scan input; the message names the input and what was expected."""


def _as_3d(name: str, arr, dtype) -> np.ndarray:
    if arr is None:
        raise ScanError(f"{name}: missing")
    a = np.asarray(arr)
    if a.ndim == 4 and a.shape[3] == 1:
        a = a[..., 0]
    if a.ndim != 3:
        hint = " (4-D multi-echo data: choose an echo)" if a.ndim == 4 else ""
        raise ScanError(f"{name}: expected a 3-D volume, got {a.ndim}-D array of shape {a.shape}{hint}")
    if a.size == 0:
        raise ScanError(f"{name}: empty array of shape {a.shape}")
    if np.iscomplexobj(a):
        raise ScanError(f"{name}: complex data given; expected a real-valued volume")
    return np.array(a, dtype=dtype, copy=True)


@dataclass
class Scan:
    """The inputs of one reconstruction, validated once (arrays in the scan's voxel frame (i, j, k)).

    Parameters
    ----------
    field : ndarray, shape (X, Y, Z)
        Local field in ppm of B0. NaN/Inf outside the mask are set to 0; inside they are an error.
    mask : ndarray, shape (X, Y, Z)
        Brain mask (voxels > 0.5); must not be empty.
    voxel_size : tuple of 3 float
        Voxel size in mm.
    b0_direction : array_like of 3 float
        B0 direction in the voxel frame (normalised here).
    magnitude, noise_std, r2star : ndarray or None
        Optional maps on the same grid: magnitude (a.u.), field noise σ (ppm), R2* (1/s).
    affine : ndarray, shape (4, 4), or None
        Voxel → scanner (mm) affine of the canonical (RAS+) voxel order.
    te, b0_tesla : float or None
        Echo time (s) and field strength (T), when known (positive).
    name : str
        Shown in messages and provenance.
    source : dict
        Where the inputs came from (paths, units, the source of B0 and TE), for provenance.
    nifti_info : dict or None
        Set by the NIfTI readers (:func:`napari_qsm.core.io.read_volume`): the source file's path,
        ``original_affine``, orientation ``ornt`` and ``header``, so that results are written back on
        the file's own grid and orientation (:func:`napari_qsm.core.io.save_volume`). None for scans
        made in memory.

    Raises
    ------
    ScanError
        An input has the wrong shape or type, holds NaN/Inf inside the mask, or the mask is empty;
        the message names the input.
    """

    field: np.ndarray
    mask: np.ndarray
    voxel_size: tuple = (1.0, 1.0, 1.0)
    b0_direction: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))
    magnitude: Optional[np.ndarray] = None
    noise_std: Optional[np.ndarray] = None
    r2star: Optional[np.ndarray] = None
    affine: Optional[np.ndarray] = None
    te: Optional[float] = None
    b0_tesla: Optional[float] = None
    name: str = "scan"
    source: dict = field(default_factory=dict)
    nifti_info: Optional[dict] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.field = _as_3d("field", self.field, np.float32)
        mask = _as_3d("mask", self.mask, np.float32)
        if mask.shape != self.field.shape:
            raise ScanError(f"mask: shape {mask.shape} does not match field shape {self.field.shape}")
        if not np.all(np.isfinite(mask)):
            raise ScanError("mask: contains NaN or Inf")
        self.mask = mask > 0.5
        if not self.mask.any():
            raise ScanError("mask: empty (no voxel > 0.5); expected a brain mask with at least one voxel")
        try:
            self.voxel_size = tuple(float(v) for v in check_voxel_size(self.voxel_size))
        except ValueError as exc:
            raise ScanError(str(exc)) from None
        try:
            self.b0_direction = unit_vector(self.b0_direction)
        except ValueError as exc:
            raise ScanError(str(exc)) from None
        bad = ~np.isfinite(self.field)
        if bad.any():
            inside = int((bad & self.mask).sum())
            if inside:
                raise ScanError(f"field: {inside} NaN/Inf voxels inside the mask; fix the field or exclude them from the mask")
            warnings.warn(f"field: {int(bad.sum())} NaN/Inf voxels outside the mask were set to 0", stacklevel=4)
            self.field[bad] = 0.0
        if self.magnitude is not None:
            mag = _as_3d("magnitude", self.magnitude, np.float32)
            if mag.shape != self.field.shape:
                raise ScanError(f"magnitude: shape {mag.shape} does not match field shape {self.field.shape}")
            if not np.all(np.isfinite(mag[self.mask])):
                raise ScanError("magnitude: NaN or Inf inside the mask")
            mag[~np.isfinite(mag)] = 0.0
            self.magnitude = mag
        if self.noise_std is not None:
            n = _as_3d("noise_std", self.noise_std, np.float32)
            if n.shape != self.field.shape:
                raise ScanError(f"noise_std: shape {n.shape} does not match field shape {self.field.shape}")
            self.noise_std = n
        if self.r2star is not None:
            r2 = _as_3d("r2star", self.r2star, np.float32)
            if r2.shape != self.field.shape:
                raise ScanError(f"r2star: shape {r2.shape} does not match field shape {self.field.shape}")
            self.r2star = r2
        if self.affine is not None:
            aff = np.asarray(self.affine, dtype=np.float64)
            if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
                raise ScanError(f"affine: expected a finite 4x4 matrix, got shape {aff.shape}")
            self.affine = aff
        for nm in ("te", "b0_tesla"):
            v = getattr(self, nm)
            if v is not None and (not np.isfinite(v) or v <= 0):
                raise ScanError(f"{nm}: expected a positive number, got {v!r}")

    @property
    def _nifti_info(self) -> Optional[dict]:
        """Old name of :attr:`nifti_info` (was set as a private attribute by the readers); kept for callers
        not yet updated."""
        return self.nifti_info

    @_nifti_info.setter
    def _nifti_info(self, value: Optional[dict]) -> None:
        self.nifti_info = value

    @property
    def shape(self) -> tuple:
        return tuple(self.field.shape)

    def info(self) -> dict:
        """JSON-friendly description (for provenance)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "voxel_size": [round(v, 6) for v in self.voxel_size],
            "b0_direction": [round(float(v), 6) for v in self.b0_direction],
            "mask_voxels": int(self.mask.sum()),
            "has_magnitude": self.magnitude is not None,
            "has_r2star": self.r2star is not None,
            "fingerprint": self.fingerprint(),
            **({"source": dict(self.source)} if self.source else {}),
        }

    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) of field, mask, voxel size and B0 direction."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.field).tobytes())
        h.update(np.packbits(self.mask).tobytes())
        h.update(np.asarray(self.voxel_size, np.float64).tobytes())
        h.update(np.asarray(self.b0_direction, np.float64).round(9).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_phantom(cls, ph, name: str = "phantom") -> "Scan":
        """Scan from a :class:`~napari_qsm.core.sim.phantom.Phantom` (field, mask, magnitude, noise)."""
        return cls(field=ph.field, mask=ph.mask, voxel_size=ph.voxel_size, b0_direction=ph.b0_direction,
                   magnitude=ph.magnitude, noise_std=ph.noise_std, affine=ph.affine,
                   te=ph.te, b0_tesla=ph.b0_tesla, name=name)
