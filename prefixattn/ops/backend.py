"""Which backend runs a call: the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the
pure-PyTorch reference (same semantics, every feature)."""

from __future__ import annotations

import os

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "torch":
        return "torch"
    usable = triton_available() and (q.is_cuda or (q.device.type == "cpu" and triton_interpreting()))
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which failed to import")
        if not usable:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
                f"got tensors on {q.device}"
            )
        return "triton"
    return "triton" if usable else "torch"
