"""Which sequence keys a query sees (DESIGN.md "one rule for every mask"), as @triton.jit helpers
shared by the forward, dq and dk/dv kernels.

For query position i (absolute position a = i + Sk - Sq):

    hi(i) = a                        causal          (inclusive)
            end(i) - 1               packed document, not causal
            Sk - 1                   otherwise
            and at most a + W - 1    window W, not causal (two-sided: |a - j| < W)
    lo(i) = max(0, start(i), a - W + 1)   (document start when packed; window W when given)

A block of query rows needs only the keys in [min lo, max hi]; the keys in [max lo, min hi] are
visible to every row of the block and need no mask. ``segments`` turns such a pair of ranges into
three block-aligned pieces [a, b) masked, [b, c) unmasked, [c, d) masked, so a kernel walks
exactly the blocks some row can see and masks only the edges. The dk/dv kernel does the same in
the transposed direction with ``key_block_rows``: the query rows that see some / every key of a
key block. The prefix is outside this rule (every query sees it).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import tanh


@triton.jit
def row_interval(i_row, row_ok, DocStart, DocEnd, causal_off, Sk, window,
                 CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Per query row: (lo, hi), the first and last visible sequence key (hi < lo: none).
    DocStart/DocEnd point at this batch row's int32 (S,) bounds (Sq == Sk when HAS_DOCS)."""
    a = i_row + causal_off
    lo = tl.zeros_like(i_row)
    if CAUSAL:
        hi = a
    else:
        hi = tl.zeros_like(i_row) + (Sk - 1)
    if HAS_DOCS:
        lo = tl.maximum(lo, tl.load(DocStart + i_row, mask=row_ok, other=0))
        if not CAUSAL:
            hi = tl.load(DocEnd + i_row, mask=row_ok, other=Sk) - 1
    if HAS_WINDOW:
        lo = tl.maximum(lo, a - window + 1)
        if not CAUSAL:  # two-sided
            hi = tl.minimum(hi, a + window - 1)
    return lo, hi


@triton.jit
def segments(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Split [lo, hi) into BLOCK-aligned [a, b) masked, [b, c) unmasked, [c, d) masked, where the
    unmasked blocks lie inside [full_lo, full_hi). Empty pieces have equal ends."""
    a = (lo // BLOCK) * BLOCK
    b = ((full_lo + BLOCK - 1) // BLOCK) * BLOCK
    c = (full_hi // BLOCK) * BLOCK
    b = tl.maximum(b, a)
    some_full = c > b
    b = tl.where(some_full, b, a)
    c = tl.where(some_full, c, a)
    d = tl.maximum(hi, a)
    return a, b, c, d


@triton.jit
def row_block_keys(lo_row, hi_row, row_ok, Sk, BLOCK_N: tl.constexpr):
    """The key blocks a block of query rows walks: segments of [min lo, max hi] with the unmasked
    middle inside [max lo, min hi] (rows past the end do not count)."""
    lo = tl.min(tl.where(row_ok, lo_row, Sk), 0)
    hi = tl.max(tl.where(row_ok, hi_row, -1), 0) + 1
    full_lo = tl.max(tl.where(row_ok, lo_row, 0), 0)
    full_hi = tl.min(tl.where(row_ok, hi_row, Sk - 1), 0) + 1
    lo = tl.minimum(lo, hi)
    return segments(lo, full_lo, full_hi, hi, BLOCK_N)


@triton.jit
def key_block_rows(n0, n1, DocStart, DocEnd, causal_off, Sq, window, G,
                   CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """The packed rows the dk/dv kernel walks for keys [n0, n1): segments of the rows that see some
    key of the block, with the unmasked middle where rows see every key. Transposing the rule:
    key j is seen by positions j - off <= i (causal), i <= j + W - 1 - off (window), also
    j - W + 1 - off <= i (a two-sided window, not causal), i inside j's document (packed; starts and
    ends never decrease along the row)."""
    i_lo = tl.zeros([], dtype=tl.int32)
    i_hi = tl.zeros([], dtype=tl.int32) + Sq
    f_lo = tl.zeros([], dtype=tl.int32)
    f_hi = tl.zeros([], dtype=tl.int32) + Sq
    if CAUSAL:
        i_lo = tl.maximum(i_lo, n0 - causal_off)
        f_lo = tl.maximum(f_lo, n1 - 1 - causal_off)
    if HAS_WINDOW:
        i_hi = tl.minimum(i_hi, n1 - 1 + window - causal_off)
        f_hi = tl.minimum(f_hi, n0 + window - causal_off)
        if not CAUSAL:  # two-sided: rows from j - W + 1 - off on
            i_lo = tl.maximum(i_lo, n0 - window + 1 - causal_off)
            f_lo = tl.maximum(f_lo, n1 - window - causal_off)
    if HAS_DOCS:
        s0 = tl.load(DocStart + n0)
        s1 = tl.load(DocStart + n1 - 1)
        e0 = tl.load(DocEnd + n0)
        e1 = tl.load(DocEnd + n1 - 1)
        i_lo = tl.maximum(i_lo, s0)
        i_hi = tl.minimum(i_hi, e1)
        f_lo = tl.maximum(f_lo, s0)
        f_hi = tl.minimum(f_hi, tl.where(s1 <= n0, e0, 0))  # a block spanning documents: no row sees all
    f_lo = tl.maximum(f_lo, i_lo)
    f_hi = tl.minimum(f_hi, i_hi)
    i_lo = tl.minimum(i_lo, i_hi)
    return segments(i_lo * G, f_lo * G, f_hi * G, i_hi * G, BLOCK_M)


@triton.jit
def scores(qk, offs_n, lo_row, hi_row, kp, qk_scale, softcap_scale, softcap_mul,
           SOFTCAP: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Scores in log2 units from raw dot products, softcapped, with invisible keys at -inf.
    Returns (s, t) with t = tanh(.) under a softcap (its derivative is 1 - t^2), else s.
    Tiles are (rows, keys), or (keys, rows) when TRANSPOSED. MASK applies the per-row interval
    [lo_row, hi_row]; HAS_KPM the key padding (kp: one bool per key)."""
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        s = t * softcap_mul
    else:
        s = qk * qk_scale
        t = s
    if TRANSPOSED:
        if MASK:
            s = tl.where((offs_n[:, None] >= lo_row[None, :]) & (offs_n[:, None] <= hi_row[None, :]),
                         s, float("-inf"))
        if HAS_KPM:
            s = tl.where(kp[:, None], s, float("-inf"))
    else:
        if MASK:
            s = tl.where((offs_n[None, :] >= lo_row[:, None]) & (offs_n[None, :] <= hi_row[:, None]),
                         s, float("-inf"))
        if HAS_KPM:
            s = tl.where(kp[None, :], s, float("-inf"))
    return s, t


__all__ = ["row_interval", "segments", "row_block_keys", "key_block_rows", "scores"]
