"""The one masking rule in the kernels: which key blocks a block of query rows walks (and which of
them it masks), and which row blocks the dk/dv kernel walks for a key block; checked against a brute
force over every (query, key) pair, and end to end by poisoning K/V outside every query's interval."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, Case, assert_close_rel, concat_reference, make_case, packed_position_ids
from prefixattn.kernels.config import use_settings
from prefixattn.kernels.masks import key_block_rows, row_block_keys, row_interval

import prefixattn
from prefixattn import Documents


@triton.jit
def _probe(DOCS, DOCE, ROWS_OUT, KEYS_OUT, Sq, Sk, G, R, window,
           CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    # the key blocks row block `pid` walks
    offs_r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    lo_row, hi_row = row_interval(offs_r // G, r_ok, DOCS, DOCE, Sk - Sq, Sk, window,
                                  CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW)
    a, b, c, d = row_block_keys(lo_row, hi_row, r_ok, Sk, BLOCK_N)
    tl.store(KEYS_OUT + pid * 4 + 0, a)
    tl.store(KEYS_OUT + pid * 4 + 1, b)
    tl.store(KEYS_OUT + pid * 4 + 2, c)
    tl.store(KEYS_OUT + pid * 4 + 3, d)
    # the packed rows key block `pid` walks
    n0 = pid * BLOCK_N
    if n0 < Sk:
        n1 = tl.minimum(n0 + BLOCK_N, Sk)
        a, b, c, d = key_block_rows(n0, n1, DOCS, DOCE, Sk - Sq, Sq, window, G,
                                    CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW, BLOCK_M=BLOCK_M)
        tl.store(ROWS_OUT + pid * 4 + 0, a)
        tl.store(ROWS_OUT + pid * 4 + 1, b)
        tl.store(ROWS_OUT + pid * 4 + 2, c)
        tl.store(ROWS_OUT + pid * 4 + 3, d)


def visible(i, j, Sq, Sk, causal, window, docs):
    a = i + Sk - Sq
    ok = (not causal) or j <= a
    if window:
        ok = ok and j > a - window
        if not causal:  # two-sided
            ok = ok and j < a + window
    if docs is not None:
        ok = ok and docs[i] == docs[j]
    return ok


PROBES = [
    # (Sq, Sk, G, causal, window, documents)
    (37, 37, 1, True, 0, False),
    (37, 37, 2, True, 5, False),
    (1, 90, 4, True, 9, False),
    (7, 70, 3, True, 20, False),
    (45, 45, 1, True, 0, True),
    (45, 45, 3, True, 6, True),
    (33, 33, 2, False, 0, True),
    (20, 30, 1, False, 0, False),
    (37, 37, 2, False, 5, False),  # two-sided windows
    (7, 70, 3, False, 20, False),
    (23, 11, 1, False, 3, False),
    (45, 45, 3, False, 6, True),
]


@pytest.mark.parametrize("Sq,Sk,G,causal,window,docs", PROBES)
def test_walked_blocks_follow_the_intervals(Sq, Sk, G, causal, window, docs):
    BM = BN = 16
    R = G * Sq
    pos = packed_position_ids(1, Sk, device=DEVICE)
    d = Documents.from_position_ids(pos)
    doc_ids = d.start[0].tolist() if docs else None
    n_row_blocks, n_key_blocks = triton.cdiv(R, BM), triton.cdiv(Sk, BN)
    keys = torch.full((max(n_row_blocks, n_key_blocks), 4), -7, dtype=torch.int32, device=DEVICE)
    rows = torch.full_like(keys, -7)
    _probe[(max(n_row_blocks, n_key_blocks),)](
        d.start, d.end, rows, keys, Sq, Sk, G, R, window,
        CAUSAL=causal, HAS_DOCS=docs, HAS_WINDOW=window > 0, BLOCK_M=BM, BLOCK_N=BN)
    vis = [[visible(r // G, j, Sq, Sk, causal, window, doc_ids) for j in range(Sk)] for r in range(R)]

    for pid in range(n_row_blocks):
        a, b, c, e = keys[pid].tolist()
        assert a <= b <= c <= e and a % BN == 0 and b % BN == 0 and c % BN == 0
        block_rows = range(pid * BM, min(pid * BM + BM, R))
        seen = {j for r in block_rows for j in range(Sk) if vis[r][j]}
        walked = set(range(a, e))
        assert seen <= walked, f"row block {pid} skips visible keys {sorted(seen - walked)[:5]}"
        for n in range(a, e, BN):  # no walked block is invisible to every row of the block
            assert seen & set(range(n, n + BN)), f"row block {pid} walks key block {n} that no row sees"
        for j in range(b, c):  # the unmasked blocks are visible to every row of the block
            assert all(vis[r][j] for r in block_rows), f"row block {pid}: key {j} unmasked but hidden"

    for pid in range(n_key_blocks):
        a, b, c, e = rows[pid].tolist()
        assert a <= b <= c <= e and a % BM == 0 and b % BM == 0 and c % BM == 0
        block_keys = range(pid * BN, min(pid * BN + BN, Sk))
        seeing = {r for r in range(R) for j in block_keys if vis[r][j]}
        walked = set(range(a, e))
        assert seeing <= walked, f"key block {pid} skips rows {sorted(seeing - walked)[:5]}"
        for m in range(a, e, BM):
            assert seeing & set(range(m, m + BM)), f"key block {pid} walks row block {m} that sees none of it"
        for r in range(b, min(c, R)):
            assert all(vis[r][j] for j in block_keys), f"key block {pid}: row {r} unmasked but blind to it"


@pytest.mark.parametrize("c", [
    Case(Sq=1, Sk=90, window=9, Hq=8, Hkv=2, prefix="bank"),  # decode with a window
    Case(Sq=3, Sk=75, window=20, P=0, sinks=True),  # a short chunk, no prefix
    Case(Sq=5, Sk=100, window=33, D=24, Dv=40),
    Case(Sq=5, Sk=100, window=20, causal=False, bias="batch"),  # two-sided
], ids=str)
def test_keys_outside_every_interval_are_never_loaded(c):
    """K/V of the key blocks no query sees are NaN: a kernel that loaded them (even masked, p * NaN)
    would give NaN. Output and every gradient stay finite and equal the reference on clean inputs."""
    x = make_case(c)
    first_seen = (c.Sk - c.Sq) - c.window + 1  # the smallest key any query sees
    cut = (first_seen // 16) * 16  # blocks (16 keys under the interpreter) wholly before it
    assert cut >= 16
    with torch.no_grad():
        k_bad, v_bad = x.k.detach().clone(), x.v.detach().clone()
        k_bad[:, :, :cut] = float("nan")
        v_bad[:, :, :cut] = float("nan")
    k_bad.requires_grad_(True)
    v_bad.requires_grad_(True)
    kw = x.op_kwargs()
    with use_settings(splits=0):
        out = prefixattn.prefix_attention(x.q, k_bad, v_bad, x.pk, x.pv, **kw, backend="triton")
    ref = concat_reference(x.q, x.k, x.v, x.pk, x.pv, **x.ref_kwargs())
    assert_close_rel(out, ref, 2e-3, "out")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x.q, k_bad, v_bad, x.pk, x.pv), do)
    refs = torch.autograd.grad(ref, (x.q, x.k, x.v, x.pk, x.pv), do.double())
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, refs, strict=True):
        if r.numel():
            assert_close_rel(g, r, 2e-3, name)
    assert torch.all(grads[1][:, :, :cut] == 0) and torch.all(grads[2][:, :, :cut] == 0)
