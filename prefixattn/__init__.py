"""prefixattn: fused Triton attention kernels for prefix tuning, and a one-call patcher.

    import prefixattn
    out = prefixattn.prefix_attention(q, k, v, prefix_k, prefix_v)      # the op
    model = prefixattn.patch(model, num_prefix_tokens=32)               # a transformers model
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .documents import Documents
from .ops import prefix_attention

__version__ = "0.1.0"

# The prefix layer (safetensors) and the transformers layer load on first use, so that the op alone
# stays light.
_LAZY = {
    "patch": "hf",
    "unpatch": "hf",
    "is_patched": "hf",
    "load_peft": "hf",
    "save_prefix": "prefix",
    "load_prefix": "prefix",
    "save_peft": "prefix",
    "compose_cartridges": "prefix",
    "init_prefix_from_cache": "hf",
}

__all__ = ["prefix_attention", "Documents", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'prefixattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
