"""A progress bar that behaves in logs: tqdm on a terminal, plain one-line updates otherwise.

When stderr is not a terminal (CI, a remote runner capturing output), tqdm's carriage-return
redraws turn into one enormous line; there we print a short line every ``every`` items instead.
Used two ways: wrapping an iterable (``for x in Progress(items)``), or driven by hand
(``update(n)``, as the training callback does from the Trainer's events).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Progress:
    """A count with fields; ``set(**fields)`` updates the fields shown next to the count."""

    def __init__(self, iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
                 every: int | None = None, initial: int = 0, file: Any = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.n = total, desc, initial
        self.file = file if file is not None else sys.stderr
        self.fields: dict[str, Any] = {}
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())
        self.every = every or max(1, (self.total or 100) // 20)
        self._start = time.perf_counter()
        self._bar = None
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, file=self.file, dynamic_ncols=True, leave=True,
                             initial=initial)

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

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self._bar is not None:
            self._bar.update(n)
        elif self.n // self.every > before // self.every or self.n == self.total:
            tail = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc} {self.n}{of} [{time.perf_counter() - self._start:.0f}s] {tail}".strip(),
                  file=self.file, flush=True)

    def __iter__(self) -> Iterator[T]:
        if self.iterable is None:
            raise TypeError("this Progress was made without an iterable: drive it with update()")
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
