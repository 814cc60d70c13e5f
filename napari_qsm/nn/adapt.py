"""On-scan adaptation of QSMInvNet+ (DSBN) to the one scan that is open, and the QSMInvNet baseline.

Stable API (used by the command line ``napari-qsm adapt`` and the napari Adapt widget)
--------------------------------------------------------------------------------------
``AdaptParams``
    The parameter record (built with :func:`napari_qsm.core.params.param`: defaults, ranges and a
    one-line doc per field, so the CLI ``--param NAME=VALUE`` and a generated form work unchanged).
``adapt(scan, params=None, *, weights=None, device="auto", progress=None, cancel=None, resume=None,
on_cancel="raise") -> AdaptResult``
    Adapts a copy of the base checkpoint (``weights``: a path, default the shipped
    ``napari_qsm/nn/weights/qsminvnet_plus.pt``) to ``scan`` and returns the adapted model, the
    final χ (whole-volume inference with :func:`napari_qsm.nn.infer.predict`, exactly what
    ``recon --method dsbn --weights ADAPTED.pt`` computes), the loss history (one row per step:
    ``step, L_S, L_T, TV, lambda, loss, seconds``), wall seconds and the device.
    ``resume``: path of an adapted checkpoint written by :func:`save_adapted`; the run continues
    from its step (optimiser state included) to ``params.steps`` (the base is then not needed).
    ``progress``: callable receiving :class:`napari_qsm.core.progress.Progress` every step
    (``step``, ``total``, message ``"step s/n L_S=… L_T=… [R=…] λ=… ETA …s"``, ``losses`` with
    ``L_S``, ``L_T``, ``TV`` (R of the edge prior, NaN when off), ``lambda``, ``eta_s``) and, every
    ``preview_every`` steps, ``preview`` = the current χ (ppm, the scan's shape). ``cancel``: a token
    (``is_set()``); checked between steps and inside every step (each conv block, forward and
    backward), so a cancel is honoured within a fraction of a second. On cancel the model is
    restored to the state after the last completed step and :class:`AdaptCancelled` (a :class:`~napari_qsm.core.progress.Cancelled`) is raised
    with that state in ``exc.result`` (``chi`` is None; ``save_adapted(exc.result, …)`` works);
    with ``on_cancel="return"`` that result is returned instead (``result.cancelled`` is True).
``save_adapted(result, path, base_weights_path=None, scan=None) -> Path``
    Writes the adapted checkpoint atomically (temporary file, then ``os.replace``) plus a JSON
    sidecar ``path.with_suffix(".json")`` (the card :func:`napari_qsm.nn.infer.read_card` reads):
    base checkpoint sha256, scan fingerprint, steps, losses, seconds, device, parameters. Refuses
    (ValueError, nothing written) a path inside the shipped weights directory or the base file.
    The checkpoint is ``{"model": state_dict, "optimizer": …, "step": …, "adapt_json": …}`` and
    loads with ``torch.load(weights_only=True)`` and :func:`napari_qsm.nn.infer.load_model`.
``adapt_cli(scan, steps=None, weights=None, save_weights=None, params=None, device="auto",
progress=None) -> napari_qsm.core.method.Result``
    What ``napari-qsm adapt`` calls (``params``: dict of strings from ``--param``).

A method ``"dsbn_adapt"`` (label "QSMInvNet+ adapted to this scan") is registered when this module
is imported, so ``reconstruct(scan, "dsbn_adapt", params, weights=…)`` and generated widgets work;
it returns the adapted χ and the history in ``extras`` (the adapted weights are not kept).

The two modes
-------------
``mode="dsbn"`` (QSMInvNet+, DESIGN.md "The method"): domain 1 of every DSBN layer belongs to the
scan; it starts as a copy of domain 0 (unless the checkpoint was already adapted). Each step:

* a fresh synthetic batch (``synth_batch`` patches of ``synth_patch``³ voxels, drawn by
  :func:`napari_qsm.nn.synth.sample_pair` with the training augmentations from ``synth_heads``
  procedural heads at the scan's voxel-size regime, field computed with the scan's B0 direction)
  on domain 0 with L_S (keeps the shared weights honest);
* ``scan_batch`` random patches of the scan (``patch`` voxels per axis, capped to the scan, centres
  on mask voxels) on domain 1 with λ(t)·L_T, L_T = ‖W_t(e^{iφ(d∗χ)} − e^{iφ(f)})‖² /#mask
  (:func:`napari_qsm.nn.losses.loss_field`, φ = rad/ppm of the scan's TE and B0, default 3 T and
  20 ms). The measured field of a patch also holds the field of the tissue outside it, which
  d∗χ_patch cannot produce (17-23 % of the demeaned field on a clinical phantom). So both fields
  pass through the same spherical-mean-value high-pass (1 − S), S the normalised sphere of
  ``smv_mm`` (5 mm), and L_T is summed where the sphere stays inside the patch and the mask
  (SMV(mask) > 0.999): there the outside sources' field is harmonic and cancels (~0.2 % of the
  field left on that phantom, tests/nn/test_losses_smv.py). W_t = noise weighting (1/noise_std when the scan has a
  noise map, else the magnitude, σ propagated as √(σ² + S(σ²)) like MEDI's SMV), normalised to mean
  1 in that region. ``smv_mm=0`` gives the old, inexact term (unfiltered fields, ``margin_mm``
  band dropped inside each cut face);
* plus β·R on the same patches (``tv``, default 100): R = ‖w_G∘∇χ‖₁/#mask
  (:func:`napari_qsm.nn.losses.loss_edge_tv`), MEDI's morphology prior, with w_G the MEDI gradient
  mask of the scan's magnitude (:func:`napari_qsm.core.inversion.medi.gradient_mask`, computed once on the
  whole scan and cropped like the field); plain TV when the scan has no magnitude. L_T alone pulls
  this base away from the truth (docs/benchmarks/adapt_variants.md); with the prior it improves;
* λ(t) rises linearly from ``lam_start`` to ``lam_end`` over the run; Adam (``lr``), gradient
  norm clipped at ``grad_clip``; all weights are updated (shared convolutions by both losses,
  BN of domain 0 by L_S, BN of domain 1 by L_T).

``mode="finetune"`` (the paper's QSMInvNet baseline with the same budget): the network with one
shared BN (the base's domain-0 BN, i.e. the network trained on synthetic data only), fine-tuned
with L_T alone on the scan patches (``tv`` is ignored), no synthetic batches. Its checkpoint has one domain.

``mode="uqsm"`` (uQSM, Liu & Koch 2020, the paper's unsupervised baseline with the same budget): the
same U-Net (the base checkpoint's architecture; none of its weights) with one domain and, by default,
no normalisation (``uqsm_norm=none``: the BatchNorms are fixed to the identity and only their
per-channel bias and scale train, i.e. a plain conv + bias network as published; ``bn`` = one shared
BatchNorm), initialised at random from ``seed`` and trained on the scan patches only with
L_T + ``uqsm_tv``·TV: L_T in the same exact patch form (SMV high-pass of both fields, residual where the
sphere stays inside patch and mask) but weighted as published, w = magnitude / its maximum in the mask
(not renormalised; the mask without a magnitude), and TV = ‖∇χ‖₁/#mask (ppm/mm, no magnitude edges),
weight 0.001 as published. No λ ramp, no synthetic data. Input: ``uqsm_input=tkd`` (default) keeps the
base architecture's TKD channel, so step 0 is TKD (the output layer starts at zero) and training learns a
correction; ``field`` is the published field + mask input, which with a budget of minutes stays far from
a usable χ (docs/benchmarks/adapt.md). The checkpoint is a plain one-domain QSMInvNet
(``recon --method dsbn --weights UQSM.pt``). uQSM is a mode of the registered method "dsbn_adapt" (and of
``napari-qsm adapt --param mode=uqsm`` and the Adapt dock), not a method of its own, so the method list
(and the demo that runs every method) stay as they were.

Protocol adaptation (:func:`adapt_protocol`, or a list of scans to :func:`adapt`): one adaptation over
several scans of one scanner and protocol. Slot k of step t draws its scan at random (seeded), then a
patch of it as above; patches of one scan are stacked, each scan's group evaluated with that scan's own
voxel size, B0 direction (its own dipole kernel), phase scale, weights and TKD channel, and the losses
averaged over the batch. Scans may differ in shape, voxel size and B0 direction. dsbn: the synthetic
batches take the B0 direction of each scan in turn and the voxel-size regime of the first scan. The mean
correction (``keep_mean``) keeps the mean over the scans of the unadapted network's χ means (one output
bias serves them all). ``result.chis`` holds χ of every scan; the sidecar lists every scan's
fingerprint. One scan gives exactly the single-scan run.

Data of step t is a function of (seed, t) and the initial weights, so the same seed gives the same
result, and a resumed run continues with the same stream.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..core.constants import GAMMA_BAR_HZ_PER_T
from ..core.device import device_label, resolve_device
from ..core.method import Method, Result
from ..core.params import check_params, make_params, param, params_to_dict
from ..core.progress import Cancelled, Reporter, check_cancel
from .infer import (DSBNParams, WEIGHTS_DIR, WeightsError, default_weights_path, file_sha256, load_model,
                    predict)
from .inputs import network_input, tkd_channel
from .synth import crop_box
from .losses import DipoleOperator, LambdaSchedule, loss_edge_tv, loss_field, loss_supervised, noise_weights
from .unet import ConvBlock, NetConfig, QSMInvNet

__all__ = ["AdaptParams", "AdaptResult", "AdaptCancelled", "adapt", "adapt_protocol", "save_adapted", "adapt_cli",
           "load_adapted", "scan_patch_shape"]



class AdaptCancelled(Cancelled):
    """Adaptation cancelled; ``result`` holds the state after the last completed step."""

    def __init__(self, msg: str, result: "AdaptResult"):
        super().__init__(msg)
        self.result = result


@dataclass
class AdaptParams:
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
    keep_mean: bool = param(True, "keep the mean χ in the mask at the unadapted network's (the field carries no "
                                  "information about it; L_T alone lets it drift): shifts the output bias at the end", widget="advanced")
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
    """Outcome of :func:`adapt` (see the module docstring)."""

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


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _round16(n: int, mult: int = 16) -> int:
    return int(math.ceil(int(n) / mult) * mult)


def scan_patch_shape(scan_shape, patch: int, mult: int = 16) -> tuple:
    """Patch shape on a scan: ``patch`` per axis (multiple of 16), capped to the scan's padded size."""
    p = _round16(patch, mult)
    return tuple(min(p, _round16(n, mult)) for n in scan_shape)


def _rad_per_ppm(scan) -> float:
    """2π·γ̄·B0·TE of ``scan`` (3 T and 20 ms where it does not say; ``None`` = the reference scale)."""
    te = scan.te if getattr(scan, "te", None) else 0.02
    b0 = scan.b0_tesla if getattr(scan, "b0_tesla", None) else 3.0
    return 2.0 * math.pi * GAMMA_BAR_HZ_PER_T * float(b0) * float(te) * 1e-6


def phase_scale(scan, rad_per_ppm="reference") -> float:
    """The phase scale (rad per ppm) of L_T on ``scan`` for the parameter ``rad_per_ppm``.

    ``"reference"`` (default): 16.05 rad/ppm (3 T, 20 ms) on every scan. L_T ≈ scale²·(weighted field
    residual)², so with the scan's own TE (``"auto"``) its weight against L_S and the prior would change
    with the echo spacing: a front-end field fitted over ΔTE = 4.1 ms weighs 24× less than at 20 ms, and
    the λ ramp tuned at 20 ms then lets the prior and L_S pull χ away (pipeline-made slab, case 0 of
    docs/benchmarks/adapt_pipeline_lbv.md: 89.3 % demeaned NRMSE with ``auto`` against 70.7 % with the
    reference; the unadapted network 78.5 %).
    """
    if rad_per_ppm == "reference":
        return _rad_per_ppm(None)
    if rad_per_ppm == "auto":
        return _rad_per_ppm(scan)
    return float(rad_per_ppm)


def _inv_weight(scan, how: str) -> tuple[np.ndarray, str]:
    """σ-like map whose inverse is the noise weighting (1 = uniform), and the kind used."""
    if how in ("auto", "noise") and scan.noise_std is not None:
        return np.where(np.isfinite(scan.noise_std) & (scan.noise_std > 0), scan.noise_std, np.inf).astype(
            np.float32), "noise"
    if how == "noise":
        raise ValueError("weighting: 'noise' needs a noise map (scan.noise_std); use auto, magnitude or mask")
    if how in ("auto", "magnitude") and scan.magnitude is not None:
        mag = np.abs(scan.magnitude).astype(np.float32)
        ref = float(np.median(mag[scan.mask])) if scan.mask.any() else 1.0
        ref = ref if ref > 0 else 1.0
        return (ref / np.maximum(mag, 1e-3 * ref)).astype(np.float32), "magnitude"
    if how == "magnitude":
        raise ValueError("weighting: 'magnitude' needs a magnitude image; use auto or mask")
    return np.ones(scan.shape, np.float32), "mask"


def _edge_weights(scan) -> tuple[np.ndarray, str]:
    """MEDI's gradient mask w_G (3, X, Y, Z) of the whole scan (1 = no magnitude edge), and its kind."""
    from ..core.inversion.medi import MEDIParams, gradient_mask

    if scan.magnitude is None:
        return np.ones((3,) + tuple(scan.shape), bool), "plain TV (no magnitude)"
    mag = torch.from_numpy(np.abs(scan.magnitude).astype(np.float32))
    m = torch.from_numpy(scan.mask.astype(np.float32))
    wg, _ = gradient_mask(mag, m, scan.voxel_size, MEDIParams().percentage)
    return wg.numpy(), "magnitude edges"


def _synth_regime(voxel_size):
    """The training regime with the closest voxel size, else a standard 160x192x160 mm field of view."""
    from .synth import DEFAULT_REGIMES, Regime

    vs = np.asarray(voxel_size, float)
    best, dist = None, 1e9
    for r in DEFAULT_REGIMES:
        d = float(np.abs(np.log(vs / np.asarray(r.voxel_size, float))).max())
        if d < dist:
            best, dist = r, d
    if best is not None and dist < 0.05:
        return Regime(tuple(best.shape), tuple(best.voxel_size))
    shape = tuple(int(max(32, round(f / v))) for f, v in zip((160.0, 192.0, 160.0), vs))
    return Regime(shape, tuple(float(v) for v in vs))


def _check_scan(scan, p: AdaptParams, pshape) -> None:
    if not np.all(np.isfinite(scan.field[scan.mask])):
        raise ValueError("field: NaN/Inf inside the mask; fix the field or exclude those voxels from the mask")
    if scan.magnitude is not None and not np.all(np.isfinite(scan.magnitude[scan.mask])):
        raise ValueError("magnitude: NaN/Inf inside the mask")
    if p.smv_mm > 0:
        ext = np.asarray(pshape) * np.asarray(scan.voxel_size, float)
        if np.any(ext <= 2.0 * p.smv_mm + np.asarray(scan.voxel_size, float)):
            raise ValueError(f"smv_mm: a sphere of {p.smv_mm} mm does not fit in a scan patch of "
                             f"{tuple(round(float(e), 1) for e in ext)} mm; lower smv_mm or raise patch")
    n = int(scan.mask.sum())
    need = max(512, int(0.02 * np.prod(pshape)))
    if n < need:
        raise ValueError(f"mask: {n} voxels, too small for one adaptation patch of {tuple(pshape)} voxels "
                         f"(need at least {need} mask voxels)")


class _ScanPatches:
    """Random scan patches (network input, field, mask, interior weights) for step t."""

    def __init__(self, scan, p: AdaptParams, net_cfg, mult: int, device=None):
        self.scan = scan
        self.p = p
        self.net_cfg = net_cfg
        # the TKD channel is computed once on the whole scan and cropped, exactly as inference sees it
        self.tkd = (tkd_channel(scan.field, scan.mask, scan.voxel_size, scan.b0_direction, net_cfg.tkd_delta,
                                device=device) if net_cfg.has_tkd else None)
        self.pshape = scan_patch_shape(scan.shape, p.patch, mult)
        self.inv_w, self.weighting = _inv_weight(scan, p.weighting)
        self.idx = np.flatnonzero(scan.mask)
        vs = np.asarray(scan.voxel_size, float)
        self.margin = np.ceil(p.margin_mm / vs).astype(int)
        self.wg = self.edge_kind = None
        if p.tv > 0 and p.mode == "dsbn":
            self.wg, self.edge_kind = _edge_weights(scan)
        self.uw = None
        if p.mode == "uqsm":
            # uQSM's data weight w = magnitude / its maximum in the mask (not renormalised); mask without a magnitude
            if p.weighting in ("auto", "magnitude") and scan.magnitude is not None:
                mag = np.abs(scan.magnitude).astype(np.float32)
                mx = float(mag[scan.mask].max()) if scan.mask.any() else 0.0
                self.uw = (mag / mx if mx > 0 else np.ones_like(mag)).astype(np.float32)
                self.weighting = "magnitude / max in the mask (uQSM)"
            elif p.weighting == "magnitude":
                raise ValueError("weighting: 'magnitude' needs a magnitude image; use auto or mask")
            else:
                self.uw = np.ones(scan.shape, np.float32)
                self.weighting = "mask (uQSM, no magnitude)"
            self.edge_kind = "plain TV (uQSM)"
        # geometry and phase scale of this scan (protocol adaptation: every scan its own dipole kernel)
        self.vs = tuple(float(v) for v in scan.voxel_size)
        self.b0 = np.asarray(scan.b0_direction, float)
        self.ppp = phase_scale(scan, p.rad_per_ppm)

    def starts(self, step: int, k: int) -> np.ndarray:
        rng = np.random.default_rng([int(self.p.seed), int(step), int(k), 23])
        P = np.asarray(self.pshape)
        N = np.asarray(self.scan.shape)
        c = np.array(np.unravel_index(int(self.idx[rng.integers(self.idx.size)]), self.scan.shape))
        start = c - P // 2
        for ax in range(3):
            start[ax] = int(np.clip(start[ax], 0, N[ax] - P[ax])) if N[ax] >= P[ax] else 0
        return start

    def batch(self, step: int, device, ks=None):
        """Tensors of step t: network input, field, L_T mask, L_T noise weights (None with the SMV term:
        :func:`loss_field` builds them on its region), edge weights, prior mask, σ-like map; in uqsm mode the
        last is uQSM's (unnormalised) data weight instead of the σ-like map. ``ks``: the batch slots to draw
        (default all ``scan_batch``)."""
        xs, fs_, ms, ws, gs, ps = [], [], [], [], [], []
        smv = self.p.smv_mm > 0
        for k in (range(self.p.scan_batch) if ks is None else ks):
            st = self.starts(step, k)
            m = crop_box(self.scan.mask, st, self.pshape, False)
            f = crop_box(self.scan.field, st, self.pshape, 0.0) * m
            iw = crop_box(self.inv_w, st, self.pshape, np.inf)
            tk = crop_box(self.tkd, st, self.pshape, 0.0) if self.tkd is not None else None
            xs.append(network_input(f, m, self.net_cfg, tkd=tk))
            fs_.append(f[None])
            ws.append(iw[None] if self.uw is None else crop_box(self.uw, st, self.pshape, 0.0)[None])
            ps.append(m.astype(np.float32)[None])
            if self.wg is not None:
                gs.append(np.stack([crop_box(g, st, self.pshape, False) for g in self.wg]))
            if smv:          # loss_field erodes the patch mask by the sphere (faces included)
                ms.append(m.astype(np.float32)[None])
                continue
            # interior: drop a band along each face that cuts through the volume
            inner = np.ones(self.pshape, bool)
            for ax in range(3):
                N = self.scan.shape[ax]
                lo, hi = st[ax], st[ax] + self.pshape[ax]
                b = int(self.margin[ax])
                sl = [slice(None)] * 3
                if lo > 0 and b > 0:
                    sl[ax] = slice(0, b)
                    inner[tuple(sl)] = False
                if hi < N and b > 0:
                    sl[ax] = slice(self.pshape[ax] - b, None)
                    inner[tuple(sl)] = False
            mi = m & inner
            if not mi.any():      # a patch with no interior brain: fall back to the whole patch
                mi = m
            ms.append(mi.astype(np.float32)[None])
        t = lambda a: torch.from_numpy(np.ascontiguousarray(np.stack(a), dtype=np.float32)).to(device)
        x, f, mi, iw = t(xs), t(fs_), t(ms), t(ws)
        if self.uw is not None:
            return x, f, mi, iw * mi, None, t(ps) if smv else mi, iw
        w = None if smv else noise_weights(mi, iw)
        # the prior is taken on the L_T region of the old term, on the whole patch mask with the SMV term
        return x, f, mi, w, (t(gs) if gs else None), (t(ps) if smv else mi), iw


class _ProtocolPatches:
    """Scan patches drawn from several scans (protocol adaptation): slot k of step t comes from scan
    ``which(t, k)``; patches of one scan are stacked and evaluated with that scan's geometry. One scan
    gives exactly the single-scan stream of :class:`_ScanPatches`."""

    def __init__(self, scans, p: AdaptParams, net_cfg, mult: int, device=None):
        self.p = p
        self.parts = [_ScanPatches(sc, p, net_cfg, mult, device=device) for sc in scans]
        self.pshape = self.parts[0].pshape
        self.weighting = self.parts[0].weighting
        self.edge_kind = self.parts[0].edge_kind

    def which(self, step: int, k: int) -> int:
        if len(self.parts) == 1:
            return 0
        rng = np.random.default_rng([int(self.p.seed), int(step), int(k), 29])
        return int(rng.integers(len(self.parts)))

    def groups(self, step: int, device):
        """[(scan index, number of patches, tensors of _ScanPatches.batch)] for step t."""
        if len(self.parts) == 1:
            return [(0, self.p.scan_batch, self.parts[0].batch(step, device))]
        by = {}
        for k in range(self.p.scan_batch):
            by.setdefault(self.which(step, k), []).append(k)
        return [(i, len(ks), self.parts[i].batch(step, device, ks)) for i, ks in sorted(by.items())]


class _CancelHooks:
    """Cancel checks inside a step: before each conv block (forward) and on its output's gradient (backward)."""

    def __init__(self, model, cancel):
        self.handles = []
        if cancel is None:
            return

        def pre(mod, args):
            check_cancel(cancel)

        def post(mod, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: (check_cancel(cancel), g)[1])

        for mod in model.modules():
            if isinstance(mod, ConvBlock):
                self.handles.append(mod.register_forward_pre_hook(pre))
                self.handles.append(mod.register_forward_hook(post))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _buffers(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _restore_buffers(model, snap: dict) -> None:
    with torch.no_grad():
        for k, v in model.named_buffers():
            v.copy_(snap[k])


def _single_domain(model: QSMInvNet) -> QSMInvNet:
    """QSMInvNet (one shared BN) with the shared weights and the domain-0 BN of a QSMInvNet+."""
    if model.num_domains == 1:
        return model
    cfg = copy.deepcopy(model.config)
    cfg.num_domains = 1
    m1 = QSMInvNet(cfg)
    sd = {}
    for k, v in model.state_dict().items():
        if ".bns." in k:
            head, tail = k.split(".bns.", 1)
            d, rest = tail.split(".", 1)
            if d != "0":
                continue
            sd[k] = v
        elif k == "domain_trained":
            sd[k] = v[:1].clone()
        else:
            sd[k] = v
    m1.load_state_dict(sd)
    return m1


def _load_base(weights, base_path: str) -> QSMInvNet:
    try:
        return load_model(weights, device="cpu")
    except WeightsError as exc:
        msg = str(exc)
        if base_path not in msg:
            msg = f"{msg} [file: {base_path}]"
        raise WeightsError(msg) from None


def load_adapted(path) -> tuple[QSMInvNet, dict]:
    """Model and bookkeeping (step, optimizer, history, params, base) of an adapted checkpoint."""
    model = _load_base(path, str(path))
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # load_model read it a moment ago; keep the message uniform anyway
        raise WeightsError(f"resume: cannot read {path}: {exc}") from None
    if not isinstance(ck, dict) or "adapt_json" not in ck:
        raise WeightsError(f"resume: {path} is not an adapted checkpoint written by save_adapted "
                           f"(no adaptation state); pass it as weights= to start a new adaptation")
    meta = json.loads(ck["adapt_json"])
    meta["optimizer"] = ck.get("optimizer")
    if isinstance(ck.get("train_head_bias"), torch.Tensor):   # undo the mean shift baked in at the end
        with torch.no_grad():
            model.head.bias.copy_(ck["train_head_bias"])
    meta["step"] = int(ck.get("step", meta.get("step", 0)))
    return model, meta


# ----------------------------------------------------------------------------------------------
# adaptation
# ----------------------------------------------------------------------------------------------

def _uqsm_model(weights, base_path: str, p: AdaptParams) -> QSMInvNet:
    """uQSM's network: the base checkpoint's architecture (width, scales, TKD channel unless
    ``uqsm_input=field``) with one normalisation domain, freshly initialised (seeded; Kaiming-normal
    convolutions, zero output layer with the TKD channel so that step 0 is TKD). ``uqsm_norm=none``:
    every BatchNorm fixed to the identity (running mean 0, variance 1 − eps, kept in eval mode) with a
    trainable per-channel scale and bias, i.e. no normalisation; the checkpoint stays a plain
    one-domain QSMInvNet that :func:`napari_qsm.nn.infer.load_model` reads."""
    ref = _load_base(weights, base_path)          # architecture only; none of its weights are used
    d = ref.config.to_dict()
    d["num_domains"] = 1
    if p.uqsm_input == "field":
        d["tkd_delta"], d["in_channels"] = 0.0, 2
    cfg = NetConfig.from_dict(d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(p.seed))
        model = QSMInvNet(cfg)
        for mod in model.modules():
            if isinstance(mod, torch.nn.Conv3d) and mod is not model.head:
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    if p.uqsm_norm == "none":
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.BatchNorm3d):
                    mod.running_mean.zero_()
                    mod.running_var.fill_(1.0 - mod.eps)
    model.weights_sha256 = None
    model.architecture_of = base_path
    return model


def _train_mode(model: QSMInvNet, p: AdaptParams) -> None:
    """Training mode; with uQSM's ``uqsm_norm=none`` the (identity) BatchNorms stay in eval mode."""
    model.train()
    if p.mode == "uqsm" and p.uqsm_norm == "none":
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.eval()


def _as_scans(scan) -> tuple[list, list]:
    """(scans, their fingerprints): one Scan or a non-empty list of distinct scans."""
    scans = list(scan) if isinstance(scan, (list, tuple)) else [scan]
    if not scans:
        raise ValueError("scans: empty list; give at least one scan")
    for k, sc in enumerate(scans):
        if not all(hasattr(sc, a) for a in ("field", "mask", "voxel_size", "b0_direction")):
            raise ValueError(f"scans[{k}]: expected a napari_qsm Scan, got {type(sc).__name__}")
    fps = [sc.fingerprint() for sc in scans]
    dup = sorted({f for f in fps if fps.count(f) > 1})
    if dup:
        raise ValueError(f"scans: the same scan is given twice (fingerprint {dup[0]}); give each scan once")
    return scans, fps


def _scan_name(scans, k: int) -> str:
    return "" if len(scans) == 1 else f"scan {k + 1} ({getattr(scans[k], 'name', '') or 'unnamed'}): "


def adapt(scan, params: AdaptParams | dict | None = None, *, weights=None, device="auto", progress=None,
          cancel=None, resume=None, on_cancel: str = "raise", synth_regime=None) -> AdaptResult:
    """Adapt QSMInvNet+ (or fine-tune QSMInvNet, or train uQSM) to ``scan``; see the module docstring.

    ``scan``: one Scan, or a list of scans of one protocol (:func:`adapt_protocol`): patches are drawn from
    all of them, each with its own voxel size, B0 direction and phase scale, and one checkpoint serves
    them all (``result.chis``: χ of every scan, in order; ``result.chi`` the first).
    ``synth_regime`` (advanced, tests): ``(shape, voxel_size)`` of the synthetic heads instead of the
    training regime closest to the (first) scan's voxel size.
    """
    from .synth import PhantomPool, Regime, SynthConfig, sample_pair, to_tensors

    t_start = time.perf_counter()
    if params is None or isinstance(params, dict):
        p = make_params(AdaptParams, params or {})
    else:
        check_params(params)
        p = copy.deepcopy(params)
    if on_cancel not in ("raise", "return"):
        raise ValueError(f"on_cancel: expected 'raise' or 'return', got {on_cancel!r}")
    scans, fps = _as_scans(scan)
    dev = resolve_device(device)
    check_cancel(cancel)

    # -- model -----------------------------------------------------------------------------------
    history: list = []
    ref_mean = None
    step0 = 0
    opt_state = None
    seconds0 = 0.0
    arch_of = None
    if resume is not None:
        model, meta = load_adapted(resume)
        if meta.get("params", {}).get("mode", p.mode) != p.mode:
            raise ValueError(f"resume: {resume} was adapted in mode {meta['params']['mode']!r}, not {p.mode!r}")
        was = meta.get("scan_fingerprints") or ([meta["scan_fingerprint"]] if meta.get("scan_fingerprint") else None)
        if was and list(was) != fps:
            raise ValueError(f"resume: {resume} was adapted to another scan or scan set (fingerprints {', '.join(was)} ≠ "
                             f"{', '.join(fps)})")
        base_path, base_sha = meta.get("base_weights"), meta.get("base_sha256")
        history = list(meta.get("history", []))
        step0 = int(meta["step"])
        opt_state = meta.get("optimizer")
        seconds0 = float(meta.get("seconds", 0.0))
        ref_mean = meta.get("ref_mean")
        if p.mode == "uqsm":
            _train_mode(model, p)
    else:
        base_path = str(Path(weights) if weights is not None else default_weights_path())
        if p.mode == "uqsm":
            model = _uqsm_model(weights, base_path, p)
            arch_of, base_path, base_sha = base_path, None, None
        else:
            model = _load_base(weights, base_path)
            base_sha = model.weights_sha256
        if p.mode == "dsbn":
            if model.num_domains < 2:
                raise WeightsError(f"weights: {base_path} is a plain QSMInvNet (one BN domain); dsbn adaptation "
                                   f"needs a QSMInvNet+ checkpoint with 2 domains (or use mode=finetune)")
            if not int(model.domain_trained[1]):
                model.copy_domain(0, 1)   # the scan's BN starts from the synthetic one
        elif p.mode == "finetune":
            model = _single_domain(model)
    if p.mode == "dsbn" and model.num_domains < 2:
        raise WeightsError("weights: dsbn adaptation needs a checkpoint with 2 BN domains")
    if p.mode in ("finetune", "uqsm") and model.num_domains != 1:
        raise WeightsError(f"resume: a {p.mode} checkpoint must have one BN domain")
    dom_t = 1 if p.mode == "dsbn" else 0
    cs = float(model.io_scale[1])
    mult = model.config.multiple
    patches = _ProtocolPatches(scans, p, model.config, mult, device=dev)
    for k, (sc, part) in enumerate(zip(scans, patches.parts)):
        try:
            _check_scan(sc, p, part.pshape)
        except ValueError as exc:
            raise ValueError(f"{_scan_name(scans, k)}{exc}") from None
    model = model.to(dev)
    _train_mode(model, p)
    trainable = list(model.bn_parameters(dom_t)) if p.update == "bn" else list(model.parameters())
    opt = torch.optim.Adam(trainable, lr=p.lr)
    if opt_state:
        try:
            opt.load_state_dict(opt_state)
            for g in opt.param_groups:
                g["lr"] = p.lr
        except Exception as exc:
            raise WeightsError(f"resume: optimiser state of {resume} does not fit the model ({exc})") from None
    sched = LambdaSchedule(lam_max=p.lam_end, lam_min=p.lam_start, ramp=max(p.steps - 1, 1), kind="linear")
    op = DipoleOperator()
    geoms = [{"voxel_size": part.vs, "b0_direction": part.b0} for part in patches.parts]
    scan0 = scans[0]
    vs, b0, ppp = patches.parts[0].vs, patches.parts[0].b0, patches.parts[0].ppp
    geom = geoms[0]
    multi = len(scans) > 1

    rep = Reporter(progress, cancel, total=p.steps, stage={"dsbn": "adapt", "finetune": "finetune",
                                                          "uqsm": "uqsm"}[p.mode])

    # -- synthetic data (dsbn) --------------------------------------------------------------------
    use_synth = p.mode == "dsbn" and p.synth_batch > 0
    pool = scfg = None
    if use_synth and step0 < p.steps:
        scfg = SynthConfig(patch=(p.synth_patch,) * 3, pool_size=p.synth_heads, refresh_every=0,
                           seed_base=200_000 + 1000 * (p.seed % 1000),
                           regimes=(_synth_regime(vs) if synth_regime is None else
                                    Regime(tuple(synth_regime[0]), tuple(synth_regime[1])),))
        pool = PhantomPool(scfg, device="cpu")
        rep(step0, f"generating {p.synth_heads} synthetic head(s)", L_S=float("nan"), L_T=float("nan"))
        pool.sync(0, cancel_check=lambda: check_cancel(cancel))

    def synth_batch(step):
        heads = pool.heads()
        out = []
        for b in range(p.synth_batch):
            rng = np.random.default_rng([int(p.seed), int(step), b, 31])
            h = heads[int(rng.integers(len(heads)))]
            # protocol: the B0 direction of one of the scans (each in turn over the run)
            bb = b0 if not multi else patches.parts[(int(step) + b) % len(scans)].b0
            out.append(sample_pair(h, rng, scfg, augment=True, b0_direction=bb))
        return to_tensors(out, model.config, dev)

    def current_chi():
        chi, _ = predict(model, scan0.field, scan0.mask, domain=dom_t, device=dev, cancel=cancel, **geom)
        _train_mode(model, p)
        if ref_mean is not None:
            chi = np.where(scan0.mask, chi + (ref_mean - float(chi[scan0.mask].mean(dtype=np.float64))), 0.0)
        return chi.astype(np.float32)

    keep_mean = p.keep_mean and not (p.mode == "uqsm" and not model.config.has_tkd)
    ref_means = None
    if keep_mean and ref_mean is None:
        rep(step0, "reference χ mean of the unadapted network", L_S=float("nan"), L_T=float("nan"))
        ref_means = []
        for sc, g in zip(scans, geoms):
            chi0, _ = predict(model, sc.field, sc.mask, domain=dom_t, device=dev, cancel=cancel, **g)
            ref_means.append(float(chi0[sc.mask].mean(dtype=np.float64)))
            del chi0
        ref_mean = float(np.mean(ref_means))
        _train_mode(model, p)

    hooks = _CancelHooks(model, cancel)
    good = _buffers(model)
    step = step0
    t_loop = time.perf_counter()
    cancelled = False
    nb = float(p.scan_batch)
    try:
        while step < p.steps:
            check_cancel(cancel)
            t0 = time.perf_counter()
            lam = sched(step) if p.mode == "dsbn" else 1.0
            beta_t = p.tv * (lam / p.lam_end if p.tv_follow and p.lam_end > 0 else 1.0)
            opt.zero_grad(set_to_none=True)
            ls_val = float("nan")
            if use_synth:
                xs, ys = synth_batch(step)
                check_cancel(cancel)
                pred = model(xs, domain=0) * xs[:, 1:2]
                ls = loss_supervised(pred, ys)
                ls.backward()
                ls_val = float(ls.detach())
                del xs, ys, pred, ls
            check_cancel(cancel)
            lt_val = tv_val = scan_val = 0.0
            has_tv = False
            for si, n_k, tens in patches.groups(step, dev):
                part = patches.parts[si]
                x, f, mi, w, wg, mp, iw = tens
                share = n_k / nb           # a group's share of the batch mean (1 for one scan)
                chi_t = model(x, domain=dom_t) * x[:, 1:2] / cs
                if p.mode == "uqsm":
                    lt = loss_field(chi_t, f, mi, part.vs, part.b0, weights=w, phase_per_ppm=part.ppp, op=op,
                                    smv_radius_mm=p.smv_mm, normalise=False)
                    tv = loss_edge_tv(chi_t, None, mp, part.vs) if p.uqsm_tv > 0 else None   # plain TV
                    scan_loss = lt if tv is None else lt + p.uqsm_tv * tv
                else:
                    lt = loss_field(chi_t, f, mi, part.vs, part.b0, weights=w, phase_per_ppm=part.ppp, op=op,
                                    noise_std=iw, smv_radius_mm=p.smv_mm)
                    tv = loss_edge_tv(chi_t, wg, mp, part.vs) if wg is not None else None
                    scan_loss = lam * lt if tv is None else lam * lt + beta_t * tv
                (scan_loss * share if share != 1.0 else scan_loss).backward()
                lt_val += share * float(lt.detach())
                if tv is not None:
                    has_tv = True
                    tv_val += share * float(tv.detach())
                scan_val += share * float(scan_loss.detach())   # the value that was optimised, logged as is
                del x, f, mi, w, wg, mp, iw, chi_t, lt, tv, scan_loss, tens
            tv_val = tv_val if has_tv else float("nan")
            check_cancel(cancel)
            if not (math.isfinite(lt_val) and (math.isfinite(ls_val) or not use_synth)):
                raise FloatingPointError(f"adapt: loss became {lt_val}/{ls_val} at step {step}; lower lr")
            if p.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, p.grad_clip)
            opt.step()
            step += 1
            good = _buffers(model)
            now = time.perf_counter()
            done_here = step - step0
            eta = (now - t_loop) / done_here * (p.steps - step)
            row = {"step": step, "L_S": ls_val, "L_T": lt_val, "lambda": lam, "TV": tv_val,
                   "loss": (ls_val if use_synth else 0.0) + scan_val,
                   "seconds": round(seconds0 + now - t_start, 3), "step_seconds": round(now - t0, 3)}
            history.append(row)
            preview = None
            if p.preview_every and (step % p.preview_every == 0 or step == p.steps):
                preview = current_chi()
            msg = (f"step {step}/{p.steps}" + (f" L_S={ls_val:.4g}" if math.isfinite(ls_val) else "")
                   + f" L_T={lt_val:.4g}" + (f" R={tv_val:.3g}" if math.isfinite(tv_val) else "")
                   + f" λ={lam:.3g} ETA {eta:.0f}s")
            rep(step, msg, preview=preview, L_S=ls_val, L_T=lt_val, TV=tv_val, **{"lambda": lam}, eta_s=eta)
    except Cancelled:
        cancelled = True
        _restore_buffers(model, good)
        opt.zero_grad(set_to_none=True)
    finally:
        hooks.remove()

    model.eval()
    if step > 0 or resume is not None:
        model.mark_trained(dom_t)
    info = {"patch_shape": list(patches.pshape), "weighting": patches.weighting, "edge_prior": patches.edge_kind,
            "rad_per_ppm": ppp, "domain": dom_t, "ref_mean": ref_mean,
            "synth_regime": None if scfg is None else
            {"shape": list(scfg.regimes[0].shape), "voxel_size": list(scfg.regimes[0].voxel_size)}}
    if arch_of is not None:
        info["architecture_of"] = arch_of
        info["input"] = "field, mask, TKD" if model.config.has_tkd else "field, mask"
        info["normalisation"] = "none" if p.uqsm_norm == "none" else "one BatchNorm"
    if multi:
        info["scans"] = [{"fingerprint": fp, "name": getattr(sc, "name", None), "shape": list(sc.shape),
                          "voxel_size": list(g["voxel_size"]), "b0_direction": [float(v) for v in g["b0_direction"]],
                          "rad_per_ppm": part.ppp, "patch_shape": list(part.pshape)}
                         for fp, sc, g, part in zip(fps, scans, geoms, patches.parts)]
        if ref_means is not None:
            info["ref_means"] = ref_means
    res = AdaptResult(model=model, chi=None, history=history, seconds=0.0, device=device_label(dev), params=p,
                      step=step, base_weights=base_path, base_sha256=base_sha,
                      scan_fingerprint=fps[0] if not multi else None, optimizer_state=opt.state_dict(),
                      cancelled=cancelled, info=info)
    res.scan_fingerprints = fps
    if cancelled:
        res.seconds = seconds0 + time.perf_counter() - t_start
        if on_cancel == "return":
            return res
        raise AdaptCancelled(f"adaptation cancelled after step {step}/{p.steps}", res)
    dp = DSBNParams()
    try:
        if not multi:
            chi, pinfo = predict(model, scan0.field, scan0.mask, domain="auto", device=dev, **geom,
                                 memory_gb=dp.memory_gb, tile=dp.tile, overlap=dp.overlap, cancel=cancel)
            if ref_mean is not None and step > 0:
                res.info["train_head_bias"] = model.head.bias.detach().cpu().clone()
                # bake the mean correction into the output bias, so the checkpoint alone reproduces χ
                delta = ref_mean - float(chi[scan0.mask].mean(dtype=np.float64))
                with torch.no_grad():
                    model.head.bias += torch.tensor([delta * cs], dtype=model.head.bias.dtype, device=model.head.bias.device)
                res.info["mean_shift_ppm"] = delta
                chi, pinfo = predict(model, scan0.field, scan0.mask, domain="auto", device=dev, **geom,
                                     memory_gb=dp.memory_gb, tile=dp.tile, overlap=dp.overlap, cancel=cancel)
            chis, pinfos = [chi], [pinfo]
        else:
            chis, pinfos = [], []
            for k, (sc, g) in enumerate(zip(scans, geoms)):
                rep(step, f"χ of scan {k + 1}/{len(scans)}", L_S=float("nan"), L_T=float("nan"))
                c, pi = predict(model, sc.field, sc.mask, domain="auto", device=dev, **g, memory_gb=dp.memory_gb,
                                tile=dp.tile, overlap=dp.overlap, cancel=cancel)
                chis.append(c)
                pinfos.append(pi)
            if ref_mean is not None and step > 0:
                # one output bias for the protocol: the mean over the scans of the unadapted means kept
                res.info["train_head_bias"] = model.head.bias.detach().cpu().clone()
                delta = ref_mean - float(np.mean([c[sc.mask].mean(dtype=np.float64) for c, sc in zip(chis, scans)]))
                with torch.no_grad():
                    model.head.bias += torch.tensor([delta * cs], dtype=model.head.bias.dtype, device=model.head.bias.device)
                res.info["mean_shift_ppm"] = delta
                # the bias is a constant in χ: inside each mask χ moves by delta (what inference now gives)
                chis = [np.where(sc.mask, c + np.float32(delta), c).astype(np.float32) for c, sc in zip(chis, scans)]
            pinfo = pinfos[0]
    except Cancelled:
        res.cancelled = True
        res.seconds = seconds0 + time.perf_counter() - t_start
        if on_cancel == "return":
            return res
        raise AdaptCancelled(f"adaptation cancelled during the final inference (after step {step})", res) from None
    res.chi = chis[0]
    res.chis = chis
    res.info["predict"] = pinfo
    res.seconds = seconds0 + time.perf_counter() - t_start
    rep(step, f"done: {step} steps in {res.seconds:.1f} s", L_S=history[-1]["L_S"] if history else float("nan"),
        L_T=history[-1]["L_T"] if history else float("nan"))
    return res


def adapt_protocol(scans, params: AdaptParams | dict | None = None, **kwargs) -> AdaptResult:
    """Adapt one checkpoint to every scan of a protocol (a list of :class:`~napari_qsm.core.scan.Scan`).

    The same as :func:`adapt` with a list: each step's scan patches come from scans drawn at random
    (seeded), every patch with its own scan's voxel size, B0 direction (dipole kernel), phase scale,
    noise weighting and TKD channel; scans may differ in shape, voxel size and B0 direction. The
    result's ``chis`` holds χ of every scan (in order); :func:`save_adapted` lists every fingerprint.
    Then ``recon --method dsbn --weights SITE.pt`` reconstructs new scans of that protocol.
    """
    scans = list(scans) if isinstance(scans, (list, tuple)) else None
    if not scans:
        raise ValueError("scans: expected a non-empty list of scans")
    return adapt(scans, params, **kwargs)


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def _check_target(path, base_weights_path=None) -> Path:
    path = Path(path)
    if path.suffix.lower() == ".json":
        raise ValueError(f"save path: {path} ends in .json (the sidecar); choose a .pt path")
    if path.exists() and path.is_dir():
        raise ValueError(f"save path: {path} is a directory; give a file name ending in .pt")
    rp = path.resolve()
    shipped = WEIGHTS_DIR.resolve()
    if rp.parent == shipped or shipped in rp.parents:
        raise ValueError(f"save path: {path} is inside the shipped weights directory {shipped}; "
                         f"adapted weights never go there, choose another path")
    if base_weights_path is not None and Path(base_weights_path).exists() and rp == Path(base_weights_path).resolve():
        raise ValueError(f"save path: {path} is the base checkpoint; choose another path")
    return path


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return _jsonable(v.item())
    return v


def save_adapted(result: AdaptResult, path, base_weights_path=None, scan=None) -> Path:
    """Write the adapted checkpoint + JSON sidecar atomically (see the module docstring)."""
    base = base_weights_path if base_weights_path is not None else result.base_weights
    path = _check_target(path, base)
    base_sha = result.base_sha256
    if base_weights_path is not None:
        if not Path(base_weights_path).is_file():
            raise ValueError(f"base_weights_path: {base_weights_path} is not a file")
        base_sha = file_sha256(base_weights_path)
    fps = list(result.scan_fingerprints or ([result.scan_fingerprint] if result.scan_fingerprint else []))
    scans = None if scan is None else (list(scan) if isinstance(scan, (list, tuple)) else [scan])
    if scans is not None:
        given = [sc.fingerprint() for sc in scans]
        if fps and given != fps:
            raise ValueError(f"scan: fingerprint(s) {', '.join(given)} differ from the adapted scan(s)' "
                             f"{', '.join(fps)}")
        fps = given
    fp = fps[0] if len(fps) == 1 else None
    model = result.model
    L_T = result.losses("L_T")
    L_S = result.losses("L_S")
    what = "one scan" if len(fps) <= 1 else f"{len(fps)} scans of one protocol"
    meta = {
        "kind": "napari-qsm adapted checkpoint",
        "model": {"dsbn": f"QSMInvNet+ (DSBN) adapted to {what}",
                  "finetune": f"QSMInvNet fine-tuned on {what} (L_T only)",
                  "uqsm": f"uQSM: U-Net trained from random initialisation on {what} (physics loss + TV, no labels)"
                  }[result.mode],
        "mode": result.mode,
        "base_weights": str(base) if base is not None else None,
        "base_sha256": base_sha,
        "scan_fingerprint": fp,
        "scan_fingerprints": fps,
        "scan": scans[0].info() if scans is not None and len(scans) == 1 else None,
        "scans": [sc.info() for sc in scans] if scans is not None and len(scans) > 1 else None,
        "step": int(result.step),
        "steps_target": int(result.params.steps),
        "cancelled": bool(result.cancelled),
        "seconds": round(float(result.seconds), 2),
        "device": result.device,
        "params": params_to_dict(result.params),
        "architecture": model.config.to_dict(),
        "domain_trained": model.domain_trained.tolist(),
        "losses": {
            "L_T_first": float(L_T[0]) if L_T.size else None, "L_T_last": float(L_T[-1]) if L_T.size else None,
            "L_S_first": float(L_S[0]) if L_S.size else None, "L_S_last": float(L_S[-1]) if L_S.size else None,
        },
        "history": result.history,
        "info": {k: v for k, v in result.info.items() if not isinstance(v, torch.Tensor)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta = _jsonable(meta)
    ck = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
          "optimizer": result.optimizer_state or {}, "step": int(result.step),
          "train_head_bias": result.info.get("train_head_bias", model.head.bias.detach().cpu()),
          "adapt_json": json.dumps({k: meta[k] for k in ("mode", "base_weights", "base_sha256", "scan_fingerprint",
                                                         "scan_fingerprints", "step", "seconds", "params", "history")}
                                | {"ref_mean": result.info.get("ref_mean")})}
    path.parent.mkdir(parents=True, exist_ok=True)
    side = path.with_suffix(".json")
    from ..core.files import atomic_files
    with atomic_files(path, side) as (tmp_pt, tmp_js):  # both 0644 (umask 022) like every other output
        torch.save(ck, tmp_pt)
        meta["sha256"] = file_sha256(tmp_pt)
        meta["file"] = path.name
        with open(tmp_js, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.write("\n")
    return path


# ----------------------------------------------------------------------------------------------
# command line and method registry
# ----------------------------------------------------------------------------------------------

def adapt_cli(scan, steps=None, weights=None, save_weights=None, params=None, device="auto",
              progress=None):
    """``napari-qsm adapt``: adapt, optionally save the checkpoint, return a :class:`Result`.

    ``scan``: one Scan (returns one Result) or a list of scans of one protocol (returns a list of
    Results, one per scan, in order, from the one adapted checkpoint)."""
    values = dict(params or {})
    if steps is not None:
        values["steps"] = steps
    p = make_params(AdaptParams, values)
    if save_weights is not None:
        _check_target(save_weights, weights if weights is not None else default_weights_path())
    multi = isinstance(scan, (list, tuple)) and len(scan) > 1
    res = adapt(scan, p, weights=weights, device=device, progress=progress)
    extras = _extras(res)
    if save_weights is not None:
        out = save_adapted(res, save_weights, weights if p.mode != "uqsm" else None, scan)
        extras["adapted_weights"] = str(out)
    name = {"dsbn": "dsbn_adapt", "finetune": "qsminvnet_finetune", "uqsm": "uqsm"}[p.mode]
    scans = list(scan) if isinstance(scan, (list, tuple)) else [scan]
    out = [Result(chi=c, method=name, params=params_to_dict(p), seconds=res.seconds, device=res.device,
                  extras=dict(extras, protocol_scans=len(scans)) if multi else extras, scan_info=sc.info())
           for c, sc in zip(res.chis, scans)]
    return out if multi else out[0]


def _extras(res: AdaptResult) -> dict:
    L_T = res.losses("L_T")
    return {"mode": res.mode, "steps": res.step, "base_weights": res.base_weights, "base_sha256": res.base_sha256,
            "L_T_first": float(L_T[0]) if L_T.size else None, "L_T_last": float(L_T[-1]) if L_T.size else None,
            "seconds_per_step": float(np.mean([h["step_seconds"] for h in res.history])) if res.history else None,
            **{k: v for k, v in res.info.items() if k != "predict" and not isinstance(v, torch.Tensor)}}


def _run(scan, p: AdaptParams, *, device, progress=None, cancel=None, weights=None, **_):
    res = adapt(scan, p, weights=weights, device=device, progress=progress, cancel=cancel)
    return {"chi": res.chi, "extras": _extras(res)}


METHODS = (Method(
    "dsbn_adapt", "QSMInvNet+ adapted to this scan", AdaptParams, _run, order=45,
    short="QSMInvNet+ adapted ({steps} steps)", accepts_weights=True,
    long_running=True, uses_magnitude=True,
    doc="Adapts QSMInvNet+ to the open scan for a few minutes (synthetic L_S on domain 0 + λ·L_T on the scan's "
        "domain 1), then reconstructs with the scan's own batch norms. mode=finetune gives the QSMInvNet baseline; "
        "mode=uqsm trains uQSM (the same U-Net from scratch on the scan alone)."),)
