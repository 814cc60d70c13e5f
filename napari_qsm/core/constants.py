"""Physical constants and vendor phase scales, written once for the whole package."""

import math

__all__ = ["GAMMA_BAR_MHZ_PER_T", "GAMMA_BAR_HZ_PER_T", "PHASE_SCALES", "rad_per_ppm"]

#: γ/2π of the proton (¹H), MHz/T (CODATA 2018: 42.577 478 518).
GAMMA_BAR_MHZ_PER_T = 42.577478
#: the same in Hz/T.
GAMMA_BAR_HZ_PER_T = GAMMA_BAR_MHZ_PER_T * 1e6

#: multiply stored phase by this to get radians: radians, Siemens integers (−4096..4095), Philips mrad.
PHASE_SCALES = {"rad": 1.0, "siemens": math.pi / 4096.0, "mrad": 1e-3}


def rad_per_ppm(b0_tesla: float, te: float) -> float:
    """Phase (rad) that 1 ppm of field accumulates at echo time ``te`` (s) and field ``b0_tesla`` (T)."""
    return 2.0 * math.pi * GAMMA_BAR_HZ_PER_T * float(b0_tesla) * float(te) * 1e-6
