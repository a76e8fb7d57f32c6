"""Mixed-task batch benchmark: B rows, a bank of N prefixes, ``prefix_index`` choosing each row's entry.

The same tensors (q, k, v, the bank, the row -> task assignment) are run three ways:

- ``prefixattn_bank``: one ``prefix_attention`` call with the (N, Hkv, P, D) bank and ``prefix_index``;
  the kernel reads each row's entry in place, and the backward reduces the gradient per bank entry.
- ``sequential``: one ``prefix_attention`` call per task over the rows of that task, one after another
  (the rows are gathered, the outputs put back in batch order); what a multi-task setup without a
  bank does.
- ``concat_gather``: gather each row's prefix from the bank, concatenate it in front of K/V, repeat
  K/V over the GQA group and run torch SDPA with the materialized (B, 1, Sq, P + Sk) mask: the
  PEFT-style path (PEFT's past_key_values with one prefix per row).

Modes: ``fwd`` (inputs require grad, as in training) and ``fwd_bwd`` (gradients into q, k, v and the
bank). Before anything is timed every provider runs once forward and backward, and its relative
error against ``prefixattn_bank`` (output and gradients, the bank's included) is recorded with
``agree``. Records follow the micro suite's schema with ``suite = "bank"`` and the bank size ``N``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

import prefixattn

from .flops import attention_flops
from .micro import DTYPES, _short, agrees, base_record, check, mode_callable
from .providers import AttnInputs, Fn, concat_sdpa_mask, make_inputs, prefixattn_provider
from .timing import free_memory, is_oom, peak_mem_mb, sync, time_ms

PROVIDERS = ("prefixattn_bank", "sequential", "concat_gather")
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class BankShape:
    B: int
    H: int
    Hkv: int
    S: int
    P: int
    D: int
    N: int  # prefixes in the bank (tasks in the batch)
    dtype: str = "bfloat16"
    modes: tuple[str, ...] = MODES
    tag: str = "bank"

    @property
    def q_len(self) -> int:
        return self.S

    def label(self) -> str:
        return f"B={self.B} H={self.H}/{self.Hkv} S={self.S} P={self.P} D={self.D} N={self.N} {self.dtype}"


GPU_BASE = BankShape(B=16, H=32, Hkv=8, S=1024, P=64, D=128, N=8)


def gpu_grid(quick: bool) -> list[BankShape]:
    if quick:
        return [GPU_BASE]
    return [replace(GPU_BASE, N=4), GPU_BASE, replace(GPU_BASE, N=16), replace(GPU_BASE, B=8, S=4096)]


def cpu_grid(quick: bool) -> list[BankShape]:
    """Tiny sizes: proves the harness runs on a CPU, measures nothing."""
    tiny = BankShape(B=4, H=4, Hkv=2, S=32, P=4, D=16, N=3, dtype="float32", tag="cpu bank")
    return [tiny] if quick else [tiny, replace(tiny, B=6, S=64, N=4)]


def make_bank_inputs(shape: BankShape, device: torch.device, seed: int = 0) -> AttnInputs:
    """Random inputs and a random row -> task assignment in which every bank entry has a row (B >= N)."""
    x = make_inputs(B=shape.B, H=shape.H, Hkv=shape.Hkv, Sq=shape.S, Sk=shape.S, P=shape.P, D=shape.D,
                    dtype=DTYPES[shape.dtype], device=device, bank=shape.N, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    idx = (torch.arange(shape.B) % shape.N)[torch.randperm(shape.B, generator=g)]
    x.prefix_index = idx.to(device)
    return x


def sequential(x: AttnInputs, backend: str = "auto") -> tuple[Fn, str]:
    """One prefix_attention call per task, over that task's rows (grouping computed once, outside)."""
    if x.prefix_index is None:
        raise ValueError("sequential needs a bank and prefix_index")
    idx = x.prefix_index
    tasks = sorted(set(idx.tolist()))
    rows = [torch.nonzero(idx == t).flatten() for t in tasks]
    order = torch.cat(rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    label = prefixattn_provider(x, backend)[1]

    def fn() -> torch.Tensor:
        outs = [
            prefixattn.prefix_attention(x.q.index_select(0, r), x.k.index_select(0, r),
                                        x.v.index_select(0, r), x.pk[t], x.pv[t], backend=backend)
            for t, r in zip(tasks, rows, strict=True)
        ]
        return torch.cat(outs).index_select(0, inverse)

    return fn, f"{len(tasks)} calls, {label}"


def concat_gather(x: AttnInputs) -> tuple[Fn, str]:
    """Gather each row's prefix (index_select on the bank), concatenate, masked SDPA."""
    if x.prefix_index is None:
        raise ValueError("concat_gather needs a bank and prefix_index")
    return concat_sdpa_mask(x)  # batch_prefix gathers from the bank when prefix_index is set


def build(name: str, x: AttnInputs, backend: str) -> tuple[Fn, str]:
    if name == "prefixattn_bank":
        return prefixattn_provider(x, backend)
    if name == "sequential":
        return sequential(x, backend)
    if name == "concat_gather":
        return concat_gather(x)
    raise ValueError(f"unknown bank provider {name!r}; choose from {', '.join(PROVIDERS)}")


def run_shape(shape: BankShape, device: torch.device, *, backend: str, warmup_ms: float, rep_ms: float,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """All records of one bank shape (one per provider and mode)."""
    x = make_bank_inputs(shape, device)
    dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(2)).to(device, x.q.dtype)
    fns: dict[str, Fn] = {}
    kernel: dict[str, str] = {}
    failed: dict[str, str] = {}
    for p in PROVIDERS:
        try:
            fns[p], kernel[p] = build(p, x, backend)
        except Exception as e:
            failed[p] = _short(e)
    checks = check(fns, x, dout, "prefixattn_bank", backward=True)
    for p, c in checks.items():
        for key in ("fwd_error", "bwd_error"):
            if key in c:
                failed[p] = ("oom in check: " if is_oom(c[key]) else "failed check: ") + _short(c[key])
    free_memory(device)

    records = []
    for mode in shape.modes:
        for p in PROVIDERS:
            rec = base_record(shape, p, mode, suite="bank") | {"N": shape.N}  # type: ignore[arg-type]
            rec["flops"] = attention_flops(mode, B=shape.B, H=shape.H, Sq=shape.S, Sk=shape.S, P=shape.P,
                                           D=shape.D)
            if p in kernel:
                rec["kernel"] = kernel[p]
            c = checks.get(p, {})
            if "rel_err" in c:
                rec.update(rel_err=c["rel_err"], rel_err_grad=c["rel_err_grad"], ref=c["ref"])
                rec["agree"] = agrees(c["rel_err"], c["rel_err_grad"], shape.dtype)
            if p in failed:
                rec.update(status="error", reason=failed[p])
            else:
                _time_one(rec, fns[p], mode, x, dout, device, warmup_ms, rep_ms)
            records.append(rec)
            log(_line(rec))
    del x, fns
    free_memory(device)
    return records


def _time_one(rec: dict[str, Any], fn: Fn, mode: str, x: AttnInputs, dout: torch.Tensor, device: torch.device,
              warmup_ms: float, rep_ms: float) -> None:
    call, leaves = mode_callable(mode, fn, x, dout)
    try:
        mem = peak_mem_mb(call, device, leaves)
        ms = time_ms(call, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=leaves)
        sync(device)
        rec.update(ms=ms, tflops=rec["flops"] / (ms * 1e-3) / 1e12, peak_mem_mb=mem)
    except Exception as e:
        rec.update(status="oom" if is_oom(e) else "error", reason=_short(e))
    finally:
        for t in x.tensors():
            t.grad = None
        free_memory(device)


def _line(r: dict[str, Any]) -> str:
    head = f"{r['provider']:>16} {r['mode']:>8} B={r['B']:<3} S={r['S']:<5} N={r['N']:<3}"
    if r["ms"] is None:
        return f"{head} {r['status']}: {r['reason']}"
    err = f" err={r['rel_err']:.1e}/{r['rel_err_grad'] or 0:.1e}" if r.get("rel_err") is not None else ""
    mem = f" mem={r['peak_mem_mb']:.0f}MB" if r.get("peak_mem_mb") is not None else ""
    return f"{head} {r['ms']:9.3f} ms {r['tflops']:7.2f} TFLOP/s{mem}{err}"


def run_bank_bench(device: torch.device, quick: bool = False, backend: str = "auto", rep_ms: float = 30.0,
                   log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """All prefix-bank records for this device (tiny shapes on a CPU)."""
    shapes = gpu_grid(quick) if device.type == "cuda" else cpu_grid(quick)
    records: list[dict[str, Any]] = []
    for shape in shapes:
        log(f"# bank: {shape.label()}")
        records += run_shape(shape, device, backend=backend, warmup_ms=min(10.0, rep_ms), rep_ms=rep_ms,
                             log=log)
    return records
