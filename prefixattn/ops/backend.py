"""Which backend runs a call: the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or the
pure-PyTorch reference; and which requested features the kernels do not implement yet."""

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


# Features of the op contract the Triton kernels do not implement yet: backend="auto" routes such
# calls to the torch backend and backend="triton" refuses them by name.
KERNEL_FEATURES: frozenset[str] = frozenset()


def missing_kernel_features(*, dk: int, dv: int, sliding_window, documents, sinks) -> list[str]:
    wanted = []
    if sliding_window is not None:
        wanted.append("sliding_window")
    if documents is not None:
        wanted.append("documents")
    if sinks is not None:
        wanted.append("sinks")
    if dk != dv:
        wanted.append("Dk != Dv")
    return [f for f in wanted if f not in KERNEL_FEATURES]


def resolve_backend(backend: str, q: torch.Tensor, missing: list[str] | tuple = ()) -> str:
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
        if missing:
            raise ValueError(
                f"backend='triton' does not implement {', '.join(missing)} yet; use backend='auto' or 'torch'"
            )
        return "triton"
    return "triton" if usable and not missing else "torch"
