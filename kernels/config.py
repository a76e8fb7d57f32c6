"""The kernels' knobs, read once from the environment at import into one small settings object.

    PREFIXATTN_AUTOTUNE=0   no autotuning: the first config that fits shared memory (default on)
    PREFIXATTN_POISON=1     fill every kernel output with NaN before launch (tests, debugging)
    PREFIXATTN_SPLITS=N     force N key splits in the forward (tests); unset = the heuristic
    TRITON_INTERPRET=1      the Triton interpreter (CPU); read by triton itself at import

Launchers call ``settings()`` (a module attribute read, no environment lookup per call). Tests
change the settings for a block with ``use_settings(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DeviceFacts:
    """What the launchers need to know about a GPU (kernels/device.py asks the device for them)."""

    name: str
    sms: int
    smem_per_block: int  # bytes, opt-in maximum per block (LDS per workgroup on AMD)
    capability: tuple[int, int] = (0, 0)
    gfx: str = ""  # AMD's architecture name (gfx942, gfx950); empty on NVIDIA and the CPU
    warp_size: int = 32  # 64 on AMD Instinct (wave64)

    @property
    def target(self) -> tuple[str, int | str, int]:
        """(backend, arch, warp size) as triton's GPUTarget spells them: ("cuda", 90, 32), ("hip", "gfx942", 64)."""
        if self.gfx:
            return ("hip", self.gfx, self.warp_size)
        return ("cuda", self.capability[0] * 10 + self.capability[1], self.warp_size)


@dataclass(frozen=True)
class KernelSettings:
    interpret: bool = False
    autotune: bool = True
    poison: bool = False
    splits: int = 0  # 0: the heuristic decides
    device: DeviceFacts | None = None  # plan launches for this GPU instead of asking (bench compile)

    @classmethod
    def from_env(cls, env: os._Environ | dict | None = None) -> KernelSettings:
        env = os.environ if env is None else env
        interpret = env.get("TRITON_INTERPRET", "0") not in ("", "0")
        splits = env.get("PREFIXATTN_SPLITS", "")
        return cls(
            interpret=interpret,
            autotune=not interpret and env.get("PREFIXATTN_AUTOTUNE", "1") != "0",
            poison=env.get("PREFIXATTN_POISON", "0") == "1",
            splits=int(splits) if splits.strip() else 0,
        )


_current = KernelSettings.from_env()


def settings() -> KernelSettings:
    return _current


@contextmanager
def use_settings(**changes) -> Iterator[KernelSettings]:
    """Run a block with some settings changed, e.g. ``with use_settings(splits=2): ...``."""
    global _current
    old = _current
    _current = replace(old, **changes)
    try:
        yield _current
    finally:
        _current = old


__all__ = ["KernelSettings", "settings", "use_settings"]
