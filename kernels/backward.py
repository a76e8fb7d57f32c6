"""Backward kernels.

With L the saved row logsumexp, Delta_i = rowsum(dO_i * O_i), P_ij = exp(s_ij - L_i) and
dS_ij = P_ij (dO_i . v_j - Delta_i)   (times 1 - tanh^2 under a softcap):

    dq_i = scale * sum_j dS_ij k_j                 over prefix and sequence keys     (_dq_kernel)
    dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dO_i   over the packed rows    (_dkdv_kernel)
           of the GQA group, so the group sum comes free
    dprefix: the same sums for the prefix slots, over every batch row, group head and query.

The prefix gradient is a reduction of B*G*Sq rows into a tiny (Hkv, P, D) output, so it is split
over many programs: the prefix programs of _dkdv_kernel each take one prefix block, one batch row
and one slice of the rows, and write an fp32 partial; _reduce_prefix_kernel then sums the
partials in a fixed order (deterministic), into each bank entry from exactly the batch rows that
selected it. With deterministic=False the prefix programs add into an fp32 buffer with atomics
instead. Only the kernels for the gradients autograd asks for are launched: in layer 0 of a frozen
model only the prefix programs run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    SMEM_LIMIT,
    alloc,
    block_d,
    block_p,
    bucket,
    ceil_div,
    configs_from,
    dot_precision,
    interpreting,
    load_tile,
    num_sms,
    pick,
    prefix_strides,
    smem_estimate,
    tanh,
)
from .forward import softcap_args

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
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + offs_m[:, None] * stride_dm
                 + offs_d[None, :] * stride_dd, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * Sq + offs_m, tl.sum(o * do, 1), mask=offs_m < Sq)


# ---------------------------------------------------------------------------------------------
# dq: one program per block of packed rows, walking the prefix then the visible sequence keys
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_walk(
    dq, q, do, lse2, delta, i_row,
    K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd, KPM_ptr, stride_mn,
    lo, hi, n_limit, causal_off, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
    MASK_LIMIT: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < n_limit
        k = load_tile(K_ptr + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok,
                      MASK_ROWS=MASK_LIMIT, EVEN_D=EVEN_D)
        v = load_tile(V_ptr + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, n_ok, d_ok,
                      MASK_ROWS=MASK_LIMIT, EVEN_D=EVEN_D)
        if INTERPRET:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP:
            t = tanh(qk * softcap_scale)
            s = t * softcap_mul
        else:
            s = qk * qk_scale
        if MASK_LIMIT:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if MASK_CAUSAL:
            s = tl.where(offs_n[None, :] <= i_row[:, None] + causal_off, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(KPM_ptr + offs_n * stride_mn, mask=n_ok, other=0)
            s = tl.where((kp != 0)[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


DQ_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages), in order of preference
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2),
    (32, 32, 4, 1),
]
DKDV_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages): BLOCK_N keys resident, BLOCK_M rows streamed
    (64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2),
    (32, 32, 4, 1),
]


def _prune(resident_is_m: bool):
    """dq keeps q, do and dq (BLOCK_M rows) resident and streams k, v; dk/dv the reverse."""
    def prune(configs, named_args, **kwargs):
        if interpreting():
            return configs
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        es = named_args["Q"].element_size()

        def fits(c):
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            a, b = (bm, bn) if resident_is_m else (bn, bm)
            return smem_estimate(es, a, b, bd, c.num_stages, 2) <= SMEM_LIMIT

        return pick(configs, fits)
    return prune


@triton.autotune(
    configs=configs_from(DQ_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "HEAD_DIM", "CAUSAL", "HAS_KPM", "SOFTCAP", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune(resident_is_m=True)},
)
@triton.jit
def _dq_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, PIDX, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hkv, Sq, Sk, P, G, R,
    scale, qk_scale, softcap_scale, softcap_mul,
    R_BUCKET, SK_BUCKET,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the last row blocks see the most causal keys: launch them first to shorten the tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq

    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    i_row = offs_r // G
    g_row = offs_r % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rmask = r_ok[:, None] & d_ok[None, :]
    bh_rows = b.to(tl.int64) * Hkv * G + hkv * G + g_row
    q = load_tile(Q + (b.to(tl.int64) * stride_qb + (hkv * G + g_row) * stride_qh + i_row * stride_qm)[:, None]
                  + offs_d[None, :] * stride_qd, r_ok, d_ok, MASK_ROWS=True, EVEN_D=EVEN_D)
    do = load_tile(DO + (b.to(tl.int64) * stride_dob + (hkv * G + g_row) * stride_doh + i_row * stride_dom)[:, None]
                   + offs_d[None, :] * stride_dod, r_ok, d_ok, MASK_ROWS=True, EVEN_D=EVEN_D)
    if INTERPRET:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + bh_rows * Sq + i_row, mask=r_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh_rows * Sq + i_row, mask=r_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # prefix
    if HAS_INDEX:
        prow = tl.load(PIDX + b).to(tl.int64)
    else:
        prow = b.to(tl.int64)
    dq = _dq_walk(
        dq, q, do, lse2, delta, i_row,
        PK + prow * stride_pkb + hkv * stride_pkh, PV + prow * stride_pvb + hkv * stride_pvh,
        stride_pkn, stride_pkd, stride_pvn, stride_pvd, KPM, stride_mn,
        0, P, P, causal_off, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
        MASK_LIMIT=True, MASK_CAUSAL=False, HAS_KPM=False, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_N=BLOCK_P,
    )
    # sequence: fully visible blocks, then the diagonal
    K_ptr = K + b.to(tl.int64) * stride_kb + hkv * stride_kh
    V_ptr = V + b.to(tl.int64) * stride_vb + hkv * stride_vh
    KPM_ptr = KPM + b.to(tl.int64) * stride_mb
    if CAUSAL:
        i_first = (pid_m * BLOCK_M) // G
        i_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, R) - 1) // G
        full_end = tl.minimum(i_first + causal_off + 1, Sk)
        hi = tl.minimum(i_last + causal_off + 1, Sk)
    else:
        full_end = Sk
        hi = Sk
    full_end = (full_end // BLOCK_N) * BLOCK_N
    dq = _dq_walk(
        dq, q, do, lse2, delta, i_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        KPM_ptr, stride_mn, 0, full_end, Sk, causal_off, qk_scale, softcap_scale, softcap_mul,
        offs_d, d_ok,
        MASK_LIMIT=False, MASK_CAUSAL=False, HAS_KPM=HAS_KPM, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_N=BLOCK_N,
    )
    dq = _dq_walk(
        dq, q, do, lse2, delta, i_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        KPM_ptr, stride_mn, full_end, hi, Sk, causal_off, qk_scale, softcap_scale, softcap_mul,
        offs_d, d_ok,
        MASK_LIMIT=True, MASK_CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_N=BLOCK_N,
    )
    dq = dq * scale
    tl.store(DQ + (b.to(tl.int64) * stride_dqb + (hkv * G + g_row) * stride_dqh + i_row * stride_dqm)[:, None]
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=rmask)


# ---------------------------------------------------------------------------------------------
# dk, dv (sequence) and the prefix partials: one program per key block, walking the packed rows
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_walk(
    dk, dv, k, v, kp, offs_n,
    Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr,
    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
    Sq, G, R, lo, hi, causal_off, scale, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
    MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, SOFTCAP: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Accumulate dk, dv of one key block over packed rows [lo, hi) (transposed scores: keys x rows).
    With ATOMIC_DQ the same dS tile also gives this key block's share of dq (dS k), added with fp32
    atomics: 5 matmuls per tile pair instead of 7 with the separate dq kernel, in varying order."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_r in range(lo, hi, BLOCK_M):
        offs_r = start_r + offs_m0
        r_ok = offs_r < R
        i_row = offs_r // G
        g_row = offs_r % G
        q = load_tile(Q_ptr + (g_row * stride_qh + i_row * stride_qm)[:, None] + offs_d[None, :] * stride_qd,
                      r_ok, d_ok, MASK_ROWS=True, EVEN_D=EVEN_D)
        do = load_tile(DO_ptr + (g_row * stride_doh + i_row * stride_dom)[:, None] + offs_d[None, :] * stride_dod,
                       r_ok, d_ok, MASK_ROWS=True, EVEN_D=EVEN_D)
        if INTERPRET:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        # rows past R read lse = +inf, so their p is exactly 0
        lse2 = tl.load(LSE_ptr + g_row * Sq + i_row, mask=r_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA_ptr + g_row * Sq + i_row, mask=r_ok, other=0.0)
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if SOFTCAP:
            tT = tanh(qkT * softcap_scale)
            sT = tT * softcap_mul
        else:
            sT = qkT * qk_scale
        if MASK_CAUSAL:
            sT = tl.where(offs_n[:, None] <= i_row[None, :] + causal_off, sT, float("-inf"))
        if HAS_KPM:
            sT = tl.where(kp[:, None], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv += tl.dot(pT.to(do.dtype), do, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(DQ_ptr + ((g_row * Sq + i_row) * HEAD_DIM)[:, None] + offs_d[None, :], dq,
                          mask=r_ok[:, None] & d_ok[None, :])
    return dk, dv


@triton.autotune(
    configs=configs_from(DKDV_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "HEAD_DIM", "CAUSAL", "HAS_KPM", "SOFTCAP", "DOT_PRECISION",
         "NUM_PREFIX_PROGRAMS", "DO_SEQUENCE", "DO_PREFIX_GRAD", "ATOMIC_DQ"],
    prune_configs_by={"early_config_prune": _prune(resident_is_m=False)},
    reset_to_zero=["DP_ACC_K", "DP_ACC_V", "DQ_ACC"],
)
@triton.jit
def _dkdv_kernel(
    Q, K, V, PK, PV, DO, LSE, DELTA, KPM, PIDX, DK, DV, DP_PART_K, DP_PART_V, DP_ACC_K, DP_ACC_V, DQ_ACC,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_mb, stride_mn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hkv, Sq, Sk, P, G, R,
    scale, qk_scale, softcap_scale, softcap_mul,
    NUM_PREFIX_PROGRAMS, SPLITS, ROWS_PER_SPLIT,
    R_BUCKET, SK_BUCKET,
    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, SOFTCAP: tl.constexpr,
    INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC: tl.constexpr,
    SHARED_PREFIX: tl.constexpr, DO_SEQUENCE: tl.constexpr, DO_PREFIX_GRAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    prog = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    Q_ptr = Q + b.to(tl.int64) * stride_qb + hkv * G * stride_qh
    DO_ptr = DO + b.to(tl.int64) * stride_dob + hkv * G * stride_doh
    LSE_ptr = LSE + (b.to(tl.int64) * Hkv + hkv) * G * Sq
    DELTA_ptr = DELTA + (b.to(tl.int64) * Hkv + hkv) * G * Sq
    DQ_ptr = DQ_ACC + (b.to(tl.int64) * Hkv + hkv) * G * Sq * HEAD_DIM  # fp32, contiguous (B, Hq, Sq, D)

    if prog < NUM_PREFIX_PROGRAMS:
        # ---- a prefix block, over one slice of this batch row's packed rows ----
        pblock = prog // SPLITS
        split = prog % SPLITS
        offs_p = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < P
        if HAS_INDEX:
            prow = tl.load(PIDX + b).to(tl.int64)
        else:
            prow = b.to(tl.int64)
        pmask = p_ok[:, None] & d_ok[None, :]
        pk = tl.load(PK + prow * stride_pkb + hkv * stride_pkh + offs_p[:, None] * stride_pkn
                     + offs_d[None, :] * stride_pkd, mask=pmask, other=0.0)
        pv = tl.load(PV + prow * stride_pvb + hkv * stride_pvh + offs_p[:, None] * stride_pvn
                     + offs_d[None, :] * stride_pvd, mask=pmask, other=0.0)
        if INTERPRET:
            pk = pk.to(tl.float32)
            pv = pv.to(tl.float32)
        dpk = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        dpv = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        lo = split * ROWS_PER_SPLIT
        hi = tl.minimum(lo + ROWS_PER_SPLIT, R)
        dpk, dpv = _dkdv_walk(
            dpk, dpv, pk, pv, p_ok, offs_p, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr,
            stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
            Sq, G, R, lo, hi, causal_off, scale, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
            MASK_CAUSAL=False, HAS_KPM=False, SOFTCAP=SOFTCAP, ATOMIC_DQ=ATOMIC_DQ, INTERPRET=INTERPRET,
            DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM,
        )
        if DO_PREFIX_GRAD:  # (otherwise these programs ran for their share of dq alone)
            dpk = dpk * scale
            slot = hkv * P * HEAD_DIM + offs_p[:, None] * HEAD_DIM + offs_d[None, :]
            if ATOMIC:
                # fp32 atomics straight into the bank entry (opt-in: order, hence rounding, varies)
                if SHARED_PREFIX:
                    base = 0
                else:
                    base = prow * Hkv * P * HEAD_DIM
                tl.atomic_add(DP_ACC_K + base + slot, dpk, mask=pmask)
                tl.atomic_add(DP_ACC_V + base + slot, dpv, mask=pmask)
            else:
                base = (b.to(tl.int64) * SPLITS + split) * Hkv * P * HEAD_DIM
                tl.store(DP_PART_K + base + slot, dpk, mask=pmask)
                tl.store(DP_PART_V + base + slot, dpv, mask=pmask)
    else:
        if DO_SEQUENCE:
            # ---- a block of sequence keys, over the packed rows that can see it ----
            n0 = (prog - NUM_PREFIX_PROGRAMS) * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < Sk
            nmask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(K + b.to(tl.int64) * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn
                        + offs_d[None, :] * stride_kd, mask=nmask, other=0.0)
            v = tl.load(V + b.to(tl.int64) * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vn
                        + offs_d[None, :] * stride_vd, mask=nmask, other=0.0)
            if INTERPRET:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if HAS_KPM:
                kp = tl.load(KPM + b.to(tl.int64) * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0
            else:
                kp = n_ok
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            if CAUSAL:
                # rows i >= j - off see key j: start at the first row that sees n0, mask until the
                # first row that sees the whole block, then walk unmasked
                r_start = tl.maximum(n0 - causal_off, 0) * G
                r_start = (r_start // BLOCK_M) * BLOCK_M
                r_full = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - causal_off, 0) * G, R)
                r_full = tl.minimum(((r_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, tl.maximum(R, r_start))
                dk, dv = _dkdv_walk(
                    dk, dv, k, v, kp, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr,
                    stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                    Sq, G, R, r_start, r_full, causal_off, scale, qk_scale, softcap_scale, softcap_mul,
                    offs_d, d_ok,
                    MASK_CAUSAL=True, HAS_KPM=HAS_KPM, SOFTCAP=SOFTCAP, ATOMIC_DQ=ATOMIC_DQ,
                    INTERPRET=INTERPRET, DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_M=BLOCK_M,
                    HEAD_DIM=HEAD_DIM,
                )
            else:
                r_full = 0
            dk, dv = _dkdv_walk(
                dk, dv, k, v, kp, offs_n, Q_ptr, DO_ptr, LSE_ptr, DELTA_ptr, DQ_ptr,
                stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                Sq, G, R, r_full, R, causal_off, scale, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
                MASK_CAUSAL=False, HAS_KPM=HAS_KPM, SOFTCAP=SOFTCAP, ATOMIC_DQ=ATOMIC_DQ, INTERPRET=INTERPRET,
                DOT_PRECISION=DOT_PRECISION, EVEN_D=EVEN_D, BLOCK_M=BLOCK_M, HEAD_DIM=HEAD_DIM,
            )
            dk = dk * scale
            tl.store(DK + b.to(tl.int64) * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn
                     + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=nmask)
            tl.store(DV + b.to(tl.int64) * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn
                     + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=nmask)


# ---------------------------------------------------------------------------------------------
# Fixed-order reduction of the prefix partials into each bank entry
# ---------------------------------------------------------------------------------------------


@triton.jit
def _reduce_prefix_kernel(
    PART, PIDX, OUT, B, SPLITS, X,
    MODE: tl.constexpr,  # 0: shared (every row), 1: per row (row n), 2: bank (rows with index n)
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < X
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if MODE == 1:
        for s in range(SPLITS):
            acc += tl.load(PART + (n.to(tl.int64) * SPLITS + s) * X + offs, mask=mask, other=0.0)
    else:
        for b in range(B):
            if MODE == 0:
                use = True
            else:
                use = tl.load(PIDX + b) == n
            if use:
                for s in range(SPLITS):
                    acc += tl.load(PART + (b * SPLITS + s) * X + offs, mask=mask, other=0.0)
    tl.store(OUT + n.to(tl.int64) * X + offs, acc.to(OUT.dtype.element_ty), mask=mask)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels for the gradients asked for; the others come back empty."""
    if doc_start is not None or sinks is not None or window:
        raise NotImplementedError("documents, sinks and sliding windows are not in the kernels yet")
    dsinks = q.new_empty((0,))
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    R = G * Sq
    P = prefix_k.shape[-2]
    need_dprefix = need_dprefix and P > 0
    # Gradients not asked for come back as distinct empty tensors (a custom op's outputs may
    # not alias each other).
    dq = alloc(q.shape, like=q) if need_dq else q.new_empty((0,))
    dk = alloc(k.shape, like=k) if need_dkv else q.new_empty((0,))
    dv = alloc(v.shape, like=v) if need_dkv else q.new_empty((0,))
    dpk = alloc(prefix_k.shape, like=prefix_k) if need_dprefix else q.new_empty((0,))
    dpv = alloc(prefix_v.shape, like=prefix_v) if need_dprefix else q.new_empty((0,))
    empty = q.new_empty((0,))
    if B == 0 or not (need_dq or need_dkv or need_dprefix):
        return dq, dk, dv, dpk, dpv, dsinks

    BLOCK_D = block_d(D)
    BLOCK_P = block_p(P, 64)
    interp = interpreting()
    precision = dot_precision(q.dtype)
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    kpm_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    pidx = prefix_index if prefix_index is not None else q
    a, c = softcap_args(scale, softcap)
    flags = dict(
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_INDEX=prefix_index is not None,
        SOFTCAP=softcap > 0, INTERPRET=interp, DOT_PRECISION=precision,
    )

    delta = torch.empty((B, Hq, Sq), device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(Sq, 64), B * Hq)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Sq, D,
        BLOCK_M=64, BLOCK_D=BLOCK_D,
    )

    # deterministic=False with dk/dv wanted: dq comes from the dk/dv kernel's dS tiles via fp32 atomics
    atomic_dq = need_dq and need_dkv and not deterministic
    if need_dq and not atomic_dq:
        _dq_kernel[lambda meta: (triton.cdiv(R, meta["BLOCK_M"]), B * Hkv)](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, kpm, pidx, dq,
            *q.stride(), *k.stride(), *v.stride(),
            *prefix_strides(prefix_k), *prefix_strides(prefix_v),
            *grad_out.stride(), *kpm_strides, *dq.stride(),
            Hkv, Sq, Sk, P, G, R,
            scale, scale * LOG2E, a, c,
            bucket(R), bucket(Sk),
            HEAD_DIM=D, EVEN_D=D == BLOCK_D, **flags, BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P,
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
            part_k = torch.empty((B, splits, Hkv, P, D), **f32)
            part_v = torch.empty((B, splits, Hkv, P, D), **f32)
        else:
            part_k = part_v = empty
        n_entries = 1 if prefix_k.dim() == 3 else prefix_k.shape[0]
        acc_k = torch.zeros((n_entries, Hkv, P, D), **f32) if atomic else empty
        acc_v = torch.zeros((n_entries, Hkv, P, D), **f32) if atomic else empty
        dq_acc = torch.zeros((B, Hq, Sq, D), **f32) if atomic_dq else empty
        dk_arg = dk if need_dkv else q
        dv_arg = dv if need_dkv else q
        dk_strides = dk.stride() if need_dkv else (0, 0, 0, 0)
        dv_strides = dv.stride() if need_dkv else (0, 0, 0, 0)

        def grid(meta):
            seq_programs = triton.cdiv(Sk, meta["BLOCK_N"]) if need_dkv else 0
            return (n_prefix_programs + seq_programs, B * Hkv)

        _dkdv_kernel[grid](
            q, k, v, prefix_k, prefix_v, grad_out, lse, delta, kpm, pidx, dk_arg, dv_arg,
            part_k, part_v, acc_k, acc_v, dq_acc,
            *q.stride(), *k.stride(), *v.stride(),
            *prefix_strides(prefix_k), *prefix_strides(prefix_v),
            *grad_out.stride(), *kpm_strides, *dk_strides, *dv_strides,
            Hkv, Sq, Sk, P, G, R,
            scale, scale * LOG2E, a, c,
            n_prefix_programs, splits, rows_per_split,
            bucket(R), bucket(Sk),
            HEAD_DIM=D, EVEN_D=D == BLOCK_D, **flags, ATOMIC=atomic, SHARED_PREFIX=prefix_k.dim() == 3,
            DO_SEQUENCE=need_dkv, DO_PREFIX_GRAD=need_dprefix, ATOMIC_DQ=atomic_dq,
            BLOCK_D=BLOCK_D, BLOCK_P=BLOCK_P,
        )
        if atomic_dq:
            dq.copy_(dq_acc)

        if need_dprefix:
            if atomic:
                dpk.copy_(acc_k.view(dpk.shape))
                dpv.copy_(acc_v.view(dpv.shape))
            else:
                mode = 2 if prefix_index is not None else (1 if prefix_k.dim() == 4 else 0)
                X = Hkv * P * D
                RB = 1024
                dpk_c = dpk if dpk.is_contiguous() else torch.empty_like(dpk, memory_format=torch.contiguous_format)
                dpv_c = dpv if dpv.is_contiguous() else torch.empty_like(dpv, memory_format=torch.contiguous_format)
                for part, dst in ((part_k, dpk_c), (part_v, dpv_c)):
                    _reduce_prefix_kernel[(n_entries, triton.cdiv(X, RB))](
                        part, pidx, dst, B, splits, X, MODE=mode, BLOCK=RB,
                    )
                dpk, dpv = dpk_c, dpv_c
    return dq, dk, dv, dpk, dpv, dsinks
