"""Triton kernels and their host launchers. Installed as ``prefixattn.kernels``."""

from .backward import attention_backward
from .forward import attention_forward

__all__ = ["attention_forward", "attention_backward"]
