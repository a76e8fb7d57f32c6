"""Shared by the tests of every layer: the device, tolerance helpers, the independent float64
reference, and the op-level test cases with their random inputs. Test modules import this module,
never each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Run on the GPU when there is one, else on the CPU through the interpreter (conftest sets it up).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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


@dataclass
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Sq: int = 19
    Sk: int = 19
    P: int = 5
    D: int = 16
    causal: bool = True
    prefix: str = "shared"  # shared | row | bank
    padding: str = "none"  # none | left | right | empty_row
    softcap: float = 0.0

    def __str__(self) -> str:
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-Sq{self.Sq}-Sk{self.Sk}-P{self.P}-D{self.D}"
                f"-{'causal' if self.causal else 'full'}-{self.prefix}-{self.padding}"
                + (f"-cap{self.softcap}" if self.softcap else ""))


CASES = [
    Case(Sq=37, Sk=37, D=80),  # odd sizes, D not a power of two
    Case(Hq=2, Hkv=2, P=1),  # MHA, a single prefix slot
    Case(Hq=6, Hkv=2, P=17, D=32),  # GQA group of 3, prefix spans two blocks
    Case(prefix="row", padding="left"),
    Case(prefix="bank", padding="right"),
    Case(Sq=1, Sk=33),  # decode step over a KV cache
    Case(Sq=1, Sk=33, prefix="bank", padding="left", Hq=8, Hkv=2),
    Case(Sq=9, Sk=40),  # chunked prefill: bottom-right causal
    Case(Sq=23, Sk=11, causal=False),  # encoder, Sq > Sk
    Case(causal=False, padding="left", prefix="row"),
    Case(P=0, padding="empty_row"),  # nothing to attend: must be 0, not NaN
    Case(P=0, Sq=1, Sk=7),
    Case(softcap=4.0, Sq=21, Sk=21, padding="right"),
    Case(D=8, Sq=7, Sk=7, P=3),  # head dim below the 16-wide dot: padded
    Case(D=96, Sq=5, Sk=18, P=2, B=1, Hq=3, Hkv=1),
    Case(B=3, Sq=17, Sk=17, P=40, prefix="bank"),
]


def make_inputs(c: Case, dtype=torch.float32, device=DEVICE, requires_grad=True, gen=None):
    kw = dict(dtype=dtype, device=device)
    q = torch.randn(c.B, c.Hq, c.Sq, c.D, **kw, generator=gen)
    k = torch.randn(c.B, c.Hkv, c.Sk, c.D, **kw, generator=gen)
    v = torch.randn(c.B, c.Hkv, c.Sk, c.D, **kw, generator=gen)
    prefix_index = None
    if c.prefix == "shared":
        pshape = (c.Hkv, c.P, c.D)
    elif c.prefix == "row":
        pshape = (c.B, c.Hkv, c.P, c.D)
    else:  # a bank of 4 entries; entry 1 is never used and must get exactly zero gradient
        pshape = (4, c.Hkv, c.P, c.D)
        prefix_index = torch.tensor([3, 0, 3, 2, 0][: c.B], device=device)
    pk = torch.randn(*pshape, **kw, generator=gen)
    pv = torch.randn(*pshape, **kw, generator=gen)
    mask = None
    if c.padding != "none":
        mask = torch.ones(c.B, c.Sk, dtype=torch.bool, device=device)
        if c.padding == "left":
            mask[0, : c.Sk // 3] = False
        elif c.padding == "right":
            mask[-1, c.Sk - c.Sk // 3:] = False
        elif c.padding == "empty_row":
            mask[0, :] = False
    tensors = [q, k, v, pk, pv]
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return tensors, mask, prefix_index
