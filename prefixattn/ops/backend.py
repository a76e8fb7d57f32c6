"""Which backend runs a call: the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the torch
backend (PyTorch's own fused attention; same semantics, every feature, any head dim)."""

from __future__ import annotations

import os

import torch

MAX_HEAD_DIM = 256  # the largest Dk / Dv the fused kernels' tiles cover


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, q: torch.Tensor, head_dim: int | None = None) -> str:
    """The backend that runs a call: ``"auto"`` takes the kernels where they run (CUDA, or CPU under the
    interpreter) and cover the head dim (``head_dim``: the larger of Dk, Dv; up to ``MAX_HEAD_DIM``)."""
    if backend == "torch":
        return "torch"
    if backend == "auto" and head_dim is not None and head_dim > MAX_HEAD_DIM:
        return "torch"  # Gemma 4's 512-dim global layers: beyond the kernels' tiles
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
