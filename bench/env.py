"""What the benchmark ran on: device, library versions, date; and a file-name slug for the device."""

from __future__ import annotations

import datetime as _dt
import platform
import re
from typing import Any

import torch


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    return getattr(mod, "__version__", None)


def device_name(device: torch.device) -> str:
    """A human-readable device name: the CUDA device's name, or 'CPU (<processor>)'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    proc = platform.processor() or platform.machine() or "unknown"
    return f"CPU ({proc})"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "device"


def today() -> str:
    return _dt.date.today().isoformat()


def environment(device: torch.device) -> dict[str, Any]:
    """The header of a results JSON: device, versions, date, and whether the numbers are CPU-only."""
    is_cpu = device.type != "cuda"
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "date": today(),
        "cpu_only": is_cpu,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    if is_cpu:
        info["note"] = (
            "CPU run: these numbers only prove that the harness runs end to end; "
            "they are not kernel speed and must not be quoted as such."
        )
    return info
