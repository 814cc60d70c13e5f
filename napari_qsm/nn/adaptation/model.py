"""Models of the adaptation: the base, the one-domain baseline, uQSM's fresh network, resume, cancel hooks."""

from __future__ import annotations

import copy
import json

import torch

from ...core.progress import check_cancel
from ..infer import WeightsError, load_model
from ..unet import ConvBlock, NetConfig, QSMInvNet
from .records import AdaptParams


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
