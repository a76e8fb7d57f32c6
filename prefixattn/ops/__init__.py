"""``prefix_attention``: the one functional entry point, its input checks, backend choice and autograd.

The math (DESIGN.md; what every backend computes), for query i of row b, head h, KV head
h // (Hq / Hkv), at absolute position a = i + Sk - Sq, with K = [prefix_k; k], V = [prefix_v; v]:

    s_j   = scale * q_i . K_j                       (softcap: s_j = c * tanh(s_j / c))
            + bias_ij                               (score_bias: after the softcap; column j of [prefix; seq])
    mask  = prefix slot      -> always visible
            sequence key j   -> visible when lo(i) <= j <= hi(i) and key_padding_mask[b, j]
                                hi(i) = a (causal) | Sk - 1 | the document's last key (packed, not causal)
                                lo(i) = max(document start of i, a - W + 1)
                                causal=False with a window W: also hi(i) <= a + W - 1 (|a - j| < W)
    out_i = sum_j exp(s_j - L_i) V_j,   L_i = log(sum_j exp(s_j) + exp(sink_h))    (sink: optional)

The Triton path runs this as one online softmax over the prefix blocks then the sequence blocks,
reading the prefix in place (shared by the batch, per row, or selected from a bank by
``prefix_index``) with nothing concatenated or expanded.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..documents import Documents
from . import torch_backend
from .autograd import PrefixAttentionFunction
from .backend import resolve_backend, triton_available, triton_interpreting
from .checks import BACKENDS, MAX_HEAD_DIM, SUPPORTED_DTYPES, autocast_inputs, check_inputs
from .engines import cpu_flash_usable
from .sdpa_concat import sdpa_concat_applies, sdpa_concat_attention

Backend = Literal["auto", "triton", "torch"]


def prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    softcap: float = 0.0,
    sliding_window: int | None = None,
    documents: Documents | None = None,
    sinks: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
    check_index: bool = True,
    backend: Backend = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """Attention over a learned prefix followed by the sequence, without concatenating them.

    Layout (the one Hugging Face passes to attention functions)::

        q                    (B, Hq, Sq, Dk)    after RoPE
        k                    (B, Hkv, Sk, Dk)   sequence / KV-cache keys, Sk >= Sq if causal
        v                    (B, Hkv, Sk, Dv)   Dv may differ from Dk (latent attention)
        prefix_k, prefix_v   (Hkv, P, Dk|Dv)    shared by the batch, or
                             (B, Hkv, P, D.)    one prefix per row, or
                             (N, Hkv, P, D.)    a bank, with prefix_index (B,) picking each row's entry
        key_padding_mask     (B, Sk) bool       True = real token; left or right padding
        sinks                (Hq,) float        per-head sink logit (natural log, not scaled)
        score_bias           (1|B, 1|Hq, Sq, P + Sk)   added to the scores (T5's position bias)
        returns              (B, Hq, Sq, Dv)    in q's dtype (the autocast dtype under autocast)

    Query i of row b, head h attends to every prefix slot of KV head h // (Hq // Hkv), and to
    sequence key j when ``j <= a`` with ``a = i + (Sk - Sq)`` (causal aligned to the bottom right,
    so decode steps and chunked prefill work) and key j is not padding. ``causal=False`` drops
    the causal condition. ``sliding_window=W`` also hides keys ``j <= a - W`` (the prefix stays
    visible); with ``causal=False`` the window is two-sided: key j is visible when ``|a - j| < W``
    (ModernBERT's local layers). ``documents`` (a ``prefixattn.Documents``, Sq == Sk) restricts
    each query to the keys of its own packed document. ``sinks`` adds ``exp(sink_h)`` to every
    softmax denominator (gpt-oss); differentiable. Prefix keys are never rotated. ``scale``
    defaults to Dk**-0.5. ``softcap > 0`` applies ``c * tanh(s / c)`` to the scores (Gemma 2).
    ``score_bias`` is added to the scaled (and softcapped) scores before the softmax, the way an
    additive mask is: column p < P to prefix slot p, column P + j to sequence key j, broadcast over
    a batch or head dim of 1 (T5's relative position bias, an ALiBi table). It may hold -inf (a hidden
    key), never +inf or NaN. It gets no gradient: a bias that requires grad is a ValueError (detach
    it). A row that sees no key (P = 0, no sink, or a bias of -inf everywhere) returns 0.
    ``check_index=False`` skips the host read that range-checks ``prefix_index`` (for callers that
    validated the ids once per step).

    Under torch.autocast, q, k, v and the prefix are cast to the autocast dtype (SDPA's rule);
    outside it, mixed dtypes are a TypeError.

    backend: "triton" (the fused kernels; CPU tensors only under TRITON_INTERPRET=1), "torch"
    (PyTorch's own fused attention, same semantics, any head dim: see ops/torch_backend.py and
    ops/sdpa_concat.py), "auto" (triton on CUDA or when interpreting and for head dims up to 256,
    else torch).
    deterministic: True (default): two backward
    passes are bitwise equal. False: the triton backend adds dq and the prefix gradient with fp32
    atomics (faster; the rounding then varies from run to run) and lets the autotuner pick the
    kernel configs (True pins the forward and backward configs, so two processes give
    bitwise-equal outputs and gradients).
    """
    if isinstance(q, torch.Tensor):
        q, k, v, prefix_k, prefix_v = autocast_inputs((q, k, v, prefix_k, prefix_v), q.device.type)
    checked = check_inputs(
        q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask, prefix_index=prefix_index,
        causal=causal, scale=scale, softcap=softcap, sliding_window=sliding_window, documents=documents,
        sinks=sinks, check_index=check_index, backend=backend, score_bias=score_bias,
    )
    scale = checked.scale
    if prefix_k is None:
        Hkv = k.shape[1]
        prefix_k = q.new_zeros((Hkv, 0, checked.dk))
        prefix_v = q.new_zeros((Hkv, 0, checked.dv))
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask.bool()
    doc_start = documents.start if documents is not None else None
    doc_end = documents.end if documents is not None else None
    # a window that covers every key changes nothing (two-sided: also the keys after the first query)
    covers = (sliding_window is not None and sliding_window >= k.shape[2]
              and (causal or sliding_window >= q.shape[2]))
    window = None if sliding_window is None or covers else sliding_window

    impl = resolve_backend(backend, q, max(checked.dk, checked.dv))
    if impl == "torch" and not cpu_flash_usable(q, softcap) and sdpa_concat_applies(
        q.shape[2], k.shape[2], prefix_k.shape[-2], causal=causal, window=int(window or 0),
        documents=documents is not None, padded=key_padding_mask is not None, sinks=sinks is not None,
        softcap=softcap, biased=score_bias is not None,
    ):  # away from the fused CPU kernel: the device's own SDPA kernels, through autograd
        return sdpa_concat_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask,
                                     causal=causal, scale=scale, prefix_index=prefix_index,
                                     score_bias=score_bias)
    inference = not torch.compiler.is_compiling() and not _needs_grad(q, k, v, prefix_k, prefix_v, sinks)
    if impl == "torch" and inference:  # generate(): no autograd node to build, nothing to save
        out, _ = torch_backend.attention_forward(
            q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, doc_start, doc_end, sinks,
            causal, scale, float(softcap), int(window or 0), bool(deterministic), score_bias,
        )
        return out
    out, _ = PrefixAttentionFunction.apply(
        q, k, v, prefix_k, prefix_v, sinks, key_padding_mask, prefix_index, doc_start, doc_end,
        causal, scale, float(softcap), int(window or 0), bool(deterministic), impl, score_bias,
    )
    return out


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


__all__ = [
    "prefix_attention", "Backend", "BACKENDS", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "Documents",
    "resolve_backend", "triton_available", "triton_interpreting", "PrefixAttentionFunction",
]
