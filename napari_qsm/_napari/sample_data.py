"""Sample data (npe2 ``napari-qsm.sample_*``): the procedural head phantom as napari layers.

Two presets, each generated in a few seconds on a CPU (nothing is downloaded):

* ``phantom_1mm``: 128×144×112 voxels at 1 mm isotropic, B0 along the slice axis;
* ``phantom_clinical``: 192×224×48 voxels at 0.75×0.75×3 mm with a 15° oblique B0 (an
  AC-PC-angled clinical acquisition), so the B0 handling of the widgets can be seen.

Layers: true χ, magnitude (shown), labels (with structure names on hover), mask and local field
(ppm, windowed to its 1st–99th percentile), all on the same grid with the geometry metadata of
:mod:`napari_qsm._napari.layers`. The 2-D view is turned to the orientation the docks use
(neurological: anterior up, the patient's right on the right), so opening a dock does not flip it.
"""

from __future__ import annotations

import numpy as np

from .layers import CHI_CONTRAST, DISPLAY_AXES, Geometry, robust_limits, to_layer_order

SHAPE_1MM = (128, 144, 112)
SNR = 100.0
NEUROLOGICAL = ("up", "right")  # camera.orientation2d of the docks' default view (widgets.ORIENTATIONS)


def phantom_layer_data(phantom, prefix: str = "phantom", axes=DISPLAY_AXES) -> list:
    """Layer data tuples (true χ, magnitude, labels, mask, field) for a Phantom."""
    geom = Geometry.from_affine(phantom.affine, axes)
    # the phantom knows its B0 exactly; keep it (identical to R⁻¹·ẑ of its affine)
    geom.b0_direction = np.asarray(phantom.b0_direction, float)
    kw_geo = geom.layer_kwargs()
    info = phantom.info()
    info.pop("affine", None)
    base = dict(geom.metadata())
    base.update({"path": None, "phantom": info,
                 "sidecar": {"EchoTime": float(phantom.te), "MagneticFieldStrength": float(phantom.b0_tesla)}})

    def md(role, **extra):
        d = dict(base)
        d["role"] = role
        d.update(extra)
        return d

    names = {int(k): str(v) for k, v in phantom.label_names.items()}
    idx = sorted(set(names) | {0})
    features = {"index": idx, "name": [names.get(i, "background").replace("_", " ") for i in idx],
                "nominal χ (ppm)": [round(float(phantom.label_chi.get(names.get(i, ""), 0.0)), 4) for i in idx]}
    field = to_layer_order(phantom.field.astype(np.float32), axes)
    mag = to_layer_order(phantom.magnitude.astype(np.float32), axes)
    out = [
        (to_layer_order(phantom.chi.astype(np.float32), axes),
         dict(name=f"{prefix} true χ", colormap="gray", contrast_limits=CHI_CONTRAST, visible=False,
              metadata=md("chi_true", units="ppm"), **kw_geo), "image"),
        (mag, dict(name=f"{prefix} magnitude", colormap="gray", visible=True,
                   contrast_limits=robust_limits(mag, symmetric=False), metadata=md("magnitude"), **kw_geo), "image"),
        (to_layer_order(phantom.labels.astype(np.uint8), axes),
         dict(name=f"{prefix} labels", visible=False, opacity=0.5, features=features,
              metadata=md("labels"), **kw_geo), "labels"),
        (to_layer_order(phantom.mask.astype(np.uint8), axes),
         dict(name=f"{prefix} mask", visible=False, opacity=0.4, metadata=md("mask"), **kw_geo), "labels"),
        (field, dict(name=f"{prefix} field", colormap="gray", contrast_limits=robust_limits(field, symmetric=True),
                     visible=False, metadata=md("field", units="ppm"), **kw_geo), "image"),
    ]
    return out


def orient_current_viewer() -> None:
    """Turn the current viewer's 2-D view to the docks' default orientation (neurological: A up, R right)."""
    try:
        import napari

        viewer = napari.current_viewer()
        if viewer is not None:
            viewer.scene.camera.orientation2d = NEUROLOGICAL
    except Exception:  # no viewer (headless use of the sample functions), or an older napari
        pass


def make_phantom_1mm(shape=SHAPE_1MM, seed: int = 0):
    """Phantom at 1 mm isotropic (128×144×112), axial B0, SNR 100."""
    from ..core.sim.phantom import make_phantom

    ph = make_phantom(shape=shape, voxel_size=(1.0, 1.0, 1.0), b0_direction=(0.0, 0.0, 1.0), seed=seed,
                      snr=SNR, device="cpu")
    orient_current_viewer()
    return phantom_layer_data(ph, prefix="phantom")


def make_phantom_clinical(seed: int = 0, oblique_deg: float = 15.0):
    """Clinical-like phantom (0.75×0.75×3 mm, 192×224×48), B0 tilted 15° about the L→R axis, SNR 100."""
    from ..core.sim.phantom import CLINICAL, make_phantom, oblique_direction

    ph = make_phantom(shape=CLINICAL["shape"], voxel_size=CLINICAL["voxel_size"],
                      b0_direction=oblique_direction(oblique_deg, "x"), seed=seed, snr=SNR, device="cpu")
    orient_current_viewer()
    return phantom_layer_data(ph, prefix="clinical")


RAW_SHAPE = (64, 76, 64)


def make_raw_head(seed: int = 0, shape=RAW_SHAPE, voxel_size=(2.5, 2.5, 2.5), snr: float = 50.0):
    """Raw multi-echo head in air (2.5 mm, 64×76×64, 5 echoes, SNR 50): magnitude and phase layers.

    The honest phantom with a background field (``make_phantom(honest=True, background=True)``:
    tissue −9.41 ppm against air, skull, sinuses and mastoids, 2nd-order shim, intra-voxel
    dephasing, receive phase, wraps, complex noise). The layers are those the reader makes of a
    BIDS MEGRE folder (:func:`napari_qsm._napari.reader.echoes_layer_data`): 4-D with the echo
    FIRST (a slider; napari lines 3-D maps up with the trailing axes, so the Field dock's maps sit
    on the same grid without turning anything), then the spatial axes in the display order of
    :data:`DISPLAY_AXES`. Metadata: ``role`` "magnitude" / "phase" (``units`` "rad"), ``echo_axis``
    0, ``echo_times`` / ``te`` (s), ``n_echoes``, ``b0_tesla``, the geometry keys, a BIDS-like
    ``sidecar`` (EchoTime list in s, MagneticFieldStrength) and the phantom's description.
    """
    from ..core.sim.phantom import make_phantom
    from .reader import echoes_layer_data

    ph = make_phantom(shape=shape, voxel_size=voxel_size, b0_direction=(0.0, 0.0, 1.0), seed=seed, snr=snr,
                      honest=True, background=True, keep_echoes=True, device="cpu")
    info = ph.info()
    info.pop("affine", None)
    tes = [float(t) for t in ph.echo_times]
    extra = {"phantom": info, "sidecar": {"EchoTime": tes, "MagneticFieldStrength": float(ph.b0_tesla)}}
    out = []
    for data, kw, typ in echoes_layer_data(ph.to_echoes(name="raw head"), DISPLAY_AXES):
        kw = dict(kw, metadata=dict(kw["metadata"], **extra))
        out.append((data, kw, typ))
    orient_current_viewer()
    return out
