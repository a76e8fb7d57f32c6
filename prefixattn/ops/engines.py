"""Attention over one block of keys, returning the row logsumexp: the building block of the torch backend.

An engine attends rows of queries to one contiguous block of keys and returns ``(out, lse)``::

    s_ij = scale * q_i . k_j            (softcap c > 0: s_ij = c * tanh(s_ij / c))
           + mask_ij                    (additive: 0 or -inf, or a score bias; optional, per head or
                                         broadcast over the heads)
           -inf where j > i             (causal: top-left aligned, so only for square blocks)
    lse_i = log sum_j exp(s_ij)         (-inf for a row that sees no key; out_i = 0 there)
    out_i = sum_j exp(s_ij - lse_i) v_j

Its backward takes the output ``O`` and logsumexp ``L`` of the *whole* softmax that this block is a part
of (merged with other blocks, the prefix and the sinks) and returns this block's share of the gradients.
That is FlashAttention's identity: with ``P_ij = exp(s_ij - L_i)`` and ``Delta_i = dO_i . O_i``,

    dS_ij = P_ij (dO_i . v_j - Delta_i)      (softcap: times 1 - tanh^2)
    dq_i  = scale * sum_j dS_ij k_j,   dk_j = scale * sum_i dS_ij q_i,   dv_j = sum_i P_ij dO_i

which needs nothing from the other blocks but ``O`` and ``L``. A row with ``L = +inf`` contributes nothing.

Shapes: q (B, Hq, R, Dk), k (B, Hkv, K, Dk), v (B, Hkv, K, Dv), Hq a multiple of Hkv (query head h reads
KV head h // (Hq / Hkv)), mask (B or 1, Hq or 1, R or 1, K); out (B, Hq, R, Dv) in q's dtype, lse fp32
(B, Hq, R).
dk, dv come back summed over the query heads of each KV head.

Two engines:

- ``CpuFlashEngine``: PyTorch's fused CPU attention kernel
  (``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward; what SDPA runs on a CPU).
  Private ops: their schemas are checked and a tiny call is compared against a plain computation
  before first use; any mismatch disables the engine (the chunked engine runs instead). It has no
  softcap and needs Dk == Dv (the smaller side is zero-padded).
- ``ChunkedEngine``: plain PyTorch, any device, every feature; rows in chunks so that the fp32 scores of
  one chunk stay bounded (recomputed in the backward, never stored).
"""

from __future__ import annotations

import torch

# The fp32 score elements one chunk of the chunked engine may hold (x4 bytes, a few such buffers live).
CHUNK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def nonempty_rows(mask: torch.Tensor | None, causal: bool, rows: int) -> torch.Tensor | None:
    """Bool (B or 1, 1, R) of the rows that see at least one key, or None when every row does (the
    block has keys, no mask; a causal row sees its diagonal)."""
    if mask is None:
        return None
    vis = ~torch.isneginf(mask)  # (B|1, 1, R|1, K)
    if causal:
        if vis.shape[-2] == 1:  # a key mask shared by the rows: row i sees keys 0..i
            return (vis.cumsum(-1) > 0)[:, :, 0, :rows]
        vis = vis & torch.ones(rows, vis.shape[-1], dtype=torch.bool, device=vis.device).tril()
    return vis.any(-1)  # (B|1, 1, R|1)


def _empty_to_zero(out: torch.Tensor, lse: torch.Tensor, nonempty: torch.Tensor | None):
    """lse = -inf and out = 0 on rows that see no key (the CPU kernel reports lse = 0 there)."""
    if nonempty is None:
        return out, lse
    lse = lse.masked_fill(~nonempty, float("-inf"))  # (B|1, 1, R|1) broadcast over heads
    out = out.masked_fill(~nonempty.unsqueeze(-1), 0.0)
    return out, lse


# ---------------------------------------------------------------------------------------------------
# the fused CPU kernel
# ---------------------------------------------------------------------------------------------------

_FWD_SCHEMA = (
    "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, "
    "float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) "
    "-> (Tensor output, Tensor logsumexp)"
)
_BWD_SCHEMA = (
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, Tensor key, "
    "Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, Tensor? attn_mask=None, "
    "float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)"
)


def _op(name: str):
    packet = getattr(torch.ops.aten, name, None)
    return None if packet is None else getattr(packet, "default", None)


def find_cpu_flash_problem() -> str | None:
    """Why the fused CPU kernel cannot serve as an engine here (None when it can): a missing op, a schema
    other than the one this code was written against, or a probe call that disagrees with a plain
    computation (outputs, logsumexp, and gradients taken from a merged softmax)."""
    fwd, bwd = _op("_scaled_dot_product_flash_attention_for_cpu"), _op(
        "_scaled_dot_product_flash_attention_for_cpu_backward")
    if fwd is None or bwd is None:
        return "torch has no aten._scaled_dot_product_flash_attention_for_cpu (or its backward)"
    for op, want in ((fwd, _FWD_SCHEMA), (bwd, _BWD_SCHEMA)):
        if str(op._schema) != want:
            return f"unexpected schema {op._schema}"
    try:
        return _probe(fwd, bwd)
    except Exception as e:  # a kernel that throws on a valid call is as unusable as a missing one
        return f"probe call failed: {type(e).__name__}: {e}"


_NOT_PROBED = object()
_CPU_FLASH_PROBLEM: object = _NOT_PROBED


def cpu_flash_problem() -> str | None:
    """``find_cpu_flash_problem()``, found on the first call and kept: nothing runs at import (the probe
    pulls in much of torch's CPU kernel machinery). Under torch.compile the first call runs the probe
    eagerly (a graph break, once); later traces read the kept answer as a constant."""
    found = _CPU_FLASH_PROBLEM
    if found is _NOT_PROBED:
        # decorated here, not at definition: torch.compiler.disable imports dynamo (seconds at import)
        found = (torch.compiler.disable(_probe_once) if torch.compiler.is_compiling() else _probe_once)()
    return found  # type: ignore[return-value]


def _probe_once() -> str | None:
    global _CPU_FLASH_PROBLEM
    # The first call may come from under no_grad / inference_mode / autocast (an eval, generate): the probe
    # takes gradients in full precision, and its answer is kept for the whole process.
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
        _CPU_FLASH_PROBLEM = find_cpu_flash_problem()
    return _CPU_FLASH_PROBLEM


def _probe(fwd, bwd) -> str | None:
    """GQA (2 query heads on 1 KV head), a key mask with a fully masked first row, causal; merged with an
    extra logit per row as a stand-in for the rest of the softmax. Compared in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 3, 4, generator=g, dtype=torch.float64) for h in (2, 1, 1))
    extra = torch.randn(1, 2, 3, generator=g, dtype=torch.float64)
    do = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64)
    keep = torch.tensor([False, True, True])
    mask = torch.zeros(1, 1, 1, 3, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    out, lse = fwd(q, k, v, 0.0, True, attn_mask=mask, scale=0.7)
    s = (q @ k.transpose(-1, -2)) * 0.7
    vis = keep & torch.ones(3, 3, dtype=torch.bool).tril()
    s = s.masked_fill(~vis, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    ref_out = torch.nan_to_num(torch.softmax(s, -1)) @ v
    if not torch.allclose(out, ref_out, atol=1e-10) or not torch.allclose(lse[..., 1:], ref_lse[..., 1:]):
        return "probe: forward output or logsumexp differs from a plain computation"
    # gradients given the merged softmax [s, extra]
    L = torch.logaddexp(ref_lse, extra)
    O = torch.exp(ref_lse - L).nan_to_num().unsqueeze(-1) * ref_out
    dq, dk, dv = bwd(do, q, k, v, O, L, 0.0, True, attn_mask=mask, scale=0.7)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    ss = ((qq @ kk.transpose(-1, -2)) * 0.7).masked_fill(~vis, float("-inf"))
    full = torch.softmax(torch.cat([ss, extra.unsqueeze(-1)], -1), -1)[..., :3]
    ref = torch.autograd.grad(full @ vv, (qq, kk, vv), do)
    if not all(torch.allclose(a, b, atol=1e-10) for a, b in zip((dq, dk, dv), ref, strict=True)):
        return "probe: backward given a merged softmax differs from autograd"
    return None



def _pad_last(t: torch.Tensor, d: int) -> torch.Tensor:
    return t if t.shape[-1] == d else torch.nn.functional.pad(t, (0, d - t.shape[-1]))


class CpuFlashEngine:
    """The fused CPU kernel (what SDPA runs on a CPU): online softmax over key blocks, fp32 accumulation,
    GQA without repeating K/V, causal blocks skipped."""

    name = "cpu_flash"

    @staticmethod
    def forward(q, k, v, mask, causal, scale, softcap):
        assert softcap == 0.0, "the CPU kernel has no softcap"
        dk, dv = q.shape[-1], v.shape[-1]
        d = max(dk, dv)
        if dk != dv:  # one head dim for the kernel: zero columns change neither scores nor output
            q, k, v = _pad_last(q, d), _pad_last(k, d), _pad_last(v, d)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        if dv != d:
            out = out[..., :dv]
        return _empty_to_zero(out, lse, nonempty_rows(mask, causal, q.shape[2]))

    @staticmethod
    def backward(do, q, k, v, out, lse, mask, causal, scale, softcap, need_dq, need_dkv):
        assert softcap == 0.0, "the CPU kernel has no softcap"
        dk_, dv_ = q.shape[-1], v.shape[-1]
        d = max(dk_, dv_)
        if dk_ != dv_:
            q, k, v, out, do = (_pad_last(t, d) for t in (q, k, v, out, do))
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
        return dq[..., :dk_], dk[..., :dk_], dv[..., :dv_]


# ---------------------------------------------------------------------------------------------------
# plain PyTorch, in chunks of rows
# ---------------------------------------------------------------------------------------------------


def _chunks(rows: int, per_row: int):
    size = max(1, min(rows, CHUNK_ELEMENTS // max(per_row, 1)))
    for r0 in range(0, rows, size):
        yield r0, min(rows, r0 + size)


def _scores(qc, k, r0, r1, mask, causal, scale, softcap):
    """Masked scores of rows r0..r1 (B, Hkv, G, r, K) and tanh(raw / c) for the softcap derivative."""
    s = torch.matmul(qc, k.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if mask is not None:
        m = mask if mask.shape[-2] == 1 else mask[..., r0:r1, :]
        if m.shape[1] == 1:  # (B|1, 1, 1, r|1, K): over KV heads and the group
            m = m.unsqueeze(2)
        else:  # per query head: (B|1, Hkv, G, r|1, K)
            m = m.reshape(m.shape[0], qc.shape[1], qc.shape[2], *m.shape[2:])
        s = s + m.to(s.dtype)
    if causal:
        i = torch.arange(r0, r1, device=s.device).view(-1, 1)
        j = torch.arange(s.shape[-1], device=s.device).view(1, -1)
        s = s.masked_fill(j > i, float("-inf"))
    return s, t


class ChunkedEngine:
    """FlashAttention's recurrence written with matmuls over chunks of rows: the scores of one chunk
    (fp32 for half inputs) exist only while it is processed; the backward recomputes them."""

    name = "chunked"

    @staticmethod
    def forward(q, k, v, mask, causal, scale, softcap):
        B, Hq, R, Dk = q.shape
        Hkv, K, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.reshape(B, Hkv, G, R, Dk)
        kk, vv = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
        out = q.new_empty(B, Hkv, G, R, Dv, dtype=ct)
        lse = q.new_empty(B, Hkv, G, R, dtype=ct if ct == torch.float64 else torch.float32)
        for r0, r1 in _chunks(R, B * Hq * K):
            s, _ = _scores(qg[..., r0:r1, :].to(ct), kk, r0, r1, mask, causal, scale, softcap)
            l = torch.logsumexp(s, -1, keepdim=True)  # noqa: E741
            p = torch.exp(s - l.masked_fill(torch.isneginf(l), 0.0))  # empty rows: exp(-inf) = 0
            out[..., r0:r1, :] = torch.matmul(p, vv)
            lse[..., r0:r1] = l.squeeze(-1)
        return out.view(B, Hq, R, Dv).to(q.dtype), lse.view(B, Hq, R)

    @staticmethod
    def backward(do, q, k, v, out, lse, mask, causal, scale, softcap, need_dq, need_dkv):
        B, Hq, R, Dk = q.shape
        Hkv, K, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.reshape(B, Hkv, G, R, Dk)
        dog = do.reshape(B, Hkv, G, R, Dv)
        L = lse.reshape(B, Hkv, G, R, 1)
        delta = (do.to(ct) * out.to(ct)).sum(-1).view(B, Hkv, G, R, 1)
        kk, vv = k.to(ct).unsqueeze(2), v.to(ct).unsqueeze(2)
        dq = torch.empty(B, Hkv, G, R, Dk, dtype=ct, device=q.device) if need_dq else None
        dk = torch.zeros(B, Hkv, K, Dk, dtype=ct, device=q.device) if need_dkv else None
        dv = torch.zeros(B, Hkv, K, Dv, dtype=ct, device=q.device) if need_dkv else None
        for r0, r1 in _chunks(R, B * Hq * K):
            qc, doc = qg[..., r0:r1, :].to(ct), dog[..., r0:r1, :].to(ct)
            s, t = _scores(qc, kk, r0, r1, mask, causal, scale, softcap)
            p = torch.exp(s - L[..., r0:r1, :].to(ct))
            ds = p * (torch.matmul(doc, vv.transpose(-1, -2)) - delta[..., r0:r1, :])
            if t is not None:
                ds = ds * (1 - t * t)
            if need_dq:
                dq[..., r0:r1, :] = torch.matmul(ds, kk) * scale
            if need_dkv:
                dk += torch.matmul(ds.transpose(-1, -2), qc).sum(2) * scale
                dv += torch.matmul(p.transpose(-1, -2), doc).sum(2)
        dq = dq.view(B, Hq, R, Dk).to(q.dtype) if need_dq else None
        return dq, (dk.to(k.dtype) if need_dkv else None), (dv.to(v.dtype) if need_dkv else None)


def cpu_flash_usable(q: torch.Tensor, softcap: float) -> bool:
    return q.device.type == "cpu" and softcap == 0.0 and cpu_flash_problem() is None


def engine_for(q: torch.Tensor, softcap: float):
    """The fused CPU kernel where it runs and has the features, else the chunked engine."""
    return CpuFlashEngine if cpu_flash_usable(q, softcap) else ChunkedEngine


__all__ = ["CpuFlashEngine", "ChunkedEngine", "cpu_flash_problem", "find_cpu_flash_problem", "engine_for",
           "nonempty_rows", "compute_dtype"]
