"""Backward kernels.

With L the saved row logsumexp (the sink included), Delta_i = rowsum(dO_i * O_i),
P_ij = exp(s_ij - L_i) and dS_ij = P_ij (dO_i . v_j - Delta_i)   (times 1 - tanh^2 under a softcap):

    dq_i = scale * sum_j dS_ij k_j                 over prefix and sequence keys     (_dq_kernel)
    dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dO_i   over the packed rows    (_dkdv_kernel)
           of the GQA group, so the group sum comes free
    dprefix: the same sums for the prefix slots, over every batch row, group head and query.
    dsink_h = -sum_{b,i} exp(sink_h - L_{b,h,i}) Delta_{b,h,i}      (a torch reduction; the sink
             is a key with a fixed logit and no value, so its dS is P_sink (0 - Delta))

A score bias (a constant) enters s exactly as in the forward (after the softcap), so P_ij and dS_ij
carry it; no gradient flows into it. The dk/dv kernel reads its tile transposed (keys, rows).

The dq kernel walks the same key blocks as the forward (masks.row_block_keys); the dk/dv kernel
walks, for its key block, only the query rows that see some key of it (masks.key_block_rows),
masking only the edge row blocks.

The prefix gradient is a reduction of B*G*Sq rows into a tiny (Hkv, P, D) output, so it is split
over many programs: the prefix programs of _dkdv_kernel each take one prefix block, one batch row
and one slice of the rows, and write an fp32 partial; _reduce_prefix_kernel then sums the
partials in a fixed order (deterministic), into each bank entry from exactly the batch rows that
selected it. With deterministic=False the prefix programs add into an fp32 buffer with atomics
instead. Only the kernels for the gradients autograd asks for are launched: in layer 0 of a frozen
model only the prefix programs run. deterministic=True also pins the configs (no autotuning: a
fixed table by head dim, dtype and device; the forward pins its config too), so two processes give
bitwise-equal gradients.
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
    ceil_div,
    configs_from,
    device_family,
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
)
from .forward import softcap_args
from .masks import key_block_rows, row_block_keys, row_interval, scores

# ---------------------------------------------------------------------------------------------
# Delta = rowsum(dO * O)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _delta_kernel(
    O, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    Hq, Sq, HEAD_DIM,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows_o = as_i64(b) * stride_ob + as_i64(h) * stride_oh + offs_m.to(tl.int64) * stride_om
    rows_d = as_i64(b) * stride_db + as_i64(h) * stride_dh + offs_m.to(tl.int64) * stride_dm
    o = tl.load(O + rows_o[:, None] + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + rows_d[:, None] + offs_d[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + as_i64(pid_bh) * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


# ---------------------------------------------------------------------------------------------
# dq: one program per block of packed rows, walking the prefix then the visible sequence keys
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_block(
    dq, q, do, lse2, delta, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n, n_limit,
    qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn, r_ok,
    MASK: tl.constexpr, LIMIT: tl.constexpr, HAS_KPM: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dq += dS k over one block of keys [start_n, start_n + BLOCK_N)."""
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
    if HAS_BIAS and not SOFTCAP:  # the bias / scale starts the dot's accumulator (as in the forward)
        bias = score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, kp, TRANSPOSED=False)
        qk = tl.dot(q, tl.trans(k), acc=bias / qk_scale, input_precision=DOT_PRECISION)
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s, t = scores(qk, offs_n, lo_row, hi_row, kp, qk_scale, softcap_scale, softcap_mul,
                  SOFTCAP=SOFTCAP, MASK=MASK, HAS_KPM=HAS_KPM, TRANSPOSED=False)
    if HAS_BIAS and SOFTCAP:  # after the softcap
        s += score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, kp, TRANSPOSED=False)
    if LIMIT:
        if not MASK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_walk(
    dq, q, do, lse2, delta, lo_row, hi_row,
    K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd, KPM_ptr, stride_mn,
    lo, hi, n_limit, qk_scale, softcap_scale, softcap_mul, offs_dk, dk_ok, offs_dv, dv_ok,
    bias_rows, stride_bn, r_ok,
    MASK: tl.constexpr, LIMIT: tl.constexpr, HAS_KPM: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    k_ptrs = K_ptr + as_i64(lo) * stride_kn + offs_n0[:, None] * stride_kn + offs_dk[None, :] * stride_kd
    v_ptrs = V_ptr + as_i64(lo) * stride_vn + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    if INTERPRET:  # a while loop: see common.py, "Loops under the interpreter"
        start_n = lo
        while start_n < hi:
            dq = _dq_block(dq, q, do, lse2, delta, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n,
                           n_limit, qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn,
                           r_ok, MASK, LIMIT, HAS_KPM, SOFTCAP, INTERPRET, DOT_PRECISION, EVEN_DK, EVEN_DV,
                           HAS_BIAS, BLOCK_N)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            start_n += BLOCK_N
    else:
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_block(dq, q, do, lse2, delta, lo_row, hi_row, k_ptrs, v_ptrs, KPM_ptr, stride_mn, start_n,
                           n_limit, qk_scale, softcap_scale, softcap_mul, dk_ok, dv_ok, bias_rows, stride_bn,
                           r_ok, MASK, LIMIT, HAS_KPM, SOFTCAP, INTERPRET, DOT_PRECISION, EVEN_DK, EVEN_DV,
                           HAS_BIAS, BLOCK_N)
            k_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return dq


DQ_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages), in order of preference
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2),
    (32, 32, 4, 1),
]
DKDV_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages): BLOCK_N keys resident, BLOCK_M rows streamed
    (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2),
    (32, 32, 4, 1),
]


# Pinned configs by BLOCK_DK + BLOCK_DV, in order of preference (the first that fits the device is
# launched), chosen by `python -m bench compile` on sm_90 (bench/TUNING.md, v5):
# dq    128 (D=64): 128x64 w8 s2 (183 registers); 256 (D=80..128): 128x32 w8 s3 (220-240 registers,
#       no spills; 128x64 w8 s2 spilled 56-80 B); 384/512: 64x32 w8 s2 (64x32 w4 spilled 752 B).
# dk/dv 128: 64x128 w8 s2 (238 registers); 256: 32x128 w8 s2 (242-251 registers, no spills;
#       64x128 w8 s2 spilled 8-416 B); 384/512: 32x64 w8 s2 (100-236 B of spills, wgmma not
#       serialized; 32x64 w4 spilled 6440 B with wgmma serialized; 32x32 w4 spills 0-48 B but on mma.sync).
DQ_PINNED = {
    128: DQ_CONFIGS,
    256: [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
    384: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    512: [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
}
DKDV_PINNED = {
    128: DKDV_CONFIGS,
    256: [(32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
    384: [(32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
    512: [(32, 64, 8, 2), (32, 32, 4, 2), (32, 32, 4, 1)],
}


# Other GPUs' pinned configs where sm_90's table does not serve them, by (dot family, variant) as in
# forward.py; chosen by `python -m bench compile --device ...` (bench/TUNING.md, "Issue 33"). A width not
# listed takes sm_90's.
# mma (sm_80/89/120): 8 warps on 64 rows (dq) or 64 resident keys (dk/dv) at D = 128, where 128x32 w8
# (dq) and 32x128 w8 (dk/dv) spilled 32-128 B; and half the other tile (dq 64x32, dk/dv 32x64): 64x64 w8
# s2 was clean on the main path but spilled 12-32 B at 255 registers with padding, no prefix, bias +
# softcap or every feature on sm_89 (32x64 / 64x32: 166-238 registers, none spill). At D = 64 dk/dv
# 32x128 w8 (178 registers on sm_120, where 64x128 w8 spilled 40-48 B and 64x64 w8/w4 36-44 B).
# cdna3/cdna4 (AMD, wave64): 4 waves (see forward.py: w8 spilled 356-760 B on gfx950).
_DQ_AMD = [(128, 64, 4, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 1)]
# dk/dv: 128 resident keys at D = 64 (433-454 VGPRs); 32x64 at D = 128 (413 VGPRs on gfx942), where
# 64x128 w4 spilled 712 B on gfx950 and 64x64 w4 648 B on gfx942
_DKDV_AMD_64 = [(64, 128, 4, 2), (32, 128, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)]
_DKDV_AMD = [(32, 64, 4, 2), (32, 32, 4, 1)]
# D = 192/256 (widths 384/512): 4 waves there too (sm_90's w8 configs spilled 392-1164 B on gfx950)
_DQ_AMD_WIDE = [(32, 16, 4, 2), (32, 32, 4, 1)]
_DKDV_AMD_WIDE = [(16, 32, 4, 2), (32, 32, 4, 1)]
# With a score bias and a softcap, sm_90's dq spilled 84-456 B at 255 registers on every wgmma config
# (128x32, 128x16, 64x64, 64x32 at 4 or 8 warps); 32x32 w4 (mma.sync) does not. No known model has both.
# tcgen05 with a score bias: dq 64x32 w8 s2 (128x32 w8 s3 counted 214 KiB of shared memory).
_DQ_TCGEN05_BIAS = {256: [(64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)]}
DQ_PINNED_BY_FAMILY: dict[tuple[str, str], dict[int, list[tuple[int, int, int, int]]]] = {
    # D = 192/256: 32x32 on 8 warps (w4 spilled 12-220 B on sm_89/sm_120)
    ("mma", ""): {256: [(64, 32, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1)],
                  384: [(32, 32, 8, 2), (32, 32, 4, 1)], 512: [(32, 32, 8, 2), (32, 32, 4, 1)]},
    ("wgmma", "bias_softcap"): {256: [(32, 32, 4, 2), (32, 32, 4, 1)]},
    ("tcgen05", "bias"): _DQ_TCGEN05_BIAS, ("tcgen05", "bias_softcap"): _DQ_TCGEN05_BIAS,
    ("cdna3", ""): {128: _DQ_AMD, 256: _DQ_AMD, 384: _DQ_AMD_WIDE, 512: _DQ_AMD_WIDE},
    ("cdna3", "bias"): {256: [(64, 32, 4, 2), (32, 32, 4, 1)], 512: [(16, 32, 4, 2), (32, 32, 4, 1)]},
    ("cdna3", "bias_softcap"): {256: [(64, 32, 4, 2), (32, 32, 4, 1)]},
    ("cdna4", ""): {128: _DQ_AMD, 256: _DQ_AMD, 384: _DQ_AMD_WIDE, 512: _DQ_AMD_WIDE},
}
DKDV_PINNED_BY_FAMILY: dict[tuple[str, str], dict[int, list[tuple[int, int, int, int]]]] = {
    ("mma", ""): {128: [(32, 128, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
                  256: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 4, 1)],
                  384: [(32, 32, 8, 2), (32, 32, 4, 1)], 512: [(32, 32, 8, 2), (32, 32, 4, 1)]},
    ("cdna3", ""): {128: _DKDV_AMD_64, 256: _DKDV_AMD, 384: _DKDV_AMD_WIDE, 512: _DKDV_AMD_WIDE},
    ("cdna3", "bias"): {256: [(32, 32, 4, 2), (32, 32, 4, 1)]},
    ("cdna4", ""): {128: _DKDV_AMD_64, 256: _DKDV_AMD, 384: _DKDV_AMD_WIDE, 512: _DKDV_AMD_WIDE},
}


def pinned_tables(width: int, key: tuple[str, str] = ("wgmma", "")) -> tuple[list, list]:
    """The pinned dq and dk/dv configs' candidates for BLOCK_DK + BLOCK_DV = width for ``key``
    (common.pinned_key)."""
    return (pinned_rows(DQ_PINNED_BY_FAMILY, DQ_PINNED, width, key, DQ_CONFIGS),
            pinned_rows(DKDV_PINNED_BY_FAMILY, DKDV_PINNED, width, key, DKDV_CONFIGS))


@triton.jit
def _dq_kernel_jit(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, PIDX, DOCS, DOCE, BIAS, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn, stride_docb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hkv, Sq, Sk, P, G, R, window,
    scale, qk_scale, softcap_scale, softcap_mul,
    R_BUCKET, SK_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_DOCS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the last row blocks see the most causal keys: launch them first to shorten the tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq

    offs_r, r_ok, i_row, g_row = packed_rows(pid_m * BLOCK_M, G, R, BLOCK_M)
    offs_dk, dk_ok = head_dim_range(BLOCK_DK, DK)
    offs_dv, dv_ok = head_dim_range(BLOCK_DV, DV)
    flat = (as_i64(b) * Hkv * G + hkv * G + g_row) * Sq + i_row
    q = load_tile(row_ptrs(group_ptr(Q, b, hkv, G, stride_qb, stride_qh), i_row, g_row, offs_dk,
                           stride_qh, stride_qm, stride_qd), r_ok, dk_ok, MASK_ROWS=True, EVEN_D=EVEN_DK)
    do = load_tile(row_ptrs(group_ptr(DO, b, hkv, G, stride_dob, stride_doh), i_row, g_row, offs_dv,
                            stride_doh, stride_dom, stride_dod), r_ok, dv_ok, MASK_ROWS=True, EVEN_D=EVEN_DV)
    if INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + flat, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + flat, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    if HAS_BIAS:
        bias_rows = score_bias_rows(BIAS, b, hkv, G, i_row, g_row, stride_bb, stride_bh, stride_bm)
    else:
        bias_rows = BIAS

    # prefix: the full blocks unmasked, then the partial last block
    if HAS_INDEX:
        prow = tl.load(PIDX + b).to(tl.int64)
    else:
        prow = as_i64(b)
    prefix_full = (P // BLOCK_P) * BLOCK_P
    for part in tl.static_range(2):
        dq = _dq_walk(
            dq, q, do, lse2, delta, i_row, i_row,
            PK + prow * stride_pkb + hkv * stride_pkh, PV + prow * stride_pvb + hkv * stride_pvh,
            stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, stride_mn,
            0 if part == 0 else prefix_full, prefix_full if part == 0 else P, P,
            qk_scale, softcap_scale, softcap_mul, offs_dk, dk_ok, offs_dv, dv_ok, bias_rows, stride_bn, r_ok,
            MASK=False, LIMIT=part == 1, HAS_KPM=False, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
            DOT_PRECISION=DOT_PRECISION, EVEN_DK=EVEN_DK, EVEN_DV=EVEN_DV, HAS_BIAS=HAS_BIAS, BLOCK_N=BLOCK_P,
        )
    # sequence: the same key blocks as the forward
    K_ptr = K + as_i64(b) * stride_kb + hkv * stride_kh
    V_ptr = V + as_i64(b) * stride_vb + hkv * stride_vh
    KPM_ptr = KPM + as_i64(b) * stride_mb
    DocS = DOCS + as_i64(b) * stride_docb
    DocE = DOCE + as_i64(b) * stride_docb
    lo_row, hi_row = row_interval(i_row, r_ok, DocS, DocE, causal_off, Sk, window,
                                  CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW)
    n_a, n_b, n_c, n_d = row_block_keys(lo_row, hi_row, r_ok, Sk, BLOCK_N)
    for seg in tl.static_range(3):
        if seg == 0:
            lo = n_a
            hi = n_b
        elif seg == 1:
            lo = n_b
            hi = n_c
        else:
            lo = n_c
            hi = n_d
        dq = _dq_walk(
            dq, q, do, lse2, delta, lo_row, hi_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
            KPM_ptr, stride_mn, lo, hi, Sk, qk_scale, softcap_scale, softcap_mul,
            offs_dk, dk_ok, offs_dv, dv_ok, bias_rows + P * stride_bn, stride_bn, r_ok,
            MASK=seg != 1, LIMIT=seg != 1, HAS_KPM=HAS_KPM, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
            DOT_PRECISION=DOT_PRECISION, EVEN_DK=EVEN_DK, EVEN_DV=EVEN_DV, HAS_BIAS=HAS_BIAS, BLOCK_N=BLOCK_N,
        )
    dq = dq * scale
    dq_ptrs = row_ptrs(group_ptr(DQ, b, hkv, G, stride_dqb, stride_dqh), i_row, g_row, offs_dk,
                       stride_dqh, stride_dqm, stride_dqd)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=r_ok[:, None] & dk_ok[None, :])


_dq_kernel = triton.autotune(
    configs=configs_from(DQ_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "DK", "DV", "CAUSAL", "HAS_KPM", "HAS_DOCS", "HAS_WINDOW", "SOFTCAP",
         "HAS_BIAS", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": smem_prune("dq")},
)(_dq_kernel_jit)


# ---------------------------------------------------------------------------------------------
# dk, dv (sequence) and the prefix partials: one program per key block, walking the packed rows
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_block(
    dk, dv, k, v, kp, offs_n, start_r,
    Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE, BIAS_ptr,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_bh, stride_bm, stride_bn,
    Sq, Sk, G, R, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
    offs_dk, dk_ok, offs_dv, dv_ok,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, DK: tl.constexpr,
):
    """dk, dv of one key block from packed rows [start_r, start_r + BLOCK_M) (transposed scores)."""
    offs_r, r_ok, i_row, g_row = packed_rows(start_r, G, R, BLOCK_M)
    q = load_tile(row_ptrs(Q_ptr, i_row, g_row, offs_dk, stride_qh, stride_qm, stride_qd), r_ok, dk_ok,
                  MASK_ROWS=True, EVEN_D=EVEN_DK)
    do = load_tile(row_ptrs(DO_ptr, i_row, g_row, offs_dv, stride_doh, stride_dom, stride_dod), r_ok, dv_ok,
                   MASK_ROWS=True, EVEN_D=EVEN_DV)
    if INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # rows past R read lse = +inf, so their p is exactly 0
    lse2 = tl.load(LSE_ptr + g_row * Sq + i_row, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA_ptr + g_row * Sq + i_row, mask=r_ok, other=0.0)
    if MASK:
        lo_row, hi_row = row_interval(i_row, r_ok, DocS, DocE, causal_off, Sk, window,
                                      CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW)
    else:
        lo_row = i_row
        hi_row = i_row
    if HAS_BIAS:  # BIAS_ptr: this program's batch row and group, at its first column (prefix or key 0)
        bias_rows = BIAS_ptr + g_row.to(tl.int64) * stride_bh + i_row.to(tl.int64) * stride_bm
        biasT = score_bias_tile(bias_rows, offs_n, stride_bn, r_ok, kp, TRANSPOSED=True)
        if SOFTCAP:
            qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        else:  # the bias / scale starts the dot's accumulator
            qkT = tl.dot(k, tl.trans(q), acc=biasT / qk_scale, input_precision=DOT_PRECISION)
    else:
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
    sT, tT = scores(qkT, offs_n, lo_row, hi_row, kp, qk_scale, softcap_scale, softcap_mul,
                    SOFTCAP=SOFTCAP, MASK=MASK, HAS_KPM=HAS_KPM, TRANSPOSED=True)
    if HAS_BIAS and SOFTCAP:  # after the softcap
        sT += biasT
    pT = tl.math.exp2(sT - lse2[None, :])
    dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
    dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP:
        dsT = dsT * (1.0 - tT * tT)
    dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
        flat = g_row.to(tl.int64) * Sq + i_row
        tl.atomic_add(DQ_ptr + (flat * DK)[:, None] + offs_dk[None, :], dq,
                      mask=r_ok[:, None] & dk_ok[None, :])
    return dk, dv


@triton.jit
def _dkdv_walk(
    dk, dv, k, v, kp, offs_n,
    Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE, BIAS_ptr,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_bh, stride_bm, stride_bn,
    Sq, Sk, G, R, lo, hi, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
    offs_dk, dk_ok, offs_dv, dv_ok,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, DK: tl.constexpr,
):
    """Accumulate dk, dv of one key block over packed rows [lo, hi) (transposed scores: keys x rows).
    MASK: the rows' key intervals. With ATOMIC_DQ the same dS tile also gives this key block's share
    of dq (dS k), added with fp32 atomics: 5 matmuls per tile pair instead of 7 with the separate dq
    kernel, in varying order."""
    if INTERPRET:  # a while loop: see common.py, "Loops under the interpreter"
        start_r = lo
        while start_r < hi:
            dk, dv = _dkdv_block(
                dk, dv, k, v, kp, offs_n, start_r, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE,
                BIAS_ptr, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                stride_bh, stride_bm, stride_bn,
                Sq, Sk, G, R, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
                offs_dk, dk_ok, offs_dv, dv_ok, MASK, CAUSAL, HAS_DOCS, HAS_WINDOW, HAS_KPM, SOFTCAP,
                HAS_BIAS, ATOMIC_DQ, INTERPRET, DOT_PRECISION, EVEN_DK, EVEN_DV, BLOCK_M, DK)
            start_r += BLOCK_M
    else:
        for start_r in range(lo, hi, BLOCK_M):
            dk, dv = _dkdv_block(
                dk, dv, k, v, kp, offs_n, start_r, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE,
                BIAS_ptr, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                stride_bh, stride_bm, stride_bn,
                Sq, Sk, G, R, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
                offs_dk, dk_ok, offs_dv, dv_ok, MASK, CAUSAL, HAS_DOCS, HAS_WINDOW, HAS_KPM, SOFTCAP,
                HAS_BIAS, ATOMIC_DQ, INTERPRET, DOT_PRECISION, EVEN_DK, EVEN_DV, BLOCK_M, DK)
    return dk, dv


@triton.jit
def _dkdv_kernel_jit(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, PIDX, DOCS, DOCE, BIAS, DK_OUT, DV_OUT,
    DP_PART_K, DP_PART_V, DP_ACC_K, DP_ACC_V, DQ_ACC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn, stride_docb,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hkv, Sq, Sk, P, G, R, window,
    scale, qk_scale, softcap_scale, softcap_mul,
    NUM_PREFIX_PROGRAMS, SPLITS, ROWS_PER_SPLIT,
    R_BUCKET, SK_BUCKET,
    DK: tl.constexpr, DV: tl.constexpr, EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_DOCS: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    SHARED_PREFIX: tl.constexpr, DO_SEQUENCE: tl.constexpr, DO_PREFIX_GRAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    prog = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq
    offs_dk, dk_ok = head_dim_range(BLOCK_DK, DK)
    offs_dv, dv_ok = head_dim_range(BLOCK_DV, DV)
    bh_rows = (as_i64(b) * Hkv + hkv) * G * Sq  # first flat (b, h, i) row of this KV head's group
    Q_ptr = group_ptr(Q, b, hkv, G, stride_qb, stride_qh)
    DO_ptr = group_ptr(DO, b, hkv, G, stride_dob, stride_doh)
    LSE_ptr = LSE + bh_rows
    DELTA_ptr = DELTA + bh_rows
    DQ_ptr = DQ_ACC + bh_rows * DK  # fp32, contiguous (B, Hq, Sq, DK)
    DocS = DOCS + as_i64(b) * stride_docb
    DocE = DOCE + as_i64(b) * stride_docb
    BIAS_ptr = BIAS + as_i64(b) * stride_bb + as_i64(hkv) * G * stride_bh  # the group's first head, column 0

    if prog < NUM_PREFIX_PROGRAMS:
        # ---- a prefix block, over one slice of this batch row's packed rows ----
        pblock = prog // SPLITS
        split = prog % SPLITS
        offs_p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        if HAS_INDEX:
            prow = tl.load(PIDX + b).to(tl.int64)
        else:
            prow = as_i64(b)
        pk = load_tile(PK + prow * stride_pkb + hkv * stride_pkh + offs_p[:, None] * stride_pkn
                       + offs_dk[None, :] * stride_pkd, p_ok, dk_ok, MASK_ROWS=True, EVEN_D=EVEN_DK)
        pv = load_tile(PV + prow * stride_pvb + hkv * stride_pvh + offs_p[:, None] * stride_pvn
                       + offs_dv[None, :] * stride_pvd, p_ok, dv_ok, MASK_ROWS=True, EVEN_D=EVEN_DV)
        if INTERPRET:
            pk = pk.to(tl.float32)
            pv = pv.to(tl.float32)
        dpk = tl.zeros([BLOCK_P, BLOCK_DK], dtype=tl.float32)
        dpv = tl.zeros([BLOCK_P, BLOCK_DV], dtype=tl.float32)
        lo = split * ROWS_PER_SPLIT
        hi = tl.minimum(lo + ROWS_PER_SPLIT, R)
        dpk, dpv = _dkdv_walk(
            dpk, dpv, pk, pv, p_ok, offs_p, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE, BIAS_ptr,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod, stride_bh, stride_bm, stride_bn,
            Sq, Sk, G, R, lo, hi, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
            offs_dk, dk_ok, offs_dv, dv_ok,
            MASK=False, CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW, HAS_KPM=False,
            SOFTCAP=SOFTCAP, HAS_BIAS=HAS_BIAS, ATOMIC_DQ=ATOMIC_DQ, INTERPRET=INTERPRET, DOT_PRECISION=DOT_PRECISION,
            EVEN_DK=EVEN_DK, EVEN_DV=EVEN_DV, BLOCK_M=BLOCK_M, DK=DK,
        )
        if DO_PREFIX_GRAD:  # (otherwise these programs ran for their share of dq alone)
            dpk = dpk * scale
            slot_k = hkv * P * DK + offs_p[:, None] * DK + offs_dk[None, :]
            slot_v = hkv * P * DV + offs_p[:, None] * DV + offs_dv[None, :]
            mask_k = p_ok[:, None] & dk_ok[None, :]
            mask_v = p_ok[:, None] & dv_ok[None, :]
            if ATOMIC:
                # fp32 atomics straight into the bank entry (opt-in: order, hence rounding, varies)
                if SHARED_PREFIX:
                    entry = as_i64(0)
                else:
                    entry = prow
                tl.atomic_add(DP_ACC_K + entry * Hkv * P * DK + slot_k, dpk, mask=mask_k)
                tl.atomic_add(DP_ACC_V + entry * Hkv * P * DV + slot_v, dpv, mask=mask_v)
            else:
                part = as_i64(b) * SPLITS + split
                tl.store(DP_PART_K + part * Hkv * P * DK + slot_k, dpk, mask=mask_k)
                tl.store(DP_PART_V + part * Hkv * P * DV + slot_v, dpv, mask=mask_v)
    else:
        if DO_SEQUENCE:
            # ---- a block of sequence keys, over the packed rows that can see it ----
            n0 = (prog - NUM_PREFIX_PROGRAMS) * BLOCK_N
            n1 = tl.minimum(n0 + BLOCK_N, Sk)
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Sk
            key_k = as_i64(b) * stride_kb + hkv * stride_kh + offs_n.to(tl.int64) * stride_kn
            key_v = as_i64(b) * stride_vb + hkv * stride_vh + offs_n.to(tl.int64) * stride_vn
            k = load_tile(K + key_k[:, None] + offs_dk[None, :] * stride_kd, n_ok, dk_ok, MASK_ROWS=True,
                          EVEN_D=EVEN_DK)
            v = load_tile(V + key_v[:, None] + offs_dv[None, :] * stride_vd, n_ok, dv_ok, MASK_ROWS=True,
                          EVEN_D=EVEN_DV)
            if INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if HAS_KPM:
                kp = tl.load(KPM + as_i64(b) * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0
            else:
                kp = n_ok
            dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
            r_a, r_b, r_c, r_d = key_block_rows(n0, n1, DocS, DocE, causal_off, Sq, window, G,
                                                CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW,
                                                BLOCK_M=BLOCK_M)
            for seg in tl.static_range(3):
                if seg == 0:
                    lo = r_a
                    hi = r_b
                elif seg == 1:
                    lo = r_b
                    hi = r_c
                else:
                    lo = r_c
                    hi = r_d
                dk, dv = _dkdv_walk(
                    dk, dv, k, v, kp, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr, DocS, DocE,
                    BIAS_ptr + P * stride_bn, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                    stride_bh, stride_bm, stride_bn,
                    Sq, Sk, G, R, lo, hi, causal_off, window, scale, qk_scale, softcap_scale, softcap_mul,
                    offs_dk, dk_ok, offs_dv, dv_ok,
                    MASK=seg != 1, CAUSAL=CAUSAL, HAS_DOCS=HAS_DOCS, HAS_WINDOW=HAS_WINDOW, HAS_KPM=HAS_KPM,
                    SOFTCAP=SOFTCAP, HAS_BIAS=HAS_BIAS, ATOMIC_DQ=ATOMIC_DQ, INTERPRET=INTERPRET, DOT_PRECISION=DOT_PRECISION,
                    EVEN_DK=EVEN_DK, EVEN_DV=EVEN_DV, BLOCK_M=BLOCK_M, DK=DK,
                )
            dk = dk * scale
            out_k = as_i64(b) * stride_dkb + hkv * stride_dkh + offs_n.to(tl.int64) * stride_dkn
            out_v = as_i64(b) * stride_dvb + hkv * stride_dvh + offs_n.to(tl.int64) * stride_dvn
            tl.store(DK_OUT + out_k[:, None] + offs_dk[None, :] * stride_dkd, dk.to(DK_OUT.dtype.element_ty),
                     mask=n_ok[:, None] & dk_ok[None, :])
            tl.store(DV_OUT + out_v[:, None] + offs_dv[None, :] * stride_dvd, dv.to(DV_OUT.dtype.element_ty),
                     mask=n_ok[:, None] & dv_ok[None, :])


_dkdv_kernel = triton.autotune(
    configs=configs_from(DKDV_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "DK", "DV", "CAUSAL", "HAS_KPM", "HAS_DOCS", "HAS_WINDOW", "SOFTCAP",
         "HAS_BIAS", "DOT_PRECISION", "NUM_PREFIX_PROGRAMS", "DO_SEQUENCE", "DO_PREFIX_GRAD", "ATOMIC_DQ"],
    prune_configs_by={"early_config_prune": smem_prune("dkdv")},
    reset_to_zero=["DP_ACC_K", "DP_ACC_V", "DQ_ACC"],
)(_dkdv_kernel_jit)


# ---------------------------------------------------------------------------------------------
# Fixed-order reduction of the prefix partials into each bank entry
# ---------------------------------------------------------------------------------------------


@triton.jit
def _reduce_prefix_kernel(
    PART, PIDX, OUT, B, SPLITS, X,
    MODE: tl.constexpr,  # 0: shared (every row), 1: per row (row n), 2: bank (rows with index n)
    BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < X
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # rows [r0, r1) of the partials (batch row b, split s at row b * SPLITS + s) that add into entry n
    if MODE == 1:
        r0 = as_i64(n) * SPLITS
        r1 = r0 + SPLITS
    else:
        r0 = as_i64(0)
        r1 = as_i64(B) * SPLITS
    if INTERPRET:  # a while loop: see common.py, "Loops under the interpreter"
        r = r0
        while r < r1:
            acc = _add_partial(acc, PART, PIDX, r, n, SPLITS, X, offs, mask, MODE)
            r += 1
    else:
        for r in range(r0, r1):
            acc = _add_partial(acc, PART, PIDX, r, n, SPLITS, X, offs, mask, MODE)
    tl.store(OUT + as_i64(n) * X + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _add_partial(acc, PART, PIDX, r, n, SPLITS, X, offs, mask, MODE: tl.constexpr):
    """Add partial row r (batch row r // SPLITS) when it belongs to entry n (a bank: the rows whose
    prefix_index is n; otherwise every row of the range)."""
    if MODE == 2:
        if tl.load(PIDX + r // SPLITS) == n:
            acc += tl.load(PART + r * X + offs, mask=mask, other=0.0)
    else:
        acc += tl.load(PART + r * X + offs, mask=mask, other=0.0)
    return acc


# ---------------------------------------------------------------------------------------------
# Host launcher
# ---------------------------------------------------------------------------------------------

ROW_GRANULE = 128  # rows per split are a multiple of every BLOCK_M in the configs


def _prefix_splits(B: int, Hkv: int, P: int, R: int, BLOCK_P: int, device: torch.device) -> tuple[int, int]:
    """Split each batch row's packed rows so that the prefix programs fill the GPU (at least ~2
    waves over the SMs) without making the fp32 partials larger than needed."""
    prefix_blocks = ceil_div(P, BLOCK_P)
    row_granules = ceil_div(R, ROW_GRANULE)
    want = ceil_div(2 * num_sms(device), max(B * Hkv * prefix_blocks, 1))
    splits = max(1, min(want, row_granules))
    rows_per_split = ceil_div(row_granules, splits) * ROW_GRANULE
    splits = ceil_div(R, rows_per_split)
    return splits, rows_per_split


def _launch(tuned, jit, grid_of, args, meta, pinned: dict | None) -> None:
    """A pinned config launches the plain kernel; otherwise the autotuner picks."""
    if pinned is not None:
        jit[grid_of(pinned)](*args, **meta, **pinned)
    else:
        tuned[grid_of](*args, **meta)


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    prefix_index: torch.Tensor | None,
    doc_start: torch.Tensor | None,
    doc_end: torch.Tensor | None,
    sinks: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
    window: int,
    need_dq: bool,
    need_dkv: bool,
    need_dprefix: bool,
    need_dsinks: bool,
    deterministic: bool = True,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels for the gradients asked for; the others come back empty.
    Returns (dq, dk, dv, dprefix_k, dprefix_v, dsinks)."""
    B, Hq, Sq, Dk = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    R = G * Sq
    P = prefix_k.shape[-2]
    need_dprefix = need_dprefix and P > 0
    need_dsinks = need_dsinks and sinks is not None
    # Gradients not asked for come back as distinct empty tensors (a custom op's outputs may
    # not alias each other).
    dq = alloc(q.shape, like=q) if need_dq else q.new_empty((0,))
    dk = alloc(k.shape, like=k) if need_dkv else q.new_empty((0,))
    dv = alloc(v.shape, like=v) if need_dkv else q.new_empty((0,))
    dpk = alloc(prefix_k.shape, like=prefix_k) if need_dprefix else q.new_empty((0,))
    dpv = alloc(prefix_v.shape, like=prefix_v) if need_dprefix else q.new_empty((0,))
    dsinks = q.new_empty((0,))
    empty = q.new_empty((0,))
    if B == 0:
        if need_dsinks:
            dsinks = torch.zeros_like(sinks)
        return dq, dk, dv, dpk, dpv, dsinks
    if not (need_dq or need_dkv or need_dprefix or need_dsinks):
        return dq, dk, dv, dpk, dpv, dsinks

    BLOCK_DK, BLOCK_DV = block_d(Dk), block_d(Dv)
    BLOCK_P = block_p(P, BLOCK_DK, BLOCK_DV)
    precision = dot_precision(q.dtype, q.device)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    kpm_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    has_docs = doc_start is not None
    docs = doc_start.contiguous() if has_docs else q
    doce = doc_end.contiguous() if has_docs else q
    pidx = prefix_index if prefix_index is not None else q
    bias, bias_strides = score_bias_arg(score_bias, B, Hq, Sq, q)
    a, c = softcap_args(scale, softcap)
    es = q.element_size()
    bes = bias.element_size() if score_bias is not None else 0
    dq_table, dkdv_table = pinned_tables(BLOCK_DK + BLOCK_DV, pinned_key(q.device, score_bias is not None,
                                                                          softcap > 0))
    flags = dict(
        DK=Dk, DV=Dv, EVEN_DK=Dk == BLOCK_DK, EVEN_DV=Dv == BLOCK_DV,
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_INDEX=prefix_index is not None,
        HAS_DOCS=has_docs, HAS_WINDOW=window > 0, SOFTCAP=softcap > 0, HAS_BIAS=score_bias is not None,
        INTERPRET=interpreting(),
        DOT_PRECISION=precision, BLOCK_DK=BLOCK_DK, BLOCK_DV=BLOCK_DV, BLOCK_P=BLOCK_P,
    )

    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    # sm_100: 8 warps, 32 rows at D <= 128 and 64 above. Its ptxas (triton 3.9) spills 28-32 B whenever 4
    # warps hold a 4096-element tile (64 rows at D = 64, 32 at D = 128, 16 at D = 256), 16 B with 64 rows
    # on 8 warps in fp16 at D = 80 (masked along D), 16-32 B with 32 rows at D = 192
    sm100 = device_family(q.device) == "tcgen05"
    delta_rows, delta_warps = (32 if BLOCK_DV <= 128 else 64, 8) if sm100 else (64, 4)
    _delta_kernel[(triton.cdiv(Sq, delta_rows), B * Hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Sq, Dv,
        BLOCK_M=delta_rows, BLOCK_D=BLOCK_DV, num_warps=delta_warps,
    )
    if need_dsinks:  # the sink's dS summed over rows: -sum_i exp(sink - L_i) Delta_i
        p_sink = torch.exp(sinks.float().view(1, Hq, 1) - lse)
        dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)

    common = (
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *grad_out.stride(), *kpm_strides, Sk if has_docs else 0, *bias_strides,
    )
    # deterministic=False with dk/dv wanted: dq comes from the dk/dv kernel's dS tiles via fp32 atomics
    atomic_dq = need_dq and need_dkv and not deterministic
    if need_dq and not atomic_dq:
        pinned = fixed_config(dq_table, smem_fits("dq", flags, es, q.device, bes)) if deterministic else None
        _launch(
            _dq_kernel, _dq_kernel_jit, lambda m: (triton.cdiv(R, m["BLOCK_M"]), B * Hkv),
            (q, k, v, prefix_k, prefix_v, grad_out, lse, delta, kpm, pidx, docs, doce, bias, dq,
             *common, *dq.stride(),
             Hkv, Sq, Sk, P, G, R, int(window),
             scale, scale * LOG2E, a, c,
             bucket(R), bucket(Sk)),
            flags, pinned,
        )

    if need_dkv or need_dprefix:
        if need_dprefix or (atomic_dq and P > 0):
            splits, rows_per_split = _prefix_splits(B, Hkv, P, R, BLOCK_P, q.device)
            n_prefix_programs = ceil_div(P, BLOCK_P) * splits
        else:
            splits, rows_per_split, n_prefix_programs = 1, ROW_GRANULE, 0
        atomic = need_dprefix and not deterministic
        f32 = dict(device=q.device, dtype=torch.float32)
        if need_dprefix and not atomic:
            part_k = torch.empty((B, splits, Hkv, P, Dk), **f32)
            part_v = torch.empty((B, splits, Hkv, P, Dv), **f32)
        else:
            part_k = part_v = empty
        n_entries = 1 if prefix_k.dim() == 3 else prefix_k.shape[0]
        acc_k = torch.zeros((n_entries, Hkv, P, Dk), **f32) if atomic else empty
        acc_v = torch.zeros((n_entries, Hkv, P, Dv), **f32) if atomic else empty
        dq_acc = torch.zeros((B, Hq, Sq, Dk), **f32) if atomic_dq else empty
        dk_arg = dk if need_dkv else q
        dv_arg = dv if need_dkv else q
        dk_strides = dk.stride() if need_dkv else (0, 0, 0, 0)
        dv_strides = dv.stride() if need_dkv else (0, 0, 0, 0)

        def grid(meta):
            seq_programs = triton.cdiv(Sk, meta["BLOCK_N"]) if need_dkv else 0
            return (n_prefix_programs + seq_programs, B * Hkv)

        dkdv_meta = dict(flags, ATOMIC=atomic, SHARED_PREFIX=prefix_k.dim() == 3,
                         DO_SEQUENCE=need_dkv, DO_PREFIX_GRAD=need_dprefix, ATOMIC_DQ=atomic_dq)
        pinned = fixed_config(dkdv_table, smem_fits("dkdv", dkdv_meta, es, q.device, bes)) if deterministic else None
        _launch(
            _dkdv_kernel, _dkdv_kernel_jit, grid,
            (q, k, v, prefix_k, prefix_v, grad_out, lse, delta, kpm, pidx, docs, doce, bias, dk_arg, dv_arg,
             part_k, part_v, acc_k, acc_v, dq_acc,
             *common, *dk_strides, *dv_strides,
             Hkv, Sq, Sk, P, G, R, int(window),
             scale, scale * LOG2E, a, c,
             n_prefix_programs, splits, rows_per_split,
             bucket(R), bucket(Sk)),
            dkdv_meta, pinned,
        )
        if atomic_dq:
            dq.copy_(dq_acc)

        if need_dprefix:
            if atomic:
                dpk.copy_(acc_k.view(dpk.shape))
                dpv.copy_(acc_v.view(dpv.shape))
            else:
                mode = 2 if prefix_index is not None else (1 if prefix_k.dim() == 4 else 0)
                RB = 1024
                dpk_c = dpk if dpk.is_contiguous() else torch.empty_like(dpk, memory_format=torch.contiguous_format)
                dpv_c = dpv if dpv.is_contiguous() else torch.empty_like(dpv, memory_format=torch.contiguous_format)
                for part, dst, X in ((part_k, dpk_c, Hkv * P * Dk), (part_v, dpv_c, Hkv * P * Dv)):
                    _reduce_prefix_kernel[(n_entries, triton.cdiv(X, RB))](
                        part, pidx, dst, B, splits, X, MODE=mode, BLOCK=RB, INTERPRET=interpreting(),
                    )
                dpk, dpv = dpk_c, dpv_c
    return dq, dk, dv, dpk, dpv, dsinks
