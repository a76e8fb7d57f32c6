"""``prefixattn info``: versions, device, and which attention backends can run here."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
from typing import Any

import torch

import prefixattn


def _version(module: str) -> str:
    try:
        return str(getattr(importlib.import_module(module), "__version__", "?"))
    except Exception:
        return "not installed"


def backends() -> dict[str, str]:
    """Each attention backend of prefix_attention, and whether it can run here (with the reason)."""
    out = {"torch": "yes (pure PyTorch, any device)"}
    if importlib.util.find_spec("triton") is None:
        out["triton"] = "no: the triton package does not import"
    elif torch.cuda.is_available():
        try:
            importlib.import_module("prefixattn.kernels")
            out["triton"] = "yes (CUDA)"
        except Exception as e:
            out["triton"] = f"no: kernels fail to import ({type(e).__name__}: {e})"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = "yes, through the interpreter (TRITON_INTERPRET=1: slow, for tests)"
    else:
        out["triton"] = "no: needs a CUDA GPU (or TRITON_INTERPRET=1 for the slow interpreter)"
    out["auto"] = "triton" if out["triton"].startswith("yes") else "torch"
    return out


def info() -> dict[str, Any]:
    dev = "cpu"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = f"cuda: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    return {
        "prefixattn": prefixattn.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": dev,
        "backends": backends(),
    }


def cmd_info(args: argparse.Namespace) -> int:
    data = info()
    for key, value in data.items():
        if key == "backends":
            print("backends:")
            for name, state in value.items():
                print(f"  {name:<7} {state}")
        else:
            print(f"{key + ':':<14}{value}")
    return 0
