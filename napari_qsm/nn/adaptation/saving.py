"""Saving an adapted checkpoint atomically, with its JSON card."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ...core.files import atomic_files
from ...core.params import params_to_dict
from ..infer import WEIGHTS_DIR, file_sha256
from .records import AdaptResult


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
    with atomic_files(path, side) as (tmp_pt, tmp_js):  # both 0644 (umask 022) like every other output
        torch.save(ck, tmp_pt)
        meta["sha256"] = file_sha256(tmp_pt)
        meta["file"] = path.name
        with open(tmp_js, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.write("\n")
    return path
