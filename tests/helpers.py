"""Shared by the tests of every layer: the device, tolerance helpers, the independent float64
reference, and the op-level test cases with their random inputs. Test modules import this module,
never each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixattn import Documents

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


def document_ids(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the document number of every position, by transformers' rule written out as a loop:
    a new document at t = 0 and wherever position_ids[t] - position_ids[t-1] != 1."""
    rows = []
    for row in position_ids.tolist():
        ids, doc = [], -1
        for t, p in enumerate(row):
            if t == 0 or p - row[t - 1] != 1:
                doc += 1
            ids.append(doc)
        rows.append(ids)
    return rows


def concat_reference(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=True, scale=None,
                     prefix_index=None, softcap=0.0, sliding_window=None, position_ids=None, sinks=None,
                     score_bias=None):
    """Float64 attention the way PEFT does it: expand the prefix over the batch, concatenate it in
    front of the sequence, repeat K/V over the GQA group, build an explicit mask (a loop over every
    query/key pair), softmax. Sinks are one more key column with the sink logit and a zero value.
    Documents come from position_ids (packed rows; Sq == Sk). A sliding window with causal=False is
    two-sided (|a - j| < W). score_bias (1|B, 1|Hq, Sq, P + Sk) is added after the softcap.

    Written independently of prefixattn.reference on purpose.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, Dk = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    scale = Dk ** -0.5 if scale is None else scale
    if prefix_k is None:
        pk = q.new_zeros(B, Hkv, 0, Dk)
        pv = q.new_zeros(B, Hkv, 0, Dv)
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
    if score_bias is not None:  # -inf hides a key (masked_fill: no NaN gradient through a row of -inf)
        hidden = torch.isneginf(score_bias)
        s = (s + score_bias.double().masked_fill(hidden, 0.0)).masked_fill(hidden, float("-inf"))
    docs = document_ids(position_ids) if position_ids is not None else None
    pad = key_padding_mask.tolist() if key_padding_mask is not None else None
    visible = []
    for b in range(B):
        rows = []
        for i in range(Sq):
            a = i + Sk - Sq
            row = [True] * P
            for j in range(Sk):
                ok = (not causal) or j <= a
                if sliding_window is not None:
                    ok = ok and j > a - sliding_window
                    if not causal:
                        ok = ok and j < a + sliding_window
                if docs is not None:
                    ok = ok and docs[b][j] == docs[b][i]
                if pad is not None:
                    ok = ok and bool(pad[b][j])
                row.append(ok)
            rows.append(row)
        visible.append(rows)
    mask = torch.tensor(visible, dtype=torch.bool, device=q.device).view(B, 1, Sq, P + Sk)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink_col = sinks.double().view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)
        s = torch.cat([s, sink_col], dim=-1)
        V = torch.cat([V, V.new_zeros(B, Hq, 1, Dv)], dim=2)
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
    Dv: int = 0  # value head dim; 0 = D
    window: int = 0  # sliding window; 0 = none
    docs: bool = False  # packed rows: several documents per row (Sq == Sk)
    sinks: bool = False  # per-head attention sinks
    bias: str = "none"  # score bias: none | batch (B, Hq) | shared (1, Hq) | scalar (1, 1) | inf (B, Hq, some -inf)

    @property
    def dv(self) -> int:
        return self.Dv or self.D

    def __str__(self) -> str:
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-Sq{self.Sq}-Sk{self.Sk}-P{self.P}-D{self.D}"
                f"-{'causal' if self.causal else 'full'}-{self.prefix}-{self.padding}"
                + (f"-cap{self.softcap}" if self.softcap else "")
                + (f"-Dv{self.Dv}" if self.Dv else "")
                + (f"-W{self.window}" if self.window else "")
                + ("-docs" if self.docs else "")
                + ("-sinks" if self.sinks else "")
                + (f"-bias_{self.bias}" if self.bias != "none" else ""))


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

# The newer features: sliding windows, packed documents, sinks, Dk != Dv (and their mixes)
FEATURE_CASES = [
    Case(Sq=37, Sk=37, window=5),  # window smaller than S
    Case(Sq=21, Sk=21, window=40, P=3),  # window larger than S: changes nothing
    Case(Sq=19, Sk=19, window=7, padding="left", prefix="row"),  # window + padding
    Case(Sq=1, Sk=33, window=9, prefix="bank", Hq=8, Hkv=2),  # window + decode
    Case(Sq=9, Sk=40, window=16, P=0),  # chunked prefill, no prefix
    Case(Sq=37, Sk=37, docs=True),  # documents of lengths 1, 19, 2, ... (one spans blocks)
    Case(Sq=23, Sk=23, docs=True, prefix="bank", padding="right"),  # documents + bank + padding
    Case(Sq=30, Sk=30, docs=True, window=4, P=0),  # documents and a window, no prefix
    Case(Sq=17, Sk=17, docs=True, causal=False, prefix="row"),  # packed encoder
    Case(sinks=True),
    Case(Sq=1, Sk=33, sinks=True, P=0, padding="empty_row"),  # the sink alone: output 0, finite
    Case(Sq=21, Sk=21, sinks=True, softcap=4.0, window=6),
    Case(D=24, Dv=40, Sq=13, Sk=13),  # Dk != Dv (latent attention)
    Case(D=40, Dv=16, Sq=1, Sk=20, prefix="bank", padding="left"),
    Case(D=32, Dv=8, Sq=29, Sk=29, docs=True, sinks=True, prefix="row", Hq=6, Hkv=2),
]

# An additive score bias (T5's position bias) over [prefix; sequence], with the other features
BIAS_CASES = [
    Case(Sq=37, Sk=37, D=80, bias="batch"),  # odd sizes
    Case(Hq=2, Hkv=2, P=1, bias="shared"),  # a single prefix slot
    Case(Sq=1, Sk=33, prefix="bank", padding="left", Hq=8, Hkv=2, bias="batch"),  # decode, GQA 4, bank
    Case(Sq=9, Sk=40, prefix="row", bias="scalar"),  # chunked prefill, one bias for every head
    Case(Sq=23, Sk=11, causal=False, padding="right", bias="shared"),  # encoder, Sq > Sk
    Case(P=0, padding="empty_row", bias="inf"),  # -inf in the bias, rows that see nothing
    Case(Sq=21, Sk=21, Hq=6, Hkv=2, P=17, softcap=4.0, bias="inf"),  # after the softcap; two prefix blocks
    Case(Sq=30, Sk=30, docs=True, window=4, sinks=True, bias="batch", D=24, Dv=40),
]

# Two-sided windows (causal=False, key j visible when |a - j| < W: ModernBERT's local layers)
TWO_SIDED_CASES = [
    Case(Sq=37, Sk=37, causal=False, window=5, D=80),
    Case(Sq=19, Sk=19, causal=False, window=7, padding="left", prefix="row"),
    Case(Sq=23, Sk=11, causal=False, window=3),  # Sq > Sk: the first queries see nothing but the prefix
    Case(Sq=1, Sk=33, causal=False, window=9, prefix="bank", Hq=8, Hkv=2),
    Case(Sq=9, Sk=40, causal=False, window=16, P=1),
    Case(Sq=30, Sk=30, causal=False, window=4, docs=True, P=0, padding="right"),
    Case(Sq=21, Sk=21, causal=False, window=6, sinks=True, softcap=4.0, bias="shared"),
]

DOC_LENGTHS = [1, 19, 2, 1, 7, 11, 3]


def packed_position_ids(B: int, S: int, device=DEVICE) -> torch.Tensor:
    """(B, S) position ids of rows packed with documents of varied lengths (several of length 1,
    one longer than a 16-row block), restarting at 0 for each document; row b starts its cycle at b."""
    rows = []
    for b in range(B):
        pos, n = [], b
        while len(pos) < S:
            pos.extend(range(DOC_LENGTHS[n % len(DOC_LENGTHS)]))
            n += 1
        rows.append(pos[:S])
    return torch.tensor(rows, device=device)


@dataclass
class Inputs:
    """The tensors of one case and the keyword arguments for the op and for concat_reference."""

    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    pk: torch.Tensor
    pv: torch.Tensor
    mask: torch.Tensor | None
    idx: torch.Tensor | None
    sinks: torch.Tensor | None
    position_ids: torch.Tensor | None
    bias: torch.Tensor | None = None

    @property
    def grad_inputs(self) -> tuple:
        """The differentiable inputs: q, k, v, prefix_k, prefix_v and the sinks when present."""
        base = (self.q, self.k, self.v, self.pk, self.pv)
        return base + ((self.sinks,) if self.sinks is not None else ())

    def common(self) -> dict:
        c = self.case
        return dict(key_padding_mask=self.mask, causal=c.causal, prefix_index=self.idx, softcap=c.softcap,
                    sliding_window=c.window or None, sinks=self.sinks, score_bias=self.bias)

    def op_kwargs(self) -> dict:
        docs = None if self.position_ids is None else Documents.from_position_ids(self.position_ids)
        return dict(self.common(), documents=docs)

    def ref_kwargs(self) -> dict:
        return dict(self.common(), position_ids=self.position_ids)


def make_case(c: Case, dtype=torch.float32, device=DEVICE, requires_grad=True, gen=None) -> Inputs:
    kw = dict(dtype=dtype, device=device)
    q = torch.randn(c.B, c.Hq, c.Sq, c.D, **kw, generator=gen)
    k = torch.randn(c.B, c.Hkv, c.Sk, c.D, **kw, generator=gen)
    v = torch.randn(c.B, c.Hkv, c.Sk, c.dv, **kw, generator=gen)
    prefix_index = None
    if c.prefix == "shared":
        lead = (c.Hkv, c.P)
    elif c.prefix == "row":
        lead = (c.B, c.Hkv, c.P)
    else:  # a bank of 4 entries; entry 1 is never used and must get exactly zero gradient
        lead = (4, c.Hkv, c.P)
        prefix_index = torch.tensor([3, 0, 3, 2, 0][: c.B], device=device)
    pk = torch.randn(*lead, c.D, **kw, generator=gen)
    pv = torch.randn(*lead, c.dv, **kw, generator=gen)
    mask = None
    if c.padding != "none":
        mask = torch.ones(c.B, c.Sk, dtype=torch.bool, device=device)
        if c.padding == "left":
            mask[0, : c.Sk // 3] = False
        elif c.padding == "right":
            mask[-1, c.Sk - c.Sk // 3:] = False
        elif c.padding == "empty_row":
            mask[0, :] = False
    sinks = torch.randn(c.Hq, **kw, generator=gen) if c.sinks else None
    position_ids = packed_position_ids(c.B, c.Sk, device) if c.docs else None
    bias = make_bias(c, dtype, device, gen)
    tensors = [q, k, v, pk, pv] + ([sinks] if c.sinks else [])
    if requires_grad:
        for t in tensors:
            t.requires_grad_(True)
    return Inputs(c, q, k, v, pk, pv, mask, prefix_index, sinks, position_ids, bias)


def make_bias(c: Case, dtype, device, gen=None) -> torch.Tensor | None:
    """A score bias of the case's form, T5-sized values (a few units), never requiring grad. "inf"
    hides random columns with -inf and every column of batch row 0, head 0, query 0 (that row then
    sees nothing: 0 out, like an empty row)."""
    if c.bias == "none":
        return None
    lead = {"batch": (c.B, c.Hq), "shared": (1, c.Hq), "scalar": (1, 1), "inf": (c.B, c.Hq)}[c.bias]
    bias = 2.0 * torch.randn(*lead, c.Sq, c.P + c.Sk, dtype=torch.float32, device=device, generator=gen)
    if c.bias == "inf":
        hide = torch.rand(bias.shape, device=device, generator=gen) < 0.2
        bias = bias.masked_fill(hide, float("-inf"))
        bias[0, 0, 0] = float("-inf")
    return bias.to(dtype)


def make_inputs(c: Case, dtype=torch.float32, device=DEVICE, requires_grad=True, gen=None):
    """(q, k, v, prefix_k, prefix_v), key_padding_mask, prefix_index of a case (see make_case for the rest)."""
    x = make_case(c, dtype, device, requires_grad, gen)
    return [x.q, x.k, x.v, x.pk, x.pv], x.mask, x.idx
