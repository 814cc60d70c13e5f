"""The Field dock's SWI option: CLEAR-SWI-style SWI, its minIP and NumART2* T2* after a run.

:class:`SWISection` is the "SWI" section (the "Also make SWI" switch and the form of
:class:`~napari_qsm.core.swi.SWIParams`); :func:`swi_layer_data` computes the maps in the run's worker
(:func:`napari_qsm.core.swi.swi` on the run's unwrapped total field, brain mask and the echoes'
magnitudes) and returns layer data tuples on the run's grid.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from qtpy.QtWidgets import QCheckBox

from ..core.params import make_params
from ..core.swi import SWIParams
from ..methods import get_step
from .form import ParamForm
from .form import label_for
from .kit import DIM_COLOR, relabel_form, section, wrap_label
from .layers import Geometry, robust_limits, to_layer_order

__all__ = ["SWISection", "swi_layer_data", "SWI_KEYS"]

#: keys of the Field dock's output layers made by the SWI option
SWI_KEYS = ("swi", "swi_minip", "t2star")
_LABELS = {"highpass_mm": "High-pass σ (mm)", "power": "Phase mask power", "magnitude": "Echo combination",
           "reference_te": "Phase at TE (s; 0 = mean)", "minip_mm": "minIP slab (mm)"}


class SWISection:
    """The "SWI" section of the Field dock: a switch (on by default) and the SWI parameters."""

    def __init__(self, body):
        box, lay = section("SWI (CLEAR-SWI style)")
        self.check = QCheckBox("Also make SWI, minIP and T2*")
        self.check.setObjectName("swi_check")
        self.check.setChecked(True)
        self.check.setToolTip("After the run, compute the susceptibility-weighted image from the echoes' "
                              "magnitudes and the unwrapped total field (Eckstein 2021), its minimum-intensity "
                              "projection and the NumART2* T2* map (ms). Off: the run is a little faster.")
        lay.addWidget(self.check)
        lay.addWidget(wrap_label("Phase mask from the high-passed total field (power 4, Haacke 2004) × the "
                                 "combined magnitude; minIP over a slab along the head–foot axis.", DIM_COLOR,
                                 small=True))
        self.form = ParamForm(get_step("swi").params_cls)
        self.form.setObjectName("swi_form")
        relabel_form(self.form, lambda name: _LABELS.get(name, label_for(name)))
        lay.addWidget(self.form)
        self.check.toggled.connect(self.form.setEnabled)
        self.box = box
        body.addWidget(box)

    def params(self) -> Optional[SWIParams]:
        """The SWI parameters when the switch is on, else None (raises ParamError on a bad value)."""
        if not self.check.isChecked():
            return None
        return make_params(get_step("swi").params_cls, self.form.values())


def swi_layer_data(run, magnitude: np.ndarray, geom: Geometry, prefix: str, base_md: dict,
                   params: SWIParams) -> dict:
    """SWI, minIP and NumART2* T2* of a Field run as layer data tuples (keys :data:`SWI_KEYS`).

    Parameters
    ----------
    run : FieldRun
        The Field run (its unwrapped total field and brain mask are used).
    magnitude : ndarray (i, j, k, echo)
        The echoes' magnitudes, canonical voxel frame.
    geom : Geometry
        The run's grid and display permutation.
    prefix : str
        Start of the layer names (the scan name).
    base_md : dict
        Metadata shared with the run's other layers (geometry, source, field steps).
    params : SWIParams

    Returns
    -------
    dict
        key → (data in layer order, Image kwargs, "image").
    """
    tot = run.total
    res = get_step("swi").run(magnitude, tot.field, run.brain_mask, tot.te, tot.b0_tesla, tot.voxel_size, params)
    kw_geo = geom.layer_kwargs()
    prov = dict(res.provenance)

    def img(arr, name, role, units, cmap="gray", visible=False, quantity="", window_in_brain=False):
        d = to_layer_order(np.asarray(arr, np.float32), geom.axes)
        md = dict(base_md, role=role, units=units, quantity=quantity, provenance=prov)
        # T2* in air is noise up to 1 s: its display window comes from the brain only
        inside = np.asarray(arr)[run.brain_mask] if window_in_brain and run.brain_mask.any() else None
        limits = robust_limits(inside if inside is not None else d, symmetric=False)
        return (d, dict(name=f"{prefix} {name}", colormap=cmap, visible=visible, metadata=md,
                        contrast_limits=limits, **kw_geo), "image")

    return {
        "swi": img(res.swi, "SWI", "swi", "a.u.", quantity="susceptibility-weighted image"),
        "swi_minip": img(res.min_ip, f"SWI minIP {params.minip_mm:g} mm", "swi_minip", "a.u.",
                         quantity="SWI minimum-intensity projection"),
        "t2star": img(res.t2star_ms, "T2* (NumART2*, ms)", "t2star", "ms", cmap="viridis",
                      quantity="T2* (NumART2*)", window_in_brain=True),
    }
