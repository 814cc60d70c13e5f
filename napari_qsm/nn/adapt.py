"""On-scan adaptation of QSMInvNet+ (DSBN) to the open scan (or to several scans of one protocol), and the
QSMInvNet fine-tune and uQSM baselines with the same budget.

Public API: :class:`AdaptParams`, :func:`adapt`, :func:`adapt_protocol`, :func:`save_adapted`,
:func:`load_adapted`, :func:`adapt_cli` and the registered method ``"dsbn_adapt"``. The parts live in
:mod:`napari_qsm.nn.adaptation`; the method, its losses and its modes are described in docs/adaptation.md.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.method import Method, Result
from ..core.params import check_params, make_params, params_to_dict
from ..core.progress import Cancelled, check_cancel
from .adaptation import loop
from .adaptation.model import _as_scans, load_adapted
from .adaptation.patches import _inv_weight, phase_scale, scan_patch_shape  # noqa: F401  (benchmarks use them)
from .adaptation.records import AdaptCancelled, AdaptParams, AdaptResult
from .adaptation.saving import _check_target, save_adapted
from .infer import default_weights_path

__all__ = ["AdaptParams", "AdaptResult", "AdaptCancelled", "adapt", "adapt_protocol", "save_adapted", "adapt_cli",
           "load_adapted", "scan_patch_shape"]


def adapt(scan, params: AdaptParams | dict | None = None, *, weights=None, device="auto", progress=None,
          cancel=None, resume=None, on_cancel: str = "raise", synth_regime=None) -> AdaptResult:
    """Adapt QSMInvNet+ (or fine-tune QSMInvNet, or train uQSM) to ``scan``.

    Parameters
    ----------
    scan : Scan or list of Scan
        One scan, or several scans of one protocol (:func:`adapt_protocol`): patches are drawn from all
        of them, each with its own voxel size, B0 direction and phase scale, and one checkpoint serves
        them all.
    params : AdaptParams or dict or None
        The parameters (``mode``: dsbn, finetune or uqsm; ``steps``, ``lr``, λ ramp, prior...); a dict
        of values (strings allowed) is checked against :class:`AdaptParams`.
    weights : str or Path or None
        Base checkpoint; None = the shipped ``napari_qsm/nn/weights/qsminvnet_plus.pt``.
    device : str
        "auto" (CUDA when present), "cpu" or "cuda".
    progress : callable or None
        Receives a :class:`~napari_qsm.core.progress.Progress` every step (message
        ``"step s/n L_S=… L_T=… [R=…] λ=… ETA …s"``; ``losses`` with ``L_S``, ``L_T``, ``TV``, ``lambda``,
        ``eta_s``) and, every ``preview_every`` steps, ``preview`` = the current χ.
    cancel : token or None
        Checked between steps and inside each step (each conv block, forward and backward).
    resume : str or Path or None
        An adapted checkpoint written by :func:`save_adapted`; the run continues from its step
        (optimiser state included) to ``params.steps`` with the same data stream.
    on_cancel : {"raise", "return"}
        On cancel the model is restored to the last completed step; "raise" raises
        :class:`AdaptCancelled` with that result in ``exc.result``, "return" returns it
        (``result.cancelled`` is True, ``chi`` None).
    synth_regime : (shape, voxel_size) or None
        Advanced (tests): the synthetic heads' grid instead of the training regime closest to the
        (first) scan's voxel size.

    Returns
    -------
    AdaptResult
        The adapted model, χ (ppm; whole-volume inference followed by the dsbn method's data consistency
        (``consistency``, ``consistency_mu``), exactly as ``recon --method dsbn --weights ADAPTED.pt --param
        reference=none`` computes it; ``chis`` for every scan), the loss history, seconds and device.

    References
    ----------
    .. [1] Liu J, Koch KM. QSMInvNet+: a 3-D U-Net with domain-specific batch normalisation, adapted
           to the scan with L_S + λ(t)·L_T (abstract; the method of DESIGN.md).
    .. [2] Liu J, Koch KM. uQSM: unsupervised QSM with the loss |w(e^{if} − e^{iD∗χ})|² + 0.001·TV(χ)
           (2020).
    .. [3] Liu T, et al. Morphology enabled dipole inversion (MEDI) from a single-angle acquisition:
           comparison with COSMOS in human brain imaging. Magn Reson Med 66:777-783 (2011).
    """
    if params is None or isinstance(params, dict):
        p = make_params(AdaptParams, params or {})
    else:
        check_params(params)
        p = copy.deepcopy(params)
    if on_cancel not in ("raise", "return"):
        raise ValueError(f"on_cancel: expected 'raise' or 'return', got {on_cancel!r}")
    scans, fps = _as_scans(scan)
    run = loop.Run(scans, fps, p, resolve_device(device), progress, cancel, resume)
    check_cancel(cancel)
    loop.start(run, weights)
    loop.prepare(run)
    loop.synthetic_pool(run, synth_regime)
    loop.reference_mean(run)
    step, cancelled = loop.train(run)
    res = loop.result(run, step, cancelled)
    msg = f"adaptation cancelled after step {step}/{p.steps}"
    if not cancelled:
        try:
            chis, pinfo = loop.final_chis(run, res, step)
        except Cancelled:
            cancelled, msg = True, f"adaptation cancelled during the final inference (after step {step})"
    res.seconds = run.seconds0 + time.perf_counter() - run.t_start
    if cancelled:
        res.cancelled = True
        if on_cancel == "return":
            return res
        raise AdaptCancelled(msg, res)
    res.chi, res.chis = chis[0], chis
    res.info["predict"] = pinfo
    h = run.history
    run.rep(step, f"done: {step} steps in {res.seconds:.1f} s", L_S=h[-1]["L_S"] if h else float("nan"),
            L_T=h[-1]["L_T"] if h else float("nan"))
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
    from ..core.method import apply_reference, with_reference

    p = make_params(with_reference(AdaptParams), values)   # the one χ reference of every method (core.method)
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
    refs = [apply_reference(c, sc.mask, p.reference, scan=sc) for c, sc in zip(res.chis, scans)]
    out = [Result(chi=c, method=name, params=params_to_dict(p), seconds=res.seconds, device=res.device,
                  extras=dict(extras, **ref, **({"protocol_scans": len(scans)} if multi else {})), scan_info=sc.info())
           for (c, ref), sc in zip(refs, scans)]
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
