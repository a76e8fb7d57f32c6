"""Pure-PyTorch prefix attention: the CPU path and the fallback.

Same semantics as the Triton kernels (see ``prefixattn.ops.prefix_attention``), written with plain
differentiable torch ops so that autograd gives every gradient. It never repeats K/V over the GQA
group (the query heads are grouped and broadcast against their KV head) and never expands a shared
prefix over the batch: the prefix scores come from a broadcast matmul, so autograd's reduction of
that broadcast is the prefix gradient summed over the batch.

The scores of the two key blocks are joined only along the key axis, which is what one softmax
over [prefix; sequence] means; the kernels do the same with an online softmax instead.
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
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, 1, Sq, Sk) mask of the sequence keys each query may see, or None for all.

    Causal is aligned to the bottom right: query i sees key j when j <= i + (Sk - Sq).
    """
    allowed = None
    if causal:
        i = torch.arange(sq, device=device).unsqueeze(1)
        j = torch.arange(sk, device=device).unsqueeze(0)
        allowed = (j <= i + (sk - sq)).view(1, 1, 1, sq, sk)
    if key_padding_mask is not None:
        pad = key_padding_mask.to(device=device, dtype=torch.bool).view(-1, 1, 1, 1, sk)
        allowed = pad if allowed is None else (allowed & pad)
    return allowed


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
) -> torch.Tensor:
    """Reference implementation. Inputs are assumed validated (see ops.prefix_attention)."""
    out_dtype = q.dtype
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv

    qg = q.to(compute).reshape(B, Hkv, G, Sq, D)
    kk = k.to(compute).unsqueeze(2)  # (B, Hkv, 1, Sk, D): broadcast over the group, no repeat
    vv = v.to(compute).unsqueeze(2)
    pk = select_prefix(prefix_k, B, prefix_index).to(compute).unsqueeze(2)  # (1|B, Hkv, 1, P, D)
    pv = select_prefix(prefix_v, B, prefix_index).to(compute).unsqueeze(2)

    s_prefix = torch.matmul(qg, pk.transpose(-1, -2)) * scale  # (B, Hkv, G, Sq, P)
    s_seq = torch.matmul(qg, kk.transpose(-1, -2)) * scale  # (B, Hkv, G, Sq, Sk)
    if softcap > 0:
        s_prefix = softcap * torch.tanh(s_prefix / softcap)
        s_seq = softcap * torch.tanh(s_seq / softcap)
    allowed = visible_sequence_keys(
        Sq, Sk, causal=causal, key_padding_mask=key_padding_mask, device=q.device
    )
    if allowed is not None:
        s_seq = s_seq.masked_fill(~allowed, float("-inf"))

    scores = torch.cat([s_prefix, s_seq], dim=-1)
    # A row that sees nothing (P = 0 and every key masked) must give 0, not NaN.
    row_max = scores.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)

    P = pk.shape[-2]
    out = torch.matmul(probs[..., :P], pv) + torch.matmul(probs[..., P:], vv)
    return out.reshape(B, Hq, Sq, D).to(out_dtype)
