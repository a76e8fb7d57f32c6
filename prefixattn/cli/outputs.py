"""What ``prefixattn train`` writes: JSON written atomically, and files with the modes a plain ``open()``
would give them.

Atomic writes (``prefix.files.atomic_write``, the project's one writer) make a temporary file and rename
it. safetensors >= 0.8 (whose ``save_file`` renames a private temporary file: every ``model.safetensors``
the Trainer or ``save_pretrained`` writes) creates that file with mode 0600, and the rename keeps it
(``atomic_write`` fixes its own outputs). A run's
outputs are meant to be shared (a checkpoint read by another user, a base model served from it), so every
file the run wrote gets ``0666 & ~umask`` (0644 under the usual umask 022), as if it had been written in
place. Directories are made with ``mkdir``, which applies the umask already.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from ..prefix.files import atomic_write, normal_file_mode


def give_normal_modes(*paths: Path) -> None:
    """Give every regular file at or under ``paths`` the mode ``open()`` would have created it with. Files
    only: executables and directories keep their modes; a path that does not exist is skipped."""
    mode = normal_file_mode()
    for path in paths:
        files = path.rglob("*") if path.is_dir() else [path]
        for f in files:
            if f.is_symlink() or not f.is_file():
                continue
            current = stat.S_IMODE(f.stat().st_mode)
            if current != mode and not current & 0o111:
                os.chmod(f, mode)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see the old file or the whole new one (``prefix.files.atomic_write``)."""
    text = json.dumps(data, indent=1)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
