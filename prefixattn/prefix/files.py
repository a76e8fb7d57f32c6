"""Atomic file writes and safetensors reading/writing with clear errors (the only file format used)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open


def process_umask() -> int:
    """The process's umask. Read from /proc where there is one: ``os.umask`` can only be read by setting it,
    which for a moment changes it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask (0644 under the usual 022)."""
    return 0o666 & ~process_umask()


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` on a temporary file in the same directory, fsync it, then rename it over
    ``path`` with the mode a plain ``open`` would give (0666 less the umask). On any error the temporary
    file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, normal_file_mode())  # mkstemp's 0600 is for the temporary file, not the output
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (moved to the CPU, contiguous) and ``metadata`` as safetensors, atomically."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(clean, tmp, metadata=metadata))


def read_tensors(path: str | os.PathLike,
                 what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"{what} {str(path)!r} is not a readable safetensors file (corrupt or truncated?): "
                         f"{e}") from e
    return tensors, metadata
