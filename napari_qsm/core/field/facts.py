"""Facts that travel with a field: B0, TE, units, B0 direction, phase units and noise, in one place.

* :func:`input_report`: one line for the console and the Field dock (``TotalField.provenance["report"]``):
  the phase units and why they were chosen, B0 and where it came from, the echo times, the noise σ and
  its source.
* :func:`field_sidecar`: the JSON sidecar ``napari-qsm field`` writes beside each output
  (``local_field.json`` …), read back by :func:`napari_qsm.core.io.load_scan` (``recon``, ``adapt``):

  ============================  ===================================================================
  ``Quantity``, ``Units``       e.g. "local field", "ppm"
  ``MagneticFieldStrength``     B0 in tesla (the exact one used: ImagingFrequency/γ̄ when known)
  ``EchoTimes``                 every echo time (s); ``DeltaTE`` the echo spacing (s), the phase scale
                                of the fit (MEDI's ΔTE); ``load_scan`` sets ``Scan.te`` from it
  ``B0Direction``               unit vector in the file's STORED voxel frame (as ``--b0-dir``)
  ``PhaseUnits`` …              units, scale, sign and why (``PhaseUnitsReason``)
  ``NoiseSigma``                σ per channel (magnitude units) and ``NoiseSigmaSource``
  ``BackgroundRemoval``         local_field only: the background step's name (e.g. "lbv"); MEDI's
                                ``weak_harmonic=auto`` turns on for such fields
  ============================  ===================================================================
"""

from __future__ import annotations

from typing import Optional

import nibabel as nib
import numpy as np

__all__ = ["input_report", "field_sidecar", "field_facts", "direction_to_stored"]


def input_report(vendor: dict, b0_tesla: float, te, sigma: Optional[float] = None, sigma_source: str = "") -> str:
    """One line: phase units (why), B0 (source), TE (ms), noise σ (source).

    Parameters
    ----------
    vendor : ``Echoes.vendor`` (phase_units, phase_units_source, phase_sign(_source), b0_source, te_source).
    b0_tesla, te : field strength (T) and echo times (s).
    sigma, sigma_source : the echo fit's noise estimate.

    Returns
    -------
    str
    """
    v = vendor or {}
    units = v.get("phase_units", "?")
    why = v.get("phase_units_source", "")
    sign = int(v.get("phase_sign", 1))
    sign_txt = "" if sign == 1 else f", sign flipped ({v.get('phase_sign_source', 'argument')})"
    tes = ", ".join(f"{1e3 * float(t):.3g}" for t in (te or ()))
    parts = [f"phase units: {units} ({why}){sign_txt}",
             f"B0 {float(b0_tesla):.4g} T ({v.get('b0_source', 'given')})",
             f"TE {tes} ms ({v.get('te_source', 'given')})"]
    if sigma is not None:
        parts.append(f"noise σ {float(sigma):.4g} ({sigma_source})")
    return "; ".join(parts)


def direction_to_stored(vec, original_affine) -> list:
    """A direction in the ``as_closest_canonical`` voxel frame → the file's stored voxel frame.

    The inverse of :func:`napari_qsm.core.io.direction_to_canonical`.
    """
    ornt = nib.io_orientation(np.asarray(original_affine, np.float64))
    v = np.asarray(vec, np.float64).reshape(3)
    return [float(ornt[i, 1] * v[int(ornt[i, 0])]) for i in range(3)]


def field_sidecar(quantity: str, units: Optional[str], total, noise_source: Optional[str] = None,
                  original_affine=None, extra: Optional[dict] = None) -> dict:
    """The JSON sidecar of one ``napari-qsm field`` output (module docstring).

    Parameters
    ----------
    quantity : e.g. "local field"; units : e.g. "ppm" (None for masks and magnitudes).
    total : the fit's :class:`~.records.TotalField` (B0, TE, ΔTE, B0 direction, provenance with the
        echoes' vendor facts and the noise estimate).
    original_affine : the written file's affine (the B0 direction is given in its stored frame);
        None: the canonical frame.
    extra : more keys (e.g. ``{"Sources": ...}``).

    Returns
    -------
    dict (JSON-ready).
    """
    prov = total.provenance or {}
    vendor = (prov.get("echoes") or {}).get("vendor") or {}
    bdir = [float(x) for x in total.b0_direction]
    if original_affine is not None:
        bdir = direction_to_stored(bdir, original_affine)
    out = {"Quantity": quantity}
    if units:
        out["Units"] = units
    out.update({"MagneticFieldStrength": float(total.b0_tesla), "MagneticFieldStrengthSource": vendor.get("b0_source"),
                "EchoTimes": [float(t) for t in total.te], "DeltaTE": float(total.delta_te),
                "EchoTimeSource": vendor.get("te_source"), "B0Direction": bdir,
                "PhaseUnits": vendor.get("phase_units"), "PhaseUnitsReason": vendor.get("phase_units_source"),
                "PhaseScale": vendor.get("phase_scale"), "PhaseSign": vendor.get("phase_sign"),
                "NoiseSigma": prov.get("noise_sigma"), "NoiseSigmaSource": noise_source or prov.get("noise_sigma_source"),
                "Manufacturer": vendor.get("manufacturer")})
    out = {k: v for k, v in out.items() if v is not None}
    out.update(extra or {})
    return out


def field_facts(total) -> dict:
    """The facts of a fit for ``field.json``: echo times, ΔTE, phase units (and why), noise σ (and its source)
    and the one-line report."""
    prov = total.provenance or {}
    vendor = (prov.get("echoes") or {}).get("vendor") or {}
    return {"te": [float(t) for t in total.te], "delta_te": float(total.delta_te),
            "phase_units": {k: vendor.get(k) for k in ("phase_units", "phase_units_source", "phase_scale",
                                                       "phase_centre", "phase_sign", "phase_sign_source")},
            "noise": {k: prov.get(k) for k in ("noise_sigma", "noise_sigma_source")}, "report": prov.get("report")}
