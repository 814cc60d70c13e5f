"""Phase units: stored phase values → radians, detected so that they cannot be misread.

Phase units (``phase_units``, :func:`phase_to_radians`): "rad"; "siemens" (signed integers
−4096..4095 → ×π/4096; data without negative values spanning more than 2048 are taken as unsigned);
"siemens-unsigned" (0..4095 → (value − 2048)·π/2048: unsigned data scaled by π/4096 would land in
[0, π] and halve the field); "mrad" (Philips,
÷1000); "rescale" (min..max → −π..π, what ROMEO and CLEAR-SWI do with phase in an unknown scale);
or "auto" (default), which decides in this order:

1. radians when every value lies in [−π, π] (or [0, 2π]) AND fills at least 80 % of 2π (wrapped
   phase does; ±0.0037 does not, and is no longer taken for radians);
2. Siemens when the largest |value| is in (3143.6, 4096.5], or ≤ 4096.5 with a Siemens Manufacturer
   ("siemens-unsigned" when no value is negative and they span more than 2048);
3. Philips milliradians when the largest |value| is in (0.95·1000π, 3143.6] (≈ ±3142), or ≤ that
   with a Philips Manufacturer; 0..2000π unsigned milliradians likewise;
4. "rescale" only with evidence that the values are wrapped phase in another scale: at least
   0.2 % of the values within 1 % of the range from EACH end (uniform wrapped phase: 1 %; a smooth
   or unwrapped map has thin tails) and an even histogram inside the object (voxels above the
   median magnitude; every one of 16 bins ≥ 0.2 × the median bin);
5. otherwise a ScanError naming ``--phase-units`` (nothing is written).

What was chosen and why is in ``Echoes.vendor`` (``phase_units``, ``phase_units_source``,
``phase_scale``, ``phase_centre``, ``phase_range``). Header scaling (scl_slope/scl_inter) is applied
by nibabel before this; it is reported. An explicit unit wins.

``phase_sign`` (±1) multiplies the phase; None (default) = −1 when the sidecar's Manufacturer is GE
(dcm2niix writes "GE" / "GE MEDICAL SYSTEMS"), else +1. This relies on GE's phase being stored with
the opposite sign to Siemens/Philips for the same frequency offset (the convention stated in
issue 24 and behind the ``--phase-sign -1`` advice); it was not checked on GE data here. The
rule and the sign used are reported (``phase_sign_source``); ``--phase-sign 1`` keeps GE phase as is.
"""

from __future__ import annotations

import re
from typing import Optional

import numpy as np

from ..constants import PHASE_SCALES
from ..scan import ScanError

__all__ = ["PHASE_UNITS", "detect_phase_units", "phase_to_radians"]

PHASE_UNITS = ("auto", "rad", "siemens", "siemens-unsigned", "mrad", "rescale")
_SCALE = PHASE_SCALES
_PI_TOL = 1e-3        # radians: tolerated overshoot of ±π / 2π (float rounding of scaled data)
_SIEMENS_MAX = 4096.5
_MRAD_MAX = 1000.0 * np.pi + 2.0  # 3143.6
_RAD_FILL = 0.8       # radians must fill at least this share of 2π (wrapped phase does)
_SAT_MIN = 0.002      # rescale evidence: share of values within 1 % of the range of each end (uniform: 0.01)
_HIST_MIN = 0.2       # rescale evidence: every histogram bin ≥ this × the median bin (of the object's voxels)
_GE_RE = re.compile(r"(^|[^a-z])(ge|gehc)([^a-z]|$)|general electric|ge medical|ge healthcare")


def _is_ge(manufacturer: str) -> bool:
    return bool(_GE_RE.search((manufacturer or "").strip().lower()))


def _siemens_unsigned(lo: float, hi: float) -> bool:
    """Siemens 12-bit phase stored unsigned (0..4095): no negative value and a span beyond half the range
    (signed phase −4096..4095 of a real scan has negative values)."""
    return lo >= -0.5 and hi <= _SIEMENS_MAX and hi - lo > 2048


def _wrap_evidence(v: np.ndarray, magnitude=None) -> tuple[bool, str]:
    """Do the values look like wrapped phase in an unknown linear scale? (saturation at both ends and an
    even spread over the range inside the object). Returns (yes, what was measured)."""
    v = np.asarray(v, np.float32).ravel()
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo
    if not span > 0:
        return False, "constant values"
    tol = np.float32(0.01 * span)
    n_lo, n_hi = int(np.count_nonzero(v <= lo + tol)), int(np.count_nonzero(v >= hi - tol))
    s_lo, s_hi = n_lo / v.size, n_hi / v.size
    inside = v
    if magnitude is not None:
        m = np.asarray(magnitude, np.float32).ravel()
        if m.shape == v.shape:
            pos = m > 0
            if np.any(pos):
                inside = v[pos & (m >= np.median(m[pos]))]
    hist, _ = np.histogram(inside, bins=16, range=(lo, hi))
    even = float(hist.min() / max(np.median(hist), 1.0))
    what = (f"{100 * s_lo:.2g} % of the values within 1 % of the minimum, {100 * s_hi:.2g} % of the maximum "
            f"(uniform wrapped phase: 1 %), emptiest of 16 histogram bins inside the object {even:.2f} of the median bin")
    ok = min(s_lo, s_hi) >= _SAT_MIN and min(n_lo, n_hi) >= 5 and even >= _HIST_MIN and inside.size >= 64
    return ok, what


def _units_error(name, rng, manufacturer, extra=""):
    man = f" (Manufacturer {manufacturer!r})" if manufacturer else ""
    return ScanError(f"{name}: {rng} are neither radians (filling −π..π or 0..2π), Siemens integers (−4096..4095 or "
                     f"0..4095) nor Philips milliradians (−3142..3142){man}, and show no evidence of wrapped phase in "
                     f"another scale{extra}; give the units explicitly: --phase-units rad|siemens|siemens-unsigned|mrad|rescale "
                     "(phase_units= in the API; rescale maps min..max to −π..π)")


def _detect(v, manufacturer, name, magnitude):
    """(units, scale, centre, reason): radians = (value − centre)·scale."""
    lo, hi = float(np.min(v)), float(np.max(v))
    amax = max(abs(lo), abs(hi))
    man = (manufacturer or "").lower()
    rng = f"values in [{lo:.4g}, {hi:.4g}]"
    fill = (hi - lo) / (2 * np.pi)
    in_rad = lo >= -np.pi - _PI_TOL and hi <= 2 * np.pi + _PI_TOL and (lo >= -_PI_TOL or hi <= np.pi + _PI_TOL)
    if in_rad and fill >= _RAD_FILL:
        return "rad", 1.0, 0.0, f"{rng} fill {100 * min(fill, 1):.0f} % of 2π: radians"
    unsigned = lo >= -0.5
    if amax <= _SIEMENS_MAX and amax > 2 * np.pi + _PI_TOL and ("siemens" in man or amax > _MRAD_MAX):
        by = f", Manufacturer {manufacturer!r}" if "siemens" in man else ""
        if _siemens_unsigned(lo, hi):
            return ("siemens-unsigned", np.pi / 2048.0, 2048.0,
                    f"{rng}{by}: unsigned Siemens integers 0..4095 ((value − 2048)·π/2048 → −π..π)")
        return "siemens", _SCALE["siemens"], 0.0, f"{rng}{by}: Siemens integers −4096..4095 (×π/4096)"
    if "philips" in man and amax <= _MRAD_MAX and amax > 2 * np.pi + _PI_TOL and not unsigned:
        return "mrad", _SCALE["mrad"], 0.0, f"{rng}, Manufacturer {manufacturer!r}: Philips milliradians (÷1000)"
    if 0.95 * 1000 * np.pi < amax <= _MRAD_MAX and not unsigned:
        return "mrad", _SCALE["mrad"], 0.0, f"{rng}: milliradians (±1000π, Philips) (÷1000)"
    if unsigned and 0.95 * 2000 * np.pi < hi <= 2 * _MRAD_MAX:
        return "mrad", _SCALE["mrad"], 0.0, f"{rng}: milliradians 0..2000π (÷1000)"
    ok, what = _wrap_evidence(v, magnitude)
    if ok:
        return ("rescale", 2 * np.pi / (hi - lo), 0.5 * (lo + hi),
                f"{rng} fill {100 * fill:.3g} % of 2π yet look like wrapped phase ({what}): an arbitrary scale, "
                "min..max rescaled to −π..π (as ROMEO and CLEAR-SWI do)")
    raise _units_error(name, rng, manufacturer, f" ({what})")


def detect_phase_units(values: np.ndarray, manufacturer: str = "", name: str = "phase",
                       magnitude: Optional[np.ndarray] = None) -> tuple[str, str]:
    """``(units, reason)`` for phase values already scaled by the header.

    Parameters
    ----------
    values : the stored phase (any shape; all echoes together).
    manufacturer : the sidecar's Manufacturer (Siemens/Philips decide ambiguous integer ranges).
    name : names the input in errors.
    magnitude : optional, same shape: "inside the object" for the histogram test of ``rescale``.

    Returns
    -------
    (units, reason): units one of rad, siemens, siemens-unsigned, mrad, rescale.
    Use :func:`phase_to_radians` to convert (it knows the offset of unsigned integers and the range
    of ``rescale``). Raises ScanError naming ``--phase-units`` when nothing fits.
    """
    units, _, _, reason = _detect(np.asarray(values), manufacturer, name, magnitude)
    return units, reason


def phase_to_radians(values: np.ndarray, units: str = "auto", manufacturer: str = "", sign: Optional[int] = None,
                     name: str = "phase", magnitude: Optional[np.ndarray] = None) -> tuple[np.ndarray, dict]:
    """Stored phase → radians (float32) and the facts of the conversion.

    Parameters
    ----------
    values : stored phase (after the header's scl_slope/scl_inter), all echoes.
    units : auto, rad, siemens, siemens-unsigned, mrad or rescale (module docstring). An explicit unit
        wins; "siemens" takes data without negative values spanning more than 2048 as unsigned.
    manufacturer : the sidecar's Manufacturer.
    sign : +1 / −1, or None: −1 when the Manufacturer is GE (GE's phase has the opposite sign), else +1.
    name, magnitude : as in :func:`detect_phase_units`.

    Returns
    -------
    (radians, facts) with facts ``phase_units``, ``phase_units_source`` (why), ``phase_scale``,
    ``phase_centre`` (stored value of phase 0), ``phase_sign``, ``phase_sign_source``.
    """
    u = str(units).strip().lower()
    if u not in PHASE_UNITS:
        raise ScanError(f"phase_units: expected one of {PHASE_UNITS}, got {units!r}")
    v = np.asarray(values, np.float32)
    lo, hi = float(v.min()), float(v.max())
    if u == "auto":
        found, scale, centre, reason = _detect(v, manufacturer, name, magnitude)
        source = f"auto: {reason}"
    else:
        found, source = u, "argument"
        scale, centre = _SCALE.get(u, 1.0), 0.0
        if u == "siemens-unsigned" or (u == "siemens" and _siemens_unsigned(lo, hi)):
            found = "siemens-unsigned"
            scale, centre = np.pi / 2048.0, 2048.0
            source = "argument" + ("" if u == found else " (values ≥ 0 spanning > 2048: unsigned 0..4095)")
        elif u == "rescale":
            if not hi > lo:
                raise ScanError(f"{name}: constant values ({lo:.4g}); nothing to rescale")
            scale, centre = 2 * np.pi / (hi - lo), 0.5 * (lo + hi)
            source = f"argument: min..max [{lo:.4g}, {hi:.4g}] rescaled to −π..π"
    if sign is None:
        if _is_ge(manufacturer):
            sg, sgs = -1, (f"auto: Manufacturer {manufacturer!r}: GE phase has the opposite sign; flipped "
                           "(--phase-sign 1 keeps it)")
        else:
            sg, sgs = 1, "default"
    elif sign in (1, -1):
        sg, sgs = int(sign), "argument"
    else:
        raise ScanError(f"phase_sign: expected +1 or -1, got {sign!r}")
    rad = (v - np.float32(centre)) * np.float32(scale * sg)
    facts = {"phase_units": found, "phase_units_source": source, "phase_scale": float(scale),
             "phase_centre": float(centre), "phase_range": [lo, hi], "phase_sign": sg, "phase_sign_source": sgs}
    return rad.astype(np.float32, copy=False), facts
