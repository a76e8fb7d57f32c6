"""The torch backend where PyTorch's fused CPU kernel cannot serve (CUDA layers over head dim 256, Apple
MPS, or a torch whose private CPU op changed): the public ``F.scaled_dot_product_attention`` over
K = [prefix; k], differentiable through autograd, which picks the device's fused kernel.

Only for calls it covers exactly: no sinks, no softcap, no window, no packed documents, and causal with
Sq == Sk, a decode step (Sq == 1) or causal=False; a call with P = 0 and padding (which can leave a row
with nothing to attend, where SDPA kernels disagree) goes to the engines as well.

What it does better than the cache-based prefix (PEFT): a causal call with Sq == Sk and no padding runs
with ``is_causal`` and no mask at all: the queries get P zero rows in front, so SDPA's top-left causal
rule over (P + Sq, P + Sk) is exactly ours (every prefix slot, then sequence keys j <= i). With padding
the mask is (B, 1, 1, P + Sk) for decode steps and causal=False, and a (B, 1, P + S, P + S) bool mask for
padded causal rows, as PEFT's. K/V are repeated over the GQA group the way transformers does for SDPA
(its GQA flag is not served by every fused kernel). A score bias becomes SDPA's float mask (in q's
dtype, as SDPA requires), with padding and the causal rule written into it as -inf; with a bias and
P = 0 a row may see nothing, so those calls go to the engines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_backend import autocast_off, prefix_rows


def sdpa_concat_applies(sq: int, sk: int, prefix_len: int, *, causal: bool, window: int, documents: bool,
                        padded: bool, sinks: bool, softcap: float, biased: bool = False) -> bool:
    if sinks or softcap or (prefix_len == 0 and (padded or biased)) or prefix_len + sk == 0:
        return False
    return not window and not documents and (not causal or sq == sk or sq == 1)


def sdpa_concat_attention(q, k, v, prefix_k, prefix_v, *, key_padding_mask, causal, scale, prefix_index,
                          score_bias=None):
    """Differentiable (B, Hq, Sq, Dv) in q's dtype; inputs checked and cast by ``prefix_attention``."""
    with autocast_off(q):
        B, Hq, Sq, Dk = q.shape
        Hkv, Sk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        pk, pv = prefix_rows(prefix_k, B, prefix_index), prefix_rows(prefix_v, B, prefix_index)
        P = pk.shape[2]
        # (an empty prefix too: its gradient is then an empty tensor, as on the other paths, not None)
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        if G > 1:
            keys, values = keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1)
        square = causal and Sq > 1  # a decode step sees every key
        lead = P if square else 0
        queries = torch.cat([q.new_zeros(B, Hq, P, Dk), q], 2) if lead else q
        mask = visible = None
        if key_padding_mask is not None:
            visible = torch.cat([key_padding_mask.new_ones(B, P), key_padding_mask], 1).view(B, 1, 1, P + Sk)
        if square and (visible is not None or score_bias is not None):
            tril = torch.ones(lead + Sq, P + Sk, dtype=torch.bool, device=q.device).tril()
            visible = tril if visible is None else visible & tril
        mask = visible
        if score_bias is not None:
            bias = score_bias.to(q.dtype)
            if lead:  # the zero query rows in front see the prefix only (their output is dropped)
                bias = torch.cat([bias.new_zeros(*bias.shape[:2], lead, bias.shape[3]), bias], 2)
            mask = bias if visible is None else bias.masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                             is_causal=square and mask is None, scale=scale)
        return out[:, :, lead:]
