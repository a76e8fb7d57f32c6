"""Timing and peak memory of one benchmark callable.

CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, warm-up first, median of
the repeats). CPU: wall clock, median of at least three repeats (more until ``rep_ms`` has passed);
only a check that the harness runs.

Peak memory is the extra memory one call needs on top of what was allocated before it
(``torch.cuda.max_memory_allocated`` after a reset, minus ``memory_allocated`` at the start): the
inputs (and, for the ``bwd`` mode, the saved forward graph) are not counted; outputs, activations
saved for backward, gradients and temporaries are.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 10, rep_ms: float = 50,
            grad_to_none: Sequence[torch.Tensor] | None = None, cpu_reps: int = 3) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none or []),
                              return_mode="median"))
    fn()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    # at least cpu_reps calls, and more until rep_ms of wall time has passed (a median over more calls
    # on a shared, noisy CPU); at most 1000
    while len(times) < cpu_reps or ((time.perf_counter() - start) * 1e3 < rep_ms and len(times) < 1000):
        for t in grad_to_none or []:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_mb(fn: Callable[[], object], device: torch.device,
                grad_to_none: Sequence[torch.Tensor] | None = None) -> float | None:
    """Extra MiB allocated at the peak of one call of ``fn`` (None on CPU: not measured)."""
    if device.type != "cuda":
        return None
    for t in grad_to_none or []:
        t.grad = None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    for t in grad_to_none or []:
        t.grad = None
    return (peak - before) / 2**20


def free_memory(device: torch.device) -> None:
    """Return cached device memory between measurements (CUDA only: on a CPU there is no cache to
    return, and a full gc.collect with transformers loaded costs a quarter second each time)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on the device (None on CPU: unknown, assume enough)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
