"""Whole-volume QSMInvNet(+) inference and the "dsbn" reconstruction method.

* :func:`load_model` reads a state_dict (``torch.load(weights_only=True)``; the shipped weights by
  default, or a user path). The architecture is read from the tensors themselves (widths, number
  of domains, the ``io_scale`` buffer), so adapted checkpoints need no separate config; a file of
  another architecture or a corrupted file raises :class:`WeightsError` with a clear message.
* :func:`predict` runs the network on a whole volume, float32: the network input is
  (field·mask·field_scale, mask[, χ_TKD·chi_scale]) from :mod:`napari_qsm.nn.inputs`; the volume
  is zero-padded at the end of each axis to a multiple of 16 and cropped back. When the padded volume exceeds the memory budget it is cut into tiles
  (multiples of 16, aligned to the pooling grid) that overlap by ``overlap`` voxels: in each
  overlap the outer half of a tile is discarded (its halo, where zero padding at the tile border
  leaks in) and the inner half is cross-faded with a cosine window. With ``overlap/2`` at least
  the receptive-field radius the tiled result equals one pass.
* Domain: ``"auto"`` uses the highest domain whose BN was trained (the adapted domain 1 when the
  checkpoint was adapted, else domain 0).
* Device: "auto" (CUDA when present), "cpu", "cuda".
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.device import resolve_device
from ..core.files import atomic_write
from ..core.files import sha256_file as file_sha256  # re-exported: adapt.py and benchmarks import it from here
from ..core.method import Method
from ..core.params import param
from ..core.progress import Reporter
from .inputs import network_input
from .unet import NetConfig, QSMInvNet, receptive_radius

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = "qsminvnet_plus.pt"


class WeightsError(ValueError):
    """A weights file is missing, corrupted or of another architecture."""


def default_weights_path() -> Path:
    return WEIGHTS_DIR / DEFAULT_WEIGHTS


def card_path(weights_path) -> Path:
    return Path(weights_path).with_suffix(".json")


def write_card(path, card: dict) -> None:
    """Atomic JSON write (temporary file, then rename)."""
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(card, fh, indent=2, default=str)
            fh.write("\n")

    atomic_write(path, write)


def read_card(weights_path) -> dict:
    """The JSON card next to a checkpoint, or {}; a card that is not a JSON object is ignored with a warning
    (:func:`napari_qsm.core.io.read_json_object`, optional)."""
    from ..core.io import read_json_object

    return read_json_object(card_path(weights_path), f"weights {Path(weights_path).name}", optional=True)


def config_from_state_dict(sd: dict) -> NetConfig:
    """Recover the :class:`NetConfig` from the tensors of a QSMInvNet state_dict."""
    try:
        w0 = sd["down.0.conv.weight"]
        base, cin = int(w0.shape[0]), int(w0.shape[1])
        nd = len({k.split(".bns.")[1].split(".")[0] for k in sd if k.startswith("down.0.norm.bns.")})
        fs, cs = (float(v) for v in sd["io_scale"].tolist()) if "io_scale" in sd else (10.0, 10.0)
        delta = float(sd["tkd_delta"]) if "tkd_delta" in sd else 0.0
    except Exception as exc:
        raise WeightsError(f"weights: not a QSMInvNet state_dict (missing {exc}); expected the keys of "
                           f"napari_qsm.nn.unet.QSMInvNet") from None
    if (delta > 0) != (cin == 3):
        raise WeightsError(f"weights: {cin} input channels but TKD threshold {delta} (expected 3 channels with "
                           f"a TKD channel, 2 without)")
    return NetConfig(base_width=base, num_domains=max(nd, 1), in_channels=cin, field_scale=fs, chi_scale=cs,
                     tkd_delta=delta)


def load_model(path=None, device="cpu") -> QSMInvNet:
    """Load a QSMInvNet(+) from a state_dict file (default: the shipped weights), in eval mode.

    Accepts a plain state_dict or a training checkpoint (a dict with a "model" state_dict).
    The model's ``weights_path``, ``weights_sha256`` and ``card`` attributes describe the source.
    """
    p = Path(path) if path is not None else default_weights_path()
    if not p.exists():
        if path is None:
            raise WeightsError(f"weights: no shipped weights found at {p}; train them "
                               f"(python -m src_models.train_qsminvnet) or pass --weights CKPT")
        raise WeightsError(f"weights: file not found: {p}")
    if p.is_dir():
        raise WeightsError(f"weights: {p} is a directory, expected a .pt file")
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"weights: cannot read {p} as a torch state_dict (corrupted or not a checkpoint: "
                           f"{type(exc).__name__}: {str(exc)[:200]})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"weights: {p} does not hold a state_dict of tensors")
    if "tkd_delta" not in sd and "down.0.conv.weight" in sd:   # checkpoints older than the physics channel
        sd = dict(sd, tkd_delta=torch.tensor(0.0))
    cfg = config_from_state_dict(sd)
    model = QSMInvNet(cfg)
    missing, unexpected = [], []
    own = model.state_dict()
    for k in own:
        if k not in sd:
            missing.append(k)
    for k in sd:
        if k not in own:
            unexpected.append(k)
    bad = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        msg = []
        if missing:
            msg.append(f"missing {missing[:4]}{'...' if len(missing) > 4 else ''}")
        if unexpected:
            msg.append(f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
        if bad:
            msg.append(f"shape mismatch {bad[:4]}")
        raise WeightsError(f"weights: {p} is not a QSMInvNet checkpoint of a compatible architecture ({'; '.join(msg)})")
    model.load_state_dict(sd)
    for k, v in sd.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise WeightsError(f"weights: {p} contains NaN/Inf in {k} (corrupted)")
    model.eval()
    model.to(resolve_device(device))
    model.weights_path = str(p)
    model.weights_sha256 = file_sha256(p)
    model.card = read_card(p)
    return model


# ----------------------------------------------------------------------------------------------
# whole-volume prediction
# ----------------------------------------------------------------------------------------------

def bytes_per_voxel(cfg: NetConfig) -> float:
    """Rough peak bytes per (padded) voxel of a float32 forward pass in inference mode."""
    return 4.0 * (8 * cfg.base_width + 8)


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    if n <= tile:
        return [0]
    step = tile - overlap
    out = list(range(0, n - tile, step))
    out.append(n - tile)
    return sorted(set(out))


def _window_1d(n: int, tile: int, start: int, overlap: int, dtype=np.float32) -> np.ndarray:
    """Blend weight along one axis: 0 on the outer half of an interior overlap, cosine ramp on the inner half."""
    w = np.ones(tile, dtype=np.float64)
    halo = overlap // 2
    ramp = overlap - halo
    for side in (0, 1):
        at_border = (start == 0) if side == 0 else (start + tile >= n)
        if at_border or overlap <= 0:
            continue
        prof = np.zeros(overlap)
        if ramp > 0:
            prof[halo:] = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        if side == 0:
            w[:overlap] *= prof
        else:
            w[tile - overlap:] *= prof[::-1]
    return w.astype(dtype)


@torch.no_grad()
def predict(model: QSMInvNet, field: np.ndarray, mask: np.ndarray, *, domain="auto", device=None,
            memory_gb: float = 3.0, tile: int = 0, overlap: int = 32, progress=None, cancel=None,
            voxel_size=None, b0_direction=None) -> tuple[np.ndarray, dict]:
    """χ (ppm, float32, masked) of a field (ppm) and mask; returns (χ, info).

    ``voxel_size`` (mm) and ``b0_direction`` are needed by checkpoints with a TKD input channel
    (:mod:`napari_qsm.nn.inputs`); the channel is computed on the whole volume before tiling.
    """
    field = np.asarray(field, dtype=np.float32)
    mask = np.asarray(mask) > 0.5
    if field.ndim != 3 or field.shape != mask.shape:
        raise ValueError(f"field/mask: expected two 3-D volumes of one shape, got {field.shape} and {mask.shape}")
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model = model.to(dev).eval()
    if domain == "auto" or domain is None:
        dom = model.default_domain()
    else:
        dom = int(domain)
        if not 0 <= dom < model.num_domains:
            raise ValueError(f"domain: expected 0..{model.num_domains - 1} or 'auto', got {domain!r}")
    cs = float(model.io_scale[1])
    mult = model.config.multiple
    shape = field.shape
    pshape = tuple(_round_up(n, mult) for n in shape)
    budget = max(float(memory_gb), 0.05) * 2 ** 30
    bpv = bytes_per_voxel(model.config)
    if tile <= 0:
        if np.prod(pshape) * bpv <= budget:
            tile_shape = pshape
        else:
            t = int((budget / bpv) ** (1 / 3)) // mult * mult
            tile_shape = tuple(min(p, max(t, 2 * mult)) for p in pshape)
    else:
        t = _round_up(int(tile), mult)
        tile_shape = tuple(min(p, t) for p in pshape)
    ov = _round_up(max(int(overlap), 0), mult) if overlap else 0
    x = np.zeros((model.config.in_channels,) + pshape, np.float32)
    x[:, : shape[0], : shape[1], : shape[2]] = network_input(field, mask, model.config, voxel_size, b0_direction,
                                                             device=dev)
    rep = Reporter(progress, cancel, stage="QSMInvNet+ inference")
    if tile_shape == pshape:
        rep(0, "one pass", total=1)
        xt = torch.from_numpy(x)[None].to(dev)
        out = model(xt, domain=dom)[0, 0].float().cpu().numpy()
        ntiles = 1
        rep(1, "done", total=1)
    else:
        ovs = [min(ov, ts - mult) if ts < p else 0 for ts, p in zip(tile_shape, pshape)]
        starts = [_starts(p, ts, o) for p, ts, o in zip(pshape, tile_shape, ovs)]
        acc = np.zeros(pshape, np.float32)
        wsum = np.zeros(pshape, np.float32)
        ntiles = len(starts[0]) * len(starts[1]) * len(starts[2])
        k = 0
        for i in starts[0]:
            for j in starts[1]:
                for l in starts[2]:
                    rep(k, f"tile {k + 1}/{ntiles}", total=ntiles)
                    sl = (slice(i, i + tile_shape[0]), slice(j, j + tile_shape[1]), slice(l, l + tile_shape[2]))
                    xt = torch.from_numpy(np.ascontiguousarray(x[(slice(None),) + sl]))[None].to(dev)
                    y = model(xt, domain=dom)[0, 0].float().cpu().numpy()
                    w = (_window_1d(pshape[0], tile_shape[0], i, ovs[0])[:, None, None]
                         * _window_1d(pshape[1], tile_shape[1], j, ovs[1])[None, :, None]
                         * _window_1d(pshape[2], tile_shape[2], l, ovs[2])[None, None, :])
                    acc[sl] += y * w
                    wsum[sl] += w
                    k += 1
        rep(ntiles, "done", total=ntiles)
        out = acc / np.maximum(wsum, 1e-12)
    chi = out[: shape[0], : shape[1], : shape[2]] / cs
    chi = np.where(mask, chi, 0.0).astype(np.float32)
    info = {"domain": dom, "padded_shape": list(pshape), "tile_shape": list(tile_shape), "tiles": ntiles,
            "overlap": ov if ntiles > 1 else 0, "receptive_radius": receptive_radius()}
    return chi, info


# ----------------------------------------------------------------------------------------------
# method registration
# ----------------------------------------------------------------------------------------------

# data consistency after the network (core/inversion/consistency.py), weighted by 1/N_std when the scan has a
# noise map: chosen on the SELECTION set of src_models/validate_families.py (procedural seeds 5001-5002,
# texture seeds 5101-5102, 1 mm and slab) and the selection head (seed 1) of benchmarks/bench_inversions.py
DC_ITERATIONS = 10
DC_MU = 0.003


def consistency_weight(noise_std, mask) -> tuple:
    """Data weights of the data consistency: 1/N_std normalised to mean 1 in the mask when a noise map is
    given (noisy voxels count less), else the mask. Returns (W or None, what was used)."""
    if noise_std is None:
        return None, "mask"
    from types import SimpleNamespace

    from ..core.inversion.admm import data_weight

    # data_weight falls back to the magnitude; the network's data consistency uses the noise map or nothing
    return data_weight(SimpleNamespace(noise_std=noise_std, magnitude=None), np.asarray(mask) > 0)


def consistency_param():
    """The ``consistency`` field (CG iterations of the data consistency) of every record whose χ comes out of the
    network: the dsbn method's :class:`DSBNParams` and the adaptation's
    :class:`~napari_qsm.nn.adaptation.records.AdaptParams` (one definition, one default)."""
    return param(DC_ITERATIONS, "data-consistency CG iterations after the network (0 = the raw network): "
                 "χ is pulled back to agree with the measured field where the field is informative",
                 min=0, max=500, short="DC")


def consistency_mu_param():
    """The ``consistency_mu`` field (weight μ of the data consistency's anchor), shared like :func:`consistency_param`."""
    return param(DC_MU, "weight μ of ‖χ − χ_network‖² in the data consistency (larger keeps more "
                 "of the network)", min=1e-6, max=1e3, widget="advanced", short="μ")


def network_consistency(scan, chi, iterations: int, mu: float, *, device="cpu", progress=None, cancel=None):
    """The data consistency after the network (:func:`napari_qsm.core.inversion.consistency.data_consistency`),
    weighted by :func:`consistency_weight`: the step of the dsbn method and of the adaptation's final χ.

    Parameters
    ----------
    scan : Scan
        Field (ppm), mask, voxel size, B0 direction and, when present, the noise map.
    chi : ndarray
        The network's χ (ppm), the CG's start and anchor.
    iterations, mu : int, float
        ``consistency`` and ``consistency_mu`` of the parameter record (0 iterations: ``chi`` unchanged).
    device, progress, cancel
        As for the other methods.

    Returns
    -------
    chi : ndarray (float32)
    info : dict or None
        The CG's facts and the weights used (None when ``iterations`` is 0).

    References
    ----------
    Aggarwal HK, Mani MP, Jacob M. MoDL: model-based deep learning architecture for inverse problems.
    IEEE Trans Med Imaging 2019;38:394-405.
    """
    if iterations <= 0:
        return chi, None
    from ..core.inversion.consistency import data_consistency

    w, kind = consistency_weight(scan.noise_std, scan.mask)
    chi, dc = data_consistency(scan.field, scan.mask, chi, scan.voxel_size, scan.b0_direction, weight=w, mu=mu,
                               iterations=iterations, device=device, progress=progress, cancel=cancel,
                               return_info=True)
    return chi, dict(dc, weights=kind)


@dataclass
class DSBNParams:
    domain: str = param("auto", "BN domain: auto (adapted domain 1 when the checkpoint was adapted, else 0), 0 or 1",
                        choices=("auto", "0", "1"))
    memory_gb: float = param(3.0, "memory budget of one forward pass; larger volumes are tiled", min=0.1, max=256.0)
    tile: int = param(0, "tile size in voxels (0 = one pass if it fits the budget, else automatic)", min=0, max=1024)
    overlap: int = param(32, "tile overlap in voxels (outer half discarded, inner half cross-faded)", min=0, max=512)
    consistency: int = consistency_param()
    consistency_mu: float = consistency_mu_param()


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def cached_model(path, device) -> QSMInvNet:
    """Load once per (path, mtime, size, device); later calls reuse the model."""
    p = Path(path) if path is not None else default_weights_path()
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_mtime_ns, st.st_size, str(device))
    except OSError:
        key = None
    with _CACHE_LOCK:
        if key is not None and key in _CACHE:
            return _CACHE[key]
        m = load_model(path, device=device)
        if key is not None:
            _CACHE.clear()
            _CACHE[key] = m
        return m


def _run(scan, p: DSBNParams, *, device, progress=None, cancel=None, weights=None, **_):
    model = cached_model(weights, device)
    chi, info = predict(model, scan.field, scan.mask, domain=p.domain, device=device, memory_gb=p.memory_gb,
                        tile=p.tile, overlap=p.overlap, progress=progress, cancel=cancel,
                        voxel_size=scan.voxel_size, b0_direction=scan.b0_direction)
    chi, dc = network_consistency(scan, chi, p.consistency, p.consistency_mu, device=device, progress=progress,
                                  cancel=cancel)
    if dc is not None:
        info["consistency"] = dc
    card = getattr(model, "card", {}) or {}
    info.update(weights=model.weights_path, weights_sha256=model.weights_sha256,
                base_width=model.config.base_width, num_domains=model.num_domains,
                domain_trained=model.domain_trained.tolist(), checkpoint_name=card.get("name"))
    vs = np.asarray(scan.voxel_size, float)
    trained_vs = card.get("training", {}).get("data_recipe", {}).get("regimes")
    if trained_vs:
        known = [tuple(r["voxel_size"]) for r in trained_vs]
        if not any(np.allclose(vs, k, rtol=0.35) for k in known):
            info["warning"] = f"voxel size {tuple(vs)} outside the training regimes {known}"
    return {"chi": chi, "extras": info}


METHODS = (Method(
    "dsbn", "QSMInvNet+ (DSBN)", DSBNParams, _run, order=40, short="QSMInvNet+", accepts_weights=True, long_running=True,
    uses_magnitude=False,
    doc="Deep dipole inversion: 3-D U-Net with domain-specific batch norms trained on synthetic heads "
        "(field + mask, and the TKD of the field as a physics channel when the checkpoint has one → χ), then a "
        "data-consistency step that pulls χ back to agree with the measured field (0 steps: the raw network). "
        "Uses the shipped weights or --weights CKPT (an adapted checkpoint uses its scan-specific BN)."),)
