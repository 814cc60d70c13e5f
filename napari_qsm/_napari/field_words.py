"""The Field dock's words: step families, phase units, parameter labels and choices as a person writes them."""

from __future__ import annotations

import re

from qtpy.QtWidgets import QComboBox

from ..core.params import specs
from .form import ParamForm
from .kit import relabel_form

__all__ = ["FAMILY_TITLES", "PHASE_UNITS", "CHOICE_WORDS", "nice_label", "relabel_step_form", "short_doc"]

#: the step families in the words a person writes, in the order the dock shows them
FAMILY_TITLES = {"fit": "Echo fit", "unwrap": "Unwrapping", "mask": "Brain mask", "background": "Background removal"}
PHASE_UNITS = [("auto", "detect from the values"), ("rad", "radians"), ("siemens", "Siemens integers (±4096)"),
               ("siemens-unsigned", "Siemens integers (0 to 4095)"), ("mrad", "Philips milliradians"),
               ("rescale", "rescale min..max to ±π")]

# parameter rows: words a person would write, units in the label (the record's name stays the key)
_LABELS = {
    "offsets": "Phase offsets", "offset_sigma_mm": "Offset smoothing σ (mm)", "intercept": "Intercept",
    "noise_sigma": "Noise σ (0 = estimate)", "r2star_max": "R2* clip (1/s)",
    "misfit_noise": "Raise N_std where misfit > (0 = off)", "max_iter": "Max iterations",
    "tol": "Tolerance", "stop": "Stop rule", "echo_mode": "Echo mode", "template_echo": "Template echo",
    "use_magnitude": "Use the magnitude", "form": "Laplacian form", "pad_factor": "Padding factor",
    "source": "Threshold on", "threshold_scale": "Threshold scale", "open_mm": "Opening radius (mm)",
    "close_mm": "Closing radius (mm)", "erode_mm": "Erosion (mm)", "radius_max": "Largest radius (mm)",
    "radius_min": "Smallest radius (mm)", "radius_step": "Radius step (mm)", "threshold": "Truncation",
    "radius": "Radius (mm)", "lambda": "Regularisation λ", "use_noise": "Weight by N_std",
    "coarse_levels": "Coarse grids", "peel": "Boundary layers peeled",
    "refit": "Refit after unwrapping", "refit_sigma_mm": "Refit offset smoothing σ (mm)",
    "refine": "Thick voxels", "stencil": "Laplacian stencil (points)", "residual": "Residual background fit",
}



def nice_label(spec) -> str:
    """Row label for a step parameter: hand-written when known, else the name in words with its unit."""
    if spec.name in _LABELS:
        return _LABELS[spec.name]
    words = spec.name.split("_")
    unit = None
    if len(words) > 1 and words[-1] in ("mm", "ms", "ppm", "s"):
        unit = words.pop()
    else:
        m = re.search(r"\((mm|ms|ppm|1/s|Hz|T)\)", spec.doc or "")
        unit = m.group(1) if m else None
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} ({unit})" if unit else text


#: the steps' code-name choices in words (the values stay the records' names)
CHOICE_WORDS = {
    ("offsets", "mcpc3ds"): "Estimate (MCPC-3D-S)", ("offsets", "none"): "None (assume zero)",
    ("intercept", "fit"): "Fitted", ("intercept", "zero"): "Zero (line through the origin)",
    ("refit", "origin"): "Through the origin (offset removed)", ("refit", "none"): "None (keep the fitted slope)",
    ("stop", "global"): "When the whole volume converges", ("stop", "voxel"): "Each voxel on its own",
    ("echo_mode", "template"): "One echo, then the others from it", ("echo_mode", "individual"): "Each echo",
    ("form", "differences"): "Phase differences", ("form", "sincos"): "Sine and cosine",
    ("refine", "auto"): "Solve on a finer grid along thick sides",
    ("refine", "off"): "Keep the scan's grid",
    ("residual", "none"): "None",
    **{("residual", f"harmonic{n}"): f"Solid harmonics to degree {n}" for n in (1, 2, 3)},
    **{("residual", f"poly{n}"): f"Polynomials to degree {n}" for n in (1, 2, 3)},
    ("source", "auto"): "Automatic", ("source", "magnitude"): "Magnitude", ("source", "quality"): "Phase quality",
}


def relabel_step_form(form: ParamForm) -> None:
    """Row labels and choices of a step's form in words."""
    if form.params_cls is None:
        return
    by_name = {s.name: s for s in specs(form.params_cls)}
    relabel_form(form, lambda name: nice_label(by_name[name]))
    for name in form.names():
        w = form.widget_for(name)
        if isinstance(w, QComboBox) and not w.isEditable():
            for i in range(w.count()):
                words = CHOICE_WORDS.get((name, w.itemData(i)))
                if words:
                    w.setItemText(i, words)


def short_doc(doc: str, limit: int = 200) -> str:
    """The first sentence of a step's doc, whole; a longer one ends at the last clause or word that fits, with "…".

    Never cut inside a word (the whole doc is the tooltip).
    """
    doc = " ".join((doc or "").split())
    first = doc
    for m in re.finditer(r"[.!?](?=\s|$)", doc):  # a sentence ends outside brackets ("(Wen et al. 2014)")
        head = doc[: m.end()]
        if head.count("(") == head.count(")"):
            first = head
            break
    if len(first) <= limit:
        return first
    cut = first[:limit]
    for sep in ("; ", ": ", ", ", " ("):
        k = cut.rfind(sep)
        if k > limit // 2:
            return _balanced(cut[:k]) + " …"
    return _balanced(cut[: cut.rfind(" ")]) + " …"


def _balanced(text: str) -> str:
    """``text`` without a trailing clause whose bracket it does not close."""
    while text.count("(") > text.count(")") and " (" in text:
        text = text[: text.rfind(" (")]
    return text.rstrip(" ,;:")
