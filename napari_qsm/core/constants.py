"""Physical constants and vendor phase scales, written once for the whole package."""

import math

__all__ = ["GAMMA_BAR_MHZ_PER_T", "GAMMA_BAR_HZ_PER_T", "PHASE_SCALES", "REFERENCE_B0_T", "REFERENCE_TE_S",
           "rad_per_ppm"]

#: γ/2π of the proton (¹H), MHz/T (CODATA 2018: 42.577 478 518).
GAMMA_BAR_MHZ_PER_T = 42.577478
#: the same in Hz/T.
GAMMA_BAR_HZ_PER_T = GAMMA_BAR_MHZ_PER_T * 1e6

#: multiply stored phase by this to get radians: radians, Siemens integers (−4096..4095), Philips mrad.
PHASE_SCALES = {"rad": 1.0, "siemens": math.pi / 4096.0, "mrad": 1e-3}


#: the reference scan of phase scales where a scan does not say (and of the adaptation's L_T on every
#: scan): 3 T, TE 20 ms, i.e. 16.05 rad per ppm
REFERENCE_B0_T = 3.0
REFERENCE_TE_S = 0.020


def rad_per_ppm(b0_tesla: float | None = None, te: float | None = None) -> float:
    """Phase (rad) that 1 ppm of field accumulates at echo time ``te`` (s) and field ``b0_tesla`` (T).

    Parameters
    ----------
    b0_tesla, te : float or None
        None (or 0) = the reference :data:`REFERENCE_B0_T` / :data:`REFERENCE_TE_S` (3 T, 20 ms).

    Returns
    -------
    float
        2π·γ̄·B0·TE·1e-6 (16.05 at the reference).
    """
    b0 = float(b0_tesla) if b0_tesla else REFERENCE_B0_T
    t = float(te) if te else REFERENCE_TE_S
    return 2.0 * math.pi * GAMMA_BAR_HZ_PER_T * b0 * t * 1e-6
