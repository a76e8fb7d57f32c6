"""The attention microbenchmark: every provider, every mode, over a grid of shapes.

For each shape: build random inputs, run every provider once forward and backward and record its
relative error against prefixattn's output and gradients (a provider that disagrees is still timed,
and its error is in the record for anyone to see), then time each mode:

- ``fwd``: forward with inputs that require grad (as in training: the graph is recorded);
- ``bwd``: backward of one retained forward;
- ``fwd_bwd``: both;
- ``infer``: forward under no_grad (decode steps: Sq = 1 over a KV cache);
- ``layer0_fwd_bwd``: forward + backward when only the prefix requires grad (layer 0 of a frozen
  model: q, k, v come from frozen embeddings).

A provider that cannot run a shape (unsupported, would not fit in memory, compile failure, out of
time budget) gets a record with ``ms = None``, ``status`` and ``reason``; the run never stops for it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .flops import attention_flops
from .grid import Shape
from .providers import PROVIDERS, AttnInputs, Unsupported, eager_bytes, make_inputs
from .timing import available_bytes, free_memory, is_oom, peak_mem_mb, sync, time_ms

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# Relative error against the reference provider up to which two providers "agree" (per dtype of the
# inputs; gradients get twice as much: they go through one more reduction).
AGREE_TOL = {"float32": 2e-3, "float16": 5e-3, "bfloat16": 2e-2}


def agrees(err: float | None, err_grad: float | None, dtype: str) -> bool | None:
    """Whether relative errors are within AGREE_TOL for ``dtype`` (None when nothing was compared)."""
    if err is None:
        return None
    tol = AGREE_TOL.get(dtype, 2e-2)
    return bool(err <= tol and (err_grad is None or err_grad <= 2 * tol))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def base_record(shape: Shape, provider: str, mode: str, suite: str = "micro") -> dict[str, Any]:
    return {
        "suite": suite, "provider": provider, "mode": mode,
        "B": shape.B, "H": shape.H, "Hkv": shape.Hkv, "S": shape.S, "Sq": shape.q_len, "Sk": shape.S,
        "P": shape.P, "D": shape.D, "dtype": shape.dtype, "tag": shape.tag,
        "ms": None, "tflops": None, "peak_mem_mb": None, "status": "ok", "reason": None,
    }


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    return f"{type(exc).__name__}: {first}"[:300]


def _layer0(x: AttnInputs) -> AttnInputs:
    """q, k, v need no gradient (layer 0 of a frozen model); the prefix does."""
    return AttnInputs(x.q.detach(), x.k.detach(), x.v.detach(), x.pk, x.pv, x.prefix_index)


def _detached(x: AttnInputs) -> AttnInputs:
    """Nothing needs a gradient (inference)."""
    return AttnInputs(x.q.detach(), x.k.detach(), x.v.detach(), x.pk.detach(), x.pv.detach(), x.prefix_index)


def view_for(mode: str, x: AttnInputs) -> AttnInputs:
    if mode.startswith("layer0"):
        return _layer0(x)
    if mode == "infer":
        return _detached(x)
    return x


def _grads(x: AttnInputs) -> list[torch.Tensor | None]:
    return [t.grad for t in x.tensors()]


def _clear(x: AttnInputs) -> None:
    for t in x.tensors():
        t.grad = None


def build(name: str, x: AttnInputs, backend: str) -> tuple[Callable[[], torch.Tensor], str]:
    if name.startswith("prefixattn"):
        return PROVIDERS[name](x, backend)
    return PROVIDERS[name](x)


def check(fns: dict[str, Callable[[], torch.Tensor]], x: AttnInputs, dout: torch.Tensor, ref_name: str,
          backward: bool) -> dict[str, dict[str, Any]]:
    """Run each provider once (forward, and backward if asked); relative errors of the output and the
    gradients against the reference provider (the first one that works, ``ref_name`` first).

    Each entry has rel_err / rel_err_grad / ref, or fwd_error (the provider cannot run at all) or
    bwd_error (it runs forward but not backward: only the gradient modes are skipped).
    """
    results: dict[str, dict[str, Any]] = {}
    ref_out: torch.Tensor | None = None
    ref_grads: list | None = None
    ref_used = ref_name
    for name in [ref_name] + [n for n in fns if n != ref_name]:
        if name not in fns:
            continue
        _clear(x)
        res: dict[str, Any] = {}
        try:
            if backward:
                out = fns[name]()
            else:
                with torch.no_grad():
                    out = fns[name]()
            if not torch.isfinite(out).all():
                raise RuntimeError("non-finite output")
        except Exception as e:  # recorded, never fatal
            results[name] = {"fwd_error": e}
            continue
        grads = None
        if backward:
            try:
                out.backward(dout)
                grads = [g.detach().clone() if g is not None else None for g in _grads(x)]
            except Exception as e:
                res["bwd_error"] = e
        if ref_out is None:
            ref_out, ref_used = out.detach(), name
        res.update(rel_err=rel_err(out, ref_out), ref=ref_used, rel_err_grad=None)
        if grads is not None:
            if ref_grads is None:
                ref_grads = grads
            res["rel_err_grad"] = max((rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)
                                       if g is not None and r is not None), default=None)
        results[name] = res
        del out
    _clear(x)
    return results


def mode_callable(mode: str, fn: Callable[[], torch.Tensor], x: AttnInputs,
                  dout: torch.Tensor) -> tuple[Callable[[], object], list[torch.Tensor]]:
    """The callable to time for a mode, and the tensors whose .grad to reset between calls."""
    leaves = [t for t in x.tensors() if t.requires_grad]
    if mode == "fwd":
        return fn, leaves
    if mode == "infer":
        def infer() -> torch.Tensor:
            with torch.no_grad():
                return fn()

        return infer, []
    if mode in ("fwd_bwd", "layer0_fwd_bwd"):
        return (lambda: fn().backward(dout)), leaves
    if mode in ("bwd", "layer0_bwd"):
        out = fn()
        return (lambda: out.backward(dout, retain_graph=True)), leaves
    raise ValueError(f"unknown mode {mode!r}")


def run_shape(shape: Shape, device: torch.device, *, providers: Sequence[str], backend: str,
              deadline: float | None, warmup_ms: float, rep_ms: float,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """All records of one shape (one per provider and mode)."""
    providers = [p for p in shape.providers if p in providers]
    records: list[dict[str, Any]] = []
    if deadline is not None and time.monotonic() > deadline:
        for p in providers:
            for m in shape.modes:
                records.append(base_record(shape, p, m) | {"status": "skipped", "reason": "time budget"})
        return records

    dtype = DTYPES[shape.dtype]
    x = make_inputs(B=shape.B, H=shape.H, Hkv=shape.Hkv, Sq=shape.q_len, Sk=shape.S, P=shape.P, D=shape.D,
                    dtype=dtype, device=device)
    dout = torch.randn(x.q.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    needs_bwd = any(m not in ("fwd", "infer") for m in shape.modes)
    avail = available_bytes(device)

    xc = x if needs_bwd else _detached(x)
    fns: dict[str, Callable[[], torch.Tensor]] = {}
    kernel: dict[str, str] = {}
    failed: dict[str, str] = {}
    for p in providers:
        worst = "fwd_bwd" if needs_bwd else "infer"
        if p == "eager" and avail is not None and eager_bytes(x, worst) > 0.7 * avail:
            failed[p] = f"skipped: would need ~{eager_bytes(x, worst) / 2**30:.0f} GiB (materialized scores)"
            continue
        try:
            fns[p], kernel[p] = build(p, xc, backend)
        except Exception as e:
            failed[p] = _short(e) if not isinstance(e, Unsupported) else f"skipped: {e}"

    checks = check(fns, xc, dout, "prefixattn", backward=needs_bwd)
    bwd_failed: dict[str, str] = {}
    for p, c in checks.items():
        for key, where in (("fwd_error", failed), ("bwd_error", bwd_failed)):
            if key in c:
                e = c[key]
                where[p] = ("oom in check: " if is_oom(e) else "failed check: ") + _short(e)
    free_memory(device)

    for mode in shape.modes:
        xm = view_for(mode, x)
        for p in providers:
            rec = base_record(shape, p, mode)
            rec["flops"] = attention_flops(mode, B=shape.B, H=shape.H, Sq=shape.q_len, Sk=shape.S,
                                           P=shape.P, D=shape.D)
            if p in kernel:
                rec["kernel"] = kernel[p]
            if p in checks and "fwd_error" not in checks[p]:
                rec.update({k: checks[p][k] for k in ("rel_err", "rel_err_grad", "ref")})
                rec["agree"] = agrees(rec["rel_err"], rec["rel_err_grad"], shape.dtype)
            reason = failed.get(p) or (bwd_failed.get(p) if mode != "infer" and mode != "fwd" else None)
            if reason:
                rec.update(status="skipped" if reason.startswith("skipped") else "error", reason=reason)
            elif deadline is not None and time.monotonic() > deadline:
                rec.update(status="skipped", reason="time budget")
            else:
                _time_one(rec, p, mode, xm, x, dout, device, backend, warmup_ms, rep_ms, failed)
            records.append(rec)
            log(_line(rec))
    del x, fns
    free_memory(device)
    return records


def _time_one(rec: dict[str, Any], p: str, mode: str, xm: AttnInputs, x: AttnInputs, dout: torch.Tensor,
              device: torch.device, backend: str, warmup_ms: float, rep_ms: float,
              failed: dict[str, str]) -> None:
    try:
        fn = build(p, xm, backend)[0]
        call, leaves = mode_callable(mode, fn, xm, dout)
        mem = peak_mem_mb(call, device, leaves)
        ms = time_ms(call, device, warmup_ms=warmup_ms, rep_ms=rep_ms, grad_to_none=leaves)
        sync(device)
        rec["ms"] = ms
        rec["tflops"] = rec["flops"] / (ms * 1e-3) / 1e12
        rec["peak_mem_mb"] = mem
    except Exception as e:
        oom = is_oom(e)
        rec.update(status="oom" if oom else "error", reason=_short(e))
        if not oom:
            failed[p] = _short(e)
    finally:
        _clear(xm)
        free_memory(device)


def _line(r: dict[str, Any]) -> str:
    head = f"{r['provider']:>18} {r['mode']:>14} S={r['S']:<5} Sq={r['Sq']:<5}"
    if r["ms"] is None:
        reason = r["reason"]
        return f"{head} {reason if reason.startswith(r['status']) else r['status'] + ': ' + reason}"
    err = r.get("rel_err")
    err_s = f" err={err:.1e}" if err is not None else ""
    mem = r.get("peak_mem_mb")
    mem_s = f" mem={mem:.0f}MB" if mem is not None else ""
    return f"{head} {r['ms']:9.3f} ms {r['tflops']:7.2f} TFLOP/s{mem_s}{err_s}"
