"""Tolerance helpers and the independent float64 reference used across the tests."""

from __future__ import annotations

import torch

# Relative error ||a - b|| / ||b|| allowed per dtype (see the device METHOD notes: fp32 far
# under 1e-3, tf32 dots near 3e-4, bf16 operands 1e-3..1e-2).
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def concat_reference(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=True, scale=None,
                     prefix_index=None, softcap=0.0):
    """Float64 attention the way PEFT does it: expand the prefix over the batch, concatenate it in
    front of the sequence, repeat K/V over the GQA group, build an explicit mask, softmax.

    Written independently of prefixattn.reference on purpose.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    if prefix_k is None:
        pk = q.new_zeros(B, Hkv, 0, D)
        pv = q.new_zeros(B, Hkv, 0, D)
    elif prefix_index is not None:
        pk, pv = prefix_k.double()[prefix_index.long()], prefix_v.double()[prefix_index.long()]
    elif prefix_k.dim() == 3:
        pk = prefix_k.double().unsqueeze(0).expand(B, -1, -1, -1)
        pv = prefix_v.double().unsqueeze(0).expand(B, -1, -1, -1)
    else:
        pk, pv = prefix_k.double(), prefix_v.double()
    P = pk.shape[2]
    K = torch.cat([pk, k], dim=2).repeat_interleave(G, dim=1)
    V = torch.cat([pv, v], dim=2).repeat_interleave(G, dim=1)
    s = torch.einsum("bhid,bhjd->bhij", q, K) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    mask = torch.ones(B, 1, Sq, P + Sk, dtype=torch.bool, device=q.device)
    for i in range(Sq):
        for j in range(Sk):
            visible = (not causal) or (j <= i + Sk - Sq)
            if not visible:
                mask[:, :, i, P + j] = False
    if key_padding_mask is not None:
        mask[:, :, :, P:] &= key_padding_mask.bool().view(B, 1, 1, Sk)
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see nothing give 0
    return torch.einsum("bhij,bhjd->bhid", p, V)


def count_launches(monkeypatch, module, kernel_name: str) -> list:
    """Replace ``module.<kernel_name>`` by a wrapper that records each launch grid and launches the
    real kernel; returns the (growing) list of grids."""
    real = getattr(module, kernel_name)
    grids: list = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(module, kernel_name, Recorder())
    return grids
