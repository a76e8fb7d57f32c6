"""A progress bar that behaves in logs: tqdm on a terminal, plain one-line updates otherwise.

When stderr is not a terminal (CI, a remote runner capturing output), tqdm's carriage-return
redraws turn into one enormous line; there we print a short line every ``every`` items instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """Wraps an iterable; ``set(**fields)`` updates the fields shown next to the count."""

    def __init__(self, iterable: Iterable[T], *, total: int | None = None, desc: str = "",
                 every: int | None = None, file: Any = None) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        self.fields: dict[str, Any] = {}
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.every = every or max(1, (self.total or 100) // 20)
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.file, dynamic_ncols=True, leave=True)

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in self.fields.items()}, refresh=False)

    def write(self, msg: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(msg, file=self.file)
        else:
            print(msg, file=self.file, flush=True)

    def __iter__(self) -> Iterator[T]:
        start = time.perf_counter()
        for i, item in enumerate(self.iterable, 1):
            yield item
            if self._bar is not None:
                self._bar.update(1)
            elif i % self.every == 0 or i == self.total:
                tail = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
                of = f"/{self.total}" if self.total else ""
                print(f"{self.desc} {i}{of} [{time.perf_counter() - start:.0f}s] {tail}".strip(),
                      file=self.file, flush=True)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
