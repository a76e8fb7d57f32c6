"""PEFT's flat prefix layout: rows (P, L*2*Hkv*D), each row laid out [layer][k|v][Hkv][D], converted to
and from ours, (L, 2, N, Hkv, P, D).

This is PEFT's ``get_prompt``: view(P, 2L, Hkv, D), permute to (2L, Hkv, P, D), split in pairs. Its
``PrefixEncoder`` MLP outputs these rows too, so the reparameterized prefix goes through here."""

from __future__ import annotations

import torch

from .config import PrefixConfig


def peft_rows_to_kv(rows: torch.Tensor, config: PrefixConfig) -> torch.Tensor:
    """(P, L*2*Hkv*D) PEFT rows -> (L, 2, 1, Hkv, P, D), contiguous."""
    c = config
    L = len(c.layers)
    kv = rows.view(c.num_tokens, L, 2, c.num_kv_heads, c.head_dim).permute(1, 2, 3, 0, 4)
    return kv.unsqueeze(2).contiguous()


def kv_to_peft_rows(kv: torch.Tensor) -> torch.Tensor:
    """(L, 2, Hkv, P, D) -> PEFT rows (P, L*2*Hkv*D)."""
    L, two, H, P, D = kv.shape
    return kv.permute(3, 0, 1, 2, 4).reshape(P, L * two * H * D).contiguous()
