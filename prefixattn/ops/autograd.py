"""The Triton path of ``prefix_attention``: torch.library custom ops (what torch.compile traces:
opaque, with fake implementations giving shapes and strides) and the autograd Function.

Eager calls skip the torch.library dispatch (its per-call overhead is paid on every layer of every
step): the Function calls the launchers directly unless torch.compile is tracing.

The Function saves q, k, v, out and the fp32 row logsumexp (which includes the sink), and its
backward computes only the gradients autograd asks for.
"""

from __future__ import annotations

import importlib

import torch


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
) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels().attention_forward(
        q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
        causal, scale, softcap, window,
    )


@_forward_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
      causal, scale, softcap, window):
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return kernels().attention_backward(
        grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
        doc_start, doc_end, sinks, causal, scale, softcap, window,
        need_dq, need_dkv, need_dprefix, need_dsinks, deterministic,
    )


@_backward_op.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index, doc_start, doc_end,
      sinks, causal, scale, softcap, window, need_dq, need_dkv, need_dprefix, need_dsinks, deterministic):
    need_dprefix = need_dprefix and prefix_k.shape[-2] > 0
    dq = torch.empty_like(q) if need_dq else q.new_empty((0,))
    dk = torch.empty_like(k) if need_dkv else q.new_empty((0,))
    dv = torch.empty_like(v) if need_dkv else q.new_empty((0,))
    dpk = torch.empty_like(prefix_k) if need_dprefix else q.new_empty((0,))
    dpv = torch.empty_like(prefix_v) if need_dprefix else q.new_empty((0,))
    dsinks = torch.empty_like(sinks) if need_dsinks else q.new_empty((0,))
    return dq, dk, dv, dpk, dpv, dsinks


class PrefixAttentionFunction(torch.autograd.Function):
    """Fused prefix attention. Saves q, k, v, out, lse and references to the prefix tensors."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, sinks, key_padding_mask, prefix_index, doc_start, doc_end,
                causal, scale, softcap, window, deterministic):
        forward = _forward_op if torch.compiler.is_compiling() else kernels().attention_forward
        out, lse = forward(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
            causal, scale, softcap, window,
        )
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, sinks, out, lse, key_padding_mask, prefix_index,
                              doc_start, doc_end)
        ctx.causal, ctx.scale, ctx.softcap, ctx.window = causal, scale, softcap, window
        ctx.deterministic = deterministic
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        (q, k, v, prefix_k, prefix_v, sinks, out, lse, key_padding_mask, prefix_index,
         doc_start, doc_end) = ctx.saved_tensors
        need_q, need_k, need_v, need_pk, need_pv, need_sinks = ctx.needs_input_grad[:6]
        need_dkv = need_k or need_v
        need_dprefix = (need_pk or need_pv) and prefix_k.shape[-2] > 0
        n_inputs = 15
        if not (need_q or need_dkv or need_dprefix or need_sinks):
            return (None,) * n_inputs
        backward = _backward_op if torch.compiler.is_compiling() else kernels().attention_backward
        dq, dk, dv, dpk, dpv, dsinks = backward(
            grad_out, q, k, v, prefix_k, prefix_v, out, lse, key_padding_mask, prefix_index,
            doc_start, doc_end, sinks, ctx.causal, ctx.scale, ctx.softcap, ctx.window,
            need_q, need_dkv, need_dprefix, need_sinks, ctx.deterministic,
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
