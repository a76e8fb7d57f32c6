"""PEFT's flat prefix layout: rows (P, n*2*Hkv*D), each row laid out [layer][k|v][Hkv][D], converted to
and from ours, (L, 2, N, Hkv, P, D).

This is PEFT's ``get_prompt``: view(P, 2n, Hkv, D), permute to (2n, Hkv, P, D), split in pairs. Its
``PrefixEncoder`` MLP outputs these rows too, so the reparameterized prefix goes through here. A PEFT
adapter has rows for every layer of the model (n = ``num_layers``), also for the layers PEFT skips
(Gemma 4's layers larger than the adapter); ours holds the prefixed layers only (L = ``len(layers)``)."""

from __future__ import annotations

import torch

from .config import PrefixConfig


def peft_rows_to_kv(rows: torch.Tensor, config: PrefixConfig) -> torch.Tensor:
    """(P, n*2*Hkv*D) PEFT rows -> (L, 2, 1, Hkv, P, D), contiguous. n is ``len(layers)`` (our MLP's
    output) or ``num_layers`` (an adapter: the prefixed layers' rows are taken)."""
    c = config
    n = rows.shape[1] // (2 * c.token_dim)
    kv = rows.view(c.num_tokens, n, 2, c.num_kv_heads, c.head_dim).permute(1, 2, 3, 0, 4)
    if n != len(c.layers):
        kv = kv[list(c.layers)]
    return kv.unsqueeze(2).contiguous()


def kv_to_peft_rows(kv: torch.Tensor, config: PrefixConfig) -> torch.Tensor:
    """(L, 2, Hkv, P, D) -> PEFT rows (P, num_layers*2*Hkv*D); zeros for the layers without a prefix
    (PEFT skips them, so it never reads them)."""
    L, two, H, P, D = kv.shape
    full = kv.new_zeros((config.num_layers, two, H, P, D))
    full[list(config.layers)] = kv
    return full.permute(3, 0, 1, 2, 4).reshape(P, config.num_layers * two * H * D).contiguous()
