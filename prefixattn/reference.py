"""Pure-PyTorch prefix attention written out plainly: the oracle the fast paths are tested against (in
float64), not a path ``prefix_attention`` runs (its torch backend is ops/torch_backend.py).

Same semantics as the Triton kernels (see ``prefixattn.ops.prefix_attention``), written with plain
differentiable torch ops so that autograd gives every gradient (sinks included). It materializes the
(Sq, P + Sk) scores. It never repeats K/V over the GQA group (the query heads are grouped and broadcast
against their KV head) and never
expands a shared prefix over the batch: the prefix scores come from a broadcast matmul, so
autograd's reduction of that broadcast is the prefix gradient summed over the batch.

The scores of the key blocks are joined only along the key axis, which is what one softmax over
[prefix; sequence; sink] means; the kernels do the same with an online softmax instead.

Visible sequence keys follow DESIGN.md's one rule: query i at absolute position a = i + Sk - Sq
sees key j when lo(i) <= j <= hi(i) and j is not padding, with
hi(i) = a (causal; Sk - 1 or the document's last key when not causal, and a + W - 1 under a window) and
lo(i) = max(document start, a - W + 1).

``score_bias`` (1|B, 1|Hq, Sq, P + Sk) is added to the scaled (and softcapped) scores: its first P
columns to the prefix slots, the rest to the sequence keys.
"""

from __future__ import annotations

import torch


def visible_sequence_keys(
    sq: int,
    sk: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    device: torch.device,
    sliding_window: int | None = None,
    doc_start: torch.Tensor | None = None,
    doc_end: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, 1, Sq, Sk) mask of the sequence keys each query may see, or None for all."""
    i = torch.arange(sq, device=device).view(1, sq, 1)
    j = torch.arange(sk, device=device).view(1, 1, sk)
    a = i + (sk - sq)
    allowed = None

    def both(x: torch.Tensor) -> torch.Tensor:
        return x if allowed is None else (allowed & x)

    if causal:
        allowed = both(j <= a)
    if sliding_window is not None:
        allowed = both(j > a - sliding_window)
        if not causal:  # two-sided: |a - j| < W
            allowed = both(j < a + sliding_window)
    if doc_start is not None:  # Sq == Sk: query i's document bounds are those of position i
        allowed = both(j >= doc_start.to(device).long().unsqueeze(-1))
        if not causal:
            allowed = both(j < doc_end.to(device).long().unsqueeze(-1))
    if key_padding_mask is not None:
        allowed = both(key_padding_mask.to(device=device, dtype=torch.bool).view(-1, 1, sk))
    if allowed is None:
        return None
    return allowed.expand(allowed.shape[0], sq, sk).view(allowed.shape[0], 1, 1, sq, sk)


def select_prefix(
    prefix: torch.Tensor, batch: int, prefix_index: torch.Tensor | None
) -> torch.Tensor:
    """The prefix each batch row uses, as (1 or B, Hkv, P, D): shared, per row, or gathered from a bank."""
    if prefix_index is not None:
        return prefix.index_select(0, prefix_index.long())
    if prefix.dim() == 3:
        return prefix.unsqueeze(0)
    return prefix


def prefix_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float,
    prefix_index: torch.Tensor | None = None,
    softcap: float = 0.0,
    sliding_window: int | None = None,
    doc_start: torch.Tensor | None = None,
    doc_end: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    score_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference implementation. Inputs are assumed validated and cast (see ops.prefix_attention).
    Runs with autocast off: the inputs already carry the compute dtype, and fp32 math must stay fp32."""
    with torch.autocast(q.device.type, enabled=False):
        return _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_index,
                          softcap, sliding_window, doc_start, doc_end, sinks, score_bias)


def _attention(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_index, softcap,
               sliding_window, doc_start, doc_end, sinks, score_bias):
    out_dtype = q.dtype
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, Hq, Sq, Dk = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv

    qg = q.to(compute).reshape(B, Hkv, G, Sq, Dk)
    kk = k.to(compute).unsqueeze(2)  # (B, Hkv, 1, Sk, D): broadcast over the group, no repeat
    vv = v.to(compute).unsqueeze(2)
    pk = select_prefix(prefix_k, B, prefix_index).to(compute).unsqueeze(2)  # (1|B, Hkv, 1, P, D)
    pv = select_prefix(prefix_v, B, prefix_index).to(compute).unsqueeze(2)

    s_prefix = torch.matmul(qg, pk.transpose(-1, -2)) * scale  # (B, Hkv, G, Sq, P)
    s_seq = torch.matmul(qg, kk.transpose(-1, -2)) * scale  # (B, Hkv, G, Sq, Sk)
    if softcap > 0:
        s_prefix = softcap * torch.tanh(s_prefix / softcap)
        s_seq = softcap * torch.tanh(s_seq / softcap)
    if score_bias is not None:  # (1|B, 1|Hq, Sq, P + Sk) -> (1|B, Hkv, G, Sq, P + Sk), after the softcap
        bias = score_bias.to(compute).expand(score_bias.shape[0], Hq, Sq, -1)
        bias = bias.reshape(bias.shape[0], Hkv, G, Sq, bias.shape[-1])
        P = pk.shape[-2]
        s_prefix = s_prefix + bias[..., :P]
        s_seq = s_seq + bias[..., P:]
    allowed = visible_sequence_keys(
        Sq, Sk, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
        sliding_window=sliding_window, doc_start=doc_start, doc_end=doc_end,
    )
    if allowed is not None:
        s_seq = s_seq.masked_fill(~allowed, float("-inf"))

    blocks = [s_prefix, s_seq]
    if sinks is not None:  # one more logit per head, not scaled, that carries no value
        sink = sinks.to(compute).view(1, Hkv, G, 1, 1).expand(B, Hkv, G, Sq, 1)
        blocks.append(sink)
    scores = torch.cat(blocks, dim=-1)
    # A row that sees nothing (P = 0, no sink and every key masked) must give 0, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)

    P = pk.shape[-2]
    out = torch.matmul(probs[..., :P], pv) + torch.matmul(probs[..., P:P + Sk], vv)
    return out.reshape(B, Hq, Sq, Dv).to(out_dtype)
