"""Attention weights over [prefix; sequence], for ``output_attentions=True``.

The fused paths never materialize the (B, H, Sq, P + Sk) probabilities; a caller who asks for them gets
them from here, computed next to (not instead of) the attention output, with the same masking rule
(``reference.visible_sequence_keys``). Column p < P is prefix slot p, column P + j sequence key j: the
layout of PEFT's cache-based prefix, whose eager attention returns the same matrix. Sink logits (gpt-oss)
join the softmax's denominator but get no column, as in transformers' eager attention. A score bias
(1|B, 1|Hq, Sq, P + Sk) is added after the softcap, as the op does.
"""

from __future__ import annotations

import torch

from .reference import select_prefix, visible_sequence_keys


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    prefix_k: torch.Tensor | None,
    *,
    scale: float,
    causal: bool = True,
    key_padding_mask: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    softcap: float = 0.0,
    sliding_window: int | None = None,
    doc_start: torch.Tensor | None = None,
    doc_end: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, Sq, P + Sk) softmax probabilities in q's dtype (computed in fp32 for half inputs)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qg = q.to(compute).reshape(B, Hkv, G, Sq, -1)
    blocks = []
    if prefix_k is not None and prefix_k.shape[-2] > 0:
        pk = select_prefix(prefix_k, B, prefix_index).to(compute).unsqueeze(2)
        blocks.append(torch.matmul(qg, pk.transpose(-1, -2)) * scale)
    s_seq = torch.matmul(qg, k.to(compute).unsqueeze(2).transpose(-1, -2)) * scale
    blocks.append(s_seq)
    if softcap > 0:
        blocks = [softcap * torch.tanh(s / softcap) for s in blocks]
    if score_bias is not None:  # columns [prefix; sequence], as (1|B, Hkv, G, Sq, P + Sk)
        bias = score_bias.to(compute).expand(score_bias.shape[0], Hq, Sq, -1)
        bias = bias.reshape(bias.shape[0], Hkv, G, Sq, -1)
        P = bias.shape[-1] - Sk
        blocks = [blocks[0] + bias[..., :P], blocks[1] + bias[..., P:]] if P else [blocks[0] + bias]
    allowed = visible_sequence_keys(Sq, Sk, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
                                    sliding_window=sliding_window, doc_start=doc_start, doc_end=doc_end)
    if allowed is not None:
        blocks[-1] = blocks[-1].masked_fill(~allowed, float("-inf"))
    columns = sum(b.shape[-1] for b in blocks)
    if sinks is not None:
        blocks.append(sinks.to(compute).view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Sq, 1))
    scores = torch.cat(blocks, dim=-1)
    empty = torch.isneginf(scores.amax(dim=-1, keepdim=True))  # a row that sees nothing: zeros, not NaN
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return probs[..., :columns].reshape(B, Hq, Sq, columns).to(q.dtype)
