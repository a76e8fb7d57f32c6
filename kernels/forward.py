"""Forward kernel: one online softmax over the prefix blocks, then the sequence blocks.

For a block of packed rows (see common.py) of KV head hkv in batch row b:

    stage 1  prefix:   for each block of prefix slots (all visible)       s = scale * q . pk
    stage 2  sequence: blocks every row sees in full (no causal mask)     s = scale * q . k
    stage 3  sequence: the diagonal blocks, causal mask j <= i + Sk - Sq
             (blocks after the last row's diagonal are never visited)
    each block:  m' = max(m, rowmax s);  l = l * 2^(m - m') + rowsum 2^(s - m');
                 acc = acc * 2^(m - m') + 2^(s - m') v                  (base-2, s in log2 units)
    epilogue:    out = acc / l;   lse = (m + log2 l) * ln 2               (natural log, fp32)

Key padding masks keys in stages 2-3. A row that sees nothing (P = 0, every key masked) keeps
m = -inf and l = 0: it writes out = 0 and lse = +inf, which the backward reads as "p = 0".

Split-K (decode steps and short chunks over long caches, when the row blocks alone cannot fill
the GPU): split s of S takes the prefix (s = 0 only) and sequence keys [s*K, (s+1)*K), and writes
its normalized partial o_s with lse_s (-inf when it saw nothing). _combine_splits_kernel merges:

    lse = log sum_s exp(lse_s),    out = sum_s exp(lse_s - lse) o_s
"""

from __future__ import annotations

import os

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
    configs_from,
    dot_precision,
    interpreting,
    load_tile,
    num_sms,
    pick,
    prefix_strides,
    smem_estimate,
    store_tile,
    tanh,
)


@triton.jit
def _attend(
    acc, l_i, m_i, q, i_row,
    K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd, KPM_ptr, stride_mn,
    lo, hi, n_limit, causal_off, qk_scale, softcap_scale, softcap_mul,
    offs_d, d_ok,
    MASK_LIMIT: tl.constexpr, MASK_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    MAYBE_EMPTY: tl.constexpr, EVEN_D: tl.constexpr,
    SOFTCAP: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold keys [lo, hi) into the running (acc, l, m) of a block of rows. Keys past n_limit
    are masked only when MASK_LIMIT (the fully visible blocks need no mask at all)."""
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
            s = tanh(qk * softcap_scale) * softcap_mul
        else:
            s = qk * qk_scale
        if MASK_LIMIT:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if MASK_CAUSAL:
            s = tl.where(offs_n[None, :] <= i_row[:, None] + causal_off, s, float("-inf"))
        if HAS_KPM:
            kp = tl.load(KPM_ptr + offs_n * stride_mn, mask=n_ok, other=0)
            s = tl.where((kp != 0)[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MAYBE_EMPTY:  # P = 0 with padding: a row may have seen nothing yet (m = -inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


FWD_CONFIGS = [  # (BLOCK_M, BLOCK_N, warps, stages), in order of preference
    (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 3),
    (32, 128, 4, 3), (16, 128, 4, 3), (32, 32, 4, 1),
]
SPLIT_GRANULE = 128  # keys per split are a multiple of every BLOCK_N above


def _prune_fwd(configs, named_args, **kwargs):
    if interpreting():
        return configs
    bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    rows = named_args.get("R_BUCKET", kwargs.get("R_BUCKET", 1 << 20))
    es = named_args["Q"].element_size()
    # decode / short chunks: do not pad rows to 128
    keep = [c for c in configs if not (rows <= 64 and c.kwargs["BLOCK_M"] > 64)] or configs
    return pick(keep, lambda c: smem_estimate(es, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], bd,
                                              c.num_stages, 1) <= SMEM_LIMIT)


@triton.autotune(
    configs=configs_from(FWD_CONFIGS),
    key=["R_BUCKET", "SK_BUCKET", "P", "HEAD_DIM", "CAUSAL", "HAS_KPM", "SOFTCAP", "DOT_PRECISION", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _fwd_kernel(
    Q, K, V, PK, PV, KPM, PIDX, Out, Lse, OPart, LsePart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkb, stride_pkh, stride_pkn, stride_pkd,
    stride_pvb, stride_pvh, stride_pvn, stride_pvd,
    stride_mb, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hkv, Sq, Sk, P, G, R,
    qk_scale, softcap_scale, softcap_mul,
    R_BUCKET, SK_BUCKET, KEYS_PER_SPLIT,
    HEAD_DIM: tl.constexpr, SPLIT_K: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_INDEX: tl.constexpr, SOFTCAP: tl.constexpr,
    MAYBE_EMPTY: tl.constexpr, INTERPRET: tl.constexpr, DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the last row blocks see the most causal keys: launch them first to shorten the tail
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    causal_off = Sk - Sq
    if SPLIT_K:
        key_lo = split * KEYS_PER_SPLIT
        key_hi = key_lo + KEYS_PER_SPLIT
        prefix_hi = tl.where(split == 0, P, 0)
    else:
        key_lo = 0
        key_hi = Sk
        prefix_hi = P

    # ---- the block of packed rows: (query head hkv*G + g, position i) ----
    offs_r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = offs_r < R
    i_row = offs_r // G
    g_row = offs_r % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_q = b.to(tl.int64) * stride_qb + (hkv * G + g_row) * stride_qh + i_row.to(tl.int64) * stride_qm
    q = load_tile(Q + row_q[:, None] + offs_d[None, :] * stride_qd, r_ok, d_ok, MASK_ROWS=True, EVEN_D=EVEN_D)
    if INTERPRET:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- stage 1: the prefix (shared, per row, or this row's bank entry), always visible ----
    if HAS_INDEX:
        prow = tl.load(PIDX + b).to(tl.int64)
    else:
        prow = b.to(tl.int64)
    PK_ptr = PK + prow * stride_pkb + hkv * stride_pkh
    PV_ptr = PV + prow * stride_pvb + hkv * stride_pvh
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, i_row, PK_ptr, PV_ptr, stride_pkn, stride_pkd, stride_pvn, stride_pvd,
        KPM, stride_mn, 0, prefix_hi, P, causal_off, qk_scale, softcap_scale, softcap_mul, offs_d, d_ok,
        MASK_LIMIT=True, MASK_CAUSAL=False, HAS_KPM=False, MAYBE_EMPTY=MAYBE_EMPTY, EVEN_D=EVEN_D,
        SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_P,
    )

    # ---- stages 2-3: the sequence ----
    K_ptr = K + b.to(tl.int64) * stride_kb + hkv * stride_kh
    V_ptr = V + b.to(tl.int64) * stride_vb + hkv * stride_vh
    KPM_ptr = KPM + b.to(tl.int64) * stride_mb
    if CAUSAL:
        i_first = (pid_m * BLOCK_M) // G
        i_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, R) - 1) // G
        full_end = tl.minimum(i_first + causal_off + 1, Sk)  # keys every row of the block sees
        hi = tl.minimum(i_last + causal_off + 1, Sk)  # keys past this are masked for every row
    else:
        full_end = Sk
        hi = Sk
    full_end = (full_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, i_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        KPM_ptr, stride_mn, key_lo, tl.minimum(full_end, key_hi), Sk, causal_off, qk_scale, softcap_scale, softcap_mul,
        offs_d, d_ok,
        MASK_LIMIT=False, MASK_CAUSAL=False, HAS_KPM=HAS_KPM, MAYBE_EMPTY=MAYBE_EMPTY, EVEN_D=EVEN_D,
        SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
    )
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, q, i_row, K_ptr, V_ptr, stride_kn, stride_kd, stride_vn, stride_vd,
        KPM_ptr, stride_mn, tl.maximum(full_end, key_lo), tl.minimum(hi, key_hi), Sk, causal_off, qk_scale, softcap_scale, softcap_mul,
        offs_d, d_ok,
        MASK_LIMIT=True, MASK_CAUSAL=CAUSAL, HAS_KPM=HAS_KPM, MAYBE_EMPTY=MAYBE_EMPTY, EVEN_D=EVEN_D,
        SOFTCAP=SOFTCAP, INTERPRET=INTERPRET,
        DOT_PRECISION=DOT_PRECISION, BLOCK_N=BLOCK_N,
    )

    # ---- epilogue ----
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse_seen = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural log
    if SPLIT_K:
        # partials (SPLITS, B*Hq*Sq, D) fp32 and (SPLITS, B*Hq*Sq); a split that saw nothing has lse -inf
        flat = ((split * tl.num_programs(1) + pid_bh).to(tl.int64) * G + g_row) * Sq + i_row
        tl.store(OPart + flat[:, None] * HEAD_DIM + offs_d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(LsePart + flat, tl.where(empty, float("-inf"), lse_seen), mask=r_ok)
    else:
        lse = tl.where(empty, float("inf"), lse_seen)
        row_o = b.to(tl.int64) * stride_ob + (hkv * G + g_row) * stride_oh + i_row.to(tl.int64) * stride_om
        store_tile(Out + row_o[:, None] + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty), r_ok, d_ok,
                   EVEN_D=EVEN_D)
        # lse is (B, Hq, Sq) contiguous
        lse_off = (b.to(tl.int64) * Hkv * G + hkv * G + g_row) * Sq + i_row
        tl.store(Lse + lse_off, lse, mask=r_ok)


@triton.jit
def _combine_splits_kernel(
    OPart, LsePart, Out, Lse, N_ROWS, SPLITS, Hq, Sq,
    stride_ob, stride_oh, stride_om, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat (b, h, i) rows
    r_ok = offs_r < N_ROWS
    offs_d = tl.arange(0, BLOCK_D)
    mask = r_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(LsePart + s * N_ROWS + offs_r, mask=r_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(SPLITS):
        w = tl.exp(tl.load(LsePart + s * N_ROWS + offs_r, mask=r_ok, other=float("-inf")) - m_safe)
        o = tl.load(OPart + (s * N_ROWS + offs_r.to(tl.int64))[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask, other=0.0)
        w_sum += w
        acc += w[:, None] * o
    empty = w_sum == 0.0
    w_safe = tl.where(empty, 1.0, w_sum)
    b = offs_r // (Hq * Sq)
    h = (offs_r // Sq) % Hq
    i = offs_r % Sq
    row_o = b.to(tl.int64) * stride_ob + h * stride_oh + i.to(tl.int64) * stride_om
    tl.store(Out + row_o[:, None] + offs_d[None, :] * stride_od, (acc / w_safe[:, None]).to(Out.dtype.element_ty),
             mask=mask)
    tl.store(Lse + offs_r, tl.where(empty, float("inf"), m_safe + tl.log(w_safe)), mask=r_ok)


def num_splits(B: int, Hkv: int, R: int, Sk: int, device: torch.device) -> int:
    """How many key splits the forward uses: more than one only when the row blocks alone leave
    most of the GPU idle (decode steps, short chunks) and the cache is long enough to share.
    PREFIXATTN_SPLITS=N forces N (tests)."""
    forced = os.environ.get("PREFIXATTN_SPLITS")
    if forced:
        return max(1, min(int(forced), triton.cdiv(max(Sk, 1), SPLIT_GRANULE)))
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Inputs are validated by prefixattn.ops. Returns (out, lse)."""
    if doc_start is not None or sinks is not None or window:
        raise NotImplementedError("documents, sinks and sliding windows are not in the kernels yet")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    R = G * Sq
    P = prefix_k.shape[-2]
    out = alloc((B, Hq, Sq, D), like=q)
    lse = alloc((B, Hq, Sq), like=q, dtype=torch.float32)
    if B == 0:
        return out, lse
    kpm = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q
    kpm_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    pidx = prefix_index if prefix_index is not None else q
    a, c = softcap_args(scale, softcap)
    BLOCK_D = block_d(D)
    splits = num_splits(B, Hkv, R, Sk, q.device)
    keys_per_split = triton.cdiv(triton.cdiv(max(Sk, 1), splits), SPLIT_GRANULE) * SPLIT_GRANULE
    splits = triton.cdiv(max(Sk, 1), keys_per_split) if splits > 1 else 1
    if splits > 1:
        o_part = alloc((splits, B * Hq * Sq, D), like=q, dtype=torch.float32)
        lse_part = alloc((splits, B * Hq * Sq), like=q, dtype=torch.float32)
    else:
        o_part = lse_part = out

    def grid(meta):
        return (triton.cdiv(R, meta["BLOCK_M"]), B * Hkv, splits)

    _fwd_kernel[grid](
        q, k, v, prefix_k, prefix_v, kpm, pidx, out, lse, o_part, lse_part,
        *q.stride(), *k.stride(), *v.stride(),
        *prefix_strides(prefix_k), *prefix_strides(prefix_v),
        *kpm_strides, *out.stride(),
        Hkv, Sq, Sk, P, G, R,
        scale * LOG2E, a, c,
        bucket(R), bucket(Sk), keys_per_split,
        HEAD_DIM=D, SPLIT_K=splits > 1, # a row may have seen nothing yet: no prefix and padding, or a split of keys past its diagonal
        MAYBE_EMPTY=splits > 1 or (P == 0 and (key_padding_mask is not None or Sk == 0)),
        CAUSAL=causal, HAS_KPM=key_padding_mask is not None, HAS_INDEX=prefix_index is not None,
        SOFTCAP=softcap > 0, INTERPRET=interpreting(), DOT_PRECISION=dot_precision(q.dtype),
        EVEN_D=D == BLOCK_D, BLOCK_D=BLOCK_D, BLOCK_P=block_p(P, 64),
    )
    if splits > 1:
        n_rows = B * Hq * Sq
        _combine_splits_kernel[(triton.cdiv(n_rows, 16),)](
            o_part, lse_part, out, lse, n_rows, splits, Hq, Sq, *out.stride(),
            HEAD_DIM=D, BLOCK_R=16, BLOCK_D=BLOCK_D,
        )
    return out, lse
