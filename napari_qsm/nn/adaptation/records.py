"""Records of the on-scan adaptation: parameters, result, cancellation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ...core.params import param
from ...core.progress import Cancelled
from ..infer import consistency_mu_param, consistency_param
from ..unet import QSMInvNet


class AdaptCancelled(Cancelled):
    """Adaptation cancelled; ``result`` holds the state after the last completed step."""

    def __init__(self, msg: str, result: "AdaptResult"):
        super().__init__(msg)
        self.result = result


@dataclass
class AdaptParams:
    """Parameters of :func:`napari_qsm.nn.adapt.adapt` (one record feeds the API, ``--param`` and the dock)."""

    steps: int = param(120, "adaptation steps (each: one synthetic batch + one scan patch; ~1 s on a 2-core CPU "
                           "for a clinical scan)", min=0, max=100000)
    mode: str = param("dsbn", "dsbn = QSMInvNet+ (L_S on synthetic domain 0 + λ·L_T on scan domain 1); "
                              "finetune = QSMInvNet baseline (one shared BN, L_T only); uqsm = uQSM (the same "
                              "U-Net from random initialisation, no DSBN, physics loss + TV only)",
                      choices=("dsbn", "finetune", "uqsm"))
    lr: float = param(1e-3, "Adam learning rate", min=1e-7, max=1e-1, widget="advanced")
    patch: int = param(64, "scan patch edge in voxels (rounded up to a multiple of 16, capped to the scan)",
                       min=16, max=512, widget="advanced")
    scan_batch: int = param(1, "scan patches per step (domain 1, L_T)", min=1, max=64, widget="advanced")
    synth_batch: int = param(1, "synthetic patches per step (domain 0, L_S; dsbn mode only)", min=0, max=64, widget="advanced")
    synth_patch: int = param(48, "synthetic patch edge in voxels (multiple of 16)", min=16, max=256, widget="advanced")
    synth_heads: int = param(1, "procedural heads generated for the synthetic batches (~3-8 s each)",
                             min=1, max=16, widget="advanced")
    lam_start: float = param(30.0, "λ at the first step (weight of L_T)", min=0.0, max=1e6, widget="advanced")
    lam_end: float = param(300.0, "λ at the last step (linear rise)", min=0.0, max=1e6, widget="advanced")
    rad_per_ppm: float | str = param("reference", "phase (rad) per ppm of field in L_T: reference = 16.05 "
                                                   "(2π·γ̄·3 T·20 ms) on every scan, so that λ and the prior weigh the "
                                                   "same whatever the echo spacing; auto = 2π·γ̄·B0·TE of the scan "
                                                   "(3 T, 20 ms when unknown); smaller values wrap less",
                                     min=0.01, max=1000.0, allow=("reference", "auto"), widget="advanced")
    smv_mm: float = param(5.0, "radius (mm) of the spherical-mean-value high-pass applied to both the model and the "
                               "measured field of a patch in L_T, which cancels the field of tissue outside the patch; "
                               "L_T is taken where the sphere stays inside the patch and the mask. 0 = off (old, "
                               "inexact: unfiltered fields with margin_mm)", min=0.0, max=50.0, widget="advanced")
    margin_mm: float = param(6.0, "smv_mm = 0 only: L_T ignores this band (mm) inside each cut face of a scan patch",
                             min=0.0, max=100.0, widget="advanced")
    weighting: str = param("auto", "W_t noise weighting: auto (noise map if present, else magnitude, else mask), "
                                   "noise, magnitude or mask", choices=("auto", "noise", "magnitude", "mask"), widget="advanced")
    tv: float = param(100.0, "dsbn mode: weight β of MEDI's morphology prior on the scan patches, "
                             "β·‖w_G∘∇χ‖₁/#mask (χ in ppm, ∇ per mm; w_G from the magnitude's edges, plain TV "
                             "without a magnitude); 0 = off. finetune mode (L_T only) ignores it",
                      min=0.0, max=1e6, widget="advanced")
    tv_follow: bool = param(False, "scale the prior's weight with λ(t): β(t) = tv·λ(t)/lam_end (fixed ratio of prior "
                                   "to field term over the run) instead of a constant tv", widget="advanced")
    keep_mean: bool = param(True, "keep the network's mean χ in the mask at the unadapted network's (the field "
                                  "carries little information about it; L_T alone lets it drift): shifts the output "
                                  "bias at the end, before the data consistency", widget="advanced")
    consistency: int = consistency_param()          # the final χ (and the previews), as the dsbn method
    consistency_mu: float = consistency_mu_param()
    update: str = param("all", "what the optimiser changes: all weights, or only the scan domain's BatchNorm "
                        "scale/shift (shared convolutions frozen)", choices=("all", "bn"), widget="advanced")
    grad_clip: float = param(1.0, "max gradient norm (0 = off)", min=0.0, max=1e6, widget="advanced")
    seed: int = param(0, "random seed (patches, synthetic data); same seed = same result", min=0, max=2 ** 31 - 1, widget="advanced")
    uqsm_tv: float = param(1e-3, "uqsm mode: weight of plain TV, L_T + uqsm_tv·‖∇χ‖₁/#mask (uQSM's 0.001)",
                           min=0.0, max=1e6, widget="advanced")
    uqsm_input: str = param("tkd", "uqsm mode: network input; tkd = field, mask and the TKD channel of the base "
                                   "architecture (output = TKD + correction), field = field and mask only (as published)",
                            choices=("tkd", "field"), widget="advanced")
    uqsm_norm: str = param("none", "uqsm mode: normalisation; none = no normalisation (as published: per-channel "
                                   "bias only), bn = one shared BatchNorm", choices=("none", "bn"), widget="advanced")
    preview_every: int = param(0, "χ preview (whole-volume inference) every N steps (0 = off)", min=0, max=100000, widget="advanced",
                               short="")


@dataclass
class AdaptResult:
    """Outcome of :func:`napari_qsm.nn.adapt.adapt`.

    ``model`` (adapted, eval mode), ``chi`` (ppm; None when cancelled) and ``chis`` (every scan of a
    protocol), ``history`` (one row per step: ``step, L_S, L_T, TV, lambda, loss, seconds``),
    ``seconds``, ``device``, ``params``, ``step`` reached, the base checkpoint and its sha256, the
    scan fingerprint(s), the optimiser state (for resume), ``cancelled`` and ``info`` (patch shape,
    weighting, edge prior, phase scale, reference mean and mean shift, prediction facts).
    """

    model: QSMInvNet
    chi: Optional[np.ndarray]
    history: list
    seconds: float
    device: str
    params: AdaptParams
    step: int
    base_weights: Optional[str] = None
    base_sha256: Optional[str] = None
    scan_fingerprint: Optional[str] = None
    optimizer_state: Optional[dict] = None
    cancelled: bool = False
    info: dict = field(default_factory=dict)
    scan_fingerprints: list = field(default_factory=list)   # every adapted scan (protocol: several)
    chis: Optional[list] = None                              # χ of every adapted scan, in order

    @property
    def state_dict(self) -> dict:
        return self.model.state_dict()

    @property
    def mode(self) -> str:
        return self.params.mode

    def losses(self, name: str) -> np.ndarray:
        """One loss column of the history (``"L_S"``, ``"L_T"``, ``"lambda"``, ``"loss"``)."""
        return np.array([h.get(name, np.nan) for h in self.history], dtype=float)
