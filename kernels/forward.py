"""Forward kernel: one online softmax over the sink, the prefix blocks, then the sequence blocks.

For a block of packed rows (see common.py) of KV head hkv in batch row b:

    start    m = sink_h * log2 e, l = 1 (with sinks; else m = -inf, l = 0), acc = 0
    stage 1  prefix:   every block of prefix slots (all visible)          s = scale * q . pk
    stage 2  sequence: only the key blocks some row of the block sees (masks.row_block_keys:
             [min lo, max hi] of the rows' intervals); blocks every row sees in full need no
             mask, the edge blocks get the per-row interval mask (causal, window, document)
    each block:  m' = max(m, rowmax s);  l = l * 2^(m - m') + rowsum 2^(s - m');
                 acc = acc * 2^(m - m') + 2^(s - m') v                  (base-2, s in log2 units)
    epilogue:    out = acc / l;   lse = (m + log2 l) * ln 2               (natural log, fp32)

Score bias (optional, (B, Hq, Sq, P + Sk) through strides, 0 for a broadcast dim): each block adds
its (rows, keys) tile of it, times log2 e, to s after the softcap (as an additive mask would be):
one more tile load per block, columns 0..P-1 in stage 1 and P + j in stage 2. A -inf in it hides a
key, so with a bias any row may see nothing (MAYBE_EMPTY).

Key padding masks keys in stage 2. A row that sees nothing (P = 0, no sink, every key masked)
keeps m = -inf and l = 0: it writes out = 0 and lse = +inf, which the backward reads as "p = 0".
q and k have head dim Dk, v and the output Dv (latent attention: Dk != Dv).

Split-K (decode steps and short chunks over long caches, when the row blocks alone cannot fill
the GPU): split s of S takes the sink and the prefix (s = 0 only) and sequence keys
[base + s*K, base + (s+1)*K) (base: where the first query's window starts, else 0), and writes its normalized partial o_s with lse_s (-inf when it saw nothing).
_combine_splits_kernel merges:

    lse = log sum_s exp(lse_s),    out = sum_s exp(lse_s - lse) o_s

The output is written through strides into (B, Sq, Hq, Dv) memory: the returned (B, Hq, Sq, Dv)
tensor is a transposed view, so the layout Hugging Face wants is a free ``.transpose(1, 2)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    alloc,
    as_i64,
    block_d,
    block_p,
    bucket,
    configs_from,
    dot_precision,
    fixed_config,
    group_ptr,
    head_dim_range,
    interpreting,
    load_tile,
    num_sms,
    packed_rows,
    pinned_key,
    pinned_rows,
    prefix_strides,
    row_ptrs,
    score_bias_arg,
    score_bias_rows,
    score_bias_tile,
    smem_fits,
    smem_prune,
    store_tile,
)
from .config import settings
from .masks import row_block_keys, row_interval, scores


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n, n_limit,
    qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn, r_ok,
    MASK: tl.constexpr, LIMIT: tl.constexpr, HAS_KPM: tl.constexpr,
    MAYBE_EMPTY: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold one block of keys [start_n, start_n + BLOCK_N) into the running (acc, l, m)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_limit
    k = load_tile(k_ptrs, n_ok, dk_ok, MASK_ROWS=LIMIT, EVEN_D=EVEN_DK)
    v = load_tile(v_ptrs, n_ok, dv_ok, MASK_ROWS=LIMIT, EVEN_D=EVEN_DV)
    if INTERPRET:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_KPM:
        kp = tl.load(KPM_ptr + offs_n * stride_mn, mask=n_ok, other=0) != 0
    else:
        kp = n_ok
    if HAS_BIAS and not SOFTCAP:  # the bias / scale starts the dot's accumulator: no registers of its own
        bias = score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, kp, TRANSPOSED=False)
        qk = tl.dot(q, tl.trans(k), acc=bias / qk_scale, input_precision=DOT_PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, _ = scores(qk, offs_n, lo_row, hi_row, kp, qk_scale, softcap_scale, softcap_mul,
                  SOFTCAP=SOFTCAP, MASK=MASK, HAS_KPM=HAS_KPM, TRANSPOSED=False)
    if HAS_BIAS and SOFTCAP:  # after the softcap
        s += score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, kp, TRANSPOSED=False)
    if LIMIT:
        if not MASK:
            s = tl.where(n_ok[None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAYBE_EMPTY:  # a row may have seen nothing yet (m = -inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend(
    acc, l_i, m_i, q, lo_row, hi_row,
    K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd, KPM_ptr, stride_mn,
    lo, hi, n_limit, qk_scale, softcap_scale, softcap_mul,
    offs_dk, dk_ok, offs_dv, dv_ok, bias_rows, stride_bn, r_ok,
    MASK: tl.constexpr, LIMIT: tl.constexpr, HAS_KPM: tl.constexpr,
    MAYBE_EMPTY: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold keys [lo, hi) into the running (acc, l, m) of a block of rows. MASK: the per-row
    interval [lo_row, hi_row]; LIMIT: keys past n_limit (the loads, and the scores when not MASK).
    bias_rows: each row's pointer to column 0 of these keys' score bias (HAS_BIAS)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ptrs = K_ptr + as_i64(lo) * stride_kn + offs_n0[:, None] * stride_kn + offs_dk[None, :] * stride_kd
    v_ptrs = V_ptr + as_i64(lo) * stride_vn + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if INTERPRET:  # a while loop: see common.py, "Loops under the interpreter"
        start_n = lo
        while start_n < hi:
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n, n_limit,
                qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn, r_ok,
                MASK, LIMIT, HAS_KPM, MAYBE_EMPTY, EVEN_DK, EVEN_DV, SOFTCAP, INTERPRET, DOT_PRECISION,
                HAS_BIAS, BLOCK_N)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n, n_limit,
                qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn, r_ok,
                MASK, LIMIT, HAS_KPM, MAYBE_EMPTY, EVEN_DK, EVEN_DV, SOFTCAP, INTERPRET, DOT_PRECISION,
                HAS_BIAS, BLOCK_N)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


FWD_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages), in order of preference
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 3),
    (32, 128, 4, 3), (16, 128, 4, 3), (32, 32, 4, 1),
]
SPLIT_GRANULE = 128  # keys per split are a multiple of every BLOCK_N
DECODE_ROWS = 64  # R <= this: a fixed config (no autotuning every time the cache grows)


# Pinned configs by BLOCK_DK + BLOCK_DV, in order of preference (the first that fits the device is
# launched). Chosen by `python -m bench compile` on sm_90 (bench/TUNING.md, v5): no spills in bf16/fp16.
# 256 (D = 80..128): 128x64 w8 s3 (253 registers). 512 (D = 192, 256): 64x32 w8 s2, no spills (the
# old 64x32 w4 spilled 556 B at 255 registers).
FWD_PINNED = {
    128: FWD_CONFIGS,
    256: FWD_CONFIGS,
    384: [(64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    512: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
}


# Other GPUs' pinned configs where sm_90's table does not serve them, by (dot family of kernels/smem.py,
# variant of common.pinned_key); chosen by `python -m bench compile --device ...` (bench/TUNING.md,
# "Issue 33"). A width not listed takes sm_90's.
# mma (sm_80/89/120, mma.sync): 8 warps share 64 rows at D = 128 (two warps per 16 rows: half the
# accumulator per thread; 128x64 w8 spilled 96 B on sm_80, 64x32 w4 40-52 B on sm_89/sm_120); with a
# score bias 64x32 w8 (64x64 w8 spilled 48-84 B on sm_120).
# tcgen05 (sm_100) with a score bias: 128x32 w8 s3 (128x64 w8 s3 spilled 104-116 B).
# cdna3/cdna4 (AMD, wave64): 4 waves, one per SIMD, so a lane may use 512 registers (8 waves give
# each 256: every w8 config spilled 248-760 B on gfx950); LDS picks the row block.
_FWD_AMD = [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)]
_FWD_AMD_WIDE = [(64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1)]  # D = 192/256: 4 waves there too
_FWD_MMA_BIAS = {256: [(64, 32, 8, 2), (32, 32, 4, 1)], 512: [(32, 32, 8, 2), (32, 32, 4, 1)]}
_FWD_TCGEN05_BIAS = {256: [(128, 32, 8, 3), (64, 32, 8, 2), (32, 32, 4, 1)]}
FWD_PINNED_BY_FAMILY: dict[tuple[str, str], dict[int, list[tuple[int, int, int, int]]]] = {
    ("mma", ""): {256: [(64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 8, 2), (32, 32, 4, 1)]},
    ("mma", "bias"): _FWD_MMA_BIAS, ("mma", "bias_softcap"): _FWD_MMA_BIAS,
    ("tcgen05", "bias"): _FWD_TCGEN05_BIAS, ("tcgen05", "bias_softcap"): _FWD_TCGEN05_BIAS,
    ("cdna3", ""): {128: _FWD_AMD, 256: _FWD_AMD, 384: _FWD_AMD_WIDE, 512: _FWD_AMD_WIDE},
    ("cdna4", ""): {128: _FWD_AMD, 256: _FWD_AMD, 384: _FWD_AMD_WIDE, 512: _FWD_AMD_WIDE},
}


def pinned_table(width: int, key: tuple[str, str] = ("wgmma", "")) -> list[tuple[int, int, int, int]]:
    """The pinned config's candidates for BLOCK_DK + BLOCK_DV = width for ``key`` (common.pinned_key)."""
    return pinned_rows(FWD_PINNED_BY_FAMILY, FWD_PINNED, width, key, FWD_CONFIGS)


@triton.jit
def _fwd_kernel_jit(
    Q, K, V, PK, PV, KPM, PIDX, DOCS, DOCE, SINKS, BIAS, Out, Lse, OPart, LsePart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn, stride_docb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hkv, Sq, Sk, P, G, R, window,
    qk_scale, softcap_scale, softcap_mul,
    R_BUCKET, SK_BUCKET, KEY_BASE, KEYS_PER_SPLIT,
    DK: tl.constexpr, DV: tl.constexpr, SPLIT_K: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_DOCS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    MAYBE_EMPTY: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the last row blocks see the most causal keys: launch them first to shorten the tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq
    if SPLIT_K:
        key_lo = KEY_BASE + split * KEYS_PER_SPLIT
        key_hi = key_lo + KEYS_PER_SPLIT
        prefix_hi = tl.where(split == 0, P, 0)
    else:
        key_lo = 0
        key_hi = Sk
        prefix_hi = P

    # ---- the block of packed rows: (query head hkv*G + g, position i) ----
    offs_r, r_ok, i_row, g_row = packed_rows(pid_m * BLOCK_M, G, R, BLOCK_M)
    offs_dk, dk_ok = head_dim_range(BLOCK_DK, DK)
    offs_dv, dv_ok = head_dim_range(BLOCK_DV, DV)
    q_ptrs = row_ptrs(group_ptr(Q, b, hkv, G, stride_qb, stride_qh), i_row, g_row, offs_dk,
                      stride_qh, stride_qm, stride_qd)
    q = load_tile(q_ptrs, r_ok, dk_ok, MASK_ROWS=True, EVEN_D=EVEN_DK)
    if INTERPRET:
        q = q.to(tl.float32)
    if HAS_BIAS:  # each row's pointer to column 0 (prefix slot 0) of its score bias
        bias_rows = score_bias_rows(BIAS, b, hkv, G, i_row, g_row, stride_bb, stride_bh, stride_bm)
    else:
        bias_rows = BIAS

    if HAS_SINKS:  # the sink joins the softmax first: m = sink (log2 units), l = 2^(m - m) = 1
        sink = tl.load(SINKS + hkv * G + g_row).to(tl.float32) * 1.4426950408889634
        if SPLIT_K:
            first = split == 0
            m_i = tl.where(first, sink, float("-inf"))
            l_i = tl.where(first, 1.0, 0.0) + tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            m_i = sink
            l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # ---- stage 1: the prefix (shared, per row, or this row's bank entry), always visible: ----
    # ---- the full blocks with no mask at all, then the partial last block                ----
    if HAS_INDEX:
        prow = tl.load(PIDX + b).to(tl.int64)
    else:
        prow = as_i64(b)
    PK_ptr = PK + prow * stride_pkb + hkv * stride_pkh
    PV_ptr = PV + prow * stride_pvb + hkv * stride_pvh
    prefix_full = (prefix_hi // BLOCK_P) * BLOCK_P
    for part in tl.static_range(2):
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, i_row, i_row, PK_ptr, PV_ptr, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
            KPM, stride_mn, 0 if part == 0 else prefix_full, prefix_full if part == 0 else prefix_hi, P,
            qk_scale, softcap_scale, softcap_mul, offs_dk, dk_ok, offs_dv, dv_ok, bias_rows, stride_bn, r_ok,
            MASK=False, LIMIT=part == 1, HAS_KPM=False, MAYBE_EMPTY=MAYBE_EMPTY, EVEN_DK=EVEN_DK,
            EVEN_DV=EVEN_DV, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET, DOT_PRECISION=DOT_PRECISION,
            HAS_BIAS=HAS_BIAS, BLOCK_N=BLOCK_P,
        )

    # ---- stage 2: the sequence keys some row of the block sees ----
    K_ptr = K + as_i64(b) * stride_kb + hkv * stride_kh
    V_ptr = V + as_i64(b) * stride_vb + hkv * stride_vh
    KPM_ptr = KPM + as_i64(b) * stride_mb
    DocS = DOCS + as_i64(b) * stride_docb
    DocE = DOCE + as_i64(b) * stride_docb
    lo_row, hi_row = row_interval(i_row, r_ok, DocS, DocE, causal_off, Sk, window,
                                  CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW)
    n_a, n_b, n_c, n_d = row_block_keys(lo_row, hi_row, r_ok, Sk, BLOCK_N)
    if SPLIT_K:  # this split's share of the keys (its bounds are multiples of BLOCK_N)
        n_a = tl.maximum(n_a, key_lo)
        n_b = tl.minimum(tl.maximum(n_b, key_lo), key_hi)
        n_c = tl.minimum(tl.maximum(n_c, key_lo), key_hi)
        n_d = tl.minimum(n_d, key_hi)
    for seg in tl.static_range(3):
        if seg == 0:
            lo = n_a
            hi = n_b
        elif seg == 1:
            lo = n_b
            hi = n_c
        else:
            lo = tl.maximum(n_c, n_a)
            hi = n_d
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, q, lo_row, hi_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            KPM_ptr, stride_mn, lo, hi, Sk, qk_scale, softcap_scale, softcap_mul,
            offs_dk, dk_ok, offs_dv, dv_ok, bias_rows + P * stride_bn, stride_bn, r_ok,
            MASK=seg != 1, LIMIT=seg != 1, HAS_KPM=HAS_KPM, MAYBE_EMPTY=MAYBE_EMPTY,
            EVEN_DK=EVEN_DK, EVEN_DV=EVEN_DV, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
            DOT_PRECISION=DOT_PRECISION, HAS_BIAS=HAS_BIAS, BLOCK_N=BLOCK_N,
        )

    # ---- epilogue ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse_seen = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural log
    # flat (b, h, i) row index, int64: lse is (B, Hq, Sq) contiguous
    flat = (as_i64(b) * Hkv * G + hkv * G + g_row) * Sq + i_row
    if SPLIT_K:
        # partials (SPLITS, B*Hq*Sq, DV) fp32 and (SPLITS, B*Hq*Sq); a split that saw nothing has lse -inf
        n_rows = as_i64(tl.num_programs(1)) * G * Sq
        part = split * n_rows + flat
        tl.store(OPart + part[:, None] * DV + offs_dv[None, :], out, mask=r_ok[:, None] & dv_ok[None, :])
        tl.store(LsePart + part, tl.where(empty, float("-inf"), lse_seen), mask=r_ok)
    else:
        lse = tl.where(empty, float("inf"), lse_seen)
        o_ptrs = row_ptrs(group_ptr(Out, b, hkv, G, stride_ob, stride_oh), i_row, g_row, offs_dv,
                          stride_oh, stride_om, stride_od)
        store_tile(o_ptrs, out.to(Out.dtype.element_ty), r_ok, dv_ok, EVEN_D=EVEN_DV)
        tl.store(Lse + flat, lse, mask=r_ok)


_fwd_kernel = triton.autotune(
    configs=configs_from(FWD_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "DK", "DV", "CAUSAL", "HAS_KPM", "HAS_DOCS", "HAS_WINDOW", "HAS_SINKS",
         "SOFTCAP", "HAS_BIAS", "DOT_PRECISION", "SPLIT_K"],
    prune_configs_by={"early_config_prune": smem_prune("fwd")},
)(_fwd_kernel_jit)


@triton.jit
def _split_weight(LsePart, OPart, s, N_ROWS, offs_r, r_ok, offs_d, mask, m_safe, DV: tl.constexpr):
    w = tl.exp(tl.load(LsePart + s * N_ROWS + offs_r, mask=r_ok, other=float("-inf")) - m_safe)
    o = tl.load(OPart + (s * N_ROWS + offs_r)[:, None] * DV + offs_d[None, :], mask=mask, other=0.0)
    return w, o


@triton.jit
def _combine_splits_kernel(
    OPart, LsePart, Out, Lse, N_ROWS, SPLITS, Hq, Sq,
    stride_ob, stride_oh, stride_om, stride_od,
    DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, INTERPRET: tl.constexpr,
):
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, h, i) rows
    r_ok = offs_r < N_ROWS
    offs_d = tl.arange(0, BLOCK_DV)
    mask = r_ok[:, None] & (offs_d < DV)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    if INTERPRET:  # while loops: see common.py, "Loops under the interpreter"
        s = 0
        while s < SPLITS:
            m = tl.maximum(m, tl.load(LsePart + s * N_ROWS + offs_r, mask=r_ok, other=float("-inf")))
            s += 1
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = 0
        while s < SPLITS:
            w, o = _split_weight(LsePart, OPart, s, N_ROWS, offs_r, r_ok, offs_d, mask, m_safe, DV)
            w_sum += w
            acc += w[:, None] * o
            s += 1
    else:
        for s in range(SPLITS):
            m = tl.maximum(m, tl.load(LsePart + s * N_ROWS + offs_r, mask=r_ok, other=float("-inf")))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for s in range(SPLITS):
            w, o = _split_weight(LsePart, OPart, s, N_ROWS, offs_r, r_ok, offs_d, mask, m_safe, DV)
            w_sum += w
            acc += w[:, None] * o
    empty = w_sum == 0.0
    w_safe = tl.where(empty, 1.0, w_sum)
    b = offs_r // (Hq * Sq)
    h = (offs_r // Sq) % Hq
    i = offs_r % Sq
    row_o = b * stride_ob + h * stride_oh + i * stride_om
    tl.store(Out + row_o[:, None] + offs_d[None, :] * stride_od, (acc / w_safe[:, None]).to(Out.dtype.element_ty),
             mask=mask)
    tl.store(Lse + offs_r, tl.where(empty, float("inf"), m_safe + tl.log(w_safe)), mask=r_ok)


def num_splits(B: int, Hkv: int, R: int, Sk: int, device: torch.device) -> int:
    """How many key splits the forward uses: more than one only when the row blocks alone leave
    most of the GPU idle (decode steps, short chunks) and the cache is long enough to share.
    KernelSettings.splits (PREFIXATTN_SPLITS) forces a number (tests)."""
    forced = settings().splits
    if forced:
        return max(1, min(forced, triton.cdiv(max(Sk, 1), SPLIT_GRANULE)))
    if R > 64 or Sk < 8 * SPLIT_GRANULE:
        return 1
    programs = B * Hkv * triton.cdiv(R, 64)
    sms = num_sms(device)
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, programs), Sk // (4 * SPLIT_GRANULE), 64))


def softcap_args(scale: float, softcap: float) -> tuple[float, float]:
    """(x multiplier, tanh multiplier) so that s_log2 = tanh(qk * a) * c for softcap, else unused."""
    if softcap > 0:
        return scale / softcap, softcap * LOG2E
    return 1.0, 1.0


def decode_config(R: int, width: int, fits) -> dict:
    """The fixed config of short row counts (decode steps): rows padded to a power of two >= 16.
    Decode is memory-bound and launches only ~2 programs per SM (split-K), so the tables keep a
    program near 70 KiB of shared memory (3 per SM) rather than the largest tile that fits:
    key blocks of 128 at D <= 64, 64 (3 stages) at D <= 128, 64 (2 stages) above."""
    bm = max(16, min(DECODE_ROWS, triton.next_power_of_2(R)))
    table = [(bm, 128, 4, 3), (bm, 64, 4, 3), (bm, 64, 4, 2), (bm, 32, 4, 1)]
    skip = 0 if width <= 128 else 1 if width <= 256 else 2
    return fixed_config(table[skip:], fits)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    deterministic: bool = True,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by prefixattn.ops. Returns (out, lse):
    out (B, Hq, Sq, Dv) a view of (B, Sq, Hq, Dv) memory, lse (B, Hq, Sq) fp32 (sink included).
    deterministic=True pins the config (out and lse feed the gradients, which must not depend on
    an autotuning race); decode steps always use a fixed config."""
    B, Hq, Sq, Dk = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    R = G * Sq
    P = prefix_k.shape[-2]
    out = alloc((B, Sq, Hq, Dv), like=q).transpose(1, 2)
    lse = alloc((B, Hq, Sq), like=q, dtype=torch.float32)
    if B == 0:
        return out, lse
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    kpm_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    has_docs = doc_start is not None
    docs = doc_start.contiguous() if has_docs else q
    doce = doc_end.contiguous() if has_docs else q
    pidx = prefix_index if prefix_index is not None else q
    bias, bias_strides = score_bias_arg(score_bias, B, Hq, Sq, q)
    a, c = softcap_args(scale, softcap)
    BLOCK_DK, BLOCK_DV = block_d(Dk), block_d(Dv)
    # under a window no query sees keys before the first query's window: splits share only the rest
    key_base = max(0, Sk - Sq - window + 1) // SPLIT_GRANULE * SPLIT_GRANULE if window > 0 else 0
    span = max(Sk - key_base, 1)
    splits = num_splits(B, Hkv, R, span, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(span, splits), SPLIT_GRANULE) * SPLIT_GRANULE
    splits = triton.cdiv(span, keys_per_split) if splits > 1 else 1
    if splits > 1:
        o_part = alloc((splits, B * Hq * Sq, Dv), like=q, dtype=torch.float32)
        lse_part = alloc((splits, B * Hq * Sq), like=q, dtype=torch.float32)
    else:
        o_part = lse_part = out

    args = (
        q, k, v, prefix_k, prefix_v, kpm, pidx, docs, doce, sinks.contiguous() if sinks is not None else q,
        bias, out, lse, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *kpm_strides, Sk if has_docs else 0, *bias_strides, *out.stride(),
        Hkv, Sq, Sk, P, G, R, int(window),
        scale * LOG2E, a, c,
        bucket(R), bucket(Sk), key_base, keys_per_split,
    )
    meta = dict(
        DK=Dk, DV=Dv, SPLIT_K=splits > 1,
        # a row may have seen nothing yet: no prefix or sink, and padding, a window or a document
        # start hides a row's first keys, or a split of keys past its diagonal, or a -inf in the bias
        MAYBE_EMPTY=splits > 1 or score_bias is not None or (P == 0 and sinks is None and (
            key_padding_mask is not None or Sk == 0 or has_docs or window > 0)),
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_INDEX=prefix_index is not None,
        HAS_DOCS=has_docs, HAS_WINDOW=window > 0, HAS_SINKS=sinks is not None,
        SOFTCAP=softcap > 0, HAS_BIAS=score_bias is not None, INTERPRET=interpreting(), DOT_PRECISION=dot_precision(q.dtype, q.device),
        EVEN_DK=Dk == BLOCK_DK, EVEN_DV=Dv == BLOCK_DV, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV,
        BLOCK_P=block_p(P, BLOCK_DK, BLOCK_DV),
    )
    fits = smem_fits("fwd", meta, q.element_size(), q.device, bias.element_size() if score_bias is not None else 0)
    if R <= DECODE_ROWS:
        cfg = decode_config(R, BLOCK_DK + BLOCK_DV, fits)
    elif deterministic:
        key = pinned_key(q.device, score_bias is not None, softcap > 0)
        cfg = fixed_config(pinned_table(BLOCK_DK + BLOCK_DV, key), fits)
    else:
        cfg = None
    if cfg is not None:
        grid = (triton.cdiv(R, cfg["BLOCK_M"]), B * Hkv, splits)
        _fwd_kernel_jit[grid](*args, **meta, **cfg)
    else:
        _fwd_kernel[lambda m: (triton.cdiv(R, m["BLOCK_M"]), B * Hkv, splits)](*args, **meta)
    if splits > 1:
        n_rows = B * Hq * Sq
        _combine_splits_kernel[(triton.cdiv(n_rows, 16),)](
            o_part, lse_part, out, lse, n_rows, splits, Hq, Sq, *out.stride(),
            DV=Dv, BLOCK_R=16, BLOCK_DV=BLOCK_DV, INTERPRET=interpreting(),
        )
    return out, lse
