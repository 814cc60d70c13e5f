"""Device selection: "auto" = CUDA when present, else CPU."""

from __future__ import annotations

import torch


def resolve_device(device="auto") -> torch.device:
    """Turn "auto" / "cpu" / "cuda" / "cuda:1" / torch.device into a usable torch.device.

    Raises ValueError naming the device when CUDA is requested but not available.
    """
    if isinstance(device, torch.device):
        dev = device
    else:
        name = str(device or "auto").strip().lower()
        if name == "auto":
            return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"device: unknown device {device!r} (expected auto, cpu or cuda)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available on this machine; use 'cpu' or 'auto'")
    return dev


def available_devices() -> list[tuple[str, str]]:
    """(value, label) pairs of the devices that exist here, e.g. [("cpu", "CPU"), ("cuda:0", "CUDA 0: NVIDIA A100")]."""
    out = [("auto", "auto (GPU if present)"), ("cpu", "CPU")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            out.append((f"cuda:{i}", f"CUDA {i}: {torch.cuda.get_device_name(i)}"))
    return out


def device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return "cpu"
