"""The autograd Function of ``prefix_attention`` and its torch.library custom ops (what torch.compile
traces: opaque, with fake implementations giving shapes and strides), for both implementations: the
Triton launchers (``impl="triton"``) and the torch backend (``impl="torch"``, torch_backend.py), which
share one contract (arguments, outputs, the row logsumexp including the sinks).

Eager calls skip the torch.library dispatch (its per-call overhead is paid on every layer of every
step): the Function calls the implementation directly unless torch.compile is tracing.

The Function saves q, k, v, out and the row logsumexp (fp32; it includes the sink), and its
backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

import importlib

import torch

from . import torch_backend


def kernels():
    """prefixattn.kernels, imported on first use: triton is needed only on this path."""
    return importlib.import_module("prefixattn.kernels")


@torch.library.custom_op("prefixattn::forward", mutates_args=(), device_types=("cpu", "cuda"))
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    deterministic: bool,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels().attention_forward(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
        causal, scale, softcap, window, deterministic, score_bias,
    )


@_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
      causal, scale, softcap, window, deterministic, score_bias=None):
    B, Hq, Sq, _ = q.shape
    out = q.new_empty((B, Sq, Hq, v.shape[-1])).transpose(1, 2)  # the kernel's (B, Sq, Hq, Dv) memory
    lse = q.new_empty((B, Hq, Sq), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("prefixattn::backward", mutates_args=(), device_types=("cpu", "cuda"))
def _backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    need_dq: bool,
    need_dkv: bool,
    need_dprefix: bool,
    need_dsinks: bool,
    deterministic: bool,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels().attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
        doc_start, doc_end, sinks, causal, scale, softcap, window,
        need_dq, need_dkv, need_dprefix, need_dsinks, deterministic, score_bias,
    )


@_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, doc_start, doc_end,
      sinks, causal, scale, softcap, window, need_dq, need_dkv, need_dprefix, need_dsinks, deterministic,
      score_bias=None):
    need_dprefix = need_dprefix and prefix_k.shape[-2] > 0
    dq = torch.empty_like(q) if need_dq else q.new_empty((0,))
    dk = torch.empty_like(k) if need_dkv else q.new_empty((0,))
    dv = torch.empty_like(v) if need_dkv else q.new_empty((0,))
    dpk = torch.empty_like(prefix_k) if need_dprefix else q.new_empty((0,))
    dpv = torch.empty_like(prefix_v) if need_dprefix else q.new_empty((0,))
    dsinks = torch.empty_like(sinks) if need_dsinks else q.new_empty((0,))
    return dq, dk, dv, dpk, dpv, dsinks


@torch.library.custom_op("prefixattn::torch_forward", mutates_args=())
def _torch_forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    deterministic: bool,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch_backend.attention_forward(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
        causal, scale, softcap, window, deterministic, score_bias,
    )
    return out.contiguous(), lse.contiguous()  # the layout the fake promises


@_torch_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
      causal, scale, softcap, window, deterministic, score_bias=None):
    B, Hq, Sq, _ = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((B, Hq, Sq, v.shape[-1])), q.new_empty((B, Hq, Sq), dtype=lse_dtype)


@torch.library.custom_op("prefixattn::torch_backward", mutates_args=())
def _torch_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    need_dq: bool,
    need_dkv: bool,
    need_dprefix: bool,
    need_dsinks: bool,
    deterministic: bool,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = torch_backend.attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
        doc_start, doc_end, sinks, causal, scale, softcap, window,
        need_dq, need_dkv, need_dprefix, need_dsinks, deterministic, score_bias,
    )
    return tuple(g.contiguous() for g in grads)


@_torch_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, doc_start, doc_end,
      sinks, causal, scale, softcap, window, need_dq, need_dkv, need_dprefix, need_dsinks, deterministic,
      score_bias=None):
    need_dprefix = need_dprefix and prefix_k.shape[-2] > 0

    def like(t, needed):
        return t.new_empty(t.shape) if needed else q.new_empty((0,))

    dsinks = like(sinks, need_dsinks) if sinks is not None else q.new_empty((0,))
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv), like(prefix_k, need_dprefix),
            like(prefix_v, need_dprefix), dsinks)


def _implementation(impl: str, compiling: bool):
    """(forward, backward) of an implementation: the custom ops while torch.compile traces, else the
    functions themselves."""
    if impl == "torch":
        if compiling:
            return _torch_forward_op, _torch_backward_op
        return torch_backend.attention_forward, torch_backend.attention_backward
    if compiling:
        return _forward_op, _backward_op
    return kernels().attention_forward, kernels().attention_backward


class PrefixAttentionFunction(torch.autograd.Function):
    """Fused prefix attention. Saves q, k, v, out, lse and references to the prefix tensors. ``impl``:
    "triton" (the kernels) or "torch" (torch_backend.py). ``score_bias`` is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, sinks, key_padding_mask, prefix_index, doc_start, doc_end,
                causal, scale, softcap, window, deterministic, impl="triton", score_bias=None):
        forward, _ = _implementation(impl, torch.compiler.is_compiling())
        out, lse = forward(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
            causal, scale, softcap, window, deterministic, score_bias,
        )
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, sinks, out, lse, key_padding_mask, prefix_index,
                              doc_start, doc_end, score_bias)
        ctx.causal, ctx.scale, ctx.softcap, ctx.window = causal, scale, softcap, window
        ctx.deterministic, ctx.impl = deterministic, impl
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        (q, k, v, prefix_k, prefix_v, sinks, out, lse, key_padding_mask, prefix_index,
         doc_start, doc_end, score_bias) = ctx.saved_tensors
        need_q, need_k, need_v, need_pk, need_pv, need_sinks = ctx.needs_input_grad[:6]
        need_dkv = need_k or need_v
        need_dprefix = (need_pk or need_pv) and prefix_k.shape[-2] > 0
        n_inputs = 17
        if not (need_q or need_dkv or need_dprefix or need_sinks):
            return (None,) * n_inputs
        _, backward = _implementation(ctx.impl, torch.compiler.is_compiling())
        dq, dk, dv, dpk, dpv, dsinks = backward(
            grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
            doc_start, doc_end, sinks, ctx.causal, ctx.scale, ctx.softcap, ctx.window,
            need_q, need_dkv, need_dprefix, need_sinks, ctx.deterministic, score_bias,
        )
        if (need_pk or need_pv) and not need_dprefix:  # P == 0: the gradient of an empty prefix is empty
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        return (
            dq if need_q else None,
            dk if need_k else None,
            dv if need_v else None,
            dpk if need_pk else None,
            dpv if need_pv else None,
            dsinks if need_sinks else None,
        ) + (None,) * (n_inputs - 6)
